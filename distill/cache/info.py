"""``distill cache info``: what a store holds, how complete it is, and what it costs on disk."""

from __future__ import annotations

from typing import Any

import numpy as np

from distill.cache.reader import CacheReader
from distill.cache.store import field_bytes, load_manifest, open_root, other_bytes, shard_records
from distill.cache.targets import kind_of, target_kind

HEAD_MASS_ROWS = 256  # rows sampled (evenly spread over the readable rows) to measure the head mass

# [head-mass note] The stored top-K tokens carry sum_k exp(z_k / T - lse_T) of the teacher's probability at
# temperature T; the K+1-bin kd target is exact on them and lumps the rest into one tail bin, so it is a
# coarse-grained lower bound of the full KL that carries little beyond the tail mass when the head holds
# little. On Gemma 3 270M the top-256 hold 95% at T = 1 and 3% at T = 4, hence the default T = 1 and
# `train`'s warning when the head holds under half the mass at the temperature it trains at.


def measure_head_mass(reader: CacheReader, max_rows: int = HEAD_MASS_ROWS) -> dict[str, dict[str, float]]:
    """Mean and 10th percentile over stored positions of the top-K probability mass at each stored temperature.

    Reads the (decoded) ``topk_logits``, ``lse`` and ``length`` of at most ``max_rows`` rows spread over the
    store; only exact head slots count (none for ``--targets sampled``). Returns ``{"1.0": {"mean": m, "p10": q},
    ...}`` (empty when no row is readable or the store has no head).
    """
    if not reader.readable or not kind_of(reader.layout).head:
        return {}
    ids = reader.row_ids
    picked = ids[np.unique(np.linspace(0, len(ids) - 1, min(max_rows, len(ids))).round().astype(np.int64))]
    data = reader.read_rows(picked, ["topk_logits", "target_multiplier", "lse", "length"])
    logits, lse = data["topk_logits"].float().numpy(), data["lse"].numpy()  # (R, L, K), (R, L, nT)
    if data["target_multiplier"] is not None:  # hybrid: the drawn slots are not part of the head
        logits = np.where(data["target_multiplier"].numpy() == 1.0, logits, -np.inf)
    positions = np.arange(logits.shape[1])[None, :] < data["length"].numpy()[:, None]  # (R, L)
    out = {}
    for j, t in enumerate(reader.temperatures):
        mass = np.exp(logits[positions] / t - lse[positions][:, j : j + 1]).sum(axis=1)  # (P,)
        out[str(float(t))] = {"mean": float(mass.mean()), "p10": float(np.quantile(mass, 0.1))} if mass.size else {}
    return out


def padding_share(tokens: int, rows: int, seq_len: int) -> float | None:
    """Share of the stored positions (rows x seq_len) that are padding, not tokens; None without rows.

    Every position of a row is stored and run through the teacher, padding too; rows skipped as non-finite
    (length 0) count as padding. Packing (``layout.packing``) is what lowers it."""
    positions = rows * seq_len
    return 1.0 - tokens / positions if positions else None


def store_info(url: str) -> dict[str, Any]:
    """Manifest, row/token counts, padding share, shard status and bytes on disk per field and per token."""
    root = open_root(url)
    manifest = load_manifest(root, url)
    shards = shard_records(root, manifest)
    tokens = sum(s["tokens"] for s in shards)
    sizes = field_bytes(root, manifest)
    extra = other_bytes(root)
    total = sum(sizes.values()) + sum(extra.values())
    per_token = {name: (b / tokens if tokens else None) for name, b in sizes.items()}
    reader = CacheReader(url, allow_partial=True)
    rows_committed = sum(min(len(s["checksums"]) * s["chunk_rows"], s["rows"]) for s in shards)
    return {
        "store": url,
        "complete": all(s["status"] == "complete" for s in shards),
        "head_mass": measure_head_mass(reader),
        "rows": manifest["layout"]["num_rows"],
        "rows_committed": rows_committed,
        "tokens_committed": tokens,
        "padding_share": padding_share(tokens, rows_committed, manifest["layout"]["seq_len"]),
        "shards": [
            {
                "index": s["index"],
                "status": s["status"],
                "rows": s["rows"],
                "row_start": s["row_start"],
                "chunks_committed": len(s["checksums"]),
                "num_chunks": s.get("num_chunks"),
                "tokens": s["tokens"],
                "nonfinite_rows": len(s.get("nonfinite_rows", [])),
            }
            for s in shards
        ],
        "bytes": {"fields": sizes, "store_level": extra, "total": total},
        "bytes_per_token": {
            "fields": per_token,
            "rows": sum(sizes.values()) / tokens if tokens else None,  # what grows with the data
            "total": total / tokens if tokens else None,  # plus the store-level arrays (tokenizer, PCA bases)
        },
        "manifest": manifest,
    }


def describe_targets(layout: dict[str, Any]) -> str:
    """One line: the kind of teacher targets and their settings (docs/cache-format.md, "Teacher targets")."""
    t, kind, spec = layout.get("targets", {}), target_kind(layout), kind_of(layout)
    if not spec.compact:
        return f"targets    {kind}: top {layout['top_k']} ids (int32) and logits (fp16)"
    parts = []
    if spec.head:
        parts.append(f"head to T=1 mass {t['mass']:g}, at most {layout['top_k']}")
    if spec.sampled:
        parts.append(f"{t['samples']} draws" + (" from the tail" if spec.head else ""))
    return f"targets    {kind}: " + " + ".join(parts) + f"; logits to +-{t['value_error_bound']:g} (8 bits)"


