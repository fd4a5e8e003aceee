"""Stage 1's compact targets (``--targets topk|sampled|hybrid``): chosen and encoded from each slice of full logits,
and calibrated once per store (the unigram rank table and the fidelity figures of the manifest, [fidelity note]).

The format is in distill/cache/targets.py; stage 1 calls ``choose_target_slice`` from its logit pass, where the
(P, V) logits and T=1 probabilities already exist, so no extra vocabulary-wide pass is made beyond the draws, and
encodes the choice with the store's rank table (``encode_target_choice``). A new store's calibration rows are
chosen before that table exists: ``TargetCalibration`` observes the same slices and fits it, then their choice is
encoded ([calibration note] in pipeline/teacher/calibration.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.cache.targets import ID_BY_RANK, TARGET_KINDS, count_head, draw_samples, encode_targets
from distill.pipeline.teacher.logit_pass import POWER_TEMPERATURES, LogitSlice, exp_sums

TARGET_FIELDS = tuple(dict.fromkeys(f for kind in TARGET_KINDS.values() if kind.compact for f in kind.fields))


def choose_target_slice(
    logits: torch.Tensor,
    probs1: torch.Tensor,
    lse1: torch.Tensor,
    top_logits: torch.Tensor,
    top_ids: torch.Tensor,
    targets: dict[str, Any],
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """The targets of P positions before encoding: ``ids`` (P, S) int64 (-1 = unused), ``logits`` (P, S) fp32 at
    T=1, ``draws`` (P, S) int64 (0 = exact), ``row_max`` (P,), as ``encode_targets`` takes them.

    logits (P, V) fp32 at T=1, probs1 (P, V) their softmax, lse1 (P,), top_logits / top_ids (P, K) descending
    (K = layout.top_k for the head kinds, >= 1 otherwise); targets: the layout's ``targets`` entry.
    """
    kind, step = TARGET_KINDS[targets["kind"]], targets["value_step"]
    parts_ids, parts_draws = [], []
    if kind.head:
        k = count_head(top_logits, lse1, targets["mass"], step)  # (P,)
        head = torch.arange(top_ids.shape[1], device=logits.device)[None, :] < k[:, None]
        parts_ids.append(torch.where(head, top_ids, -1))
        parts_draws.append(torch.zeros_like(top_ids))
    if kind.sampled:
        ids, draws = draw_samples(probs1, targets["samples"], parts_ids[0] if parts_ids else None, generator)
        parts_ids.append(ids)
        parts_draws.append(draws)
    ids, draws = torch.cat(parts_ids, dim=1), torch.cat(parts_draws, dim=1)
    return {"ids": ids, "logits": logits.gather(1, ids.clamp(min=0)), "draws": draws, "row_max": top_logits[:, 0]}


def encode_target_choice(
    choice: dict[str, torch.Tensor], targets: dict[str, Any], rank_of_id: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``choose_target_slice``'s output (any leading shape) -> the stored target arrays (``target_*``)."""
    lead = choice["row_max"].shape
    flat = {name: value.reshape(lead.numel(), *value.shape[len(lead) :]) for name, value in choice.items()}
    out = encode_targets(flat["ids"], flat["logits"], flat["draws"], flat["row_max"], rank_of_id, targets["value_step"])
    if "target_draws" not in TARGET_KINDS[targets["kind"]].fields:
        del out["target_draws"]
    return {name: value.reshape(*lead, *value.shape[1:]) for name, value in out.items()}


def compute_target_slice(
    logits: torch.Tensor,
    probs1: torch.Tensor,
    lse1: torch.Tensor,
    top_logits: torch.Tensor,
    top_ids: torch.Tensor,
    targets: dict[str, Any],
    rank_of_id: torch.Tensor,
    generator: torch.Generator | None,
) -> dict[str, torch.Tensor]:
    """The stored target arrays of P positions: ``choose_target_slice`` then ``encode_target_choice``."""
    choice = choose_target_slice(logits, probs1, lse1, top_logits, top_ids, targets, generator)
    return encode_target_choice(choice, targets, rank_of_id)


# --- calibration: unigram ranks and fidelity ----------------------------------------------------

