"""Does an on-policy round pay? Off-policy only against off-policy plus on-policy rounds, from the same starting
student and the same teacher compute, through the real CLI (issue 26, item 4).

    python bench/on_policy.py --work /tmp/on-policy                 # the real pair (Gemma 3 270M -> scratch student)
    python bench/on_policy.py --work /tmp/on-policy --rounds 2
    python bench/on_policy.py --work /tmp/on-policy --lite           # the real pair, smaller plan (LITE)
    python bench/on_policy.py --work /tmp/on-policy-smoke --smoke   # tiny generated models, a minute on a CPU

The train documents are split in two: ``base`` (cached once, store A) and ``prompts`` (where each round's
prompts come from). The starting student trains on A (``--checkpoint-last --final last``); then each arm, from
a copy of that run, does ``--rounds`` rounds of:
- ``on``: ``distill rollout`` from the arm's own student on the round's prompts, ``cache-teacher`` on it,
  ``train --resume auto`` with the store added;
- ``off``: the same prompts followed by the documents' real text, cut to the length of the on arm's rollout of
  the same prompt (the same characters for the teacher to score: the same teacher compute), cached and added alike.
Both arms train on the continuations only (the prompt is context) with the same weights and steps.

Prompts are pieces of documents (``pieces``: a few paragraphs each), so that a corpus of few long documents gives
many prompts; the held-out prompts are pieces of the validation documents.

Metrics (one JSON line): held-out bits per byte (``distill eval`` on the validation store, intervals over
documents, paired with ``off`` as the baseline), and the teacher's bits per byte of each student's own samples
on held-out prompts: how likely the teacher finds what the student writes, on the continuation's bytes only,
with a 95% bootstrap interval over prompts. The starting student is scored too.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REAL = {
    "seq_len": 128, "base_rows": 192, "start_steps": 200, "round_steps": 100, "batch_size": 4, "grad_accum": 2,
    "lr": 2e-3, "prompts": 256, "prompt_chars": 200, "max_new_tokens": 64, "eval_prompts": 64, "base_share": 0.5,
}  # fmt: skip
LITE = {
    **REAL, "start_steps": 200, "round_steps": 100, "batch_size": 2, "grad_accum": 1, "prompts": 128,
    "eval_prompts": 48,
}  # fmt: skip
"""``--lite``: the real pair at a quarter of the training and half the prompts (on 2 CPU cores: 18 minutes for one
round with the base store and the starting run, beside the test tier; 14 for two rounds once those exist)."""
SMOKE = {
    "seq_len": 32, "base_rows": 48, "start_steps": 4, "round_steps": 2, "batch_size": 2, "grad_accum": 1,
    "lr": 1e-3, "prompts": 6, "prompt_chars": 30, "max_new_tokens": 8, "eval_prompts": 4, "base_share": 0.5,
}  # fmt: skip
SMOKE_STORE = ["--top-k", "16", "--hidden-layers", "none", "--attention-layers", "none", "--calibration-rows", "8"]


def distill(*args: object) -> None:
    """Run ``distill ARGS`` as a user would; the output goes to the terminal."""
    print("$ distill " + " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "distill.cli", *map(str, args)], cwd=REPO, check=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# --- assets ---------------------------------------------------------------------------------


def real_assets(work: Path) -> dict[str, Path]:
    """Gemma 3 270M, SmolLM2's tokenizer on a random-init Llama (bench/real_pairs.py), the pydoc text."""
    from bench.real_pairs import build_scratch_student
    from tests.real.assets import fetch_all

    assets = fetch_all()
    student = build_scratch_student(assets, work / "students" / "scratch")
    return {"teacher": assets["gemma3"], "student": student, "train": assets["train"], "held": assets["validation"]}


def smoke_assets(work: Path) -> dict[str, Path]:
    """A tiny teacher and student with two tokenizers on a generated corpus (the demo's builders)."""
    from distill.pipeline.demo import build_model, generate_corpus, student_config, teacher_config, train_tokenizer

    root = work / "assets"
    if not (root / "student" / "config.json").is_file():
        corpus = generate_corpus(160, seed=1)
        write_jsonl([{"text": t} for t in corpus[:140]], root / "train.jsonl")
        write_jsonl([{"text": t} for t in corpus[140:]], root / "held.jsonl")
        teacher_tok = train_tokenizer(corpus, 400, root / "teacher_tok")
        build_model(teacher_config(len(teacher_tok), hidden=64, layers=2, experts=4), root / "teacher", teacher_tok, 0)
        student_tok = train_tokenizer(corpus, 300, root / "student_tok")
        build_model(student_config(len(student_tok), hidden=32, layers=2), root / "student", student_tok, 0)
    names = ("teacher", "student", "train.jsonl", "held.jsonl")
    return dict(zip(("teacher", "student", "train", "held"), (root / n for n in names)))


