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

import functools
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
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
    CLAIM_TIMEOUT_ENV,
    ShardBusy,
    ShardClaim,
    ShardWriter,
    check_compatible,
    claim_creation,
    claim_shard,
    create_store,
    create_timeout,
    delete_store,
    describe_holder,
    find_manifest,
    load_manifest,
    open_root,
    open_shard_writer,
    release_creation,
    shard_records,
    shard_row_ranges,
    store_state,
    wait_for_creation,
)
from distill.cache.targets import ID_BY_RANK, build_target_layout, target_kind
from distill.config import CacheConfig, ConfigError, parse_shard
from distill.pipeline.data import Row, RowBuilder, RowPlan, dataset_identity, load_text_dataset, plan_rows
from distill.pipeline.target_fields import TARGET_FIELDS, calibrate_targets, compute_target_slice
from distill.pipeline.tokens import check_tokenizer, prefix_ids

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
    """The teacher in eval mode, with its fast attention; see [selective-attention note] when maps are stored."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.teacher, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher {cfg.teacher}: cannot load the model ({str(exc).splitlines()[0]})") from None
    if need_attention:
        use_selective_attention(model)
    if device.type == "cpu" and getattr(model.config, "_experts_implementation", None) == "batched_mm":
        model.set_experts_implementation("grouped_mm")  # batched_mm is ~100x slower on CPU
    model = model.to(device).eval()
    check_teacher_logits(model, cfg.teacher)
    return model


# [logit-postprocess note] Stage 1 applies the teacher's lm_head itself, in position slices (see [logit-pass
# note]), instead of calling the model's forward. Some families transform the logits after the head, from a
# config attribute: Gemma 2/3/3n/4 cap them (tanh(z / c) * c, `final_logit_softcapping`), Cohere scales them
# (`logit_scale`), Granite and MiniCPM3 divide them (`logits_scaling`; HyperCLOVA X multiplies by it),
# Falcon-H1 multiplies them (`lm_head_multiplier`). The same transform is applied here to every logits slice,
# before top-K and softmax, so the store holds the model's own output logits. A head that is not a linear map,
# or a config attribute that looks like a logit transform and is not in the table, is refused; and at load
# time the teacher's own forward on a few tokens is compared with this path (`check_teacher_logits`), which
# catches a transform no attribute names.


def scale_logits(logits: torch.Tensor, factor: float) -> None:
    logits.mul_(factor)


def divide_logits(logits: torch.Tensor, divisor: float) -> None:
    logits.div_(divisor)


def softcap_logits(logits: torch.Tensor, cap: float) -> None:
    logits.div_(cap).tanh_().mul_(cap)


# config attribute -> in-place transform of a (P, V) fp32 logits slice, in the order applied (caps last)
LOGIT_TRANSFORMS: dict[str, Callable[[torch.Tensor, float], None]] = {
    "logit_scale": scale_logits,
    "lm_head_multiplier": scale_logits,
    "logits_scaling": divide_logits,
    "final_logit_softcapping": softcap_logits,
}
MODEL_TYPE_TRANSFORMS = {("hyperclovax", "logits_scaling"): scale_logits}
# config attributes that name logits but do not transform the output ones
NOT_LOGIT_TRANSFORMS = {
    "attn_logit_softcapping",
    "output_router_logits",
    "num_logits_to_keep",
    "output_auxiliary_logits",
    "router_logit_softcapping",
}
LOOKS_LIKE_LOGIT_TRANSFORM = re.compile(r"logit|lm_head|output_multiplier")


def find_logit_transforms(model: Any) -> list[tuple[str, float, Callable[[torch.Tensor, float], None]]]:
    """The teacher's post-head logit transforms as (config attribute, value, in-place function), see
    [logit-postprocess note]; raises ConfigError for a head or an attribute this code does not reproduce."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, torch.nn.Linear):
        raise ConfigError(
            f"the teacher's output head is a {type(lm_head).__name__}, not a linear map: stage 1 cannot reproduce "
            "its logits"
        )
    transforms = []
    for name, value in config.to_dict().items():
        if value is None or value is False or name in NOT_LOGIT_TRANSFORMS or name in LOGIT_TRANSFORMS:
            continue
        if LOOKS_LIKE_LOGIT_TRANSFORM.search(name):
            raise ConfigError(
                f"the teacher's config sets {name}={value!r}, an output-logit setting stage 1 does not know: "
                "its cached logits would not be the model's"
            )
    for name, fn in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None:
            transforms.append((name, float(value), MODEL_TYPE_TRANSFORMS.get((config.model_type, name), fn)))
    return transforms


