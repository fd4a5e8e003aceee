"""Text datasets and how documents become cache rows.

Rows are cut with the TEACHER tokenizer (`encode_texts`: no special tokens, real spans). Each
row is the teacher's prefix ids (its BOS, span (0, 0), see [input-as-trained note] in tokens.py)
followed by at most seq_len - len(prefix) text tokens: a document of n text tokens becomes
ceil(n / (seq_len - len(prefix))) pieces (more if a cut would split a character's byte tokens, see
[cut note]). Without packing each piece is a row, right-padded; with ``packing: greedy`` the pieces
are packed first fit into rows of seq_len, each keeping its prefix ([packing note] in packing.py),
and only what no piece fits is padding. Empty and whitespace-only
documents are skipped and counted (``empty_documents`` in the manifest); a dataset with no text at
all, an empty file, a file that is not UTF-8 or a text column that does not hold strings is refused
with one line. Each piece keeps the exact slice of the document its text tokens cover, so
consecutive pieces of a document concatenate back to the whole document, and stage 2 needs no dataset.
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
from distill.pipeline.text.packing import PACKING_MODES, build_segment_ids, pack_pieces, shift_spans
from distill.pipeline.text.tokens import check_tokenizer, encode_texts, find_clean_cut

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
    """What identifies the data a store was made from (recorded in the manifest); for a file of ``distill rollout``,
    also who wrote its text and how (``rollout``, [prompt-context note])."""
    identity = {
        "name": source,
        "config": config,
        "split": split,
        "text_field": text_field,
        "fingerprint": getattr(ds, "_fingerprint", None),
        "num_documents": len(ds),
    }
    if ROLLOUT_COLUMN in ds.column_names:
        identity["rollout"] = read_rollout_provenance(ds, source)
    return identity


PROMPT_COLUMN = "prompt_chars"
"""[prompt-context note] A dataset with this integer column (a ``distill rollout`` file has it) marks the first
``prompt_chars`` characters of each document as its prompt: context only. Each piece of a document records how many of
its characters are prompt (``RowPlan.context_chars``), the manifest keeps them per row (``dataset.rollout.
context_chars``: one list per row, one count per document segment), and stage 2 gives those positions no target
(``continuation_only``, batches.py)."""
ROLLOUT_COLUMN = "rollout"


def read_rollout_provenance(ds: datasets.Dataset, source: str) -> dict[str, Any]:
    """The ``rollout`` record every line of a rollout file carries; a file mixing several is refused."""
    import json

    seen = {json.dumps(r, sort_keys=True) for r in ds[ROLLOUT_COLUMN]}
    if len(seen) != 1:
        raise DataError(
            f"dataset {source!r} mixes rollouts of {len(seen)} students or sampling settings — cache each "
            "`distill rollout` file into its own store and pass them all to train (--cache A --cache B)"
        )
    return json.loads(seen.pop())


@dataclass
class RowPlan:
    """Which document and which of its text tokens each piece covers, and which pieces make each row.

    doc_index, token_start, token_end: (P,) per piece; token_start/token_end index the document's text
    tokens (`encode_texts`); every piece starts with `prefix`, the teacher's prefix ids, so piece p holds
    len(prefix) + token_end[p] - token_start[p] tokens. row_pieces: (R + 1,) row r holds pieces
    row_pieces[r]:row_pieces[r + 1] in order ([packing note] in packing.py); None: one piece per row.
    """

    doc_index: np.ndarray
    token_start: np.ndarray
    token_end: np.ndarray
    empty_documents: int
    prefix: tuple[int, ...] = ()
    row_pieces: np.ndarray | None = None
    context_chars: np.ndarray | None = None
    """(P,) characters at the start of each piece that are its document's prompt ([prompt-context note]); None for a
    dataset without prompts."""

    def __len__(self) -> int:
        return len(self.doc_index) if self.row_pieces is None else len(self.row_pieces) - 1

    def pieces(self, row: int) -> range:
        """Indices of the pieces of ``row``."""
        if self.row_pieces is None:
            return range(row, row + 1)
        return range(int(self.row_pieces[row]), int(self.row_pieces[row + 1]))

    def first_document(self, row: int) -> int:
        """The document of the row's first piece (the row's ``doc_id``)."""
        return int(self.doc_index[self.pieces(row)[0]])

    def count_tokens(self, start: int, end: int) -> int:
        """Tokens of rows [start, end), each piece's prefix included."""
        if end <= start:
            return 0
        first, last = self.pieces(start).start, self.pieces(end - 1).stop
        sizes = self.token_end[first:last] - self.token_start[first:last] + len(self.prefix)
        return int(sizes.sum())

    def truncated(self, max_rows: int | None) -> RowPlan:
        if max_rows is None or max_rows >= len(self):
            return self
        pieces = max_rows if self.row_pieces is None else int(self.row_pieces[max_rows])
        return RowPlan(
            self.doc_index[:pieces],
            self.token_start[:pieces],
            self.token_end[:pieces],
            self.empty_documents,
            self.prefix,
            None if self.row_pieces is None else self.row_pieces[: max_rows + 1],
            None if self.context_chars is None else self.context_chars[:pieces],
        )

    def row_context(self) -> list[list[int]] | None:
        """Per row, the prompt characters at the start of each of its pieces, in order ([prompt-context note])."""
        if self.context_chars is None:
            return None
        return [[int(self.context_chars[p]) for p in self.pieces(r)] for r in range(len(self))]

    def digest(self) -> str:
        h = hashlib.sha256()
        parts = [self.doc_index, self.token_start, self.token_end, np.asarray(self.prefix)]
        if self.row_pieces is not None:  # unpacked plans hash as they always did: their stores resume
            parts.append(self.row_pieces)
        for a in parts:
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()


