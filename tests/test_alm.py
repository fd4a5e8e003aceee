"""ALM (approximate likelihood matching) from the cache: chunk boundaries and the binarized KL, by hand.

The tiny pair: text "the cat sat"; the teacher reads <bos> "the" " cat" " sat", the student (no BOS)
"th" "e" " c" "at" " sat". Both end at characters 3, 7 and 11, so the chunks are " cat" (teacher: 1 token,
student: 2) and " sat" (1 and 1); the text before the first common end ("the") is no chunk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.pipeline.losses.cross_tokenizer import alm_from_hidden, alm_loss, find_chunks, sum_chunk_logprobs
from distill.pipeline.text.align import align_offsets

TEACHER_SPANS = np.array([[0, 0], [0, 3], [3, 7], [7, 11]])  # <bos> the | cat | sat
STUDENT_SPANS = np.array([[0, 2], [2, 3], [3, 5], [5, 7], [7, 11]])  # th e | c at | sat
# teacher log p of its next token at positions 0..3 (the last has none: NaN, as cached)
TARGET_LOGPROB = torch.tensor([[math.log(0.3), math.log(0.5), math.log(0.8), float("nan")]])
# student next-token probabilities at positions 0..4 (position 4 has no next token)
STUDENT_NEXT = [0.6, 0.4, 0.5, 0.9, None]


def binary_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def aligned_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alignment = align_offsets(TEACHER_SPANS, len(TEACHER_SPANS), STUDENT_SPANS)
    assert alignment.teacher_pos.tolist() == [1, 2, 3] and alignment.student_pos.tolist() == [1, 3, 4]
    n = alignment.num_aligned
    return (
        torch.zeros(n, dtype=torch.long),
        torch.from_numpy(alignment.teacher_pos),
        torch.from_numpy(alignment.student_pos),
    )


def test_chunks_and_their_likelihoods_by_hand():
    b, tp, sp = aligned_pairs()
    row, t_start, t_end, s_start, s_end = find_chunks(b, tp, sp)
    assert t_start.tolist() == [1, 2] and t_end.tolist() == [2, 3]
    assert s_start.tolist() == [1, 3] and s_end.tolist() == [3, 4]
    teacher = sum_chunk_logprobs(TARGET_LOGPROB, row, t_start, t_end)
    student_logp = torch.tensor([[math.log(p) if p else float("nan") for p in STUDENT_NEXT]])
    student = sum_chunk_logprobs(student_logp, row, s_start, s_end)
    assert teacher.tolist() == pytest.approx([math.log(0.5), math.log(0.8)], rel=1e-6)
    assert student.tolist() == pytest.approx([math.log(0.4 * 0.5), math.log(0.9)], rel=1e-6)


def test_chunks_never_cross_rows():
    b = torch.tensor([0, 0, 1, 1, 1])
    tp, sp = torch.tensor([1, 4, 2, 3, 9]), torch.tensor([1, 5, 1, 2, 8])
    row, t_start, t_end, s_start, s_end = find_chunks(b, tp, sp)
    assert row.tolist() == [0, 1, 1] and t_start.tolist() == [1, 2, 3] and s_end.tolist() == [5, 2, 8]


def test_chunks_never_join_two_documents_of_a_packed_row():
    # row 0 holds documents 0 (pairs at teacher 1, 3) and 1 (pairs at 6, 8, 9); row 1 is one document
    b = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    tp, sp = torch.tensor([1, 3, 6, 8, 9, 2, 4]), torch.tensor([1, 2, 5, 6, 8, 1, 3])
    segment = torch.tensor([0, 0, 1, 1, 1, 0, 0])
    row, t_start, t_end, s_start, s_end = find_chunks(b, tp, sp, segment)
    assert row.tolist() == [0, 0, 0, 1]
    assert list(zip(t_start.tolist(), t_end.tolist())) == [(1, 3), (6, 8), (8, 9), (2, 4)]  # no (3, 6)
    assert list(zip(s_start.tolist(), s_end.tolist())) == [(1, 2), (5, 6), (6, 8), (1, 3)]
    assert find_chunks(b, tp, sp)[1].tolist() == [1, 3, 6, 8, 2]  # without segments: one chunk across documents


def test_alm_loss_golden_and_temperature():
    teacher = torch.tensor([math.log(0.5), math.log(0.8)])
    student = torch.tensor([math.log(0.2), math.log(0.9)])
    expected = (binary_kl(0.5, 0.2) + binary_kl(0.8, 0.9)) / 2
    assert alm_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    warm = (binary_kl(0.5**0.5, 0.2**0.5) + binary_kl(0.8**0.5, 0.9**0.5)) / 2
    assert alm_loss(student, teacher, temperature=2.0).item() == pytest.approx(warm, rel=1e-5)


def test_alm_loss_is_zero_with_zero_gradient_at_the_teacher():
    teacher = torch.tensor([-0.3, -2.0, -7.5])
    student = teacher.clone().requires_grad_(True)
    loss = alm_loss(student, teacher)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(0.0, abs=1e-7) and grad.abs().max().item() < 1e-6
    empty = torch.zeros(0, requires_grad=True)
    assert alm_loss(empty, torch.zeros(0)).item() == 0.0


def test_alm_from_hidden_on_the_tiny_pair():
    # The student's "hidden state" is its log-probabilities and its head the identity, so the logits are known.
    vocab = 6
    labels = torch.tensor([[1, 2, 3, 4, -100]])  # its next tokens (ids are arbitrary)
    probs = torch.full((1, 5, vocab), 0.0)
    for pos, (label, p) in enumerate(zip(labels[0].tolist(), STUDENT_NEXT)):
        probs[0, pos] = (1 - (p or 0.5)) / (vocab - 1)
        probs[0, pos, max(label, 0)] = p or 0.5
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    hidden = probs.log().requires_grad_(True)
    b, tp, sp = aligned_pairs()
    loss, chunks = alm_from_hidden(hidden, head, labels, TARGET_LOGPROB, b, tp, sp)
    expected = (binary_kl(0.5, 0.4 * 0.5) + binary_kl(0.8, 0.9)) / 2
    assert chunks == 2 and loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    # the student's first token ("th", before the first chunk) gets no gradient from ALM
    assert hidden.grad[0, 0].abs().max().item() == 0.0 and hidden.grad[0, 1].abs().max().item() > 0
