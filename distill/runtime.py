"""Where and how this process runs: its device, its dtype, its rank under torchrun, whether it is rank 0.

Both stages and the CLI ask these questions; this module answers them once (torchrun's environment:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Joining the process group is stage 2's (pipeline/train/distributed.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from distill.config import ConfigError


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


def resolve_autocast(name: str, device: torch.device) -> torch.dtype | None:
    """Stage 2's autocast dtype for ``--set precision``: as ``resolve_dtype``, None for plain fp32."""
    dtype = resolve_dtype(name, device)
    return None if dtype == torch.float32 else dtype


DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a job; a plain process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes logs and checkpoints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def launched_world() -> World:
    """The ranks torchrun describes in the environment; ``World()`` when not launched by torchrun."""
    ranks = torchrun_rank()
    if ranks is None:
        return World()
    return World(ranks[0], ranks[1], int(os.environ.get("LOCAL_RANK", "0")))


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (they stay quiet: rank 0 prints and writes)."""
    return launched_world().main


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and torchrun_rank() is not None:
        return torch.device("cuda", launched_world().local_rank)
    return device