def split_documents(train: Path, work: Path, plan: dict) -> tuple[Path, Path]:
    """``base``: the documents store A is cached from; ``prompts``: the rest, cut into pieces (``pieces``), where
    the rounds' prompts come from (one prompt per piece)."""
    docs = [r["text"] for r in read_jsonl(train) if r["text"].strip()]
    cut = len(docs) // 2
    base = write_jsonl([{"text": t} for t in docs[:cut]], work / "data" / "base.jsonl")
    return base, write_jsonl([{"text": t} for t in pieces(docs[cut:], plan)], work / "data" / "prompts.jsonl")


def pieces(docs: list[str], plan: dict) -> list[str]:
    """Each document cut at blank lines into pieces of at least ``4 * prompt_chars`` characters (the last piece
    of a document joins the one before when shorter): many prompts from few long documents, each with real text
    after the prompt for the off-policy twin."""
    least, out = 4 * plan["prompt_chars"], []
    for doc in docs:
        current: list[str] = []
        for paragraph in doc.split("\n\n"):
            current.append(paragraph)
            if sum(len(p) + 2 for p in current) >= least:
                out.append("\n\n".join(current))
                current = []
        if current:
            if out and sum(len(p) + 2 for p in current) < least:
                out[-1] += "\n\n" + "\n\n".join(current)
            else:
                out.append("\n\n".join(current))
    return [piece for piece in out if piece.strip()]


# --- the runs -------------------------------------------------------------------------------


def cache(assets: dict, data: Path, out: Path, plan: dict, smoke: bool, *extra: object) -> Path:
    if not (out / "zarr.json").is_file():
        distill("cache-teacher", "--teacher", assets["teacher"], "--dataset", data, "--out", out,
                "--seq-len", plan["seq_len"], *(SMOKE_STORE if smoke else []), *extra)  # fmt: skip
    return out


def train(run: Path, stores: list[Path], held: Path, student: Path, steps: int, plan: dict, resume: bool) -> None:
    caches = [arg for store in stores for arg in ("--cache", store)]
    added = len(stores) - 1  # the base store keeps its share, the rounds' stores split the rest
    shares = [plan["base_share"], *[(1 - plan["base_share"]) / max(1, added)] * added]
    weights = ["--cache-weights", ",".join(f"{w:g}" for w in shares)] if added else []
    distill("train", *caches, *weights, "--eval-cache", held, "--student", student, "--out", run,
            "--max-steps", steps, "--batch-size", plan["batch_size"], "--eval-every", max(1, plan["round_steps"]),
            "--log-every", 25, "--objective", "kd-only", "--checkpoint-last", "--final", "last",
            "--preflight-rows", 0, "--set", f"grad_accum={plan['grad_accum']}", "--set", f"lr={plan['lr']}",
            *(["--resume", "auto"] if resume else []))  # fmt: skip


def rollout(student: Path, prompts: Path, out: Path, plan: dict, count: int, seed: int) -> Path:
    distill("rollout", "--student", student, "--dataset", prompts, "--out", out, "--num-prompts", count,
            "--prompt-chars", plan["prompt_chars"], "--max-new-tokens", plan["max_new_tokens"], "--temperature", 1,
            "--top-p", 1, "--seed", seed, "--batch-size", 16)  # fmt: skip
    return out


def off_policy_twin(rollouts: Path, prompts: Path, out: Path) -> Path:
    """The same prompts followed by the documents' real text, as many characters as the student wrote."""
    docs = [r["text"] for r in read_jsonl(prompts)]
    twins = [
        {"text": docs[r["source_document"]][: len(r["text"])], "prompt_chars": r["prompt_chars"]}
        for r in read_jsonl(rollouts)
    ]
    return write_jsonl(twins, out)


