"""Where and how this process runs: its device, its dtype, its rank under torchrun.

Both stages and the CLI ask these questions; this module answers them once.
"""

from __future__ import annotations

import os

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


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a bare ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
    local_rank = os.environ.get("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        return torch.device("cuda", int(local_rank))
    return device
