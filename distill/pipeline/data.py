"""Text datasets and how documents become cache rows.

Rows are cut with the TEACHER tokenizer (`encode_texts`: no special tokens, real spans). Each
row is the teacher's prefix ids (its BOS, span (0, 0), see [input-as-trained note] in tokens.py)
followed by at most seq_len - len(prefix) text tokens: a document of n text tokens becomes
ceil(n / (seq_len - len(prefix))) rows (more if a cut would split a character's byte tokens, see
[cut note]); rows are never packed, short ones are right-padded, empty and whitespace-only
documents are skipped and counted (``empty_documents`` in the manifest); a dataset with no text at
all, an empty file, a file that is not UTF-8 or a text column that does not hold strings is refused
with one line. Each row keeps the exact slice of the document its text tokens cover, so
consecutive rows of a document concatenate back to the whole document, and stage 2 needs no dataset.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from distill.config import ConfigError
from distill.pipeline.tokens import check_tokenizer, encode_texts, find_clean_cut

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


class DataError(ValueError):
    """The dataset cannot be used as asked."""


def load_text_dataset(source: str, config: str | None, split: str, text_field: str) -> datasets.Dataset:
    """Load ``split`` of a hub dataset, a local dataset folder, or local json/jsonl/parquet/txt/csv files."""
    files = [s.strip() for s in source.split(",") if s.strip()]
    suffixes = {Path(f).suffix.lower() for f in files}
    local = all(Path(f).is_file() for f in files)
    if local and all(Path(f).stat().st_size == 0 for f in files):
        raise DataError(f"dataset {source!r}: the file(s) are empty, no documents — pass files that hold text")
    try:
        if local and len(suffixes) == 1 and suffixes <= set(LOCAL_BUILDERS):
            builder = LOCAL_BUILDERS[suffixes.pop()]
            ds = datasets.load_dataset(builder, data_files={split: files}, split=split)
        elif len(files) == 1 and Path(files[0]).is_dir() and (Path(files[0]) / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(files[0])
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            ds = datasets.load_dataset(source, config, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as exc:
        raise DataError(f"cannot load dataset {source!r} (config {config!r}, split {split!r}): {exc}") from None
    except Exception as exc:  # the builders fail in their own ways (StopIteration, DatasetGenerationError)
        raise DataError(describe_load_failure(source, exc)) from None
    if text_field not in ds.column_names:
        raise DataError(
            f"dataset {source!r} has no text field {text_field!r}; its columns are {ds.column_names} "
            "(choose one with --text-field)"
        )
    kind = getattr(ds.features.get(text_field), "dtype", None)
    if kind not in ("string", "large_string"):
        raise DataError(
            f"dataset {source!r}: column {text_field!r} holds {kind or ds.features.get(text_field)} values, not text "
            "— choose the text column with --text-field"
        )
    if len(ds) == 0:
        raise DataError(f"dataset {source!r} (split {split!r}) has no documents — check the files and --split")
    return ds


def describe_load_failure(source: str, exc: BaseException) -> str:
    """One line for a dataset that the ``datasets`` builders cannot read; the root cause named."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        if isinstance(cause, UnicodeDecodeError):
            return f"dataset {source!r}: not UTF-8 text ({cause.reason} at byte {cause.start}) — convert it to UTF-8"
    if isinstance(exc, StopIteration) or isinstance(cause, StopIteration):
        return f"dataset {source!r}: no documents could be read — check that the file(s) hold text"
    reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"cannot load dataset {source!r}: {reason} — check the file(s) and their format"


def dataset_identity(ds: datasets.Dataset, source: str, config: str | None, split: str, text_field: str) -> dict:
    """What identifies the data a store was made from (recorded in the manifest)."""
    return {
        "name": source,
        "config": config,
        "split": split,
        "text_field": text_field,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "num_documents": len(ds),
    }


@dataclass
class RowPlan:
    """Which document and which of its text tokens each row covers: arrays of length R (rows).

    token_start/token_end index the document's text tokens (`encode_texts`); every row starts
    with `prefix`, the teacher's prefix ids, so row r holds len(prefix) + token_end[r] - token_start[r]
    tokens.
    """

    doc_index: np.ndarray
    token_start: np.ndarray
    token_end: np.ndarray
    empty_documents: int
    prefix: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.doc_index)

    def truncated(self, max_rows: int | None) -> RowPlan:
        if max_rows is None:
            return self
        return RowPlan(
            self.doc_index[:max_rows],
            self.token_start[:max_rows],
            self.token_end[:max_rows],
            self.empty_documents,
            self.prefix,
        )

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.doc_index, self.token_start, self.token_end, np.asarray(self.prefix)):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()


