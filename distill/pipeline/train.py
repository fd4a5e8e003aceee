"""Stage 2 — ``distill train``: the student and its student-aware router against the teacher cache.

    distill train --cache cache/wt103 --student HuggingFaceTB/SmolLM-135M --out runs/smol \
        --config configs/reference.yaml

``setup`` loads the store (checked against what the enabled terms need), the student, the
alignment to the teacher's tokenizer and the trainable modules; ``fit`` is the one training
loop: per optimizer step the curriculum gives the term weights, micro-batches are read
(ahead of time, on a thread), aligned, pushed through the student and the loss terms whose
weight is > 0, gradients accumulate, get clipped, the optimizer and schedule step; every
``log_every`` steps one line and one metrics record, every ``eval_every`` an eval on
held-out rows and a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.cache.info import measure_head_mass
from distill.cache.reader import CacheReader
from distill.cache.schema import CacheError
from distill.config import ConfigError, TrainConfig, config_to_dict
from distill.pipeline.align import (
    AlignedBatch,
    align_batch,
    load_or_build_vocab_map,
    pad_vocab_map,
    teacher_to_student_span,
)
from distill.pipeline.checkpoint import (
    CheckpointError,
    capture_rng,
    load_best_meta,
    load_resume_checkpoint,
    restore_rng,
    save_best,
    save_checkpoint,
    save_final,
)
from distill.pipeline.curriculum import RAMPED_TERMS, weights_at
from distill.pipeline.distributed import (
    World,
    any_rank,
    average_gradients,
    average_logs,
    barrier,
    init_world,
    leave_world,
    share_from_main,
    sum_over_ranks,
)
from distill.pipeline.losses import (
    attention_kl_loss,
    build_layer_map,
    combine_terms,
    contrastive_loss,
    importance_loss,
    kd_tail_loss,
    layerwise_loss,
    lm_and_kd_from_hidden,
    lm_loss,
    load_balance_loss,
    pool_attention_to_spans,
    projector_kd_loss,
    routed_feature_loss,
    uld_loss,
)
from distill.pipeline.router import (
    LogitProjector,
    StudentAwareRouter,
    StudentProjection,
    expert_usage,
    standardize_hidden,
)
from distill.pipeline.sampled_kd import sampled_kd_loss
from distill.pipeline.signals import LiveTeacher, TeacherSignal, read_cached_signal, signal_fields
from distill.pipeline.tokens import check_tokenizer
from distill.pipeline.tracking import Trackers, describe_cache, open_trackers, require_trackers

# --- setup --------------------------------------------------------------------------------


@dataclass
class Context:
    """Everything the loop needs, built once by ``setup``."""

    cfg: TrainConfig
    device: torch.device
    reader: CacheReader
    eval_reader: CacheReader
    train_rows: np.ndarray
    eval_rows: np.ndarray
    student: Any
    tokenizer: Any
    modules: nn.ModuleDict  # router, layer projections, contrastive projection, logit projector
    vocab_map: torch.Tensor | None  # (V_teacher,) teacher id -> student id or -1; None = same tokenizer
    same_tokenizer: bool
    t_index: int
    fields: list[str]
    layer_map: dict[int, int]  # student hidden layer -> teacher hidden layer
    attention_map: dict[int, int]  # student block -> teacher block
    stats: dict[int, tuple[torch.Tensor, torch.Tensor]]  # teacher layer -> (mean, std) of stored hidden
    max_length: int
    total_steps: int
    autocast_dtype: torch.dtype | None
    live: LiveTeacher | None = None
    run_dir: Path = field(default_factory=Path)
    world: World = field(default_factory=World)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype (None = plain fp32). auto: bf16 on GPUs with it, fp16 on older GPUs, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def needed_families(cfg: TrainConfig) -> set[str]:
    """Which teacher fields the enabled terms (base weight > 0, not disabled) need."""
    cur = cfg.curriculum
    on = {t for t in ("kd", *RAMPED_TERMS) if getattr(cur, t) > 0 and t not in cur.disabled}
    need = set()
    if "kd" in on:
        need.add("projector" if cfg.kd_mode == "projector" else "kd")
    if on & {"feature", "layerwise", "contrastive"}:
        need.add("hidden")
    if "attention" in on:
        need.add("attention")
    return need


def load_student(cfg: TrainConfig, need_attention: bool, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if need_attention:
        kwargs["attn_implementation"] = "eager"  # the attention term needs the student's attention weights
    source = Path(cfg.student)
    if (source.is_absolute() or cfg.student.startswith(".")) and not source.is_dir():
        raise ConfigError(f"--student {cfg.student}: no such folder — pass a model folder or a hub id")
    try:
        student = AutoModelForCausalLM.from_pretrained(cfg.student, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--student {cfg.student}: cannot load the model ({str(exc).splitlines()[0]}) — pass a folder written by "
            "save_pretrained, or a hub id"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.student)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"--student {cfg.student}: cannot load its tokenizer ({str(exc).splitlines()[0]}) — save the tokenizer "
            "next to the model (tokenizer.save_pretrained)"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"--student {cfg.student}: a fast tokenizer is needed (character offsets)")
    check_tokenizer(tokenizer)  # a tokenizer that cannot reproduce its text is refused before training starts
    return student.to(device), tokenizer


def load_cache_tokenizer(reader: CacheReader) -> Any:
    """The teacher tokenizer stored in the cache (stage 2 needs nothing but the store and the student)."""
    from transformers import AutoTokenizer

    try:
        files = reader.tokenizer_files()
    except CacheError:
        raise CacheError(
            f"{reader.url}: the store has no teacher tokenizer files, needed to map the teacher vocabulary "
            "onto the student's; re-create it with `distill cache-teacher`"
        ) from None
    with TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def split_rows(reader: CacheReader, eval_reader: CacheReader | None, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and held-out row ids. Without an eval store, a fixed-seed choice of ``fraction`` of the rows."""
    rows = reader.row_ids
    if eval_reader is not None:
        return rows, eval_reader.row_ids
    if fraction == 0:
        return rows, rows[:0]
    n_eval = max(1, round(fraction * len(rows)))
    held = np.sort(np.random.default_rng(12345).permutation(rows)[:n_eval])
    return np.setdiff1d(rows, held), held


