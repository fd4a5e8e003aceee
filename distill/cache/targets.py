"""Compact teacher targets: what stage 1 keeps of each next-token distribution, and how it is decoded.

``--targets`` chooses the kind (``layout.targets.kind`` in the manifest):

* ``topk`` (default): an adaptive exact head, the largest tokens until their T=1 probability reaches
  ``mass`` (at most ``top_k`` of them). Trained with the K+1-bin tail loss: a lower bound of the full KL.
* ``sampled``: RS-KD (Anshumann et al., 2025, "Sparse Logit Sampling"): ``samples`` ids drawn with
  replacement from the teacher's T=1 distribution, stored once each with their draw count.
* ``hybrid``: the adaptive head exactly, plus ``samples`` draws from the tail renormalized (its mass
  ``1 - head`` is exact, from ``lse``).
* ``topk-fp16``: the fixed top-K ids (int32) and fp16 logits of schema version 2 (742 B/token at K=256 on
  Gemma 3 270M), kept for comparison and for stores written before version 3.

The compact kinds store per position ([target-codec note]):

* ``target_count`` [L] uint16: the slots used at the position (0 at padding);
* ``target_ids`` [L, S] uint32: the tokens' **ranks** under the teacher's unigram frequency (the store-level
  ``targets/id_by_rank`` gives the vocabulary id of each rank), ascending, the unused slots repeating the last
  rank; the store keeps the gaps between them (``DELTA_FIELDS``, [delta note] in store.py), Blosc zstd with byte
  shuffle compresses them;
* ``target_values`` [L, S] uint8: ``round((max - z) / step)``, z the token's logit at T=1 and max the row's;
* ``target_max`` [L] float32: the row's largest logit;
* ``target_draws`` [L, S] uint8 (sampled kinds): how many of the draws gave the token; 0 = an exact head slot.

``decode_targets`` turns them back into (ids, logits, multiplier): the logit of each exact slot to within
``step / 2`` (a drawn token more than 25.5 nats below the max is clamped there), and, for the sampled kinds, the
factor m that makes w_T = m · exp(z/T - lse_T) an unbiased estimate of the teacher's probability; stage 2 uses
them at T=1 only, where a drawn weight does not depend on the stored logit ([unbiased-kd note] in
pipeline/losses/sampled_kd.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_TARGET_MASS = 0.9  # measured on Gemma 3 270M: 57 tokens on average (cap 128) hold 88.5% at T=1
DEFAULT_TARGET_SAMPLES = 32
DEFAULT_VALUE_STEP = 0.1  # logit units per value code: 255 codes span 25.5 nats below the row's max
ID_BY_RANK = "targets/id_by_rank"  # store-level (V,) int32: vocabulary id of each unigram rank
_MAX_CODE = 255
_FAR = -1e4  # logit of an unused slot: exp(_FAR / T - lse) is 0 at any T, and finite (no NaN in gradients)

# [target-codec note] Why this layout. Measured on 64 rows of Gemma 3 270M's real-text store (p = 0.8):
# ids as vocabulary ids sorted (bitshuffle) 87 B/token; as unigram ranks in logit order 63-66; as ranks
# sorted ascending and delta coded 38 — frequent tokens have small ranks and sorted ranks leave small gaps.
# Values in that order take 30 B/token as 8-bit codes (15 in logit order, but the ids cost more than that
# saves). Unused slots repeat the last rank (delta 0) and hold value 0 and draws 0, so the padding up to
# the cap costs a few bytes per position, not per slot, without a ragged layout. Values are relative to
# the row's max so 8 bits keep 0.1-nat steps where the mass is; a head token more than 25.5 nats below
# the max (probability < 1e-11 of the top one's) is dropped rather than clamped, so the error bound holds for
# every exact slot. A drawn token is kept whatever its logit, its code clamped at 255: at T=1 its weight is
# draws / n, which the clamp does not change (the proposal q̂ cancels), and stage 2 trains sampled kinds at T=1 only.
# The gaps run along each position's slots, not across the flattened chunk: on 128 rows of the default (p = 0.9)
# store of Gemma 3 270M, 52.3 B/token against 55.7 (byte shuffle beats bitshuffle on both, 52.3 against 61.6).


def build_target_layout(kind: str, top_k: int, mass: float, samples: int, step: float = DEFAULT_VALUE_STEP) -> dict:
    """The manifest's ``layout.targets`` entry; ``value_error_bound`` is the largest error of a decoded logit."""
    spec = TARGET_KINDS[kind]
    out: dict[str, Any] = {"kind": kind}
    if spec.compact:
        out.update(value_step=step, value_error_bound=step / 2, id_coding="unigram-rank-sorted-delta")
    if spec.reads_mass:
        out["mass"] = mass
    if spec.sampled:
        out.update(samples=samples, proposal="teacher tail T=1" if spec.head else "teacher T=1")
    return out


