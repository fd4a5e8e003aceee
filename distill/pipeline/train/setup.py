"""Stage 2 setup: load and check everything ``distill train`` needs before its first step.

    run = setup(cfg)      # Run: the learner (student + added modules), the batchers, the rows, the step count

Every problem (a missing store field, a tokenizer that cannot reproduce its text, a temperature the
store lacks) is reported here, not mid-run. What each loss term needs is the term table's answer
(pipeline/train/terms.py).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from distill.cache.info import measure_head_mass
from distill.cache.reader import CacheReader
from distill.cache.schema import STATS_GROUP, root_array_path
from distill.cache.targets import kind_of
from distill.cache.verify import check_store
from distill.config import ConfigError, TrainConfig
from distill.pipeline.eval.preflight import compare_teacher_and_student, describe_comparison
from distill.pipeline.losses.hidden_targets import TARGET_CLIP, describe_clip_share, hidden_target_scale
from distill.pipeline.losses.representation import build_layer_map
from distill.pipeline.text.align import is_same_tokenizer, load_or_build_vocab_map, pad_vocab_map
from distill.pipeline.text.packing import check_packed_forward
from distill.pipeline.text.prefix_map import load_or_build_prefix_map
from distill.pipeline.text.tokens import check_tokenizer
from distill.pipeline.tracking import require_trackers
from distill.pipeline.train.batches import Batcher
from distill.pipeline.train.distributed import init_world, wrap_for_ranks
from distill.pipeline.train.learner import Learner
from distill.pipeline.train.mixing import MixedTeacher, check_stores_agree, describe_rollout
from distill.pipeline.train.progress import say
from distill.pipeline.train.run_dir import check_resume_settings, prepare_run_dir
from distill.pipeline.train.signals import (
    CachedTeacher,
    LiveTeacher,
    SignalSource,
    live_teacher_source,
    signal_fields,
)
from distill.pipeline.train.step_view import TeacherFacts
from distill.pipeline.train.terms import KD_MODES, BuildInputs, build_modules, check_layout, needed_signals
from distill.runtime import World, rank_device, resolve_autocast, resolve_device


@dataclass
class Run:
    """What ``setup`` builds for the loop."""

    cfg: TrainConfig
    world: World
    learner: Learner  # the student, the modules beside it, the teacher-side facts; its forward is the loss
    model: nn.Module  # what the step calls: the learner, or DDP / FSDP2 around it under torchrun
    tokenizer: Any  # the student's
    batches: Batcher  # training rows -> batches
    eval_batches: Batcher  # held-out rows -> batches
    train_rows: np.ndarray
    eval_rows: np.ndarray
    total_steps: int
    manifest: dict[str, Any]  # the primary training store's
    manifests: list[dict[str, Any]] | None = None  # with several --cache: every store's, in --cache order
    mixed_rows: MixedRows | None = None  # with several --cache: what the stream draws from ([mix note] in mixing.py)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)


@dataclass
class MixedRows:
    """Each store's training rows (its own ids) and its share of every batch."""

    rows: list[np.ndarray]
    weights: list[float]


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


def warn_small_head(reader: CacheReader, temperature: float) -> None:
    """Say so when the stored top-K hold under half the teacher's mass at ``temperature`` ([head-mass note])."""
    if kind_of(reader.layout).sampled:  # an unbiased estimate of the full KL: no head to warn about
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


def report_preflight(cfg: TrainConfig) -> None:
    """The teacher against the student on a few held-out rows, one line; a warning when KD may not pay."""
    report = compare_teacher_and_student(
        cfg.eval_cache or cfg.cache, cfg.student, cfg.preflight_rows, Path(cfg.out) / "vocab_map"
    )
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "preflight.json").write_text(json.dumps(report, indent=2) + "\n")
    prefix = "preflight" if report["verdict"] == "better" else "warning"
    print(f"{prefix}: {describe_comparison(report)}", file=sys.stderr, flush=True)