def teacher_bpb_of_continuations(store: Path, seed: int = 0) -> dict[str, float]:
    """The teacher's bits per byte of the continuations in a store of rollouts (the tokens wholly after each
    prompt, on their bytes), with a 95% bootstrap interval over prompts (rows: stores made with --packing none)."""
    from distill.cache.reader import CacheReader
    from distill.pipeline.train.signals import read_row_context

    reader = CacheReader(str(store))
    data = reader.read_rows(reader.row_ids, ["offsets", "length", "target_logprob", "text"])
    context = read_row_context(reader.manifest)
    nats, sizes = [], []
    for r, text in enumerate(data["text"]):
        n, boundary = int(data["length"][r]), context[r][0]
        spans = data["offsets"][r, :n].numpy()
        scored = [t for t in range(1, n) if spans[t, 1] > 0 and spans[t, 0] >= boundary]
        if not scored:
            continue
        nats.append(-float(data["target_logprob"][r, [t - 1 for t in scored]].double().sum()))
        sizes.append(len(text[spans[scored[0], 0] : spans[scored[-1], 1]].encode()))
    nats_a, sizes_a = np.asarray(nats), np.asarray(sizes)
    draws = np.random.default_rng(seed).integers(0, len(nats_a), size=(1000, len(nats_a)))
    boot = nats_a[draws].sum(1) / sizes_a[draws].sum(1) / math.log(2)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"bpb": float(nats_a.sum() / sizes_a.sum() / math.log(2)), "ci": [float(low), float(high)],
            "prompts": len(nats_a), "bytes": int(sizes_a.sum())}  # fmt: skip


def score_own_samples(name: str, run: Path, assets: dict, work: Path, plan: dict, smoke: bool) -> dict:
    held_prompts = work / "data" / "held-prompts.jsonl"
    if not held_prompts.is_file():
        write_jsonl([{"text": t} for t in pieces([r["text"] for r in read_jsonl(assets["held"])], plan)], held_prompts)
    samples = rollout(run, held_prompts, work / "held" / f"{name}.jsonl", plan, plan["eval_prompts"], seed=1234)
    store = cache(assets, samples, work / "held" / f"{name}-store", plan, smoke, "--packing", "none")
    return teacher_bpb_of_continuations(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for data, stores, runs and reports")
    parser.add_argument("--rounds", type=int, default=1, help="on-policy rounds (1 or 2)")
    parser.add_argument("--smoke", action="store_true", help="tiny generated models and sizes: checks the script runs")
    parser.add_argument("--lite", action="store_true", help="the real pair with the smaller plan LITE")
    args = parser.parse_args()
    started, plan = time.perf_counter(), SMOKE if args.smoke else LITE if args.lite else REAL
    assets = smoke_assets(args.work) if args.smoke else real_assets(args.work)
    base_docs, prompt_docs = split_documents(assets["train"], args.work, plan)
    base = cache(assets, base_docs, args.work / "stores" / "base", plan, args.smoke, "--max-rows", plan["base_rows"])
    held = cache(assets, assets["held"], args.work / "stores" / "held", plan, args.smoke)
    start = args.work / "runs" / "start"
    if not (start / "final" / "final.json").is_file():
        train(start, [base], held, assets["student"], plan["start_steps"], plan, resume=False)
    stores: dict[str, list[Path]] = {"on": [base], "off": [base]}
    runs = {arm: args.work / "runs" / arm for arm in stores}
    for arm, run in runs.items():
        if not run.exists():
            shutil.copytree(start, run, ignore=shutil.ignore_patterns(".lock"))
    for k in range(1, args.rounds + 1):
        # --- round k: the on arm's student writes, the off arm gets the same prompts' real text, same length
        on_file = rollout(runs["on"], prompt_docs, args.work / "rounds" / f"on-{k}.jsonl", plan, plan["prompts"], k)
        off_file = off_policy_twin(on_file, prompt_docs, args.work / "rounds" / f"off-{k}.jsonl")
        steps = plan["start_steps"] + k * plan["round_steps"]
        for arm, data in (("on", on_file), ("off", off_file)):
            stores[arm].append(cache(assets, data, args.work / "stores" / f"{arm}-{k}", plan, args.smoke))
            train(runs[arm], stores[arm], held, assets["student"], steps, plan, resume=True)
    report = args.work / "reports" / "held-out"
    distill("eval", start, runs["off"], runs["on"], "--cache", held, "--split", "all", "--baseline", "off",
            "--out", report)  # fmt: skip
    results = {
        "plan": plan, "rounds": args.rounds, "held_out": json.loads((report / "report.json").read_text()),
        "teacher_bpb_of_own_samples": {
            name: score_own_samples(name, run, assets, args.work, plan, args.smoke)
            for name, run in {"start": start, **runs}.items()
        },
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
