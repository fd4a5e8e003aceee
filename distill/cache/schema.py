"""The cache's public contract: schema version, field table, manifest helpers.

A store is a zarr v3 group. Its root attribute ``distill`` holds the manifest, written once
when the store is created and never changed afterwards, so that many writers can fill
shards concurrently without touching a shared object. Per-shard progress (status, rows,
chunk checksums) lives in each shard group's own attributes; ``read_manifest`` puts the two
together. docs/cache-format.md describes the layout for readers without this package.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from distill.cache.targets import target_field_shapes

SCHEMA_VERSION = 4  # 4: delta coding by distill, core zarr v3 codecs only ([delta note] in store.py); 3: compact
# teacher targets (layout.targets); 2: prefix (BOS) policy, standardized hidden states
READABLE_VERSIONS = (2, 3, 4)  # 2 holds the fixed top-K fp16 targets (kind "topk-fp16"), 3 numcodecs' Delta filter

MANIFEST_ATTR = "distill"
SHARDS_GROUP = "shards"
TOKENIZER_GROUP = "teacher_tokenizer"
STATS_GROUP = "stats"
PCA_GROUP = "pca"
STANDARDIZE_GROUP = "standardize"
TARGETS_GROUP = "targets"
ROOT_ARRAY_GROUPS = (STATS_GROUP, PCA_GROUP, STANDARDIZE_GROUP, TARGETS_GROUP)  # small float arrays at the store level

# Manifest keys that describe the creation event, not the store's content: two runs of the
# same command differ in them, so they are left out when manifests are compared.
# ``fidelity`` and ``calibration`` (which rows, what they measured) describe the calibration pass that created the
# store: a resuming process reads the store's statistics and runs none. Stores made before ``calibration``
# existed lack it (their calibration rows were the first ``layout.calibration_rows``); nothing reads it to use a store.
VOLATILE_KEYS = ("created_at", "code_version", "fidelity", "calibration")


class CacheError(RuntimeError):
    """A store cannot be used as asked; the message says what is wrong and what to do."""


class StoreDamaged(CacheError):
    """A store's data differs from what was committed (a failure, not a usage error)."""


@dataclass(frozen=True)
class FieldSpec:
    """One per-row array: ``dtype`` and the shape of one row (the row axis comes first on disk)."""

    name: str
    dtype: str
    row_shape: tuple[int, ...]


def shard_name(index: int) -> str:
    """The group path of shard ``index``: ``shards/00003``."""
    return f"{SHARDS_GROUP}/{index:05d}"


def attention_id_dtype(seq_len: int) -> str:
    """Key positions (and segment ids) fit int16 below 32,768 tokens (halves their size); int32 otherwise."""
    return "int16" if seq_len <= 32767 else "int32"


# The storage dtype of each field, by family (``hidden/6`` is a ``hidden`` field); ``attn_ids`` and
# ``segment_ids`` depend on seq_len (``attention_id_dtype``). Writers cast to these, readers check them,
# docs/cache-format.md lists them.
FIELD_DTYPES = {
    "input_ids": "int32",
    "length": "int32",
    "row_id": "int64",
    "doc_id": "int64",
    "offsets": "int32",
    "text": "str",
    "topk_ids": "int32",
    "topk_logits": "float16",
    "target_count": "uint16",
    "target_ids": "uint32",
    "target_values": "uint8",
    "target_max": "float32",
    "target_draws": "uint8",
    "lse": "float32",
    "target_logprob": "float32",
    "vocab_proj": "float16",
    "hidden": "float16",
    "attn": "float16",
}


def field_dtype(name: str, seq_len: int) -> str:
    """The storage dtype of field ``name`` in a store of rows of ``seq_len`` tokens."""
    family = name.split("/", 1)[0]
    return attention_id_dtype(seq_len) if family in ("attn_ids", "segment_ids") else FIELD_DTYPES[family]


def build_field_specs(layout: dict[str, Any]) -> dict[str, FieldSpec]:
    """The per-row fields of a store with this ``layout`` (the manifest's ``layout`` entry)."""
    seq, ka = layout["seq_len"], layout["attention_topk"]
    shapes: dict[str, tuple[int, ...]] = {
        "input_ids": (seq,),
        "length": (),
        "row_id": (),
        "doc_id": (),
        "offsets": (seq, 2),
        "text": (),
        **dict(target_field_shapes(layout)),
        "lse": (seq, len(layout["temperatures"])),
        "target_logprob": (seq,),
    }
    if layout.get("packing", "none") != "none":  # several documents per row: where each one starts
        shapes["segment_ids"] = (seq,)
    if layout.get("vocab_proj", True):  # stores made before the flag existed always held it
        shapes["vocab_proj"] = (seq, layout["teacher_hidden_size"])
    for layer in layout["hidden_layers"]:
        shapes[f"hidden/{layer}"] = (seq, layout["hidden_dim"])
    for layer in layout["attention_layers"]:
        shapes[f"attn/{layer}"] = shapes[f"attn_ids/{layer}"] = (seq, ka)
    return {name: FieldSpec(name, field_dtype(name, seq), shape) for name, shape in shapes.items()}


def root_array_path(group: str, layer: int, name: str) -> str:
    """The path of a store-level array of hidden layer ``layer``: ``stats/hidden/6/mean``.

    ``group`` is STATS_GROUP (``mean``/``std`` of the stored values), STANDARDIZE_GROUP (``mean``/``std``
    applied before storing) or PCA_GROUP (``mean``/``components`` of the basis)."""
    return f"{group}/hidden/{layer}/{name}"


def root_array_shapes(layout: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The store-level float arrays a store with ``layout`` holds, with their shapes."""
    width, dim = layout["teacher_hidden_size"], layout["hidden_dim"]
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in layout["hidden_layers"]:
        shapes[root_array_path(STATS_GROUP, layer, "mean")] = (dim,)
        shapes[root_array_path(STATS_GROUP, layer, "std")] = (dim,)
        if layout.get("hidden_standardized"):
            shapes[root_array_path(STANDARDIZE_GROUP, layer, "mean")] = (width,)
            shapes[root_array_path(STANDARDIZE_GROUP, layer, "std")] = (width,)
        if layout["hidden_pca"]:
            shapes[root_array_path(PCA_GROUP, layer, "mean")] = (width,)
            shapes[root_array_path(PCA_GROUP, layer, "components")] = (width, dim)
    return shapes


def row_bytes(layout: dict[str, Any]) -> int:
    """Uncompressed bytes of one row of a store with ``layout`` (a text counts one byte)."""
    return sum(
        int(np.prod(f.row_shape)) * (np.dtype(f.dtype).itemsize if f.dtype != "str" else 1)
        for f in build_field_specs(layout).values()
    )


def tokenizer_sha256(files: dict[str, bytes]) -> str:
    """The manifest's ``tokenizer.sha256`` of the teacher tokenizer's files: over each file's name then bytes, in
    name order."""
    return hashlib.sha256(b"".join(n.encode() + files[n] for n in sorted(files))).hexdigest()


def manifest_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest that must be equal for two stores (or two runs) to be compatible."""
    return {k: v for k, v in manifest.items() if k not in VOLATILE_KEYS}


def describe_manifest_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of the keys where two manifests differ (nested keys joined by dots)."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += describe_manifest_difference(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}: {va!r} != {vb!r}")
    return diffs


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def check_schema(manifest: dict[str, Any], where: str) -> None:
    """Refuse a manifest written by an incompatible version of the format."""
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise CacheError(
            f"{where}: cache schema version {version} is not supported (this distill reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-create the store with this version of distill"
        )
