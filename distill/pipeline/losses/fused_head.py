"""The student's own language-modeling loss, and lm + kd from its last hidden state without the full logits.

Pure tensor functions with the conventions of losses/kd.py (fp32 means over valid positions, an in-graph 0
when nothing is valid).

- `lm_loss`          next-token cross-entropy on the student's own tokens
- `lm_and_kd_from_hidden` lm, lm_unaligned and the tail kd from the last hidden state, in slices
                     ([sliced-logits note] at `_HeadStatistics`)
- `_BinStatistics`   the same pass reduced to the student's mass in prefix bins, for the prefix kd of
                     prefix_kd.lm_and_kd_prefix_from_hidden ([bin-sums note])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.pipeline.losses.kd import _kd_tail_rows
from distill.pipeline.losses.sampled_kd import sampled_kd_rows

# --- the student's own language-modeling loss ------------------------------------------


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Next-token cross-entropy, mean over non-ignored labels, in fp32.

    Args:
        logits: (B, L, V) (or (N, V)), already aligned: logits[:, t] predicts labels[:, t]
            — the caller does the shift.
        labels: (B, L) (or (N,)) int64; `ignore_index` marks positions not scored.
    Returns 0 (in the graph) when every label is ignored.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1).long()
    count = (flat_labels != ignore_index).sum()
    # reduction="mean" is NaN when all labels are ignored; sum / max(count, 1) is 0 then.
    total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    return total / count.clamp(min=1)


def lm_and_kd_from_hidden(
    hidden: Tensor,
    head: torch.nn.Module,
    labels: Tensor,
    unaligned: Tensor | None,
    kd_pos: Tensor,
    kd_ids: Tensor | None,
    kd_logits: Tensor | None,
    kd_lse: Tensor | None,
    temperature: float,
    slice_size: int = 256,
    kd_multiplier: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``lm`` (and ``lm_unaligned``) and the tail-bin ``kd`` from the student's last hidden state, slice by slice.

    Args:
        hidden: (P, D) last hidden state of every student position, flattened over the batch.
        head: the student's output layer, a linear map D -> V (``.weight`` (V, D), ``.bias`` or None).
        labels: (P,) next token of each position, -100 where there is none.
        unaligned: (P,) bool, positions without a teacher target (for ``lm_unaligned``), or None.
        kd_pos: (N,) int64 distinct rows of ``hidden`` that have a teacher target (any order).
        kd_ids, kd_logits, kd_lse: the ``kd_tail_loss`` teacher inputs of those N rows; None skips kd.
        temperature: KD temperature.
        slice_size: rows per slice.
        kd_multiplier: (N, K) for sampled teacher targets: kd is then ``sampled_kd_loss``'s unbiased estimate of
            the full KL instead of the K+1-bin KL ([unbiased-kd note] in sampled_kd.py); None = the tail kd.

    ``lm`` is the mean cross-entropy over valid positions; ``lm_unaligned`` sums the cross-entropy
    of the positions WITHOUT a teacher target and divides by ALL valid positions; ``kd`` equals
    ``kd_tail_loss`` on the logits of the kd rows. See [sliced-logits note] at ``_HeadStatistics``
    for how they are computed without the full logits.

    [unaligned-lm note] With kd weight a, lm weighs 1 - a everywhere; positions that no teacher
    position aligns with get no kd signal, so they would train at 1 - a only. ``lm_unaligned``,
    weighted a, lifts them back to weight 1: per unaligned position (1 - a)/N + a/N = 1/N. It is 0
    when every position is aligned (one tokenizer).
    """
    do_kd = kd_ids is not None and kd_pos.numel() > 0
    rows, kd_rows, compute_dtype = select_scored_rows(hidden, head, labels, kd_pos if do_kd else None)
    lse1, z_label, lse_t, lse_rest, z_ids = _HeadStatistics.apply(
        hidden[rows],
        head.weight,
        getattr(head, "bias", None),
        labels[rows].clamp(min=0),
        kd_rows,
        kd_ids.long() if do_kd else None,
        temperature,
        slice_size,
        compute_dtype,
    )
    lm, lm_unaligned = lm_from_statistics(lse1, z_label, labels, unaligned, rows)
    if not do_kd:
        return lm, lm_unaligned, None
    s_logp = z_ids / temperature - lse_t.unsqueeze(-1)  # (N, K) student log-probs at T of the mapped ids
    log_tail_s = lse_rest - lse_t  # (N,) summed over the non-head tokens: [tail-bin note]
    if kd_multiplier is not None:
        rows = sampled_kd_rows(s_logp, kd_ids, kd_logits, kd_multiplier, kd_lse, temperature)
    else:
        rows = _kd_tail_rows(s_logp, log_tail_s, kd_ids, kd_logits, kd_lse, temperature)
    return lm, lm_unaligned, rows.mean() * temperature**2