def cut_points(offsets: np.ndarray, seq_len: int) -> list[int]:
    """Token indices where a document's rows start, plus its length at the end.

    offsets: (n, 2) real spans of the document's text tokens; seq_len: text tokens per row.
    [cut note] Byte-level tokenizers split a character like an emoji into several tokens whose
    character spans overlap (each covers the whole character). A cut between two overlapping
    tokens would make both rows claim that character, so the cut moves back until the token
    after it starts at or after the end of the token before it (a row may then hold fewer than
    seq_len tokens); see `find_clean_cut`. Only a row shorter than one character's tokens is cut
    inside it.
    """
    n = len(offsets)
    cuts = [0]
    while cuts[-1] + seq_len < n:
        cut = find_clean_cut(offsets, cuts[-1], cuts[-1] + seq_len)
        cuts.append(cut if cut > cuts[-1] else cuts[-1] + seq_len)
    cuts.append(n)
    return cuts


def plan_rows(
    dataset: datasets.Dataset, text_field: str, tokenizer: Any, seq_len: int, batch_docs: int = 256
) -> RowPlan:
    """Cut every document of ``dataset`` into rows of at most ``seq_len`` teacher tokens, its prefix included.

    Raises TokenizerError (tokens.py) for a tokenizer that does not reproduce its text.
    """
    prefix = check_tokenizer(tokenizer).prefix
    if seq_len <= len(prefix):
        raise ConfigError(f"--seq-len {seq_len} leaves no room for text after the teacher's {len(prefix)} prefix ids")
    doc_index, token_start, token_end = [], [], []
    empty = 0
    for first in range(0, len(dataset), batch_docs):
        texts = [t or "" for t in dataset[first : first + batch_docs][text_field]]
        for i, (ids, offsets) in enumerate(encode_texts(tokenizer, texts)):
            if len(ids) == 0 or not texts[i].strip():  # nothing to learn from whitespace alone
                empty += 1
                continue
            cuts = cut_points(offsets, seq_len - len(prefix))
            for a, b in zip(cuts, cuts[1:]):
                doc_index.append(first + i)
                token_start.append(a)
                token_end.append(b)
    if not doc_index:
        raise DataError(
            f"no text to cache: all {len(dataset)} documents are empty or whitespace — check --text-field and the data"
        )
    as_array = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return RowPlan(as_array(doc_index), as_array(token_start), as_array(token_end), empty, prefix)


@dataclass
class Row:
    """One row ready for the teacher: ids (its prefix first), offsets into ``text``, the text itself."""

    row_id: int
    doc_id: int
    input_ids: np.ndarray  # (n,) n <= seq_len, the prefix included
    offsets: np.ndarray  # (n, 2) character spans in ``text``; (0, 0) for the prefix
    text: str


class RowBuilder:
    """Materialize planned rows, re-tokenizing each document once (a small LRU of documents)."""

    def __init__(self, dataset: datasets.Dataset, text_field: str, tokenizer: Any, plan: RowPlan, cache_docs=64):
        self.dataset, self.text_field, self.tokenizer, self.plan = dataset, text_field, tokenizer, plan
        self._docs: OrderedDict[int, tuple[str, np.ndarray, np.ndarray]] = OrderedDict()
        self._cache_docs = cache_docs

    def _document(self, doc: int) -> tuple[str, np.ndarray, np.ndarray]:
        if doc not in self._docs:
            text = self.dataset[int(doc)][self.text_field] or ""
            ids, offsets = encode_texts(self.tokenizer, [text])[0]
            self._docs[doc] = (text, ids, offsets)
            if len(self._docs) > self._cache_docs:
                self._docs.popitem(last=False)
        return self._docs[doc]

    def row(self, row_id: int) -> Row:
        doc = int(self.plan.doc_index[row_id])
        a, b = int(self.plan.token_start[row_id]), int(self.plan.token_end[row_id])
        text, ids, offsets = self._document(doc)
        char_start = 0 if a == 0 else int(offsets[a, 0])
        char_end = len(text) if b == len(ids) else int(offsets[b, 0])
        row_offsets = np.clip(offsets[a:b] - char_start, 0, char_end - char_start)
        prefix = np.asarray(self.plan.prefix, dtype=np.int64)
        input_ids = np.concatenate([prefix, ids[a:b]])
        row_offsets = np.concatenate([np.zeros((len(prefix), 2), dtype=np.int64), row_offsets])
        return Row(row_id, doc, input_ids, row_offsets, text[char_start:char_end])
