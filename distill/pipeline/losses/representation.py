"""Loss terms of stage 2 on representations: hidden states, attention, router.

Pure tensor functions with the conventions of losses/kd.py (fp32 means over valid positions, explicit
`(N,)` bool masks, an in-graph 0 when nothing is valid). Shapes: `N` = aligned positions, `D` = hidden
width, `S` = student key spans, `E` = router experts.

- `feature_loss`     MSE against a fixed teacher target
- `routed_feature_loss` the router's gate-weighted per-expert errors (router.py)
- `attention_span_loss` teacher attention pooled onto student key spans vs the student's, over text keys
- `layerwise_loss`   student layer i vs teacher layer m(i), see `build_layer_map`
- `contrastive_loss` InfoNCE between aligned student and teacher representations, the teacher's own
                     similarities as labels
- `load_balance_loss`, `importance_loss`  router regularizers
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.pipeline.losses.kd import _select_rows, _zero, head_bound_kl_rows

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


def attention_span_loss(
    student_attn: Tensor,
    teacher_head: Tensor,
    teacher_rest: Tensor,
    mapped: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """KL of the teacher's attention over the text keys against the student's, mean over valid rows.

    Args:
        student_attn: (N, S) the student's attention rows over its S key positions (head-averaged).
        teacher_head: (N, S) lower bounds of the teacher's attention on each student key span, given text
            (`pool_attention_to_spans`); teacher_rest: (N,) the rest, 1 - Σ teacher_head.
        mapped: (N, S) bool, the student keys some teacher key falls in. The others (the student's BOS and
            prefix, which the teacher rows leave out with their own) are zeroed and the student's row is
            renormalized over the text keys, so its attention sink costs nothing.
        mask: (N,) bool or None; rows with no teacher or student mass on text keys are left out as well.

    The teacher rows keep only their top-Ka keys, so a span's teacher mass is known only from below: the
    term is `head_bound_kl_rows` ([head-bound note] in losses/kd.py), 0 with zero gradient at a student
    whose attention over the text keys is the teacher's.
    """
    s = torch.where(mapped, student_attn.float(), 0.0)
    s_mass = s.sum(dim=-1)  # (N,)
    valid = (teacher_head.float().sum(dim=-1) > 0) & (s_mass > 0)
    if mask is not None:
        valid = valid & mask.reshape(-1).bool()
    s, s_mass, teacher_head, teacher_rest = _select_rows(valid, s, s_mass, teacher_head, teacher_rest)
    if s.shape[0] == 0:
        return _zero(student_attn)
    s = s / s_mass.unsqueeze(-1)
    return head_bound_kl_rows(teacher_head, teacher_rest, s, torch.zeros_like(s_mass)).mean()


def pool_attention_to_spans(
    attn_values: Tensor,
    attn_key_ids: Tensor,
    key_span_index: Tensor,
    num_spans: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pool sparse cached teacher attention rows onto student key spans, given the text keys.

    Args:
        attn_values: (N, Ka) attention weights of the teacher's top-Ka keys per query (a softmax over all
            its keys; fp16 from the cache is fine).
        attn_key_ids: (N, Ka) int, the teacher key position of each value; out-of-range
            or negative ids (padding) are ignored.
        key_span_index: (N, Lt) or (Lt,) int, for each teacher key position the student
            span it falls in, in [0, num_spans), or -1 for keys with no student span (the prefix/BOS).
        num_spans: S.

    Returns:
        head: (N, S) fp32, the kept keys' attention summed per span and divided by the row's mass on text
            keys, 1 - (kept mass on unmapped keys): a lower bound of the teacher's attention on each span
            given text, since the keys beyond the top-Ka are not stored.
        rest: (N,) fp32, 1 - Σ head (the text mass of the keys not stored).
        mapped: (N, S) bool, the student spans some teacher key of the row falls in.
    """
    n, lt = attn_values.shape[0], key_span_index.shape[-1]
    span_of_pos = key_span_index.long().expand(n, lt) if key_span_index.dim() == 1 else key_span_index.long()
    key_ids = attn_key_ids.long()
    in_range = (key_ids >= 0) & (key_ids < lt)
    spans = span_of_pos.gather(1, key_ids.clamp(0, max(lt - 1, 0)))  # (N, Ka)
    keep = in_range & (spans >= 0) & (spans < num_spans)
    values = attn_values.float()
    pooled = values.new_zeros(n, num_spans).scatter_add_(1, torch.where(keep, spans, 0), torch.where(keep, values, 0.0))
    unmapped = torch.where(in_range & ~keep, values, 0.0).sum(dim=-1)  # (N,) kept mass on prefix keys
    head = pooled / (1.0 - unmapped).clamp(min=torch.finfo(torch.float32).eps).unsqueeze(-1)
    head = head / head.sum(dim=-1, keepdim=True).clamp(min=1.0)  # fp16 rounding can push the sum past 1
    rest = (1.0 - head.sum(dim=-1)).clamp(min=0.0)
    in_row = (span_of_pos >= 0) & (span_of_pos < num_spans)
    mapped = torch.zeros(n, num_spans + 1, dtype=torch.bool, device=values.device)  # last column: no span
    mapped.scatter_(1, torch.where(in_row, span_of_pos, num_spans), True)
    return head, rest, mapped[:, :num_spans]


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
    """InfoNCE with the teacher's own similarities as soft labels, mean over positions.

    Args:
        student_repr: (N, D) student representations (projected to the teacher width).
        teacher_repr: (N, D) teacher representations at the same aligned positions.
        temperature: softmax temperature of the cosine similarities.
        mask: (N,) bool or None.
        max_positions: at most this many positions are used, taken evenly strided over
            the valid ones (deterministic), which bounds the (N, N) logits matrix.

    Row n scores the student's position against every teacher position in the batch, softmax(cos(s_n, t_j) / τ)
    over j, and the label is the teacher's own row, softmax(cos(t_n, t_j) / τ): the loss is the KL between the
    two. Plain InfoNCE (a one-hot label on j = n) would push s_n away from teacher positions the teacher itself
    finds similar, so a student that reproduces the teacher would still score > 0 with a gradient; this one is 0,
    with zero gradient, exactly there. With dissimilar teacher positions the label is one-hot, InfoNCE again;
    at random init it is ≈ log N (≈ 6.9 at the 1024 cap) minus the label's entropy: O(1), not scaled.
    """
    student_repr, teacher_repr = _select_rows(mask, student_repr, teacher_repr)
    n = student_repr.shape[0]
    if n == 0:
        return _zero(student_repr)
    if n > max_positions:
        keep = torch.linspace(0, n - 1, max_positions, device=student_repr.device).long()
        student_repr, teacher_repr = student_repr[keep], teacher_repr[keep]
    s = F.normalize(student_repr.float(), dim=-1)
    t = F.normalize(teacher_repr.float().detach(), dim=-1)
    student_logp = F.log_softmax(s @ t.T / temperature, dim=-1)  # (N, N)
    teacher_logp = F.log_softmax(t @ t.T / temperature, dim=-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")


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
