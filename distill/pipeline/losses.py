"""Loss terms of stage 2 (`distill train`) as pure tensor functions.

Every function here takes plain tensors and returns a scalar fp32 tensor that is a
**mean over valid positions** (never a sum), so every term is O(1) at initialization
whatever the sequence length, hidden size or vocabulary. Inputs may arrive in any float
dtype (fp16 from the cache, bf16 under autocast); each function casts to fp32 itself
before any softmax or reduction. Masks are explicit `(N,)` bool tensors; when nothing
is valid a function returns exactly 0 that is still attached to the graph, so the
training loop can call `backward()` on any weighted sum without special cases.

Shapes: `N` = number of aligned positions, flattened over the batch; `Vs` / `Vt` =
student / teacher vocabulary; `K` = cached teacher top-K; `D` = hidden width;
`S` = number of student key spans; `E` = number of router experts.

Terms (see DESIGN.md, "Stage 2"):

- `kd_tail_loss`     teacher top-K + one tail bin vs the student (default KD)
- `uld_loss`         sorted-probability L1 (vocabulary-agnostic, weakest signal)
- `projector_kd_loss` KL against the logit projector's student-vocabulary logits
- `lm_loss`          next-token cross-entropy on the student's own tokens
- `lm_and_kd_from_hidden` lm, lm_unaligned and the tail kd from the last hidden state, in slices
- `feature_loss`     MSE against a fixed teacher target
- `routed_feature_loss` the router's gate-weighted per-expert errors (router.py)
- `attention_kl_loss` teacher attention pooled onto student key spans vs the student's
- `layerwise_loss`   student layer i vs teacher layer m(i), see `build_layer_map`
- `contrastive_loss` InfoNCE between aligned student and teacher representations
- `load_balance_loss`, `importance_loss`  router regularizers
- `combine_terms`    weighted total + the flat dict that the loop logs
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.pipeline.sampled_kd import sampled_kd_rows

# Stand-in for log(0) where a finite value is needed. [finite-neg note] -inf would make
# `logsumexp` return -inf and its backward exp(-inf - -inf) = NaN for a row without any
# matched bin; a large finite negative keeps both the value (exp -> 0) and the gradient
# (masked by `torch.where`) clean.
_LOG_ZERO = -1e30

# [tail-bin note] The two tails of the K+1-bin KL are computed differently, on purpose.
# Student: log r_s = logsumexp over the vocabulary OUTSIDE the matched head - log Z, summed from the
# non-head probabilities themselves. This is exact in the relative sense: each term has an absolute
# log-error of ~|log Z| · 2^-24, so r_s keeps ~6 digits whatever its size (1e-9 or 1e-30). The other
# route, log1mexp(logsumexp(head)), is exact only for an exact input: the head's log-mass is a sum of
# z_i/T - log Z whose absolute error is ~|log Z| · 2^-24 ≈ 1e-6, and log1mexp turns that into a
# relative error of ~1e-6 / r_s on the tail (100% at r_s = 1e-6; the 9-11% value and 26% gradient
# errors measured at tails below 1e-6). No log1mexp, however stable, recovers digits its input lacks.
# Teacher: only its top-K logits and the full log Z are stored, so r_t = 1 - head is all there is;
# log1mexp clamps its input to <= -_TAIL_EPS, so r_t >= ~1e-7 (the input's own precision). That
# costs at most ~1e-7 · |log r_s| per row, and r_t · (log r_t - log r_s) stays finite when the top-K
# holds (numerically) all of the teacher's mass. A student with no tail at all (every token of its
# vocabulary in the head) has no tail bin: the bin is left out (only K >= V can do that).
_TAIL_EPS = 1e-7


# --- helpers -------------------------------------------------------------------------


def _zero(like: Tensor) -> Tensor:
    """Exact fp32 zero that keeps `like` in the autograd graph (sum over an empty slice,
    so it stays 0 even if `like` holds inf/NaN)."""
    return like.reshape(-1)[:0].float().sum()


def _select_rows(mask: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Keep the rows (dim 0) where `mask` is True; everything when `mask` is None.

    Selecting before computing means padded rows with garbage values can never leak a
    NaN into the loss or its gradient."""
    if mask is None:
        return tensors
    keep = mask.reshape(-1).bool()
    return tuple(t[keep] for t in tensors)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012).

    x is clamped to <= -1e-7 first (see [tail-bin note]: used for the teacher's tail only);
    the two branches are each exact in their own half: log(-expm1(x)) near 0, log1p(-exp(x))
    for very negative x. Exact for its input, it cannot undo an error already in x.
    """
    x = x.clamp(max=-_TAIL_EPS)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --- knowledge distillation on the output distribution --------------------------------


def kd_tail_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """KL over K+1 bins (teacher top-K tokens + one tail bin) × T², mean over positions.

    Args:
        student_logits: (N, Vs) any float dtype.
        teacher_ids: (N, K) int64, teacher top-K tokens mapped **into the student
            vocabulary**; -1 marks a teacher token with no student counterpart, whose mass
            joins the tail bin. The matched ids of one row must be distinct (the
            vocabulary map is injective), otherwise a student probability is counted twice.
        teacher_logits: (N, K) raw teacher logits at T=1 (fp16 from the cache is fine).
        teacher_lse: (N,) fp32, logsumexp over the FULL teacher vocabulary of
            teacher_logits / T — this is what makes the teacher probs exact, not renormalized.
        temperature: T, the same one `teacher_lse` was stored for.
        mask: (N,) bool, True = aligned position to score; None = all.

    With teacher probs t_i = exp(z_i / T - lse), student probs s_i of the same tokens,
    tails r_t = 1 - Σ t_i and r_s = Σ_{j not in the head} s_j:
        KL = Σ_i t_i (log t_i - log s_i) + r_t (log r_t - log r_s)
    This is the KL between the two distributions coarse-grained onto K+1 bins: a lower bound of
    the full KL (merging bins never raises a KL, log-sum inequality), zero when the student matches
    the head and the tail mass, blind to how either spreads its tail. With K = full vocabulary it is
    the full KL. r_s is summed from the non-head tokens, never 1 - Σ s_i: [tail-bin note].
    """
    student_logits, teacher_ids, teacher_logits, teacher_lse = _select_rows(
        mask, student_logits, teacher_ids, teacher_logits, teacher_lse
    )
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (N, Vs)
    ids = teacher_ids.long()
    matched = ids >= 0
    s_logp = student_logp.gather(1, ids.clamp(min=0))  # (N, K)
    # Head membership; unmatched ids write to a spare last column, so they never unmark column 0.
    n, vocab = student_logp.shape
    spare = torch.where(matched, ids, vocab)
    in_head = torch.zeros(n, vocab + 1, dtype=torch.bool, device=ids.device).scatter_(1, spare, True)[:, :vocab]
    log_tail_s = torch.where(in_head, _LOG_ZERO, student_logp).logsumexp(dim=-1)  # (N,) [tail-bin note]
    return _kd_tail_rows(s_logp, log_tail_s, teacher_ids, teacher_logits, teacher_lse, temperature).mean() * (
        temperature**2
    )


def _kd_tail_rows(
    s_logp: Tensor,
    log_tail_s: Tensor,
    teacher_ids: Tensor,
    teacher_logits: Tensor,
    teacher_lse: Tensor,
    temperature: float,
) -> Tensor:
    """Per-row K+1-bin KL of ``kd_tail_loss`` (without T²), (N,).

    s_logp: (N, K) the student's log-probs at T of the ids; log_tail_s: (N,) the log of the student's
    mass outside the matched head, summed directly ([tail-bin note]); <= _LOG_ZERO / 2 or -inf = no tail.
    """
    matched = teacher_ids >= 0  # (N, K)
    t_logp = teacher_logits.float() / temperature - teacher_lse.float().unsqueeze(-1)  # (N, K)

    # The teacher's tail in log space from its matched bins only; see [finite-neg note].
    log_head_t = torch.where(matched, t_logp, _LOG_ZERO).logsumexp(dim=-1)  # (N,)
    log_tail_t = log1mexp(log_head_t)
    has_tail = log_tail_s > _LOG_ZERO / 2  # False for an empty tail (-inf or the finite stand-in)
    log_tail_s = torch.where(has_tail, log_tail_s, 0.0)  # no -inf even in the branch not taken

    # 0 · log 0 = 0: unmatched bins and teacher probs that underflow contribute nothing.
    t_prob = t_logp.exp()
    head_valid = matched & (t_prob > 0)
    head = torch.where(head_valid, t_prob * (t_logp - s_logp), 0.0).sum(dim=-1)  # (N,)
    tail = torch.where(has_tail, log_tail_t.exp() * (log_tail_t - log_tail_s), 0.0)  # (N,)
    return head + tail


def uld_loss(
    student_logits: Tensor,
    teacher_logits_topk: Tensor,
    teacher_lse: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """Universal Logit Distillation: L1 between sorted probability vectors, mean over positions.

    Args:
        student_logits: (N, Vs) any float dtype.
        teacher_logits_topk: (N, K) raw teacher top-K logits at T=1, any order.
        teacher_lse: (N,) fp32 full-vocabulary logsumexp of teacher logits / T.
        temperature: T.
        mask: (N,) bool or None.

    Both distributions are sorted descending and compared rank by rank over the first K
    ranks, plus one extra bin for the remaining (tail) mass: Σ_k |t_(k) - s_(k)| +
    |r_t - r_s|, in [0, 2]. It ignores which token is which, so it works between any two
    vocabularies with no mapping at all — and for the same reason it is the weakest
    signal in published comparisons (PRIOR_ART.md). Kept as an option, not the default.
    No T² factor: the term is an L1 in probability space, already bounded.
    """
    student_logits, teacher_logits_topk, teacher_lse = _select_rows(
        mask, student_logits, teacher_logits_topk, teacher_lse
    )
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    k = teacher_logits_topk.shape[-1]
    t_sorted = (teacher_logits_topk.float() / temperature - teacher_lse.float().unsqueeze(-1)).exp()
    t_sorted = t_sorted.sort(dim=-1, descending=True).values  # (N, K)
    s_prob = F.softmax(student_logits.float() / temperature, dim=-1)
    s_sorted = s_prob.topk(min(k, s_prob.shape[-1]), dim=-1).values  # (N, <=K), descending
    if s_sorted.shape[-1] < k:  # student vocabulary smaller than K: missing ranks hold 0
        s_sorted = F.pad(s_sorted, (0, k - s_sorted.shape[-1]))
    tail_gap = (t_sorted.sum(-1) - s_sorted.sum(-1)).abs()  # |r_t - r_s| = |Σs - Σt|
    return ((t_sorted - s_sorted).abs().sum(dim=-1) + tail_gap).mean()


def projector_kd_loss(
    student_logits: Tensor,
    projected_teacher_logits: Tensor,
    temperature: float,
    mask: Tensor | None = None,
) -> Tensor:
    """KL(softmax(projected / T) || softmax(student / T)) × T², mean over positions.

    Args:
        student_logits: (N, Vs) any float dtype.
        projected_teacher_logits: (N, Vs) from `router.LogitProjector` — the teacher's
            distribution carried into the student vocabulary.
        temperature: T.
        mask: (N,) bool or None.
    """
    student_logits, projected_teacher_logits = _select_rows(mask, student_logits, projected_teacher_logits)
    if student_logits.shape[0] == 0:
        return _zero(student_logits)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t_logp = F.log_softmax(projected_teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / s_logp.shape[0]
    return kl * temperature**2


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
    if do_kd and kd_pos.unique().numel() != kd_pos.numel():
        raise ValueError("kd_pos must not repeat a row (each position has one teacher target)")
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if not autocast and hidden.dtype != head.weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but the output layer is {head.weight.dtype} (and no autocast)")
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else head.weight.dtype
    valid = labels != -100
    # Rows that are scored at all: padding without a kd target costs nothing.
    keep = valid.clone()
    if do_kd:
        keep[kd_pos] = True
    rows = keep.nonzero()[:, 0]
    new_index = torch.cumsum(keep, 0) - 1  # old row -> row among the kept ones
    lse1, z_label, lse_t, lse_rest, z_ids = _HeadStatistics.apply(
        hidden[rows],
        head.weight,
        getattr(head, "bias", None),
        labels[rows].clamp(min=0),
        new_index[kd_pos] if do_kd else None,
        kd_ids.long() if do_kd else None,
        temperature,
        slice_size,
        compute_dtype,
    )
    count = valid.sum().clamp(min=1)
    ce = (lse1 - z_label) * valid[rows]  # (P',) per-position cross-entropy, 0 where unscored
    lm = ce.sum() / count
    lm_unaligned = (ce * unaligned[rows]).sum() / count if unaligned is not None else None
    if not do_kd:
        return lm, lm_unaligned, None
    s_logp = z_ids / temperature - lse_t.unsqueeze(-1)  # (N, K) student log-probs at T of the mapped ids
    log_tail_s = lse_rest - lse_t  # (N,) summed over the non-head tokens: [tail-bin note]
    if kd_multiplier is not None:
        rows = sampled_kd_rows(s_logp, kd_ids, kd_logits, kd_multiplier, kd_lse, temperature)
    else:
        rows = _kd_tail_rows(s_logp, log_tail_s, kd_ids, kd_logits, kd_lse, temperature)
    return lm, lm_unaligned, rows.mean() * temperature**2


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
                dz_c = dz.to(compute_dtype)
                if need_h:
                    grad_h[start:end] = (dz_c @ w).to(h.dtype)
                if need_w and compute_dtype == torch.float32:
                    grad_w.addmm_(dz_c.t(), hs)
                elif need_w:
                    grad_w.add_((dz_c.t() @ hs).float())
                if need_b:
                    grad_b.add_(dz.sum(0))
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


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


# --- hidden-state and attention terms ---------------------------------------------------


def feature_loss(student_proj: Tensor, teacher_target: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between (N, D) tensors, mean over positions AND dims.

    Averaging over D (not summing) keeps the term ~1 + Var(student_proj) at init for a
    standardized teacher target, whatever D is.
    """
    student_proj, teacher_target = _select_rows(mask, student_proj, teacher_target)
    if student_proj.numel() == 0:
        return _zero(student_proj)
    return (student_proj.float() - teacher_target.float()).pow(2).mean()


def routed_feature_loss(router_probs: Tensor, expert_error: Tensor, mask: Tensor | None = None) -> Tensor:
    """Σ_e p_e · err_e per position, mean over positions: the student-aware router's feature term.

    Args:
        router_probs: (N, E) the gate's softmax (carries the gate's gradient).
        expert_error: (N, E) per expert, the MSE (mean over dims) of its student projection
            against its fixed, standardized teacher layer (`router.RouterOutput.expert_error`).
        mask: (N,) bool or None.

    ~1 + Var(projection) at init for standardized targets, whatever D or E; see
    [router-gradient note] in router.py for why each expert is scored against its own target.
    """
    router_probs, expert_error = _select_rows(mask, router_probs, expert_error)
    if router_probs.shape[0] == 0:
        return _zero(expert_error)
    return (router_probs.float() * expert_error.float()).sum(dim=-1).mean()


def attention_kl_loss(
    student_attn: Tensor,
    teacher_attn: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """KL(teacher || student) per query row, mean over valid rows.

    Args:
        student_attn: (N, S) probability rows over S student key spans (head-averaged).
        teacher_attn: (N, S) teacher attention pooled onto the same spans
            (`pool_attention_to_spans`); each row sums to 1, zeros allowed.
        mask: (N,) bool or None; rows whose teacher row has no mass must be masked out.
        eps: floor for student probabilities so a span the student gives 0 costs
            t · log(t / eps) (at most ~18 nats) instead of inf.
    """
    student_attn, teacher_attn = _select_rows(mask, student_attn, teacher_attn)
    if student_attn.shape[0] == 0:
        return _zero(student_attn)
    s = student_attn.float().clamp(min=eps)
    t = teacher_attn.float()
    terms = torch.where(t > 0, t * (t.clamp(min=eps).log() - s.log()), 0.0)  # 0 · log 0 = 0
    return terms.sum(dim=-1).mean()


def pool_attention_to_spans(
    attn_values: Tensor,
    attn_key_ids: Tensor,
    key_span_index: Tensor,
    num_spans: int,
) -> tuple[Tensor, Tensor]:
    """Pool sparse cached teacher attention rows onto student key spans.

    Args:
        attn_values: (N, Ka) attention weights of the teacher's top-Ka keys per query
            (fp16 from the cache is fine).
        attn_key_ids: (N, Ka) int, the teacher key position of each value; out-of-range
            or negative ids (padding) are ignored.
        key_span_index: (N, Lt) or (Lt,) int, for each teacher key position the student
            span it falls in, in [0, num_spans), or -1 for keys with no student span.
        num_spans: S.

    Returns:
        pooled: (N, S) fp32, the attention summed per span and renormalized to sum 1
            (the dropped top-Ka tail and unmapped keys are not counted); rows with no
            mass are all zero.
        valid: (N,) bool, False for those empty rows — mask them in `attention_kl_loss`.
    """
    n, lt = attn_values.shape[0], key_span_index.shape[-1]
    span_of_pos = key_span_index.long().expand(n, lt) if key_span_index.dim() == 1 else key_span_index.long()
    key_ids = attn_key_ids.long()
    in_range = (key_ids >= 0) & (key_ids < lt)
    spans = span_of_pos.gather(1, key_ids.clamp(0, max(lt - 1, 0)))  # (N, Ka)
    keep = in_range & (spans >= 0) & (spans < num_spans)
    values = torch.where(keep, attn_values.float(), 0.0)
    pooled = values.new_zeros(n, num_spans).scatter_add_(1, torch.where(keep, spans, 0), values)
    mass = pooled.sum(dim=-1, keepdim=True)  # (N, 1)
    valid = mass.squeeze(-1) > 0
    pooled = torch.where(valid.unsqueeze(-1), pooled / mass.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    return pooled, valid


def layerwise_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Normalized MSE: mean((s - t)²) / mean(t²), over valid positions and all dims.

    Args:
        student_hidden: (N, D) student layer i, already projected to the teacher width.
        teacher_hidden: (N, D) teacher layer m(i), standardized with the cache's stats.
        mask: (N,) bool or None.
        eps: floor of the denominator.

    For standardized targets mean(t²) ≈ 1 and this is the plain MSE; the normalization
    (by the fixed, detached teacher power) keeps it O(1) even for a layer whose stats are
    off, and it cannot be lowered by shrinking the teacher side. No cosine: magnitude
    errors count too.
    """
    student_hidden, teacher_hidden = _select_rows(mask, student_hidden, teacher_hidden)
    if student_hidden.numel() == 0:
        return _zero(student_hidden)
    t = teacher_hidden.float().detach()
    mse = (student_hidden.float() - t).pow(2).mean()
    return mse / t.pow(2).mean().clamp(min=eps)


def build_layer_map(
    num_student_layers: int,
    teacher_layers: list[int],
    num_teacher_layers: int | None = None,
) -> dict[int, int]:
    """Map student layers to cached teacher layers by relative depth.

    Args:
        num_student_layers: S; student layers are numbered 1..S (hidden_states index,
            0 being the embedding output).
        teacher_layers: the cached teacher layer indices (>= 1).
        num_teacher_layers: teacher depth M; default max(teacher_layers).

    Each teacher layer m picks the student layer i whose relative depth i/S is nearest
    to m/M; when two teacher layers pick the same student layer (student shallower than
    the teacher's selection), that student layer keeps the teacher layer nearest in
    depth. Ties go to the shallower layer, compared in exact integer arithmetic so the
    result is deterministic. Works for a deeper student (30 vs 24) and a shallower one.

    Returns:
        {student_layer: teacher_layer}, sorted by student layer — only supervised layers.
    """
    if num_student_layers < 1:
        raise ValueError(f"num_student_layers must be >= 1, got {num_student_layers}")
    if not teacher_layers or min(teacher_layers) < 1:
        raise ValueError(f"teacher_layers must be non-empty and >= 1 (0 is the embedding output), got {teacher_layers}")
    depth = num_teacher_layers if num_teacher_layers is not None else max(teacher_layers)
    if depth < max(teacher_layers):
        raise ValueError(f"num_teacher_layers={depth} is smaller than the deepest cached layer {max(teacher_layers)}")

    def distance(i: int, m: int) -> int:  # |i/S - m/M| scaled by S·M
        return abs(i * depth - m * num_student_layers)

    best: dict[int, int] = {}
    for m in sorted(set(teacher_layers)):
        i = min(range(1, num_student_layers + 1), key=lambda j: (distance(j, m), j))
        if i not in best or distance(i, m) < distance(i, best[i]):
            best[i] = m
    return dict(sorted(best.items()))


def contrastive_loss(
    student_repr: Tensor,
    teacher_repr: Tensor,
    temperature: float = 0.1,
    mask: Tensor | None = None,
    max_positions: int = 1024,
) -> Tensor:
    """InfoNCE between aligned student and teacher representations, mean over positions.

    Args:
        student_repr: (N, D) student representations (projected to the teacher width).
        teacher_repr: (N, D) teacher representations at the same aligned positions.
        temperature: softmax temperature of the cosine similarities.
        mask: (N,) bool or None.
        max_positions: at most this many positions are used, taken evenly strided over
            the valid ones (deterministic), which bounds the (N, N) logits matrix.

    Row n's positive is teacher position n, the negatives are the other teacher positions
    in the batch. At random init it is ≈ log N (≈ 6.9 at the 1024 cap): O(1), not scaled.
    """
    student_repr, teacher_repr = _select_rows(mask, student_repr, teacher_repr)
    n = student_repr.shape[0]
    if n == 0:
        return _zero(student_repr)
    if n > max_positions:
        keep = torch.linspace(0, n - 1, max_positions, device=student_repr.device).long()
        student_repr, teacher_repr = student_repr[keep], teacher_repr[keep]
        n = max_positions
    s = F.normalize(student_repr.float(), dim=-1)
    t = F.normalize(teacher_repr.float(), dim=-1)
    logits = s @ t.T / temperature  # (N, N)
    return F.cross_entropy(logits, torch.arange(n, device=logits.device))


# --- router regularizers ----------------------------------------------------------------


def load_balance_loss(router_probs: Tensor, expert_index: Tensor) -> Tensor:
    """Switch-Transformer load balancing: E · Σ_e f_e · P_e; 1 when perfectly balanced.

    Args:
        router_probs: (N, E) softmax router probabilities.
        expert_index: (N, k) or (N,) chosen experts; column 0 is the top-1 expert.

    f_e = fraction of positions whose top-1 expert is e (a count, no gradient);
    P_e = mean router probability of e (carries the gradient).
    """
    n, num_experts = router_probs.shape
    if n == 0:
        return _zero(router_probs)
    top1 = expert_index[:, 0] if expert_index.dim() == 2 else expert_index
    fraction = torch.bincount(top1.long(), minlength=num_experts).float() / n  # (E,)
    mean_prob = router_probs.float().mean(dim=0)  # (E,)
    return num_experts * (fraction * mean_prob).sum()


def importance_loss(router_probs: Tensor) -> Tensor:
    """Squared coefficient of variation of per-expert summed probabilities; 0 when balanced.

    Args:
        router_probs: (N, E). Uses the population variance, so E = 1 gives 0, not NaN.
    Scale-free (summing over N and dividing by the squared mean cancels N). Note it is
    legitimately ~0 at init when the router is near uniform.
    """
    if router_probs.shape[0] == 0:
        return _zero(router_probs)
    importance = router_probs.float().sum(dim=0)  # (E,)
    return importance.var(unbiased=False) / importance.mean().pow(2).clamp(min=1e-12)


# --- the weighted total -----------------------------------------------------------------


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