def describe_fidelity(fidelity: dict[str, Any] | None) -> list[str]:
    """The manifest's fidelity figures ([fidelity note] in pipeline/teacher/target_fields.py), a line a kind.

    Stores made before those figures hold ``kl_full_reconstructed``: KL(full ‖ a reconstruction whose tail is
    spread evenly, or the draws' expectation), shown under that name; its ``topk`` values measure the spread."""
    if not fidelity:
        return []
    temps = lambda by_t, fmt: ", ".join(f"T={float(t):g} {fmt(v)}" for t, v in by_t.items())  # noqa: E731
    where = f"mean on {fidelity['positions']:,} calibration positions"
    lines = []
    if "kl_head_bins" in fidelity:
        tail = fidelity["tail_mass"]
        lines.append(
            f"fidelity   K+1-bin KL(true || decoded), nats (tail mass beyond the head), {where}: "
            + ", ".join(f"T={float(t):g} {v:.2e} ({tail[t]:.3f})" for t, v in fidelity["kl_head_bins"].items())
        )
    if "ess" in fidelity:
        lines.append(
            f"{'fidelity' if not lines else '':10s} effective sample size of the {fidelity['ess_samples']} draws "
            f"(Kish, weights p_T / p_1), {where} with draws: " + temps(fidelity["ess"], lambda v: f"{v:.1f}")
        )
    if "kl_full_reconstructed" in fidelity:  # a store made before the figures above
        how = "the draws' expectation" if fidelity.get("expectation_over_draws") else "the tail spread evenly"
        lines.append(
            f"fidelity   (older store) KL(full || reconstruction with {how}), nats, {where}; not the loss of the "
            "stored values: " + temps(fidelity["kl_full_reconstructed"], lambda v: f"{v:.4f}")
        )
    return lines


def format_info(info: dict[str, Any]) -> str:
    """A short human summary of ``store_info``."""
    m = info["manifest"]
    lay = m["layout"]
    lines = [
        f"store      {info['store']} ({'complete' if info['complete'] else 'INCOMPLETE'})",
        f"teacher    {m['teacher']['name_or_path']} ({m['teacher']['model_type']}, {m['teacher']['dtype']}, "
        f"vocab {m['teacher']['vocab_size']:,}, hidden {m['teacher']['hidden_size']})",
        f"dataset    {m['dataset']['name']} [{m['dataset']['split']}] field {m['dataset']['text_field']!r}: "
        f"{m['dataset']['num_documents']:,} documents ({m['dataset']['empty_documents']} empty, skipped)",
        f"layout     seq_len {lay['seq_len']}, top_k {lay['top_k']}, T {lay['temperatures']}, hidden layers "
        f"{lay['hidden_layers']} (dim {lay['hidden_dim']}), attention layers {lay['attention_layers']} "
        f"(top {lay['attention_topk']})",
        f"rows       {info['rows_committed']:,}/{info['rows']:,} committed, {info['tokens_committed']:,} tokens",
        describe_targets(lay),
    ]
    if info.get("padding_share") is not None:
        lines.append(
            f"padding    {100 * info['padding_share']:.1f}% of the {info['rows_committed'] * lay['seq_len']:,} stored "
            f"positions (packing {lay.get('packing', 'none')})"
        )
    lines += describe_fidelity(m.get("fidelity"))
    if info.get("head_mass"):
        lines.append(
            f"head mass  top-{lay['top_k']} share of the teacher's probability, mean (10th percentile): "
            + ", ".join(f"T={float(t):g} {m['mean']:.3f} ({m['p10']:.3f})" for t, m in info["head_mass"].items() if m)
        )
    lines.append("shards")
    for s in info["shards"]:
        lines.append(
            f"  {s['index']:5d}  {s['status']:8s} rows {s['row_start']}+{s['rows']}  chunks "
            f"{s['chunks_committed']}/{s['num_chunks']}  tokens {s['tokens']:,}"
            + (f"  non-finite rows {s['nonfinite_rows']}" if s["nonfinite_rows"] else "")
        )
    lines.append("bytes on disk (per committed token)")
    per = info["bytes_per_token"]["fields"]
    for name, b in sorted(info["bytes"]["fields"].items(), key=lambda kv: -kv[1]):
        lines.append(
            f"  {name:20s} {b:>14,d}  {per[name]:10.1f} B/tok" if per[name] is not None else f"  {name:20s} {b:>14,d}"
        )
    rows_pt = info["bytes_per_token"].get("rows")
    if rows_pt:
        lines.append(f"  {'all row fields':20s} {sum(info['bytes']['fields'].values()):>14,d}  {rows_pt:10.1f} B/tok")
    for name, b in info["bytes"]["store_level"].items():
        lines.append(f"  {name + '/':20s} {b:>14,d}")
    total_pt = info["bytes_per_token"]["total"]
    lines.append(f"  {'total':20s} {info['bytes']['total']:>14,d}" + (f"  {total_pt:10.1f} B/tok" if total_pt else ""))
    return "\n".join(lines)