def check_teacher_logits(model: Any, teacher: str, num_tokens: int = 16) -> None:
    """Refuse a teacher whose own forward disagrees with stage 1's head + transforms on a few tokens."""
    vocab = model.get_output_embeddings().weight.shape[0]
    device = model.get_output_embeddings().weight.device
    ids = torch.randint(vocab, (1, num_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        own = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[0].float()  # (n, V)
        hidden = forward_teacher(model, ids, mask, False).last_hidden_state[0]
        ours = compute_logits(model, hidden, find_logit_transforms(model))
    finite = torch.isfinite(own) & torch.isfinite(ours)
    error = (own - ours).abs().where(finite, 0.0).max().item()
    tolerance = (1e-4 if model.get_output_embeddings().weight.dtype == torch.float32 else 3e-2) * (
        1.0 + own.abs().where(finite, 0.0).max().item()
    )
    if error > tolerance or not torch.equal(torch.isfinite(own), torch.isfinite(ours)):
        raise ConfigError(
            f"--teacher {teacher}: its output logits differ from lm_head(last hidden state) by {error:.3g} "
            "after the known transforms (see [logit-postprocess note] in teacher.py); stage 1 would cache "
            "logits the model never outputs"
        )


def compute_logits(model: Any, hidden: torch.Tensor, transforms: list, out: torch.Tensor | None = None) -> torch.Tensor:
    """(P, H) last hidden states -> (P, V) fp32 output logits, as the model's forward returns them."""
    lm_head = model.get_output_embeddings()
    logits = torch.empty(hidden.shape[0], lm_head.weight.shape[0], device=hidden.device) if out is None else out
    if lm_head.bias is None and lm_head.weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        torch.mm(hidden, lm_head.weight.t(), out=logits)
    else:
        logits.copy_(lm_head(hidden))
    for _, value, fn in transforms:
        fn(logits, value)
    return logits


# [selective-attention note] sdpa returns no attention weights, and an all-eager teacher materializes
# (B, heads, L, L) weights in every block and keeps them all in its output (24 blocks x 8 rows x 16 heads
# x 512^2 fp32 = 3 GB for the reference teacher), while the store keeps two blocks' head average. The
# teacher therefore runs the `distill_selective` attention: sdpa in every block, except the blocks
# `forward_teacher` flags, which compute eager weights and return their head average (B, 1, L, L) fp32.
# Its masks are sdpa's (boolean, or None for a plain causal batch). A model whose attention cannot be
# switched at run time (remote code outside transformers' AttentionInterface) falls back to eager.
SELECTIVE_ATTENTION = "distill_selective"
_FLAG = "_distill_keep_attention"


def selective_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """query (B, Hq, Lq, d), key/value (B, Hkv, Lk, d) -> output (B, Lq, Hq, d), head-mean weights or None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("output_attentions", None)
    softcap = kwargs.pop("softcap", None)  # Gemma 2's attention logit cap, which sdpa cannot apply
    keep_weights = getattr(module, _FLAG, False)
    if not keep_weights and softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, Hq, Lq, Lk)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    lq, lk = scores.shape[-2:]
    if attention_mask is None:  # sdpa's mask builder skips plain causal batches
        keep = torch.ones(lq, lk, dtype=torch.bool, device=scores.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, weights.mean(dim=1, keepdim=True) if keep_weights else None


def use_selective_attention(model: Any) -> None:
    """Switch ``model`` to the selective attention (registered once), or to eager where that is impossible."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention_forward)
    AttentionMaskInterface.register(SELECTIVE_ATTENTION, sdpa_mask)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    blocks = getattr(base, "layers", None)
    if blocks is not None and all(hasattr(block, "self_attn") for block in blocks):
        with_logging_quiet(model.set_attn_implementation, SELECTIVE_ATTENTION)
    if model.config._attn_implementation != SELECTIVE_ATTENTION:
        model.set_attn_implementation("eager")


def with_logging_quiet(fn: Any, *args: Any) -> None:
    """Call ``fn``; a model that cannot switch its attention only logs a warning, checked by the caller."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        fn(*args)
    except (ValueError, KeyError):
        pass
    finally:
        logging.set_verbosity(level)


def load_teacher_tokenizer(cfg: CacheConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--teacher {cfg.teacher}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"--teacher {cfg.teacher}: a fast tokenizer is needed (character offsets)")
    check_tokenizer(tok)  # refuses, before the model loads, a tokenizer that cannot reproduce its text
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


def stored_logit_fields(s: FieldSettings) -> list[str]:
    """The logit fields a store with these settings holds (the target fields depend on ``--targets``)."""
    if s.targets is None:
        names = ["topk_logits", "topk_ids", "lse", "target_logprob", "vocab_proj"]
    else:
        names = ["lse", "target_logprob", "vocab_proj", *TARGET_FIELDS[: 4 if s.targets["kind"] == "topk" else 5]]
    return [name for name in names if name != "vocab_proj" or s.vocab_proj]


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
    pca: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean (H,), components (H, D)) of standardized
    vocab_proj: bool = True  # compute vocab_proj (stored only with --vocab-proj)
    targets: dict[str, Any] | None = None  # layout.targets of the compact kinds; None = topk-fp16
    rank_of_id: torch.Tensor | None = None  # (V,) int64 the teacher's unigram rank of each id (compact kinds)
    standardize: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> (mean, std) (H,)


def forward_teacher(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    need_attention: bool,
    attention_layers: list[int] | None = None,
) -> Any:
    """Base-model forward (no logits: those are computed in slices by ``compute_logit_fields``).

    With ``need_attention``, ``out.attentions[l - 1]`` holds block l's attention for each l in
    ``attention_layers`` (default: every block): its head average (B, 1, L, L) under the selective
    attention, all heads (B, heads, L, L) under eager; the other blocks' entries may be None.
    """
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    blocks = getattr(base, "layers", None)
    wanted: list[int] = []
    if need_attention and blocks is not None:
        wanted = sorted(set(range(1, len(blocks) + 1) if attention_layers is None else attention_layers))
    flagged = [module for layer in wanted if (module := getattr(blocks[layer - 1], "self_attn", None)) is not None]
    for module in flagged:
        setattr(module, _FLAG, True)
    try:
        out = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            output_attentions=need_attention,
            use_cache=False,
        )
    finally:
        for module in flagged:
            setattr(module, _FLAG, False)
    if wanted and len(out.attentions) == len(wanted) < len(blocks):  # only the flagged blocks reported weights
        by_layer = dict(zip(wanted, out.attentions))
        out.attentions = tuple(by_layer.get(layer) for layer in range(1, len(blocks) + 1))
    return out


LOGIT_FIELDS = ("topk_logits", "topk_ids", "lse", "target_logprob", "vocab_proj", *TARGET_FIELDS)


def compute_logit_fields(
    model: Any,
    final_hidden: torch.Tensor,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    s: FieldSettings,
    fields: Collection[str] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Top-K logits, per-temperature logsumexp, target log-prob and vocab_proj, position slice by position slice.

    final_hidden (B, L, H) -> topk (B, L, K), lse (B, L, nT), target_logprob (B, L), vocab_proj (B, L, H);
    only the ``fields`` asked (a subset of LOGIT_FIELDS; default all). Softmax arithmetic in fp32.

    [logit-pass note] Past the lm_head, the vocabulary-wide passes are the cost, so each slice makes as
    few as it can: one top-K (its first value is the row max), then one softmax per temperature needed,
    which gives the logsumexp exactly (to fp32 rounding): lse_T = max / T - log p_T[argmax], since
    p_T[argmax] = 1 / sum_v exp((z_v - max) / T); target_logprob reuses T = 1 and vocab_proj reuses the
    probabilities at T*; the compact targets (``target_*``, pipeline/target_fields.py) reuse the top-K and T = 1
    (their draws come from a generator seeded with ``seed``, so a recomputed chunk is the same). The (P, V)
    buffers are allocated once per call and written with out= (on CPU a fresh 150 MB tensor costs more in
    page faults than the softmax over it). vocab_proj multiplies in the teacher's dtype when it is bf16, like
    its lm_head: on a bf16 GPU an fp32 (P, V) @ (V, H) product is many times slower than the lm_head itself,
    and its bf16 rounding is the teacher's own.
    """
    want = set(LOGIT_FIELDS if fields is None else fields)
    b, length, h = final_hidden.shape
    lm_head = model.get_output_embeddings()
    embedding = model.get_input_embeddings().weight  # (V, H)
    proj_dtype = torch.bfloat16 if embedding.dtype == torch.bfloat16 else torch.float32
    embedding = embedding.to(proj_dtype)
    flat = final_hidden.reshape(-1, h)
    n, device, vocab = flat.shape[0], flat.device, lm_head.weight.shape[0]
    next_ids = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1).reshape(-1)
    temps = list(s.temperatures) if "lse" in want else []
    if "target_logprob" in want and 1.0 not in temps:
        temps.append(1.0)
    if "vocab_proj" in want and s.vocab_proj_temperature not in temps:
        temps.append(s.vocab_proj_temperature)
    targets = s.targets if want & set(TARGET_FIELDS) else None
    if targets is not None and 1.0 not in temps:
        temps.append(1.0)
    head = targets is not None and targets["kind"] != "sampled"
    k = s.top_k if want & {"topk_logits", "topk_ids"} or head else 1
    target_parts: list[dict[str, torch.Tensor]] = []
    generator = torch.Generator(device=device).manual_seed(seed) if targets is not None else None
    topk_logits = torch.empty(n, k, device=device)
    topk_ids = torch.empty(n, k, dtype=torch.long, device=device)
    lse = torch.empty(n, len(temps), device=device)
    target = torch.empty(n, device=device)
    proj = torch.empty(n, h, device=device) if "vocab_proj" in want else None
    chunk = min(LOGIT_CHUNK, n)
    logits_buf = torch.empty(chunk, vocab, device=device)  # (P, V) fp32, reused by every slice
    scaled_buf = torch.empty_like(logits_buf) if any(t != 1.0 for t in temps) else None
    probs_buf = torch.empty_like(logits_buf) if temps else None
    transforms = find_logit_transforms(model)
    for start in range(0, n, chunk):
        x = flat[start : start + chunk]
        p, rows = x.shape[0], slice(start, start + x.shape[0])
        logits = compute_logits(model, x, transforms, out=logits_buf[:p])  # see [logit-postprocess note]
        torch.topk(logits, k, dim=-1, out=(topk_logits[rows], topk_ids[rows]))  # descending
        argmax = topk_ids[rows, :1]
        for j, t in enumerate(temps):
            scaled = logits if t == 1.0 else torch.mul(logits, 1.0 / t, out=scaled_buf[:p])
            probs = torch.softmax(scaled, dim=-1, out=probs_buf[:p])
            lse[rows, j] = scaled.gather(1, argmax)[:, 0] - probs.gather(1, argmax)[:, 0].log()
            if t == 1.0 and "target_logprob" in want:
                target[rows] = logits.gather(1, next_ids[rows, None])[:, 0] - lse[rows, j]
            if t == s.vocab_proj_temperature and proj is not None:
                proj[rows] = probs.to(proj_dtype) @ embedding
            if t == 1.0 and targets is not None:
                top = (topk_logits[rows], topk_ids[rows])
                target_parts.append(
                    compute_target_slice(logits, probs, lse[rows, j], *top, targets, s.rank_of_id, generator)
                )
    out: dict[str, torch.Tensor] = {}
    if "topk_logits" in want:
        out["topk_logits"] = topk_logits.reshape(b, length, k)
    if "topk_ids" in want:
        out["topk_ids"] = topk_ids.reshape(b, length, k)
    if "lse" in want:
        out["lse"] = lse[:, : len(s.temperatures)].reshape(b, length, -1)
    if "target_logprob" in want:
        positions = torch.arange(length, device=input_ids.device)[None, :]
        has_next = positions < (lengths[:, None] - 1)
        out["target_logprob"] = torch.where(has_next, target.reshape(b, length), float("nan"))
    if proj is not None:
        out["vocab_proj"] = proj.reshape(b, length, h)
    for name in target_parts[0] if target_parts else ():
        if name in want:
            value = torch.cat([part[name] for part in target_parts])
            out[name] = value.reshape(b, length, *value.shape[1:])
    return out


FP16_MAX = 65504.0


def reduce_hidden(hidden: torch.Tensor, layer: int, s: FieldSettings) -> torch.Tensor:
    """(B, L, H) -> (B, L, D) as stored: standardized per dimension, then projected on the PCA basis if one was
    fitted, then bounded to the fp16 range; see [hidden-range note]."""
    hidden = hidden.float()
    if layer in s.standardize:
        mean, std = s.standardize[layer]
        hidden = (hidden - mean) / std
    if layer in s.pca:
        mean, components = s.pca[layer]
        hidden = (hidden - mean) @ components
    return hidden.clamp(-FP16_MAX, FP16_MAX)


def attention_topk(attn: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, L, L) attention (or its head average, heads = 1) -> head-averaged top-k per query row:
    values, key positions (B, L, k)."""
    averaged = attn.float().mean(dim=1)
    # A batch of short rows has fewer keys than k: take them all, the slots past them stay empty.
    values, ids = averaged.topk(min(k, averaged.shape[-1]), dim=-1)
    values, ids = F.pad(values, (0, k - values.shape[-1])), F.pad(ids, (0, k - ids.shape[-1]))
    # A query at position t has only t+1 keys: the slots past them hold weight 0. Give them id 0 so
    # that the stored ids never point at padding and are deterministic (a slot is used iff value > 0).
    ids = torch.where(values > 0, ids, torch.zeros_like(ids))
    return values, ids


def pad_rows(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher ids (B, W) right-padded with 0 to the longest row, and the attention mask (B, W)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.from_numpy(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
    return ids, mask


def compute_batch_fields(
    model: Any, rows: list[Row], s: FieldSettings, device: torch.device, fields: Collection[str] | None = None
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every stored field of ``rows`` as numpy arrays padded to seq_len; plus the rows that were not finite.

    ``fields``: compute only these of the teacher's fields (default all; the row fields input_ids, offsets,
    length, row_id, doc_id and text always come back): the live teacher and the benchmarks skip the rest.
    """
    ids, mask = pad_rows(rows)
    ids, mask = ids.to(device), mask.to(device)
    lengths = mask.sum(dim=1)
    wanted = None if fields is None else set(fields)
    attention_layers = [layer for layer in s.attention_layers if wanted is None or f"attn/{layer}" in wanted]
    hidden_layers = [layer for layer in s.hidden_layers if wanted is None or f"hidden/{layer}" in wanted]
    stored = stored_logit_fields(s)
    logit_fields = [name for name in stored if wanted is None or name in wanted]
    computed: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        out = forward_teacher(model, ids, mask, bool(attention_layers), attention_layers)
        if logit_fields:
            seed = rows[0].row_id
            computed.update(compute_logit_fields(model, out.last_hidden_state, ids, lengths, s, logit_fields, seed))
        for layer in hidden_layers:
            computed[f"hidden/{layer}"] = reduce_hidden(out.hidden_states[layer], layer, s)
        for layer in attention_layers:
            computed[f"attn/{layer}"], computed[f"attn_ids/{layer}"] = attention_topk(
                out.attentions[layer - 1], s.attention_topk
            )
    valid = mask.bool()
    bad = find_nonfinite_rows(computed, valid)
    return pad_fields(computed, rows, valid, s), bad


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
    "target_count": np.uint16,
    "target_ids": np.uint32,
    "target_values": np.uint8,
    "target_max": np.float32,
    "target_draws": np.uint8,
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


# [hidden-range note] Real teachers have outlier dimensions: Gemma 3's residual stream passes 65,504, the
# largest fp16, in its middle layers, so raw hidden states stored as fp16 become inf. Each hidden
# layer is therefore standardized per dimension, (h - mean) / std with statistics of the calibration
# rows, before the fp16 cast (and before the PCA, so that the basis is not spent on a few huge
# dimensions). Standardized values are O(1), so fp16 keeps its 11 significant bits on every
# dimension; bf16 would avoid the overflow without the standardization but keeps only 8 bits, and
# neither numpy nor zarr has a bf16 dtype. A position far outside the calibration range is clamped to
# the fp16 range instead of becoming inf. The statistics are stored (standardize/hidden/<l>/mean|std),
# so raw states can be recovered: h = stored * std + mean (without PCA). Prefix tokens (a BOS, see
# [input-as-trained note] in tokens.py) are left out of the statistics: the BOS is an attention sink
# whose hidden state is orders of magnitude larger than any text token's, and it is never aligned.


def calibrate(
    model: Any,
    rows: list[Row],
    hidden_layers: list[int],
    hidden_dim: int | None,
    batch_size: int,
    device: torch.device,
    max_positions: int = 65536,
) -> tuple[dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]], dict[str, np.ndarray]]:
    """Fit each hidden layer's standardization and PCA basis (if ``hidden_dim``), see [hidden-range note].

    Returns the fitted maps (``{"standardize": ..., "pca": ...}``, as FieldSettings holds them) and the store-level
    arrays: standardize/hidden/<l>/mean|std (H,), pca/hidden/<l>/mean|components, and stats/hidden/<l>/mean|std:
    per-dimension statistics of what is stored, which stage 2 uses to standardize its targets.
    """
    samples: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        ids, mask = pad_rows(batch)
        with torch.inference_mode():
            out = forward_teacher(model, ids.to(device), mask.to(device), False)
        text = text_positions(batch, ids.shape[1]).to(device)
        for layer in hidden_layers:
            samples[layer].append(out.hidden_states[layer][text].float().cpu())
    arrays: dict[str, np.ndarray] = {}
    fitted: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {"standardize": {}, "pca": {}}
    for layer in hidden_layers:
        x = torch.cat(samples[layer])[:max_positions]  # (N, H)
        mean, std = x.mean(dim=0), x.std(dim=0).nan_to_num(1.0).clamp_min(1e-6)
        fitted["standardize"][layer] = (mean, std)
        arrays[f"standardize/hidden/{layer}/mean"] = mean.numpy()
        arrays[f"standardize/hidden/{layer}/std"] = std.numpy()
        x = (x - mean) / std
        if hidden_dim is not None and hidden_dim < x.shape[1]:
            center = x.mean(dim=0)
            _, _, vh = torch.linalg.svd(x - center, full_matrices=False)
            components = vh[:hidden_dim].T.contiguous()  # (H, D)
            fitted["pca"][layer] = (center, components)
            arrays[f"pca/hidden/{layer}/mean"] = center.numpy()
            arrays[f"pca/hidden/{layer}/components"] = components.numpy()
            x = (x - center) @ components
        stored = x.clamp(-FP16_MAX, FP16_MAX).half().float()  # statistics of what stage 2 will read
        arrays[f"stats/hidden/{layer}/mean"] = stored.mean(dim=0).numpy()
        arrays[f"stats/hidden/{layer}/std"] = stored.std(dim=0).nan_to_num(1.0).clamp_min(1e-6).numpy()
    return fitted, arrays


