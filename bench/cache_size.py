"""Cache size: bytes on disk per token for each field of a store made with ``cache-teacher``'s defaults, but
the fixed top-256 fp16 targets (``--targets topk-fp16 --top-k 256``; the compact ones: bench/targets.py).

    .venv/bin/python bench/cache_size.py            # about 1 minute on 2 CPU cores
    .venv/bin/python bench/cache_size.py --quick    # smoke test (< 30 s)

The teacher is a random-init Qwen3-MoE with the reference vocabulary (151,936) at quarter width
(hidden 256, 4 blocks: the default fields are then 4 hidden layers and 2 attention layers, as
for the reference's 28 blocks); seq_len 512, top-256, temperatures 1/2/4 (the defaults). Bytes
of ``hidden/<l>`` and ``vocab_proj`` scale with the hidden width (per-dimension figures are
printed); the top-K fields do not depend on it.

``logits_over_naive`` = bytes on disk of topk_ids + topk_logits + lse / (K x (2 + 4) bytes
per token: fp16 values and int32 ids, uncompressed). Values must be exact to fp16: the bench
recomputes the fp32 logits of every row (same batches, same 256-position lm_head slices as
stage 1) and asserts that the stored topk_logits are exactly their fp16 cast at the stored
ids, and that the stored ids are the top-K of those logits.

A random-init teacher ranks its vocabulary nearly uniformly: its top-K ids are close to the
worst case for compression (a trained teacher's are Zipf-like and compress further).

Last line: JSON with logits_over_naive, bytes_per_token {field: B}, total_bytes_per_token,
naive_logits_bytes_per_token, values_exact_fp16, sizes, machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REFERENCE_TEACHER,
    build_corpus_and_tokenizers,
    build_teacher,
    emit,
    machine,
    narrowed,
    offline_env,
)

SIZES = {
    # The reference teacher at quarter width with 4 of its 28 blocks: the vocabulary is whole (the
    # logits fields depend on it), the hidden fields scale with the width (docs/scaling.md).
    "full": dict(teacher=narrowed(REFERENCE_TEACHER, 4, num_hidden_layers=4), seq_len=512, rows=8, batch_size=4),
    "quick": dict(teacher=narrowed(REFERENCE_TEACHER, 32, num_hidden_layers=2), seq_len=64, rows=4, batch_size=2),
}
LOGIT_FIELDS = ("topk_ids", "topk_logits", "lse")


def check_values_exact(store: Path, teacher: Path, dataset: Path, size: dict, attention_layers: list[int]) -> int:
    """Recompute the fp32 logits of every row; assert stored values == fp16(fp32) and ids == top-K. Returns checked."""
    import numpy as np
    import torch
    import zarr

    from distill.config import CacheConfig
    from distill.pipeline.teacher.cache_teacher import iter_chunk_batches
    from distill.pipeline.teacher.fields import pad_rows
    from distill.pipeline.teacher.model import TeacherSource, forward_teacher, load_teacher, load_teacher_tokenizer
    from distill.pipeline.text.data import RowBuilder, load_text_dataset, plan_rows

    shard = zarr.open_group(str(store), mode="r")["shards/00000"]  # plain zarr: what is on disk, decoded
    cfg = CacheConfig(teacher=str(teacher), dataset=str(dataset), out=str(store), seq_len=size["seq_len"])
    model = load_teacher(
        TeacherSource.of(cfg), torch.device("cpu"), torch.float32, need_attention=bool(attention_layers)
    )
    tokenizer = load_teacher_tokenizer(TeacherSource.of(cfg))
    data = load_text_dataset(str(dataset), None, "train", "text")
    plan = plan_rows(data, "text", tokenizer, size["seq_len"]).truncated(size["rows"])
    builder = RowBuilder(data, "text", tokenizer, plan)
    lm_head = model.get_output_embeddings()
    checked = 0
    for batch in iter_chunk_batches(builder, 0, len(plan), size["batch_size"]):
        ids, mask = pad_rows(batch)
        with torch.inference_mode():
            # the same forward as stage 1 (the blocks whose maps are stored run eager attention)
            out = forward_teacher(model, ids, mask, bool(attention_layers), attention_layers)
            hidden = out.last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1])
            logits = torch.cat([lm_head(flat[a : a + 256]).float() for a in range(0, len(flat), 256)])
        logits = logits.reshape(len(batch), ids.shape[1], -1)
        for i, r in enumerate(batch):
            n = len(r.input_ids)
            stored_ids = torch.from_numpy(np.asarray(shard["topk_ids"][r.row_id, :n]).astype(np.int64))
            stored = np.asarray(shard["topk_logits"][r.row_id, :n])
            assert stored.dtype == np.float16
            exact = logits[i, :n].gather(1, stored_ids).half().numpy()
            assert np.array_equal(stored, exact), f"row {r.row_id}: stored topk_logits != fp16(fp32 logits)"
            reference = logits[i, :n].topk(stored_ids.shape[1], dim=-1).values
            assert torch.equal(logits[i, :n].gather(1, stored_ids), reference), f"row {r.row_id}: ids not the top-K"
            checked += n
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    offline_env()
    import torch

    from distill.cache.info import store_info
    from distill.config import CacheConfig
    from distill.pipeline.teacher import cache_teacher

    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    started = time.perf_counter()
    with TemporaryDirectory(prefix="distill-bench-size-") as tmp:
        root = Path(tmp)
        assets = build_corpus_and_tokenizers(root, size["rows"], docs_per_document=3 * size["seq_len"] // 40)
        teacher = build_teacher(root, assets["teacher_tok"], size["teacher"])
        store = root / "store"
        cfg = CacheConfig(
            teacher=str(teacher),
            dataset=str(assets["data"]),
            out=str(store),
            seq_len=size["seq_len"],
            max_rows=size["rows"],
            batch_size=size["batch_size"],
            device="cpu",
            packing="none",  # the rows plan_rows rebuilds below to check the store, one piece each
            targets="topk-fp16",  # the fixed top-256 layout this bench measures (bench/targets.py: the others)
            top_k=256,
        )
        cache_teacher.run(cfg)
        info = store_info(str(store))
        layers = info["manifest"]["layout"]["attention_layers"]
        checked = check_values_exact(store, teacher, assets["data"], size, layers)
    tokens = info["tokens_committed"]
    layout = info["manifest"]["layout"]
    k = layout["top_k"]
    per_token = {name: round(b / tokens, 2) for name, b in info["bytes"]["fields"].items()}
    logits_bytes = sum(info["bytes"]["fields"][name] for name in LOGIT_FIELDS)
    naive = tokens * k * (2 + 4)
    result = {
        "logits_over_naive": round(logits_bytes / naive, 4),
        "values_exact_fp16": True,
        "positions_checked": checked,
        "bytes_per_token": per_token,
        "total_bytes_per_token": round(info["bytes_per_token"]["total"], 1),
        "logits_bytes_per_token": round(logits_bytes / tokens, 1),
        "naive_logits_bytes_per_token": k * 6,
        "bytes_per_id": round(info["bytes"]["fields"]["topk_ids"] / (tokens * k), 3),
        "bytes_per_value": round(info["bytes"]["fields"]["topk_logits"] / (tokens * k), 3),
        "tokens": tokens,
        "sizes": {**size, "top_k": k, "temperatures": layout["temperatures"], "hidden_layers": layout["hidden_layers"],
                  "attention_layers": layout["attention_layers"], "attention_topk": layout["attention_topk"]},
        "quick": args.quick,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(f"cache size bench ({'quick' if args.quick else 'full'}): {tokens} tokens, sizes {result['sizes']}")
    for name, b in sorted(per_token.items(), key=lambda kv: -kv[1]):
        print(f"  {name:16s} {b:9.2f} B/token")
    print(f"  {'total':16s} {result['total_bytes_per_token']:9.2f} B/token (store-level arrays included)")
    print(
        f"  top-K fields {result['logits_bytes_per_token']} B/token vs naive {k * 6} B/token: "
        f"logits_over_naive {result['logits_over_naive']:.3f} (target <= 0.5: "
        f"{'met' if result['logits_over_naive'] <= 0.5 else 'MISSED'}); {result['bytes_per_id']} B/id, "
        f"{result['bytes_per_value']} B/value; values exact to fp16 at {checked} positions"
    )
    emit(result)


if __name__ == "__main__":
    main()
