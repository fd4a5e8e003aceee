"""The teacher model in stage 1: loading it, reproducing its output logits, and its forward.

Stage 1 does not call the model's own forward for the logits: it runs the base model
(``forward_teacher``, with the selective attention when maps are stored) and applies the output head
itself in position slices (``compute_logits``, with the family's post-processing, see
[logit-postprocess note]). Both stage 1 and the live teacher of stage 2 use these.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill.config import CacheConfig, ConfigError
from distill.pipeline.text.tokens import check_tokenizer


def check_teacher_source(teacher: str) -> None:
    """A path-like teacher that does not exist gets a one-line error before transformers' long one."""
    looks_local = teacher.startswith((".", "/", "~")) or Path(teacher).expanduser().exists() or teacher.count("/") > 1
    if looks_local and not Path(teacher).expanduser().is_dir():
        raise ConfigError(f"--teacher {teacher}: no such directory")


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher is loaded from and how it is placed: stage 1's --teacher, --revision,
    --trust-remote-code and --device-map (``of(cfg)``), or stage 2's --live-teacher."""

    name: str
    revision: str | None = None
    trust_remote_code: bool = False
    device_map: str | None = None
    flag: str = "--teacher"  # the flag that named it, for error messages

    @classmethod
    def of(cls, cfg: CacheConfig) -> TeacherSource:
        return cls(cfg.teacher, cfg.revision, cfg.trust_remote_code, cfg.device_map)


def load_teacher(source: TeacherSource, device: torch.device, dtype: torch.dtype, need_attention: bool) -> Any:
    """The teacher in eval mode, with the selective attention ([selective-attention note]).

    With ``source.device_map`` the teacher is spread over the visible GPUs ([device-map note]) and ``device`` is
    ignored; ``output_device(model)`` is then where its fields are computed."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": source.trust_remote_code,
        "revision": source.revision,
    }
    if source.device_map is not None:
        require_accelerate(source.device_map)
        kwargs["device_map"] = source.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source.name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{source.flag} {source.name}: cannot load the model ({str(exc).splitlines()[0]})") from None
    use_selective_attention(model, need_attention)
    on_cpu = output_device(model).type == "cpu" if source.device_map else device.type == "cpu"
    if on_cpu and getattr(model.config, "_experts_implementation", None) == "batched_mm":
        model.set_experts_implementation("grouped_mm")  # batched_mm is ~100x slower on CPU
    if source.device_map is None:
        model = model.to(device)
    else:
        check_device_map(model, source.device_map)
    model.eval()
    check_teacher_logits(model, source.name)
    return model


# [device-map note] A teacher larger than one GPU is loaded with transformers' ``device_map`` (accelerate):
# its blocks are spread over the visible GPUs in order, and hooks move each block's input to its GPU. The
# blocks then run one after the other (pipeline without overlap: the GPUs add memory, not speed). Stage 1
# gives the input ids to the GPU of the output head, ``forward_teacher`` brings every returned hidden state
# and attention map there, and the fields are computed there, so nothing else changes and the stored values
# equal a single-device run's up to the GPUs' own rounding. Weights offloaded to the CPU or disk are
# refused: the head's slices and vocab_proj read the weights directly, outside accelerate's hooks.


def require_accelerate(device_map: str) -> None:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        raise ConfigError(f"--device-map {device_map} needs the accelerate package — pip install accelerate") from None


def check_device_map(model: Any, device_map: str) -> None:
    """Refuse a spread teacher that left weights on the CPU or disk while GPUs are there ([device-map note])."""
    placed = getattr(model, "hf_device_map", {}) or {}
    offloaded = sorted(name for name, where in placed.items() if str(where) in ("cpu", "disk"))
    if offloaded and torch.cuda.is_available():
        raise ConfigError(
            f"--device-map {device_map}: the teacher does not fit the visible GPUs ({len(offloaded)} module(s) "
            f"left on the CPU or disk, e.g. {offloaded[0]}) — make more GPUs visible (CUDA_VISIBLE_DEVICES) or "
            "run it in a smaller --dtype"
        )


def output_device(model: Any) -> torch.device:
    """The device of the teacher's output head: where stage 1 computes the stored fields."""
    return model.get_output_embeddings().weight.device


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
            "after the known transforms (see [logit-postprocess note] in teacher/model.py); stage 1 would cache "
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
# (B, heads, L, L) weights in every block and keeps them all in its output (28 blocks x 8 rows x 16 heads
# x 512^2 fp32 = 3.8 GB for the reference teacher), while the store keeps two blocks' head average. The
# teacher therefore runs the `distill_selective` attention: sdpa in every block; the blocks `forward_teacher`
# flags also compute their head-averaged weights (B, 1, L, L) fp32, a block of queries at a time
# (``mean_attention_weights``). Its masks are sdpa's (boolean, or None for a plain causal batch). A model whose
# attention cannot be switched at run time (remote code outside transformers' AttentionInterface) falls back to
# eager when maps are stored, and keeps its own attention otherwise.
#
# [document-attention note] Under ``forward_teacher`` each block also knows the documents of each row
# (``document_spans``: a packed row's documents, a padded row's real tokens), and runs sdpa causally on each
# document alone instead of over the whole row under a block-diagonal (or padding) mask: the same attention
# (a query sees the keys of its own document up to itself), without the scores across documents or into the
# padding (on a CPU, in blocks of queries: [causal-blocks note]). Padding positions get a zero output (nothing
# reads them: their fields are not stored, and no real position attends to them). A block whose attention is
# not plain causal within a document keeps the mask: a sliding window (or Llama 4's attention chunk) shorter than
# a document, a position bias, softcapped scores (Gemma 2, eager above), dropout, a row padded on the left. On a
# GPU each document is its own sdpa call: rows of many short documents mean many small kernels (not measured).
SELECTIVE_ATTENTION = "distill_selective"
_FLAG = "_distill_keep_attention"
_SPANS = "_distill_document_spans"


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
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if softcap is None:
        spans = getattr(module, _SPANS, None)
        if spans is None or not within_documents(module, query, key, spans, dropout, kwargs):
            spans = None
            output, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        else:
            output = document_attention(query, key, value, spans, scale)
        return output, mean_attention_weights(query, key, attention_mask, scale, spans) if keep_weights else None
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.tanh(torch.matmul(query, key.transpose(2, 3)) * scale / softcap) * softcap  # (B, Hq, Lq, Lk)
    lq, lk = scores.shape[-2:]
    weights = torch.softmax(masked_scores(scores, attention_mask, lk - lq, 0), dim=-1, dtype=torch.float32)
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, weights.mean(dim=1, keepdim=True) if keep_weights else None


