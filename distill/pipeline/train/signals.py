"""The teacher signal of a batch: what stage 2 consumes, whether read from the cache or computed live.

Losses never know where the teacher's outputs came from. Both sources have one method,
``read(rows) -> TeacherSignal`` (the ``SignalSource`` protocol): ``CachedTeacher`` reads the rows
of a store; ``LiveTeacher`` runs the teacher on the same rows with the store's own settings
(layers, top-K, temperatures, PCA basis) and converts the result through the same storage
dtypes, so that both give the same tensors (and the same loss curve).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from distill.cache.reader import CacheReader, to_output
from distill.cache.targets import DECODED_FIELDS, decode_stored_targets, target_read_fields
from distill.config import TrainConfig
from distill.pipeline.teacher.fields import blank_rows, compute_batch_fields, field_settings
from distill.pipeline.teacher.model import TeacherSource, load_teacher
from distill.pipeline.text.data import Row
from distill.runtime import DTYPE_NAMES, resolve_dtype

BASE_FIELDS = ("input_ids", "length", "offsets", "text", "row_id")


@dataclass
class TeacherSignal:
    """Teacher outputs for B rows of L teacher positions (dtypes per the reader's contract).

    input_ids (B, L) int64; length (B,) int64; offsets (B, L, 2) int64; text: B strings;
    topk_ids (B, L, K) int64 (-1 = unused slot); topk_logits (B, L, K) fp16 or fp32 (decoded); lse (B, L, nT) fp32;
    target_multiplier (B, L, K) fp32 for sampled targets (None: a top-K head, [unbiased-kd note] in sampled_kd.py);
    target_logprob (B, L) fp32;
    vocab_proj (B, L, H) fp16; hidden {layer: (B, L, D) fp16}; attn {layer: ((B, L, Ka) fp16, (B, L, Ka) int64)};
    segment_ids (B, L) int64 in packed stores ([packing note] in packing.py), else None.
    context_chars: per row, the prompt characters at the start of each document segment, in rollout stores
    ([prompt-context note] in data.py), else None.
    Fields that no enabled loss term needs are None / empty.
    """

    input_ids: torch.Tensor
    length: torch.Tensor
    offsets: torch.Tensor
    text: list[str]
    row_id: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    target_logprob: torch.Tensor | None = None
    target_multiplier: torch.Tensor | None = None
    vocab_proj: torch.Tensor | None = None
    hidden: dict[int, torch.Tensor] | None = None
    attn: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    segment_ids: torch.Tensor | None = None
    context_chars: list[list[int]] | None = None

    def to(self, device: torch.device) -> TeacherSignal:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TeacherSignal(
            input_ids=move(self.input_ids),
            length=move(self.length),
            offsets=self.offsets,
            text=self.text,
            row_id=self.row_id,
            topk_ids=move(self.topk_ids),
            topk_logits=move(self.topk_logits),
            lse=move(self.lse),
            target_logprob=move(self.target_logprob),
            target_multiplier=move(self.target_multiplier),
            vocab_proj=move(self.vocab_proj),
            hidden={k: move(v) for k, v in (self.hidden or {}).items()},
            attn={k: (move(v), move(i)) for k, (v, i) in (self.attn or {}).items()},
            segment_ids=self.segment_ids,
            context_chars=self.context_chars,
        )


def read_row_context(manifest: dict[str, Any]) -> list[list[int]] | None:
    """Per row of a store, the prompt characters of each document segment ([prompt-context note] in data.py);
    None for a store made from text without prompts."""
    return ((manifest.get("dataset") or {}).get("rollout") or {}).get("context_chars")


def attach_context(sig: TeacherSignal, context: list[list[int]] | None) -> TeacherSignal:
    """The signal with its rows' prompt boundaries (by ``row_id``), when the store has them."""
    if context is not None:
        sig.context_chars = [context[int(r)] for r in sig.row_id.tolist()]
    return sig


def signal_fields(layout: dict[str, Any], need: set[str]) -> list[str]:
    """Store fields to read for the loss families in ``need`` (kd, projector, alm, hidden, attention)."""
    fields = list(BASE_FIELDS)
    if "kd" in need:
        fields += ["topk_ids", "topk_logits", "target_multiplier", "lse"]
    if "projector" in need:
        fields += ["vocab_proj"]
    if "alm" in need:
        fields += ["target_logprob"]
    if "hidden" in need:
        fields += [f"hidden/{layer}" for layer in layout["hidden_layers"]]
    if "attention" in need:
        for layer in layout["attention_layers"]:
            fields += [f"attn/{layer}", f"attn_ids/{layer}"]
    return fields


def signal_from_arrays(data: dict[str, Any]) -> TeacherSignal:
    """Assemble a signal from a dict of field name -> tensor (``CacheReader.read_rows`` output)."""
    hidden = {int(k.split("/")[1]): v for k, v in data.items() if k.startswith("hidden/")}
    attn = {
        int(k.split("/")[1]): (v, data[f"attn_ids/{k.split('/')[1]}"]) for k, v in data.items() if k.startswith("attn/")
    }
    return TeacherSignal(
        input_ids=data["input_ids"],
        length=data["length"],
        offsets=data["offsets"],
        text=data["text"],
        row_id=data["row_id"],
        topk_ids=data.get("topk_ids"),
        topk_logits=data.get("topk_logits"),
        lse=data.get("lse"),
        target_logprob=data.get("target_logprob"),
        target_multiplier=data.get("target_multiplier"),
        vocab_proj=data.get("vocab_proj"),
        hidden=hidden or None,
        attn=attn or None,
        segment_ids=data.get("segment_ids"),
    )


class SignalSource(Protocol):
    """Where a batch's teacher signal comes from: the store or the teacher itself."""

    def read(self, rows: np.ndarray) -> TeacherSignal:
        """The signal of the store rows ``rows`` (the fields chosen when the source was made)."""
        ...


@dataclass
class CachedTeacher:
    """The teacher's outputs read from a store: ``fields`` (see ``signal_fields``) of the rows asked for."""

    reader: CacheReader
    fields: list[str]

    def read(self, rows: np.ndarray) -> TeacherSignal:
        """A packed store's rows also bring their ``segment_ids`` ([packing note] in packing.py)."""
        packed = ["segment_ids"] if self.reader.packed else []
        sig = signal_from_arrays(self.reader.read_rows(rows, [*self.fields, *packed]))
        return attach_context(sig, read_row_context(self.reader.manifest))


def live_teacher_source(cfg: TrainConfig, manifest: dict[str, Any]) -> TeacherSource:
    """Where ``--live-teacher`` loads from: its revision (by default the store's, when it names the store's
    teacher) and whether its remote code may run."""
    teacher = manifest.get("teacher", {})
    revision = cfg.live_teacher_revision
    if revision is None and cfg.live_teacher == teacher.get("name_or_path"):
        revision = teacher.get("revision")
    return TeacherSource(cfg.live_teacher, revision, cfg.trust_remote_code, flag="--live-teacher")


class LiveTeacher:
    """The teacher in the loop: computes the fields its terms read for the rows of a batch, on the fly.

    The teacher loads as stage 1 loads it (``teacher.model.load_teacher``: revision, remote code), in the dtype
    the store was made in. The rows' text and tokens come from ``reader``, the capture settings (layers, PCA
    basis) from the store the teacher was made with: ``on(eval_reader)`` scores an eval store's rows with the
    same teacher and settings. A row whose teacher output is not finite is blanked (length 0: no target), as
    ``cache-teacher --on-nonfinite skip`` stores it, and counted in ``nonfinite_rows``."""

    def __init__(self, source: TeacherSource, reader: CacheReader, device: torch.device, fields: list[str]) -> None:
        layout = reader.layout
        self.reader, self.device, self.fields = reader, device, fields
        self.dtype = resolve_dtype(reader.manifest["teacher"]["dtype"], device)  # the dtype the cache was made in
        self.model = load_teacher(source, device, self.dtype, need_attention=bool(layout["attention_layers"]))
        self.settings = field_settings(layout, reader.root, device)
        self.nonfinite_rows: list[int] = []

    def on(self, reader: CacheReader) -> LiveTeacher:
        """The same teacher (model and settings, not a copy) reading its rows from another store."""
        other = object.__new__(LiveTeacher)
        other.__dict__.update(self.__dict__, reader=reader)
        return other

    def computed_fields(self) -> list[str]:
        """The teacher fields to compute: those asked for, the decoded targets as the kind stores them."""
        names = [name for name in self.fields if name not in BASE_FIELDS and name not in DECODED_FIELDS]
        if any(name in DECODED_FIELDS for name in self.fields):
            names += [*target_read_fields(self.reader.layout), "lse"]
        return list(dict.fromkeys(names))

    def read(self, rows: np.ndarray) -> TeacherSignal:
        base = self.reader.read_rows(rows, [*BASE_FIELDS, *(["segment_ids"] if self.reader.packed else [])])
        batch = [
            Row(
                int(base["row_id"][i]),
                -1,
                base["input_ids"][i, : int(n)].numpy(),
                base["offsets"][i, : int(n)].numpy(),
                base["text"][i],
                base["segment_ids"][i, : int(n)].numpy() if "segment_ids" in base else None,
            )
            for i, n in enumerate(base["length"].tolist())
        ]
        arrays, bad = compute_batch_fields(self.model, batch, self.settings, self.device, self.computed_fields())
        if bad:
            self.blank(arrays, base, bad)
        data = {name: to_output(name, [arrays[name]], np.arange(len(rows))) for name in self.fields if name in arrays}
        if any(name in DECODED_FIELDS for name in self.fields):  # the same decoding as a cached read
            names = [*target_read_fields(self.reader.layout), "lse"]
            stored = {n: to_output(n, [arrays[n]], np.arange(len(rows))) for n in names}
            data.update(decode_stored_targets(stored, self.reader.layout, self.reader.rank_table()))
        data.update({k: v for k, v in base.items()})
        return attach_context(signal_from_arrays(data), read_row_context(self.reader.manifest))

    def blank(self, arrays: dict[str, np.ndarray], base: dict[str, Any], bad: list[int]) -> None:
        """Blank the rows ``bad`` (batch positions) as ``cache-teacher --on-nonfinite skip`` stores them."""
        blank_rows(arrays, bad)
        for name in ("input_ids", "length", "offsets", *(["segment_ids"] if "segment_ids" in base else [])):
            base[name][bad] = 0
        row_ids = [int(base["row_id"][i]) for i in bad]
        self.nonfinite_rows += row_ids
        print(
            f"train: the live teacher's output is not finite for rows {row_ids} in {DTYPE_NAMES[self.dtype]}; "
            "they are left out (length 0), as cache-teacher --on-nonfinite skip stores them",
            file=sys.stderr,
        )
