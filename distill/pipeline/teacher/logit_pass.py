"""What stage 1's pass over a slice of full logits shares: the slice itself, its top-K in two levels ([two-level
note]), and its logsumexps at T = 1, 2 and 4 from one exponential and squares ([exp-chain note]; also the
calibration's fidelity, over a tail).

    top_k_rows(logits, k, out=(values, ids))                       # torch.topk's values, descending
    exp_sums(logits, row_max, [1.0, 2.0, 4.0], out)                # Σ exp((z - max) / T); out = exp(z - max)
    sl = LogitSlice(logits, probs1, lse1, top_logits, top_ids)    # handed to a calibration's ``observe``
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

POWER_TEMPERATURES = (1.0, 2.0, 4.0)
"""The temperatures whose logsumexp comes from one exponential and squares ([exp-chain note])."""


TOPK_BLOCK = 16  # columns per block of ``top_k_rows``'s first level


def top_k_rows(x: torch.Tensor, k: int, out: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The k largest values of each row of ``x`` (P, V) and their columns, descending, into ``out`` (P, k) each.

    [two-level note] On a CPU, torch.topk over a whole vocabulary costs more than a softmax over it (each row is
    copied to (value, index) pairs and partially sorted). So the columns are cut into V // 16 blocks, block j
    the columns j, j + V // 16, j + 2 · V // 16, ... (so that the blocks' maxima are an elementwise max of 16
    contiguous rows, one vectorized pass), and the top k are found among the 16 k columns of the k blocks with the
    largest maxima (plus the V mod 16 columns in no block). Exact: a block holding one of the k largest values has a
    maximum at least the k-th largest value, and fewer than k blocks exceed it; the values are torch.topk's, the
    columns too unless values tie (both pick among tied columns in their own order). About 2/3 of torch.topk's
    time at V = 38k, k = 128; a GPU, a short row or a large k runs torch.topk itself.
    """
    p, v = x.shape
    nb = v // TOPK_BLOCK
    if x.device.type != "cpu" or nb < 2 * k:
        torch.topk(x, k, dim=-1, out=out)
        return
    maxima = x[:, : nb * TOPK_BLOCK].view(p, TOPK_BLOCK, nb).amax(dim=1)  # (P, nb)
    blocks = maxima.topk(k, dim=-1, sorted=False).indices  # (P, k)
    cols = (blocks[:, :, None] + torch.arange(0, nb * TOPK_BLOCK, nb, device=x.device)).reshape(p, -1)
    if nb * TOPK_BLOCK < v:
        cols = torch.cat([cols, torch.arange(nb * TOPK_BLOCK, v, device=x.device).expand(p, -1)], dim=1)
    top = x.gather(1, cols).topk(k, dim=-1)
    out[0].copy_(top.values)
    torch.gather(cols, 1, top.indices, out=out[1])


@dataclass
class LogitSlice:
    """P positions of the logit pass at T = 1: what ``compute_logit_fields`` already holds when it calls ``observe``."""

    logits: torch.Tensor  # (P, V) fp32
    probs1: torch.Tensor  # (P, V) their softmax
    lse1: torch.Tensor  # (P,) their logsumexp
    top_logits: torch.Tensor  # (P, K) descending, K >= 1: the first is the row max
    top_ids: torch.Tensor  # (P, K) int64


def exp_sums(
    logits: torch.Tensor, row_max: torch.Tensor, temperatures: Sequence[float], out: torch.Tensor
) -> torch.Tensor:
    """(P, nT) Σ_v exp((z_v - max) / T) for each T of ``temperatures`` (a subset of POWER_TEMPERATURES holding 1),
    over ``logits`` (P, V) with their row max (P, 1); ``out`` (P, V) ends holding exp(z - max).

    [exp-chain note] One exponential at the largest T, then squares: exp((z - max) / 2) = exp((z - max) / 4)²,
    exp(z - max) = exp((z - max) / 2)², each followed by its sum. A square costs a fraction of an exponential and
    nothing is scaled or copied, so lse at 1, 2 and 4 cost about one softmax at T = 1 (lse_T = max / T + log of the
    sum). Exact to fp32 rounding: (z - max) / T is exact for these T, a square doubles a value's relative rounding,
    and a value underflows only where exp(z - max) itself does (below e^-87 of the row's largest term).
    """
    top = max(temperatures)
    if 1.0 not in temperatures or any(t not in POWER_TEMPERATURES for t in temperatures):
        raise ValueError(f"exp_sums covers 1 and T in {POWER_TEMPERATURES}, not {list(temperatures)}")
    torch.add(row_max * (-1.0 / top), logits, alpha=1.0 / top, out=out).exp_()
    sums = torch.empty(logits.shape[0], len(temperatures), device=logits.device)
    t = top
    while True:
        for j, wanted in enumerate(temperatures):
            if wanted == t:
                sums[:, j] = out.sum(dim=-1)
        if t == 1.0:
            return sums
        out.square_()
        t /= 2.0
