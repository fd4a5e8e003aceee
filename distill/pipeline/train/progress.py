"""What a stage-2 run shows while it runs: the log line, the throughput window, rank-0 printing, and the
signal flag that turns SIGINT/SIGTERM into a checkpoint at the next step boundary."""

from __future__ import annotations

import contextlib
import signal
import time
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
