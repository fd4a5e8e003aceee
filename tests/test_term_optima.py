"""Every loss term's optimum is the teacher: beside the term table (distill/pipeline/train/terms.py).

For each term, kd mode and target kind, a student that reproduces the teacher on what the term compares
scores the term's minimum (0) with zero gradient, and a student moved off the teacher scores more. The
teacher's logits sit on the 8-bit value grid (max - 0.1 · code), so the stored targets, made by the real
stage-1 code (``compute_target_slice``) and read back by the real decoder, hold the teacher exactly. For the
sampled kinds the value is 0 for every draw and the gradient is 0 in expectation over the draws (Monte
Carlo). ``test_every_term_kd_mode_and_target_kind_has_an_optimum_case`` makes a new term or kind bring its
own case. lm compares the student with the data, not the teacher, and has no case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from distill.cache.targets import TARGET_KINDS, build_target_layout, decode_targets
from distill.config import TrainConfig
from distill.pipeline.losses.cross_tokenizer import alm_loss
from distill.pipeline.losses.kd import kd_tail_loss, projector_kd_loss, uld_loss
from distill.pipeline.losses.prefix_kd import kd_prefix_loss
from distill.pipeline.losses.representation import (
    attention_span_loss,
    contrastive_loss,
    layerwise_loss,
    pool_attention_to_spans,
    routed_feature_loss,
)
from distill.pipeline.losses.sampled_kd import sampled_kd_loss
from distill.pipeline.teacher.target_fields import compute_target_slice
from distill.pipeline.train.terms import KD_MODES, TERMS, check_kd_targets

V_T, V_S, P, TOP_K, SAMPLES, MASS = 40, 30, 6, 12, 8, 0.8
DRAWS = 4000  # independent encodings of the same rows for the sampled kinds


@dataclass
class Case:
    """A term's loss as a function of the student's free tensor, that tensor at the teacher, and one off it."""

    loss: Callable[[torch.Tensor], torch.Tensor]
    optimum: torch.Tensor
    off: torch.Tensor
    over_draws: bool = False  # rows are DRAWS // P encodings of the same P rows: the gradient is 0 in expectation
    smooth: bool = True  # False for an L1 term: at its minimum the gradient is a subgradient, not 0


def grid_teacher(rows: int = P, vocab: int = V_T, seed: int = 0, spread: int = 16) -> torch.Tensor:
    """(rows, vocab) teacher logits on the value grid and exact in fp16 (steps of 0.5 nats), a few tokens far
    more likely than the rest."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(2, spread, (rows, vocab), generator=g).float()
    codes[:, :4] = torch.randint(0, 3, (rows, 4), generator=g).float()
    codes[:, 0] = 0  # the row max
    perm = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)])
    return (2.0 - 0.5 * codes).gather(1, perm)


def stored_targets(kind: str, teacher: torch.Tensor, temps: list[float], seed: int = 0) -> dict[str, torch.Tensor]:
    """What stage 2 reads for ``teacher`` (R, V) stored as ``kind``: decoded ids, logits, multiplier, lse (R, nT)."""
    lse = torch.stack([(teacher / t).logsumexp(-1) for t in temps], dim=-1)
    top = teacher.topk(TOP_K, dim=-1)
    if kind == "topk-fp16":
        return {"ids": top.indices, "logits": top.values.half().float(), "mult": None, "lse": lse}
    targets = build_target_layout(kind, TOP_K, MASS, SAMPLES)
    layout = {"seq_len": 1, "top_k": TOP_K, "temperatures": temps, "targets": targets}
    lse1 = teacher.logsumexp(-1)
    rank_of_id = torch.randperm(teacher.shape[1], generator=torch.Generator().manual_seed(1))
    arrays = compute_target_slice(
        teacher, teacher.softmax(-1), lse1, top.values, top.indices, targets, rank_of_id,
        torch.Generator().manual_seed(seed),
    )  # fmt: skip
    data = {name: value[:, None] for name, value in arrays.items()}
    ids, logits, mult = decode_targets(data, lse1[:, None], layout, torch.argsort(rank_of_id))
    return {"ids": ids[:, 0], "logits": logits[:, 0], "mult": None if mult is None else mult[:, 0], "lse": lse}


def nudge(x: torch.Tensor, scale: float = 0.5, seed: int = 7) -> torch.Tensor:
    return x + scale * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# --- kd: one tokenizer (the exact map is the identity) ---------------------------------------------------


def tail_case(kind: str, t: float) -> Case:
    if kind in ("sampled", "hybrid"):
        teacher = grid_teacher(spread=6)  # every token drawn often enough for the Monte-Carlo check
        repeats = DRAWS // P
        s = stored_targets(kind, teacher.repeat(repeats, 1), [1.0])
        return Case(
            lambda x: sampled_kd_loss(x, s["ids"], s["logits"], s["mult"], s["lse"][:, 0], t),
            teacher.repeat(repeats, 1), nudge(teacher).repeat(repeats, 1), over_draws=True,
        )  # fmt: skip
    teacher = grid_teacher()
    s = stored_targets(kind, teacher, [t])
    return Case(lambda x: kd_tail_loss(x, s["ids"], s["logits"], s["lse"][:, 0], t), teacher.clone(), nudge(teacher))