# [fidelity note] What the manifest's ``fidelity`` measures, per stored temperature T, on the calibration
# positions (full logits at hand). Head kinds (topk, hybrid, topk-fp16): the K+1-bin KL(true ‖ decoded) the
# tail loss sees, the head tokens one bin each and one tail bin, true = the teacher's exact probabilities,
# decoded = exp(ẑ / T - lse_T) from the stored (quantized or fp16) logits and the stored exact lse_T, the tail
# bin 1 - Σ head as the loss reads it; it measures what storing loses and nothing else (the tail is exact in
# mass, blind in spread, by design). Beside it the true tail mass 1 - Σ head: what the K+1 bins cannot
# resolve. Sampled kinds: Kish's effective sample size of the draws at T, (Σ c w)² / Σ c w² over the drawn
# tokens (c the draw count, w = p_T / p_1 the importance weight of a draw from the T = 1 proposal, decoded
# logits), out of ``samples`` draws (``hybrid``: its tail draws): n at T = 1, less where p_T and p_1 differ.
# Each figure is the mean over positions (ESS: over positions with draws), measured on every stride-th
# calibration position, the stride chosen so that about ``FIDELITY_POSITIONS`` are measured: the figures cost
# a few vocabulary-wide passes per position (the tail's sums, [exp-chain note] in logit_pass.py), and a mean
# over ~1,000 positions is as telling as one over 30,000. The head and the row's logsumexp come from the logit
# pass (``LogitSlice``), not computed again. The rank table sums the T=1 distribution of ~8,192 positions (every
# n-th, like the fidelity): it only orders the ids for the codec ([target-codec note] in cache/targets.py), where
# any order decodes exactly and the order only changes how small the stored ids are.


FIDELITY_POSITIONS = 1024
FIDELITY_BATCH = 64  # measured positions per figure computation, about: its (P, V) buffers hold 64 + one slice's
UNIGRAM_POSITIONS = 8192  # the rank table's mean T=1 distribution: over every n-th calibration position, ~this many