def text_positions(rows: list[Row], width: int) -> torch.Tensor:
    """(B, width) bool: the positions of text tokens, without padding and prefix tokens (span (0, 0))."""
    text = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        text[i, : len(r.input_ids)] = torch.from_numpy(np.asarray(r.offsets)[:, 1] > 0)
    return text


def field_settings(layout: dict[str, Any], root: Any, device: torch.device) -> FieldSettings:
    """What to compute per row, from a store's layout and its fitted reductions (the live teacher uses it too)."""
    return FieldSettings(
        seq_len=layout["seq_len"],
        top_k=layout["top_k"],
        temperatures=layout["temperatures"],
        vocab_proj_temperature=layout["vocab_proj_temperature"],
        hidden_layers=layout["hidden_layers"],
        attention_layers=layout["attention_layers"],
        attention_topk=layout["attention_topk"],
        pca=load_root_pairs(root, "pca", ("mean", "components"), layout["hidden_layers"], device),
        vocab_proj=layout.get("vocab_proj", True),
        standardize=load_root_pairs(root, "standardize", ("mean", "std"), layout["hidden_layers"], device),
        targets=None if target_kind(layout) == "topk-fp16" else layout["targets"],
        rank_of_id=load_rank_of_id(root, layout, device),
    )


def load_rank_of_id(root: Any, layout: dict[str, Any], device: torch.device) -> torch.Tensor | None:
    """(V,) int64 rank of each teacher id, the inverse of the store's ``targets/id_by_rank`` (compact kinds)."""
    if target_kind(layout) == "topk-fp16":
        return None
    id_by_rank = torch.from_numpy(np.asarray(root[ID_BY_RANK][:]).astype(np.int64))
    rank_of_id = torch.empty_like(id_by_rank)
    rank_of_id[id_by_rank] = torch.arange(id_by_rank.numel())
    return rank_of_id.to(device)


