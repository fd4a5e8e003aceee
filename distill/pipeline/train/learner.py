"""The learner: the student, the modules the loss terms add beside it, and one micro-batch's loss.

    learner = Learner(cfg, student, aux, facts, device, autocast_dtype)
    total, logs = learner(batch, weights)     # weights: the curriculum's, weights_at(step, total, cfg)

The forward runs the student once (its extra outputs only when a term due at this step reads them),
then every term of the term table (terms.py) with a part whose weight is > 0, through a ``StepView``
that computes shared pieces (the output-layer pass, the aligned logits) once. ``Learner`` is an
``nn.Module`` so that the data-parallel wrappers wrap the whole loss computation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from distill.config import TrainConfig
from distill.pipeline.losses.cross_tokenizer import alm_from_hidden, lm_and_kd_prefix_from_hidden
from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden
from distill.pipeline.losses.representation import combine_terms
from distill.pipeline.text.packing import next_in_segment, segment_position_ids
from distill.pipeline.train.batches import Batch
from distill.pipeline.train.router import standardize_hidden
from distill.pipeline.train.signals import TeacherSignal
from distill.pipeline.train.terms import KD_MODES, part_weights, run_terms

# --- what the terms read --------------------------------------------------------------------


@dataclass
class TeacherFacts:
    """Fixed facts about the teacher side, from the store and the two tokenizers (built once by setup)."""

    same_tokenizer: bool
    vocab_map: Tensor | None  # (V_teacher,) teacher id -> student id or -1; None = same tokenizer
    t_index: int  # the run's temperature among the stored ones
    layer_map: dict[int, int]  # student hidden layer -> teacher hidden layer
    attention_map: dict[int, int]  # student block -> teacher block
    stats: dict[int, tuple[Tensor, Tensor, Tensor]]  # teacher layer -> stored hidden's mean, std (D,), scale ()
    prefix_bins: tuple[Tensor, Tensor, Tensor] | None = None  # kd_mode=prefix: teacher (V_t,), student bins, bin sizes


class StepView:
    """One micro-batch as the terms see it: the student's outputs and the teacher signal at the N aligned
    (row b, teacher position tp, student position sp) triples. Shared pieces are computed once, when first asked."""

    def __init__(self, learner: Learner, batch: Batch, sig: TeacherSignal, out: Any, on: set[str]) -> None:
        self.learner, self.cfg, self.facts, self.batch, self.sig, self.out, self.on = (
            learner,
            learner.cfg,
            learner.facts,
            batch,
            sig,
            out,
            on,
        )
        device, a = learner.device, batch.aligned
        self.input_ids, self.mask = a.input_ids.to(device), a.attention_mask.to(device)  # (B, Ls)
        self.b, self.tp, self.sp = a.batch_idx.to(device), a.teacher_pos.to(device), a.student_pos.to(device)  # (N,)
        self.labels = F.pad(self.input_ids[:, 1:].masked_fill(self.mask[:, 1:] == 0, -100), (0, 1), value=-100)
        if a.target_mask is not None:  # a rollout row's prompt is context only ([prompt-context note] in data.py)
            self.labels = self.labels.masked_fill(~a.target_mask.to(device), -100)
        self.pair_segment = None  # (N,) the document of each aligned pair in packed rows, for ALM's chunks
        if a.segment_ids is not None:  # a document's last token has no label: the next one starts another document
            segments = a.segment_ids.to(device)
            self.labels = self.labels.masked_fill(~next_in_segment(segments, self.mask.sum(dim=1)), -100)
            self.pair_segment = segments[self.b, self.sp]
        self.logs: dict[str, Any] = {}

    def teacher_hidden(self, layer: int) -> Tensor:
        """(N, D) cached teacher hidden state at aligned positions as a target, fp32: centered and clipped per
        dimension, one scale per layer, with the store's statistics ([target-scale note] in router.py)."""
        mean, std, scale = self.facts.stats[layer]
        return standardize_hidden(self.sig.hidden[layer][self.b, self.tp].float(), mean, std, scale)

    def student_hidden(self, layer: int) -> Tensor:
        """(N, Ds) the student's hidden state ``layer`` (index into output_hidden_states) at aligned positions."""
        return self.out.hidden_states[layer][self.b, self.sp]

    def kd_inputs(self) -> tuple[Tensor, Tensor, Tensor]:
        """(N, K) teacher ids mapped to student ids (-1: no student token with those bytes, or an unused slot of
        compact targets), their raw logits (N, K) and the full-vocabulary logsumexp (N,) at the run's temperature."""
        ids = self.sig.topk_ids[self.b, self.tp]  # (N, K) teacher vocabulary, -1 in unused slots
        if self.facts.vocab_map is not None:
            ids = torch.where(ids >= 0, self.facts.vocab_map.to(ids.device)[ids.clamp(min=0)], -1)
        return ids, self.sig.topk_logits[self.b, self.tp], self.sig.lse[self.b, self.tp, self.facts.t_index]

    @property
    def prefix_fused(self) -> bool:
        """kd_mode=prefix across two tokenizers with a top-K head: computed in the output-layer pass ([bin-sums note]).
        Sampled targets keep the exact-map estimate (terms.compute_kd_prefix)."""
        return self.cfg.kd_mode == "prefix" and self.facts.prefix_bins is not None and self.kd_multiplier is None

    def prefix_inputs(self) -> tuple[Tensor, Tensor, Tensor, Tensor, float, Tensor]:
        """kd_mode=prefix's inputs at the N aligned positions: the bins of the teacher's head (N, K) (student ids,
        -1: none or an unused slot), its logits (N, K), lse (N,), the student's bins (Vs,), T and the bin sizes."""
        teacher_bin, student_bin, bin_size = self.facts.prefix_bins
        ids = self.sig.topk_ids[self.b, self.tp]  # (N, K) teacher vocabulary, -1 in unused slots
        bins = torch.where(ids >= 0, teacher_bin[ids.clamp(min=0)], -1)
        lse = self.sig.lse[self.b, self.tp, self.facts.t_index]
        return bins, self.sig.topk_logits[self.b, self.tp], lse, student_bin, self.cfg.temperature, bin_size

    @property
    def kd_multiplier(self) -> Tensor | None:
        """(N, K) the sampled targets' multiplier ([unbiased-kd note] in sampled_kd.py); None for a top-K head."""
        mult = self.sig.target_multiplier
        return None if mult is None else mult[self.b, self.tp]

    @cached_property
    def head(self) -> dict[str, Tensor | None]:
        """lm, lm_unaligned and (tail and prefix modes) kd in one slice-by-slice pass over the output layer
        ([sliced-logits note] in losses/fused_head.py): the full (B, Ls, Vs) logits are never held."""
        hidden = self.out.last_hidden_state  # (B, Ls, D)
        bsz, length = self.input_ids.shape
        unaligned = None
        # positions without a teacher target: [unaligned-lm note]; ALM's chunks cover every position between
        if "kd" in self.on and not self.facts.same_tokenizer and self.cfg.kd_mode != "alm":
            unaligned = torch.ones_like(self.labels, dtype=torch.bool)
            unaligned[self.b, self.sp] = False
        kd_on = "kd" in self.on
        flat = hidden.reshape(bsz * length, -1), self.learner.student.get_output_embeddings()
        rows = self.labels.reshape(-1), None if unaligned is None else unaligned.reshape(-1), self.b * length + self.sp
        if kd_on and self.prefix_fused:
            lm, lm_unaligned, kd = lm_and_kd_prefix_from_hidden(*flat, *rows, *self.prefix_inputs())
        else:
            # tail; prefix with one tokenizer (every bin one token) or sampled targets: compute_kd_prefix
            fused_kd = kd_on and KD_MODES[self.cfg.kd_mode].fused
            lm, lm_unaligned, kd = lm_and_kd_from_hidden(
                *flat,
                *rows,
                *(self.kd_inputs() if fused_kd else (None, None, None)),
                self.cfg.temperature,
                kd_multiplier=self.kd_multiplier if fused_kd else None,
            )
        return {"lm": lm, "lm_unaligned": lm_unaligned, "kd": kd}

    @cached_property
    def alm(self) -> Tensor:
        """The ALM loss of the batch's chunks (cross_tokenizer.alm_from_hidden), for kd_mode=alm and the alm term."""
        loss, chunks = alm_from_hidden(
            self.out.last_hidden_state,
            self.learner.student.get_output_embeddings(),
            self.labels,
            self.sig.target_logprob,
            self.b,
            self.tp,
            self.sp,
            self.cfg.alm_temperature,
            self.pair_segment,
        )
        self.logs["alm_chunks"] = float(chunks)
        return loss

    @cached_property
    def aligned_logits(self) -> Tensor:
        """(N, Vs) student logits at the aligned positions only."""
        return self.learner.student.get_output_embeddings()(self.out.last_hidden_state[self.b, self.sp])


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
