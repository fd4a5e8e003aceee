"""Stage 2 — ``distill train``: the student and its student-aware router against the teacher cache.

    distill train --cache cache/wt103 --student HuggingFaceTB/SmolLM-135M --out runs/smol \
        --config configs/reference.yaml

``setup`` (train/setup.py) loads the store (checked against what the run's loss terms need, see
terms.py), the student, the alignment to the teacher's tokenizer and the trainable modules; ``fit``
is the one training loop: per optimizer step the curriculum gives the term weights and ``train_step``
reads micro-batches (ahead of time, on a thread: batches.py), pushes them through the student and
the loss terms whose weight is > 0, accumulates gradients, clips them, steps the optimizer and the
schedule; every ``log_every`` steps one line and one metrics record, every ``eval_every`` an eval on
held-out rows and a checkpoint.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distill.config import TrainConfig, config_to_dict
from distill.curriculum import eval_weights, weights_at
from distill.pipeline.tracking import describe_cache, open_trackers
from distill.pipeline.train.batches import BatchStream
from distill.pipeline.train.checkpoint import (
    CheckpointError,
    capture_rng,
    load_resume_checkpoint,
    restore_rng,
    save_best,
    save_checkpoint,
    save_final,
)
from distill.pipeline.train.distributed import (
    any_rank,
    average_logs,
    barrier,
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    is_sharded,
    leave_world,
    load_full_state,
    share_from_main,
    sum_over_ranks,
)
from distill.pipeline.train.mixing import MixedRowOrder
from distill.pipeline.train.progress import Pace, StopSignal, ThroughputWindow, format_line, say
from distill.pipeline.train.run_dir import choose_final, lock_run_dir, trim_metrics, write_record, write_run_config
from distill.pipeline.train.setup import Run, setup
from distill.runtime import is_main_process

# --- the step -------------------------------------------------------------------------------


@dataclass
class Optimization:
    """AdamW, its schedule, the fp16 loss scaler (a no-op in fp32/bf16) and the parameters they update."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]


def build_optimizer(run: Run) -> Optimization:
    """AdamW: student and router/projector groups, no decay on biases and norms; warmup + cosine in optimizer steps."""
    cfg, learner = run.cfg, run.learner

    def groups(module: nn.Module, lr: float) -> list[dict[str, Any]]:
        decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() < 2]
        return [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]

    param_groups = groups(learner.student, cfg.lr) + groups(learner.aux, cfg.router_lr)
    optimizer = torch.optim.AdamW([g for g in param_groups if g["params"]])
    warmup = max(1, round(cfg.warmup * run.total_steps)) if cfg.warmup > 0 else 0

    def factor(step: int) -> float:  # step = optimizer steps done; the first update uses factor(0) > 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, run.total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler(learner.device.type, enabled=learner.autocast_dtype == torch.float16)
    return Optimization(optimizer, scheduler, scaler, list(learner.parameters()))


@dataclass
class StepResult:
    logs: dict[str, Any]  # loss/<term>, weight/<term>, weighted/<term>, aligned_share, expert_usage, grad_norm
    tokens: int  # student tokens of this rank's micro-batches
    lr: float  # the student's learning rate of this update


