"""The default kd (``kd_mode=prefix``): the teacher's top-K grouped into shared-prefix bins against the student's
bins, so that a teacher token without a student token of the same bytes still teaches its first piece.

Pure tensor functions, like losses/kd.py (means over valid positions, fp32 reductions, exact 0 in the graph when
nothing is valid). `N` = aligned positions, `Vs` = student vocabulary, `K` = cached top-K.

- `kd_prefix_loss`  teacher top-K grouped into the bins of `text/prefix_map.py` vs the student's bins, against the
                    closest teacher consistent with the head ([head-bound note] in losses/kd.py): the reference
- `lm_and_kd_prefix_from_hidden` lm, lm_unaligned and the same prefix kd from the last hidden state, in slices
                    ([bin-sums note] in losses/fused_head.py), what training runs; `prefix_cells` its teacher side

What the bins approximate and miss: docs/cross-tokenizer.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.pipeline.losses.fused_head import (
    _BinStatistics,
    lm_and_kd_from_hidden,
    lm_from_statistics,
    select_scored_rows,
)
from distill.pipeline.losses.kd import _LOG_ZERO, _select_rows, _zero, head_bound_kl_rows, log1mexp


def kd_prefix_loss(
    student_logits: Tensor,
    teacher_bins: Tensor,
    teacher_logits: Tensor,
    teacher_lse: Tensor,
    student_bin: Tensor,
    temperature: float,
    teacher_bin_size: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """KL over prefix bins against the closest consistent teacher × T², mean over positions.

    Args:
        student_logits: (N, Vs) any float dtype.
        teacher_bins: (N, K) int64, the bin (a student id) of each teacher top-K token, -1 = none;
            several teacher tokens may share a bin (their probabilities add up).
        teacher_logits: (N, K) raw teacher logits at T=1.
        teacher_lse: (N,) logsumexp over the full teacher vocabulary of logits / T.
        student_bin: (Vs,) int64, the bin of every student token, -1 = none.
        temperature: T, the one `teacher_lse` was stored for.
        teacher_bin_size: (Vs,) int64, how many teacher tokens each bin holds (`PrefixMap.teacher_bin_size`);
            a bin whose every token is in the head is compared exactly. None: every bin may hold more.
        mask: (N,) bool or None.

    Both sides are grouped the same way: a bin's mass is that of every token whose longest shared prefix
    is the bin ([prefix-bin note] in prefix_map.py), s_b for the student. The cache holds only the
    teacher's head, so h_b = Σ_{head tokens in b} t_i is a lower bound of the teacher's bin mass: a bin also
    holds the tail tokens that share its prefix. The rest r = 1 - Σ_b h_b is exact. The term is
    `head_bound_kl_rows` on the bins the head reaches ([head-bound note] in losses/kd.py): 0 with zero
    gradient at every student whose bin masses are those of a teacher consistent with the head, the true
    teacher's included. A bin whose every teacher token is in the head is compared exactly, so with every
    token its own bin this is `kd_tail_loss`. The student's mass outside those bins is summed directly
    ([tail-bin note]).
    """
    student_logits, teacher_bins, teacher_logits, teacher_lse = _select_rows(
        mask, student_logits, teacher_bins, teacher_logits, teacher_lse
    )
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    n, vocab = student_logits.shape
    spare = vocab  # column collecting tokens without a bin
    s_prob = F.softmax(student_logits.float() / temperature, dim=-1)  # (N, Vs)
    s_cols = torch.where(student_bin >= 0, student_bin, spare).to(s_prob.device).expand(n, -1)
    s_bin = torch.zeros(n, vocab + 1, device=s_prob.device).scatter_add(1, s_cols, s_prob)  # (N, Vs + 1)

    t_logp = teacher_logits.float() / temperature - teacher_lse.float().unsqueeze(-1)  # (N, K)
    binned = teacher_bins >= 0
    t_cols = torch.where(binned, teacher_bins, spare).long()
    t_bin = torch.zeros_like(s_bin).scatter_add(1, t_cols, torch.where(binned, t_logp.exp(), 0.0))
    in_head = torch.zeros_like(s_bin, dtype=torch.bool).scatter_(1, t_cols, True)
    in_head[:, spare] = False
    rest_t = log1mexp(torch.where(binned, t_logp, _LOG_ZERO).logsumexp(dim=-1)).exp()  # (N,)
    rest_s = torch.where(in_head, 0.0, s_bin).sum(dim=-1)  # (N,) includes the spare column

    # one cell per bin: the first slot naming it carries the bin's masses, the others carry 0
    slots = torch.arange(t_cols.shape[1], device=t_cols.device).expand_as(t_cols)
    first = torch.full_like(s_bin, t_cols.shape[1], dtype=torch.long).scatter_reduce(1, t_cols, slots, "amin")
    cell = binned & (first.gather(1, t_cols) == slots)  # (N, K)
    head = torch.where(cell, t_bin.gather(1, t_cols), 0.0)
    student = torch.where(cell, s_bin.gather(1, t_cols), 0.0)
    exact = None
    if teacher_bin_size is not None:
        in_bin = torch.zeros_like(s_bin).scatter_add(1, t_cols, binned.float())  # head tokens per bin
        size = F.pad(teacher_bin_size.to(s_bin.device).float(), (0, vocab + 1 - teacher_bin_size.shape[0]))
        exact = cell & (in_bin.gather(1, t_cols) >= size[t_cols])
    return head_bound_kl_rows(head, rest_t, student, rest_s, exact).mean() * temperature**2


def prefix_cells(
    teacher_bins: Tensor,
    teacher_logits: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    teacher_bin_size: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The teacher side of ``kd_prefix_loss``: one cell per distinct bin of each row, from the (N, K) head alone.

    Args as ``kd_prefix_loss`` (teacher_bins (N, K) student ids naming bins, -1 = none).
    Returns ``cells`` (N, K) the bin of each cell, -1 in the slots without one (a bin's cell is the first
    slot of its group after sorting the row by bin), ``head`` (N, K) its teacher lower bound (0 off cells),
    ``rest`` (N,) the teacher's exact rest 1 - Σ head and ``exact`` (N, K) bool, the cells whose every teacher
    token is in the head (None without ``teacher_bin_size``). No tensor of the student's vocabulary width.
    """
    t_logp = teacher_logits.float() / temperature - teacher_lse.float().unsqueeze(-1)  # (N, K)
    binned = teacher_bins >= 0
    none = torch.iinfo(torch.int64).max  # sorts after every bin
    bins, order = torch.where(binned, teacher_bins.long(), none).sort(dim=-1)  # (N, K) each bin's slots together
    named = bins != none
    first = F.pad(bins[:, 1:] != bins[:, :-1], (1, 0), value=True)  # the first slot of each group
    group = first.long().cumsum(-1) - 1  # (N, K) the group of each slot, 0..K-1
    t_prob = torch.where(binned, t_logp.exp(), 0.0).gather(1, order)
    cell = first & named
    cells = torch.where(cell, bins, -1)
    head = torch.where(cell, torch.zeros_like(t_prob).scatter_add(1, group, t_prob).gather(1, group), 0.0)
    rest = log1mexp(torch.where(binned, t_logp, _LOG_ZERO).logsumexp(dim=-1)).exp()  # (N,)
    if teacher_bin_size is None:
        return cells, head, rest, None
    in_bin = torch.zeros_like(t_prob).scatter_add(1, group, named.float()).gather(1, group)  # head tokens per bin
    size = teacher_bin_size.to(cells.device)
    known = (cells >= 0) & (cells < size.shape[0])  # a bin past the map's size holds no teacher token
    bin_size = torch.where(known, size[cells.clamp(0, size.shape[0] - 1)], 0)
    return cells, head, rest, cell & (in_bin >= bin_size)