def load_root_pairs(
    root: Any, group: str, names: tuple[str, str], hidden_layers: list[int], device: torch.device
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (root[group/hidden/layer/names[0]], .../names[1])}`` for the layers that have them."""
    pairs = {}
    for layer in hidden_layers:
        key = f"{group}/hidden/{layer}"
        if key in root:
            pairs[layer] = tuple(torch.from_numpy(np.asarray(root[f"{key}/{name}"][:])).to(device) for name in names)
    return pairs


# --- background writer --------------------------------------------------------------------


class BackgroundWriter:
    """Runs storage jobs (write and commit a chunk, release a claim) on a thread, in order, so storage
    overlaps the next teacher forward."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                if self._error is None:
                    job()
            except BaseException as exc:  # re-raised in the main thread
                self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        self.raise_error()
        self._queue.put(job)

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.raise_error()


def commit_chunk(writer: ShardWriter, claim: ShardClaim, chunk: int, arrays: dict, tokens: int, bad: list) -> None:
    """Write and commit one chunk, then refresh the shard's claim (see [claim note] in store.py)."""
    writer.write_chunk(chunk, arrays, tokens, bad)
    claim.refresh()


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
        "input": describe_input(tokenizer),
        "dataset": {**data_id, "empty_documents": plan.empty_documents},
        "layout": layout,
        "on_nonfinite": cfg.on_nonfinite,
    }
    manifest["fields"] = {
        n: {"dtype": f.dtype, "row_shape": list(f.row_shape)} for n, f in build_field_specs(layout).items()
    }
    return json.loads(json.dumps(manifest))  # exactly what the store will hold (tuples become lists)


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