def build_modules(
    cfg: TrainConfig, reader: CacheReader, student: Any, need: set[str], layer_map: dict[int, int], student_dim: int
) -> nn.ModuleDict:
    """Trainable modules beside the student: all on the student side (teacher targets stay fixed)."""
    torch.manual_seed(cfg.seed)
    lay = reader.layout
    modules = nn.ModuleDict()
    cur = cfg.curriculum
    if "hidden" in need:
        layers = [layer for layer in lay["hidden_layers"] if layer > 0]
        if cur.feature > 0 and "feature" not in cur.disabled:
            modules["router"] = StudentAwareRouter(
                student_dim, {layer: lay["hidden_dim"] for layer in layers}, top_k=cfg.router_top_k
            )
        if cur.layerwise > 0 and "layerwise" not in cur.disabled:
            modules["layerwise"] = nn.ModuleDict(
                {str(i): StudentProjection(student_dim, lay["hidden_dim"]) for i in layer_map}
            )
        if cur.contrastive > 0 and "contrastive" not in cur.disabled:
            modules["contrastive"] = StudentProjection(student_dim, lay["hidden_dim"])
    if "projector" in need:
        modules["projector"] = LogitProjector(lay["teacher_hidden_size"], student.get_output_embeddings())
    return modules


DEEP_VERIFY_LIMIT = 16 * 2**30  # bytes of uncompressed rows below which `auto` re-checksums every chunk


def check_store(url: str, mode: str) -> None:
    """Refuse an incomplete or corrupted store before training (see ``distill cache verify``)."""
    if mode == "off":
        return
    from distill.cache.manage import require_sound_store
    from distill.cache.schema import build_field_specs
    from distill.cache.store import load_manifest, open_root

    deep = mode == "deep"
    if mode == "auto":
        layout = load_manifest(open_root(url), url)["layout"]
        row_bytes = sum(
            int(np.prod(f.row_shape)) * (np.dtype(f.dtype).itemsize if f.dtype != "str" else 1)
            for f in build_field_specs(layout).values()
        )
        deep = layout["num_rows"] * row_bytes < DEEP_VERIFY_LIMIT
    require_sound_store(url, deep=deep)


def warn_small_head(reader: CacheReader, temperature: float) -> None:
    """Say so when the stored top-K hold under half the teacher's mass at ``temperature`` ([head-mass note])."""
    if reader.target_kind in ("sampled", "hybrid"):  # an unbiased estimate of the full KL: no head to warn about
        return
    masses = measure_head_mass(reader)
    mass = masses.get(str(float(temperature)))
    if not mass or mass["mean"] >= 0.5:
        return
    better = {float(t): m["mean"] for t, m in masses.items() if m and m["mean"] > mass["mean"] + 0.05}
    advice = (
        "train at a lower stored temperature (" + ", ".join(f"T={t:g} holds {m:.0%}" for t, m in better.items()) + ")"
        if better
        else "re-cache with a larger --top-k"
    )
    print(
        f"warning: the stored top-{reader.layout['top_k']} hold only {mass['mean']:.1%} of the teacher's probability "
        f"at temperature {temperature:g} (mean; 10th percentile {mass['p10']:.1%}), so kd learns little beyond the "
        f"tail mass; {advice}",
        file=sys.stderr,
        flush=True,
    )