def pack_plan(plan: RowPlan, seq_len: int) -> RowPlan:
    """The plan's pieces packed first fit into rows of ``seq_len`` tokens ([packing note] in packing.py).

    The pieces are reordered row by row (each row's pieces in their original order)."""
    sizes = plan.token_end - plan.token_start + len(plan.prefix)
    rows = pack_pieces(sizes, seq_len)
    order = np.argsort(rows, kind="stable")
    row_pieces = np.concatenate([[0], np.cumsum(np.bincount(rows))]).astype(np.int64)
    return RowPlan(
        plan.doc_index[order],
        plan.token_start[order],
        plan.token_end[order],
        plan.empty_documents,
        plan.prefix,
        row_pieces,
        None if plan.context_chars is None else plan.context_chars[order],
    )


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
    dataset: datasets.Dataset,
    text_field: str,
    tokenizer: Any,
    seq_len: int,
    batch_docs: int = 256,
    packing: str = "none",
) -> RowPlan:
    """Cut every document of ``dataset`` into pieces of at most ``seq_len`` teacher tokens, its prefix included;
    each piece is a row (``packing: none``) or pieces are packed into rows (``greedy``, see `pack_plan`).

    Raises TokenizerError (tokens.py) for a tokenizer that does not reproduce its text.
    """
    if packing not in PACKING_MODES:
        raise ConfigError(f"--packing {packing!r}: choose one of {', '.join(PACKING_MODES)}")
    prefix = check_tokenizer(tokenizer).prefix
    if seq_len <= len(prefix):
        raise ConfigError(f"--seq-len {seq_len} leaves no room for text after the teacher's {len(prefix)} prefix ids")
    doc_index, token_start, token_end, context = [], [], [], []
    prompted = PROMPT_COLUMN in dataset.column_names
    empty = 0
    for first in range(0, len(dataset), batch_docs):
        docs = dataset[first : first + batch_docs]
        texts = [t or "" for t in docs[text_field]]
        for i, (ids, offsets) in enumerate(encode_texts(tokenizer, texts)):
            if len(ids) == 0 or not texts[i].strip():  # nothing to learn from whitespace alone
                empty += 1
                continue
            cuts = cut_points(offsets, seq_len - len(prefix))
            for a, b in zip(cuts, cuts[1:]):
                doc_index.append(first + i)
                token_start.append(a)
                token_end.append(b)
                if prompted:  # [prompt-context note]: the piece's text is text[start:end] (RowBuilder.piece)
                    start = 0 if a == 0 else int(offsets[a, 0])
                    end = len(texts[i]) if b == len(ids) else int(offsets[b, 0])
                    context.append(min(max(int(docs[PROMPT_COLUMN][i] or 0) - start, 0), end - start))
    if not doc_index:
        raise DataError(
            f"no text to cache: all {len(dataset)} documents are empty or whitespace — check --text-field and the data"
        )
    as_array = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    plan = RowPlan(as_array(doc_index), as_array(token_start), as_array(token_end), empty, prefix)
    plan.context_chars = as_array(context) if prompted else None
    return pack_plan(plan, seq_len) if packing == "greedy" else plan


@dataclass
class Row:
    """One row ready for the teacher: ids (its prefix first), offsets into ``text``, the text itself.

    segment_ids: (n,) int64 the document segment of each position in a packed row ([packing note]), None
    for a row of one segment; doc_id is then the document of its first segment.
    """

    row_id: int
    doc_id: int
    input_ids: np.ndarray  # (n,) n <= seq_len, the prefix included
    offsets: np.ndarray  # (n, 2) character spans in ``text``; (0, 0) for the prefix
    text: str
    segment_ids: np.ndarray | None = None


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
        """Row ``row_id``: its pieces laid end to end, each with its prefix; see [packing note] in packing.py."""
        prefix = np.asarray(self.plan.prefix, dtype=np.int64)
        ids, spans, texts, sizes = [], [], [], []
        char_start = 0
        for piece in self.plan.pieces(row_id):
            piece_ids, piece_spans, piece_text = self.piece(piece)
            ids += [prefix, piece_ids]
            spans += [np.zeros((len(prefix), 2), dtype=np.int64), shift_spans(piece_spans, char_start)]
            texts.append(piece_text)
            sizes.append(len(prefix) + len(piece_ids))
            char_start += len(piece_text)
        segment_ids = build_segment_ids(sizes) if len(sizes) > 1 else None
        doc = self.plan.first_document(row_id)
        return Row(row_id, doc, np.concatenate(ids), np.concatenate(spans), "".join(texts), segment_ids)

    def piece(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Piece ``index``: its text tokens (m,), their spans (m, 2) in its text, and that text."""
        doc = int(self.plan.doc_index[index])
        a, b = int(self.plan.token_start[index]), int(self.plan.token_end[index])
        text, ids, offsets = self._document(doc)
        char_start = 0 if a == 0 else int(offsets[a, 0])
        char_end = len(text) if b == len(ids) else int(offsets[b, 0])
        piece_offsets = np.clip(offsets[a:b] - char_start, 0, char_end - char_start)
        return ids[a:b], piece_offsets, text[char_start:char_end]