def torchrun_rank() -> tuple[int, int] | None:
    """``(rank, world_size)`` when launched by torchrun (``RANK`` and ``WORLD_SIZE`` set), else None."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        return None
    try:
        r, w = int(rank), int(world)
    except ValueError:
        raise ConfigError(f"RANK={rank!r} WORLD_SIZE={world!r}: expected integers, as torchrun sets them") from None
    if not 0 <= r < w:
        raise ConfigError(f"RANK={r} WORLD_SIZE={w}: need 0 <= RANK < WORLD_SIZE")
    return r, w


def new_store_shards(cfg: CacheConfig) -> int:
    """Shards of a new store: n of ``--shard i/n``; at least WORLD_SIZE under torchrun; else --num-shards."""
    if cfg.shard is not None:
        _, count = parse_shard(cfg.shard)
        if cfg.num_shards not in (1, count):
            raise ConfigError(
                f"--num-shards {cfg.num_shards} and --shard {cfg.shard} disagree; --shard i/n alone sets n shards"
            )
        return count
    ranks = torchrun_rank()
    return max(cfg.num_shards, ranks[1]) if ranks else cfg.num_shards


def shards_to_fill(cfg: CacheConfig, num_shards: int) -> list[int]:
    """``--shard i/n``: shard i; under torchrun: shards rank, rank + world, ...; otherwise every shard."""
    if cfg.shard is not None:
        index, count = parse_shard(cfg.shard)
        if count != num_shards:
            raise ConfigError(f"--shard {cfg.shard}: the store has {num_shards} shards (use i/{num_shards})")
        return [index]
    ranks = torchrun_rank()
    if ranks is not None:
        rank, world = ranks
        return list(range(rank, num_shards, world))
    return list(range(num_shards))


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", int(local_rank))
    return device


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
    """Open the store to resume it, or create it (after the calibration pass).

    Safe when many processes start on one fresh store at once: one claims the creation, the others
    wait for its manifest and check it against their own settings (see [creation note] in store.py).
    """
    files = tokenizer_files(tokenizer)
    data_id = dataset_identity(dataset, cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    data_id["text_sha256"] = text_digest(dataset, cfg.text_field)

    def manifest_for(num_shards: int) -> dict[str, Any]:
        layout = build_layout(CacheConfig(**{**cfg.__dict__, "num_shards": num_shards}), model, plan)
        return build_manifest(cfg, model, tokenizer, files, data_id, plan, layout, dtype)

    wanted = manifest_for(new_store_shards(cfg))  # validates the settings before anything is touched
    if cfg.overwrite:
        delete_store(cfg.out)
    while True:
        state, found = store_state(cfg.out)
        if state == "ready":
            assert found is not None
            check_compatible(found, manifest_for(len(found["layout"]["shard_rows"])), cfg.out)
            return open_root(cfg.out, mode="a"), found
        if state == "foreign":
            load_manifest(open_root(cfg.out), cfg.out)  # raises: a zarr group without a manifest
        if state == "empty" and claim_creation(cfg.out):
            if find_manifest(cfg.out) is not None:  # another process finished just before our claim
                release_creation(cfg.out)
                continue
            create_new_store(cfg, model, wanted, files, builder, device)
            return open_root(cfg.out, mode="a"), wanted
        tqdm.write(f"cache-teacher: waiting for another process to create {cfg.out}", file=sys.stderr)
        wait_for_creation(cfg.out, create_timeout())


def create_new_store(
    cfg: CacheConfig, model: Any, manifest: dict[str, Any], files: dict[str, bytes], builder: RowBuilder, device: Any
) -> None:
    """Calibrate, write the store (manifest last) and release the claim; on failure remove the partial store."""
    layout = manifest["layout"]
    tqdm.write(f"cache-teacher: creating {cfg.out} ({len(layout['shard_rows'])} shards)", file=sys.stderr)
    try:
        rows = [builder.row(i) for i in range(layout["calibration_rows"])]
        _, root_arrays = calibrate(model, rows, layout["hidden_layers"], cfg.hidden_dim, cfg.batch_size, device)
        if target_kind(layout) != "topk-fp16":  # the rank table and the fidelity figures
            rank_arrays, manifest["fidelity"] = calibrate_targets(model, rows, layout, cfg.batch_size, device)
            root_arrays.update(rank_arrays)
        create_store(cfg.out, manifest, files, root_arrays)
    except BaseException:
        delete_store(cfg.out)  # so that a waiting process can claim the creation (or fail the same way)
        raise
    release_creation(cfg.out)


def iter_chunk_batches(builder: RowBuilder, start: int, end: int, batch_size: int) -> Iterator[list[Row]]:
    for a in range(start, end, batch_size):
        yield [builder.row(i) for i in range(a, min(a + batch_size, end))]


def chunks_to_fill(record: dict[str, Any], chunk_rows: int) -> list[tuple[int, int, int]]:
    """``(chunk, global start, global end)`` of a shard's uncommitted chunks (first those --repair marked)."""
    todo = []
    for chunk in [*record.get("redo", []), *range(len(record["checksums"]), record["num_chunks"])]:
        start = record["row_start"] + chunk * chunk_rows
        todo.append((chunk, start, min(start + chunk_rows, record["row_end"])))
    return todo


