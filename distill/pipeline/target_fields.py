"""Stage 1's compact targets (``--targets topk|sampled|hybrid``): chosen and encoded from each slice of full logits,
and calibrated once per store (the unigram rank table and the fidelity figures of the manifest).

The format is in distill/cache/targets.py; stage 1 calls ``compute_target_slice`` from its logit pass, where the
(P, V) logits and T=1 probabilities already exist, so no extra vocabulary-wide pass is made beyond the draws.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.cache.targets import ID_BY_RANK, count_head, draw_samples, encode_targets
from distill.pipeline.teacher_model import compute_logits, find_logit_transforms, forward_teacher

TARGET_FIELDS = ("target_count", "target_ids", "target_values", "target_max", "target_draws")


def compute_target_slice(
    logits: torch.Tensor,
    probs1: torch.Tensor,
    lse1: torch.Tensor,
    top_logits: torch.Tensor,
    top_ids: torch.Tensor,
    targets: dict[str, Any],
    rank_of_id: torch.Tensor,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """The stored target arrays of P positions.

    logits (P, V) fp32 at T=1, probs1 (P, V) their softmax, lse1 (P,), top_logits / top_ids (P, K) descending
    (K = layout.top_k for the head kinds, >= 1 otherwise); targets: the layout's ``targets`` entry.
    """
    kind, step = targets["kind"], targets["value_step"]
    parts_ids, parts_draws = [], []
    if kind in ("topk", "hybrid"):
        k = count_head(top_logits, lse1, targets["mass"], step)  # (P,)
        head = torch.arange(top_ids.shape[1], device=logits.device)[None, :] < k[:, None]
        parts_ids.append(torch.where(head, top_ids, -1))
        parts_draws.append(torch.zeros_like(top_ids))
    if kind in ("sampled", "hybrid"):
        ids, draws = draw_samples(probs1, targets["samples"], parts_ids[0] if parts_ids else None, generator)
        parts_ids.append(ids)
        parts_draws.append(draws)
    ids, draws = torch.cat(parts_ids, dim=1), torch.cat(parts_draws, dim=1)
    values = logits.gather(1, ids.clamp(min=0))
    out = encode_targets(ids, values, draws, top_logits[:, 0], rank_of_id, step)
    if kind == "topk":
        del out["target_draws"]
    return out


# --- calibration: unigram ranks and fidelity ----------------------------------------------------


def fit_rank_table(unigram: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(id_by_rank (V,) int32, rank_of_id (V,) int64) from the mean T=1 probability of each id (ties: lower id)."""
    order = torch.sort(-unigram.double(), stable=True).indices  # (V,) ids, most probable first
    rank_of_id = torch.empty_like(order)
    rank_of_id[order] = torch.arange(order.numel())
    return order.numpy().astype(np.int32), rank_of_id


def quantized_logits(logits: torch.Tensor, step: float) -> torch.Tensor:
    """What a decoder reads back for every token of (P, V) logits: max - step · code, codes clamped to 8 bits."""
    row_max = logits.max(dim=-1, keepdim=True).values
    return row_max - step * torch.round((row_max - logits) / step).clamp(0, 255)