def select_scored_rows(
    hidden: Tensor, head: torch.nn.Module, labels: Tensor, kd_pos: Tensor | None
) -> tuple[Tensor, Tensor | None, torch.dtype]:
    """The rows of ``hidden`` a sliced pass scores, where the kd rows are among them, and the products' dtype.

    hidden (P, D); labels (P,), -100 = no label; kd_pos (N,) distinct rows with a teacher target, or None.
    Returns ``rows`` (P',) the rows with a label or a target (padding without a target costs nothing),
    ``kd_rows`` (N,) the kd rows' indices among ``rows`` (None without kd) and the dtype of the products
    (the autocast dtype under autocast, else the output layer's).
    """
    if kd_pos is not None and kd_pos.unique().numel() != kd_pos.numel():
        raise ValueError("kd_pos must not repeat a row (each position has one teacher target)")
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if not autocast and hidden.dtype != head.weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the output layer is {head.weight.dtype} (and no autocast)")
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else head.weight.dtype
    keep = labels != -100
    if kd_pos is not None:
        keep = keep.clone()
        keep[kd_pos] = True
    rows = keep.nonzero()[:, 0]
    new_index = torch.cumsum(keep, 0) - 1  # old row -> row among the kept ones
    return rows, None if kd_pos is None else new_index[kd_pos], compute_dtype


