"""Stage 2's batches: row ids -> the teacher signal + the student's tokens aligned to it, in a resumable order.

    batcher = Batcher(source, tokenizer, max_length=2048, same_tokenizer=False)
    batch = batcher.prepare_batch(np.array([3, 17]))          # Batch(signal, aligned, key_spans, ...)
    stream = BatchStream(batcher.prepare_batch, train_rows, seed=0, batch_size=2)
    batch = stream.next(); stream.cursor                        # (epoch, index) after the batches consumed

The source is either teacher (``signals.SignalSource``); the rest of stage 2 never knows which.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.pipeline.text.align import AlignedBatch, align_batch, restrict_to_continuation, teacher_to_student_span
from distill.pipeline.train.mixing import MixedRowOrder, RowOrder
from distill.pipeline.train.signals import SignalSource, TeacherSignal
from distill.runtime import World


@dataclass
class Batch:
    signal: TeacherSignal
    aligned: AlignedBatch
    key_spans: torch.Tensor | None  # (B, Lt) teacher key position -> student token index, for the attention term
    student_tokens: int


@dataclass
class Batcher:
    """Reads the rows' teacher signal from ``source`` and tokenizes + aligns them for the student."""

    source: SignalSource
    tokenizer: Any
    max_length: int
    """Student tokens per row at most (longer rows are cut)."""
    same_tokenizer: bool
    """Teacher and student share the tokenizer: the identity alignment."""
    continuation_only: bool = False
    """Rows with prompt boundaries (rollout stores) get targets on their continuations only."""

    def prepare_batch(self, rows: np.ndarray) -> Batch:
        """CPU work, done ahead of the step on a thread (``BatchStream``)."""
        return self.build_batch(self.source.read(rows))

    def build_batch(self, sig: TeacherSignal) -> Batch:
        """The student's batch of a teacher signal: tokenized, aligned, teacher attention keys mapped to its
        tokens. Packed rows are read document by document ([packing note] in packing.py)."""
        aligned = align_batch(
            sig.text,
            sig.offsets.numpy(),
            sig.length.numpy(),
            self.tokenizer,
            self.max_length,
            teacher_input_ids=sig.input_ids.numpy(),
            same_tokenizer=self.same_tokenizer,
            teacher_segments=sig.segment_ids,
        )
        if self.continuation_only and sig.context_chars is not None:  # [prompt-context note] in data.py
            aligned = restrict_to_continuation(aligned, sig.offsets, sig.length, sig.segment_ids, sig.context_chars)
        key_spans = None
        if sig.attn:
            spans = [
                teacher_to_student_span(
                    sig.offsets[b].numpy(),
                    int(sig.length[b]),
                    aligned.student_offsets[b],
                    len(aligned.student_offsets[b]),
                )
                for b in range(len(sig.text))
            ]
            key_spans = torch.from_numpy(np.stack(spans)).long()
        return Batch(sig, aligned, key_spans, int(aligned.attention_mask.sum()))


class BatchStream:
    """Deterministic row order (a permutation per epoch from the seed) with a resumable cursor; reads ahead.

    ``rows``: one store's row ids, or a ``MixedRowOrder`` over several stores (mixing.py), whose cursor is a dict.
    Under torchrun rank r takes micro-batches r, r + W, ... of the one global order, so W ranks with
    ``grad_accum`` A see the micro-batches one process with A x W sees."""

    def __init__(
        self,
        prepare: Callable[[np.ndarray], Batch],
        rows: np.ndarray | MixedRowOrder,
        seed: int,
        batch_size: int,
        world: World | None = None,
        prefetch: int = 2,
        cursor: Any = (0, 0),
    ) -> None:
        self.prepare, self.batch_size = prepare, batch_size
        self.rows = rows if isinstance(rows, MixedRowOrder) else RowOrder(rows, [seed], cursor)
        self.world = world or World()
        self.prefetch = prefetch
        self._consumed = self.rows.cursor
        self.pool = ThreadPoolExecutor(max_workers=1) if prefetch > 0 else None
        self.ahead: list[tuple[Future, Any]] = []

    def _take_rows(self) -> np.ndarray:
        mine = None
        for r in range(self.world.size):
            rows = np.asarray(self.rows.take(self.batch_size), dtype=np.int64)
            if r == self.world.rank:
                mine = rows
        return mine

    @property
    def cursor(self) -> Any:
        """Position after the batches consumed so far (read-ahead batches are not counted): (epoch, index) of one
        store, a dict for several (``MixedRowOrder.cursor``)."""
        return self._consumed

    def next(self) -> Batch:
        if self.pool is None:
            batch = self.prepare(self._take_rows())
            self._consumed = self.rows.cursor
            return batch
        while len(self.ahead) < 1 + self.prefetch:
            rows = self._take_rows()
            self.ahead.append((self.pool.submit(self.prepare, rows), self.rows.cursor))
        future, cursor = self.ahead.pop(0)
        self._consumed = cursor
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
