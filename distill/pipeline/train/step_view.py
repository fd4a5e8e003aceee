"""One micro-batch as the loss terms see it (``StepView``), and the fixed teacher-side facts it reads.

The terms (terms.py) read a view, the learner (learner.py) builds one per micro-batch; the view knows the
learner only as ``LearnerParts``, the few attributes it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from distill.config import TrainConfig
from distill.pipeline.losses.cross_tokenizer import alm_from_hidden
from distill.pipeline.losses.fused_head import lm_and_kd_from_hidden
from distill.pipeline.losses.hidden_targets import standardize_hidden
from distill.pipeline.losses.prefix_kd import lm_and_kd_prefix_from_hidden
from distill.pipeline.text.packing import next_in_segment
from distill.pipeline.train.batches import Batch
from distill.pipeline.train.signals import TeacherSignal

# --- what the terms read --------------------------------------------------------------------


@dataclass(frozen=True)
class HeadPass:
    """What the output-layer pass (``StepView.head``) needs to know of the run's kd mode (terms.KD_MODES)."""

    fused: bool = False  # its kd is computed in the output-layer pass, with lm
    prefix_bins: bool = False  # its kd groups the head into shared-prefix bins (TeacherFacts.prefix_bins)
    chunks: bool = False  # its kd compares chunks, which cover every position: no lm_unaligned


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


class LearnerParts(Protocol):
    """What a view reads of its learner (learner.Learner)."""

    cfg: TrainConfig
    facts: TeacherFacts
    student: nn.Module
    aux: nn.ModuleDict
    device: torch.device
    head_pass: HeadPass


class StepView:
    """One micro-batch as the terms see it: the student's outputs and the teacher signal at the N aligned
    (row b, teacher position tp, student position sp) triples. Shared pieces are computed once, when first asked."""

    def __init__(self, learner: LearnerParts, batch: Batch, sig: TeacherSignal, out: Any, on: set[str]) -> None:
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
        dimension, one scale per layer, with the store's statistics ([target-scale note] in hidden_targets.py)."""
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
        prefix = self.learner.head_pass.prefix_bins
        return prefix and self.facts.prefix_bins is not None and self.kd_multiplier is None

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
        if "kd" in self.on and not self.facts.same_tokenizer and not self.learner.head_pass.chunks:
            unaligned = torch.ones_like(self.labels, dtype=torch.bool)
            unaligned[self.b, self.sp] = False
        kd_on = "kd" in self.on
        flat = hidden.reshape(bsz * length, -1), self.learner.student.get_output_embeddings()
        rows = self.labels.reshape(-1), None if unaligned is None else unaligned.reshape(-1), self.b * length + self.sp
        if kd_on and self.prefix_fused:
            lm, lm_unaligned, kd = lm_and_kd_prefix_from_hidden(*flat, *rows, *self.prefix_inputs())
        else:
            # tail; prefix with one tokenizer (every bin one token) or sampled targets: compute_kd_prefix
            fused_kd = kd_on and self.learner.head_pass.fused
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
