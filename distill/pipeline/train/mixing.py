"""Training on several stores of one teacher: checked to agree, read as one signal source, mixed by weight in every
batch (``distill train --cache A --cache B --cache-weights 0.7,0.3``).

    check_stores_agree(readers, need)                       # one teacher, one tokenizer, the same fields
    source = MixedTeacher([CachedTeacher(r, fields) for r in readers])
    order = MixedRowOrder([rows_a, rows_b], [0.7, 0.3], seed=0, cursor=(0, 0))
    BatchStream(batcher.prepare_batch, order, ...)          # batches.py

[mix note] A row of store i is numbered ``i << STORE_SHIFT | row`` in the stream, so the batcher and the stream
handle one kind of row id; store 0's rows keep their own ids (held-out rows, eval). The k-th row drawn goes to the
store furthest below its share (w_i * k - rows drawn from i, ties to the first store): every batch holds each
store's share to within one row, and the run exactly. Each store has its own seeded permutation per epoch (store 0
the one a single-store run uses), so a run that adds a store on resume continues store 0's order where it was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader
from distill.cache.schema import PCA_GROUP, STANDARDIZE_GROUP, STATS_GROUP, CacheError, root_array_path
from distill.pipeline.train.signals import SignalSource, TeacherSignal

STORE_SHIFT = 40  # row ids of a store stay below 2**40

# Layout settings every store must share: the fields a batch reads have one shape and one meaning.
SHARED_LAYOUT = (
    "seq_len", "targets", "top_k", "temperatures", "hidden_layers", "hidden_dim", "hidden_pca", "vocab_proj",
    "attention_layers", "attention_topk",
)  # fmt: skip


def encode_rows(store: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(store) << STORE_SHIFT) | np.asarray(rows, dtype=np.int64)


def decode_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stores, rows) of stream row ids ([mix note])."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows >> STORE_SHIFT, rows & ((1 << STORE_SHIFT) - 1)


# --- the stores must agree ------------------------------------------------------------------


def check_stores_agree(readers: list[CacheReader], need: set[str]) -> None:
    """Every store comes from the primary store's teacher (tokenizer hash, model) with the same stored layout; a
    run whose terms read hidden states needs their standardization to match too. One line names what differs."""
    first = readers[0]
    for other in readers[1:]:
        what = first_difference(first.manifest, other.manifest)
        if what is None and "hidden" in need:
            what = hidden_statistics_differ(first, other)
        if what is not None:
            raise CacheError(
                f"--cache {other.url}: {what} — every --cache must come from the teacher of --cache {first.url} "
                "with the same cache-teacher settings"
                + (" (or train on them with --objective kd-only, which reads no hidden states)" if "hidden" in what
                   else "")
            )  # fmt: skip


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """What first differs between two stores' teachers and layouts, in words; None when they agree."""
    if a["tokenizer"]["sha256"] != b["tokenizer"]["sha256"]:
        return f"another teacher tokenizer (hash {b['tokenizer']['sha256'][:12]} vs {a['tokenizer']['sha256'][:12]})"
    for key in ("config_sha256", "weights_sample_sha256", "vocab_size"):
        if a["teacher"].get(key) != b["teacher"].get(key):
            return f"another teacher model ({key} {b['teacher'].get(key)} vs {a['teacher'].get(key)})"
    for key in SHARED_LAYOUT:
        if a["layout"].get(key) != b["layout"].get(key):
            return f"another {key} ({b['layout'].get(key)} vs {a['layout'].get(key)})"
    return None


def hidden_statistics_differ(a: CacheReader, b: CacheReader) -> str | None:
    """Stored hidden states are standardized (and PCA-reduced) with each store's own statistics: the hidden terms
    read every store with the primary's, so they must be equal."""
    arrays = [(STATS_GROUP, "mean"), (STATS_GROUP, "std"), (STANDARDIZE_GROUP, "mean"), (STANDARDIZE_GROUP, "std")]
    arrays += [(PCA_GROUP, "mean"), (PCA_GROUP, "components")] if a.layout["hidden_pca"] else []
    for layer in a.layout["hidden_layers"]:
        for group, name in arrays:
            path = root_array_path(group, layer, name)
            try:
                same = np.array_equal(a.root_array(path), b.root_array(path))
            except (KeyError, FileNotFoundError):  # a store made before the array existed
                continue
            if not same:
                return f"hidden-state statistics of its own ({path})"
    return None


# --- reading and ordering the rows ----------------------------------------------------------


class MixedTeacher:
    """One signal source over several stores: a batch of stream row ids ([mix note]) read store by store and laid
    end to end in one ``TeacherSignal`` (store 0's rows first)."""

    def __init__(self, sources: list[SignalSource]) -> None:
        self.sources = sources

    def read(self, rows: np.ndarray) -> TeacherSignal:
        stores, local = decode_rows(rows)
        parts = [self.sources[i].read(local[stores == i]) for i in sorted(set(stores.tolist()))]
        return concat_signals(parts)