def lm_and_kd_prefix_from_hidden(
    hidden: Tensor,
    head: torch.nn.Module,
    labels: Tensor,
    unaligned: Tensor | None,
    kd_pos: Tensor,
    teacher_bins: Tensor,
    teacher_logits: Tensor,
    teacher_lse: Tensor,
    student_bin: Tensor,
    temperature: float,
    teacher_bin_size: Tensor | None = None,
    slice_size: int = 256,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """``lm``, ``lm_unaligned`` and the prefix ``kd`` from the student's last hidden state, in one sliced pass.

    Args:
        hidden, head, labels, unaligned, kd_pos, slice_size: as ``lm_and_kd_from_hidden`` in losses/fused_head.py.
        teacher_bins, teacher_logits, teacher_lse, temperature, teacher_bin_size: the ``kd_prefix_loss``
            inputs of the N kd rows.
        student_bin: (Vs',) the bin of every student token, -1 = none; padded with -1 (or cut) to the output
            layer's width.

    ``kd`` equals ``kd_prefix_loss`` on the logits of the kd rows; only (N, K) statistics reach autograd
    (the student's mass in each cell and outside them, [bin-sums note] in losses/fused_head.py).
    """
    if kd_pos.numel() == 0:  # no aligned position: kd is an in-graph 0, as kd_prefix_loss's
        no_kd = (None, None, None, 1.0, slice_size)
        lm, lm_unaligned, _ = lm_and_kd_from_hidden(hidden, head, labels, unaligned, kd_pos, *no_kd)
        return lm, lm_unaligned, _zero(hidden)
    rows, kd_rows, compute_dtype = select_scored_rows(hidden, head, labels, kd_pos)
    cells, bounds, rest, exact = prefix_cells(teacher_bins, teacher_logits, teacher_lse, temperature, teacher_bin_size)
    columns = fit_student_bins(student_bin.to(hidden.device), head.weight.shape[0])
    entry_slot, entry_col = list_bin_columns(cells, columns)
    lse1, z_label, s_cells, s_rest = _BinStatistics.apply(
        hidden[rows],
        head.weight,
        getattr(head, "bias", None),
        labels[rows].clamp(min=0),
        kd_rows,
        entry_slot,
        entry_col,
        cells.shape[1],
        temperature,
        slice_size,
        compute_dtype,
    )
    lm, lm_unaligned = lm_from_statistics(lse1, z_label, labels, unaligned, rows)
    return lm, lm_unaligned, head_bound_kl_rows(bounds, rest, s_cells, s_rest, exact).mean() * temperature**2


def list_bin_columns(cells: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
    """Every student column of every cell: (E,) the cell's flat slot (row * M + slot of ``cells`` (N, M)) and
    (E,) the column. ``columns`` (V,) is the bin of each column (-1: none); a cell whose bin no column has
    gets no entry (mass 0), nor does a slot without a cell (-1)."""
    vocab = columns.shape[0]
    binned = columns >= 0
    by_bin = torch.argsort(torch.where(binned, columns, vocab), stable=True)  # (V,) columns grouped by bin
    count = torch.bincount(columns[binned], minlength=vocab)[:vocab]  # (V,) columns per bin (bins are column ids)
    first = torch.cumsum(count, 0) - count
    slot = (cells.reshape(-1) >= 0).nonzero()[:, 0]
    bins = cells.reshape(-1)[slot]
    known = bins < vocab
    bins = torch.where(known, bins, 0)
    size = torch.where(known, count[bins], 0)  # (cells,)
    offset = torch.arange(int(size.sum()), device=cells.device) - (torch.cumsum(size, 0) - size).repeat_interleave(size)
    return slot.repeat_interleave(size), by_bin[first[bins].repeat_interleave(size) + offset]


def fit_student_bins(student_bin: Tensor, vocab: int) -> Tensor:
    """(vocab,) int64 the bins of the output layer's columns: embedding rows past the tokenizer have none (-1)."""
    student_bin = student_bin.long()[:vocab]
    return F.pad(student_bin, (0, vocab - student_bin.shape[0]), value=-1)


# --- approximate likelihood matching -----------------------------------------------------
