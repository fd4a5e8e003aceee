"""Read rows of a cache store as torch tensors.

Dtype contract of ``CacheReader.read_rows`` (stage 2 relies on it):

* integer fields (``input_ids``, ``length``, ``row_id``, ``doc_id``, ``offsets``, ``topk_ids``,
  ``attn_ids/<l>``, ``segment_ids``) come back as ``torch.int64`` whatever their width on disk;
* floating fields come back in their stored dtype: ``topk_logits``, ``vocab_proj``,
  ``hidden/<l>``, ``attn/<l>`` as ``torch.float16``; ``lse`` and ``target_logprob`` as
  ``torch.float32``. Casting to the compute dtype is the consumer's job, done explicitly at
  the boundary (never by autocast), so that code without autocast runs too;
* ``text`` comes back as ``list[str]``;
* ``topk_ids``, ``topk_logits`` and ``target_multiplier`` can be asked of any store: a compact one
  (``--targets topk|sampled|hybrid``) reads its target fields and ``lse`` and decodes them
  (``decode_stored_targets`` in targets.py: int64 ids, -1 in unused slots; fp32 logits; the sampled kinds'
  multiplier, None otherwise).

The reader checks before it trusts: the schema version, that every shard it reads is
complete, that the data files of the chunks it reads exist ([missing-chunk note] in shards.py),
and (on request) that the fields and temperatures a consumer needs are stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
import zarr

from distill.cache.schema import TOKENIZER_GROUP, CacheError, build_field_specs, shard_name
from distill.cache.shards import (
    StoreDamaged,
    chunk_matches_checksum,
    describe_missing,
    missing_chunk_files,
    read_rows_of,
    stored_files,
)
from distill.cache.store import load_manifest, open_root, shard_records
from distill.cache.targets import (
    DECODED_FIELDS,
    ID_BY_RANK,
    decode_stored_targets,
    kind_of,
    target_kind,
    target_read_fields,
)


class CacheReader:
    """Random access to the rows of a complete store (or of its complete shards)."""

    def __init__(self, url: str, allow_partial: bool = False) -> None:
        self.url = url
        self.root = open_root(url)
        self.manifest = load_manifest(self.root, url)
        self.layout: dict[str, Any] = self.manifest["layout"]
        if self.layout.get("packing", "none") not in ("none", "greedy"):
            raise CacheError(
                f"{url}: rows packed as {self.layout['packing']!r}, which this distill does not read; update distill"
            )
        self.specs = build_field_specs(self.layout)
        self.shards = shard_records(self.root, self.manifest)
        incomplete = [s for s in self.shards if s["status"] != "complete"]
        if incomplete and not allow_partial:
            names = ", ".join(
                f"{s['index']} ({s['status']}, {len(s['checksums'])}/{s.get('num_chunks', '?')} chunks)"
                for s in incomplete[:5]
            )
            raise CacheError(
                f"{url}: shard(s) {names} not complete; finish them by re-running the same `distill cache-teacher` "
                "command (it resumes), then read the store"
            )
        self.readable = [s for s in self.shards if s["status"] == "complete"]
        self._starts = np.array([s["row_start"] for s in self.readable], dtype=np.int64)
        self._groups = {s["index"]: self.root[shard_name(s["index"])] for s in self.readable}
        self._files: dict[int, set[str]] = {}  # shard -> its stored files, listed on first read
        self._checked: set[tuple[int, int, str]] = set()  # (shard, chunk, field) known to be present or intact
        self._rank_table: torch.Tensor | None = None

    # --- what the store holds ------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        """Rows readable (all rows for a complete store)."""
        return int(sum(s["row_end"] - s["row_start"] for s in self.readable))

    @property
    def row_ids(self) -> np.ndarray:
        """Global ids of the readable rows, ascending."""
        return np.concatenate([np.arange(s["row_start"], s["row_end"]) for s in self.readable]).astype(np.int64)

    @property
    def fields(self) -> list[str]:
        return list(self.specs)

    @property
    def packed(self) -> bool:
        """Rows may hold several documents, told apart by the ``segment_ids`` field ([packing note])."""
        return self.layout.get("packing", "none") != "none"

    @property
    def temperatures(self) -> list[float]:
        return list(self.layout["temperatures"])

    @property
    def target_kind(self) -> str:
        """``topk``, ``sampled``, ``hybrid`` or ``topk-fp16`` (the layout of schema version 2)."""
        return target_kind(self.layout)

    def require_fields(self, names: Sequence[str], why: str = "") -> None:
        """Fail with a clear message when a needed field is not stored (the decoded target fields always are)."""
        missing = [n for n in names if n not in self.specs and n not in DECODED_FIELDS]
        if missing:
            reason = f" ({why})" if why else ""
            raise CacheError(
                f"{self.url}: the store lacks field(s) {missing}{reason}; stored: {self.fields}. Re-cache with what is "
                "needed (--hidden-layers / --attention-layers / --vocab-proj) or disable the loss term that needs it"
            )

    def temperature_index(self, temperature: float) -> int:
        """Index of ``temperature`` in the ``lse`` field, or a clear error if it was not stored."""
        for i, t in enumerate(self.temperatures):
            if abs(t - temperature) < 1e-6:
                return i
        raise CacheError(
            f"{self.url}: temperature {temperature} is not stored (stored: {self.temperatures}); train at one of "
            "them or re-cache with --temperatures including it"
        )

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files as stored (save them to a folder to load with AutoTokenizer)."""
        if TOKENIZER_GROUP not in self.root:
            raise CacheError(f"{self.url}: the store holds no teacher tokenizer files; re-cache it with this version")
        group = self.root[TOKENIZER_GROUP]
        return {name: bytes(np.asarray(node[:]).tobytes()) for name, node in group.arrays()}

    def rank_table(self) -> torch.Tensor | None:
        """The compact targets' ``targets/id_by_rank`` (V,) int64, read once; None for ``topk-fp16``."""
        if self._rank_table is None and kind_of(self.layout).compact:
            self._rank_table = torch.from_numpy(self.root_array(ID_BY_RANK).astype(np.int64))
        return self._rank_table

    def load_tokenizer(self) -> Any:
        """The teacher tokenizer stored in the cache, loaded with ``AutoTokenizer`` (stage 2 and eval need nothing but
        the store and the student)."""
        from transformers import AutoTokenizer

        try:
            files = self.tokenizer_files()
        except CacheError:
            raise CacheError(
                f"{self.url}: the store has no teacher tokenizer files, needed to map the teacher vocabulary "
                "onto the student's; re-create it with `distill cache-teacher`"
            ) from None
        with TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            return AutoTokenizer.from_pretrained(tmp)

    def root_array(self, path: str) -> np.ndarray:
        """A store-level array (``stats/hidden/6/mean``...)."""
        return np.asarray(self.root[path][:])

    # --- rows ----------------------------------------------------------------------------

    def read_rows(self, rows: Sequence[int] | np.ndarray, fields: Sequence[str] | None = None) -> dict[str, Any]:
        """Rows ``rows`` (global ids, any order) of ``fields`` (default all), in the order asked.

        Returns a dict of tensors (first axis = the rows asked) and ``text`` as a list of str.
        """
        names = list(fields) if fields is not None else self.fields
        self.require_fields(names)
        decoded = [n for n in names if n in DECODED_FIELDS and n not in self.specs or n == "target_multiplier"]
        if decoded:  # [target-codec note] in targets.py: read what they are made of, then decode
            stored = [n for n in names if n not in decoded]
            extra = [n for n in (*target_read_fields(self.layout), "lse") if n not in stored]
            data = self.read_rows(rows, stored + extra)
            targets = decode_stored_targets(data, self.layout, self.rank_table())
            out = {n: data[n] for n in stored}
            out.update({n: targets[n] for n in decoded})
            return out
        rows = np.asarray(rows, dtype=np.int64)
        shard_pos = np.searchsorted(self._starts, rows, side="right") - 1
        parts: dict[str, list[Any]] = {n: [] for n in names}
        order: list[np.ndarray] = []
        for pos in np.unique(shard_pos):
            shard = self.readable[pos] if pos >= 0 else None
            selected = np.nonzero(shard_pos == pos)[0]
            local = rows[selected] - (shard["row_start"] if shard else 0)
            if shard is None or (local < 0).any() or (local >= shard["row_end"] - shard["row_start"]).any():
                bad = rows[selected][0]
                raise CacheError(f"{self.url}: row {int(bad)} is not in a readable shard")
            group = self._groups[shard["index"]]
            self.require_chunk_files(shard, np.unique(local // shard["chunk_rows"]), names)
            for name in names:
                parts[name].append(read_selection(group[name], local))
            order.append(selected)
        inverse = np.argsort(np.concatenate(order)) if order else np.zeros(0, dtype=np.int64)
        return {name: to_output(name, parts[name], inverse) for name in names}

    def require_chunk_files(self, shard: dict[str, Any], chunks: np.ndarray, names: Sequence[str]) -> None:
        """Refuse to read a chunk whose data file is missing (zarr would give zeros) unless it is intact."""
        index = shard["index"]
        todo = [(int(c), n) for c in chunks for n in names if (index, int(c), n) not in self._checked]
        if not todo:
            return
        if index not in self._files:
            self._files[index] = stored_files(self.url, shard_name(index))
        group = self._groups[index]
        fields, wanted = sorted({n for _, n in todo}), sorted({c for c, _ in todo})
        absent = missing_chunk_files(group, fields, wanted, self._files[index])
        for chunk, lost in absent.items():
            if not chunk_matches_checksum(group, shard, chunk, self.specs):
                raise StoreDamaged(describe_missing(self.url, index, chunk, lost))
        self._checked.update((index, c, n) for c, n in todo)


def read_selection(array: zarr.Array, local_rows: np.ndarray) -> np.ndarray:
    """Rows of one shard array; a contiguous ascending run is read as one slice (the fast path)."""
    if len(local_rows) and np.all(np.diff(local_rows) == 1):
        return read_rows_of(array, slice(int(local_rows[0]), int(local_rows[-1]) + 1))
    return read_rows_of(array, local_rows)


def to_output(name: str, parts: list[np.ndarray], inverse: np.ndarray) -> Any:
    """Concatenate per-shard parts, restore the asked order, convert per the dtype contract."""
    data = np.concatenate(parts)[inverse] if parts else np.zeros(0)
    if name == "text":
        return [str(s) for s in data]
    if data.dtype.kind in ("i", "u"):
        return torch.from_numpy(data.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(data))
