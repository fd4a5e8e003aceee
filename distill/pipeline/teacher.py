"""Stage 1 — ``distill cache-teacher``: run the teacher once, store what stage 2 needs.

    distill cache-teacher --teacher huihui-ai/Huihui-MoE-1B-A0.6B --dataset wikitext \
        --dataset-config wikitext-103-raw-v1 --split train --out cache/wt103 --seq-len 512

Flow: load teacher + tokenizer -> load dataset -> cut documents into rows -> (new store)
calibration pass for the PCA basis and hidden-state statistics, create the store -> for each
shard this process owns, for each chunk not yet committed: teacher forward in batches,
compute the fields, hand the chunk to a background writer (which writes and commits it while
the next chunk runs through the teacher).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill import __version__
from distill.cache.schema import SCHEMA_VERSION, attention_id_dtype, build_field_specs, hash_json
from distill.cache.store import (
    ShardWriter,
    check_compatible,
    create_store,
    load_manifest,
    open_root,
    open_shard_writer,
    shard_records,
    shard_row_ranges,
    store_exists,
)
from distill.config import CacheConfig, ConfigError, parse_shard
from distill.pipeline.data import Row, RowBuilder, RowPlan, dataset_identity, load_text_dataset, plan_rows

LOGIT_CHUNK = 256  # positions per lm_head/softmax slice: bounds the (P, vocab) fp32 buffer


class NonFiniteTeacherOutput(RuntimeError):
    """The teacher produced inf/nan for a row (typically fp16 overflow)."""


# --- devices, dtypes, loading -------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs that have it, fp16 on older GPUs (P100, T4), fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_teacher_source(teacher: str) -> None:
    """A path-like teacher that does not exist gets a one-line error before transformers' long one."""
    looks_local = teacher.startswith((".", "/", "~")) or Path(teacher).expanduser().exists() or teacher.count("/") > 1
    if looks_local and not Path(teacher).expanduser().is_dir():
        raise ConfigError(f"--teacher {teacher}: no such directory")


def load_teacher(cfg: CacheConfig, device: torch.device, dtype: torch.dtype, need_attention: bool) -> Any:
    """The teacher in eval mode. Eager attention only when attention maps are stored."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    if need_attention:
        kwargs["attn_implementation"] = "eager"  # sdpa returns no attention weights
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.teacher, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher {cfg.teacher}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if device.type == "cpu" and getattr(model.config, "_experts_implementation", None) == "batched_mm":
        model.set_experts_implementation("grouped_mm")  # batched_mm is ~100x slower on CPU
    return model.to(device).eval()


def load_teacher_tokenizer(cfg: CacheConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher {cfg.teacher}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"--teacher {cfg.teacher}: a fast tokenizer is needed (character offsets)")
    return tok


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer's files as ``save_pretrained`` writes them."""
    with TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def default_hidden_layers(num_layers: int) -> list[int]:
    """Four layers evenly spaced, ending at the last block."""
    return sorted({round(num_layers * (i + 1) / 4) for i in range(4)} - {0})


