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

from distill.cache.targets import target_field_shapes

SCHEMA_VERSION = 3  # 3: compact teacher targets (layout.targets); 2: prefix (BOS) policy, standardized hidden states
READABLE_VERSIONS = (2, 3)  # version 2 holds the fixed top-K fp16 targets (kind "topk-fp16"), read as they are
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
# ``fidelity`` is measured on the calibration rows when the store is created (a resuming process has no figure).
VOLATILE_KEYS = ("created_at", "code_version", "fidelity")


class CacheError(RuntimeError):
    """A store cannot be used as asked; the message says what is wrong and what to do."""


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
    """Key positions fit int16 below 32,768 tokens (halves their size); int32 otherwise."""
    return "int16" if seq_len <= 32767 else "int32"


def build_field_specs(layout: dict[str, Any]) -> dict[str, FieldSpec]:
    """The per-row fields of a store with this ``layout`` (the manifest's ``layout`` entry)."""
    seq = layout["seq_len"]
    specs = [
        FieldSpec("input_ids", "int32", (seq,)),
        FieldSpec("length", "int32", ()),
        FieldSpec("row_id", "int64", ()),
        FieldSpec("doc_id", "int64", ()),
        FieldSpec("offsets", "int32", (seq, 2)),
        FieldSpec("text", "str", ()),
        *(FieldSpec(name, dtype, shape) for name, dtype, shape in target_field_shapes(layout)),
        FieldSpec("lse", "float32", (seq, len(layout["temperatures"]))),
        FieldSpec("target_logprob", "float32", (seq,)),
    ]
    if layout.get("vocab_proj", True):  # stores made before the flag existed always held it
        specs.append(FieldSpec("vocab_proj", "float16", (seq, layout["teacher_hidden_size"])))
    for layer in layout["hidden_layers"]:
        specs.append(FieldSpec(f"hidden/{layer}", "float16", (seq, layout["hidden_dim"])))
    ka = layout["attention_topk"]
    for layer in layout["attention_layers"]:
        specs.append(FieldSpec(f"attn/{layer}", "float16", (seq, ka)))
        specs.append(FieldSpec(f"attn_ids/{layer}", attention_id_dtype(seq), (seq, ka)))
    return {s.name: s for s in specs}


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