def target_kind(layout: dict[str, Any]) -> str:
    """The stored kind's name; stores without ``layout.targets`` (schema 2) hold ``topk-fp16``."""
    return layout.get("targets", {}).get("kind", "topk-fp16")


def kind_of(layout: dict[str, Any]) -> TargetKind:
    """The stored kind's entry of ``TARGET_KINDS``."""
    return TARGET_KINDS[target_kind(layout)]


def target_slots(layout: dict[str, Any]) -> int:
    """S, the slots per position: the head's cap (top_k) and the draws, as the kind holds them."""
    spec, t = kind_of(layout), layout.get("targets", {})
    return (layout["top_k"] if spec.head else 0) + (t.get("samples", 0) if spec.sampled and spec.compact else 0)


_PER_POSITION = ("target_count", "target_max")  # one value a position; every other target field one a slot


def target_field_shapes(layout: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, row shape) of the target fields of a store with this layout (dtypes: schema.FIELD_DTYPES)."""
    seq, s = layout["seq_len"], target_slots(layout)
    return [(name, (seq,) if name in _PER_POSITION else (seq, s)) for name in kind_of(layout).fields]


def target_read_fields(layout: dict[str, Any]) -> list[str]:
    """The stored fields ``decode_targets`` needs (besides ``lse``)."""
    return list(kind_of(layout).fields)


# --- stage 1: choose, then encode -------------------------------------------------------------


def count_head(sorted_logits: torch.Tensor, lse1: torch.Tensor, mass: float, step: float) -> torch.Tensor:
    """Head sizes: the fewest leading tokens whose T=1 probability reaches ``mass`` (all K if they never do).

    sorted_logits (P, K) fp32, descending; lse1 (P,) -> (P,) int64 in [1, K]. Tokens beyond the value codes'
    range are never kept ([target-codec note]).
    """
    probs = torch.exp(sorted_logits - lse1[:, None])  # (P, K)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the tokens ranked before each one
    keep = (before < mass) & (sorted_logits[:, :1] - sorted_logits <= _MAX_CODE * step)
    return keep.sum(dim=-1).clamp(min=1)


def draw_samples(
    probs: torch.Tensor, n: int, exclude: torch.Tensor | None, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` draws with replacement per row from ``probs`` (P, V), renormalized without the ``exclude`` ids.

    exclude (P, E) int64 ids (-1 = none) or None. Returns (ids (P, n) int64, draws (P, n) int64): each drawn id
    once with its count, the unused slots id -1 and count 0. A row with nothing left to draw gets no draws.
    """
    weights = probs
    if exclude is not None:
        weights = probs.clone()
        rows = torch.arange(probs.shape[0], device=probs.device)[:, None].expand_as(exclude)
        weights[rows[exclude >= 0], exclude[exclude >= 0]] = 0.0
    empty = weights.sum(dim=-1) <= 0
    weights[empty, 0] = 1.0  # drawn, then discarded below
    drawn = torch.multinomial(weights, n, replacement=True, generator=generator)  # (P, n)
    drawn, _ = drawn.sort(dim=-1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = torch.cumsum(first, dim=-1) - 1  # (P, n) slot of each draw's id
    ids = torch.full_like(drawn, -1).scatter_(1, slot, drawn)
    draws = torch.zeros_like(drawn).scatter_add_(1, slot, torch.ones_like(drawn))
    ids[empty], draws[empty] = -1, 0
    return ids, draws


def encode_targets(
    ids: torch.Tensor,
    logits: torch.Tensor,
    draws: torch.Tensor,
    row_max: torch.Tensor,
    rank_of_id: torch.Tensor,
    step: float,
) -> dict[str, torch.Tensor]:
    """Stored arrays of P positions. ids (P, S) int64 (-1 = unused slot), logits (P, S) fp32 at T=1, draws (P, S)
    int64 (0 = exact), row_max (P,), rank_of_id (V,) int64 -> target_count/ids/values/max/draws ([target-codec note]).
    """
    used = ids >= 0
    big = torch.iinfo(torch.int64).max
    ranks = torch.where(used, rank_of_id.to(ids.device)[ids.clamp(min=0)], big)
    ranks, order = ranks.sort(dim=-1)
    count = used.sum(dim=-1)
    last = ranks.gather(1, (count - 1).clamp(min=0)[:, None])  # (P, 1)
    ranks = torch.where(ranks == big, last, ranks)
    ranks = torch.where(count[:, None] > 0, ranks, 0)
    codes = torch.round((row_max[:, None] - logits.gather(1, order)) / step).clamp(0, _MAX_CODE)
    in_use = torch.arange(ids.shape[1], device=ids.device)[None, :] < count[:, None]
    return {
        "target_count": count,
        "target_ids": ranks,
        "target_values": torch.where(in_use, codes, 0),
        "target_max": row_max,
        "target_draws": torch.where(in_use, draws.gather(1, order), 0),
    }


# --- stage 2: decode ------------------------------------------------------------------------


def decode_targets(
    data: dict[str, torch.Tensor], lse1: torch.Tensor | None, layout: dict[str, Any], id_by_rank: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher ids (B, L, S) int64 (-1 = unused), logits (B, L, S) fp32 at T=1 (-1e4 where unused) and the
    multiplier (B, L, S) fp32 of the sampled kinds (1 on exact slots, 0 where unused; None for the top-K kinds).

    data: ``CacheReader.read_rows`` output with ``target_read_fields(layout)``; lse1 (B, L): logsumexp at T=1
    (needed by the sampled kinds); id_by_rank (V,) the store's ``targets/id_by_rank``. The kind's ``decode``
    does the work (``decode_fp16``, ``decode_compact``).
    """
    return kind_of(layout).decode(data, lse1, layout, id_by_rank)


def decode_fp16(
    data: dict[str, torch.Tensor], lse1: torch.Tensor | None, layout: dict[str, Any], id_by_rank: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """``topk-fp16``: the stored ids and fp16 logits as they are."""
    return data["topk_ids"].long(), data["topk_logits"].float(), None


def decode_compact(
    data: dict[str, torch.Tensor], lse1: torch.Tensor | None, layout: dict[str, Any], id_by_rank: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rank-coded kinds ([target-codec note]). With m the multiplier, w_T = m · exp(z / T - lse_T) estimates the
    teacher's T probability without bias: ``sampled``: m = (draws / n) / q̂, q̂ = exp(ẑ - lse_1) the proposal;
    ``hybrid`` tail slots: m = (draws / n) · r̂ / q̂ with r̂ = 1 - Σ_head exp(ẑ - lse_1) ([unbiased-kd note] in
    pipeline/losses/sampled_kd.py)."""
    spec = kind_of(layout)
    count = data["target_count"].long()  # (B, L)
    ranks = data["target_ids"].long()
    used = torch.arange(ranks.shape[-1])[None, None, :] < count[..., None]  # (B, L, S)
    ids = torch.where(used, id_by_rank.long()[ranks.clamp(max=id_by_rank.numel() - 1)], -1)
    step = layout["targets"]["value_step"]
    logits = data["target_max"].float()[..., None] - step * data["target_values"].float()
    logits = torch.where(used, logits, _FAR)
    if not spec.sampled:
        return ids, logits, None
    draws = data["target_draws"].float()
    log_q = logits - lse1.float()[..., None]  # (B, L, S) log proposal at T=1 (before renormalization)
    scale = draws / layout["targets"]["samples"] * torch.exp(-log_q)
    if spec.head:  # the draws come from the tail, renormalized: scaled by its exact mass
        head = used & (draws == 0)
        tail_mass = (1.0 - torch.where(head, log_q.exp(), 0.0).sum(dim=-1)).clamp(min=0.0)  # (B, L)
        scale = torch.where(head, 1.0, scale * tail_mass[..., None])
    return ids, logits, torch.where(used, scale, 0.0)


DECODED_FIELDS = ("topk_ids", "topk_logits", "target_multiplier")  # what readers ask for, whatever the kind


def decode_stored_targets(
    data: dict[str, torch.Tensor], layout: dict[str, Any], id_by_rank: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """The decoded targets of ``data`` (stored target fields and ``lse``), largest logit first in each position.

    Returns ``topk_ids`` (B, L, S) int64 (-1 = unused slot), ``topk_logits`` (B, L, S) fp32 at T=1 and
    ``target_multiplier`` (B, L, S) fp32, or None for the top-K kinds (see ``decode_targets``). Column 0 is the
    teacher's top-1 for the kinds with a head (for ``sampled``: the most probable token drawn).
    """
    lse1, spec = None, kind_of(layout)
    if spec.sampled:
        lse1 = data["lse"][..., [float(t) for t in layout["temperatures"]].index(1.0)]
    ids, logits, mult = decode_targets(data, lse1, layout, id_by_rank)
    if spec.compact:
        order = logits.argsort(dim=-1, descending=True, stable=True)
        ids, logits = ids.gather(-1, order), logits.gather(-1, order)
        mult = None if mult is None else mult.gather(-1, order)
    return {"topk_ids": ids, "topk_logits": logits, "target_multiplier": mult}


# --- the table of kinds ---------------------------------------------------------------------------

COMPACT_FIELDS = ("target_count", "target_ids", "target_values", "target_max")


@dataclass(frozen=True)
class TargetKind:
    """One kind of stored teacher targets (``--targets``, the manifest's ``layout.targets.kind``).

    The dtypes of its fields are the schema's (``schema.FIELD_DTYPES``); docs/cache-format.md describes each kind.
    A new kind is an entry here (and its section of the format doc); nothing else compares a kind's name."""

    head: bool
    """Holds an exact head of the largest tokens: decoded column 0 is the teacher's top-1, and the head-bound
    figures (fidelity, head mass) apply."""
    sampled: bool
    """Holds draws from the teacher's T=1 distribution: decoded with a multiplier (an unbiased estimate of the full
    KL), drawn and trained at T=1 only."""
    fields: tuple[str, ...]
    """Its stored fields, per position."""
    decode: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    """Its stored fields -> (ids, logits at T=1, multiplier or None): ``decode_targets``'s signature."""
    compact: bool = True
    """Rank-coded ids and 8-bit value codes ([target-codec note]), read with the store's rank table; False: the
    raw ids and fp16 logits of schema version 2."""

    @property
    def reads_mass(self) -> bool:
        """Its head is adaptive: cut at the T=1 mass ``--target-mass`` (the fixed top-K is cut at ``--top-k``)."""
        return self.head and self.compact


TARGET_KINDS: dict[str, TargetKind] = {
    "topk": TargetKind(head=True, sampled=False, fields=COMPACT_FIELDS, decode=decode_compact),
    "sampled": TargetKind(head=False, sampled=True, fields=(*COMPACT_FIELDS, "target_draws"), decode=decode_compact),
    "hybrid": TargetKind(head=True, sampled=True, fields=(*COMPACT_FIELDS, "target_draws"), decode=decode_compact),
    "topk-fp16": TargetKind(
        head=True, sampled=False, fields=("topk_ids", "topk_logits"), decode=decode_fp16, compact=False
    ),
}