def document_spans(
    attention_mask: torch.Tensor, position_ids: torch.Tensor | None
) -> list[list[tuple[int, int]]] | None:
    """Each row's documents as (start, end) spans of its real tokens ([document-attention note]): a right-padded
    row's tokens are one document, a packed row's documents start where their positions restart at 0. None when a
    row's padding is not all at its end (the blocks then keep their mask)."""
    lengths = attention_mask.sum(dim=1)
    prefix = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), prefix):
        return None
    lengths = lengths.tolist()
    starts: list[list[int]] = [[0] for _ in lengths]
    if position_ids is not None:
        rows, cols = torch.nonzero(position_ids == 0, as_tuple=True)
        for row, col in zip(rows.tolist(), cols.tolist()):
            if 0 < col < lengths[row]:
                starts[row].append(col)
    return [[(a, e) for a, e in zip(row, [*row[1:], length]) if e > a] for row, length in zip(starts, lengths)]


def within_documents(
    module: Any, query: torch.Tensor, key: torch.Tensor, spans: list, dropout: float, kwargs: dict[str, Any]
) -> bool:
    """Whether this block's attention is plain causal attention within each document ([document-attention note])."""
    window = kwargs.get("sliding_window")
    chunk = getattr(getattr(module, "config", None), "attention_chunk_size", None)  # Llama 4's chunked attention
    longest = max((e - a for row in spans for a, e in row), default=0)
    return bool(
        kwargs.get("is_causal", getattr(module, "is_causal", True))
        and query.shape[2] == key.shape[2]  # no cache: the keys are the row's own
        and len(spans) == query.shape[0]
        and dropout == 0.0
        and kwargs.get("position_bias") is None
        and (window is None or longest <= window)
        and (chunk is None or longest <= chunk)
    )


CPU_QUERY_BLOCK = 64  # queries per causal sdpa call on a CPU ([causal-blocks note]); one call per document elsewhere