def setup(cfg: TrainConfig) -> Context:
    """Load and check everything before the first step; every problem is reported here, not mid-run."""
    cfg.require_io()
    require_trackers(cfg.report_to)
    world = init_world(cfg.device)
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    if device.type == "cuda" and world.active:
        device = torch.device("cuda", world.local_rank)
    prepare_run_dir(cfg, delete=world.main)  # every rank refuses alike; only rank 0 deletes
    for url in filter(None, (cfg.cache, cfg.eval_cache)):
        check_store(url, cfg.verify_cache)
    reader = CacheReader(cfg.cache)
    eval_reader = CacheReader(cfg.eval_cache) if cfg.eval_cache else None
    need = needed_families(cfg)
    fields = signal_fields(reader.layout, need)
    reader.require_fields(fields, "needed by the enabled loss terms")
    if eval_reader is not None:
        eval_reader.require_fields(fields, "needed by the enabled loss terms")
    t_index = reader.temperature_index(cfg.temperature) if need & {"kd"} else 0
    if "kd" in need and cfg.kd_mode == "tail" and world.rank == 0:
        warn_small_head(reader, cfg.temperature)
    if "attention" in need and not reader.layout["attention_layers"]:
        raise CacheError(
            f"{cfg.cache}: the attention term is on (curriculum.attention > 0) but the store has no attention maps; "
            "re-cache with --attention-layers, or pass --set curriculum.attention=0 (--objective kd-only or ce: no "
            "attention term)"
        )
    if "hidden" in need and not [layer for layer in reader.layout["hidden_layers"] if layer > 0]:
        raise CacheError(
            f"{cfg.cache}: the feature/layerwise/contrastive terms need teacher hidden states of blocks >= 1, the "
            f"store has layers {reader.layout['hidden_layers']}; re-cache with --hidden-layers, or set "
            "curriculum.feature, curriculum.layerwise and curriculum.contrastive to 0 (--objective kd-only or ce)"
        )
    student, tokenizer = load_student(cfg, "attention" in need, device)
    teacher_tokenizer = load_cache_tokenizer(reader)
    from distill.pipeline.align import is_same_tokenizer

    same = is_same_tokenizer(teacher_tokenizer, tokenizer)
    vocab_map = None
    run_dir = Path(cfg.out)
    if not same:
        vocab_map = torch.from_numpy(
            pad_vocab_map(
                load_or_build_vocab_map(teacher_tokenizer, tokenizer, run_dir / "vocab_map"),
                reader.manifest["teacher"]["vocab_size"],
            )
        )
    num_layers = student.config.num_hidden_layers
    hidden_layers = [layer for layer in reader.layout["hidden_layers"] if layer > 0]
    teacher_depth = reader.manifest["teacher"]["num_hidden_layers"]
    layer_map = build_layer_map(num_layers, hidden_layers, teacher_depth) if hidden_layers else {}
    attention_map = (
        build_layer_map(num_layers, reader.layout["attention_layers"], teacher_depth) if "attention" in need else {}
    )
    stats = (
        {
            layer: (
                torch.from_numpy(reader.root_array(f"stats/hidden/{layer}/mean")).to(device),
                torch.from_numpy(reader.root_array(f"stats/hidden/{layer}/std")).to(device),
            )
            for layer in reader.layout["hidden_layers"]
        }
        if "hidden" in need
        else {}
    )
    modules = build_modules(cfg, reader, student, need, layer_map, student.config.hidden_size).to(device)
    train_rows, eval_rows = split_rows(reader, eval_reader, cfg.eval_fraction)
    if cfg.eval_rows is not None:
        eval_rows = eval_rows[: cfg.eval_rows]
    steps_per_epoch = max(1, len(train_rows) // (cfg.batch_size * cfg.grad_accum * world.size))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    max_length = cfg.student_max_length or int(getattr(student.config, "max_position_embeddings", 2048))
    if world.main:
        warn_if_rows_are_cut(reader, train_rows, tokenizer, max_length)
    live = LiveTeacher(cfg.live_teacher, reader, device) if cfg.live_teacher else None
    return Context(
        cfg=cfg,
        device=device,
        reader=reader,
        eval_reader=eval_reader or reader,
        train_rows=train_rows,
        eval_rows=eval_rows,
        student=student,
        tokenizer=tokenizer,
        modules=modules,
        vocab_map=vocab_map,
        same_tokenizer=same,
        t_index=t_index,
        fields=fields,
        layer_map=layer_map,
        attention_map=attention_map,
        stats=stats,
        max_length=max_length,
        total_steps=total,
        autocast_dtype=resolve_precision(cfg.precision, device),
        live=live,
        world=world,
        run_dir=run_dir,
    )


def warn_if_rows_are_cut(reader: CacheReader, rows: np.ndarray, tokenizer: Any, max_length: int) -> None:
    """Warn once when the student's context is shorter than rows: the text past it is not trained on.
    Measured on up to 64 rows spread over the store."""
    sample = rows[np.linspace(0, len(rows) - 1, num=min(64, len(rows))).astype(int)] if len(rows) else rows
    if not len(sample):
        return
    texts = reader.read_rows(np.sort(sample), ["text"])["text"]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    total = sum(len(t) for t in texts)
    lost, cut_rows = 0, 0
    for text, offsets in zip(texts, enc["offset_mapping"]):
        if len(offsets) > max_length:
            cut_rows += 1
            lost += len(text) - max(end for _, end in offsets[:max_length])
    if cut_rows:
        say(
            f"warning: the student's context ({max_length} tokens) is shorter than {cut_rows} of {len(texts)} sampled "
            f"rows: {lost / max(1, total):.1%} of their text is not trained on — raise --set student_max_length (up "
            "to the student's max_position_embeddings) or re-cache with a smaller --seq-len"
        )


def build_optimizer(ctx: Context) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW: student and router/projector groups, no decay on biases and norms; warmup + cosine in optimizer steps."""
    cfg = ctx.cfg

    def groups(module: nn.Module, lr: float) -> list[dict[str, Any]]:
        decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() < 2]
        return [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]

    param_groups = groups(ctx.student, cfg.lr) + groups(ctx.modules, cfg.router_lr)
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]])
    warmup = max(1, round(cfg.warmup * ctx.total_steps)) if cfg.warmup > 0 else 0

    def factor(step: int) -> float:  # step = optimizer steps done; the first update uses factor(0) > 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, ctx.total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- batches ------------------------------------------------------------------------------


@dataclass
class Batch:
    signal: TeacherSignal
    aligned: AlignedBatch
    key_spans: torch.Tensor | None  # (B, Lt) teacher key position -> student token index, for the attention term
    student_tokens: int


def prepare_batch(ctx: Context, reader: CacheReader, rows: np.ndarray) -> Batch:
    """Read the rows' teacher signal and tokenize + align them for the student (CPU work, done ahead)."""
    sig = ctx.live.signal(rows, ctx.fields) if ctx.live else read_cached_signal(reader, rows, ctx.fields)
    aligned = align_batch(
        sig.text,
        sig.offsets.numpy(),
        sig.length.numpy(),
        ctx.tokenizer,
        ctx.max_length,
        teacher_input_ids=sig.input_ids.numpy(),
        same_tokenizer=ctx.same_tokenizer,
    )
    key_spans = None
    if sig.attn:
        spans = [
            teacher_to_student_span(
                sig.offsets[b].numpy(), int(sig.length[b]), aligned.student_offsets[b], len(aligned.student_offsets[b])
            )
            for b in range(len(rows))
        ]
        key_spans = torch.from_numpy(np.stack(spans)).long()
    return Batch(sig, aligned, key_spans, int(aligned.attention_mask.sum()))


class BatchStream:
    """Deterministic row order (a permutation per epoch from the seed) with a resumable cursor; reads ahead."""

    def __init__(self, ctx: Context, cursor: tuple[int, int] = (0, 0)) -> None:
        # Under torchrun rank r takes micro-batches r, r + W, ... of the one global order.
        self.ctx, self.epoch, self.index = ctx, cursor[0], cursor[1]
        self._consumed = (self.epoch, self.index)
        self.order = self._order(self.epoch)
        workers = ctx.cfg.num_workers_prefetch
        self.pool = ThreadPoolExecutor(max_workers=1) if workers > 0 else None
        self.ahead: list[Future] = []

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.ctx.cfg.seed, epoch]).permutation(self.ctx.train_rows)

    def _take_rows(self) -> np.ndarray:
        world = self.ctx.world
        mine = None
        for r in range(world.size):
            rows = self._take_global_rows()
            if r == world.rank:
                mine = rows
        return mine

    def _take_global_rows(self) -> np.ndarray:
        rows = []
        while len(rows) < self.ctx.cfg.batch_size:
            if self.index >= len(self.order):
                self.epoch, self.index = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            take = min(self.ctx.cfg.batch_size - len(rows), len(self.order) - self.index)
            rows.extend(self.order[self.index : self.index + take].tolist())
            self.index += take
        return np.asarray(rows, dtype=np.int64)

    @property
    def cursor(self) -> tuple[int, int]:
        """Position after the batches consumed so far (read-ahead batches are not counted)."""
        return self._consumed

    def next(self) -> Batch:
        if self.pool is None:
            batch = prepare_batch(self.ctx, self.ctx.reader, self._take_rows())
            self._consumed = (self.epoch, self.index)
            return batch
        while len(self.ahead) < 1 + self.ctx.cfg.num_workers_prefetch:
            rows = self._take_rows()
            self.ahead.append(
                (self.pool.submit(prepare_batch, self.ctx, self.ctx.reader, rows), (self.epoch, self.index))
            )
        future, cursor = self.ahead.pop(0)
        self._consumed = cursor
        return future.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