def train_step(run: Run, opt: Optimization, stream: BatchStream, weights: dict[str, float]) -> StepResult:
    """One optimizer step: ``grad_accum`` micro-batches forward and backward through ``run.model`` (the learner,
    or DDP / FSDP2 around it, which average the gradients over ranks during the last backward), clipping, the
    optimizer and the schedule step. The logs are means over micro-batches and ranks."""
    cfg = run.cfg
    logs: dict[str, Any] = {}
    tokens = 0
    for micro_step in range(cfg.grad_accum):
        batch = stream.next()
        with gradient_sync(run.model, enabled=micro_step == cfg.grad_accum - 1):  # averaged over ranks once a step
            total, micro = run.model(batch, weights)
            opt.scaler.scale(total / cfg.grad_accum).backward()
        tokens += batch.student_tokens
        for k, v in micro.items():
            logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum if isinstance(v, float) else v
    logs = average_logs(logs, run.world)
    opt.scaler.unscale_(opt.optimizer)
    if cfg.clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(opt.params, cfg.clip)
        logs["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    lr = opt.optimizer.param_groups[0]["lr"]
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    opt.optimizer.zero_grad(set_to_none=True)
    return StepResult(logs, tokens, lr)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Held-out kd and lm with fixed weights (base kd weight), so evals are comparable across the run. Rank 0
    evaluates alone, except under FSDP2, where every rank takes part in gathering the weights."""
    learner = run.learner  # not the DDP wrapper: an eval forward must not touch its gradient bookkeeping
    learner.eval()
    fixed = eval_weights(run.cfg.curriculum)
    sums: dict[str, float] = {}
    count = 0
    for start in range(0, len(run.eval_rows), run.cfg.batch_size):
        batch = run.eval_batches.prepare_batch(run.eval_rows[start : start + run.cfg.batch_size])
        _, logs = learner(batch, fixed)
        for key in ("loss/total", "loss/lm", "loss/kd", "aligned_share"):
            if key in logs:
                sums[key] = sums.get(key, 0.0) + logs[key]
        count += 1
    learner.train()
    return {f"eval/{k.split('/')[-1] if k != 'loss/total' else 'loss'}": v / max(1, count) for k, v in sums.items()}


# --- the loop state and its checkpoints -----------------------------------------------------


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint's meta.json, so that a resumed run replays nothing."""

    step: int = 0
    cursor: Any = (0, 0)  # (epoch, index) of the row order after the batches consumed; a dict for several stores
    best: float = math.inf  # the best eval loss by early stopping's rule (improvement > min_delta)
    bad_evals: int = 0
    best_kept: float = math.inf  # the eval loss of checkpoints/best


def load_loop_state(run: Run, opt: Optimization) -> tuple[LoopState, bool]:
    """The state of the checkpoint ``--resume`` names, loaded into the learner and the optimizer (and whether one
    was found); else a fresh state, with torch seeded for dropout."""
    found = load_resume_checkpoint(run.run_dir, run.cfg.resume, say)
    if found is None:
        torch.manual_seed(run.cfg.seed)
        return LoopState(), False
    ckpt, tensors, meta = found
    if meta["step"] > run.total_steps:
        raise CheckpointError(
            f"{ckpt}: at step {meta['step']}, past this run's {run.total_steps} steps — pass --max-steps "
            f"{meta['step']} or more, or start a new run"
        )
    model_state = {**prefixed("student.", tensors["student"]), **prefixed("aux.", tensors["modules"])}
    try:
        load_full_state(run.model, opt.optimizer, model_state, tensors["optimizer"])
        opt.scheduler.load_state_dict(tensors["scheduler"])
        opt.scaler.load_state_dict(tensors["scaler"])
        restore_rng(tensors["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"{ckpt}: does not fit this run's student and settings ({str(exc).splitlines()[0][:200]}) — resume "
            "with the --student and --set values it was made with, or start again with --overwrite"
        ) from None
    best = meta["best_eval"]
    cursor = meta["cursor"] if isinstance(meta["cursor"], dict) else tuple(meta["cursor"])
    state = LoopState(meta["step"], cursor, best, meta["bad_evals"], meta.get("best_kept", best))
    say(f"resumed from {ckpt} at step {state.step}")
    return state, True


def prefixed(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {prefix + key: value for key, value in state.items()}


def unprefixed(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def save_loop_state(run: Run, opt: Optimization, state: LoopState, reason: str) -> None:
    """A checkpoint of the learner, the optimizer and the loop state (rank 0 writes; every rank waits; under
    FSDP2 every rank first takes part in gathering the state, [sharded-state note] in distributed.py)."""
    if run.world.main or is_sharded(run.model):
        model_state = full_model_state(run.model)
        optimizer_state = full_optimizer_state(run.model, opt.optimizer)
    if run.world.main:
        tensors = {
            "student": unprefixed("student.", model_state),
            "modules": unprefixed("aux.", model_state),
            "optimizer": optimizer_state,
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "rng": capture_rng(),
        }
        meta = {
            "step": state.step,
            "cursor": state.cursor if isinstance(state.cursor, dict) else list(state.cursor),
            "best_eval": state.best,
            "bad_evals": state.bad_evals,
            "best_kept": state.best_kept,
            "reason": reason,
            "total_steps": run.total_steps,
            "config": config_to_dict(run.cfg),
        }
        save_checkpoint(run.run_dir, state.step, tensors, meta, run.cfg.keep_checkpoints)
    barrier(run.world)


# --- the loop -------------------------------------------------------------------------------


def fit(run: Run) -> dict[str, Any]:
    """The training loop. Returns a summary (steps, best eval, stop reason, final directory)."""
    cfg, world, learner, run_dir = run.cfg, run.world, run.learner, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = build_optimizer(run)
    state, resumed = load_loop_state(run, opt)
    main, sharded = world.main, is_sharded(run.model)
    if main:
        extra = {"total_steps": run.total_steps, "world_size": world.size, "eval_rows": run.eval_rows.tolist()}
        extra |= {"eval_source": cfg.eval_cache or cfg.stores[0], "cache_manifest": run.manifest}
        if run.manifests is not None:
            extra["cache_manifests"] = run.manifests
        write_run_config(run_dir, cfg, learner.facts, extra)
        if cfg.resume is not None:
            trim_metrics(run_dir / "metrics.jsonl", state.step)
    metrics = (run_dir / "metrics.jsonl").open("a") if main else None
    run_params = {"train": config_to_dict(cfg), "cache": describe_cache(run.manifest), "steps": run.total_steps}
    trackers = open_trackers(cfg.report_to if main else [], run_dir, run_params, state.step if resumed else None)
    rows = run.train_rows
    if run.mixed_rows is not None:  # several stores, drawn by weight ([mix note] in mixing.py)
        rows = MixedRowOrder(run.mixed_rows.rows, run.mixed_rows.weights, cfg.seed, state.cursor)
    stream = BatchStream(
        run.batches.prepare_batch, rows, cfg.seed, cfg.batch_size, world, cfg.num_workers_prefetch, state.cursor
    )
    save_every = cfg.save_every or cfg.eval_every
    stop_reason, window, pace, last_eval = "max_steps", ThroughputWindow(), Pace(), None
    learner.train()
    with StopSignal() as stop:
        while state.step < run.total_steps:
            # --- one optimizer step: weights from the curriculum, micro-batches accumulated
            weights = weights_at(state.step, run.total_steps, cfg.curriculum)
            step_start = time.perf_counter()
            result = train_step(run, opt, stream, weights)
            step_s = time.perf_counter() - step_start
            pace.add(step_s, result.logs["loss/total"])
            window.tokens += result.tokens
            state.step, state.cursor = state.step + 1, stream.cursor
            step, last_step = state.step, state.step == run.total_steps
            # --- log
            if step % cfg.log_every == 0 or last_step or step == 1:
                tok_s = window.rate(sum_over_ranks(window.tokens, world))
                record = {"split": "train", "step": step, "lr": result.lr, "tokens_per_s": tok_s, **result.logs}
                write_record(metrics, record, trackers)
                eta, smoothed = pace.eta(run.total_steps - step), pace.smoothed_loss
                say(format_line(step, run.total_steps, result.logs, result.lr, 1000 * step_s, tok_s, smoothed, eta))
                window.reset()
            # --- eval, early stopping, checkpoint (outside the throughput window)
            stop_now = False
            if (step % cfg.eval_every == 0 or last_step) and len(run.eval_rows):
                keep_best = False
                if main or sharded:  # under FSDP2 every rank takes part in the eval's forwards
                    with window.pause():
                        result_eval = evaluate(run)
                if main:  # the other ranks wait for its decisions
                    last_eval = result_eval["eval/loss"]
                    write_record(metrics, {"split": "eval", "step": step, **result_eval}, trackers)
                    say(f"eval step {step}: " + " ".join(f"{k[5:]} {v:.4g}" for k, v in result_eval.items()))
                    keep_best = last_eval < state.best_kept  # whatever min_delta says
                    state.best_kept = last_eval if keep_best else state.best_kept
                    if last_eval < state.best - cfg.min_delta:
                        state.best, state.bad_evals = last_eval, 0
                    elif step >= cfg.early_stop_warmup:
                        state.bad_evals += 1
                        if state.bad_evals >= cfg.patience:
                            stop_reason, stop_now = "early_stopping", True
                            say(f"early stopping at step {step}: no improvement in {state.bad_evals} evals")
                keep_best, state.best, state.best_kept, state.bad_evals, stop_reason, stop_now = share_from_main(
                    (keep_best, state.best, state.best_kept, state.bad_evals, stop_reason, stop_now), world
                )
                if keep_best:
                    with window.pause():
                        gathered = full_model_state(run.model) if sharded else None  # [sharded-state note]
                        if main:
                            save_best(run_dir, learner.student, run.tokenizer, learner.aux, step, state.best_kept,
                                      gathered)  # fmt: skip
            if (step % save_every == 0 and not last_step) or (last_step and cfg.checkpoint_last):
                with window.pause():
                    save_loop_state(run, opt, state, "last step" if last_step else "periodic")
            if any_rank(stop.received is not None, world):
                stop.received = share_from_main(stop.received or int(signal.SIGTERM), world)
                save_loop_state(run, opt, state, f"signal {stop.received}")
                stop_reason = "signal"
                break
            if stop_now:
                break
    stream.close()
    if metrics is not None:
        metrics.close()
    trackers.close()
    summary = {"steps": state.step, "total_steps": run.total_steps, "best_eval": state.best, "stop_reason": stop_reason}
    if stop_reason != "signal":
        choice = choose_final(cfg, run_dir, state.step, state.best_kept, last_eval) if main else None
        summary["final_choice"] = choice = share_from_main(choice, world)
        gathered = full_model_state(run.model) if sharded and choice["reason"] != "best eval loss" else None
        if main:
            save_final(run_dir, learner.student, run.tokenizer, learner.aux, summary, choice, gathered)
            say(f"final/: step {choice['step']} ({choice['reason']})")
        summary["final"] = str(run_dir / "final")
    else:
        summary["signal"] = stop.received
    # [teardown note] DDP's reducer holds the process group: freed after destroy_process_group, when a peer may
    # have exited, gloo's destructor can wait forever for its worker threads. So the wrapper goes first, while
    # every rank is still here.
    run.model = run.learner
    gc.collect()
    barrier(world)
    leave_world(world)
    return summary


def run(cfg: TrainConfig) -> dict[str, Any]:
    """``distill train``: setup, then fit, holding the run directory's lock (rank 0) throughout."""
    with lock_run_dir(Path(cfg.out)) if is_main_process() else contextlib.nullcontext():
        return fit(setup(cfg))
