"""The ALM term (``curriculum.alm``, ``kd_mode=alm``): approximate likelihood matching between the chunks where both
tokenizations end, from the cached ``target_logprob`` only. (The default kd across tokenizers, prefix bins, is in
prefix_kd.py.)

Pure tensor functions, like losses/kd.py (means over valid chunks, fp32 reductions, exact 0 in the graph when
nothing is valid). `N` = aligned positions, `Vs` = student vocabulary, `C` = chunks, `B`/`L` = rows/positions.

- `find_chunks`     chunk boundaries where both tokenizations end (consecutive aligned positions of a row)
- `sum_chunk_logprobs` per-chunk sums of per-position next-token log-probs (teacher's `target_logprob`, student's)
- `alm_loss`        approximate likelihood matching: binarized KL between chunk likelihoods (Minixhofer et al., 2025)
- `next_token_logprobs_from_hidden`, `alm_from_hidden` the student side of ALM from its last hidden state, sliced

What each target approximates and misses: docs/cross-tokenizer.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.pipeline.losses.fused_head import (
    _HeadStatistics,
)
from distill.pipeline.losses.kd import _select_rows, _zero, log1mexp


def find_chunks(
    batch_idx: Tensor, teacher_pos: Tensor, student_pos: Tensor, segment: Tensor | None = None
) -> tuple[Tensor, ...]:
    """Chunks between consecutive aligned positions of the same row and the same document.

    batch_idx, teacher_pos, student_pos: (A,) int64 aligned pairs, grouped by row and increasing within
    it (`AlignedBatch`). Pair i and i+1 of one row end at the same characters e_i < e_{i+1} on both sides,
    so teacher tokens t_i+1..t_{i+1} and student tokens s_i+1..s_{i+1} spell the same text[e_i:e_{i+1}].
    segment: (A,) int64 the document segment of each pair in a packed row ([packing note] in packing.py),
    None when every row is one document. Two consecutive pairs of different segments make no chunk: the text
    between them ends one document and starts the next, which neither model reads as one stream.
    Returns (row, t_start, t_end, s_start, s_end), each (C,) int64: chunk c is predicted by teacher positions
    t_start..t_end-1 and student positions s_start..s_end-1. The text before a document's first aligned
    position is no chunk (a model without a BOS cannot predict its first token), in a packed row as alone.
    """
    joined = batch_idx[1:] == batch_idx[:-1]  # (A - 1,)
    if segment is not None:
        joined &= segment[1:] == segment[:-1]
    keep = joined.nonzero()[:, 0]
    return batch_idx[keep], teacher_pos[keep], teacher_pos[keep + 1], student_pos[keep], student_pos[keep + 1]


def sum_chunk_logprobs(logprobs: Tensor, row: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Sum of logprobs[row, start:end] per chunk, (C,) fp32.

    logprobs: (B, L) per-position log-probability of the actual next token (position p predicts p+1);
    non-finite values (the teacher's NaN past a row's last token) count as 0 and must lie outside every chunk.
    Exact sums by float64 prefix sums; differentiable.
    """
    values = torch.nan_to_num(logprobs.double(), nan=0.0, posinf=0.0, neginf=0.0)
    prefix = F.pad(values.cumsum(dim=1), (1, 0))  # (B, L + 1)
    return (prefix[row, end] - prefix[row, start]).float()


def alm_loss(
    student_chunk_logp: Tensor, teacher_chunk_logp: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """Binarized KL between the teacher's and the student's chunk likelihoods, mean over chunks.

    Args:
        student_chunk_logp: (C,) log q of each chunk under the student (sum over its tokens).
        teacher_chunk_logp: (C,) log p of the same chunks under the teacher (sum of cached `target_logprob`).
        temperature: τ; each side's likelihood is taken as exp(log p / τ) (τ > 1 softens long chunks).
        mask: (C,) bool or None.

    Per chunk, with p = exp(log p / τ), q = exp(log q / τ): p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q)),
    the KL between the two "this chunk / anything else" coins (approximate likelihood matching, Minixhofer et
    al. 2025, binarized f-divergence with f = KL). 0 iff q = p; log(1 - ·) via log1mexp, both sides at <= -1e-7.
    """
    student_chunk_logp, teacher_chunk_logp = _select_rows(mask, student_chunk_logp, teacher_chunk_logp)
    if student_chunk_logp.shape[0] == 0:
        return _zero(student_chunk_logp)
    log_q = (student_chunk_logp.float() / temperature).clamp(max=-1e-7)
    log_p = (teacher_chunk_logp.float() / temperature).clamp(max=-1e-7)
    p = log_p.exp()
    kl = p * (log_p - log_q) + (1 - p) * (log1mexp(log_p) - log1mexp(log_q))
    return kl.mean()


def next_token_logprobs_from_hidden(
    hidden: Tensor, head: torch.nn.Module, labels: Tensor, slice_size: int = 256
) -> Tensor:
    """log q(label) of every position from the last hidden state, by slices ([sliced-logits note] in fused_head.py).

    hidden: (P, D); head: the student's output layer D -> V; labels: (P,) next tokens, -100 where none.
    Returns (P,) fp32, 0 where the label is -100; differentiable with respect to hidden and the head.
    """
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else head.weight.dtype
    valid = labels != -100
    lse1, z_label, *_ = _HeadStatistics.apply(
        hidden,
        head.weight,
        getattr(head, "bias", None),
        labels.clamp(min=0),
        None,
        None,
        1.0,
        slice_size,
        compute_dtype,
    )
    return torch.where(valid, z_label - lse1, 0.0)


def alm_from_hidden(
    hidden: Tensor,
    head: torch.nn.Module,
    labels: Tensor,
    target_logprob: Tensor,
    batch_idx: Tensor,
    teacher_pos: Tensor,
    student_pos: Tensor,
    temperature: float = 1.0,
    segment: Tensor | None = None,
) -> tuple[Tensor, int]:
    """The `alm` term of a batch: chunks between aligned positions, the teacher's likelihoods from the cache.

    hidden: (B, Ls, D) student last hidden state; labels: (B, Ls) next student tokens (-100: none);
    target_logprob: (B, L) cached teacher log p of its next token; batch_idx, teacher_pos, student_pos: (A,)
    aligned pairs (`AlignedBatch`); segment: (A,) their document in packed rows, or None (`find_chunks`).
    Returns (`alm_loss` over the batch's chunks, number of chunks).
    """
    bsz, length = labels.shape
    row, t_start, t_end, s_start, s_end = find_chunks(batch_idx, teacher_pos, student_pos, segment)
    student_logp = next_token_logprobs_from_hidden(hidden.reshape(bsz * length, -1), head, labels.reshape(-1))
    student_chunks = sum_chunk_logprobs(student_logp.reshape(bsz, length), row, s_start, s_end)
    teacher_chunks = sum_chunk_logprobs(target_logprob.float(), row, t_start, t_end)
    return alm_loss(student_chunks, teacher_chunks, temperature), int(row.numel())