def document_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, spans: list[list[tuple[int, int]]], scale: float
) -> torch.Tensor:
    """Causal sdpa on each document of each row alone: output (B, Lq, Hq, d), zero at padding positions."""
    b, hq, length, _ = query.shape
    groups = hq // key.shape[1]
    out = query.new_zeros(b, length, hq, value.shape[-1])
    block = CPU_QUERY_BLOCK if query.device.type == "cpu" else length
    longest = max((e - a for row_spans in spans for a, e in row_spans), default=0)
    causal = torch.ones(longest, longest, dtype=torch.bool, device=query.device).tril() if longest > block else None
    for row, row_spans in enumerate(spans):
        for a, e in row_spans:
            for q0 in range(0, e - a, block):
                q1 = min(e - a, q0 + block)
                o = F.scaled_dot_product_attention(
                    query[row : row + 1, :, a + q0 : a + q1],
                    key[row : row + 1, :, a : a + q1],
                    value[row : row + 1, :, a : a + q1],
                    attn_mask=None if causal is None or q0 == 0 else causal[q0:q1, :q1],
                    is_causal=q0 == 0,
                    scale=scale,
                    enable_gqa=groups > 1,
                )  # (1, Hq, q1 - q0, d)
                out[row, a + q0 : a + q1] = o[0].transpose(0, 1)
    return out


# [causal-blocks note] On a CPU, torch's causal sdpa took as long as the masked call over the same keys
# (4 rows x 16 heads x 512 positions of 32 dims: 32.8 ms causal, 35.0 masked, one thread): it computes the scores
# past the diagonal and masks them. Cut into blocks of 64 queries, each over the keys up to its own last query
# (the first block causal, the others under their slice of the causal mask), the same attention took 22.5 ms
# (256 positions: 6.3 instead of 8.5; 32-query blocks ran no faster at 512 and more calls cost more per document).
# The blocks' outputs are the same softmax over the same keys, to float rounding. On a GPU the flash kernels
# skip the masked blocks themselves, so each document stays one call there.


ATTENTION_QUERY_BLOCK = 128  # queries per block of ``mean_attention_weights``: bounds its (heads, block, keys) scores


def mean_attention_weights(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
    spans: list[list[tuple[int, int]]] | None = None,
) -> torch.Tensor:
    """query (B, Hq, Lq, d), key (B, Hkv, Lk, d) -> the head-averaged attention weights (B, 1, Lq, Lk) fp32.

    The attention's output comes from sdpa; only its weights are computed here, a block of queries of one row at a
    time, so that the (heads, block, keys) scores stay in cache, and only over the keys the block can see. With the
    rows' document ``spans`` ([document-attention note]) a query sees its own document up to itself (padding sees
    padding); else ``attention_mask`` says what it sees: sdpa's (None = plain causal, bool True = attend, or
    additive float).
    """
    b, hq, lq, _ = query.shape
    lk, groups = key.shape[2], hq // key.shape[1]
    weights = torch.zeros(b, 1, lq, lk, dtype=torch.float32, device=query.device)
    for row in range(b):
        keys = key[row].repeat_interleave(groups, dim=0)  # (Hq, Lk, d)
        document = None  # (Lq,) each position's document in the row, -1 past its last (padding)
        if spans is not None:
            document = torch.full((lq,), -1, dtype=torch.long, device=query.device)
            for i, (a, e) in enumerate(spans[row]):
                document[a:e] = i
        for q0 in range(0, lq, ATTENTION_QUERY_BLOCK):
            q1 = min(lq, q0 + ATTENTION_QUERY_BLOCK)
            k0, k1 = 0, lk if attention_mask is not None else lk - lq + q1  # a causal block sees no later key
            if document is not None:  # from the first key of the block's first document to the block's last query
                k0, k1 = next((a for a, e in spans[row] if a <= q0 < e), q0), q1
            scores = torch.matmul(query[row, :, q0:q1], keys[:, k0:k1].transpose(1, 2)).float().mul_(scale)
            if document is not None:
                later = (
                    torch.arange(k0, k1, device=query.device)[None, :]
                    > torch.arange(q0, q1, device=query.device)[:, None]
                )
                other = document[q0:q1, None] != document[None, k0:k1]
                scores.masked_fill_(later | other, torch.finfo(scores.dtype).min)
            else:
                mask = None
                if attention_mask is not None:  # its batch may broadcast (1), its key axis be longer than the keys
                    mask = attention_mask[row if attention_mask.shape[0] > 1 else 0, None, :, q0:q1, k0:k1]
                scores = masked_scores(scores[None], mask, q0 + lk - lq, k0)[0]
            torch.softmax(scores, dim=-1, out=scores)
            torch.mean(scores, dim=0, out=weights[row, 0, q0:q1, k0:k1])
    return weights


