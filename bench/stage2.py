"""Stage 2 throughput: training from the cache against CE only and against the live teacher.

    .venv/bin/python bench/stage2.py            # about 5 minutes on 2 CPU cores (--extras: 7)
    .venv/bin/python bench/stage2.py --quick    # smoke test (< 30 s), figures not meaningful
    .venv/bin/python bench/stage2.py --reference --device cuda   # the reference pair's sizes, on a GPU
    .venv/bin/python bench/stage2.py --tokenizers real   # the real Qwen3 and SmolLM2 tokenizers, real text

The reference pair (bench.common: the teacher's published shape, SmolLM-135M's config) with
every width divided by 4 and both vocabularies whole (teacher 151,936, student 49,152), so that
a variant takes about a minute on 2 CPU cores; the sizes are printed and in the JSON under "sizes".
By default the two tokenizers are small BPEs trained on the demo corpus (student 1.04 tokens per
teacher token); ``--tokenizers real`` uses the reference pair's real ones (the Qwen3 tokenizer,
SmolLM2's) on real English text (CPython's pydoc topics), from the real test tier's cache
(``python -m tests.real.assets``); the models stay random-init at the sizes below either way.
``student_tokens_per_teacher_token`` in the JSON, docs/benchmarks.md "Token ratio".
One store is made with ``cache-teacher``'s defaults (targets, packing, fields, temperatures), then the
variants train the same student on the same rows in the same order, each at ``distill train``'s defaults
(``kd_mode``, ``temperature``, read from ``TrainConfig``, not restated here) unless it names a change:

  ce        the student alone, CE only (every distillation term disabled)
  kd        from the cache, the default kd mode and temperature + lm
  all       from the cache, every default term at full weight from step 0
  kd_tail   ``kd`` with ``kd_mode=tail`` (the K+1-bin kd over exact matches): ``prefix_over_tail``
  live      the teacher in the loop (``live_teacher``) with the seeds' full-vocabulary logit
            projector (``kd_mode=projector``: softmax(teacher logits / T*) @ teacher embedding
            computed in the step -> linear -> student vocabulary) + lm; its store holds no
            hidden/attention fields so that the live teacher computes only the logit fields;
            without read-ahead, see [one-device note]

``--extras`` adds the settings the bench measured before the defaults changed: ``kd_tail_t4`` and
``all_tail_t4`` (``kd_mode=tail`` at T=4). The JSON records every variant's settings (``settings``).

Each variant runs in its own process: ``train.setup.setup`` builds the run, then ``train.loop.train_step``,
the step ``train.fit`` runs (read the micro-batch -> the learner's loss -> backward -> clip -> AdamW
step), runs ``steps`` optimizer steps; the first ``warmup`` are not timed. Peak memory (CPU): the bytes of
the tensors that live across steps (student and module weights, AdamW state, the live
teacher's weights) + the torch profiler's peak of tensor bytes allocated during one more step
(activations, gradients, teacher buffers, read-ahead), see [tensor-peak note]; the RSS
high-water mark over the RSS before ``setup`` is reported beside it. GPU: the allocator's peak.

Last line: JSON with tokens_per_s {variant: ...}, kd_over_ce, all_over_ce, prefix_over_tail (kd / kd_tail),
live_over_cache (step-time ratios), peak_mem_bytes {variant: ...}, kd_mem_over_ce, mem_cache_over_live,
settings {variant: kd_mode, temperature, targets, packing, terms}, sizes, machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    REFERENCE_STUDENT,
    REFERENCE_TEACHER,
    build_corpus_and_tokenizers,
    build_student,
    build_teacher,
    describe,
    emit,
    machine,
    narrowed,
    offline_env,
    peak_rss_bytes,
    real_corpus_and_tokenizers,
    rss_bytes,
)

SIZES = {
    # The reference pair with every width divided by 4 (bench.common.narrowed): teacher hidden 256,
    # 16/8 heads of 32, 3 experts of 768 (1 used), 28 blocks; student hidden 144, 9/3 heads of 16,
    # MLP 384, 30 blocks; both vocabularies whole.
    "full": dict(
        teacher=narrowed(REFERENCE_TEACHER, 4), student=narrowed(REFERENCE_STUDENT, 4),
        seq_len=256, batch_size=2, steps=8, warmup=2,
    ),
    "reference": dict(
        teacher=REFERENCE_TEACHER, student=REFERENCE_STUDENT, seq_len=512, batch_size=4, steps=12, warmup=3,
    ),
    "quick": dict(
        teacher=narrowed(REFERENCE_TEACHER, 16, num_hidden_layers=2),
        student=narrowed(REFERENCE_STUDENT, 16, num_hidden_layers=2),
        seq_len=32, batch_size=2, steps=2, warmup=1,
    ),
}  # fmt: skip

NO_DISTILL = ("feature", "attention", "layerwise", "contrastive")
FULL_WEIGHT = {
    "kd_only_until": 0.0,
    "feature_ramp": (0.0, 0.0),
    "attention_ramp": (0.0, 0.0),
    "layerwise_ramp": (0.0, 0.0),
    "contrastive_ramp": (0.0, 0.0),
}
# Each variant: the TrainConfig fields it changes; everything else stays at the tool's defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "ce": {"curriculum": {"disabled": ("kd", *NO_DISTILL)}},
    "kd": {"curriculum": {"disabled": NO_DISTILL}},
    "all": {"curriculum": FULL_WEIGHT},
    "kd_tail": {"curriculum": {"disabled": NO_DISTILL}, "kd_mode": "tail"},
    "live": {"curriculum": {"disabled": NO_DISTILL}, "kd_mode": "projector", "live": True},
}
EXTRAS: dict[str, dict[str, Any]] = {  # the settings measured before the defaults became prefix at T=1
    "kd_tail_t4": {"curriculum": {"disabled": NO_DISTILL}, "kd_mode": "tail", "temperature": 4.0},
    "all_tail_t4": {"curriculum": FULL_WEIGHT, "kd_mode": "tail", "temperature": 4.0},
}


# --- one variant, in its own process --------------------------------------------------------


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec['steps']`` optimizer steps of one variant; time the steps after the warm-up ones."""
    import numpy as np
    import torch

    from distill.cache.targets import target_kind
    from distill.config import CurriculumConfig, TrainConfig
    from distill.curriculum import weights_at
    from distill.pipeline.train.batches import BatchStream
    from distill.pipeline.train.loop import build_optimizer, train_step
    from distill.pipeline.train.setup import setup

    variant = {**VARIANTS, **EXTRAS}[spec["variant"]]
    changes = {key: variant[key] for key in ("kd_mode", "temperature") if key in variant}
    cuda = spec["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_bytes()
    cfg = TrainConfig(
        cache=spec["store"],
        student=spec["student"],
        out=spec["out"],
        batch_size=spec["batch_size"],
        grad_accum=1,
        max_steps=spec["steps"],
        eval_fraction=0.0,
        curriculum=CurriculumConfig(**variant["curriculum"]),
        live_teacher=spec["teacher"] if variant.get("live") else None,
        # [one-device note] Read-ahead overlaps reading the cache with the step (CPU work, beside the
        # accelerator). The live teacher is compute on the same device as the student: on one GPU the two
        # serialize, but here read-ahead would run it on the second CPU core in parallel. So no read-ahead.
        num_workers_prefetch=0 if variant.get("live") else 2,
        device=spec["device"],
        precision="auto",  # fp32 on CPU, bf16 on GPUs that have it
        seed=0,
        **changes,
    )
    run = setup(cfg)
    opt = build_optimizer(run)
    stream = BatchStream(run.batches.prepare_batch, run.train_rows, cfg.seed, cfg.batch_size, run.world,
                         cfg.num_workers_prefetch)  # fmt: skip
    run.learner.train()

    def timed_step(step: int) -> tuple[int, dict[str, float]]:
        result = train_step(run, opt, stream, weights_at(step, run.total_steps, cfg.curriculum))
        if cuda:
            torch.cuda.synchronize()
        return result.tokens, result.logs

    times, tokens = [], []
    for step in range(cfg.max_steps):
        start = time.perf_counter()
        n, logs = timed_step(step)
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
            tokens.append(n)
    terms = sorted(k.split("/", 1)[1] for k, v in logs.items() if k.startswith("weighted/") and v != 0)
    peak_rss = peak_rss_bytes() - base_rss
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        # [tensor-peak note] RSS on glibc keeps freed heap memory mapped, so it says more about the allocator
        # than about the path. The tensor peak = bytes that live across steps (weights, optimizer state, the
        # live teacher) + the profiler's peak of bytes allocated during one more step (activations, grads,
        # the teacher's buffers, read-ahead) on top of them.
        live = getattr(run.batches.source, "model", None)  # the live teacher's weights
        persistent = {t.data_ptr(): t.nbytes for t in persistent_tensors([run.learner, live], opt.optimizer)}
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            timed_step(cfg.max_steps)
        peak = sum(persistent.values()) + profiled_peak(prof)
    stream.close()
    return {
        "variant": spec["variant"],
        "step_s": float(np.median(times)),
        "tokens_per_s": sum(tokens) / sum(times),
        "tokens_per_step": sum(tokens) / len(tokens),
        "peak_mem_bytes": peak,
        "peak_rss_bytes": peak_rss,
        "terms": terms,
        "settings": {
            "kd_mode": cfg.kd_mode,
            "temperature": cfg.temperature,
            "targets": target_kind(run.manifest["layout"]),
            "packing": run.manifest["layout"].get("packing", "none"),
            "changed": sorted(changes),
        },
    }


def persistent_tensors(modules: list[Any], optimizer: Any) -> list[Any]:
    """Tensors alive across steps: the modules' weights (None: skipped) and the optimizer state."""
    import torch

    found = [t for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]]
    found += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return found


