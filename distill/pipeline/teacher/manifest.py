"""The manifest of a new store: the teacher's identity, the tokenizer, the input policy, the dataset and
the layout (every shape setting, validated against the teacher). See docs/cache-format.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch

from distill import __version__
from distill.cache.schema import SCHEMA_VERSION, build_field_specs, hash_json, tokenizer_sha256
from distill.cache.store import shard_row_ranges
from distill.cache.targets import build_target_layout
from distill.config import CacheConfig, ConfigError
from distill.pipeline.teacher.model import default_attention_layers, default_hidden_layers, weights_fingerprint
from distill.pipeline.text.data import RowPlan
from distill.pipeline.text.tokens import prefix_ids
from distill.runtime import DTYPE_NAMES


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's files as ``save_pretrained`` writes them."""
    with TemporaryDirectory() as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as exc:  # tokenizers (Rust) reports a write error as "... (os error 28)", not an OSError
            raise rust_os_error(exc, tmp) or exc from None
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def build_manifest(
    cfg: CacheConfig,
    model: Any,
    tokenizer: Any,
    files: dict[str, bytes],
    data_id: dict,
    plan: RowPlan,
    layout: dict[str, Any],
    dtype: torch.dtype,
) -> dict[str, Any]:
    config_dict = {
        k: v
        for k, v in model.config.to_dict().items()
        if k
        not in (
            "transformers_version",
            "_name_or_path",
            "dtype",
            "torch_dtype",
            "_attn_implementation",
            "_experts_implementation",
        )
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "code_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {
            "name_or_path": cfg.teacher,
            "revision": cfg.revision,
            "architectures": list(getattr(model.config, "architectures", None) or []),
            "model_type": model.config.model_type,
            "config_sha256": hash_json(config_dict),
            "weights_sample_sha256": weights_fingerprint(model),
            "num_hidden_layers": model.config.num_hidden_layers,
            "hidden_size": model.config.hidden_size,
            "vocab_size": model.get_output_embeddings().weight.shape[0],
            "num_experts": getattr(model.config, "num_local_experts", getattr(model.config, "num_experts", None)),
            "dtype": DTYPE_NAMES[dtype],
        },
        "tokenizer": {
            "sha256": tokenizer_sha256(files),
            "files": sorted(files),
            "class": type(tokenizer).__name__,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "input": describe_input(tokenizer),
        "dataset": {**data_id, "empty_documents": plan.empty_documents, **describe_prompts(data_id, plan)},
        "layout": layout,
        "on_nonfinite": cfg.on_nonfinite,
    }
    manifest["fields"] = {
        n: {"dtype": f.dtype, "row_shape": list(f.row_shape)} for n, f in build_field_specs(layout).items()
    }
    return json.loads(json.dumps(manifest))  # exactly what the store will hold (tuples become lists)


def describe_prompts(data_id: dict, plan: RowPlan) -> dict[str, Any]:
    """``rollout``: who wrote a rollout file's text and how, and each row's prompt characters per document segment
    ([prompt-context note] in data.py); nothing for a dataset without prompts."""
    context = plan.row_context()
    if context is None:
        return {}
    return {"rollout": {**(data_id.get("rollout") or {}), "context_chars": context}}


def rust_os_error(exc: BaseException, path: str) -> OSError | None:
    """The OSError behind a Rust library's "... (os error N)" message, naming ``path``; None for anything else."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if isinstance(exc, OSError) or found is None:
        return exc if isinstance(exc, OSError) else None
    number = int(found.group(1))
    return OSError(number, os.strerror(number), path)


def describe_input(tokenizer: Any) -> dict[str, Any]:
    """The manifest's record of how the teacher saw each row, see [input-as-trained note] in tokens.py."""
    prefix = prefix_ids(tokenizer)
    return {
        "prefix_ids": prefix,
        "prefix_tokens": tokenizer.convert_ids_to_tokens(prefix),
        "policy": "each row starts with the tokenizer's own prefix (its BOS, if it adds one), span (0, 0), "
        "counted in seq_len, never a target and never aligned; no other special token; the row's text unchanged",
    }


def build_layout(cfg: CacheConfig, model: Any, plan: RowPlan) -> dict[str, Any]:
    """The store's shape settings; validated against the teacher."""
    num_layers, hidden = model.config.num_hidden_layers, model.config.hidden_size
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden_layers = default_hidden_layers(num_layers) if cfg.hidden_layers is None else sorted(set(cfg.hidden_layers))
    attention_layers = (
        default_attention_layers(num_layers) if cfg.attention_layers is None else sorted(set(cfg.attention_layers))
    )
    if cfg.top_k > vocab:
        raise ConfigError(f"--top-k {cfg.top_k} is larger than the teacher's vocabulary ({vocab})")
    if any(not 0 <= layer <= num_layers for layer in hidden_layers):
        raise ConfigError(f"--hidden-layers {hidden_layers}: the teacher has layers 0..{num_layers}")
    if any(not 1 <= layer <= num_layers for layer in attention_layers):
        raise ConfigError(f"--attention-layers {attention_layers}: the teacher has blocks 1..{num_layers}")
    if cfg.attention_topk > cfg.seq_len:
        raise ConfigError(f"--attention-topk {cfg.attention_topk} exceeds --seq-len {cfg.seq_len}")
    if cfg.hidden_dim is not None and cfg.hidden_dim > hidden:
        raise ConfigError(f"--hidden-dim {cfg.hidden_dim} exceeds the teacher's hidden size {hidden}")
    if len(plan) == 0:
        raise ConfigError("the dataset yields no rows (all documents empty?)")
    return {
        "seq_len": cfg.seq_len,
        "top_k": cfg.top_k,
        "targets": build_target_layout(cfg.targets, cfg.top_k, cfg.target_mass, cfg.target_samples),
        "temperatures": cfg.temperatures,
        "vocab_proj_temperature": cfg.vocab_proj_temperature,
        "hidden_layers": hidden_layers,
        "hidden_dim": cfg.hidden_dim or hidden,
        "hidden_pca": cfg.hidden_dim is not None and cfg.hidden_dim < hidden,
        "hidden_standardized": True,
        "teacher_hidden_size": hidden,
        "vocab_proj": cfg.vocab_proj,
        "attention_layers": attention_layers,
        "attention_topk": cfg.attention_topk,
        "attention_reduction": "head_mean",
        "calibration_rows": min(cfg.calibration_rows, len(plan)),
        "chunk_rows": cfg.chunk_rows,
        "num_rows": len(plan),
        "shard_rows": shard_row_ranges(len(plan), cfg.chunk_rows, cfg.num_shards),
        "row_plan_sha256": plan.digest(),
        "max_rows": cfg.max_rows,
        "padding": "right",
        "packing": cfg.packing,
    }


def text_digest(dataset: Any, text_field: str) -> str:
    """sha256 of every document's text, in order: the dataset's content identity."""
    h = hashlib.sha256()
    for start in range(0, len(dataset), 1024):
        for text in dataset[start : start + 1024][text_field]:
            b = (text or "").encode()
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()
