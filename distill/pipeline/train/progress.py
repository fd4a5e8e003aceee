"""What a stage-2 run shows while it runs: the log line (with the smoothed loss and the ETA of ``Pace``), the
throughput window, rank-0 printing, and the signal flag that turns SIGINT/SIGTERM into a checkpoint at the next
step boundary."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections import deque
from collections.abc import Sequence
from typing import Any


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
    step: int,
    total: int,
    logs: dict[str, Any],
    lr: float,
    step_ms: float,
    tok_s: float,
    smoothed: float,
    eta_s: float | None,
) -> str:
    """One dense line: ``step 00420/10000 (4.2%) | loss 2.31 (kd 1.9 lm 2.72) | ema 2.35 | lr 0.0003 | 212ms |
    tok/s 38,211 | aligned 0.97 | eta 34m``; ``ema`` is ``Pace.smoothed_loss``, ``eta`` is ``?`` during warm-up."""
    terms = " ".join(
        f"{k.split('/')[1]} {v:.3g}" for k, v in logs.items() if k.startswith("loss/") and k != "loss/total"
    )
    return (
        f"step {step:05d}/{total} ({100 * step / total:.1f}%) | loss {logs['loss/total']:.4g} ({terms}) | "
        f"ema {smoothed:.4g} | lr {lr:.3g} | {step_ms:.0f}ms | tok/s {tok_s:,.0f} | "
        f"aligned {logs['aligned_share']:.2f} | eta {format_duration(eta_s)}"
    )


def format_duration(seconds: float | None) -> str:
    """``45s``, ``34m``, ``2h05m``; ``?`` when not known yet."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = round(seconds / 60)
    return f"{minutes}m" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


# --- the smoothed loss and the ETA ----------------------------------------------------------------

LOSS_EMA_BETA = 0.9  # the smoothed loss remembers about the last 10 steps
ETA_WARMUP_STEPS = 3  # a process's first steps (compilation, allocator, first batches) are not timed for the ETA
ETA_RECENT_STEPS = 50  # the ETA's mean step time is over the last 50 timed steps, so it follows a change of speed


def update_ema(ema: float, value: float, beta: float = LOSS_EMA_BETA) -> float:
    """One step of an exponential moving average that starts at 0: ``beta * ema + (1 - beta) * value``."""
    return beta * ema + (1 - beta) * value


def debias_ema(ema: float, updates: int, beta: float = LOSS_EMA_BETA) -> float:
    """The EMA after ``updates`` steps from 0, divided by ``1 - beta ** updates``: a weighted mean of the values
    seen (weights ``beta ** age``), not pulled towards the starting 0 in the first steps."""
    return ema / (1 - beta**updates)


def eta_seconds(step_times: Sequence[float], steps_left: int) -> float | None:
    """Seconds to the last step: the mean of ``step_times`` times ``steps_left``; None with no times yet."""
    return steps_left * sum(step_times) / len(step_times) if step_times else None


class Pace:
    """The loop's smoothed loss and ETA, fed once per optimizer step with its wall time and total loss.

    The smoothed loss is a bias-corrected EMA of the per-step total loss (``LOSS_EMA_BETA``, every step, not
    only logged ones). The ETA is the mean time of the last ``ETA_RECENT_STEPS`` steps after this process's
    first ``ETA_WARMUP_STEPS`` (compilation and first batches are slow), times the steps left; eval and checkpoint
    time is not in a step's time. Both start again in a resumed process."""

    def __init__(self, warmup: int = ETA_WARMUP_STEPS, recent: int = ETA_RECENT_STEPS) -> None:
        self.warmup, self.seen, self.ema, self.updates = warmup, 0, 0.0, 0
        self.times: deque[float] = deque(maxlen=recent)

    def add(self, step_s: float, loss: float) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.times.append(step_s)
        if math.isfinite(loss):  # a non-finite step (skipped by the fp16 scaler) would poison the average
            self.ema, self.updates = update_ema(self.ema, loss), self.updates + 1

    @property
    def smoothed_loss(self) -> float:
        return debias_ema(self.ema, self.updates) if self.updates else math.nan

    def eta(self, steps_left: int) -> float | None:
        return eta_seconds(self.times, steps_left)


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
