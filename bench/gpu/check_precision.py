"""End-to-end check of the reduced-precision paths on the project's own tiny models (the demo's).

    OUT=/tmp/cp python3 bench/gpu/check_precision.py --device cuda          # on a GPU (a few minutes)
    OUT=/tmp/cp python3 bench/gpu/check_precision.py --device cpu --quick \
        --dtypes fp32,bf16 --precisions fp32,bf16                           # logic smoke test on a CPU

What it does, each step through the real CLI (``distill cache-teacher``, ``distill train``,
``distill eval``) in its own process:

1. builds the demo assets (corpus, two BPE tokenizers, tiny Qwen3-MoE teacher, tiny Llama student,
   ``distill.pipeline.demo``) and pretrains the teacher briefly on ``--device`` (a random teacher's
   near-uniform logits would hide precision errors);
2. ``cache-teacher --dtype D`` for every D of ``--dtypes`` on the same rows (plus one fp32 eval store);
3. compares every store with the fp32 one: finiteness of every stored field, max abs diffs of
   ``lse``, ``target_logprob``, ``topk_logits`` (by rank and at the ids both kept), top-1 / top-K id
   agreement, hidden states and attention weights;
4. ``train --set precision=P`` for every P of ``--precisions`` (every loss term at full weight from
   step 0, a log line per step), each on the store of the same dtype (fp32 for fp32), the fp32 eval
   store held out for all: finite losses, first vs last losses, skipped (non-finite) gradient steps,
   tok/s;
5. ``distill eval`` of all runs on the same held-out rows (eval runs on the CPU: it has no device option);
6. optionally ``bench/stage2.py --reference --device cuda`` when enough of ``--budget-s`` is left.

Everything lands in $OUT (default /tmp/check_precision): results.json (rewritten after every step),
log.txt (every subprocess's output), eval_report.md, stage2.json. Exit status 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

OUT = Path(os.environ.get("OUT") or "/tmp/check_precision")
STARTED = time.perf_counter()
RESULTS: dict[str, Any] = {"failures": []}
ALL_TERMS_NOW = [
    "curriculum.kd_only_until=0",
    "curriculum.feature_ramp=[0,0]",
    "curriculum.attention_ramp=[0,0]",
    "curriculum.layerwise_ramp=[0,0]",
    "curriculum.contrastive_ramp=[0,0]",
]


def elapsed() -> float:
    return time.perf_counter() - STARTED


def save() -> None:
    RESULTS["elapsed_s"] = round(elapsed(), 1)
    (OUT / "results.json").write_text(json.dumps(RESULTS, indent=2, default=str))


def fail(what: str, detail: str) -> None:
    print(f"FAILED {what}: {detail}", flush=True)
    RESULTS["failures"].append({"what": what, "detail": detail})
    save()


def log(text: str) -> None:
    with (OUT / "log.txt").open("a", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TQDM_DISABLE="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


DISTILL = [sys.executable, "-c", "from distill.cli import main; main()"]


def start(name: str, args: list[str]) -> tuple[str, subprocess.Popen, float]:
    """Start one command; its output goes to a temporary file, appended to log.txt when it ends."""
    logfile = WORK / f"{name}.log"
    handle = logfile.open("w", encoding="utf-8")
    print(f"$ {' '.join(args[3:] if args[:3] == DISTILL else args)}", flush=True)
    proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    proc._logfile = logfile  # type: ignore[attr-defined]
    proc._handle = handle  # type: ignore[attr-defined]
    RESULTS.setdefault("commands", []).append(" ".join(["distill", *args[3:]] if args[:3] == DISTILL else args))
    return name, proc, time.perf_counter()


def finish(job: tuple[str, subprocess.Popen, float], timeout: float) -> tuple[int, str, float]:
    name, proc, t0 = job
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = -9
    proc._handle.close()  # type: ignore[attr-defined]
    text = proc._logfile.read_text(encoding="utf-8", errors="replace")  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    log(f"===== {name}: rc {rc}, {seconds:.1f}s =====\n{text}")
    tail = "\n".join(text.strip().splitlines()[-3:])
    print(f"  [{name}] rc {rc} in {seconds:.1f}s | {tail[-400:]}", flush=True)
    if rc != 0:
        fail(name, f"rc {rc}{' (timed out)' if rc == -9 else ''}: {text.strip()[-1500:]}")
    return rc, text, seconds


def run_parallel(jobs: list[tuple[str, list[str]]], timeout: float) -> dict[str, tuple[int, str, float]]:
    started = [start(name, args) for name, args in jobs]
    deadline = time.perf_counter() + timeout
    return {job[0]: finish(job, deadline - time.perf_counter()) for job in started}


def remaining() -> float:
    return ARGS.budget_s - elapsed()


# --- 0. environment -------------------------------------------------------------------------


def environment() -> None:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in (
        "torch", "transformers", "tokenizers", "huggingface-hub", "datasets", "zarr", "numcodecs", "numpy",
        "pyarrow", "fsspec", "typer", "h5py", "matplotlib", "donfig", "google-crc32c", "pandas",
    ):  # fmt: skip
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    env = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": versions,
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = list(torch.cuda.get_device_capability(0))
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    RESULTS["env"] = env
    print(json.dumps(env), flush=True)
    save()


# --- 1. assets ------------------------------------------------------------------------------


def assets() -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.pipeline.demo import build_demo_assets

    t0 = time.perf_counter()
    paths = build_demo_assets(WORK / "assets", seed=0, num_docs=ARGS.num_docs)
    t_assets = time.perf_counter() - t0
    # pretrain the teacher on --device (demo.pretrain_teacher runs on the CPU)
    texts = [json.loads(line)["text"] for line in paths["train"].read_text(encoding="utf-8").splitlines()]
    device = torch.device(ARGS.device)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["teacher"])
    model = AutoModelForCausalLM.from_pretrained(paths["teacher"], dtype=torch.float32).to(device)
    stream = [i for t in texts for i in tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]]
    seq = 128
    data = torch.tensor(stream[: len(stream) // seq * seq]).view(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=ARGS.teacher_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    t1 = time.perf_counter()
    for _ in range(ARGS.teacher_steps):
        batch = data[torch.randint(0, len(data), (16,), generator=gen)].to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.cpu().save_pretrained(paths["teacher"])
    RESULTS["assets"] = {
        "build_s": round(t_assets, 1),
        "teacher_pretrain_s": round(time.perf_counter() - t1, 1),
        "teacher_steps": ARGS.teacher_steps,
        "teacher_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
    }
    print(f"assets: {RESULTS['assets']}", flush=True)
    save()
    return paths


# --- 2. caches ------------------------------------------------------------------------------


def cache_args(paths: dict[str, Path], split: str, dtype: str, out: Path, rows: int) -> list[str]:
    return [
        *DISTILL, "cache-teacher", "--teacher", str(paths["teacher"]), "--dataset", str(paths[split]),
        "--split", "train" if split == "train" else "validation", "--out", str(out), "--seq-len", "128",
        "--max-rows", str(rows), "--device", ARGS.device, "--dtype", dtype, "--batch-size", "16",
        "--chunk-rows", "32", "--calibration-rows", "64",
    ]  # fmt: skip


def caches(paths: dict[str, Path]) -> dict[str, Path]:
    stores = {dt: WORK / "cache" / f"train_{dt}" for dt in ARGS.dtypes}
    stores["eval"] = WORK / "cache" / "eval_fp32"
    jobs = [(f"cache-{dt}", cache_args(paths, "train", dt, stores[dt], ARGS.rows)) for dt in ARGS.dtypes]
    jobs.append(("cache-eval-fp32", cache_args(paths, "eval", "fp32", stores["eval"], ARGS.eval_rows)))
    results = run_parallel(jobs, min(ARGS.step_timeout, remaining() - 20))
    summary = {}
    for name, (rc, text, seconds) in results.items():
        line = next((ln for ln in text.splitlines() if ln.startswith("cached ")), None)
        summary[name] = {"rc": rc, "seconds": round(seconds, 1), "summary_line": line}
    RESULTS["caches"] = summary
    save()
    return stores


# --- 3. compare stores ----------------------------------------------------------------------


def read_store(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np
    import zarr

    root = zarr.open_group(str(path), mode="r")
    manifest = root.attrs["distill"]
    fields: dict[str, list] = {}
    for i in range(len(manifest["layout"]["shard_rows"])):
        shard = root[f"shards/{i:05d}"]
        assert shard.attrs["shard"]["status"] == "complete", f"{path} shard {i} incomplete"
        names = ["input_ids", "length", "topk_ids", "topk_logits", "lse", "target_logprob"]
        names += [f"hidden/{layer}" for layer in manifest["layout"]["hidden_layers"]]
        names += [f"attn/{layer}" for layer in manifest["layout"]["attention_layers"]]
        for name in names:
            fields.setdefault(name, []).append(np.asarray(shard[name][:]))
    return manifest, {k: np.concatenate(v) for k, v in fields.items()}


def compare_stores(stores: dict[str, Path]) -> None:
    import numpy as np

    ref_manifest, ref = read_store(stores["fp32"]) if "fp32" in stores else (None, None)
    out: dict[str, Any] = {}
    for dt in ARGS.dtypes:
        manifest, f = read_store(stores[dt])
        n_rows, seq = f["input_ids"].shape
        pos = np.arange(seq)[None, :]
        valid = pos < f["length"][:, None]  # real positions
        has_next = pos < (f["length"][:, None] - 1)  # positions with a next token
        r: dict[str, Any] = {
            "teacher_dtype_in_manifest": manifest["teacher"]["dtype"],
            "rows": int(n_rows),
            "tokens": int(f["length"].sum()),
            "empty_rows": int((f["length"] == 0).sum()),
        }
        finite = {}
        for name, arr in f.items():
            if not np.issubdtype(arr.dtype, np.floating):
                continue
            a = arr.astype(np.float32)
            mask = has_next if name == "target_logprob" else valid
            finite[name] = bool(np.isfinite(a[mask]).all())
        r["finite"] = finite
        if not all(finite.values()):
            fail(f"store {dt}", f"non-finite values in {[k for k, v in finite.items() if not v]}")
        if ref is not None and dt != "fp32":
            same_rows = bool(np.array_equal(ref["input_ids"], f["input_ids"])) and bool(
                np.array_equal(ref["length"], f["length"])
            )
            r["same_rows_as_fp32"] = same_rows
            if not same_rows:
                fail(f"store {dt}", "input_ids/length differ from the fp32 store")
            else:
                r["max_abs_diff"] = diffs(ref, f, valid, has_next, ref_manifest)
        out[dt] = r
        print(f"store {dt}: {json.dumps(r)}", flush=True)
    RESULTS["store_comparison"] = out
    save()


def diffs(ref: dict, f: dict, valid: Any, has_next: Any, manifest: dict) -> dict[str, Any]:
    import numpy as np

    d: dict[str, Any] = {}
    temps = manifest["layout"]["temperatures"]
    lse = np.abs(ref["lse"] - f["lse"])[valid]  # (P, nT)
    d["lse_by_temperature"] = {str(t): float(lse[:, j].max()) for j, t in enumerate(temps)}
    d["lse_mean_by_temperature"] = {str(t): float(lse[:, j].mean()) for j, t in enumerate(temps)}
    tl = np.abs(ref["target_logprob"] - f["target_logprob"])[has_next]
    d["target_logprob"] = float(tl.max())
    d["target_logprob_mean"] = float(tl.mean())
    rl, fl = ref["topk_logits"].astype(np.float32)[valid], f["topk_logits"].astype(np.float32)[valid]  # (P, K)
    ri, fi = ref["topk_ids"][valid], f["topk_ids"][valid]
    d["topk_logits_by_rank"] = float(np.abs(rl - fl).max())
    d["top1_logit"] = float(np.abs(rl[:, 0] - fl[:, 0]).max())
    d["top1_id_agreement"] = float((ri[:, 0] == fi[:, 0]).mean())
    # logits at the ids both stores kept, and the share of the K ids in common
    worst, overlap = 0.0, []
    for s in range(0, len(ri), 256):
        eq = ri[s : s + 256, :, None] == fi[s : s + 256, None, :]  # (p, K, K)
        overlap.append(eq.any(-1).mean(-1))
        diff = np.abs(rl[s : s + 256, :, None] - fl[s : s + 256, None, :])
        if eq.any():
            worst = max(worst, float(diff[eq].max()))
    d["topk_logits_same_id"] = worst
    d["topk_id_overlap_mean"] = float(np.concatenate(overlap).mean())
    d["topk_id_overlap_min"] = float(np.concatenate(overlap).min())
    # teacher probabilities of the top-K ids at T=1 (what KD consumes)
    j = temps.index(1.0) if 1.0 in temps else 0
    t = float(temps[j])
    pr = np.exp(rl / t - ref["lse"][valid][:, j, None])
    pf = np.exp(fl / t - f["lse"][valid][:, j, None])
    d["topk_prob_by_rank"] = float(np.abs(pr - pf).max())
    for name in ref:
        if name.startswith(("hidden/", "attn/")):
            a, b = ref[name].astype(np.float32)[valid], f[name].astype(np.float32)[valid]
            d[name] = float(np.abs(a - b).max())
    return d


# --- 4. train -------------------------------------------------------------------------------


def train_args(paths: dict[str, Path], stores: dict[str, Path], precision: str) -> list[str]:
    store = stores.get(precision, stores.get("fp32"))
    sets = [
        f"device={ARGS.device}", f"precision={precision}", "grad_accum=1", "lr=2e-3", "router_lr=2e-3",
        "eval_rows=32", "early_stop_warmup=100000", "num_workers_prefetch=2", *ALL_TERMS_NOW,
    ]  # fmt: skip
    args = [
        *DISTILL, "train", "--cache", str(store), "--eval-cache", str(stores["eval"]),
        "--student", str(paths["student"]), "--out", str(WORK / "runs" / precision),
        "--max-steps", str(ARGS.train_steps), "--batch-size", "8", "--log-every", "1",
        "--eval-every", str(max(1, ARGS.train_steps // 2)), "--final", "last",
    ]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return args


def train(paths: dict[str, Path], stores: dict[str, Path]) -> list[str]:
    jobs = [(f"train-{p}", train_args(paths, stores, p)) for p in ARGS.precisions]
    if ARGS.sequential_train:
        results = {}
        for job in jobs:
            results.update(run_parallel([job], min(ARGS.step_timeout, remaining() - 20)))
    else:
        results = run_parallel(jobs, min(ARGS.step_timeout, remaining() - 20))
    summary, done = {}, []
    for p in ARGS.precisions:
        rc, text, seconds = results[f"train-{p}"]
        s: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1), "store": str(stores.get(p, stores["fp32"]))}
        metrics_file = WORK / "runs" / p / "metrics.jsonl"
        lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
        s["log_lines_first_last"] = [lines[0], lines[-1]] if lines else []
        s["summary_line"] = next((ln for ln in text.splitlines() if ln.startswith("trained ")), None)
        if metrics_file.exists():
            recs = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln.strip()]
            tr = [r for r in recs if r.get("split") == "train"]
            ev = [r for r in recs if r.get("split") == "eval"]
            if tr:
                terms = sorted(k for k in tr[-1] if k.startswith("loss/"))
                total = [r["loss/total"] for r in tr]
                nonfinite = {
                    k: sum(1 for r in tr if isinstance(r.get(k), float) and not math.isfinite(r[k])) for k in terms
                }
                k = max(1, min(5, len(total) // 4))
                s.update(
                    steps_logged=len(tr),
                    terms=terms,
                    loss_first=total[0],
                    loss_last=total[-1],
                    loss_first_mean=sum(total[:k]) / k,
                    loss_last_mean=sum(total[-k:]) / k,
                    loss_total=[round(x, 4) for x in total],
                    loss_terms_first={t: tr[0].get(t) for t in terms},
                    loss_terms_last={t: tr[-1].get(t) for t in terms},
                    nonfinite_losses=nonfinite,
                    nonfinite_grad_norm_steps=[r["step"] for r in tr if not math.isfinite(r.get("grad_norm", 0.0))],
                    tokens_per_s_median=sorted(r["tokens_per_s"] for r in tr)[len(tr) // 2],
                    tokens_per_s_last=tr[-1]["tokens_per_s"],
                    eval=[{kk: v for kk, v in r.items() if kk != "split"} for r in ev],
                )
                expected = {f"loss/{t}" for t in ("kd", "lm", "feature", "attention", "layerwise", "contrastive")}
                missing = sorted(expected - set(terms))
                s["missing_terms"] = missing
                if missing:
                    fail(f"train {p}", f"loss terms never logged: {missing}")
                if any(nonfinite.values()):
                    fail(f"train {p}", f"non-finite losses: {nonfinite}")
                if not s["loss_last_mean"] < s["loss_first_mean"]:
                    first, last = s["loss_first_mean"], s["loss_last_mean"]
                    fail(f"train {p}", f"loss did not decrease: {first:.4g} -> {last:.4g}")
        elif rc == 0:
            fail(f"train {p}", "no metrics.jsonl")
        if rc == 0:
            done.append(p)
        summary[p] = s
        print(f"train {p}: {json.dumps({k: v for k, v in s.items() if k != 'loss_total'})}", flush=True)
    RESULTS["train"] = summary
    RESULTS["train_note"] = (
        "runs in parallel on one device (tok/s is shared)" if not ARGS.sequential_train else "runs one at a time"
    )
    save()
    return done


# --- 5. eval --------------------------------------------------------------------------------


def evaluate(done: list[str]) -> None:
    if not done:
        return
    report = WORK / "report"
    args = [*DISTILL, "eval", *[str(WORK / "runs" / p) for p in done], "--out", str(report)]
    results = run_parallel([("eval", args)], min(ARGS.step_timeout, remaining() - 10))
    rc, text, seconds = results["eval"]
    r: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1)}
    if (report / "report.json").exists():
        rep = json.loads((report / "report.json").read_text())
        r["teacher_bpb"] = rep.get("teacher_bpb")
        r["students"] = {
            name: {k: v for k, v in st.items() if k in ("bpb", "kd_loss", "top1_agreement", "ece", "aligned_positions")}
            for name, st in rep.get("students", {}).items()
        }
        for name, st in r["students"].items():
            bad = [k for k, v in st.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                fail(f"eval {name}", f"non-finite {bad}")
    if (report / "report.md").exists():
        (OUT / "eval_report.md").write_text((report / "report.md").read_text())
    RESULTS["eval"] = r
    print(f"eval: {json.dumps(r)}", flush=True)
    save()


# --- 6. stage-2 bench -----------------------------------------------------------------------


def stage2() -> None:
    if ARGS.stage2 == "none":
        return
    if RESULTS["failures"] and not ARGS.stage2_always:  # leave the device time for a fix and a rerun
        RESULTS["stage2"] = {"skipped": "an earlier check failed (--stage2-always runs it anyway)"}
        save()
        return
    left = remaining() - 10
    if left < ARGS.stage2_min_s:
        RESULTS["stage2"] = {"skipped": f"only {left:.0f}s of the budget left"}
        save()
        return
    cmd = [sys.executable, "bench/stage2.py", f"--{ARGS.stage2}", "--device", ARGS.device]
    results = run_parallel([("stage2", cmd)], left)
    rc, text, seconds = results["stage2"]
    last = text.strip().splitlines()[-1] if text.strip() else ""
    r: dict[str, Any] = {"rc": rc, "seconds": round(seconds, 1), "command": " ".join(cmd[1:])}
    try:
        r["json"] = json.loads(last)
        (OUT / "stage2.json").write_text(json.dumps(r["json"], indent=2))
    except json.JSONDecodeError:
        r["tail"] = text.strip()[-2000:]
    r["table"] = [ln for ln in text.splitlines() if ln.startswith("  ") or ln.startswith("stage 2 bench")]
    RESULTS["stage2"] = r
    save()


def main() -> None:
    global ARGS, WORK
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="cache-teacher --dtype values (fp32 first)")
    parser.add_argument("--precisions", default="fp32,fp16,bf16", help="train precision values")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test of this script)")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting steps past this many seconds")
    parser.add_argument("--step-timeout", type=float, default=240)
    parser.add_argument("--stage2", default="reference", help="reference | quick | full | none")
    parser.add_argument("--stage2-min-s", type=float, default=90)
    parser.add_argument("--stage2-always", action="store_true", help="run the bench even after a failed check")
    parser.add_argument("--sequential-train", action="store_true")
    parser.add_argument("--work", default="/tmp/check_precision_work", help="a fresh folder (stores are not reused)")
    parser.add_argument("--train-steps", type=int, help="override the optimizer steps of each train run")
    parser.add_argument("--teacher-steps", type=int, help="override the teacher's pretraining steps")
    ARGS = parser.parse_args()
    ARGS.dtypes = [d for d in ARGS.dtypes.split(",") if d]
    ARGS.precisions = [p for p in ARGS.precisions.split(",") if p]
    ARGS.num_docs, ARGS.teacher_steps_default, ARGS.rows, ARGS.eval_rows, ARGS.train_steps_default = (
        (200, 20, 16, 8, 6) if ARGS.quick else (1500, 300, 96, 32, 60)
    )
    ARGS.train_steps = ARGS.train_steps or ARGS.train_steps_default
    ARGS.teacher_steps = ARGS.teacher_steps or ARGS.teacher_steps_default
    WORK = Path(ARGS.work)
    WORK.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    for k in ("device", "dtypes", "precisions", "quick", "num_docs", "teacher_steps", "rows", "eval_rows"):
        RESULTS.setdefault("settings", {})[k] = getattr(ARGS, k)
    RESULTS["settings"]["train_steps"] = ARGS.train_steps
    environment()
    try:
        paths = assets()
        stores = caches(paths)
        try:
            compare_stores(stores)
        except Exception as exc:  # noqa: BLE001 - report and go on
            fail("compare", repr(exc))
        done = train(paths, stores)
        evaluate(done)
        stage2()
    except Exception:  # noqa: BLE001
        import traceback

        fail("driver", traceback.format_exc()[-3000:])
        raise
    finally:
        save()
    print(f"done in {elapsed():.0f}s; failures: {len(RESULTS['failures'])}", flush=True)
    sys.exit(1 if RESULTS["failures"] else 0)


ARGS: Any = None
WORK = Path("/tmp/check_precision_work")

if __name__ == "__main__":
    main()