def concat_signals(parts: list[TeacherSignal]) -> TeacherSignal:
    """Signals of rows of one layout laid end to end along the batch axis (B = the sum of theirs)."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    segments = None
    if any(p.segment_ids is not None for p in parts):  # an unpacked store's rows are one segment each
        segments = torch.cat(
            [p.segment_ids if p.segment_ids is not None else torch.zeros_like(p.input_ids) for p in parts]
        )
    context = None
    if any(p.context_chars is not None for p in parts):  # rows without prompts: no boundary
        context = [c for p in parts for c in (p.context_chars or [[] for _ in p.text])]
    hidden = {k: torch.cat([p.hidden[k] for p in parts]) for k in parts[0].hidden} if parts[0].hidden else None
    attn = (
        {k: tuple(torch.cat([p.attn[k][j] for p in parts]) for j in (0, 1)) for k in parts[0].attn}
        if parts[0].attn
        else None
    )
    return TeacherSignal(
        input_ids=cat("input_ids"),
        length=cat("length"),
        offsets=cat("offsets"),
        text=[t for p in parts for t in p.text],
        row_id=cat("row_id"),
        topk_ids=cat("topk_ids"),
        topk_logits=cat("topk_logits"),
        lse=cat("lse"),
        target_logprob=cat("target_logprob"),
        target_multiplier=cat("target_multiplier"),
        vocab_proj=cat("vocab_proj"),
        hidden=hidden,
        attn=attn,
        segment_ids=segments,
        context_chars=context,
    )


class RowOrder:
    """One store's training rows in a seeded permutation per epoch, and the (epoch, index) reached in it."""

    def __init__(self, rows: np.ndarray, seed: list[int], cursor: tuple[int, int] = (0, 0)) -> None:
        self.rows, self.seed = rows, seed
        self.epoch, self.index = (int(c) for c in cursor)
        self.order = self.permutation(self.epoch)

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([*self.seed, epoch]).permutation(self.rows)

    def take(self, count: int) -> list[int]:
        rows: list[int] = []
        while len(rows) < count:
            if self.index >= len(self.order):
                self.epoch, self.index = self.epoch + 1, 0
                self.order = self.permutation(self.epoch)
            step = min(count - len(rows), len(self.order) - self.index)
            rows.extend(self.order[self.index : self.index + step].tolist())
            self.index += step
        return rows

    @property
    def cursor(self) -> tuple[int, int]:
        return self.epoch, self.index


class MixedRowOrder:
    """Rows of several stores drawn by weight ([mix note]); the cursor (meta.json) holds each store's (epoch, index),
    the rows drawn from each since the mix began, and the weights.

    Resuming from a single-store cursor (epoch, index), or with stores added or weights changed, continues every
    store that was there where it was and starts the mix's counts again."""

    def __init__(self, rows: list[np.ndarray], weights: list[float], seed: int, cursor: Any = (0, 0)) -> None:
        saved = mixed_cursor(cursor)
        places = [tuple(p) for p in saved["stores"]][: len(rows)]
        places += [(0, 0)] * (len(rows) - len(places))
        self.orders = [RowOrder(r, [seed] if i == 0 else [seed, i], p) for i, (r, p) in enumerate(zip(rows, places))]
        self.weights = [float(w) for w in weights]
        same_mix = saved["weights"] == self.weights
        self.taken = [int(t) for t in saved["taken"]] if same_mix else [0] * len(rows)

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            drawn = sum(self.taken) + 1
            behind = [w * drawn - t for w, t in zip(self.weights, self.taken)]
            store = int(np.argmax(behind))  # the first of equals
            self.taken[store] += 1
            out.append(int(encode_rows(store, np.asarray(self.orders[store].take(1)))[0]))
        return out

    @property
    def cursor(self) -> dict[str, Any]:
        return {"stores": [list(o.cursor) for o in self.orders], "taken": list(self.taken), "weights": self.weights}


def mixed_cursor(cursor: Any) -> dict[str, Any]:
    """A saved cursor as a mixed one: (epoch, index) of a single-store run is store 0's place."""
    if isinstance(cursor, dict):
        return {"stores": cursor.get("stores", []), "taken": cursor.get("taken", []), "weights": cursor.get("weights")}
    return {"stores": [list(cursor)], "taken": [], "weights": None}


def describe_rollout(rollout: dict[str, Any]) -> str:
    """``rollouts of runs/smol step 400, T=1 top-p 0.95``: who wrote a rollout store's text, and how."""
    student, sampling = rollout.get("student") or {}, rollout.get("sampling") or {}
    who = student.get("run") or student.get("path") or "?"
    step = f" step {student['step']}" if student.get("step") is not None else ""
    how = f", T={sampling['temperature']:g} top-p {sampling['top_p']:g}" if "temperature" in sampling else ""
    return f"rollouts of {who}{step}{how}"
