"""Trainable modules that sit between the student and the cached teacher signals.

- `StudentAwareRouter` — the **feature** term's router: per aligned position a gate reads
  the student's hidden state and weighs E experts, one per cached teacher layer, by how well
  each expert's student projection matches its teacher layer. Every parameter acts on the
  student side; teacher tensors are only read, standardized and weighted.
- `StudentProjection` — normalized student state -> Linear, for the layerwise and contrastive
  terms; `normalize_student` (and `losses.hidden_targets.standardize_hidden` on the teacher side) keep every
  hidden-state term O(1).
- `LogitProjector` — the seeds' cross-vocabulary alternative to `kd_tail_loss`: the cached
  `vocab_proj` teacher feature -> linear -> student output embedding -> student logits.
- `expert_usage` — the fraction of positions routed (top-1) to each expert, for logs.

Stage 2 flattens the batch to the N aligned positions before calling these modules; the
matching losses are in `losses/representation.py` (`routed_feature_loss`, `load_balance_loss`,
`importance_loss`) and `losses/kd.py` (`projector_kd_loss`).

Inputs from the cache are fp16; every module casts its inputs explicitly to its own
parameter dtype, so it runs with or without autocast (eval runs without).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RouterOutput:
    """What `StudentAwareRouter.forward` returns (N = aligned positions, E = experts).

    Attributes:
        expert_error: (N, E) fp32, per position and expert the MSE (mean over dims) between the
            expert's student projection and its fixed, standardized teacher layer; trainable only
            through the student side. `losses.representation.routed_feature_loss(router_probs, expert_error)` is
            the feature term.
        router_probs: (N, E) fp32 softmax of the gate; carries the gate's gradient.
        expert_index: (N, top_k) int64, the top_k experts of each position, best first (column 0
            feeds `load_balance_loss` and the logged usage).
        attention_alignment: scalar fp32, KL(gate || student query attention), see
            `StudentAwareRouter`; None when not asked for (its weight is 0).
    """

    expert_error: Tensor
    router_probs: Tensor
    expert_index: Tensor
    attention_alignment: Tensor | None


def normalize_student(hidden: Tensor) -> Tensor:
    """Parameter-free layer norm over the last dim, in fp32: each position to mean 0 and rms 1.

    [student-norm note] The student's raw hidden states are not standardized: a pretrained student
    has outlier dimensions (SmolLM2's layer 28: rms 74.8, max 23,874), and a Linear fed with them at
    its default init outputs values ~rms · |x|, so a term against unit-variance teacher targets read
    1,730 at initialization. After this normalization every position has squared norm D, so any
    trainable projection at its default init (weights ~U(±1/sqrt(D))) outputs variance ~1/3 per dim
    whatever the student's scale: the feature, layerwise, contrastive and attention-alignment terms
    start O(1) and can only grow through the projection's own weights. No affine gain or bias: the
    Linear after it already has both, and a gain would only let a large scale back in. (It cannot
    be a way to collapse either: the teacher targets are fixed, so shrinking the student side never
    lowers an MSE.) Outlier dimensions still dominate the normalized vector; the other dimensions
    keep their directions at a smaller scale, which Adam's per-parameter steps learn from.
    """
    h = hidden.float()
    return F.layer_norm(h, h.shape[-1:])


def expert_usage(router_probs: Tensor) -> list[float]:
    """Fraction of positions whose top-1 expert is e, for each e; sums to 1 (empty: zeros)."""
    n, num_experts = router_probs.shape
    counts = torch.bincount(router_probs.argmax(dim=-1), minlength=num_experts)
    return [float(c) / max(n, 1) for c in counts.tolist()]


def _build_projection(in_dim: int, out_dim: int, rank: int | None) -> nn.Module:
    if rank is None:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim))


class StudentProjection(nn.Module):
    """Student hidden state (.., Ds) -> `normalize_student` -> Linear -> (.., Dt) fp32.

    The projection of the layerwise and contrastive terms ([student-norm note]). Any input dtype
    (bf16 under autocast, fp32 otherwise); the output is fp32.
    """

    def __init__(self, student_dim: int, teacher_dim: int, rank: int | None = None) -> None:
        super().__init__()
        self.proj = _build_projection(student_dim, teacher_dim, rank)

    def forward(self, hidden: Tensor) -> Tensor:
        weight = next(self.proj.parameters())
        return self.proj(normalize_student(hidden).to(weight.dtype)).float()


class StudentAwareRouter(nn.Module):
    """Routes each student position to the cached teacher layers (the experts) its state fits.

    Args:
        student_dim: Ds, width of the student hidden state fed to the router.
        teacher_dims: {teacher layer: cached width}; expert e is the e-th layer in sorted
            order (`self.layers`). All widths must be equal (Dt).
        top_k: experts reported per position in `expert_index` (clamped to E).
        proj_dim: None = each student projection is a full Linear(Ds -> Dt); an int r
            makes it low-rank, Linear(Ds -> r) -> Linear(r -> Dt).

    Per position, with h the normalized student state ([student-norm note]), p = softmax(gate(h)),
    P_e a student-side Linear per expert and T_e the fixed standardized teacher layer e:
        err_e   = mean_d (P_e(h) - T_e)²
        feature = Σ_e p_e · err_e                      (`losses.representation.routed_feature_loss`)

    [router-gradient note] The gate weighs each expert's own error (the competitive mixture of
    experts of Jacobs et al., 1991), over all E experts, with the full softmax. Its gradient is the
    true one, ∂feature/∂logit_e = p_e (err_e - feature): the gate moves towards the experts whose
    projection fits this position, for every position and any top_k. The form it replaces mixed the
    projections and the targets with top-k-renormalized weights and detached the target's weights:
    a semi-gradient that only saw the student side, and none at all with top_k = 1 (the weight of a
    single expert is 1); on a synthetic task with one right expert per position its gate stayed
    near uniform (feature 0.381 against 0.045 with the true gradient) and usage collapsed to 2 of 4
    experts. Why every expert at every position, not only the top k: with sparse dispatch an expert
    the gate does not pick is never trained where it would fit, so its error never drops there and
    the gate never learns to pick it (rich get richer), while a renormalized top-1 has no gradient.
    The experts are the cached teacher layers (4 in the reference config), each one Ds×Dt product per
    position: for the reference student (576 wide, 135M parameters) and Dt = 1024 that is ~2% of
    its forward and backward (less at a PCA-reduced Dt), not worth a biased gradient.
    Why each expert against its own target and not the mixed projection against the mixed
    target: a mixture of fixed targets has less power than any of them (averaging uncorrelated
    layers shrinks it), so the gate could lower the error by blurring experts instead of choosing
    one; with per-expert errors a blend is never better than its best member.

    Why it cannot collapse: each target T_e is a fixed teacher tensor, standardized (mean square 1
    per dim on average, [target-scale note] in losses/hidden_targets.py), that no parameter can reach,
    so err_e can only go down by moving P_e(h) onto T_e, and the gate can only go down by routing to an
    expert with a lower error. Balance between experts comes from `load_balance_loss` / `importance_loss` on
    `router_probs` and from every expert being trained wherever the gate gives it weight.

    Attention alignment (a light cross-attention, O(1)): a student-side query
    q = W_q h (Ds -> Dt) attends over the E fixed expert targets at the same position,
    a = softmax(q · T_e / sqrt(Dt)); the term is KL(stopgrad(router_probs) || a), mean
    over positions, bounded by ~log E plus score spread at init. It asks the student's
    state to carry which teacher layer it is routed to. The gate is detached here, otherwise
    gate and query could both flatten to uniform and make the term trivially 0; the keys are
    fixed teacher tensors, so only the student side can move. Computed only when asked for.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dims: dict[int, int],
        top_k: int = 2,
        proj_dim: int | None = None,
    ) -> None:
        super().__init__()
        if not teacher_dims:
            raise ValueError("teacher_dims is empty: cache at least one teacher hidden layer")
        widths = set(teacher_dims.values())
        if len(widths) != 1:
            raise ValueError(
                f"cached teacher layers have different widths {teacher_dims}; "
                "the router mixes them, so cache them at one width (same --hidden-dim for all)"
            )
        self.layers: list[int] = sorted(teacher_dims)
        num_experts = len(self.layers)  # one expert per cached teacher layer
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = min(top_k, num_experts)
        self.teacher_dim: int = widths.pop()
        self.gate = nn.Linear(student_dim, num_experts)
        self.student_proj = nn.ModuleList(
            _build_projection(student_dim, self.teacher_dim, proj_dim) for _ in range(num_experts)
        )
        self.query = nn.Linear(student_dim, self.teacher_dim, bias=False)

    def forward(
        self, student_hidden: Tensor, teacher_hidden: dict[int, Tensor], with_attention: bool = True
    ) -> RouterOutput:
        """Route N aligned positions.

        Args:
            student_hidden: (N, Ds) student hidden states at aligned positions, any dtype and scale.
            teacher_hidden: {layer: (N, Dt)} cached teacher states at the same positions,
                already standardized (`standardize_hidden`), any dtype; never modified.
            with_attention: compute `attention_alignment` (False when its weight is 0).
        """
        missing = [layer for layer in self.layers if layer not in teacher_hidden]
        if missing:
            raise KeyError(f"teacher_hidden lacks layers {missing}; the router was built for {self.layers}")
        h = normalize_student(student_hidden).to(self.gate.weight.dtype)  # (N, Ds)
        router_probs = F.softmax(self.gate(h).float(), dim=-1)  # (N, E)
        expert_index = router_probs.topk(self.top_k, dim=-1).indices  # (N, k)
        # One expert at a time: never an (N, E, Dt) stack. [router-gradient note]
        expert_error = torch.stack(
            [
                (self.student_proj[e](h).float() - teacher_hidden[layer].float()).pow(2).mean(dim=-1)
                for e, layer in enumerate(self.layers)
            ],
            dim=-1,
        )  # (N, E)
        attention = self._attention_alignment(h, teacher_hidden, router_probs) if with_attention else None
        return RouterOutput(
            expert_error=expert_error,
            router_probs=router_probs,
            expert_index=expert_index,
            attention_alignment=attention,
        )

    def _attention_alignment(self, h: Tensor, teacher_hidden: dict[int, Tensor], router_probs: Tensor) -> Tensor:
        """KL(stopgrad(router_probs) || softmax_e(q · T_e / sqrt(Dt))), mean over positions."""
        if h.shape[0] == 0:
            return h.reshape(-1)[:0].float().sum()
        q = self.query(h).float()  # (N, Dt)
        scale = 1.0 / math.sqrt(self.teacher_dim)
        # One expert at a time: never materializes an (N, E, Dt) stack of teacher states.
        scores = torch.stack([(q * teacher_hidden[layer].float()).sum(-1) * scale for layer in self.layers], dim=-1)
        log_attn = F.log_softmax(scores, dim=-1)  # (N, E)
        p = router_probs.detach()
        return (torch.xlogy(p, p) - p * log_attn).sum(dim=-1).mean()