def count_tokens(plan: RowPlan, todo: list[tuple[int, int, int]]) -> int:
    """Text tokens plus each row's prefix, as the rows of ``todo`` hold them."""
    per_range = ((plan.token_end[a:b] - plan.token_start[a:b]).sum() + len(plan.prefix) * (b - a) for _, a, b in todo)
    return int(sum(per_range))


def claim_or_defer(cfg: CacheConfig, index: int, deferred: set[int]) -> ShardClaim | None:
    """Claim a shard (see [claim note]); a busy one is retried once after the others, then reported.

    ``--shard i/n`` names its shard: a busy one is refused (ShardBusy propagates)."""
    try:
        claim = claim_shard(cfg.out, index)
    except ShardBusy as busy:
        if cfg.shard is not None:
            raise ShardBusy(
                f"{cfg.out}: {busy} — a second process with the same --shard {cfg.shard} is refused; "
                f"re-run when it is done (a claim from a process that is gone is taken over: same host at once, "
                f"another host after {CLAIM_TIMEOUT_ENV} seconds)",
                busy.holder,
            ) from None
        if index not in deferred:
            deferred.add(index)
            return None
        raise
    if claim.replaced is not None:
        tqdm.write(
            f"cache-teacher: shard {index}: taking over the stale claim of {describe_holder(claim.replaced)}",
            file=sys.stderr,
        )
    return claim