def lm_from_statistics(
    lse1: Tensor, z_label: Tensor, labels: Tensor, unaligned: Tensor | None, rows: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``lm`` and ``lm_unaligned`` ([unaligned-lm note]) from the scored rows' logsumexp and label logit (P',)."""
    valid = labels != -100
    count = valid.sum().clamp(min=1)
    ce = (lse1 - z_label) * valid[rows]  # (P',) per-position cross-entropy, 0 where unscored
    lm_unaligned = (ce * unaligned[rows]).sum() / count if unaligned is not None else None
    return ce.sum() / count, lm_unaligned


class _HeadStatistics(torch.autograd.Function):
    """The output layer's logits reduced, slice by slice, to the statistics the lm and kd terms need.

    Forward: for rows h (P, D) and the output layer (W, b), logits z = h Wᵀ + b, per slice of rows:
    ``lse1`` = logsumexp(z) (P,), ``z_label`` = z at each row's label (P,), and for the kd rows
    ``lse_t`` = logsumexp(z / T) (N,), ``lse_rest`` = logsumexp(z / T) over the columns outside the
    row's matched ids (N,; -inf when there are none) and ``z_ids`` = z at the mapped teacher ids (N, K)
    (-1 ids read column 0; the kd term masks them). cross-entropy = lse1 - z_label, the student's
    log-prob at T of an id = z_ids / T - lse_t and its log tail = lse_rest - lse_t ([tail-bin note]),
    so both terms are functions of these.

    [sliced-logits note] The (P, V) logits are a step's largest tensor (49k columns for the
    reference student) and every pass over them costs as much as a good part of the output
    layer's product at small widths. Here no (P, V) tensor ever exists: each slice's logits are
    made, reduced in place and freed; backward recomputes them and forms the gradient of the
    logits directly, dz = softmax(z)·g_lse1 + softmax(z/T)·g_lse_t/T + rest(z/T)·g_rest/T +
    scatter(g_label) + scatter(g_ids), with rest(z/T) the softmax over the non-head columns (0 on the
    head). Two exponentials in place instead of autograd's log-softmax, division, index and
    zero-filled scatter buffers: forward masks the head columns in place and gets lse_t =
    logaddexp(lse_rest, logsumexp(head)) (a sum of positives, no cancellation); backward makes
    rest(z/T) once and reads softmax(z/T) from it as rest · exp(lse_rest - lse_t) on the non-head
    columns (a factor <= 1: nothing overflows) and from z_ids on the K head columns, which it writes
    over (so the head columns' rest values, which may overflow, never reach the sum). The products run
    in ``compute_dtype`` (the autocast dtype under autocast), the reductions in fp32.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, kd_rows, kd_ids, temperature, slice_size, compute_dtype):
        n_rows = h.shape[0]
        lse1 = h.new_empty(n_rows, dtype=torch.float32)
        z_label = h.new_empty(n_rows, dtype=torch.float32)
        n_kd = 0 if kd_rows is None else kd_rows.numel()
        # logsumexp(z / T) of every row when there are kd rows (most rows are; computing it for all
        # rows in place is cheaper than copying the kd rows out), of none otherwise.
        lse_t_all = h.new_zeros(n_rows if n_kd else 0, dtype=torch.float32)
        lse_rest_all = h.new_zeros(n_rows if n_kd else 0, dtype=torch.float32)  # = lse_t on rows without kd
        z_ids = h.new_empty((n_kd, 0 if kd_ids is None else kd_ids.shape[1]), dtype=torch.float32)
        w, b = _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        with torch.autocast(h.device.type, enabled=False):
            for start, end, pick, local in _head_slices(n_rows, slice_size, kd_rows):
                z = F.linear(h[start:end].to(compute_dtype), w, b).float()  # (n, V)
                lse1[start:end] = torch.logsumexp(z, dim=-1)
                z_label[start:end] = z.gather(1, labels[start:end, None])[:, 0]
                if local is not None:
                    ids = kd_ids[pick]
                    z_ids[pick] = z[local[:, None], ids.clamp(min=0)]
                    head_t = torch.where(ids >= 0, z_ids[pick] / temperature, -math.inf)  # (k, K)
                    z.div_(temperature).index_put_(_head_cells(local, ids), z.new_tensor(-math.inf))
                    lse_rest = torch.logsumexp(z, dim=-1)  # (n,) over the non-head columns
                    lse_rest_all[start:end] = lse_rest
                    lse_t = lse_rest.clone()
                    lse_t[local] = torch.logaddexp(lse_rest[local], torch.logsumexp(head_t, dim=-1))
                    lse_t_all[start:end] = lse_t
        ctx.save_for_backward(h, weight, bias, labels, kd_rows, kd_ids, lse1, lse_t_all, lse_rest_all)
        ctx.settings = (temperature, slice_size, compute_dtype)
        if n_kd:
            return lse1, z_label, lse_t_all[kd_rows], lse_rest_all[kd_rows], z_ids
        return lse1, z_label, lse_t_all, lse_rest_all, z_ids

    @staticmethod
    def backward(ctx, g_lse1, g_label, g_lse_t, g_rest, g_ids):
        h, weight, bias, labels, kd_rows, kd_ids, lse1, lse_t_all, lse_rest_all = ctx.saved_tensors
        temperature, slice_size, compute_dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w, b = _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        with torch.autocast(h.device.type, enabled=False):
            for start, end, pick, local in _head_slices(h.shape[0], slice_size, kd_rows):
                hs = h[start:end].to(compute_dtype)
                z = F.linear(hs, w, b).float()  # (n, V)
                soft_t = None
                if local is not None:  # (softmax(z/T)·g_lse_t + rest(z/T)·g_rest) / T, 0 on rows without kd
                    ids = kd_ids[pick]
                    lse_t, lse_rest = lse_t_all[start:end][local], lse_rest_all[start:end][local]
                    # Non-head columns: softmax(z/T) = rest(z/T) · exp(lse_rest - lse_t), so one exponential
                    # serves both. Rows without a tail (lse_rest = -inf) are all head: overwritten below.
                    tail = torch.exp(lse_rest - lse_t)
                    coef = z.new_zeros(end - start).index_copy_(
                        0, local, (g_lse_t[pick] * tail + g_rest[pick]) / temperature
                    )
                    soft_t = torch.div(z, temperature).sub_(lse_rest_all[start:end, None]).exp_().mul_(coef[:, None])
                    head_cells = _head_cells(local, ids)
                    z_head = z[local[:, None], ids.clamp(min=0)]  # (k, K) before z is overwritten
                    head_grad = (z_head / temperature - lse_t[:, None]).exp() * (g_lse_t[pick] / temperature)[:, None]
                    soft_t.index_put_(head_cells, head_grad[ids >= 0])  # written over, not added
                dz = z.sub_(lse1[start:end, None]).exp_().mul_(g_lse1[start:end, None])
                if soft_t is not None:
                    dz.add_(soft_t)
                    del soft_t
                    dz.index_put_(
                        (local[:, None], kd_ids[pick].clamp(min=0)),
                        g_ids[pick] * (kd_ids[pick] >= 0),
                        accumulate=True,
                    )
                dz.scatter_add_(1, labels[start:end, None], g_label[start:end, None])
                _add_slice_grads(dz, hs, w, grad_h, grad_w, grad_b, start, end)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _add_slice_grads(
    dz: Tensor, hs: Tensor, w: Tensor, grad_h: Tensor | None, grad_w: Tensor | None, grad_b: Tensor | None,
    start: int, end: int,
) -> None:  # fmt: skip
    """Add a slice's logits gradient dz (n, V) fp32 to those of its rows h[start:end], the weight and the bias.

    hs (n, D) and w (V, D) are the slice's rows and the weight in the products' dtype; fp32 accumulators,
    None where not needed."""
    dz_c = dz.to(w.dtype)
    if grad_h is not None:
        grad_h[start:end] = (dz_c @ w).to(grad_h.dtype)
    if grad_w is not None and w.dtype == torch.float32:
        grad_w.addmm_(dz_c.t(), hs)
    elif grad_w is not None:
        grad_w.add_((dz_c.t() @ hs).float())
    if grad_b is not None:
        grad_b.add_(dz.sum(0))