def profiled_peak(prof: Any) -> int:
    """The largest 'Total Allocated' of a CPU profile with profile_memory=True (bytes allocated since it began)."""
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0)


def spawn_variant(spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, __file__, "--threads", str(spec["threads"]), "--worker", json.dumps(spec)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {spec['variant']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the bench ------------------------------------------------------------------------------


def make_store(teacher: Path, data: Path, out: Path, size: dict[str, Any], minimal: bool) -> dict[str, Any]:
    """``cache-teacher``'s defaults on ``batch_size`` rows (minimal: no hidden or attention fields, + vocab_proj)."""
    from distill.config import CacheConfig
    from distill.pipeline.teacher import cache_teacher

    cfg = CacheConfig(
        teacher=str(teacher),
        dataset=str(data),
        out=str(out),
        seq_len=size["seq_len"],
        max_rows=size["batch_size"],
        batch_size=size["batch_size"],
        chunk_rows=size["batch_size"],
        calibration_rows=size["batch_size"],
        hidden_layers=[] if minimal else None,
        attention_layers=[] if minimal else None,
        vocab_proj=minimal,  # opt-in; the projector variant (d), whose store is the minimal one, needs it
        device=size.get("device", "cpu"),
    )
    return cache_teacher.run(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    parser.add_argument("--reference", action="store_true", help="the reference pair's sizes (use a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see docs/benchmarks.md)")
    parser.add_argument(
        "--tokenizers",
        choices=("trained", "real"),
        default="trained",
        help="trained: small BPEs on the demo corpus; real: Qwen3's and SmolLM2's on real text (real tier's cache)",
    )
    parser.add_argument("--extras", action="store_true", help="also the older settings (kd_mode=tail at T=4)")
    parser.add_argument("--keep", help="build the assets here and keep them (default: a temporary directory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    offline_env()
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        emit(run_variant(json.loads(args.worker)))
        return
    name = "quick" if args.quick else "reference" if args.reference else "full"
    size = {**SIZES[name], "device": args.device}
    started = time.perf_counter()
    with TemporaryDirectory(prefix="distill-bench-stage2-") as tmp:
        root = Path(args.keep or tmp)
        if args.tokenizers == "real":
            # ~4.4 characters per token on this text: the first document fills the batch's rows with room to spare
            assets = real_corpus_and_tokenizers(root, min_chars=6 * size["seq_len"] * size["batch_size"])
        else:
            docs_per_document = 3 * size["seq_len"] // 40
            assets = build_corpus_and_tokenizers(root, size["batch_size"], docs_per_document=docs_per_document)
        teacher = build_teacher(root, assets["teacher_tok"], size["teacher"])
        student = build_student(root, assets["student_tok"], size["student"])
        stored = make_store(teacher, assets["data"], root / "store", size, minimal=False)
        make_store(teacher, assets["data"], root / "store_live", size, minimal=True)
        results = {}
        variants = {**VARIANTS, **(EXTRAS if args.extras else {})}
        for variant, changes in variants.items():
            spec = {
                "variant": variant,
                "store": str(root / ("store_live" if changes.get("live") else "store")),
                "student": str(student),
                "teacher": str(teacher),
                "out": str(root / "runs" / variant),
                "threads": args.threads,
                "device": args.device,
                **{k: size[k] for k in ("batch_size", "steps", "warmup")},
            }
            results[variant] = spawn_variant(spec)
    step = {name: r["step_s"] for name, r in results.items()}
    summary = {
        "kd_over_ce": round(step["kd"] / step["ce"], 3),
        "all_over_ce": round(step["all"] / step["ce"], 3),
        "prefix_over_tail": round(step["kd"] / step["kd_tail"], 3),
        "live_over_cache": round(step["live"] / step["kd"], 3),
        "kd_mem_over_ce": round(results["kd"]["peak_mem_bytes"] / results["ce"]["peak_mem_bytes"], 3),
        "mem_cache_over_live": round(results["kd"]["peak_mem_bytes"] / results["live"]["peak_mem_bytes"], 3),
        "tokens_per_s": {name: round(r["tokens_per_s"], 1) for name, r in results.items()},
        "step_ms": {name: round(1000 * s, 1) for name, s in step.items()},
        "student_tokens_per_step": results["ce"]["tokens_per_step"],
        "teacher_tokens_per_step": stored["tokens"],
        "student_tokens_per_teacher_token": round(results["ce"]["tokens_per_step"] / stored["tokens"], 3),
        "peak_mem_bytes": {name: r["peak_mem_bytes"] for name, r in results.items()},
        "peak_rss_bytes": {name: r["peak_rss_bytes"] for name, r in results.items()},
        "terms": {name: r["terms"] for name, r in results.items()},
        "settings": {name: r["settings"] for name, r in results.items()},
        "sizes": {**size, "threads": args.threads, "tokenizers": args.tokenizers},
        "quick": args.quick,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"stage 2 bench ({name}, {args.tokenizers} tokenizers): teacher {describe(size['teacher'])}")
    print(f"  student {describe(size['student'])}")
    print(
        f"  rows of {size['seq_len']} teacher tokens, batch {size['batch_size']}, {size['steps']} steps "
        f"({size['warmup']} warm-up), {summary['student_tokens_per_teacher_token']} student tokens per teacher token"
    )
    for name, r in results.items():
        settings = r["settings"]
        print(
            f"  {name:11s} {settings['kd_mode']:9s} T={settings['temperature']:g} {r['tokens_per_s']:9.1f} tok/s  "
            f"step {1000 * r['step_s']:8.1f} ms  "
            f"peak mem {r['peak_mem_bytes'] / 2**20:7.1f} MiB (RSS {r['peak_rss_bytes'] / 2**20:7.1f})  "
            f"terms {','.join(r['terms'])}"
        )
    for key, (op, target) in TARGETS.items():
        value = summary[key]
        ok = value <= target if op == "<=" else value >= target
        print(f"  {key:20s} {value:7.3f}  target {op} {target}  {'met' if ok else 'MISSED'}")
    emit(summary)


TARGETS = {  # issue 24's targets
    "kd_over_ce": ("<=", 1.1),
    "all_over_ce": ("<=", 1.3),
    "prefix_over_tail": ("<=", 1.05),
    "kd_mem_over_ce": ("<=", 1.15),
    "live_over_cache": (">=", 3.0),
    "mem_cache_over_live": ("<=", 0.5),
}

if __name__ == "__main__":
    main()