# --- the loss step ------------------------------------------------------------------------


def term_weights(cfg: TrainConfig, w: dict[str, float]) -> dict[str, float]:
    """Curriculum weights of the families -> weights of every logged term (router terms follow their family)."""
    out = dict(w)
    out["lm_unaligned"] = w["kd"]  # [unaligned-lm note] in losses.py
    out["router_balance"] = w["feature"] * cfg.balance_coef
    out["router_importance"] = w["feature"] * cfg.importance_coef
    out["router_attention"] = w["attention"] * cfg.router_attention_coef
    if cfg.kd_mode == "projector":
        out["projector_anchor"] = w["kd"]
    return out


def teacher_hidden_at(ctx: Context, sig: TeacherSignal, layer: int, b: torch.Tensor, tp: torch.Tensor) -> torch.Tensor:
    """(N, D) cached teacher hidden state at aligned positions, fp32, standardized with the store's statistics."""
    mean, std = ctx.stats[layer]
    return standardize_hidden(sig.hidden[layer][b, tp].float(), mean, std)


def compute_losses(ctx: Context, batch: Batch, weights: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """Student forward + every term whose weight is > 0. Returns the weighted total and the log dict."""
    cfg, sig, a = ctx.cfg, batch.signal.to(ctx.device), batch.aligned
    tw = term_weights(cfg, weights)
    on = {name for name, value in tw.items() if value > 0}
    need_hidden = bool(
        on & {"feature", "router_balance", "router_importance", "router_attention", "layerwise", "contrastive"}
    )
    need_attn = "attention" in on
    input_ids, mask = a.input_ids.to(ctx.device), a.attention_mask.to(ctx.device)
    b, tp, sp = a.batch_idx.to(ctx.device), a.teacher_pos.to(ctx.device), a.student_pos.to(ctx.device)
    raw: dict[str, torch.Tensor] = {}
    logs: dict[str, Any] = {"aligned_share": a.aligned_share}
    autocast = torch.autocast(
        ctx.device.type, dtype=ctx.autocast_dtype or torch.float32, enabled=ctx.autocast_dtype is not None
    )
    with autocast:
        # The decoder without its output layer: logits are made slice by slice ([sliced-logits note]).
        out = ctx.student.get_decoder()(
            input_ids=input_ids, attention_mask=mask, output_hidden_states=need_hidden, output_attentions=need_attn
        )
        hidden = out.last_hidden_state  # (B, Ls, D)
        bsz, length = input_ids.shape
        labels = F.pad(input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100), (0, 1), value=-100)  # (B, Ls)
        unaligned = None
        if "kd" in on and not ctx.same_tokenizer:  # positions without a teacher target: [unaligned-lm note]
            unaligned = torch.ones_like(labels, dtype=torch.bool)
            unaligned[b, sp] = False
        tail_kd = "kd" in on and cfg.kd_mode == "tail"
        kd_inputs = teacher_kd_inputs(ctx, sig, b, tp) if tail_kd else (None, None, None, None)
        raw["lm"], lm_unaligned, kd = lm_and_kd_from_hidden(
            hidden.reshape(bsz * length, -1),
            ctx.student.get_output_embeddings(),
            labels.reshape(-1),
            None if unaligned is None else unaligned.reshape(-1),
            b * length + sp,
            *kd_inputs[:3],
            cfg.temperature,
            kd_multiplier=kd_inputs[3],
        )
        if lm_unaligned is not None:
            raw["lm_unaligned"] = lm_unaligned
        if kd is not None:
            raw["kd"] = kd
        elif "kd" in on:  # projector / ULD: the logits of the aligned positions only
            student_logits = ctx.student.get_output_embeddings()(hidden[b, sp])  # (N, Vs)
            raw.update(compute_kd(ctx, sig, student_logits, b, tp, labels, sp))
    if on & {"feature", "router_balance", "router_importance", "router_attention"} and "router" in ctx.modules:
        student_h = out.hidden_states[-1][b, sp]  # (N, Ds)
        teacher_h = {layer: teacher_hidden_at(ctx, sig, layer, b, tp) for layer in ctx.modules["router"].layers}
        routed = ctx.modules["router"](student_h, teacher_h, with_attention="router_attention" in on)
        if "feature" in on:
            raw["feature"] = routed_feature_loss(routed.router_probs, routed.expert_error)
        if "router_balance" in on:
            raw["router_balance"] = load_balance_loss(routed.router_probs, routed.expert_index)
        if "router_importance" in on:
            raw["router_importance"] = importance_loss(routed.router_probs)
        if routed.attention_alignment is not None:
            raw["router_attention"] = routed.attention_alignment
        logs["expert_usage"] = expert_usage(routed.router_probs.detach())
    if need_attn:
        raw["attention"] = compute_attention(ctx, sig, out.attentions, batch.key_spans.to(ctx.device), b, tp, sp)
    if "layerwise" in on:
        raw["layerwise"] = torch.stack(
            [
                layerwise_loss(
                    ctx.modules["layerwise"][str(i)](out.hidden_states[i][b, sp]),  # normalized inside
                    teacher_hidden_at(ctx, sig, m, b, tp),
                )
                for i, m in ctx.layer_map.items()
            ]
        ).mean()
    if "contrastive" in on:
        last = max(ctx.stats)  # the deepest cached teacher layer
        raw["contrastive"] = contrastive_loss(
            ctx.modules["contrastive"](out.hidden_states[-1][b, sp]),
            teacher_hidden_at(ctx, sig, last, b, tp),
            cfg.contrastive_temperature,
        )
    total, term_logs = combine_terms(raw, tw)
    logs.update(term_logs)
    return total, logs


