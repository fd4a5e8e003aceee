"""Data parallelism under ``torchrun``: which rank does what, gradient and log averaging.

    torchrun --nproc_per_node 2 -m distill.cli train --cache ... --student ... --out ...

Every rank runs the same loop on different micro-batches: of the run's global sequence of
micro-batches (one order, from the seed), rank r takes those with index r mod W. With W ranks
and ``grad_accum`` A, one optimizer step covers the same A x W micro-batches, with the same
weights, as a single process with ``grad_accum`` A x W: gradients are summed over ranks and
divided by W after accumulation (one all-reduce per optimizer step), and the logged values are
averaged the same way. Only rank 0 writes logs, evaluates and checkpoints; its decisions
(early stop, signals) are shared so that every rank stops at the same step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def init_world(device: str) -> World:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPUs)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def average_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum every gradient over ranks and divide by W, in one flat all-reduce.

    A parameter without a gradient on every rank stays without one (AdamW then skips it, as a
    single process would); one with a gradient on some rank gets zeros elsewhere.
    """
    if not world.active:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    used = [p for p, h in zip(params, has.tolist()) if h > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not used:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in used])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for p in used:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def average_logs(logs: dict[str, Any], world: World) -> dict[str, Any]:
    """Mean of each float log value over ranks (lists and other values are rank 0's)."""
    if not world.active:
        return logs
    keys = sorted(k for k, v in logs.items() if isinstance(v, float))
    values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {**logs, **{k: float(v) / world.size for k, v in zip(keys, values)}}


def sum_over_ranks(value: float, world: World) -> float:
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def share_from_main(obj: Any, world: World) -> Any:
    """Rank 0's value of ``obj`` on every rank."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, world: World) -> bool:
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t > 0)


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def leave_world(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
