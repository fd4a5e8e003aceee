"""The learner: the student, the modules the loss terms add beside it, and one micro-batch's loss.

    learner = Learner(cfg, student, aux, facts, device, autocast_dtype)
    total, logs = learner(batch, weights)     # weights: the curriculum's, weights_at(step, total, cfg)

The forward runs the student once (its extra outputs only when a term due at this step reads them),
then every term of the term table (terms.py) with a part whose weight is > 0, through a ``StepView``
(step_view.py) that computes shared pieces (the output-layer pass, the aligned logits) once. ``Learner`` is an
``nn.Module`` so that the data-parallel wrappers wrap the whole loss computation.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from distill.config import TrainConfig
from distill.pipeline.losses.combine import combine_terms
from distill.pipeline.text.packing import segment_position_ids
from distill.pipeline.train.batches import Batch
from distill.pipeline.train.step_view import StepView, TeacherFacts
from distill.pipeline.train.terms import KD_MODES, part_weights, run_terms


class Learner(nn.Module):
    """The student, the modules the run's terms add beside it (``aux``) and the fixed teacher-side facts.

    ``learner(batch, weights)`` is one micro-batch's loss: the student forward, then every term of the
    run with a part whose weight is > 0. Returns the weighted total and the log dict. This forward is
    what the data-parallel wrappers wrap."""

    def __init__(
        self,
        cfg: TrainConfig,
        student: nn.Module,
        aux: nn.ModuleDict,
        facts: TeacherFacts,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        self.cfg, self.student, self.aux, self.facts = cfg, student, aux, facts
        self.device, self.autocast_dtype = device, autocast_dtype
        self.terms = run_terms(cfg)
        self.head_pass = KD_MODES[cfg.kd_mode].head_pass

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.autocast_dtype is not None
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=enabled)

    def forward(self, batch: Batch, weights: dict[str, float]) -> tuple[Tensor, dict[str, Any]]:
        parts = part_weights(self.cfg, weights)
        on = {name for name, value in parts.items() if value > 0}
        due = [term for term in self.terms if on & set(term.weights(self.cfg, weights))]
        outputs = {name for term in due for name in term.student_outputs}
        sig = batch.signal.to(self.device)
        segments = batch.aligned.segment_ids
        with self.autocast():
            # The decoder without its output layer: logits are made slice by slice ([sliced-logits note]).
            # Packed rows: positions restart per document and the mask is block-diagonal ([packing note]).
            out = self.student.get_decoder()(
                input_ids=batch.aligned.input_ids.to(self.device),
                attention_mask=batch.aligned.attention_mask.to(self.device) if segments is None else None,
                position_ids=None if segments is None else segment_position_ids(segments.to(self.device)),
                use_cache=False,
                output_hidden_states="hidden_states" in outputs,
                output_attentions="attentions" in outputs,
            )
        view = StepView(self, batch, sig, out, on)
        raw: dict[str, Tensor] = {}
        for term in due:
            with self.autocast() if term.autocast else contextlib.nullcontext():
                raw.update(term.compute(view))
        total, term_logs = combine_terms(raw, parts)
        return total, {"aligned_share": batch.aligned.aligned_share, **view.logs, **term_logs}
