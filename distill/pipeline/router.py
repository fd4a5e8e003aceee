"""Trainable modules that sit between the student and the cached teacher signals.

- `StudentAwareRouter` — the **feature** term's router: per aligned position a gate reads
  the student's hidden state and mixes E experts, one per cached teacher layer; the
  student's projection must match the routed teacher target. Every parameter acts on
  the student side; teacher tensors are only read, standardized and weighted.
- `LogitProjector` — the seeds' cross-vocabulary alternative to `kd_tail_loss`: the cached
  `vocab_proj` teacher feature -> linear -> student output embedding -> student logits.
- `expert_usage` — the fraction of positions routed (top-1) to each expert, for logs.

Stage 2 flattens the batch to the N aligned positions before calling these modules; the
matching losses are in `losses.py` (`feature_loss`, `load_balance_loss`,
`importance_loss`, `projector_kd_loss`).

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
        student_proj: (N, Dt) fp32, gate-mixed student projections (trainable side).
        target: (N, Dt) fp32, gate-mixed standardized teacher layers; no parameter
            reaches it (the gate weights are detached on this side).
        router_probs: (N, E) fp32 softmax of the gate, for the balancing terms.
        expert_index: (N, top_k) int64 chosen experts, best first.
        attention_alignment: scalar fp32, KL(gate || student query attention), see
            `StudentAwareRouter`.
    """

    student_proj: Tensor
    target: Tensor
    router_probs: Tensor
    expert_index: Tensor
    attention_alignment: Tensor


def standardize_hidden(hidden: Tensor, mean: Tensor, std: Tensor, eps: float = 1e-5) -> Tensor:
    """(hidden - mean) / (std + eps) in fp32; mean/std (D,) are the cache's per-layer stats."""
    return (hidden.float() - mean.float()) / (std.float() + eps)


def expert_usage(router_probs: Tensor) -> list[float]:
    """Fraction of positions whose top-1 expert is e, for each e; sums to 1 (empty: zeros)."""
    n, num_experts = router_probs.shape
    counts = torch.bincount(router_probs.argmax(dim=-1), minlength=num_experts)
    return [float(c) / max(n, 1) for c in counts.tolist()]


def _build_projection(in_dim: int, out_dim: int, rank: int | None) -> nn.Module:
    if rank is None:
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, rank, bias=False), nn.Linear(rank, out_dim))


class StudentAwareRouter(nn.Module):
    """Routes each student position to a mixture of cached teacher layers (the experts).

    Args:
        student_dim: Ds, width of the student hidden state fed to the router.
        teacher_dims: {teacher layer: cached width}; expert e is the e-th layer in sorted
            order (`self.layers`). All widths must be equal (Dt).
        num_experts: must equal len(teacher_dims) (the default); experts are layers.
        top_k: experts mixed per position (clamped to E).
        proj_dim: None = each student projection is a full Linear(Ds -> Dt); an int r
            makes it low-rank, Linear(Ds -> r) -> Linear(r -> Dt).

    Per position, with h the layer-normed student state and g = top_k-renormalized
    softmax(gate(h)):
        student_proj = Σ_e g_e · P_e(h)                 (P_e: student-side Linear per expert)
        target       = Σ_e stopgrad(g_e) · T_e          (T_e: standardized teacher layer e)
    and `losses.feature_loss(student_proj, target)` is the term.

    Why it cannot collapse: the target is a convex combination of fixed teacher tensors
    that are standardized (unit variance per dim), with weights that carry no gradient —
    no parameter can shrink, scale or otherwise reach it, so the MSE can only go down by
    moving the student's projection onto the teacher. The gate still learns, through the
    student side: it is pushed towards experts whose projection P_e fits, not towards an
    "easy" target. Balance between experts comes from `load_balance_loss` /
    `importance_loss` on `router_probs`.

    Attention alignment (a light cross-attention, O(1)): a student-side query
    q = W_q h (Ds -> Dt) attends over the E fixed expert targets at the same position,
    a = softmax(q · T_e / sqrt(Dt)); the term is KL(stopgrad(router_probs) || a), mean
    over positions, bounded by ~log E plus score spread at init. It asks the student's
    state to carry which teacher layer it is routed to. The gate is detached here too,
    otherwise gate and query could both flatten to uniform and make the term trivially 0;
    the keys are fixed teacher tensors, so only the student side can move.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dims: dict[int, int],
        num_experts: int | None = None,
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
        num_experts = len(self.layers) if num_experts is None else num_experts
        if num_experts != len(self.layers):
            raise ValueError(f"num_experts={num_experts} but {len(self.layers)} teacher layers: one expert per layer")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.num_experts = num_experts
        self.top_k = min(top_k, num_experts)
        self.teacher_dim: int = widths.pop()
        self.norm = nn.LayerNorm(student_dim)
        self.gate = nn.Linear(student_dim, num_experts)
        self.student_proj = nn.ModuleList(
            _build_projection(student_dim, self.teacher_dim, proj_dim) for _ in range(num_experts)
        )
        self.query = nn.Linear(student_dim, self.teacher_dim, bias=False)

    def forward(self, student_hidden: Tensor, teacher_hidden: dict[int, Tensor]) -> RouterOutput:
        """Route N aligned positions.

        Args:
            student_hidden: (N, Ds) student hidden states at aligned positions, any dtype.
            teacher_hidden: {layer: (N, Dt)} cached teacher states at the same positions,
                already standardized (`standardize_hidden`), any dtype; never modified.
        """
        missing = [layer for layer in self.layers if layer not in teacher_hidden]
        if missing:
            raise KeyError(f"teacher_hidden lacks layers {missing}; the router was built for {self.layers}")
        h = self.norm(student_hidden.to(self.norm.weight.dtype))  # (N, Ds)
        n = h.shape[0]
        router_probs = F.softmax(self.gate(h).float(), dim=-1)  # (N, E)
        top_probs, expert_index = router_probs.topk(self.top_k, dim=-1)  # (N, k)
        gates = top_probs / top_probs.sum(dim=-1, keepdim=True)  # renormalized over the chosen k

        # Dispatch: each expert only sees the rows that chose it, so cost is N·k, not N·E.
        student_proj = h.new_zeros(n, self.teacher_dim, dtype=torch.float32)
        target = h.new_zeros(n, self.teacher_dim, dtype=torch.float32)
        for e, layer in enumerate(self.layers):
            # Rows choosing e, and in which top-k slot. An expert nobody chose still runs on
            # zero rows, so its parameters get a zero gradient instead of none (DDP-friendly).
            rows, slot = (expert_index == e).nonzero(as_tuple=True)
            g = gates[rows, slot].unsqueeze(-1)  # (n_e, 1)
            student_proj = student_proj.index_add(0, rows, g * self.student_proj[e](h[rows]).float())
            fixed = teacher_hidden[layer][rows].float()
            target = target.index_add(0, rows, g.detach() * fixed)
        return RouterOutput(
            student_proj=student_proj,
            target=target,
            router_probs=router_probs,
            expert_index=expert_index,
            attention_alignment=self._attention_alignment(h, teacher_hidden, router_probs),
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
