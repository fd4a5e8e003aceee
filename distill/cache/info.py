"""``distill cache info``: what a store holds, how complete it is, and what it costs on disk."""

from __future__ import annotations

from typing import Any

from distill.cache.store import field_bytes, load_manifest, open_root, other_bytes, shard_records


def store_info(url: str) -> dict[str, Any]:
    """Manifest, row/token counts, shard status and bytes on disk per field and per token."""
    root = open_root(url)
    manifest = load_manifest(root, url)
    shards = shard_records(root, manifest)
    tokens = sum(s["tokens"] for s in shards)
    sizes = field_bytes(root, manifest)
    extra = other_bytes(root)
    total = sum(sizes.values()) + sum(extra.values())
    per_token = {name: (b / tokens if tokens else None) for name, b in sizes.items()}
    return {
        "store": url,
        "complete": all(s["status"] == "complete" for s in shards),
        "rows": manifest["layout"]["num_rows"],
        "rows_committed": sum(min(len(s["checksums"]) * s["chunk_rows"], s["rows"]) for s in shards),
        "tokens_committed": tokens,
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
        "bytes_per_token": {"fields": per_token, "total": total / tokens if tokens else None},
        "manifest": manifest,
    }


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
        "shards",
    ]
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
    for name, b in info["bytes"]["store_level"].items():
        lines.append(f"  {name + '/':20s} {b:>14,d}")
    total_pt = info["bytes_per_token"]["total"]
    lines.append(f"  {'total':20s} {info['bytes']['total']:>14,d}" + (f"  {total_pt:10.1f} B/tok" if total_pt else ""))
    return "\n".join(lines)