def masked_scores(scores: torch.Tensor, attention_mask: torch.Tensor | None, q0: int, k0: int) -> torch.Tensor:
    """scores (B, H, q, k) of queries q0.. and keys k0.. (absolute key positions) under sdpa's mask of that block:
    None = plain causal (sdpa's mask builder skips plain causal batches), bool True = attend, or additive float."""
    if attention_mask is None:
        rows = torch.arange(q0, q0 + scores.shape[-2], device=scores.device)[:, None]
        cols = torch.arange(k0, k0 + scores.shape[-1], device=scores.device)[None, :]
        return scores.masked_fill_(cols > rows, torch.finfo(scores.dtype).min)
    if attention_mask.dtype == torch.bool:
        return scores.masked_fill_(~attention_mask, torch.finfo(scores.dtype).min)
    return scores.add_(attention_mask)


def use_selective_attention(model: Any, need_attention: bool = True) -> None:
    """Switch ``model`` to the selective attention (registered once); where that is impossible, to eager if its
    attention maps are stored (``need_attention``), else leave its own attention."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SELECTIVE_ATTENTION, selective_attention_forward)
    AttentionMaskInterface.register(SELECTIVE_ATTENTION, sdpa_mask)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    blocks = getattr(base, "layers", None)
    if blocks is not None and all(hasattr(block, "self_attn") for block in blocks):
        with_logging_quiet(model.set_attn_implementation, SELECTIVE_ATTENTION)
    if model.config._attn_implementation != SELECTIVE_ATTENTION and need_attention:
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


def load_teacher_tokenizer(source: TeacherSource) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            source.name, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{source.flag} {source.name}: cannot load its tokenizer ({str(exc).splitlines()[0]})"
        ) from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{source.flag} {source.name}: a fast tokenizer is needed (character offsets)")
    check_tokenizer(tok)  # refuses, before the model loads, a tokenizer that cannot reproduce its text
    return tok


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


def forward_teacher(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    need_attention: bool,
    attention_layers: list[int] | None = None,
    position_ids: torch.Tensor | None = None,
) -> Any:
    """Base-model forward (no logits: those are computed in slices by ``compute_logit_fields``).

    position_ids (B, L): packed rows, positions restarting per document; the forward then gets no 2D mask
    and builds a block-diagonal causal one from them ([packing note] in packing.py).

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
    attentions = [module for block in blocks or [] if (module := getattr(block, "self_attn", None)) is not None]
    spans = document_spans(attention_mask, position_ids)  # [document-attention note]
    for module in attentions:
        setattr(module, _SPANS, spans)
    try:
        out = base(
            input_ids=input_ids,
            attention_mask=attention_mask if position_ids is None else None,
            position_ids=position_ids,
            output_hidden_states=True,
            output_attentions=need_attention,
            use_cache=False,
        )
    finally:
        for module in flagged:
            setattr(module, _FLAG, False)
        for module in attentions:
            setattr(module, _SPANS, None)
    if wanted and len(out.attentions) == len(wanted) < len(blocks):  # only the flagged blocks reported weights
        by_layer = dict(zip(wanted, out.attentions))
        out.attentions = tuple(by_layer.get(layer) for layer in range(1, len(blocks) + 1))
    return gather_outputs(out, input_ids.device)


def gather_outputs(out: Any, device: torch.device) -> Any:
    """Every tensor of a base-model output on ``device`` ([device-map note]; a no-op on one device)."""
    out.last_hidden_state = out.last_hidden_state.to(device)
    out.hidden_states = tuple(h.to(device) for h in out.hidden_states)
    if out.attentions is not None:
        out.attentions = tuple(None if a is None else a.to(device) for a in out.attentions)
    return out