def uld_case(kind: str, t: float) -> Case:
    teacher = grid_teacher()
    s = stored_targets(kind, teacher, [t])
    return Case(lambda x: uld_loss(x, s["logits"], s["lse"][:, 0], t), teacher.clone(), nudge(teacher), smooth=False)


# --- kd: prefix bins across two vocabularies --------------------------------------------------------------


def prefix_vocabularies() -> tuple[torch.Tensor, torch.Tensor]:
    """teacher_bin (V_T,), student_bin (V_S,): 20 shared tokens are their own bins; 18 teacher-only and 8
    student-only tokens fall in random shared bins; 2 tokens on each side have no bin."""
    g = torch.Generator().manual_seed(3)
    teacher_bin = torch.cat([torch.arange(20), torch.randint(0, 20, (18,), generator=g), torch.full((2,), -1)])
    student_bin = torch.cat([torch.arange(20), torch.randint(0, 20, (8,), generator=g), torch.full((2,), -1)])
    return teacher_bin, student_bin


def student_reproducing_bins(teacher: torch.Tensor, t: float, teacher_bin, student_bin) -> torch.Tensor:
    """Student logits at T whose bin masses are the teacher's full bin masses, split at random inside each bin."""
    probs = (teacher / t).softmax(-1)
    columns = torch.where(teacher_bin >= 0, teacher_bin, V_S).expand_as(probs)
    bin_mass = torch.zeros(probs.shape[0], V_S + 1).scatter_add(1, columns, probs)  # (P, bins + none)
    s_cols = torch.where(student_bin >= 0, student_bin, V_S)
    share = torch.rand(probs.shape[0], V_S, generator=torch.Generator().manual_seed(4)) + 0.1
    share = share / torch.zeros(probs.shape[0], V_S + 1).scatter_add(1, s_cols.expand_as(share), share)[:, s_cols]
    return (bin_mass[:, s_cols] * share).log() * t


def prefix_case(kind: str, t: float) -> Case:
    if kind in ("sampled", "hybrid"):  # compute_kd_prefix trains these with the exact-map estimate
        return tail_case(kind, t)
    teacher = grid_teacher()
    teacher_bin, student_bin = prefix_vocabularies()
    s = stored_targets(kind, teacher, [t])
    bins = torch.where(s["ids"] >= 0, teacher_bin[s["ids"].clamp(min=0)], -1)
    size = torch.bincount(teacher_bin[teacher_bin >= 0], minlength=V_S)
    optimum = student_reproducing_bins(teacher, t, teacher_bin, student_bin)
    return Case(
        lambda x: kd_prefix_loss(x, bins, s["logits"], s["lse"][:, 0], student_bin, t, size), optimum, nudge(optimum)
    )


def test_prefix_example_of_the_audit_scores_zero_at_the_true_bin_masses():
    # head A (bin 0) 0.5 and B (bin 1) 0.3; tail A' (bin 0) 0.15 and C (bin 2) 0.05: true bins (0.65, 0.30, 0.05)
    student_bin, size = torch.arange(3), torch.tensor([2, 1, 1])
    teacher_bins, teacher_logits = torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.3]]).log()
    student = torch.tensor([[0.65, 0.30, 0.05]]).log().requires_grad_(True)
    loss = kd_prefix_loss(student, teacher_bins, teacher_logits, torch.zeros(1), student_bin, 1.0, size)
    (grad,) = torch.autograd.grad(loss, student)
    assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6
    # (0.5, 0.3, 0.2) scores 0 too: a teacher whose tail is all C is just as consistent with this head
    # B's bin holds only B: under-covering it costs the exact KL of that bin
    short = kd_prefix_loss(torch.tensor([[0.75, 0.20, 0.05]]).log(), teacher_bins, teacher_logits, torch.zeros(1),
                           student_bin, 1.0, size)  # fmt: skip
    assert short.item() == pytest.approx(0.3 * math.log(0.3 / 0.2) + 0.7 * math.log(0.7 / 0.8), rel=1e-5)


# --- the other kd modes and terms -------------------------------------------------------------------------


def projector_case() -> Case:
    projected = grid_teacher()[:, :V_S]
    return Case(lambda x: projector_kd_loss(x, projected, 2.0), projected.clone(), nudge(projected))


def alm_case() -> Case:
    teacher_chunks = -torch.rand(16, generator=torch.Generator().manual_seed(5)) * 6 - 0.01  # (C,) log p < 0
    return Case(lambda x: alm_loss(x, teacher_chunks), teacher_chunks.clone(), nudge(teacher_chunks, 0.3))