def setup(cfg: TrainConfig) -> Run:
    """Load and check everything before the first step; every problem is reported here, not mid-run."""
    cfg.require_io()
    require_trackers(cfg.report_to)
    world = init_world(cfg.device)
    device = rank_device(resolve_device(cfg.device))  # under torchrun a bare cuda is this rank's GPU
    prepare_run_dir(cfg, delete=world.main)  # every rank refuses alike; only rank 0 deletes
    for url in filter(None, (*cfg.stores, cfg.eval_cache)):
        check_store(url, cfg.verify_cache)
    readers = [CacheReader(url) for url in cfg.stores]
    reader = readers[0]  # the primary store: held-out rows, the teacher's facts
    if cfg.resume is not None:  # before the model loads: the same store(s) and student, other changes named
        check_resume_settings(cfg, [r.manifest for r in readers], say)
    eval_reader = CacheReader(cfg.eval_cache) if cfg.eval_cache else None
    need = needed_signals(cfg)
    fields = signal_fields(reader.layout, need)
    for store in filter(None, (*readers, eval_reader)):
        store.require_fields(fields, "needed by the enabled loss terms")
    check_stores_agree(readers, need)
    t_index = reader.temperature_index(cfg.temperature) if "kd" in need else 0
    if "kd" in need and KD_MODES[cfg.kd_mode].tail_bin and world.main:
        warn_small_head(reader, cfg.temperature)
    check_layout(cfg, reader.layout)
    student, tokenizer = load_student(cfg, "attention" in need, device)
    if any(store.packed for store in filter(None, (reader, eval_reader))):
        try:
            check_packed_forward(student, f"--student {cfg.student}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if world.main and need and cfg.preflight_rows and not cfg.resume and not cfg.live_teacher:
        report_preflight(cfg)
    facts = load_teacher_facts(cfg, reader, tokenizer, student.config.num_hidden_layers, need, t_index, device)
    aux = build_modules(BuildInputs(cfg, reader.layout, student, facts.layer_map)).to(device)
    autocast_dtype = resolve_autocast(cfg.precision, device)
    if world.active and cfg.parallel == "fsdp" and autocast_dtype == torch.float16:
        raise ConfigError(
            "--set parallel=fsdp: fp16 needs a loss scaler that knows the shards; pass --set precision=bf16 or fp32"
        )
    learner = Learner(cfg, student, aux, facts, device, autocast_dtype)
    train_rows, eval_rows = split_rows(reader, eval_reader, cfg.eval_fraction)
    if cfg.eval_rows is not None:
        eval_rows = eval_rows[: cfg.eval_rows]
    mixed = None
    if len(readers) > 1:  # every row of an added store trains; store 0 keeps its held-out rows
        mixed = MixedRows([train_rows, *(r.row_ids for r in readers[1:])], cfg.store_weights)
        say(describe_mix(readers, mixed, cfg.continuation_only))
    rows_per_epoch = sum(len(r) for r in mixed.rows) if mixed else len(train_rows)
    steps_per_epoch = max(1, rows_per_epoch // (cfg.batch_size * cfg.grad_accum * world.size))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    max_length = cfg.student_max_length or int(getattr(student.config, "max_position_embeddings", 2048))
    if world.main:
        warn_if_rows_are_cut(reader, train_rows, tokenizer, max_length)
    source: SignalSource = CachedTeacher(reader, fields)
    eval_source: SignalSource = CachedTeacher(eval_reader or reader, fields)
    if cfg.live_teacher:
        source = LiveTeacher(live_teacher_source(cfg, reader.manifest), reader, device, fields)
        eval_source = source.on(eval_reader or reader)
    if mixed is not None:
        live = source if isinstance(source, LiveTeacher) else None
        source = MixedTeacher([source, *(live.on(r) if live else CachedTeacher(r, fields) for r in readers[1:])])
    same, only = facts.same_tokenizer, cfg.continuation_only
    return Run(
        cfg=cfg,
        world=world,
        learner=learner,
        model=wrap_for_ranks(learner, world, cfg.parallel),
        tokenizer=tokenizer,
        batches=Batcher(source, tokenizer, max_length, same, only),
        eval_batches=Batcher(eval_source, tokenizer, max_length, same, only),
        train_rows=train_rows,
        eval_rows=eval_rows,
        total_steps=total,
        manifest=reader.manifest,
        manifests=[r.manifest for r in readers] if mixed else None,
        mixed_rows=mixed,
    )


def describe_mix(readers: list[CacheReader], mixed: MixedRows, continuation_only: bool) -> str:
    """One line: each store, its share of every batch, its training rows, and who wrote a rollout store's text."""
    parts = []
    for reader, rows, weight in zip(readers, mixed.rows, mixed.weights):
        rollout = (reader.manifest.get("dataset") or {}).get("rollout")
        origin = f", {describe_rollout(rollout)}" if rollout else ""
        origin += ", continuation only" if rollout and continuation_only else ""
        parts.append(f"{reader.url} {weight:.0%} ({len(rows):,} rows{origin})")
    return "training on several stores, share of every batch: " + "; ".join(parts)


def load_teacher_facts(
    cfg: TrainConfig,
    reader: CacheReader,
    tokenizer: Any,
    student_layers: int,
    need: set[str],
    t_index: int,
    device: torch.device,
) -> TeacherFacts:
    """The vocabulary map, the layer maps and the hidden-state statistics the terms read."""
    teacher_tokenizer = reader.load_tokenizer()
    same = is_same_tokenizer(teacher_tokenizer, tokenizer)
    vocab_map = None
    if not same:
        vocab_map = torch.from_numpy(
            pad_vocab_map(
                load_or_build_vocab_map(teacher_tokenizer, tokenizer, Path(cfg.out) / "vocab_map"),
                reader.manifest["teacher"]["vocab_size"],
            )
        )
    layout = reader.layout
    hidden_layers = [layer for layer in layout["hidden_layers"] if layer > 0]
    depth = reader.manifest["teacher"]["num_hidden_layers"]
    layer_map = build_layer_map(student_layers, hidden_layers, depth) if hidden_layers else {}
    attention_map = build_layer_map(student_layers, layout["attention_layers"], depth) if "attention" in need else {}
    stats = {}
    if "hidden" in need:
        for layer in layout["hidden_layers"]:
            mean, std = (reader.root_array(root_array_path(STATS_GROUP, layer, s)) for s in ("mean", "std"))
            mean, std = torch.from_numpy(mean).to(device), torch.from_numpy(std).to(device)
            stats[layer] = (mean, std, hidden_target_scale(std))
        say_hidden_clip_share(reader.manifest)
    prefix_bins = None
    if not same and KD_MODES[cfg.kd_mode].head_pass.prefix_bins and "kd" in need:
        pmap = load_or_build_prefix_map(teacher_tokenizer, tokenizer, Path(cfg.out) / "vocab_map")
        pmap = pmap.padded(reader.manifest["teacher"]["vocab_size"], len(tokenizer))
        arrays = (pmap.teacher_bin, pmap.student_bin, pmap.teacher_bin_size)
        prefix_bins = tuple(torch.from_numpy(a).to(device) for a in arrays)
    return TeacherFacts(same, vocab_map, t_index, layer_map, attention_map, stats, prefix_bins)


def say_hidden_clip_share(manifest: dict[str, Any]) -> None:
    """Print the share of the hidden targets' values clipped ([target-clip note] in hidden_targets.py), measured on the
    store's calibration rows; stores made before the measure existed have none."""
    calibration = manifest.get("calibration") or {}
    shares = calibration.get("hidden_clip_share")
    if shares is None:
        say(f"hidden targets: clipped at ±{TARGET_CLIP:g} std per dimension; this store does not record how often")
        return
    say(
        f"hidden targets: share clipped at ±{TARGET_CLIP:g} std per dimension on the calibration rows: "
        + describe_clip_share(shares)
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