def run(cfg: CacheConfig) -> dict[str, Any]:
    """Fill the store at ``cfg.out`` (creating or resuming it). Returns a summary of the work done.

    Each shard is filled under its claim (see [claim note] in store.py): shards claimed by another live
    process are skipped (tried again once after the others) and listed in ``busy_shards``."""
    cfg.require_io()
    check_teacher_source(cfg.teacher)
    device = rank_device(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_teacher_tokenizer(cfg)
    dataset = load_text_dataset(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    need_attention = cfg.attention_layers is None or len(cfg.attention_layers) > 0
    model = load_teacher(cfg, device, dtype, need_attention)
    plan = plan_rows(dataset, cfg.text_field, tokenizer, cfg.seq_len).truncated(cfg.max_rows)
    builder = RowBuilder(dataset, cfg.text_field, tokenizer, plan)
    root, manifest = prepare_store(cfg, model, tokenizer, dataset, plan, dtype, device, builder)
    layout = manifest["layout"]
    settings = field_settings(layout, root, device)
    records = shard_records(root, manifest)
    mine = shards_to_fill(cfg, len(records))
    queue_ = [i for i in mine if records[i]["status"] != "complete" or records[i].get("redo")]
    planned = {i: count_tokens(plan, chunks_to_fill(records[i], layout["chunk_rows"])) for i in queue_}
    summary: dict[str, Any] = {
        "rows": 0,
        "tokens": 0,
        "nonfinite_rows": [],
        "skipped_chunks": sum(len(records[i]["checksums"]) - len(records[i].get("redo", [])) for i in mine),
        "filled_shards": [],
        "busy_shards": {},
    }
    started = time.perf_counter()
    writer_thread = BackgroundWriter()
    bar = tqdm(
        total=sum(planned.values()),
        unit="tok",
        unit_scale=True,
        desc="cache-teacher",
        dynamic_ncols=True,
        disable=not planned,
    )
    claims: list[ShardClaim] = []
    deferred: set[int] = set()
    try:
        while queue_:
            index = queue_.pop(0)
            try:
                claim = claim_or_defer(cfg, index, deferred)
            except ShardBusy as busy:
                if cfg.shard is not None:
                    raise
                summary["busy_shards"][index] = busy.holder
                bar.total -= planned[index]
                continue
            if claim is None:
                queue_.append(index)  # unclaimed shards first
                continue
            claims.append(claim)
            # Another process may have filled some of it before we held the claim: read its record again.
            fresh = open_root(cfg.out, mode="a")  # zarr caches a group's attributes: open it again
            todo = chunks_to_fill(shard_records(fresh, manifest)[index], layout["chunk_rows"])
            bar.total -= planned[index] - count_tokens(plan, todo)
            writer = open_shard_writer(fresh, index)
            for chunk, start, end in todo:
                if claim.lost:  # taken over by another process (see [claim note])
                    break
                arrays, bad_rows = compute_chunk(model, builder, settings, device, cfg, plan, dtype, start, end, bar)
                summary["nonfinite_rows"] += bad_rows
                summary["rows"] += end - start
                summary["tokens"] += count_tokens(plan, [(chunk, start, end)])
                writer_thread.submit(
                    functools.partial(commit_chunk, writer, claim, chunk, arrays, int(arrays["length"].sum()), bad_rows)
                )
            if todo:
                summary["filled_shards"].append(index)
            writer_thread.submit(claim.release)  # after its last chunk is committed
    finally:
        bar.close()
        try:
            writer_thread.close()
        finally:
            for claim in claims:  # on errors and signals too; a no-op for those already released
                claim.release()
    summary["seconds"] = time.perf_counter() - started
    summary["tokens_per_s"] = summary["tokens"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    return summary


def compute_chunk(
    model: Any,
    builder: RowBuilder,
    settings: FieldSettings,
    device: torch.device,
    cfg: CacheConfig,
    plan: RowPlan,
    dtype: torch.dtype,
    start: int,
    end: int,
    bar: Any,
) -> tuple[dict[str, np.ndarray], list[int]]:
    """The fields of rows ``start:end`` and the rows whose teacher output is not finite (blanked)."""
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
    return arrays, bad_rows


__all__ = ["run", "compute_batch_fields", "FieldSettings", "load_teacher", "resolve_dtype"]
