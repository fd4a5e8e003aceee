"""Typed configuration, one dataclass per stage.

A stage's config comes from three layers, later ones winning: the dataclass defaults, an
optional YAML/JSON file (``--config FILE``), and the flags given on the command line.
Every config validates itself in ``__post_init__`` and names the flag to change when a
value is wrong; it is saved next to the artifact it produced (the cache manifest, a run
directory).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag to change."""


@dataclass
class CacheConfig:
    """Settings of ``distill cache-teacher`` (stage 1)."""

    teacher: str = ""
    """Teacher model: a hub id or a local directory loadable with ``AutoModelForCausalLM``."""
    dataset: str = ""
    """A hub dataset id, a local dataset directory, or local .json/.jsonl/.parquet/.txt file(s), comma-separated."""
    out: str = ""
    """Where the store goes: a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``...)."""
    dataset_config: str | None = None
    """The dataset's configuration name (the second argument of ``load_dataset``)."""
    split: str = "train"
    """The dataset split to cache. A store holds one split; cache a validation split into a second store."""
    text_field: str = "text"
    """The column holding the documents' text."""
    seq_len: int = 512
    """Teacher tokens per row. Longer documents become several rows; shorter ones are padded (never packed)."""
    top_k: int = 256
    """How many teacher logits to keep per position (the rest is summarized by the full-vocabulary logsumexp)."""
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Temperatures at which the full-vocabulary logsumexp is stored; stage 2 may train at any of them."""
    vocab_proj_temperature: float = 4.0
    """Temperature T* of ``vocab_proj`` = softmax(logits / T*) @ teacher input embedding."""
    hidden_layers: list[int] | None = None
    """Teacher hidden states to store, by index in ``output_hidden_states`` (0 = embeddings, i = after block i).
    Default: 4 layers evenly spaced up to the last block. An empty list stores none."""
    hidden_dim: int | None = None
    """Reduce stored hidden states to this many dimensions with a PCA basis fitted on the calibration rows."""
    attention_layers: list[int] | None = None
    """Teacher blocks (1-based) whose head-averaged attention is stored. Default: the middle and the last block.
    An empty list stores none (and lets the teacher run its fast attention kernel)."""
    attention_topk: int = 32
    """Keys kept per query row of the stored attention maps."""
    calibration_rows: int = 64
    """Rows (the first of the dataset) used to fit the PCA basis and the hidden-state mean/std."""
    batch_size: int = 8
    """Rows per teacher forward pass."""
    chunk_rows: int = 32
    """Rows per storage chunk: the unit of writing, checksumming and resuming. Fixed when the store is created."""
    dtype: str = "auto"
    """Teacher compute dtype: auto (bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """Device for the teacher: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    max_rows: int | None = None
    """Cache only the first N rows of the dataset (after splitting documents into rows)."""
    num_shards: int = 1
    """Shards of a new store (ignored when resuming: the store's own number is used)."""
    shard: str | None = None
    """Fill only shard ``i/n`` of the store (``n`` must equal the store's number of shards). Default: all shards."""
    on_nonfinite: str = "error"
    """What to do with a row whose teacher outputs are not finite: ``error`` stops and names the row;
    ``skip`` stores the row with length 0 (so no position of it is ever used) and counts it in the shard record."""
    overwrite: bool = False
    """Replace a store at ``out`` whose manifest differs (otherwise refused). A store with the same manifest resumes."""
    trust_remote_code: bool = False
    """Allow the teacher's own modelling code from the hub."""
    revision: str | None = None
    """Teacher revision (branch, tag or commit) on the hub."""

    def __post_init__(self) -> None:
        self.temperatures = [float(t) for t in self.temperatures]
        checks = [
            (self.seq_len >= 2, "--seq-len must be at least 2 (a row needs a token and its successor)"),
            (self.top_k >= 1, "--top-k must be at least 1"),
            (len(self.temperatures) > 0, "--temperatures needs at least one temperature"),
            (all(t > 0 for t in self.temperatures), "--temperatures must all be > 0"),
            (self.vocab_proj_temperature > 0, "--vocab-proj-temperature must be > 0"),
            (self.attention_topk >= 1, "--attention-topk must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.chunk_rows >= 1, "--chunk-rows must be at least 1"),
            (self.calibration_rows >= 1, "--calibration-rows must be at least 1"),
            (self.dtype in ("auto", "fp32", "bf16", "fp16"), "--dtype must be one of auto, fp32, bf16, fp16"),
            (self.on_nonfinite in ("error", "skip"), "--on-nonfinite must be 'error' or 'skip'"),
            (self.num_shards >= 1, "--num-shards must be at least 1"),
            (self.max_rows is None or self.max_rows >= 1, "--max-rows must be at least 1"),
            (self.hidden_dim is None or self.hidden_dim >= 1, "--hidden-dim must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.shard is not None:
            parse_shard(self.shard)

    def require_io(self) -> None:
        """Check the three settings without which nothing can run."""
        for name in ("teacher", "dataset", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"i/n"`` into ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (for example 0/4), got {spec!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {spec}: need 0 <= i < n")
    return index, count


C = TypeVar("C")


def load_config(cls: type[C], path: str | Path | None, overrides: dict[str, Any]) -> C:
    """Build a ``cls`` config from defaults, an optional YAML/JSON file and non-None overrides."""
    values: dict[str, Any] = {}
    if path:
        text = Path(path).read_text()
        loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        values.update(loaded or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)