def kl_to_reconstruction(logits: torch.Tensor, targets: dict[str, Any], temperature: float) -> torch.Tensor:
    """KL(full ‖ reconstructed) at ``temperature`` of each of P positions, (P,); logits (P, V) fp32 at T=1.

    ``topk``: the head's decoded probabilities, the rest of the mass (1 - decoded head) spread evenly over the
    other tokens (the K+1-bin loss cannot tell how it is spread). ``sampled`` / ``hybrid``: the reconstruction in
    expectation over the draws, E[w_v] ([unbiased-kd note] in pipeline/sampled_kd.py), which differs from the
    teacher only by the value quantization at T != 1; as E[w] need not sum to 1, the generalized KL
    Σ t log(t / q) - Σ t + Σ q is used (equal to the KL when q sums to 1).
    """
    kind, step, t = targets["kind"], targets["value_step"], temperature
    lse1 = logits.logsumexp(dim=-1, keepdim=True)
    log_t = logits / t - (logits / t).logsumexp(dim=-1, keepdim=True)  # (P, V) exact teacher at T
    zq = quantized_logits(logits, step)
    log_tq = zq / t - (logits / t).logsumexp(dim=-1, keepdim=True)  # decoded logit, the stored lse_T
    head = torch.zeros_like(logits, dtype=torch.bool)
    if kind in ("topk", "hybrid"):
        top = logits.topk(min(targets["top_k"], logits.shape[1]), dim=-1)
        k = count_head(top.values, lse1[:, 0], targets["mass"], step)
        keep = torch.arange(top.indices.shape[1], device=logits.device)[None, :] < k[:, None]
        head.scatter_(1, torch.where(keep, top.indices, top.indices[:, :1]), True)
    if kind == "topk":
        head_mass = torch.where(head, log_tq.exp(), 0.0).sum(dim=-1, keepdim=True)
        spread = (1.0 - head_mass).clamp(min=1e-30) / (~head).sum(dim=-1, keepdim=True).clamp(min=1)
        log_q = torch.where(head, log_tq, spread.log())
    else:
        # E[w_v] = t_T(v) · exp((ẑ - z)(1/T - 1)) on sampled tokens; hybrid tails also carry r̂_1 / r_1.
        log_q = log_t + (zq - logits) * (1.0 / t - 1.0)
        if kind == "hybrid":
            r_true = 1.0 - torch.where(head, (logits - lse1).exp(), 0.0).sum(dim=-1, keepdim=True)
            r_read = 1.0 - torch.where(head, (zq - lse1).exp(), 0.0).sum(dim=-1, keepdim=True)
            ratio = (r_read.clamp(min=1e-30) / r_true.clamp(min=1e-30)).log()
            log_q = torch.where(head, log_tq, log_q + ratio)
    p = log_t.exp()
    return (p * (log_t - log_q)).sum(dim=-1) - p.sum(dim=-1) + log_q.exp().sum(dim=-1)


def calibrate_targets(
    model: Any,
    rows: list,
    layout: dict[str, Any],
    batch_size: int,
    device: torch.device,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The teacher's unigram rank table (a store-level array) and the fidelity of the stored targets.

    One teacher pass over the calibration ``rows``: the mean T=1 distribution over their text positions gives
    the ranks ([target-codec note] in cache/targets.py); the mean KL(full ‖ reconstructed) at T=1 and each stored
    T goes to the manifest's ``fidelity`` (``distill cache info`` shows it).
    """
    from distill.pipeline.fields import pad_rows  # fields imports this module

    targets = {**layout["targets"], "top_k": layout["top_k"]}
    temps = sorted({1.0, *layout["temperatures"]})
    transforms = find_logit_transforms(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    unigram = torch.zeros(vocab, dtype=torch.float64)
    kl_sums, positions = torch.zeros(len(temps), dtype=torch.float64), 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = pad_rows(batch)
        with torch.inference_mode():
            hidden = forward_teacher(model, ids.to(device), mask.to(device), False).last_hidden_state
            flat = hidden[mask.to(device).bool()]  # (P, H) real positions (the prefix's prediction included)
            for a in range(0, flat.shape[0], 64):
                logits = compute_logits(model, flat[a : a + 64], transforms).float()  # (p, V)
                unigram += torch.softmax(logits, dim=-1).sum(dim=0).double().cpu()
                for j, t in enumerate(temps):
                    kl_sums[j] += kl_to_reconstruction(logits, targets, t).double().sum().cpu()
                positions += logits.shape[0]
    id_by_rank, _ = fit_rank_table(unigram)
    fidelity = {
        "kind": targets["kind"],
        "rows": len(rows),
        "positions": positions,
        "kl_full_reconstructed": {str(t): float(kl_sums[j] / max(positions, 1)) for j, t in enumerate(temps)},
        "expectation_over_draws": targets["kind"] != "topk",
    }
    return {ID_BY_RANK: id_by_rank}, fidelity
