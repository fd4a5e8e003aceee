"""Which shards this process fills: ``--shard i/n``, the ranks of ``torchrun``, or every shard; and claiming them.

The store's side of sharding (claims, shard writers) is in cache/; the policy reads the command's settings and
the launcher's environment, which cache/ does not know.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.auto import tqdm

from distill.cache.claims import CLAIM_TIMEOUT_ENV, ShardBusy, ShardClaim, claim_shard, describe_holder
from distill.config import CacheConfig, ConfigError, parse_shard
from distill.runtime import torchrun_rank


def new_store_shards(cfg: CacheConfig) -> int:
    """Shards of a new store: n of ``--shard i/n``; at least WORLD_SIZE under torchrun; else --num-shards."""
    if cfg.shard is not None:
        _, count = parse_shard(cfg.shard)
        if cfg.num_shards not in (1, count):
            raise ConfigError(
                f"--num-shards {cfg.num_shards} and --shard {cfg.shard} disagree; --shard i/n alone sets n shards"
            )
        return count
    ranks = torchrun_rank()
    return max(cfg.num_shards, ranks[1]) if ranks else cfg.num_shards


def shards_to_fill(cfg: CacheConfig, num_shards: int) -> list[int]:
    """``--shard i/n``: shard i; under torchrun: shards rank, rank + world, ...; otherwise every shard."""
    if cfg.shard is not None:
        index, count = parse_shard(cfg.shard)
        if count != num_shards:
            raise ConfigError(f"--shard {cfg.shard}: the store has {num_shards} shards (use i/{num_shards})")
        return [index]
    ranks = torchrun_rank()
    if ranks is not None:
        rank, world = ranks
        return list(range(rank, num_shards, world))
    return list(range(num_shards))


def claim_or_defer(cfg: CacheConfig, index: int, deferred: set[int]) -> ShardClaim | None:
    """Claim a shard (see [claim note] in claims.py); a busy one is retried once after the others, then reported.

    ``--shard i/n`` names its shard: a busy one is refused (ShardBusy propagates)."""
    try:
        claim = claim_shard(cfg.out, index)
    except ShardBusy as busy:
        if cfg.shard is not None:
            raise ShardBusy(
                f"{cfg.out}: {busy} — a second process with the same --shard {cfg.shard} is refused; "
                f"re-run when it is done (a claim from a process that is gone is taken over: same host at once, "
                f"another host after {CLAIM_TIMEOUT_ENV} seconds)",
                busy.holder,
            ) from None
        if index not in deferred:
            deferred.add(index)
            return None
        raise
    if claim.replaced is not None:
        tqdm.write(
            f"cache-teacher: shard {index}: taking over the stale claim of {describe_holder(claim.replaced)}",
            file=sys.stderr,
        )
    return claim


def claim_in_turn(
    cfg: CacheConfig, shards: list[int], on_busy: Callable[[int, Any], None]
) -> Iterator[tuple[int, ShardClaim]]:
    """Claim ``shards`` in turn, yielding each ``(index, claim)`` held: a shard another live process holds is tried
    again once after the others, then handed to ``on_busy(index, holder)`` (``--shard i/n``: ShardBusy is raised)."""
    queue, deferred = list(shards), set()
    while queue:
        index = queue.pop(0)
        try:
            claim = claim_or_defer(cfg, index, deferred)
        except ShardBusy as busy:
            if cfg.shard is not None:
                raise
            on_busy(index, busy.holder)
            continue
        if claim is None:
            queue.append(index)  # unclaimed shards first
            continue
        yield index, claim
