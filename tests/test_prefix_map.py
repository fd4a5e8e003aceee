"""The prefix map of `kd_mode=prefix` against a direct byte search, and `kd_prefix_loss` against hand values.

Oracle: the shared byte strings are the intersection of both vocabularies' token bytes (specials aside),
found by set intersection; the bin of a token is found by scanning every shared string for the longest
byte prefix, with no dictionary walk. Tokenizers are tiny BPEs trained in memory (tests/tokenizer_utils.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.pipeline.losses.kd import kd_tail_loss
from distill.pipeline.losses.prefix_kd import kd_prefix_loss
from distill.pipeline.text.align import list_token_keys
from distill.pipeline.text.prefix_map import build_prefix_map, load_or_build_prefix_map


def token_bytes(tokenizer) -> dict[int, bytes]:
    """id -> bytes of every non-special token."""
    return {token_id: key[1] for token_id, key, _ in list_token_keys(tokenizer) if key[0] == "bytes"}


def brute_force_bins(teacher, student, teacher_ids, student_ids) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Bytes of the bin (longest shared byte prefix, by a scan of every shared string) of the given tokens."""
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    shared = set(t_bytes.values()) & set(s_bytes.values())

    def longest(token: bytes) -> bytes:
        best = b""
        for candidate in shared:
            if len(candidate) > len(best) and token.startswith(candidate):
                best = candidate
        return best

    return {i: longest(t_bytes[i]) for i in teacher_ids}, {i: longest(s_bytes[i]) for i in student_ids}


def check_against_brute_force(teacher, student, teacher_ids=None, student_ids=None) -> dict[str, int]:
    """Assert the map's bins equal the brute-force bins; returns counts for the caller's own assertions."""
    pmap = build_prefix_map(teacher, student)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    teacher_ids = sorted(t_bytes) if teacher_ids is None else teacher_ids
    student_ids = sorted(s_bytes) if student_ids is None else student_ids
    t_expected, s_expected = brute_force_bins(teacher, student, teacher_ids, student_ids)
    counts = {"teacher_prefix": 0, "student_prefix": 0, "teacher_none": 0}
    for token_id, expected in t_expected.items():
        got = int(pmap.teacher_bin[token_id])
        if expected == b"":
            assert got == -1, (teacher.convert_ids_to_tokens(token_id), got)
            counts["teacher_none"] += 1
            continue
        assert s_bytes[got] == expected, (teacher.convert_ids_to_tokens(token_id), s_bytes[got], expected)
        counts["teacher_prefix"] += int(expected != t_bytes[token_id])
    for token_id, expected in s_expected.items():
        got = int(pmap.student_bin[token_id])
        if expected == b"":
            assert got == -1
            continue
        assert s_bytes[got] == expected
        counts["student_prefix"] += int(expected != s_bytes[token_id])
    return counts


@pytest.mark.parametrize(("teacher_name", "student_name"), [("big", "small"), ("small", "big"), ("big", "sp")])
def test_prefix_map_equals_brute_force_byte_search(tokenizers, teacher_name, student_name):
    counts = check_against_brute_force(tokenizers[teacher_name], tokenizers[student_name])
    # each direction of the pair has tokens that only a prefix bin catches
    assert counts["teacher_prefix"] > 0 or counts["student_prefix"] > 0


def test_prefix_map_golden_bins_big_to_small(tokenizers):
    teacher, student = tokenizers["big"], tokenizers["small"]
    pmap = build_prefix_map(teacher, student)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    unmatched = [t for t, i in t_vocab.items() if pmap.exact[i] < 0 and pmap.teacher_bin[i] >= 0]
    token = max(unmatched, key=len)  # a long word of the big vocabulary
    bin_token = student.convert_ids_to_tokens(int(pmap.teacher_bin[t_vocab[token]]))
    assert token.startswith(bin_token) and len(bin_token) < len(token)
    assert bin_token in t_vocab  # bins are shared tokens
    # shared tokens are their own bins on both sides
    for shared in ("a", "Ġthe", "the"):
        if shared in t_vocab and shared in s_vocab:
            assert pmap.teacher_bin[t_vocab[shared]] == s_vocab[shared] == pmap.student_bin[s_vocab[shared]]


def test_prefix_map_is_cached_beside_the_vocab_map(tokenizers, tmp_path):
    teacher, student = tokenizers["big"], tokenizers["small"]
    built = load_or_build_prefix_map(teacher, student, tmp_path)
    (path,) = tmp_path.glob("prefix_map-v1-*.npz")
    again = load_or_build_prefix_map(teacher, student, tmp_path)
    assert np.array_equal(built.teacher_bin, again.teacher_bin) and np.array_equal(built.student_bin, again.student_bin)
    padded = built.padded(len(built.teacher_bin) + 5, len(built.student_bin) + 3)
    assert (padded.teacher_bin[-5:] == -1).all() and (padded.student_bin[-3:] == -1).all()


