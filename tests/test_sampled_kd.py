"""Monte-Carlo check of [unbiased-kd note]: the sampled targets' expected gradient is the full KL's gradient.

The teacher's logits sit on the 8-bit value grid (max - 0.1 · code), so the codec is lossless here and any
difference from the full gradient is Monte-Carlo noise. Every draw goes through the real stage-1 code
(``compute_target_slice``: head, draws, encoding) and the real decoder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.cache.targets import build_target_layout, decode_targets
from distill.pipeline.losses.kd import kd_tail_loss
from distill.pipeline.losses.sampled_kd import sampled_kd_loss
from distill.pipeline.teacher.target_fields import compute_target_slice

V, R, SAMPLES, TOP_K = 40, 20000, 8, 6


def teacher_and_student() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 60, (V,), generator=g).float()
    codes[3] = 0  # the row max
    teacher = 1.5 - 0.1 * codes  # (V,) on the value grid
    student = torch.randn(V, generator=g)
    return teacher, student


def full_kl_grad(teacher: torch.Tensor, student: torch.Tensor, t: float) -> torch.Tensor:
    s = student.clone().requires_grad_(True)
    kl = F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum") * t * t
    kl.backward()
    return s.grad


def encoded_rows(kind: str, teacher: torch.Tensor, temps: list[float]) -> dict:
    """R independent encodings of the same teacher row, decoded: (ids, logits, multiplier), lse (R, nT)."""
    targets = build_target_layout(kind, TOP_K, 0.5, SAMPLES)
    layout = {"seq_len": 1, "top_k": TOP_K, "temperatures": temps, "targets": targets}
    logits = teacher.expand(R, V).contiguous()
    lse1 = logits.logsumexp(-1)
    top = logits.topk(TOP_K if kind != "sampled" else 1, dim=-1)
    rank_of_id = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    id_by_rank = torch.argsort(rank_of_id)
    arrays = compute_target_slice(
        logits, logits.softmax(-1), lse1, top.values, top.indices, targets, rank_of_id, torch.Generator().manual_seed(2)
    )
    data = {k: v[:, None] for k, v in arrays.items()}  # (R, L=1, ...)
    ids, z, mult = decode_targets(data, lse1[:, None], layout, id_by_rank)
    lse = torch.stack([(logits / t).logsumexp(-1) for t in temps], dim=-1)  # (R, nT)
    return {"ids": ids[:, 0], "logits": z[:, 0], "mult": mult[:, 0] if mult is not None else None, "lse": lse}


def mean_and_error(loss_fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the R rows of each row's gradient, and its standard error (per vocabulary entry)."""
    s = student.expand(R, V).clone().requires_grad_(True)
    loss_fn(s).backward()
    per_row = s.grad * R  # the loss is a mean over rows
    return per_row.mean(0), per_row.std(0) / R**0.5


@pytest.mark.parametrize("kind", ["sampled", "hybrid"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_sampled_targets_expected_gradient_is_the_full_kl_gradient(kind: str, t: float) -> None:
    teacher, student = teacher_and_student()
    rows = encoded_rows(kind, teacher, [1.0, 2.0])
    j = [1.0, 2.0].index(t)
    mean, err = mean_and_error(
        lambda s: sampled_kd_loss(s, rows["ids"], rows["logits"], rows["mult"], rows["lse"][:, j], t), student
    )
    full = full_kl_grad(teacher, student, t)
    assert err.max() < 0.02  # the test has power: noise well below the gradient's scale
    assert full.abs().max() > 0.1
    assert ((mean - full).abs() <= 5 * err + 1e-6).all(), (mean - full).abs().max()


@pytest.mark.parametrize("t", [1.0, 2.0])
def test_topk_alone_is_biased(t: float) -> None:
    """The top-K gradients (K+1 bins; renormalized) fall outside the Monte-Carlo band the sampled estimate meets."""
    teacher, student = teacher_and_student()
    rows = encoded_rows("sampled", teacher, [1.0, 2.0])
    j = [1.0, 2.0].index(t)
    mean, err = mean_and_error(
        lambda s: sampled_kd_loss(s, rows["ids"], rows["logits"], rows["mult"], rows["lse"][:, j], t), student
    )
    band = 5 * err + 1e-6
    full = full_kl_grad(teacher, student, t)
    assert ((mean - full).abs() <= band).all()
    lse = (teacher / t).logsumexp(-1)
    top = teacher.topk(TOP_K)
    s = student.clone().requires_grad_(True)
    kd_tail_loss(s[None], top.indices[None], top.values[None], lse[None], t).backward()
    assert ((s.grad - mean).abs() > band).any()
    assert ((s.grad - full).abs() > 3 * band).any()
    s2 = student.clone().requires_grad_(True)
    head = F.log_softmax(top.values / t, -1)
    (-(head.exp() * F.log_softmax(s2 / t, -1)[top.indices]).sum() * t * t).backward()
    assert ((s2.grad - full).abs() > 3 * band).any()


def test_estimate_of_the_kl_value_is_unbiased() -> None:
    teacher, student = teacher_and_student()
    rows = encoded_rows("sampled", teacher, [1.0, 2.0])
    for j, t in enumerate([1.0, 2.0]):
        s = student.expand(R, V)
        loss = sampled_kd_loss(s, rows["ids"], rows["logits"], rows["mult"], rows["lse"][:, j], t)
        full = F.kl_div(
            F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True, reduction="sum"
        )
        assert abs(loss.item() - full.item() * t * t) < 0.05 * full.item() * t * t


def test_unmatched_ids_and_masked_rows_contribute_nothing() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    ids = torch.tensor([[0, -1, 2]])
    lse = logits.logsumexp(-1)
    mult = torch.tensor([[1.0, 1.0, 0.0]])
    loss = sampled_kd_loss(torch.zeros(1, 3), ids, logits, mult, lse, 1.0)
    p0 = torch.exp(logits[0, 0] - lse[0])
    assert loss.item() == pytest.approx((p0 * (torch.log(p0) - torch.log(torch.tensor(1 / 3)))).item(), rel=1e-5)
    assert sampled_kd_loss(torch.zeros(1, 3), ids, logits, mult, lse, 1.0, mask=torch.tensor([False])).item() == 0.0
