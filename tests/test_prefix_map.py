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

from distill.pipeline.align import list_token_keys
from distill.pipeline.kd_losses import kd_tail_loss
from distill.pipeline.prefix_map import build_prefix_map, load_or_build_prefix_map
from distill.pipeline.xtok_losses import kd_prefix_loss


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
