"""Data parallelism under ``torchrun``: which rank does what, torch's wrappers, log averaging.

    torchrun --nproc_per_node 2 -m distill.cli train --cache ... --student ... --out ...            # DDP
    torchrun --nproc_per_node 8 -m distill.cli train ... --set parallel=fsdp                         # FSDP2

Every rank runs the same loop on different micro-batches: of the run's global sequence of
micro-batches (one order, from the seed), rank r takes those with index r mod W. With W ranks
and ``grad_accum`` A, one optimizer step covers the same A x W micro-batches, with the same
weights, as a single process with ``grad_accum`` A x W: the wrapper averages gradients over ranks
during the backward of the step's last micro-batch (``gradient_sync``; the others accumulate
locally), and the logged values are averaged the same way. ``parallel=ddp`` keeps a whole replica
of the student, its modules and the optimizer state on each rank; ``parallel=fsdp`` (FSDP2
``fully_shard``, one unit per transformer block + the rest) keeps 1/W of each and gathers a
block's weights only while it runs. Rank 0 writes logs and checkpoints; its decisions (early stop,
signals) are shared so that every rank stops at the same step. See docs/scaling.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from distill.runtime import World, launched_world


def init_world(device: str) -> World:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPUs); which rank this is comes
    from runtime.py."""
    launched = launched_world()
    if not launched.active:
        return World()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), launched.local_rank)


def wrap_for_ranks(learner: nn.Module, world: World, parallel: str) -> nn.Module:
    """The module the step calls: ``learner`` itself in one process; under torchrun DDP or FSDP2 around it.

    The whole learner (student, its added modules, the loss) is wrapped, so that every parameter the loss
    touches is synchronized. Terms turn on and off along the curriculum, so some parameters get no gradient
    in a step: DDP looks for them (``find_unused_parameters``) and leaves a parameter without a gradient on
    every rank without one, as one process would (AdamW then skips it). FSDP2 shards every transformer block
    of the student (its ``_no_split_modules``) as a unit and the rest (embeddings, output layer, router,
    projections) as the root unit. Build the optimizer after this: FSDP2 replaces the parameters."""
    if not world.active:
        return learner
    if parallel == "fsdp":
        for block in find_blocks(learner):
            fully_shard(block)
        fully_shard(learner)
        return learner
    # Every rank builds the same modules from the same seed and checkpoint: no buffer broadcast per step.
    return DistributedDataParallel(learner, find_unused_parameters=True, broadcast_buffers=False)


def find_blocks(learner: nn.Module) -> list[nn.Module]:
    """The student's transformer blocks: the modules whose class its ``_no_split_modules`` names."""
    student = getattr(learner, "student", learner)
    names = set(getattr(student, "_no_split_modules", None) or ())
    return [module for module in student.modules() if type(module).__name__ in names]


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Averaging of the gradients over ranks during this backward on (the step's last micro-batch) or off
    (the others: gradients accumulate locally, no communication)."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The learner inside a DDP wrapper (FSDP2 wraps in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# [sharded-state note] Under FSDP2 each rank holds 1/W of every parameter and of its optimizer state, as
# DTensors. A checkpoint holds the full tensors (the same files as DDP or one process write, so `distill eval`
# and HF tools read them alike): every rank takes part in gathering them, rank 0 receives them (on CPU) and
# writes; on resume every rank reads the full state and keeps its shard. The optimizer state is keyed by
# parameter name under FSDP2 (by position otherwise), so a checkpoint resumes under the wrapper it was made with.
GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The learner's state dict (``student.*``, ``aux.*``); under FSDP2 a collective: call it on every rank,
    rank 0 gets the tensors, the others an empty dict."""
    return get_model_state_dict(model, options=GATHER) if is_sharded(model) else unwrap(model).state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict; under FSDP2 gathered like ``full_model_state`` (keyed by parameter name)."""
    return get_optimizer_state_dict(model, optimizer, options=GATHER) if is_sharded(model) else optimizer.state_dict()


def load_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, Any], optimizer_state: dict[str, Any]
) -> None:
    """Load full state dicts (every rank passes the same) into the learner and the optimizer; FSDP2 keeps each
    rank's shard."""
    if is_sharded(model):
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
        # strict=False: a parameter whose term had not started when the checkpoint was saved has no optimizer state
        # yet, exactly as in the run that saved it (AdamW creates it at its first gradient); every state the
        # checkpoint holds is still loaded
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optimizer_state)


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
