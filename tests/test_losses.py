"""Unit tests for the stage-2 loss modules (losses/: kd, fused_head, representation, combine): goldens, references,
masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill.pipeline.losses.combine import combine_terms
from distill.pipeline.losses.fused_head import lm_loss
from distill.pipeline.losses.kd import kd_tail_loss, log1mexp, projector_kd_loss, uld_loss
from distill.pipeline.losses.representation import (
    attention_span_loss,
    build_layer_map,
    contrastive_loss,
    feature_loss,
    importance_loss,
    layerwise_loss,
    load_balance_loss,
    pool_attention_to_spans,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def full_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference: mean-per-position KL(teacher || student) over the full vocabulary × T²."""
    s = F.log_softmax(student_logits.double() / temperature, dim=-1)
    t = F.softmax(teacher_logits.double() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean") * temperature**2


def lse_at(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.logsumexp(teacher_logits.float() / temperature, dim=-1)


def reference_tail_kl(student_logits, ids, teacher_probs, temperature):
    """Direct float64 K+1-bin KL (no log-space tricks), mean over rows × T²."""
    s_prob = F.softmax(student_logits.double() / temperature, dim=-1)
    total = 0.0
    for row in range(ids.shape[0]):
        matched = ids[row] >= 0
        t = teacher_probs[row].double()[matched]
        s = s_prob[row, ids[row][matched]]
        r_t, r_s = 1 - t.sum(), 1 - s.sum()
        total += (t * (t / s).log()).sum() + r_t * (r_t / r_s).log()
    return total / ids.shape[0] * temperature**2


# --- log1mexp --------------------------------------------------------------------------


def test_log1mexp_matches_naive_and_is_finite_at_extremes():
    x = torch.tensor([-1e-3, -0.1, -0.693, -0.7, -1.0, -5.0, -30.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-10)
    extremes = log1mexp(torch.tensor([0.0, -1e-12, -1e30, float("-inf")]))
    assert torch.isfinite(extremes).all()
    assert extremes[2] == 0 and extremes[3] == 0
    assert abs(extremes[0].item() - math.log(1e-7)) < 1e-3  # clamped tail, see [tail-bin note]


# --- kd_tail_loss ------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_tail_with_full_vocab_equals_full_kl(temperature):
    torch.manual_seed(0)
    n, v = 6, 11
    student, teacher = torch.randn(n, v) * 2, torch.randn(n, v) * 2
    ids = torch.stack([torch.randperm(v) for _ in range(n)])  # K = V, any order
    loss = kd_tail_loss(student, ids, teacher.gather(1, ids), lse_at(teacher, temperature), temperature)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - full_kl(student, teacher, temperature).item()) < 1e-5


def test_kd_tail_is_lower_bound_of_full_kl():
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        n, v, k, temperature = 5, 12, 4, 1.5
        student, teacher = torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2
        if seed % 2:
            ids = teacher.topk(k, dim=-1).indices
        else:  # any subset works: merging bins can only lower a KL (log-sum inequality)
            ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
        loss = kd_tail_loss(student, ids, teacher.gather(1, ids), lse_at(teacher, temperature), temperature)
        full = full_kl(student, teacher, temperature).item()
        assert 0 <= loss.item() <= full + 1e-6, (seed, loss.item(), full)


@pytest.mark.parametrize("k", [4, 9])
def test_kd_tail_zero_loss_and_zero_grad_when_student_equals_teacher(k):
    torch.manual_seed(1)
    n, v, temperature = 7, 9, 2.0
    teacher = torch.randn(n, v) * 3
    student = teacher.clone().requires_grad_(True)
    ids = teacher.topk(k, dim=-1).indices
    loss = kd_tail_loss(student, ids, teacher.gather(1, ids), lse_at(teacher, temperature), temperature)
    loss.backward()
    assert abs(loss.item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-6


def test_kd_tail_golden_values():
    # V=4, T=1. Teacher probs [1/2, 1/4, 1/8, 1/8] (logits = their logs, so lse = 0),
    # top-2 ids [0, 1]; student uniform: s = 1/4 each.
    #   matched: r_t = 1/4, r_s = 1/2
    #   KL = 1/2 ln(1/2 / 1/4) + 1/4 ln(1/4 / 1/4) + 1/4 ln(1/4 / 1/2) = 1/2 ln2 - 1/4 ln2 = 1/4 ln2
    #      = 0.1732868
    #   id 1 unmatched (-1): r_t = 1/2, r_s = 3/4
    #   KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3) = 0.1438410
    teacher_topk = torch.tensor([[math.log(0.5), math.log(0.25)]] * 2)
    ids = torch.tensor([[0, 1], [0, -1]])
    lse = torch.zeros(2)
    student = torch.zeros(2, 4)
    per_row = [kd_tail_loss(student, ids, teacher_topk, lse, 1.0, mask=torch.tensor([i == 0, i == 1])) for i in (0, 1)]
    assert abs(per_row[0].item() - 0.1732868) < 1e-6
    assert abs(per_row[1].item() - 0.1438410) < 1e-6
    both = kd_tail_loss(student, ids, teacher_topk, lse, 1.0)
    assert abs(both.item() - (0.1732868 + 0.1438410) / 2) < 1e-6
    # T = 2 (lse stored for T = 2): teacher probs become sqrt(p) renormalized; compare the
    # direct float64 formula, times T² = 4.
    teacher_full_t2 = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log() / 2
    t2 = kd_tail_loss(student[:1], ids[:1], teacher_topk[:1], torch.logsumexp(teacher_full_t2, -1), 2.0)
    expected = reference_tail_kl(student[:1], ids[:1], teacher_full_t2.softmax(-1)[:, :2], 2.0)
    assert abs(t2.item() - expected.item()) < 1e-6


def test_kd_tail_cross_vocab_unmatched_mass_goes_to_tail():
    torch.manual_seed(2)
    n, vt, vs, k, temperature = 8, 30, 17, 6, 1.5
    teacher = torch.randn(n, vt) * 2
    top = teacher.topk(k, dim=-1).indices
    vocab_map = torch.full((vt,), -1, dtype=torch.long)
    vocab_map[torch.randperm(vt)[:vs]] = torch.randperm(vs)  # injective; 13 of 30 teacher tokens unmatched
    ids = vocab_map[top]
    ids[0] = -1  # a row with no matched token at all
    assert (ids[1:] == -1).any() and (ids >= 0).any()
    student = torch.randn(n, vs, requires_grad=True)
    lse = lse_at(teacher, temperature)
    loss = kd_tail_loss(student, ids, teacher.gather(1, top), lse, temperature)
    teacher_probs = (teacher.gather(1, top) / temperature - lse.unsqueeze(-1)).exp()
    assert abs(loss.item() - reference_tail_kl(student.detach(), ids, teacher_probs, temperature).item()) < 1e-5
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert student.grad[0].abs().max().item() < 1e-6  # nothing matched: head and tail both 1, no signal


def test_kd_tail_all_masked_is_zero_with_graph():
    student = torch.randn(3, 5, requires_grad=True)
    ids = torch.tensor([[0, 1]] * 3)
    loss = kd_tail_loss(student, ids, torch.randn(3, 2), torch.ones(3), 1.0, mask=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert (student.grad == 0).all()


def test_kd_tail_mask_ignores_garbage_rows():
    torch.manual_seed(3)
    student, teacher = torch.randn(4, 6), torch.randn(4, 6)
    ids = teacher.topk(3, dim=-1).indices
    lse = lse_at(teacher, 1.0)
    student_bad = student.clone().requires_grad_(True)
    with torch.no_grad():
        student_bad[2] = float("nan")
    mask = torch.tensor([True, True, False, True])
    masked = kd_tail_loss(student_bad, ids, teacher.gather(1, ids), lse, 1.0, mask=mask)
    keep = mask.nonzero().squeeze(1)
    reference = kd_tail_loss(student[keep], ids[keep], teacher.gather(1, ids)[keep], lse[keep], 1.0)
    assert torch.allclose(masked, reference)
    masked.backward()
    assert torch.isfinite(student_bad.grad).all()


def test_kd_tail_low_precision_inputs_give_fp32():
    torch.manual_seed(4)
    teacher = torch.randn(5, 20) * 3
    ids = teacher.topk(8, dim=-1).indices
    student = torch.randn(5, 20).bfloat16().requires_grad_(True)
    loss = kd_tail_loss(student, ids, teacher.gather(1, ids).half(), lse_at(teacher, 2.0), 2.0)
    loss.backward()
    assert loss.dtype == torch.float32
    assert student.grad.dtype == torch.bfloat16 and torch.isfinite(student.grad.float()).all()
    reference = kd_tail_loss(student.detach().float(), ids, teacher.gather(1, ids), lse_at(teacher, 2.0), 2.0)
    assert abs(loss.item() - reference.item()) < 1e-2  # fp16 rounding of the teacher logits only


# --- uld / projector ---------------------------------------------------------------------


def test_uld_zero_when_equal_and_matches_hand_value():
    torch.manual_seed(5)
    logits = torch.randn(4, 7)
    perm = torch.randperm(7)
    loss = uld_loss(logits[:, perm], logits, lse_at(logits, 1.5), 1.5)  # K = V, order irrelevant
    assert abs(loss.item()) < 1e-6
    # Teacher sorted top-2 [1/2, 1/4] (tail 1/4), student uniform over 4: sorted top-2 [1/4, 1/4]
    # (tail 1/2): |1/2 - 1/4| + |1/4 - 1/4| + |1/4 - 1/2| = 1/2.
    teacher_topk = torch.tensor([[math.log(0.25), math.log(0.5)]])
    value = uld_loss(torch.zeros(1, 4), teacher_topk, torch.zeros(1), 1.0)
    assert abs(value.item() - 0.5) < 1e-6


def test_uld_vocab_agnostic_and_masked():
    torch.manual_seed(6)
    student = torch.randn(3, 50, requires_grad=True)  # student vocab 50, teacher K = 8
    teacher_topk = torch.randn(3, 8).half()
    lse = torch.logsumexp(teacher_topk.float(), -1) + 1.0  # teacher has mass outside its top-8
    loss = uld_loss(student, teacher_topk, lse, 1.0)
    loss.backward()
    assert 0 < loss.item() <= 2 and torch.isfinite(student.grad).all()
    assert uld_loss(student, teacher_topk, lse, 1.0, mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0
    small = uld_loss(torch.randn(2, 3), torch.randn(2, 8), torch.zeros(2) + 3, 1.0)  # K > student vocab
    assert torch.isfinite(small)


def test_projector_kd_matches_kl_div_and_zero_when_equal():
    torch.manual_seed(7)
    student, projected = torch.randn(6, 13), torch.randn(6, 13)
    loss = projector_kd_loss(student.bfloat16(), projected.half(), 2.0)
    reference = full_kl(student.bfloat16().float(), projected.half().float(), 2.0)
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 1e-5
    assert abs(projector_kd_loss(projected, projected, 1.0).item()) < 1e-6
    masked = projector_kd_loss(student, projected, 1.0, mask=torch.tensor([True] + [False] * 5))
    assert abs(masked.item() - full_kl(student[:1], projected[:1], 1.0).item()) < 1e-5


# --- lm ---------------------------------------------------------------------------------


def test_lm_loss_matches_cross_entropy_and_ignores():
    torch.manual_seed(8)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    loss = lm_loss(logits.bfloat16(), labels)
    keep = labels != -100
    reference = F.cross_entropy(logits.bfloat16().float()[keep], labels[keep])
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) < 1e-5
    all_ignored = lm_loss(logits.requires_grad_(True), torch.full((2, 5), -100))
    assert all_ignored.item() == 0.0
    all_ignored.backward()
    assert (logits.grad == 0).all()


# --- feature / attention / layerwise ----------------------------------------------------


def test_feature_loss_is_mean_over_positions_and_dims():
    torch.manual_seed(9)
    for d in (8, 512):
        student, target = torch.zeros(64, d), torch.randn(64, d)
        assert abs(feature_loss(student, target).item() - target.pow(2).mean().item()) < 1e-6
        assert 0.7 < feature_loss(student, target).item() < 1.3  # O(1) whatever D
    s, t = torch.ones(3, 4).half(), torch.zeros(3, 4)
    assert feature_loss(s, t, mask=torch.tensor([True, False, False])).item() == 1.0
    assert feature_loss(s, t, mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_attention_span_loss_golden_and_zero_rows():
    # row 0: the teacher's text attention (0.5, 0.5, 0) is all stored; the student puts 0.2 on its BOS (key 0,
    # unmapped) and (0.2, 0.2, 0.4) on the text keys: renormalized (0.25, 0.25, 0.5) -> KL = ln 2.
    # row 1: the teacher stores nothing on text keys -> left out of the mean.
    head = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rest = 1.0 - head.sum(-1)
    mapped = torch.tensor([[False, True, True, True]]).expand(2, -1)
    student = torch.tensor([[0.2, 0.2, 0.2, 0.4], [0.5, 0.5, 0.0, 0.0]], requires_grad=True)
    loss = attention_span_loss(student, head, rest, mapped)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert attention_span_loss(student, head, rest, mapped, mask=torch.tensor([False, True])).item() == 0.0


def test_pool_attention_to_spans_hand_example():
    # 2 queries, Ka = 3 cached keys, Lt = 5 teacher positions -> spans [0, 0, 1, -1, 2]
    values = torch.tensor([[0.4, 0.3, 0.1], [0.6, 0.2, 0.2]]).half()
    key_ids = torch.tensor([[0, 1, 2], [3, 3, -1]])  # query 1: only unmapped / padding keys
    span_index = torch.tensor([0, 0, 1, -1, 2])
    head, rest, mapped = pool_attention_to_spans(values, key_ids, span_index, num_spans=3)
    assert head.dtype == torch.float32
    # query 0 keeps no unmapped key: its text mass is 1, and 0.2 of it is in keys not stored
    assert torch.allclose(head[0], torch.tensor([0.7, 0.1, 0.0]), atol=1e-3)
    assert rest[0].item() == pytest.approx(0.2, abs=1e-3)
    assert (head[1] == 0).all() and rest[1].item() == pytest.approx(1.0)  # 0.8 on the unmapped key, none on text
    assert mapped.tolist() == [[True, True, True]] * 2
    per_row = pool_attention_to_spans(values, key_ids, span_index.expand(2, 5), num_spans=3)
    assert all(torch.equal(a, b) for a, b in zip(per_row, (head, rest, mapped)))


def test_layerwise_loss_normalized_and_masked():
    torch.manual_seed(10)
    teacher = torch.randn(32, 16) * 5  # not standardized: normalization keeps it O(1)
    assert abs(layerwise_loss(torch.zeros(32, 16), teacher).item() - 1.0) < 1e-6
    assert layerwise_loss(teacher.clone(), teacher).item() < 1e-10
    student = torch.randn(32, 16, requires_grad=True)
    loss = layerwise_loss(student, teacher, mask=torch.arange(32) < 8)
    manual = (student[:8] - teacher[:8]).pow(2).mean() / teacher[:8].pow(2).mean()
    assert torch.allclose(loss, manual)
    loss.backward()
    assert (student.grad[8:] == 0).all() and (student.grad[:8] != 0).any()


@pytest.mark.parametrize(
    ("num_student", "teacher_layers", "expected"),
    [
        (30, [6, 12, 18, 24], {7: 6, 15: 12, 22: 18, 30: 24}),  # 7.5 and 22.5: ties to shallower
        (30, [7, 14, 21, 28], {7: 7, 15: 14, 22: 21, 30: 28}),
        (4, [1, 2, 3, 4, 5, 6], {1: 1, 2: 3, 3: 4, 4: 6}),  # shallower student: 4 of 6 layers used
        (24, [24, 12], {12: 12, 24: 24}),
    ],
)
def test_build_layer_map(num_student, teacher_layers, expected):
    mapping = build_layer_map(num_student, teacher_layers)
    assert mapping == expected
    assert list(mapping) == sorted(mapping)
    assert mapping == build_layer_map(num_student, list(reversed(teacher_layers)))  # deterministic


def test_build_layer_map_uses_teacher_depth_and_validates():
    assert build_layer_map(8, [6], num_teacher_layers=12) == {4: 6}
    with pytest.raises(ValueError, match="embedding"):
        build_layer_map(8, [0, 4])
    with pytest.raises(ValueError, match="num_teacher_layers"):
        build_layer_map(8, [6], num_teacher_layers=4)


# --- contrastive ----------------------------------------------------------------------


def test_contrastive_near_log_n_at_random_and_low_when_aligned():
    torch.manual_seed(11)
    n, d = 256, 64
    random_loss = contrastive_loss(torch.randn(n, d), torch.randn(n, d))
    assert abs(random_loss.item() - math.log(n)) < 1.5
    teacher = torch.randn(n, d)
    aligned = contrastive_loss(teacher * 3 + 0.01 * torch.randn(n, d), teacher, temperature=0.05)
    assert aligned.item() < 0.1 * math.log(n)
    student = torch.randn(n, d, requires_grad=True)
    contrastive_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_contrastive_caps_positions_with_stride_and_masks():
    torch.manual_seed(12)
    student, teacher = torch.randn(2048, 32), torch.randn(2048, 32)
    capped = contrastive_loss(student, teacher, max_positions=1024)
    keep = torch.linspace(0, 2047, 1024).long()
    assert torch.allclose(capped, contrastive_loss(student[keep], teacher[keep], max_positions=4096))
    assert 1e-3 < capped.item() < 20
    mask = torch.arange(2048) % 2 == 0
    assert torch.allclose(contrastive_loss(student, teacher, mask=mask), contrastive_loss(student[::2], teacher[::2]))
    assert contrastive_loss(student, teacher, mask=torch.zeros(2048, dtype=torch.bool)).item() == 0.0


# --- router regularizers ----------------------------------------------------------------


def test_load_balance_and_importance():
    n, e = 64, 4
    uniform = torch.full((n, e), 1 / e)
    balanced_index = (torch.arange(n) % e).unsqueeze(-1)
    assert abs(load_balance_loss(uniform, balanced_index).item() - 1.0) < 1e-6
    assert importance_loss(uniform).item() < 1e-10
    # everything on expert 0 with prob 1: E · 1 · 1 = E, and CV² of [n, 0, 0, 0] = 3
    collapsed = torch.zeros(n, e)
    collapsed[:, 0] = 1
    assert abs(load_balance_loss(collapsed, torch.zeros(n, 2, dtype=torch.long)).item() - e) < 1e-6
    assert abs(importance_loss(collapsed).item() - 3.0) < 1e-6
    # f counts top-1 choices, P averages probabilities: all rows [0.6, 0.4] -> f = [1, 0],
    # P = [0.6, 0.4], loss = 2 · (1 · 0.6 + 0 · 0.4) = 1.2
    lopsided = torch.tensor([[0.6, 0.4]]).expand(10, 2)
    assert abs(load_balance_loss(lopsided, torch.zeros(10, dtype=torch.long)).item() - 1.2) < 1e-6
    logits = torch.randn(n, e, requires_grad=True)
    probs = logits.softmax(-1)
    (load_balance_loss(probs, probs.topk(2, -1).indices) + importance_loss(probs)).backward()
    assert logits.grad.abs().sum() > 0


# --- O(1) at init, whatever L, D, vocab -------------------------------------------------


@pytest.mark.parametrize(("n", "d", "v"), [(16, 32, 64), (512, 256, 4096)])
def test_all_terms_are_order_one_at_random_init(n, d, v):
    torch.manual_seed(13)
    temperature, k = 2.0, 16
    teacher_logits, student_logits = torch.randn(n, v) * 2, torch.randn(n, v)
    ids = teacher_logits.topk(k, dim=-1).indices
    lse = lse_at(teacher_logits, temperature)
    attn_s, attn_t = torch.rand(n, 12).softmax(-1), torch.rand(n, 12).softmax(-1)
    probs = torch.randn(n, 4).softmax(-1)
    terms = {
        "kd": kd_tail_loss(student_logits, ids, teacher_logits.gather(1, ids), lse, temperature),
        "uld": uld_loss(student_logits, teacher_logits.gather(1, ids), lse, temperature),
        "projector": projector_kd_loss(student_logits, teacher_logits, temperature),
        "lm": lm_loss(student_logits.unsqueeze(0), torch.randint(0, v, (1, n))),
        "feature": feature_loss(torch.randn(n, d) * 0.5, torch.randn(n, d)),
        "attention": attention_span_loss(attn_s, attn_t * 0.8, torch.full((n,), 0.2), torch.ones(n, 12).bool()),
        "layerwise": layerwise_loss(torch.randn(n, d) * 0.5, torch.randn(n, d)),
        "contrastive": contrastive_loss(torch.randn(n, d), torch.randn(n, d)),
        "load_balance": load_balance_loss(probs, probs.topk(2, -1).indices),
    }
    for name, value in terms.items():
        assert value.dtype == torch.float32 and value.dim() == 0, name
        assert 1e-3 <= value.item() <= 20, (name, value.item())


# --- combine_terms ------------------------------------------------------------------------


def test_combine_terms_total_equals_sum_of_weighted():
    x = torch.tensor(2.0, requires_grad=True)
    raw = {"kd": x * 1.7, "lm": x * 2.9, "feature": x * 0.3, "contrastive": x * 7.1}
    weights = {"kd": 0.5, "lm": 0.5, "feature": 0.25, "contrastive": 0.0, "attention": 0.1}
    total, logs = combine_terms(raw, weights)
    weighted_sum = sum(value for key, value in logs.items() if key.startswith("weighted/"))
    assert abs(logs["loss/total"] - weighted_sum) <= 1e-6 * abs(weighted_sum)
    assert abs(total.item() - (0.5 * 3.4 + 0.5 * 5.8 + 0.25 * 0.6)) < 1e-5
    assert logs["weighted/contrastive"] == 0.0 and logs["loss/contrastive"] == pytest.approx(14.2)
    assert logs["weight/attention"] == pytest.approx(0.1) and "loss/attention" not in logs
    assert logs["weight/kd"] == 0.5 and logs["weighted/kd"] == pytest.approx(1.7)
    total.backward()
    assert x.grad.item() == pytest.approx(0.5 * 1.7 + 0.5 * 2.9 + 0.25 * 0.3)


def test_combine_terms_nothing_weighted_is_zero_in_graph():
    x = torch.tensor(1.0, requires_grad=True)
    total, logs = combine_terms({"kd": x * 3}, {"kd": 0.0})
    assert total.item() == 0.0 and total.requires_grad and logs["loss/total"] == 0.0
    total.backward()
    skipped_nan, _ = combine_terms({"kd": x * 2, "layerwise": torch.tensor(float("nan"))}, {"kd": 1.0})
    assert skipped_nan.item() == 2.0  # a weight-0 term is left out, not multiplied by 0
    empty_total, empty_logs = combine_terms({}, {})
    assert empty_total.item() == 0.0 and empty_logs == {"loss/total": 0.0}


def _head_case(bias: bool, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    p_rows, d, v, k = 37, 8, 50, 6
    hidden = torch.randn(p_rows, d, generator=g, requires_grad=True)
    torch.manual_seed(seed)
    head = torch.nn.Linear(d, v, bias=bias)
    labels = torch.randint(0, v, (p_rows,), generator=g)
    labels[-3:] = -100  # padding; row 36 still has a kd target
    unaligned = torch.rand(p_rows, generator=g) > 0.6
    kd_pos = torch.tensor([30, 2, 3, 17, 36, 9])  # not sorted, across slices
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in kd_pos])
    ids[0, 1] = -1
    t_logits = torch.randn(len(kd_pos), k, generator=g).half()
    lse = torch.logsumexp(torch.randn(len(kd_pos), v, generator=g) / 2.0, -1)
    return hidden, head, labels, unaligned, kd_pos, ids, t_logits, lse


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_kd", [True, False])
def test_sliced_lm_and_kd_equal_the_full_logits_computation_with_gradients(bias, with_kd):
    from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden

    hidden, head, labels, unaligned, kd_pos, ids, t_logits, lse = _head_case(bias)
    teacher = (ids, t_logits, lse) if with_kd else (None, None, None)
    lm, un, kd = lm_and_kd_from_hidden(hidden, head, labels, unaligned, kd_pos, *teacher, 2.0, slice_size=8)
    assert (kd is not None) == with_kd
    (lm + un + (kd if with_kd else 0)).backward()
    params = [hidden, *head.parameters()]
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None

    logits = head(hidden)
    ref_lm = lm_loss(logits, labels)
    valid = labels != -100
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    ref_un = (ce * (valid & unaligned)).sum() / valid.sum()  # unaligned CE over ALL valid positions
    ref_kd = kd_tail_loss(logits[kd_pos], ids, t_logits, lse, 2.0) if with_kd else None
    (ref_lm + ref_un + (ref_kd if with_kd else 0)).backward()
    for got, want in ((lm, ref_lm), (un, ref_un), (kd, ref_kd)):
        if want is not None:
            assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for got, t in zip(grads, params):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-6)


def test_sliced_lm_and_kd_under_bf16_autocast_match_fp32():
    """Under autocast the output layer's products run in bf16, the reductions in fp32 (no dtype errors)."""
    from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden

    hidden, head, labels, unaligned, kd_pos, ids, t_logits, lse = _head_case(False)
    ref = lm_and_kd_from_hidden(hidden, head, labels, unaligned, kd_pos, ids, t_logits, lse, 2.0, slice_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_and_kd_from_hidden(hidden, head, labels, unaligned, kd_pos, ids, t_logits, lse, 2.0, slice_size=8)
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, ref):
        assert a.item() == pytest.approx(b.item(), rel=2e-2)
    sum(got).backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(head.weight.grad).all()


def test_sliced_lm_and_kd_refuse_repeated_rows_and_mixed_dtypes():
    from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden

    hidden, head, labels, unaligned, kd_pos, ids, t_logits, lse = _head_case(False)
    repeated = kd_pos.clone()
    repeated[1] = repeated[0]  # one row twice would count its target twice in the gradient
    with pytest.raises(ValueError, match="repeat"):
        lm_and_kd_from_hidden(hidden, head, labels, unaligned, repeated, ids, t_logits, lse, 2.0)
    with pytest.raises(ValueError, match="bfloat16"):
        lm_and_kd_from_hidden(hidden, head.to(torch.bfloat16), labels, None, kd_pos, None, None, None, 2.0)


# --- the student's tail at tiny masses (exact, not 1 - head) -----------------------------


def _tiny_tail_case(seed: int = 11):
    """Rows whose student tail spans ~1e-1 .. ~1e-9 at T=1: the head ids get a per-row logit bonus."""
    g = torch.Generator().manual_seed(seed)
    n, d, v, k = 9, 6, 400, 5
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])
    ids[0, 2] = -1  # an unmatched teacher token: its mass joins the tail
    hidden = torch.randn(n, d, generator=g) * 0.3
    hidden[:, 0] = torch.linspace(4.0, 27.0, n)  # the bonus, carried by one hidden dim
    weight = torch.randn(v, d, generator=g) * 0.3
    weight[:, 0] = 0.0
    head = torch.nn.Linear(d, v)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.zero_()
    # (N, V) 1 on each row's matched head ids: logits = h Wᵀ + h[:, 0] · bonus_cols (a per-row head)
    bonus_cols = torch.zeros(n, v).scatter_(1, ids.clamp(min=0), (ids >= 0).float())
    t_logits = torch.randn(n, k, generator=g) * 2 + 6.0
    t_rest = torch.randn(n, v, generator=g)
    lse = torch.logsumexp(torch.cat([t_logits.double(), t_rest.double()], dim=-1), dim=-1).float()
    return hidden, head, bonus_cols, ids, t_logits.half().float(), lse


def _reference_kd64(logits64: torch.Tensor, ids, t_logits, lse, temperature: float) -> torch.Tensor:
    """Float64 K+1-bin KL from the full student logits: tail = sum of the probabilities outside the head."""
    s_logp = F.log_softmax(logits64 / temperature, dim=-1)
    total = logits64.new_zeros(())
    for row in range(ids.shape[0]):
        matched = ids[row] >= 0
        cols = ids[row][matched]
        t_logp = t_logits[row].double()[matched] / temperature - lse[row].double()
        rest = torch.ones(logits64.shape[1], dtype=torch.bool)
        rest[cols] = False
        log_r_s = torch.logsumexp(s_logp[row][rest], dim=0)
        r_t = 1 - t_logp.exp().sum()
        total = total + (t_logp.exp() * (t_logp - s_logp[row, cols])).sum() + r_t * (r_t.log() - log_r_s)
    return total / ids.shape[0] * temperature**2


def test_kd_tail_student_tail_is_exact_down_to_1e_minus_9():
    """The student's tail is computed from the non-head vocabulary, not as 1 - head (which cancels in fp32)."""
    hidden, head, bonus_cols, ids, t_logits, lse = _tiny_tail_case()
    logits = (head(hidden) + hidden[:, :1] * bonus_cols).detach()
    s_tail = 1 - F.softmax(logits.double(), -1).gather(1, ids.clamp(min=0)).masked_fill(ids < 0, 0).sum(-1)
    assert s_tail.min() < 3e-9 and s_tail.max() > 1e-2  # the case covers the range asked for
    student = logits.clone().requires_grad_(True)
    loss = kd_tail_loss(student, ids, t_logits, lse, 1.0)
    loss.backward()
    ref_in = logits.double().requires_grad_(True)
    ref = _reference_kd64(ref_in, ids, t_logits, lse, 1.0)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    err = (student.grad.double() - ref_in.grad).abs().max() / ref_in.grad.abs().max()
    assert err < 1e-4, err.item()
    # row by row too: the rows with the tiniest tails are the ones that cancelled
    for row in range(ids.shape[0]):
        one = kd_tail_loss(logits[row : row + 1], ids[row : row + 1], t_logits[row : row + 1], lse[row : row + 1], 1.0)
        ref_row = _reference_kd64(
            logits[row : row + 1].double(), ids[row : row + 1], t_logits[row : row + 1], lse[row : row + 1], 1.0
        )
        assert one.item() == pytest.approx(ref_row.item(), rel=1e-4), (row, s_tail[row].item())


def test_sliced_kd_student_tail_is_exact_down_to_1e_minus_9_with_gradients():
    """The same through ``lm_and_kd_from_hidden`` (hand-written backward): value and gradients vs float64."""
    from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden

    hidden, head, bonus_cols, ids, t_logits, lse = _tiny_tail_case()
    n, v = bonus_cols.shape
    # Per-row heads through a real output layer: widen the hidden state by one dim per row that carries the
    # bonus, and the weight by the matching columns (row n's bonus reaches only row n's head ids).
    eye = torch.eye(n) * hidden[:, :1]  # (N, N)
    wide_hidden = torch.cat([hidden, eye], dim=1).detach().requires_grad_(True)
    wide = torch.nn.Linear(wide_hidden.shape[1], v)
    with torch.no_grad():
        wide.weight.copy_(torch.cat([head.weight, bonus_cols.T], dim=1))
        wide.bias.copy_(head.bias)
    labels = torch.full((n,), -100)
    labels[:3] = torch.tensor([1, 2, 3])
    lm, _, kd = lm_and_kd_from_hidden(
        wide_hidden, wide, labels, None, torch.arange(n), ids, t_logits, lse, 1.0, slice_size=4
    )
    (lm + kd).backward()
    grads = [wide_hidden.grad.clone(), wide.weight.grad.clone(), wide.bias.grad.clone()]

    h64 = wide_hidden.detach().double().requires_grad_(True)
    w64 = wide.weight.detach().double().requires_grad_(True)
    b64 = wide.bias.detach().double().requires_grad_(True)
    logits64 = h64 @ w64.T + b64
    ref_kd = _reference_kd64(logits64, ids, t_logits, lse, 1.0)
    ref_lm = F.cross_entropy(logits64[:3], labels[:3])
    (ref_lm + ref_kd).backward()
    assert kd.item() == pytest.approx(ref_kd.item(), rel=1e-5)
    for got, want in zip(grads, (h64.grad, w64.grad, b64.grad)):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 1e-4, err.item()


def test_sliced_kd_with_the_whole_vocabulary_in_the_head_is_the_full_kl():
    """K = V: the student has no tail bin (lse_rest = -inf); value = full KL, gradients finite and exact."""
    from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden

    g = torch.Generator().manual_seed(3)
    n, d, v = 5, 4, 7
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    head = torch.nn.Linear(d, v, bias=False)
    teacher = torch.randn(n, v, generator=g) * 2
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    labels = torch.full((n,), -100)
    _, _, kd = lm_and_kd_from_hidden(
        hidden, head, labels, None, torch.arange(n), ids, teacher.gather(1, ids), lse_at(teacher, 2.0), 2.0
    )
    kd.backward()
    ref = full_kl(head(hidden), teacher, 2.0)
    assert kd.item() == pytest.approx(ref.item(), rel=1e-5)
    got = hidden.grad.clone()
    hidden.grad = None
    ref.backward()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, hidden.grad.float(), rtol=1e-4, atol=1e-6)


def test_routed_feature_loss_golden_mask_and_empty():
    from distill.pipeline.losses.representation import routed_feature_loss

    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    errors = torch.tensor([[1.0, 3.0], [2.0, 5.0], [4.0, 0.0]])
    # per position: 2, 2, 1 -> mean 5/3
    assert routed_feature_loss(probs, errors).item() == pytest.approx(5 / 3)
    assert routed_feature_loss(probs, errors, mask=torch.tensor([False, True, True])).item() == pytest.approx(1.5)
    empty = routed_feature_loss(probs, errors.requires_grad_(True), mask=torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