def attention_case() -> Case:
    """The teacher's rows over its keys (BOS + 9 text keys), its top-4 stored, its text keys pooled onto 6
    student keys; the student keeps an 80% attention sink on its own BOS and matches the teacher elsewhere."""
    teacher_attn = torch.rand(5, 10, generator=torch.Generator().manual_seed(6)).pow(3) + 0.01
    teacher_attn[:, 0] += 1.0  # the teacher's own sink on its BOS
    teacher_attn = teacher_attn / teacher_attn.sum(-1, keepdim=True)  # (N, Lt)
    values, ids = teacher_attn.topk(4, dim=-1)
    key_spans = torch.tensor([-1, 1, 1, 2, 3, 3, 3, 4, 5, 5])  # teacher key -> student key; BOS maps nowhere
    head, rest, mapped = pool_attention_to_spans(values, ids, key_spans, num_spans=6)  # fp32: exact here
    text = torch.zeros(5, 6).scatter_add(1, key_spans[1:].expand(5, -1), teacher_attn[:, 1:])
    student = 0.2 * text / text.sum(-1, keepdim=True)
    student[:, 0] = 0.8  # the student's own sink
    optimum = student.log()
    return Case(lambda x: attention_span_loss(x.softmax(-1), head, rest, mapped), optimum, nudge(optimum))


def hidden_target(dims: tuple[int, ...] = (12, 16)) -> torch.Tensor:
    return torch.randn(dims, generator=torch.Generator().manual_seed(8))


def feature_case() -> Case:
    """The router's feature term: each expert's projection against its own teacher layer, gate-weighted."""
    targets = torch.randn(12, 3, 16, generator=torch.Generator().manual_seed(9))  # (N, E, D)
    gate = torch.randn(12, 3, generator=torch.Generator().manual_seed(10))
    return Case(
        lambda x: routed_feature_loss(gate.softmax(-1), (x - targets).pow(2).mean(-1)), targets.clone(), nudge(targets)
    )


def layerwise_case() -> Case:
    teacher = hidden_target()
    return Case(lambda x: layerwise_loss(x, teacher), teacher.clone(), nudge(teacher))


def contrastive_case() -> Case:
    teacher = hidden_target()
    teacher[1] = teacher[0] + 0.1 * teacher[1]  # two similar teacher positions: plain InfoNCE would split them
    return Case(lambda x: contrastive_loss(x, teacher), teacher.clone(), nudge(teacher))


def kd_cases() -> dict[str, Callable[[], Case]]:
    cases: dict[str, Callable[[], Case]] = {"kd/projector": projector_case, "kd/alm": alm_case}
    for kind in TARGET_KINDS:
        for t in (1.0, 2.0):
            if kind in ("sampled", "hybrid") and t != 1.0:
                continue  # refused (check_kd_targets)
            cases[f"kd/tail/{kind}/T{t:g}"] = lambda kind=kind, t=t: tail_case(kind, t)
            cases[f"kd/prefix/{kind}/T{t:g}"] = lambda kind=kind, t=t: prefix_case(kind, t)
            if kind not in ("sampled", "hybrid"):
                cases[f"kd/uld/{kind}/T{t:g}"] = lambda kind=kind, t=t: uld_case(kind, t)
    return cases


CASES: dict[str, Callable[[], Case]] = {
    **kd_cases(),
    "alm": alm_case,
    "attention": attention_case,
    "feature": feature_case,
    "layerwise": layerwise_case,
    "contrastive": contrastive_case,
}


def test_every_term_kd_mode_and_target_kind_has_an_optimum_case():
    expected = {term.name for term in TERMS} - {"lm", "kd"}
    for mode, spec in KD_MODES.items():
        if "kd" not in spec.signals:
            expected.add(f"kd/{mode}")
            continue
        for kind in TARGET_KINDS:
            cfg = TrainConfig(kd_mode=mode)
            if check_kd_targets(cfg, {"targets": {"kind": kind}}) is None:
                expected.add(f"kd/{mode}/{kind}/T1")
    assert expected <= set(CASES), sorted(expected - set(CASES))


def value_and_grad(case: Case, at: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = at.clone().requires_grad_(True)
    loss = case.loss(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.item(), grad


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_teacher_is_the_optimum(name: str):
    case = CASES[name]()
    value, grad = value_and_grad(case, case.optimum)
    off_value, off_grad = value_and_grad(case, case.off)
    assert abs(value) < 1e-5, value
    assert off_value > 1e-3
    if case.over_draws:  # the per-draw gradients of one row are i.i.d.: their mean is 0 within 5 standard errors
        per_draw = (grad * grad.shape[0]).reshape(-1, P, grad.shape[-1])  # the loss is a mean over draws
        mean, error = per_draw.mean(0), per_draw.std(0) / per_draw.shape[0] ** 0.5
        assert (mean.abs() <= 5 * error + 1e-6).all(), (mean.abs() - 5 * error).max()
        off_draws = (off_grad * grad.shape[0]).reshape(-1, P, grad.shape[-1])
        off_mean, off_error = off_draws.mean(0), off_draws.std(0) / off_draws.shape[0] ** 0.5
        assert (off_mean.abs() > 5 * off_error).any()  # the check has power
    else:
        assert off_grad.abs().max() > 1e-3
    if case.smooth and not case.over_draws:
        assert grad.abs().max() < 1e-5, grad.abs().max()
