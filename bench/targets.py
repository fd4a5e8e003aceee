"""Compact teacher targets on the trained teacher: bytes per token, fidelity, and students trained from each.

    OMP_NUM_THREADS=1 python bench/targets.py --work /tmp/targets     # ~45 min on 2 busy cores

Teacher Gemma 3 270M (~/.cache/distill-real, converted by tests/real/assets.py) on the real text's first
``--rows`` rows of 128 tokens, cached four times with nothing but the targets (``--hidden-layers none
--attention-layers none``): today's fixed fp16 top-256 (``--targets topk-fp16 --top-k 256``, the layout of
schema 2), and the defaults of ``topk``, ``sampled`` and ``hybrid``. A from-scratch student (SmolLM2's
tokenizer) is trained from the first three (``--train-kinds``) for the same steps on the same rows (kd + lm,
``--final last``), and ``distill eval`` scores them on the same held-out store (bits per byte, bootstrap
intervals). Prints each command, then one JSON line: bytes per token per field, the fidelity figures of
each manifest, and each student's held-out bits per byte and its difference from the fp16 top-256 student.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REAL = Path.home() / ".cache" / "distill-real"
KINDS = {
    "fp16-top256": ["--targets", "topk-fp16", "--top-k", "256"],
    "topk": [],
    "sampled": ["--targets", "sampled"],
    "hybrid": ["--targets", "hybrid"],
}
TARGET_FIELDS = ("topk_ids", "topk_logits", "lse", "target_count", "target_ids", "target_values", "target_max")
TARGET_FIELDS += ("target_draws",)
BUDGET = {"topk": 150.0, "sampled": 60.0}  # B/token of the target fields (issue 15)


def distill(*args: str, capture: bool = False) -> str:
    """Run ``distill ARGS`` as a user would."""
    command = [sys.executable, "-m", "distill.cli", *args]
    print("$ distill " + " ".join(args), flush=True)
    result = subprocess.run(command, cwd=REPO, check=True, text=True, capture_output=capture)
    return result.stdout if capture else ""


def cache(work: Path, kind: str, rows: int, calibration_rows: int) -> dict:
    """Cache the rows with this kind of targets (resumes a finished store at once) and return its info."""
    store = work / "stores" / kind
    distill(
        "cache-teacher", "--teacher", str(REAL / "gemma3-270m"), "--dataset", str(REAL / "text" / "train.jsonl"),
        "--out", str(store), "--seq-len", "128", "--max-rows", str(rows), "--hidden-layers", "none",
        "--attention-layers", "none", "--calibration-rows", str(calibration_rows), "--batch-size", "4",
        *KINDS[kind],
    )  # fmt: skip
    return json.loads(distill("cache", "info", str(store), "--json", capture=True))


def train(work: Path, kind: str, args: argparse.Namespace) -> Path:
    """The student trained from one store (skipped when its final model exists)."""
    run = work / "runs" / kind
    if (run / "final" / "final.json").exists():
        return run
    distill(
        "train", "--cache", str(work / "stores" / kind), "--student", str(args.student), "--out", str(run),
        "--eval-cache", str(args.eval_store), "--max-steps", str(args.steps), "--batch-size", "4",
        "--eval-every", "100000", "--log-every", "20", "--final", "last", "--overwrite",
        "--set", "grad_accum=2", "--set", "lr=2e-3", "--set", "objective=kd-only",
    )  # fmt: skip
    return run


def summarize(kind: str, info: dict) -> dict:
    """Bytes per token of the target fields and the manifest's fidelity figures."""
    per = info["bytes_per_token"]["fields"]
    fields = {name: round(per[name], 2) for name in TARGET_FIELDS if name in per}
    out = {
        "bytes_per_token": fields,
        "target_bytes_per_token": round(sum(fields.values()), 1),
        "target_logprob_bytes_per_token": round(per["target_logprob"], 2),
        "head_mass": info["head_mass"],
    }
    if "fidelity" in info["manifest"]:
        out["fidelity"] = info["manifest"]["fidelity"]
    if kind in BUDGET:
        out["budget"] = BUDGET[kind]
        out["within_budget"] = out["target_bytes_per_token"] <= BUDGET[kind]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/distill-targets"))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--calibration-rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--student", type=Path, default=Path("/work/rp/students/scratch"))
    parser.add_argument("--eval-store", type=Path, default=Path("/work/rp/stores/validation"))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--train-kinds", default="fp16-top256,topk,sampled", help="the students to train")
    parser.add_argument("--jobs", type=int, default=3, help="students trained at once")
    parser.add_argument("--no-train", action="store_true", help="only cache and measure bytes and fidelity")
    args = parser.parse_args()
    started = time.time()
    kinds = args.kinds.split(",")
    results = {kind: summarize(kind, cache(args.work, kind, args.rows, args.calibration_rows)) for kind in kinds}
    if not args.no_train:
        trained = [kind for kind in args.train_kinds.split(",") if kind in kinds]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(lambda kind: train(args.work, kind, args), trained))
        report = args.work / "report"
        distill("eval", *map(str, runs), "--out", str(report), "--verify-cache", "quick")
        students = json.loads((report / "report.json").read_text())["students"]
        base = students.get("fp16-top256", {}).get("bpb")
        for kind in trained:
            s = students[kind]
            results[kind].update(bpb=round(s["bpb"], 4), bpb_ci=[round(x, 4) for x in s["bpb_ci"]])
            if base:
                results[kind]["bpb_vs_fp16_top256"] = round(s["bpb"] / base - 1, 4)
                results[kind]["within_1pct"] = abs(s["bpb"] / base - 1) <= 0.01
    line = {
        "bench": "targets",
        "teacher": "gemma3-270m",
        "rows": args.rows,
        "seq_len": 128,
        "steps": None if args.no_train else args.steps,
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