# --- kd_prefix_loss ------------------------------------------------------------------------


def test_kd_prefix_loss_hand_computed_golden():
    # Student vocabulary: 0 ' t', 1 ' th' (no teacher twin: bin of ' t'), 2 'x', 3 'y' (no shared prefix).
    # Teacher head: ' the' (no student twin -> bin ' t') 0.5, ' t' 0.25; the remaining 0.25 is the tail.
    student_bin = torch.tensor([0, 0, 2, -1])
    student_logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    teacher_bins = torch.tensor([[0, 0]])
    teacher_logits = torch.log(torch.tensor([[0.5, 0.25]]))
    loss = kd_prefix_loss(student_logits, teacher_bins, teacher_logits, torch.zeros(1), student_bin, 1.0)
    # bin ' t': teacher 0.75, student 0.1 + 0.2; tail: teacher 0.25, student 'x' 0.3 + 'y' 0.4
    expected = 0.75 * math.log(0.75 / 0.3) + 0.25 * math.log(0.25 / 0.7)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_prefix_loss_with_singleton_bins_is_the_tail_loss():
    # one teacher token per bin: the head holds each bin's whole mass, so nothing is left to complete
    torch.manual_seed(0)
    n, vocab, k = 5, 12, 4
    student_logits = torch.randn(n, vocab, requires_grad=True)
    teacher_full = torch.randn(n, vocab)
    top = teacher_full.topk(k, dim=-1)
    ids = top.indices.clone()
    ids[0, 1] = -1  # an unmatched teacher token
    lse = teacher_full.logsumexp(-1)
    identity = torch.arange(vocab)  # every token its own bin, and every bin exact when in the head
    got = kd_prefix_loss(student_logits, ids, top.values, lse, identity, 1.0, torch.ones(vocab, dtype=torch.long))
    want = kd_tail_loss(student_logits, ids, top.values, lse, 1.0)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (g1,) = torch.autograd.grad(got, student_logits)
    (g2,) = torch.autograd.grad(want, student_logits)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_kd_prefix_loss_full_vocabulary_bins_is_the_binned_kl():
    # K = V and every token in some bin: the loss is the exact KL between the two binned distributions.
    torch.manual_seed(1)
    n, vocab = 3, 8
    student_logits, teacher_logits = torch.randn(n, vocab), torch.randn(n, vocab)
    bins = torch.tensor([0, 0, 2, 2, 2, 5, 6, 6])
    loss = kd_prefix_loss(
        student_logits, bins.expand(n, -1), teacher_logits, (teacher_logits / 2).logsumexp(-1), bins, temperature=2.0
    )
    onehot = F.one_hot(bins, vocab).float()  # (V, bins)
    p = F.softmax(teacher_logits / 2, -1) @ onehot
    q = F.softmax(student_logits / 2, -1) @ onehot
    keep = p > 0
    expected = (torch.where(keep, p * (p.clamp(min=1e-30).log() - q.clamp(min=1e-30).log()), 0.0)).sum(-1).mean() * 4
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_prefix_loss_masked_and_empty():
    logits = torch.randn(2, 4, requires_grad=True)
    loss = kd_prefix_loss(
        logits, torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1), torch.zeros(2), torch.arange(4), 1.0,
        mask=torch.zeros(2, dtype=torch.bool),
    )  # fmt: skip
    assert loss.item() == 0.0 and loss.requires_grad


# --- the fused pass: lm_and_kd_prefix_from_hidden against kd_prefix_loss through autograd ---------------