def _head_cells(local: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) index pairs of the matched head ids; local (k,) rows of the slice, ids (k, K), -1 = none."""
    matched = ids >= 0
    return local[:, None].expand_as(ids)[matched], ids[matched]


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _head_slices(n_rows: int, slice_size: int, kd_rows: Tensor | None):
    """(start, end, pick, local) per slice: ``pick`` indexes the kd rows in the slice, ``local`` their offsets."""
    for start in range(0, n_rows, slice_size):
        end = min(start + slice_size, n_rows)
        if kd_rows is None:
            yield start, end, None, None
            continue
        pick = ((kd_rows >= start) & (kd_rows < end)).nonzero()[:, 0]
        yield start, end, pick, (kd_rows[pick] - start if pick.numel() else None)


class _BinStatistics(torch.autograd.Function):
    """The output layer's logits reduced, slice by slice, to lm's statistics and the student's mass in bins.

    Forward: for rows h (P, D) and the output layer (W, b), logits z = h Wᵀ + b, per slice of rows:
    ``lse1`` = logsumexp(z) (P,) and ``z_label`` (P,) as in ``_HeadStatistics``, and for the N kd rows
    (``kd_rows``) the student's probabilities at T, p = softmax(z / T), summed over cells: ``s_cells`` (N, M)
    the mass of each cell, ``s_rest`` (N,) the mass of every column in none of the row's cells. A cell is a
    set of columns (a prefix bin's student tokens), given as one entry per (cell, column) pair: ``entry_slot``
    (E,) the cell's flat index row * M + slot, ``entry_col`` (E,) the column; a column is in at most one cell
    of a row, and a cell without entries has mass 0.

    [bin-sums note] This is ``_HeadStatistics`` with each head id widened to its bin's columns, and no
    (P, V) tensor ever exists ([sliced-logits note]). Forward: the cells' masses are sums over their entries,
    gathered from the slice's logits; the rest is summed directly over the other columns, never 1 - Σ s_c
    ([tail-bin note] in losses/kd.py). At T = 1 (the default) lse_t is lse1 and one exponential serves both:
    e = exp(z - max) in place, lse1 from its row sums, the rest from the same sums with the cells' columns
    zeroed. At another T, the rest is exp(logsumexp(z / T over the other columns) - lse_t) with the cells'
    columns masked to -inf, and lse_t = logaddexp(that, the entries' own logsumexp): sums of positives.
    Backward recomputes each slice's logits; with g_c the gradient of cell c (the rest one more cell) and
    ḡ = Σ_c s_c g_c, dL/dz_j = (1/T) · p_j · (g_{cell(j)} - ḡ), so every column gets p_j (g_rest - ḡ) / T
    in one pass over the slice (at T = 1 the same exponential as lm's softmax) and the E entries a
    correction p_j (g_c - g_rest) / T, added in place.
    """

    @staticmethod
    def forward(
        ctx, h, weight, bias, labels, kd_rows, entry_slot, entry_col, n_cells, temperature, slice_size, compute_dtype
    ):
        n_rows = h.shape[0]
        lse1 = h.new_empty(n_rows, dtype=torch.float32)
        z_label = h.new_empty(n_rows, dtype=torch.float32)
        lse_t = h.new_empty(kd_rows.numel(), dtype=torch.float32)
        s_cells = h.new_zeros(kd_rows.numel() * n_cells, dtype=torch.float32)
        s_rest = h.new_empty(kd_rows.numel(), dtype=torch.float32)
        w, b = _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        with torch.autocast(h.device.type, enabled=False):
            slices = _bin_slices(n_rows, slice_size, kd_rows, entry_slot, n_cells)
            for start, end, pick, local, entries, e_row in slices:
                z = F.linear(h[start:end].to(compute_dtype), w, b).float()  # (n, V)
                z_label[start:end] = z.gather(1, labels[start:end, None])[:, 0]
                if local is None:
                    lse1[start:end] = torch.logsumexp(z, dim=-1)
                    continue
                cols = entry_col[entries]
                if temperature == 1:  # one exponential for lse1 and the rest: [bin-sums note]
                    z_e = z[e_row, cols]  # (E_s,) the cells' columns
                    top = z.amax(dim=-1, keepdim=True)
                    total = z.sub_(top).exp_().sum(dim=-1)  # (n,)
                    lse1[start:end] = top[:, 0] + total.log()
                    lse_local = lse1[start:end][local]
                    rest = z.index_put_((e_row, cols), z.new_tensor(0.0)).sum(dim=-1)[local] / total[local]
                else:
                    lse1[start:end] = torch.logsumexp(z, dim=-1)
                    z_e = z.div_(temperature)[e_row, cols]
                    z.index_put_((e_row, cols), z.new_tensor(-math.inf))
                    lse_rest = torch.logsumexp(z, dim=-1)[local]  # (k,) over the columns in no cell
                    lse_local = torch.logaddexp(lse_rest, _row_logsumexp(z_e, e_row, local, end - start))
                    rest = (lse_rest - lse_local).exp()
                lse_t[pick] = lse_local
                row_lse = z.new_zeros(end - start).index_copy_(0, local, lse_local)  # (n,) lse_t by slice row
                s_cells.index_add_(0, entry_slot[entries], (z_e - row_lse[e_row]).exp())
                s_rest[pick] = rest
        s_cells = s_cells.view(kd_rows.numel(), n_cells)
        ctx.save_for_backward(h, weight, bias, labels, kd_rows, entry_slot, entry_col, lse1, lse_t, s_cells, s_rest)
        ctx.settings = (n_cells, temperature, slice_size, compute_dtype)
        return lse1, z_label, s_cells, s_rest

    @staticmethod
    def backward(ctx, g_lse1, g_label, g_cells, g_rest):
        h, weight, bias, labels, kd_rows, entry_slot, entry_col, lse1, lse_t, s_cells, s_rest = ctx.saved_tensors
        n_cells, temperature, slice_size, compute_dtype = ctx.settings
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        g_mean = (s_cells * g_cells).sum(-1) + s_rest * g_rest  # (N,) ḡ = Σ_c s_c g_c, the rest included
        g_entry = (g_cells.reshape(-1)[entry_slot] - g_rest[entry_slot // n_cells]) / temperature  # (E,)
        w, b = _cast(weight, compute_dtype), _cast(bias, compute_dtype)
        with torch.autocast(h.device.type, enabled=False):
            slices = _bin_slices(h.shape[0], slice_size, kd_rows, entry_slot, n_cells)
            for start, end, pick, local, entries, e_row in slices:
                hs = h[start:end].to(compute_dtype)
                z = F.linear(hs, w, b).float()  # (n, V)
                coef = g_lse1[start:end].clone()  # (n,) the factor of softmax(z) (lm) ...
                if local is not None:  # ... and of softmax(z / T) on every column: [bin-sums note]
                    n = end - start
                    row_lse = z.new_zeros(n).index_copy_(0, local, lse_t[pick])
                    kd_coef = z.new_zeros(n).index_copy_(0, local, (g_rest[pick] - g_mean[pick]) / temperature)
                    cols = entry_col[entries]
                    p_e = (z[e_row, cols] / temperature - row_lse[e_row]).exp()  # (E_s,) before z is overwritten
                    if temperature == 1:
                        coef.add_(kd_coef)  # lse_t = lse1: one exponential serves lm and kd
                    else:
                        kd = torch.div(z, temperature).sub_(row_lse[:, None]).exp_().mul_(kd_coef[:, None])
                dz = z.sub_(lse1[start:end, None]).exp_().mul_(coef[:, None])
                if local is not None:
                    if temperature != 1:
                        dz.add_(kd)
                        del kd
                    dz.index_put_((e_row, cols), p_e * g_entry[entries], accumulate=True)
                dz.scatter_add_(1, labels[start:end, None], g_label[start:end, None])
                _add_slice_grads(dz, hs, w, grad_h, grad_w, grad_b, start, end)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def _bin_slices(n_rows: int, slice_size: int, kd_rows: Tensor, entry_slot: Tensor, n_cells: int):
    """``_head_slices`` plus, per slice, the entries of its kd rows and each entry's row in the slice."""
    entry_row = kd_rows[entry_slot // n_cells]  # (E,) the scored row of each entry
    for start, end, pick, local in _head_slices(n_rows, slice_size, kd_rows):
        if local is None:
            yield start, end, pick, None, None, None
            continue
        entries = ((entry_row >= start) & (entry_row < end)).nonzero()[:, 0]
        yield start, end, pick, local, entries, entry_row[entries] - start


def _row_logsumexp(values: Tensor, row: Tensor, local: Tensor, n: int) -> Tensor:
    """logsumexp of ``values`` (E,) grouped by ``row`` (E,) in 0..n-1, at the rows ``local`` (k,); -inf where none."""
    top = values.new_full((n,), -math.inf).scatter_reduce(0, row, values, "amax")
    safe = torch.where(torch.isfinite(top), top, 0.0)
    total = values.new_zeros(n).index_add_(0, row, (values - safe[row]).exp())
    return (safe + total.log())[local]
