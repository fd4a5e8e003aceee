"""Unit tests for distill.pipeline.router: gradients, fixed targets, dtypes, magnitudes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.pipeline.losses import feature_loss, importance_loss, load_balance_loss, projector_kd_loss
from distill.pipeline.router import (
    LogitProjector,
    RouterOutput,
    StudentAwareRouter,
    expert_usage,
    standardize_hidden,
)

LAYERS = [6, 12, 18, 24]


pytestmark = pytest.mark.usefixtures("single_thread")


def make_inputs(n: int, ds: int, dt: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, ds, generator=g).to(dtype)
    teacher = {layer: torch.randn(n, dt, generator=g).to(dtype) for layer in LAYERS}
    return student, teacher


def make_router(ds: int, dt: int, **kwargs) -> StudentAwareRouter:
    torch.manual_seed(0)
    return StudentAwareRouter(ds, dict.fromkeys(LAYERS, dt), **kwargs)


def test_forward_shapes_and_routing():
    router = make_router(16, 24, top_k=2)
    student, teacher = make_inputs(10, 16, 24)
    out = router(student, teacher)
    assert isinstance(out, RouterOutput)
    assert out.student_proj.shape == out.target.shape == (10, 24)
    assert out.router_probs.shape == (10, 4) and out.expert_index.shape == (10, 2)
    assert torch.allclose(out.router_probs.sum(-1), torch.ones(10))
    assert torch.equal(out.expert_index[:, 0], out.router_probs.argmax(-1))
    # the target is exactly the top-2-renormalized mix of the fixed teacher layers
    top = out.router_probs.gather(1, out.expert_index)
    weights = top / top.sum(-1, keepdim=True)
    stacked = torch.stack([teacher[layer] for layer in LAYERS], dim=1)  # (N, E, Dt)
    expected = (weights.unsqueeze(-1) * stacked.gather(1, out.expert_index[..., None].expand(-1, -1, 24))).sum(1)
    assert torch.allclose(out.target, expected, atol=1e-6)
    assert out.attention_alignment.dim() == 0 and out.attention_alignment.item() >= 0


def test_gradient_reaches_gate_projections_and_query():
    router = make_router(16, 24, top_k=2)
    student, teacher = make_inputs(64, 16, 24)
    student.requires_grad_(True)
    out = router(student, teacher)
    loss = feature_loss(out.student_proj, out.target) + out.attention_alignment
    loss = loss + load_balance_loss(out.router_probs, out.expert_index)
    loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0
    assert router.query.weight.grad.abs().sum() > 0
    used = set(out.expert_index.flatten().tolist())
    assert len(used) >= 2
    for e, proj in enumerate(router.student_proj):
        assert proj.weight.grad is not None, e  # every expert joins the graph (DDP needs no unused params)
        assert (proj.weight.grad.abs().sum() > 0) == (e in used), e
    assert student.grad.abs().sum() > 0  # the student itself learns through the router


def test_attention_alignment_trains_the_query_not_the_gate():
    router = make_router(16, 24)
    out = router(*make_inputs(64, 16, 24))
    gate_grad, query_grad = torch.autograd.grad(
        out.attention_alignment, [router.gate.weight, router.query.weight], allow_unused=True
    )
    assert gate_grad is None  # gate detached here: gate and query cannot both flatten to a trivial 0
    assert query_grad is not None and query_grad.abs().sum() > 0


def test_target_is_fixed_no_parameter_reaches_it():
    router = make_router(16, 24, top_k=3)
    student, teacher = make_inputs(32, 16, 24)
    out = router(student, teacher)
    assert not out.target.requires_grad  # plain cached tensors in, nothing trainable touched them
    # Even with teacher tensors that track gradients, no router parameter is on the target's path.
    tracked = {layer: t.clone().requires_grad_(True) for layer, t in teacher.items()}
    before = {layer: t.detach().clone() for layer, t in tracked.items()}
    out = router(student, tracked)
    grads = torch.autograd.grad(out.target.sum(), list(router.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
    assert all(torch.equal(tracked[layer].detach(), before[layer]) for layer in LAYERS)  # not modified


def test_target_cannot_be_shrunk_by_the_router():
    # Zero every trainable parameter: the student side collapses to 0, the target does not —
    # it stays a convex mix of standardized teacher layers, so the MSE stays ~1.
    router = make_router(32, 64, top_k=2)
    student, teacher = make_inputs(256, 32, 64)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()
    out = router(student, teacher)
    assert out.student_proj.abs().max().item() == 0
    assert out.target.pow(2).mean().item() > 0.3
    assert feature_loss(out.student_proj, out.target).item() > 0.3


def test_training_the_router_moves_the_student_side_onto_the_target():
    router = make_router(8, 8, top_k=1)
    student, teacher = make_inputs(128, 8, 8)
    # each teacher layer is a linear function of the (layer-normed) student: exactly learnable
    teacher = {layer: F.layer_norm(student, (8,)) @ torch.randn(8, 8) for layer in LAYERS}
    teacher = {layer: standardize_hidden(t, t.mean(0), t.std(0)) for layer, t in teacher.items()}
    target_power = torch.stack(list(teacher.values())).pow(2).mean().item()
    optimizer = torch.optim.Adam(router.parameters(), lr=3e-2)
    first = None
    for _ in range(100):
        out = router(student, teacher)
        loss = feature_loss(out.student_proj, out.target)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = router(student, teacher)
    assert feature_loss(out.student_proj, out.target).item() < 0.05 * first
    assert out.target.pow(2).mean().item() > 0.5 * target_power  # not by shrinking the target


def test_load_balance_is_one_for_uniform_router():
    n, e = 128, 4
    probs = torch.full((n, e), 1 / e)
    assert abs(load_balance_loss(probs, (torch.arange(n) % e).unsqueeze(-1)).item() - 1.0) < 1e-6
    assert importance_loss(probs).item() < 1e-10


def test_expert_usage():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    assert expert_usage(probs) == [0.5, 0.25, 0.25]
    router = make_router(8, 8)
    out = router(*make_inputs(50, 8, 8))
    usage = expert_usage(out.router_probs)
    assert len(usage) == 4 and abs(sum(usage) - 1) < 1e-9


@pytest.mark.parametrize("d", [32, 256])
@pytest.mark.parametrize("n", [32, 512])
def test_router_terms_are_order_one_at_init(n, d):
    router = make_router(d, d, top_k=2)
    student, teacher = make_inputs(n, d, d, seed=n + d)
    student = student * 50 + 3  # raw student hidden states are not normalized; the router's LayerNorm is
    out = router(student, teacher)
    terms = {
        "feature": feature_loss(out.student_proj, out.target),
        "attention_alignment": out.attention_alignment,
        "load_balance": load_balance_loss(out.router_probs, out.expert_index),
    }
    for name, value in terms.items():
        assert value.dtype == torch.float32 and value.dim() == 0, name
        assert 1e-3 <= value.item() <= 20, (name, value.item())
    assert 0 <= importance_loss(out.router_probs).item() <= 20  # legitimately ~0 for a near-uniform gate


def test_fp16_inputs_with_fp32_module_without_autocast():
    router = make_router(16, 24, proj_dim=8)
    student, teacher = make_inputs(20, 16, 24, dtype=torch.float16)
    out = router(student, teacher)
    assert out.student_proj.dtype == out.target.dtype == torch.float32
    assert torch.isfinite(out.student_proj).all() and torch.isfinite(out.attention_alignment)
    feature_loss(out.student_proj, out.target).backward()
    assert router.gate.weight.grad.dtype == torch.float32


def test_low_rank_projection_and_empty_batch():
    router = make_router(16, 24, proj_dim=4)
    assert isinstance(router.student_proj[0], nn.Sequential) and router.student_proj[0][0].out_features == 4
    out = router(*make_inputs(0, 16, 24))
    assert out.student_proj.shape == (0, 24) and out.attention_alignment.item() == 0.0


def test_router_validates_configuration():
    with pytest.raises(ValueError, match="different widths"):
        StudentAwareRouter(16, {6: 24, 12: 32})
    with pytest.raises(ValueError, match="num_experts"):
        StudentAwareRouter(16, {6: 24, 12: 24}, num_experts=3)
    router = StudentAwareRouter(16, {6: 24, 12: 24}, top_k=5)
    assert router.top_k == 2 and router.layers == [6, 12]
    with pytest.raises(KeyError, match="lacks layers"):
        router(torch.randn(3, 16), {6: torch.randn(3, 24)})


# --- LogitProjector ---------------------------------------------------------------------


def test_logit_projector_fp16_input_fp32_module_no_autocast():
    torch.manual_seed(1)
    embedding = nn.Embedding(50, 12)
    projector = LogitProjector(20, embedding)
    vocab_proj = torch.randn(7, 20).half()  # as read from the cache
    logits = projector(vocab_proj)  # must not raise "expected scalar type Half/Float"
    assert logits.shape == (7, 50) and logits.dtype == torch.float32
    expected = projector.proj(vocab_proj.float()) @ embedding.weight.T
    assert torch.allclose(logits, expected, atol=1e-5)


def test_logit_projector_shares_not_copies_the_student_embedding():
    torch.manual_seed(2)
    lm_head = nn.Linear(12, 50, bias=False)  # a (Vs, Ds) output embedding, like a tied lm_head
    projector = LogitProjector(20, lm_head)
    names = [name for name, _ in projector.named_parameters()]
    assert names == ["proj.weight", "proj.bias"]  # never in two optimizer groups
    assert set(projector.state_dict()) == {"proj.weight", "proj.bias"}
    vocab_proj = torch.randn(4, 20)
    before = projector(vocab_proj).detach()
    with torch.no_grad():
        lm_head.weight.mul_(2)
    assert torch.allclose(projector(vocab_proj), before * 2, atol=1e-5)  # live weights
    loss = projector_kd_loss(torch.randn(4, 50), projector(vocab_proj), 2.0)
    loss.backward()
    assert lm_head.weight.grad.abs().sum() > 0 and projector.proj.weight.grad.abs().sum() > 0
    from_tensor = LogitProjector(20, lm_head.weight)  # a bare weight tensor works the same way
    from_tensor.load_state_dict(projector.state_dict())
    assert torch.allclose(from_tensor(vocab_proj), projector(vocab_proj))