def _fused_prefix_case(bias: bool, seed: int = 0, temperature: float = 2.0):
    """A batch of 40 rows with every corner: unlabeled rows, rows without kd (not in kd_pos, out of order),
    teacher slots without a bin (-1: unmapped or unused), several teacher tokens per bin, exact bins, student
    tokens without a bin and embedding rows past the student's tokenizer (student_bin shorter than the layer)."""
    gen = torch.Generator().manual_seed(seed)
    rows, dim, vocab, k, n_kd = 40, 8, 30, 6, 25
    hidden = torch.randn(rows, dim, generator=gen, requires_grad=True)
    head = torch.nn.Linear(dim, vocab, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, dim, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=gen))
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::7] = -100
    kd_pos = torch.randperm(rows, generator=gen)[:n_kd]
    student_bin = torch.randint(-1, 12, (vocab - 3,), generator=gen)  # 3 embedding rows past the tokenizer
    teacher_bins = torch.randint(-1, 14, (n_kd, k), generator=gen)  # bins 12, 13: no student token has them
    teacher_full = 3 * torch.randn(n_kd, 50, generator=gen)  # a teacher vocabulary of 50, its head the first K
    teacher_logits = teacher_full[:, :k]
    lse = (teacher_full / temperature).logsumexp(-1)
    bin_size = torch.randint(1, 3, (14,), generator=gen)  # bins of size 1 are exact once in the head
    return hidden, head, labels, kd_pos, teacher_bins, teacher_logits, lse, student_bin, temperature, bin_size


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("slice_size", [7, 256])
@pytest.mark.parametrize("temperature", [1.0, 2.0])  # T = 1 shares lm's softmax ([bin-sums note])
def test_fused_prefix_kd_equals_kd_prefix_loss_with_gradients(bias, slice_size, temperature):
    from distill.pipeline.losses.fused_head import lm_loss
    from distill.pipeline.losses.prefix_kd import lm_and_kd_prefix_from_hidden

    hidden, head, labels, kd_pos, bins, t_logits, lse, student_bin, t, size = _fused_prefix_case(bias, 0, temperature)
    unaligned = torch.ones_like(labels, dtype=torch.bool)
    unaligned[kd_pos] = False
    lm, lm_unaligned, kd = lm_and_kd_prefix_from_hidden(
        hidden, head, labels, unaligned, kd_pos, bins, t_logits, lse, student_bin, t, size, slice_size=slice_size
    )
    params = [hidden, head.weight, *([head.bias] if bias else [])]
    got = torch.autograd.grad(lm + 0.5 * lm_unaligned + 3 * kd, params)

    logits = head(hidden)  # (40, 30) the unfused reference, through autograd
    padded_bin = F.pad(student_bin, (0, 3), value=-1)
    want_kd = kd_prefix_loss(logits[kd_pos], bins, t_logits, lse, padded_bin, t, size)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * (labels != -100)
    want_unaligned = (ce * unaligned).sum() / (labels != -100).sum()
    want = torch.autograd.grad(lm_loss(logits, labels) + 0.5 * want_unaligned + 3 * want_kd, params)
    assert kd.item() > 0.1  # not a vacuous comparison
    assert kd.item() == pytest.approx(want_kd.item(), rel=1e-5)
    assert lm.item() == pytest.approx(lm_loss(logits, labels).item(), rel=1e-6)
    assert lm_unaligned.item() == pytest.approx(want_unaligned.item(), rel=1e-6)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)  # gradients up to ~0.1: fp32 rounding


def test_fused_prefix_cells_hold_exact_bins_and_shared_bins():
    """prefix_cells groups a row's slots by bin: the masses add up, one cell per bin, exact where the head holds all."""
    from distill.pipeline.losses.prefix_kd import prefix_cells

    bins = torch.tensor([[3, -1, 3, 5]])
    logits = torch.log(torch.tensor([[0.4, 0.1, 0.2, 0.1]]))
    cells, head, rest, exact = prefix_cells(bins, logits, torch.zeros(1), 1.0, torch.tensor([0, 0, 0, 2, 0, 1]))
    by_bin = {int(c): (float(h), bool(e)) for c, h, e in zip(cells[0], head[0], exact[0], strict=True) if c >= 0}
    assert by_bin.keys() == {3, 5}
    assert by_bin[3][0] == pytest.approx(0.6) and by_bin[3][1]  # both of bin 3's teacher tokens are in the head
    assert by_bin[5][0] == pytest.approx(0.1) and by_bin[5][1]
    assert rest.item() == pytest.approx(0.3)  # 1 - 0.7: the unbinned slot's 0.1 is rest too


def test_fused_prefix_kd_without_aligned_rows_is_zero_in_graph():
    from distill.pipeline.losses.prefix_kd import lm_and_kd_prefix_from_hidden

    hidden, head, labels, _, bins, t_logits, lse, student_bin, t, size = _fused_prefix_case(bias=False)
    none = torch.zeros(0, dtype=torch.long)
    lm, _, kd = lm_and_kd_prefix_from_hidden(hidden, head, labels, None, none, bins[:0], t_logits[:0], lse[:0],
                                             student_bin, t, size)  # fmt: skip
    assert kd.item() == 0.0 and kd.requires_grad and lm.item() > 0


def test_fused_prefix_kd_under_bf16_autocast_is_close_to_fp32():
    from distill.pipeline.losses.prefix_kd import lm_and_kd_prefix_from_hidden

    hidden, head, labels, kd_pos, *teacher = _fused_prefix_case(bias=True)
    ref = lm_and_kd_prefix_from_hidden(hidden, head, labels, None, kd_pos, *teacher, slice_size=7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lm_and_kd_prefix_from_hidden(hidden, head, labels, None, kd_pos, *teacher, slice_size=7)
    assert got[2].dtype == torch.float32
    assert got[2].item() == pytest.approx(ref[2].item(), rel=5e-2)
    (g,) = torch.autograd.grad(got[0] + got[2], hidden)
    assert torch.isfinite(g).all()
