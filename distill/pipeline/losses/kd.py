"""Loss terms of stage 2 (`distill train`) on the output distribution, as pure tensor functions.

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

These conventions hold for every loss module of stage 2: this one (tail kd, the head bound, ULD, projector),
prefix_kd.py (the default kd), sampled_kd.py (kd on sampled targets), fused_head.py (the student's own
next-token loss and the kd computed from its last hidden state), cross_tokenizer.py (ALM), representation.py
(hidden-state, attention, router terms), hidden_targets.py (the teacher's states as targets) and combine.py
(the weighted total).

Terms (see DESIGN.md, "Stage 2"):

- `kd_tail_loss`     teacher top-K + one tail bin vs the student (default KD)
- `head_bound_kl_rows` KL against the teacher completion closest to the student, for cells whose stored
                     teacher mass is only a lower bound (prefix bins, pooled attention): [head-bound note]
- `uld_loss`         sorted-probability L1 (vocabulary-agnostic, weakest signal)
- `projector_kd_loss` KL against the logit projector's student-vocabulary logits
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


# [head-bound note] Some terms group the teacher's tokens (or attention keys) into cells that also hold
# tokens the cache did not keep: a prefix bin holds every teacher token with that shared prefix, the
# head's and the tail's; a student key span pools every teacher key in it, kept or not. The stored head
# gives each cell only a lower bound h_b <= T_b of the teacher's mass T_b there, and the rest,
# r = 1 - Σ h_b, is exact but its split over the cells is unknown. Comparing h_b with the student's full
# cell mass s_b (and r with the student's mass outside the cells) scores a student that reproduces the
# teacher above 0, and drives it to move the tail part of every cell out. Instead the term is the KL
# against the teacher completion most favourable to the student:
#     L(s) = min { KL(h + τ ‖ s) : τ >= 0, Σ τ = r }  (τ spread over the cells and the rest)
# which is 0, with zero gradient, at every student whose cell masses are those of a teacher consistent
# with the cache (s_b >= h_b), the true one included. The minimizer is water-filling: the completed
# teacher is max(h_b, c · s_b) on the cells and c · s_rest outside, with c in (0, 1] making the total 1.
# With A = {b : h_b > c · s_b}, the cells the student under-covers,
#     L = Σ_{b in A} h_b log(h_b / s_b) + (1 - h_A) log((1 - h_A) / (1 - s_A)),
# the K+1-bin KL of kd_tail_loss on the partition {A, everything else}. A is found by sorting the ratios
# h_b / s_b (no gradient through the choice; the value is continuous in s, and so is its gradient
# almost everywhere). A cell whose every token is in the head (h_b = T_b, `exact`) takes no completion:
# it is always in A and compared exactly, so with every cell exact this is kd_tail_loss's K+1-bin KL.


def head_bound_kl_rows(
    head: Tensor, rest: Tensor, student: Tensor, student_rest: Tensor, exact: Tensor | None = None
) -> Tensor:
    """Per-row KL against the teacher completion closest to the student, (N,) fp32 ([head-bound note]).

    Args:
        head: (N, M) teacher lower bounds h_b >= 0 of the cells (0 for an empty cell or slot).
        rest: (N,) the teacher's exact remaining mass 1 - Σ h_b (>= 0).
        student: (N, M) the student's mass on the same cells (0 for an empty slot; no cell counted twice).
        student_rest: (N,) the student's mass outside every cell, summed from those tokens directly.
        exact: (N, M) bool, cells whose h_b is the teacher's whole mass there (no completion); None = none.
    Differentiable with respect to `student` and `student_rest`.
    """
    head, rest = head.float(), rest.float()
    student, student_rest = student.float(), student_rest.float()
    tiny = torch.finfo(torch.float32).tiny
    ratio = torch.where(head > 0, head / student.clamp(min=tiny), 0.0)  # (N, M)
    if exact is not None:
        ratio = torch.where(exact, float("inf"), ratio)  # sorted first, always in A
    ratio, order = ratio.detach().sort(dim=-1, descending=True)
    h_sorted, s_sorted = head.gather(1, order), student.gather(1, order)
    # teacher and student mass outside the first k cells, k = 0..M, summed from the far end (no 1 - x)
    h_out = rest[:, None] + F.pad(h_sorted.flip(-1).cumsum(-1).flip(-1), (0, 1))  # (N, M + 1)
    s_out = student_rest[:, None] + F.pad(s_sorted.flip(-1).cumsum(-1).flip(-1), (0, 1))
    with torch.no_grad():
        c = h_out / s_out.clamp(min=tiny)  # (N, M + 1) the level if A were the first k cells
        above = F.pad(ratio, (1, 0), value=float("inf"))  # ratio of cell k (1-based), inf before the first
        below = F.pad(ratio, (0, 1), value=0.0)  # ratio of cell k + 1, 0 after the last
        fits = (above > c) & (c >= below)
        k = torch.where(fits.any(-1), fits.float().argmax(-1), 0)  # (N,) the first consistent k
    in_a = torch.arange(head.shape[1], device=head.device)[None, :] < k[:, None]  # (N, M)
    use = in_a & (h_sorted > 0)
    log_s = s_sorted.clamp(min=tiny).log()
    cells = torch.where(use, h_sorted * (torch.where(use, h_sorted, 1.0).log() - log_s), 0.0).sum(-1)
    h_left, s_left = h_out.gather(1, k[:, None])[:, 0], s_out.gather(1, k[:, None])[:, 0]
    left = torch.where(h_left > 0, h_left * (h_left.clamp(min=tiny).log() - s_left.clamp(min=tiny).log()), 0.0)
    return cells + left


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

    Both distributions are sorted descending and compared rank by rank over the ranks the teacher's
    head holds (the first K, or fewer where a compact head leaves slots unused: logit -1e4, probability 0),
    plus one extra bin for the remaining (tail) mass: Σ_k |t_(k) - s_(k)| + |r_t - r_s|, in [0, 2]; 0 at
    a student whose sorted probabilities are the teacher's. It ignores which token is which, so it works between any two
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
    s_sorted = torch.where(t_sorted > 0, s_sorted, 0.0)  # ranks the head does not hold join the tail
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