class LogitProjector(nn.Module):
    """Carries the teacher's distribution into the student vocabulary (seeds' projector).

    Args:
        teacher_dim: Dt, width of the cached `vocab_proj` feature
            (softmax(teacher logits / T*) @ teacher input embedding, computed in stage 1).
        student_embedding: the student's OUTPUT embedding — an `nn.Embedding`, the
            `lm_head` `nn.Linear`, or its (Vs, Ds) weight tensor. It is referenced, not
            copied and not registered: the projector's logits use the live student weights,
            and `parameters()` / `state_dict()` hold only the projector's own Linear (so
            the embedding never lands in two optimizer groups).

    forward: vocab_proj (N, Dt) -> Linear(Dt -> Ds) -> h @ E_s.T -> (N, Vs) logits.

    Its output is a *target* for `projector_kd_loss`, yet it is trainable: if the student
    and the projector both minimize that KL they can meet at a flat distribution. Detach
    the projected logits for the student's KD term and fit the projector on an anchor of
    its own (e.g. `lm_loss` of its logits against the student's labels).
    """

    def __init__(self, teacher_dim: int, student_embedding: nn.Embedding | nn.Linear | Tensor) -> None:
        super().__init__()
        weight = student_embedding if isinstance(student_embedding, Tensor) else student_embedding.weight
        if weight.dim() != 2:
            raise ValueError(f"student embedding weight must be (vocab, dim), got shape {tuple(weight.shape)}")
        # A tuple attribute is invisible to nn.Module registration: shared, not owned.
        self._student_embedding = (student_embedding,)
        self.proj = nn.Linear(teacher_dim, weight.shape[1])

    @property
    def embedding_weight(self) -> Tensor:
        """(Vs, Ds) live student output embedding."""
        emb = self._student_embedding[0]
        return emb if isinstance(emb, Tensor) else emb.weight

    def forward(self, vocab_proj: Tensor) -> Tensor:
        """vocab_proj (N, Dt), any dtype (fp16 from the cache) -> (N, Vs) logits."""
        weight = self.embedding_weight
        h = self.proj(vocab_proj.to(self.proj.weight.dtype))  # explicit cast: no autocast needed
        return h.to(weight.dtype) @ weight.T