def fit_rank_table(unigram: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(id_by_rank (V,) int32, rank_of_id (V,) int64) from the mean T=1 probability of each id (ties: lower id)."""
    order = torch.sort(-unigram.double(), stable=True).indices  # (V,) ids, most probable first
    rank_of_id = torch.empty_like(order)
    rank_of_id[order] = torch.arange(order.numel())
    return order.numpy().astype(np.int32), rank_of_id


def quantized_logits(logits: torch.Tensor, step: float, row_max: torch.Tensor) -> torch.Tensor:
    """What a decoder reads back for (P, N) logits of positions whose max logit is row_max (P, 1): max - step ·
    code, codes clamped to 8 bits."""
    return row_max - step * torch.round((row_max - logits) / step).clamp(0, 255)


def decoded_logits(logits: torch.Tensor, targets: dict[str, Any], row_max: torch.Tensor) -> torch.Tensor:
    """(P, N) the logit a reader decodes for each of (P, N) stored logits: 8-bit steps below the position's
    row_max (P, 1), or fp16 for ``topk-fp16``."""
    if not TARGET_KINDS[targets["kind"]].compact:
        return logits.half().float()
    return quantized_logits(logits, targets["value_step"], row_max)


def find_head(
    logits: torch.Tensor,
    targets: dict[str, Any],
    top: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse1: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens stored exactly (the head) of each of P positions: (ids (P, K) int64 distinct, descending by
    logit; keep (P, K) bool, the head's slots), as ``choose_target_slice`` picks them; K = 0 without a head.

    ``top`` (values, ids) (P, >= K) descending and ``lse1`` (P,): the logit pass's, when it has them (else computed).
    """
    kind = TARGET_KINDS[targets["kind"]]
    if not kind.head:
        empty = logits.new_zeros((logits.shape[0], 0), dtype=torch.long)
        return empty, empty.bool()
    k = min(targets["top_k"], logits.shape[1])
    values, ids = logits.topk(k, dim=-1) if top is None else (top[0][:, :k], top[1][:, :k])
    if not kind.reads_mass:
        return ids, torch.ones_like(ids, dtype=torch.bool)
    lse1 = logits.logsumexp(dim=-1) if lse1 is None else lse1
    k = count_head(values, lse1, targets["mass"], targets["value_step"])
    return ids, torch.arange(ids.shape[1], device=logits.device)[None, :] < k[:, None]


def measure_head_bins(
    logits: torch.Tensor,
    head_ids: torch.Tensor,
    keep: torch.Tensor,
    decoded_head: torch.Tensor,
    temperatures: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """[fidelity note] (K+1-bin KL(true ‖ decoded), true tail mass), each (P, nT) fp64, at each temperature.

    logits (P, V) fp32 at T=1; head_ids, keep (P, K) from ``find_head`` (the first id the row's argmax);
    decoded_head (P, K) the head's logits as read back. Both sides share lse_T, so a head bin's log ratio is
    (z - ẑ) / T. The tail's own log Σ exp((z - max) / T) is summed over the tail itself (exact to fp32's ~1e-7
    relative): the logits with the head masked out, through the exponential chain at T = 1, 2, 4 ([exp-chain note]
    in logit_pass.py), over the logits / T otherwise; everything over the K head slots is fp64, so the figure is
    not drowned by the rounding of 1 - Σ head.
    """
    row_max = logits.gather(1, head_ids[:, :1])  # (P, 1)
    z_head = logits.gather(1, head_ids)  # (P, K)
    chain = sorted({1.0, *(t for t in temperatures if t in POWER_TEMPERATURES)})
    tail = logits.scatter(1, head_ids, torch.where(keep, -torch.inf, z_head))  # (P, V) the logits off the head
    sums = exp_sums(tail, row_max, chain, tail).double().log()  # (P, n) log Σ_tail exp((z - max) / T)
    sums = {t: sums[:, j] for j, t in enumerate(chain)}
    kl, tail_mass = [], []
    for t in temperatures:
        if t in sums:
            lse_tail = sums[t]
        else:
            scaled = (logits - row_max) / t  # (P, V) <= 0
            scaled.scatter_(1, head_ids, torch.where(keep, -torch.inf, (z_head - row_max) / t))
            lse_tail = scaled.logsumexp(dim=-1).double()
        head = torch.where(keep, (z_head - row_max).double() / t, -torch.inf)  # (P, K)
        lse = torch.logaddexp(lse_tail, head.logsumexp(dim=-1))  # (P,) lse_T - max / T
        p_head = (head - lse[:, None]).exp()  # 0 off the head
        kl_head = torch.where(keep, p_head * (z_head - decoded_head).double() / t, 0.0).sum(dim=-1)
        decoded = (decoded_head - row_max).double() / t - lse[:, None]
        head_q = torch.where(keep, decoded.exp(), 0.0).sum(dim=-1)
        log_tail_p = lse_tail - lse
        mass = log_tail_p.exp()
        kl_tail = torch.where(mass > 0, mass * (log_tail_p - torch.log1p(-head_q).clamp(min=-700)), 0.0)  # 1 - Σ head
        kl.append(kl_head + kl_tail)
        tail_mass.append(mass)
    return torch.stack(kl, dim=-1), torch.stack(tail_mass, dim=-1)


def kish_ess(log_weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(Σ c w)² / Σ c w² per row: Kish's effective sample size of weighted draws, (P,) fp64; 0 without draws.

    log_weights (P, S) log importance weights (any scale), counts (P, S) draws of each slot (0 = unused).
    """
    c = counts.double()
    log_w = torch.where(c > 0, log_weights.double(), -torch.inf)
    w = (log_w - log_w.max(dim=-1, keepdim=True).values.nan_to_num(neginf=0.0)).exp()  # (P, S) max 1
    total, squares = (c * w).sum(dim=-1), (c * w * w).sum(dim=-1)
    return torch.where(squares > 0, total**2 / squares.clamp(min=1e-300), 0.0)


def measure_draws_ess(
    logits: torch.Tensor,
    probs1: torch.Tensor,
    exclude: torch.Tensor,
    targets: dict[str, Any],
    temperatures: list[float],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """[fidelity note] (P, nT) Kish ESS of the targets' ``samples`` draws from the T=1 teacher outside the head,
    at each T.

    logits (P, V) fp32 at T=1, probs1 (P, V) their softmax, exclude (P, K) the head's ids (-1 = none). The draws
    are made as stage 1 makes them (``draw_samples``); w ∝ exp(ẑ (1/T - 1)) for a drawn token of decoded logit ẑ.
    """
    ids, draws = draw_samples(probs1, targets["samples"], exclude, generator)
    row_max = logits.max(dim=-1, keepdim=True).values
    z = decoded_logits(logits.gather(1, ids.clamp(min=0)), targets, row_max)  # (P, S)
    return torch.stack([kish_ess(z * (1.0 / t - 1.0), draws) for t in temperatures], dim=-1)


class TargetCalibration:
    """The rank table and the fidelity of a new store's targets, summed slice by slice over the calibration
    positions while their fields are computed (``observe`` is ``compute_logit_fields``'s hook): the mean T=1
    distribution over the positions gives the ranks ([target-codec note] in cache/targets.py); the [fidelity note]
    figures at T=1 and each stored T go to the manifest's ``fidelity`` (``distill cache info`` shows them)."""

    def __init__(self, layout: dict[str, Any], vocab: int, device: torch.device, positions: int) -> None:
        """``positions``: how many the calibration rows hold (the fidelity stride is set from it)."""
        self.targets = {**layout["targets"], "top_k": layout["top_k"]}
        self.temps = sorted({1.0, *layout["temperatures"]})
        self.generator = torch.Generator(device=device).manual_seed(0)  # the fidelity's own draws ([fidelity note])
        self.unigram = torch.zeros(vocab, dtype=torch.float64, device=device)
        self.sums = {name: torch.zeros(len(self.temps), dtype=torch.float64) for name in ("kl", "tail", "ess")}
        self.stride = max(1, -(-positions // FIDELITY_POSITIONS))
        self.unigram_stride = max(1, -(-positions // UNIGRAM_POSITIONS))
        self.positions = self.seen = self.drawn = 0
        self.pending: list[tuple[torch.Tensor, ...]] = []  # measured rows not yet measured, copied out of their slice

    def observe(self, sl: LogitSlice) -> None:
        """One slice of P real positions at T = 1 (the logit pass's, ``LogitSlice``): every ``unigram_stride``-th
        position (counted over the calls) feeds the rank table, every ``stride``-th the fidelity, measured
        ``FIDELITY_BATCH`` positions at a time whatever the slices' size (a figure's many small operations cost more
        than its vocabulary-wide passes on a few rows)."""
        first = -self.seen % self.unigram_stride  # the first position of this call on the unigram's stride
        self.unigram += sl.probs1[first :: self.unigram_stride].sum(dim=0)
        first = -self.seen % self.stride  # the first position of this call on the fidelity's stride
        self.seen += sl.logits.shape[0]
        measured = slice(first, None, self.stride)
        if sl.logits[measured].shape[0]:
            parts = (sl.logits, sl.probs1, sl.lse1, sl.top_logits, sl.top_ids)
            self.pending.append(tuple(part[measured].clone() for part in parts))
        if sum(part[0].shape[0] for part in self.pending) >= FIDELITY_BATCH:
            self.measure()

    def measure(self) -> None:
        """The [fidelity note] figures of the pending rows, added to the sums."""
        if not self.pending:
            return
        logits, probs1, lse1, top_logits, top_ids = (torch.cat(parts) for parts in zip(*self.pending))
        self.pending = []
        kind = TARGET_KINDS[self.targets["kind"]]
        head_ids, keep = find_head(logits, self.targets, (top_logits, top_ids), lse1)
        if kind.head:
            decoded_head = decoded_logits(logits.gather(1, head_ids), self.targets, top_logits[:, :1])
            kl, tail = measure_head_bins(logits, head_ids, keep, decoded_head, self.temps)
            self.sums["kl"] += kl.sum(dim=0).cpu()
            self.sums["tail"] += tail.sum(dim=0).cpu()
        if kind.sampled:
            exclude = torch.where(keep, head_ids, -1)
            ess = measure_draws_ess(logits, probs1, exclude, self.targets, self.temps, self.generator)  # (p, nT)
            self.sums["ess"] += ess.sum(dim=0).cpu()
            self.drawn += int((ess[:, 0] > 0).sum())
        self.positions += logits.shape[0]

    def finish(self, rows: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The store-level rank table ``{targets/id_by_rank: (V,) int32}`` and the manifest's ``fidelity``."""
        self.measure()
        kind, temps, sums, positions, drawn = self.targets["kind"], self.temps, self.sums, self.positions, self.drawn
        id_by_rank, _ = fit_rank_table(self.unigram.cpu())
        fidelity: dict[str, Any] = {"kind": kind, "rows": rows, "positions": positions}
        by_t = lambda total, n: {str(t): float(total[j] / max(n, 1)) for j, t in enumerate(temps)}  # noqa: E731
        if TARGET_KINDS[kind].head:
            fidelity.update(kl_head_bins=by_t(sums["kl"], positions), tail_mass=by_t(sums["tail"], positions))
        if TARGET_KINDS[kind].sampled:
            fidelity.update(ess=by_t(sums["ess"], drawn), ess_samples=self.targets["samples"], ess_positions=drawn)
        return {ID_BY_RANK: id_by_rank}, fidelity