def compute_kd(
    ctx: Context,
    sig: TeacherSignal,
    student_logits: torch.Tensor,
    b: torch.Tensor,
    tp: torch.Tensor,
    labels: torch.Tensor,
    sp: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The kd term at aligned positions, in the selected mode. student_logits: (N, Vs)."""
    cfg = ctx.cfg
    if cfg.kd_mode == "projector":
        projected = ctx.modules["projector"](sig.vocab_proj[b, tp])  # (N, Vs); fp16 cache cast inside
        # The projector is itself trained: anchor it on the next student token, and let the student
        # match a detached projection (otherwise both sides could drift to agree on anything).
        next_tokens = labels[b, sp]  # -100 at a row's last position (ignored)
        return {
            "kd": projector_kd_loss(student_logits, projected.detach(), cfg.temperature),
            "projector_anchor": lm_loss(projected[:, None], next_tokens[:, None]),
        }
    if cfg.kd_mode == "uld":
        return {"kd": uld_loss(student_logits, sig.topk_logits[b, tp], sig.lse[b, tp, ctx.t_index], cfg.temperature)}
    ids, logits, lse, multiplier = teacher_kd_inputs(ctx, sig, b, tp)
    if multiplier is not None:
        return {"kd": sampled_kd_loss(student_logits, ids, logits, multiplier, lse, cfg.temperature)}
    return {"kd": kd_tail_loss(student_logits, ids, logits, lse, cfg.temperature)}


def teacher_kd_inputs(
    ctx: Context, sig: TeacherSignal, b: torch.Tensor, tp: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(N, K) teacher ids mapped to student ids (-1: no student token with those bytes, or an unused slot),
    their raw logits (N, K), the full-vocabulary logsumexp (N,) at the run's temperature, and the sampled
    targets' multiplier (N, K) (None for a top-K head)."""
    ids = sig.topk_ids[b, tp]  # (N, K) teacher vocabulary, -1 in unused slots
    if ctx.vocab_map is not None:
        ids = torch.where(ids >= 0, ctx.vocab_map.to(ids.device)[ids.clamp(min=0)], -1)
    multiplier = None if sig.target_multiplier is None else sig.target_multiplier[b, tp]
    return ids, sig.topk_logits[b, tp], sig.lse[b, tp, ctx.t_index], multiplier


def compute_attention(
    ctx: Context,
    sig: TeacherSignal,
    attentions: tuple,
    key_spans: torch.Tensor,
    b: torch.Tensor,
    tp: torch.Tensor,
    sp: torch.Tensor,
) -> torch.Tensor:
    """Mean over mapped (student block, teacher block) pairs of the per-query KL on student key spans."""
    terms = []
    for s_block, t_block in ctx.attention_map.items():
        values, ids = sig.attn[t_block]
        student_rows = attentions[s_block - 1].float().mean(dim=1)[b, sp]  # (N, Ls) head-averaged
        pooled, valid = pool_attention_to_spans(values[b, tp], ids[b, tp], key_spans[b], student_rows.shape[-1])
        terms.append(attention_kl_loss(student_rows, pooled, valid))
    return torch.stack(terms).mean()


# --- eval ---------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(ctx: Context) -> dict[str, float]:
    """Held-out kd and lm with fixed weights (base kd weight), so evals are comparable across the run."""
    ctx.student.eval()
    ctx.modules.eval()
    cur = ctx.cfg.curriculum
    alpha = 0.0 if "kd" in cur.disabled or cur.kd == 0 else cur.kd
    fixed = {"kd": alpha, "lm": 1 - alpha, **{t: 0.0 for t in RAMPED_TERMS}}
    sums: dict[str, float] = {}
    count = 0
    for start in range(0, len(ctx.eval_rows), ctx.cfg.batch_size):
        batch = prepare_batch(ctx, ctx.eval_reader, ctx.eval_rows[start : start + ctx.cfg.batch_size])
        _, logs = compute_losses(ctx, batch, fixed)
        for key in ("loss/total", "loss/lm", "loss/kd", "aligned_share"):
            if key in logs:
                sums[key] = sums.get(key, 0.0) + logs[key]
        count += 1
    ctx.student.train()
    ctx.modules.train()
    return {f"eval/{k.split('/')[-1] if k != 'loss/total' else 'loss'}": v / max(1, count) for k, v in sums.items()}


# --- the loop -----------------------------------------------------------------------------


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves an emergency checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def say(message: str) -> None:
    """Print on rank 0 only (every rank runs the loop)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def format_line(
    step: int, total: int, logs: dict[str, Any], lr: float, step_ms: float, tok_s: float, eta_s: float
) -> str:
    terms = " ".join(
        f"{k.split('/')[1]} {v:.3g}" for k, v in logs.items() if k.startswith("loss/") and k != "loss/total"
    )
    eta = f"{eta_s / 60:.0f}m" if eta_s >= 60 else f"{eta_s:.0f}s"
    return (
        f"step {step:05d}/{total} ({100 * step / total:.1f}%) | loss {logs['loss/total']:.4g} ({terms}) | "
        f"lr {lr:.3g} | {step_ms:.0f}ms | tok/s {tok_s:,.0f} | aligned {logs['aligned_share']:.2f} | eta {eta}"
    )


class ThroughputWindow:
    """Tokens per second of training time since the last log line: eval and checkpoint time, spent inside
    ``pause()``, is left out, so the figure after an eval is the training speed, not halved by the eval."""

    def __init__(self, clock: Any = time.perf_counter) -> None:
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.start, self.paused, self.tokens = self.clock(), 0.0, 0

    @contextlib.contextmanager
    def pause(self) -> Any:
        started = self.clock()
        try:
            yield
        finally:
            self.paused += self.clock() - started

    def rate(self, tokens: int | None = None) -> float:
        """``tokens`` (default: those added to the window) per second of unpaused time."""
        elapsed = self.clock() - self.start - self.paused
        return (self.tokens if tokens is None else tokens) / elapsed if elapsed > 0 else 0.0


def choose_final(cfg: TrainConfig, run_dir: Path, step: int, best: float, last_eval: float | None) -> dict[str, Any]:
    """What final/ holds (final.json): the best student (eval loss ``best``, kept in checkpoints/best) when asked
    and an eval ran, else the last step."""
    best_meta = load_best_meta(run_dir)
    if cfg.final == "best" and best_meta is not None and best_meta["eval_loss"] == best:
        return {"step": best_meta["step"], "eval_loss": best, "reason": "best eval loss"}
    if not math.isfinite(best):
        return {"step": step, "eval_loss": None, "reason": "no eval ran"}
    return {"step": step, "eval_loss": last_eval, "reason": "last step"}


def write_run_config(ctx: Context) -> None:
    """RUN_DIR/config.json: the resolved config and what eval needs to score the same rows."""
    cfg = ctx.cfg
    saved = {
        "train": config_to_dict(cfg),
        "total_steps": ctx.total_steps,
        "world_size": ctx.world.size,
        "eval_rows": ctx.eval_rows.tolist(),
        "eval_source": cfg.eval_cache or cfg.cache,
        "same_tokenizer": ctx.same_tokenizer,
        "layer_map": ctx.layer_map,
        "attention_map": ctx.attention_map,
        "cache_manifest": ctx.reader.manifest,
    }
    (ctx.run_dir / "config.json").write_text(json.dumps(saved, indent=2, default=str))


def trim_metrics(path: Path, step: int) -> None:
    """On resume from ``step``: keep the records up to it, drop those written after the checkpoint (the resumed
    run writes them again) and any torn line a crash left, so the file stays one record per line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


RUN_OUTPUTS = ("metrics.jsonl", "checkpoints", "final", "config.json")


def prepare_run_dir(cfg: TrainConfig, delete: bool = True) -> None:
    """Refuse to start a second run into a run directory that holds one, unless told to resume or replace it."""
    import shutil

    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: a file, not a directory — choose another --out")
    found = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found or cfg.resume is not None:
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"--out {run_dir} holds a previous run ({', '.join(found)}) — pass --resume auto to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    for name in found if delete else ():
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def write_record(metrics: Any, record: dict[str, Any], trackers: Trackers) -> None:
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
    trackers.log({k: v for k, v in record.items() if k not in ("split", "step")}, record["step"])


def fit(ctx: Context) -> dict[str, Any]:
    """The training loop. Returns a summary (steps, best eval, stop reason, final directory)."""
    cfg, run_dir = ctx.cfg, ctx.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer, scheduler = build_optimizer(ctx)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.autocast_dtype == torch.float16)
    params = list(ctx.student.parameters()) + list(ctx.modules.parameters())
    step, cursor, best, bad_evals, best_kept = 0, (0, 0), math.inf, 0, math.inf
    found = load_resume_checkpoint(run_dir, cfg.resume, say)
    if found is not None:
        ckpt, state, meta = found
        try:
            ctx.student.load_state_dict(state["student"])
            ctx.modules.load_state_dict(state["modules"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{ckpt}: does not fit this run's student and settings ({str(exc).splitlines()[0][:200]}) — resume "
                "with the --student and --set values it was made with, or start again with --overwrite"
            ) from None
        step, cursor = meta["step"], tuple(meta["cursor"])
        best, bad_evals = meta["best_eval"], meta["bad_evals"]
        best_kept = meta.get("best_kept", best)
        say(f"resumed from {ckpt} at step {step}")
    else:
        torch.manual_seed(cfg.seed)
    main = ctx.world.main
    if main:
        write_run_config(ctx)
        if cfg.resume is not None:
            trim_metrics(run_dir / "metrics.jsonl", step)
    metrics = (run_dir / "metrics.jsonl").open("a") if main else None
    run_params = {"train": config_to_dict(cfg), "cache": describe_cache(ctx.reader.manifest), "steps": ctx.total_steps}
    trackers = open_trackers(cfg.report_to if main else [], run_dir, run_params, step if found is not None else None)
    stream = BatchStream(ctx, cursor)
    save_every = cfg.save_every or cfg.eval_every
    stop_reason, window, last_eval = "max_steps", ThroughputWindow(), None

    def checkpoint(reason: str) -> None:
        if not main:
            barrier(ctx.world)
            return
        state = {
            "student": ctx.student.state_dict(),
            "modules": ctx.modules.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": capture_rng(),
        }
        meta = {
            "step": step,
            "cursor": list(stream.cursor),
            "best_eval": best,
            "bad_evals": bad_evals,
            "best_kept": best_kept,
            "reason": reason,
            "total_steps": ctx.total_steps,
            "config": config_to_dict(cfg),
        }
        save_checkpoint(run_dir, step, state, meta, cfg.keep_checkpoints)
        barrier(ctx.world)

    ctx.student.train()
    ctx.modules.train()
    with StopSignal() as stop:
        while step < ctx.total_steps:
            # --- one optimizer step: weights from the curriculum, accumulate micro-batches
            weights = weights_at(step, ctx.total_steps, cfg.curriculum)
            step_start = time.perf_counter()
            step_logs: dict[str, float] = {}
            for _ in range(cfg.grad_accum):
                batch = stream.next()
                total, logs = compute_losses(ctx, batch, weights)
                scaler.scale(total / cfg.grad_accum).backward()
                window.tokens += batch.student_tokens
                for k, v in logs.items():
                    if isinstance(v, float):
                        step_logs[k] = step_logs.get(k, 0.0) + v / cfg.grad_accum
                    else:
                        step_logs[k] = v
            average_gradients(params, ctx.world)
            step_logs = average_logs(step_logs, ctx.world)
            scaler.unscale_(optimizer)
            if cfg.clip > 0:
                step_logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_step = step == ctx.total_steps
            # --- log
            if step % cfg.log_every == 0 or last_step or step == 1:
                tok_s = window.rate(sum_over_ranks(window.tokens, ctx.world))
                eta = (time.perf_counter() - step_start) * (ctx.total_steps - step)
                record = {"split": "train", "step": step, "lr": lr, "tokens_per_s": tok_s, **step_logs}
                write_record(metrics, record, trackers)
                say(
                    format_line(
                        step, ctx.total_steps, step_logs, lr, 1000 * (time.perf_counter() - step_start), tok_s, eta
                    )
                )
                window.reset()
            # --- eval, early stopping, checkpoint (outside the throughput window)
            stop_now = False
            if (step % cfg.eval_every == 0 or last_step) and len(ctx.eval_rows):
                if main:  # the other ranks wait for its decision
                    with window.pause():
                        result = evaluate(ctx)
                    last_eval = result["eval/loss"]
                    write_record(metrics, {"split": "eval", "step": step, **result}, trackers)
                    say(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.4g}" for k, v in result.items()))
                    if result["eval/loss"] < best_kept:  # whatever min_delta says
                        best_kept = result["eval/loss"]
                        with window.pause():
                            save_best(run_dir, ctx.student, ctx.tokenizer, ctx.modules, step, best_kept)
                    if result["eval/loss"] < best - cfg.min_delta:
                        best, bad_evals = result["eval/loss"], 0
                    elif step >= cfg.early_stop_warmup:
                        bad_evals += 1
                        if bad_evals >= cfg.patience:
                            stop_reason, stop_now = "early_stopping", True
                            say(f"early stopping at step {step}: no improvement in {bad_evals} evals")
                best, bad_evals, stop_reason, stop_now = share_from_main(
                    (best, bad_evals, stop_reason, stop_now), ctx.world
                )
            if step % save_every == 0 and not last_step:
                with window.pause():
                    checkpoint("periodic")
            if any_rank(stop.received is not None, ctx.world):
                stop.received = share_from_main(stop.received or int(signal.SIGTERM), ctx.world)
                checkpoint(f"signal {stop.received}")
                stop_reason = "signal"
                break
            if stop_now:
                break
    stream.close()
    if metrics is not None:
        metrics.close()
    trackers.close()
    summary = {"steps": step, "total_steps": ctx.total_steps, "best_eval": best, "stop_reason": stop_reason}
    if stop_reason != "signal":
        final = run_dir / "final"
        summary["final_choice"] = choose_final(cfg, run_dir, step, best_kept, last_eval) if main else {}
        if main:
            save_final(run_dir, ctx.student, ctx.tokenizer, ctx.modules, summary, summary["final_choice"])
            say(f"final/: step {summary['final_choice']['step']} ({summary['final_choice']['reason']})")
        summary["final"] = str(final)
    else:
        summary["signal"] = stop.received
    barrier(ctx.world)
    leave_world(ctx.world)
    return summary


def run(cfg: TrainConfig) -> dict[str, Any]:
    """``distill train``: setup, then fit."""
    return fit(setup(cfg))
