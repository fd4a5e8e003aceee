"""The weighted total of a micro-batch's loss terms, and what is logged of each: ``loss/<term>``,
``weight/<term>`` and ``weighted/<term>``, so that the total equals the sum of the weighted terms."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.pipeline.losses.kd import _zero


def combine_terms(raw: dict[str, Tensor], weights: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """Weighted total of the loss terms, and the flat dict of floats the loop logs.

    Args:
        raw: term name -> scalar tensor (only the terms that were computed).
        weights: term name -> current weight (from the curriculum).

    Returns:
        total: Σ weight · raw over terms present in `raw` with weight > 0 (an in-graph 0
            when there are none).
        logs: `loss/<term>` for every raw term, `weight/<term>` for every term in either
            dict, `weighted/<term>` for every raw term (0.0 when not counted), and
            `loss/total` — which equals the sum of the `weighted/` values.
    """
    total: Tensor | None = None
    logs: dict[str, float] = {}
    for name, value in raw.items():
        weight = float(weights.get(name, 0.0))
        logs[f"loss/{name}"] = float(value.detach())
        weighted = value.float() * weight if weight > 0 else None
        logs[f"weighted/{name}"] = float(weighted.detach()) if weighted is not None else 0.0
        if weighted is not None:
            total = weighted if total is None else total + weighted
    for name in sorted(set(raw) | set(weights)):
        logs[f"weight/{name}"] = float(weights.get(name, 0.0))
    if total is None:
        total = _zero(next(iter(raw.values()))) if raw else torch.zeros(())
    logs["loss/total"] = float(total.detach())
    return total, logs