def default_attention_layers(num_layers: int) -> list[int]:
    return sorted({max(1, num_layers // 2), num_layers})


def weights_fingerprint(model: Any) -> str:
    """sha256 of a sample of the weights: tells two checkpoints with the same config apart."""
    h = hashlib.sha256()
    for name, param in sorted(model.state_dict().items())[:: max(1, len(model.state_dict()) // 16)]:
        h.update(name.encode())
        h.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


# --- the fields of a batch ----------------------------------------------------------------


@dataclass
class FieldSettings:
    """What to compute per row; built from the config and the teacher's shape."""

    seq_len: int
    top_k: int
    temperatures: list[float]
    vocab_proj_temperature: float
    hidden_layers: list[int]
    attention_layers: list[int]
    attention_topk: int
    pca: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean (H,), components (H, D))


def forward_teacher(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, need_attention: bool) -> Any:
    """Base-model forward (no logits: those are computed in slices by ``compute_logit_fields``)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        output_attentions=need_attention,
        use_cache=False,
    )


def compute_logit_fields(
    model: Any, final_hidden: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor, s: FieldSettings
) -> dict[str, torch.Tensor]:
    """Top-K logits, per-temperature logsumexp, target log-prob and vocab_proj, position slice by position slice.

    final_hidden (B, L, H) -> topk (B, L, K), lse (B, L, nT), target_logprob (B, L), vocab_proj (B, L, H).
    All softmax arithmetic in fp32.
    """
    b, length, h = final_hidden.shape
    lm_head = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight.float()  # (V, H), fp32 once per batch
    flat = final_hidden.reshape(-1, h)
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1).reshape(-1)
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in ("topk_logits", "topk_ids", "lse", "target", "proj")}
    for start in range(0, flat.shape[0], LOGIT_CHUNK):
        logits = lm_head(flat[start : start + LOGIT_CHUNK]).float()  # (P, V)
        values, ids = logits.topk(s.top_k, dim=-1)
        outs["topk_logits"].append(values)
        outs["topk_ids"].append(ids)
        outs["lse"].append(torch.stack([torch.logsumexp(logits / t, dim=-1) for t in s.temperatures], dim=-1))
        nxt = next_ids[start : start + LOGIT_CHUNK]
        outs["target"].append(logits.gather(1, nxt[:, None])[:, 0] - torch.logsumexp(logits, dim=-1))
        probs = torch.softmax(logits / s.vocab_proj_temperature, dim=-1)
        outs["proj"].append(probs @ embedding)
    cat = {k: torch.cat(v).reshape(b, length, -1) for k, v in outs.items()}
    positions = torch.arange(length, device=input_ids.device)[None, :]
    has_next = positions < (lengths[:, None] - 1)
    target = torch.where(has_next, cat["target"][..., 0], torch.full_like(cat["target"][..., 0], float("nan")))
    return {
        "topk_logits": cat["topk_logits"],
        "topk_ids": cat["topk_ids"],
        "lse": cat["lse"],
        "target_logprob": target,
        "vocab_proj": cat["proj"],
    }


def reduce_hidden(hidden: torch.Tensor, layer: int, s: FieldSettings) -> torch.Tensor:
    """(B, L, H) -> (B, L, D): projected on the layer's PCA basis when one was fitted."""
    hidden = hidden.float()
    if layer in s.pca:
        mean, components = s.pca[layer]
        return (hidden - mean) @ components
    return hidden


def attention_topk(attn: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, L, L) eager attention -> head-averaged top-k per query row: values, key positions (B, L, k)."""
    averaged = attn.float().mean(dim=1)
    values, ids = averaged.topk(k, dim=-1)
    # A query at position t has only t+1 keys: the slots past them hold weight 0. Give them id 0 so
    # that the stored ids never point at padding and are deterministic (a slot is used iff value > 0).
    ids = torch.where(values > 0, ids, torch.zeros_like(ids))
    return values, ids


def compute_batch_fields(
    model: Any, rows: list[Row], s: FieldSettings, device: torch.device
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every stored field of ``rows`` as numpy arrays padded to seq_len; plus the rows that were not finite."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    ids, mask = ids.to(device), mask.to(device)
    lengths = mask.sum(dim=1)
    with torch.inference_mode():
        out = forward_teacher(model, ids, mask, bool(s.attention_layers))
        fields = compute_logit_fields(model, out.last_hidden_state, ids, lengths, s)
        for layer in s.hidden_layers:
            fields[f"hidden/{layer}"] = reduce_hidden(out.hidden_states[layer], layer, s)
        for layer in s.attention_layers:
            fields[f"attn/{layer}"], fields[f"attn_ids/{layer}"] = attention_topk(
                out.attentions[layer - 1], s.attention_topk
            )
    valid = mask.bool()
    bad = find_nonfinite_rows(fields, valid)
    return pad_fields(fields, rows, valid, s), bad


def find_nonfinite_rows(fields: dict[str, torch.Tensor], valid: torch.Tensor) -> list[int]:
    """Rows with a non-finite value at a valid position in any float field (target_logprob's NaN marks excepted)."""
    bad = torch.zeros(valid.shape[0], dtype=torch.bool, device=valid.device)
    for name, value in fields.items():
        if name == "target_logprob" or not value.is_floating_point():
            continue
        stored = (
            value.half() if name in ("topk_logits", "vocab_proj") or name.startswith(("hidden/", "attn/")) else value
        )
        finite = torch.isfinite(stored).reshape(*valid.shape, -1).all(dim=-1)
        bad |= (~finite & valid).any(dim=1)
    return torch.nonzero(bad).flatten().tolist()


STORAGE_DTYPES = {
    "topk_logits": np.float16,
    "vocab_proj": np.float16,
    "lse": np.float32,
    "target_logprob": np.float32,
    "topk_ids": np.int32,
}


def pad_fields(
    fields: dict[str, torch.Tensor], rows: list[Row], valid: torch.Tensor, s: FieldSettings
) -> dict[str, np.ndarray]:
    """Zero padding positions, pad to seq_len, cast to storage dtypes; add ids, offsets, text."""
    n, width = valid.shape
    out: dict[str, Any] = {}
    for name, value in fields.items():
        pad_value = float("nan") if name == "target_logprob" else 0
        value = torch.where(
            valid.reshape(n, width, *([1] * (value.dim() - 2))), value, torch.full_like(value, pad_value)
        )
        value = F.pad(value, (0, 0) * (value.dim() - 2) + (0, s.seq_len - width), value=pad_value)
        dtype = STORAGE_DTYPES.get(name)
        if dtype is None:
            dtype = np.dtype(attention_id_dtype(s.seq_len)) if name.startswith("attn_ids/") else np.float16
        out[name] = value.cpu().numpy().astype(dtype)
    out["input_ids"] = np.zeros((n, s.seq_len), dtype=np.int32)
    out["offsets"] = np.zeros((n, s.seq_len, 2), dtype=np.int32)
    for i, r in enumerate(rows):
        out["input_ids"][i, : len(r.input_ids)] = r.input_ids
        out["offsets"][i, : len(r.input_ids)] = r.offsets
    out["length"] = np.array([len(r.input_ids) for r in rows], dtype=np.int32)
    out["row_id"] = np.array([r.row_id for r in rows], dtype=np.int64)
    out["doc_id"] = np.array([r.doc_id for r in rows], dtype=np.int64)
    out["text"] = np.array([r.text for r in rows], dtype=object)
    return out


def blank_rows(chunk: dict[str, np.ndarray], bad: list[int]) -> None:
    """[skip note] A non-finite row is kept in place (shapes are pre-sized) with length 0 and no data."""
    for name, value in chunk.items():
        if name in ("row_id", "doc_id", "text"):
            continue
        value[bad] = np.nan if name == "target_logprob" else 0


# --- calibration: PCA basis and hidden-state statistics -----------------------------------


def calibrate(
    model: Any,
    rows: list[Row],
    hidden_layers: list[int],
    hidden_dim: int | None,
    batch_size: int,
    device: torch.device,
    max_positions: int = 65536,
) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], dict[str, np.ndarray]]:
    """Fit each hidden layer's PCA basis (if ``hidden_dim``) and per-dimension mean/std of what is stored."""
    samples: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
            mask[i, : len(r.input_ids)] = 1
        with torch.inference_mode():
            out = forward_teacher(model, ids.to(device), mask.to(device), False)
        valid = mask.bool().to(device)
        for layer in hidden_layers:
            samples[layer].append(out.hidden_states[layer][valid].float().cpu())
    pca: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    arrays: dict[str, np.ndarray] = {}
    for layer in hidden_layers:
        x = torch.cat(samples[layer])[:max_positions]  # (N, H)
        if hidden_dim is not None and hidden_dim < x.shape[1]:
            mean = x.mean(dim=0)
            _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
            components = vh[:hidden_dim].T.contiguous()  # (H, D)
            pca[layer] = (mean, components)
            arrays[f"pca/hidden/{layer}/mean"] = mean.numpy()
            arrays[f"pca/hidden/{layer}/components"] = components.numpy()
            x = (x - mean) @ components
        stored = x.half().float()  # statistics of what stage 2 will read
        arrays[f"stats/hidden/{layer}/mean"] = stored.mean(dim=0).numpy()
        arrays[f"stats/hidden/{layer}/std"] = stored.std(dim=0).clamp_min(1e-6).numpy()
    return pca, arrays


def load_pca(root: Any, hidden_layers: list[int], device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    pca = {}
    for layer in hidden_layers:
        key = f"pca/hidden/{layer}"
        if key in root:
            pca[layer] = (
                torch.from_numpy(np.asarray(root[f"{key}/mean"][:])).to(device),
                torch.from_numpy(np.asarray(root[f"{key}/components"][:])).to(device),
            )
    return pca


# --- background writer --------------------------------------------------------------------


class BackgroundWriter:
    """Writes and commits chunks on a thread, so storage overlaps the next teacher forward."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            writer, chunk, arrays, tokens, bad = item
            try:
                if self._error is None:
                    writer.write_chunk(chunk, arrays, tokens, bad)
            except BaseException as exc:  # re-raised in the main thread
                self._error = exc

    def submit(self, writer: ShardWriter, chunk: int, arrays: dict, tokens: int, bad: list[int]) -> None:
        self.raise_error()
        self._queue.put((writer, chunk, arrays, tokens, bad))

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_error()


# --- the stage ----------------------------------------------------------------------------


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
            "sha256": hashlib.sha256(b"".join(n.encode() + files[n] for n in sorted(files))).hexdigest(),
            "files": sorted(files),
            "class": type(tokenizer).__name__,
            "pad_token_id": tokenizer.pad_token_id,
        },
        "dataset": {**data_id, "empty_documents": plan.empty_documents},
        "layout": layout,
        "on_nonfinite": cfg.on_nonfinite,
    }
    manifest["fields"] = {
        n: {"dtype": f.dtype, "row_shape": list(f.row_shape)} for n, f in build_field_specs(layout).items()
    }
    return json.loads(json.dumps(manifest))  # exactly what the store will hold (tuples become lists)


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
        "temperatures": cfg.temperatures,
        "vocab_proj_temperature": cfg.vocab_proj_temperature,
        "hidden_layers": hidden_layers,
        "hidden_dim": cfg.hidden_dim or hidden,
        "hidden_pca": cfg.hidden_dim is not None and cfg.hidden_dim < hidden,
        "teacher_hidden_size": hidden,
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
        "packing": "none",
    }


def text_digest(dataset: Any, text_field: str) -> str:
    """sha256 of every document's text, in order: the dataset's content identity."""
    h = hashlib.sha256()
    for start in range(0, len(dataset), 1024):
        for text in dataset[start : start + 1024][text_field]:
            b = (text or "").encode()
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


def shards_to_fill(cfg: CacheConfig, num_shards: int) -> list[int]:
    if cfg.shard is None:
        return list(range(num_shards))
    index, count = parse_shard(cfg.shard)
    if count != num_shards:
        raise ConfigError(f"--shard {cfg.shard}: the store has {num_shards} shards (use i/{num_shards})")
    return [index]


def prepare_store(
    cfg: CacheConfig,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    plan: RowPlan,
    dtype: torch.dtype,
    device: torch.device,
    builder: RowBuilder,
) -> tuple[Any, dict[str, Any]]:
    """Open the store to resume it, or create it (after the calibration pass)."""
    files = tokenizer_files(tokenizer)
    data_id = dataset_identity(dataset, cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    data_id["text_sha256"] = text_digest(dataset, cfg.text_field)
    num_shards = cfg.num_shards
    if store_exists(cfg.out) and not cfg.overwrite:
        existing = load_manifest(open_root(cfg.out), cfg.out)
        num_shards = len(existing["layout"]["shard_rows"])
    layout = build_layout(CacheConfig(**{**cfg.__dict__, "num_shards": num_shards}), model, plan)
    wanted = build_manifest(cfg, model, tokenizer, files, data_id, plan, layout, dtype)
    if store_exists(cfg.out) and not cfg.overwrite:
        check_compatible(existing, wanted, cfg.out)
        return open_root(cfg.out, mode="a"), existing
    rows = [builder.row(i) for i in range(layout["calibration_rows"])]
    _, root_arrays = calibrate(model, rows, layout["hidden_layers"], cfg.hidden_dim, cfg.batch_size, device)
    create_store(cfg.out, wanted, files, root_arrays)
    return open_root(cfg.out, mode="a"), wanted


def iter_chunk_batches(builder: RowBuilder, start: int, end: int, batch_size: int) -> Iterator[list[Row]]:
    for a in range(start, end, batch_size):
        yield [builder.row(i) for i in range(a, min(a + batch_size, end))]


def run(cfg: CacheConfig) -> dict[str, Any]:
    """Fill the store at ``cfg.out`` (creating or resuming it). Returns a summary of the work done."""
    cfg.require_io()
    check_teacher_source(cfg.teacher)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_teacher_tokenizer(cfg)
    dataset = load_text_dataset(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    need_attention = cfg.attention_layers is None or len(cfg.attention_layers) > 0
    model = load_teacher(cfg, device, dtype, need_attention)
    plan = plan_rows(dataset, cfg.text_field, tokenizer, cfg.seq_len).truncated(cfg.max_rows)
    builder = RowBuilder(dataset, cfg.text_field, tokenizer, plan)
    root, manifest = prepare_store(cfg, model, tokenizer, dataset, plan, dtype, device, builder)
    layout = manifest["layout"]
    settings = FieldSettings(
        seq_len=layout["seq_len"],
        top_k=layout["top_k"],
        temperatures=layout["temperatures"],
        vocab_proj_temperature=layout["vocab_proj_temperature"],
        hidden_layers=layout["hidden_layers"],
        attention_layers=layout["attention_layers"],
        attention_topk=layout["attention_topk"],
        pca=load_pca(root, layout["hidden_layers"], device),
    )
    records = shard_records(root, manifest)
    todo = []  # (writer, chunk index, global start, global end)
    for index in shards_to_fill(cfg, len(records)):
        rec = records[index]
        writer = open_shard_writer(root, index)
        for chunk in range(len(rec["checksums"]), rec["num_chunks"]):
            start = rec["row_start"] + chunk * layout["chunk_rows"]
            todo.append((writer, chunk, start, min(start + layout["chunk_rows"], rec["row_end"])))
    total_tokens = int(sum((plan.token_end[a:b] - plan.token_start[a:b]).sum() for _, _, a, b in todo))
    summary = {
        "rows": sum(b - a for *_, a, b in todo),
        "tokens": total_tokens,
        "nonfinite_rows": [],
        "skipped_chunks": sum(len(r["checksums"]) for r in records),
    }
    started = time.perf_counter()
    writer_thread = BackgroundWriter()
    bar = tqdm(
        total=total_tokens,
        unit="tok",
        unit_scale=True,
        desc="cache-teacher",
        dynamic_ncols=True,
        disable=total_tokens == 0,
    )
    try:
        for writer, chunk, start, end in todo:
            parts, bad_rows = [], []
            for batch in iter_chunk_batches(builder, start, end, cfg.batch_size):
                fields, bad = compute_batch_fields(model, batch, settings, device)
                bad_rows += [batch[i].row_id for i in bad]
                parts.append(fields)
                bar.update(sum(len(r.input_ids) for r in batch))
            arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            if bad_rows and cfg.on_nonfinite == "error":
                raise NonFiniteTeacherOutput(
                    f"teacher output is not finite for row {bad_rows[0]} (document "
                    f"{int(plan.doc_index[bad_rows[0]])}) in {DTYPE_NAMES[dtype]}; run the teacher in "
                    "--dtype bf16 or fp32, or pass --on-nonfinite skip to store such rows empty and count them"
                )
            if bad_rows:
                blank_rows(arrays, [r - start for r in bad_rows])
                summary["nonfinite_rows"] += bad_rows
            tokens = int(arrays["length"].sum())
            writer_thread.submit(writer, chunk, arrays, tokens, bad_rows)
    finally:
        bar.close()
        writer_thread.close()
    summary["seconds"] = time.perf_counter() - started
    summary["tokens_per_s"] = summary["tokens"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return summary


__all__ = ["run", "compute_batch_fields", "FieldSettings", "load_teacher", "resolve_dtype"]
