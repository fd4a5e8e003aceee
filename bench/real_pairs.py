"""What distillation buys on a real pair: the runs behind docs/real-pairs.md, through the real CLI.

    python bench/real_pairs.py --work /tmp/real-pairs            # everything (about an hour on 2 free cores)
    python bench/real_pairs.py --work /tmp/real-pairs --only scratch

Teacher Gemma 3 270M, caching CPython's pydoc topics (tests/real/assets.py fetches and converts the
GGUF checkpoints once). Two students, each trained on the same cached rows for the same steps with
and without the teacher:
- ``scratch``: a random-init Llama (hidden 256, 4 layers, 4/2 heads, MLP 768, tied embeddings) with
  SmolLM2's tokenizer: KD with every term (kd_mode tail, as measured) against CE-only, 400 steps;
- ``pretrained``: SmolLM2-135M-Instruct as it ships, CE fine-tuning and KD fine-tuning;
- ``kd-modes``: the scratch student (one init per seed) on stores made with today's defaults, CE-only
  against ``--objective kd-only`` at ``kd_mode`` tail and prefix, 200 steps, seeds 0-2; each seed's runs are
  scored together (``--baseline`` CE, then ``--baseline`` tail: paired intervals over documents);
- ``default-terms``: the same scratch students and plan, the default objective (every curriculum term)
  against the kd-only prefix run and CE-only of ``kd-modes`` (reused), seeds 0-2;
- ``scratch-long``: the scratch students, CE-only against the defaults, 400 steps of 2 rows with an eval
  every 100 steps, seeds 0-2;
- ``cut-objectives``: on the cut SmolLM2 below, ``--objective kd-only`` against the defaults (the
  ``pretrained-cut`` KD runs, reused), seeds 0-2: whether a fine-tuning preset without the representation
  terms would win;
- ``pretrained-cut``: SmolLM2-135M-Instruct with only some of its 30 blocks kept (``CUT_KEEP`` in
  tests/real/assets.py, the way pruned students are made), a pretrained student the teacher is clearly better
  than; CE fine-tuning against
  KD fine-tuning at the defaults (``CUT_PLAN``: a fine-tuning learning rate), seeds 0-2, on default stores.
``distill eval`` scores each group on the held-out store (identical bytes, bootstrap intervals over
documents). The teacher's bits per byte without its BOS is measured here directly (same tokens). Prints each
command as it runs, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEQ_LEN = 128
TRAIN_ROWS = 192
CE_ONLY = "objective=ce"
# the store layout these figures were measured on: one document piece per row, the fixed top-256 (fp16)
STORE_SETTINGS = ["--packing", "none", "--targets", "topk-fp16", "--top-k", "256"]
SCRATCH = {"steps": 400, "batch_size": 4, "grad_accum": 2, "lr": 2e-3, "eval_every": 50}
PRETRAINED = {"steps": 20, "batch_size": 2, "grad_accum": 2, "lr": 5e-5, "eval_every": 20}
KD_MODES_PLAN = {"steps": 200, "batch_size": 2, "grad_accum": 1, "lr": 2e-3, "eval_every": 200}
KD_MODES_SEEDS = (0, 1, 2)
LONG_PLAN = {"steps": 400, "batch_size": 2, "grad_accum": 1, "lr": 2e-3, "eval_every": 100}
CUT_PLAN = {"steps": 40, "batch_size": 2, "grad_accum": 1, "lr": 1e-4, "eval_every": 40}


def distill(*args: str) -> None:
    """Run ``distill ARGS`` as a user would; the output goes to the terminal."""
    command = [sys.executable, "-m", "distill.cli", *args]
    print("$ distill " + " ".join(args), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def build_stores(assets: dict[str, Path], work: Path, settings: list[str] = STORE_SETTINGS) -> tuple[Path, Path]:
    """Gemma's stores of the train rows and of the whole held-out split (default fields, 128-token rows)."""
    folder = work / ("stores" if settings else "stores-default")
    stores = (folder / "train", folder / "validation")
    teacher = str(assets["gemma3"])
    for data, store, rows in ((assets["train"], stores[0], TRAIN_ROWS), (assets["validation"], stores[1], None)):
        if (store / "zarr.json").is_file():
            continue
        extra = ["--max-rows", str(rows)] if rows else []
        distill("cache-teacher", "--teacher", teacher, "--dataset", str(data), "--out", str(store),
                "--seq-len", str(SEQ_LEN), *settings, *extra)  # fmt: skip
    return stores


def build_scratch_student(assets: dict[str, Path], out: Path, seed: int = 0) -> Path:
    """A random-init small Llama with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig

    from distill.pipeline.demo import build_model

    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(assets["smollm2"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    build_model(config, out, tokenizer, seed=seed)
    return out


def train(name: str, student: Path, stores: tuple[Path, Path], work: Path, plan: dict, *sets: str) -> Path:
    run = work / "runs" / name
    if (run / "final" / "config.json").is_file():
        return run
    distill("train", "--cache", str(stores[0]), "--eval-cache", str(stores[1]), "--student", str(student),
            "--out", str(run), "--max-steps", str(plan["steps"]), "--batch-size", str(plan["batch_size"]),
            "--eval-every", str(plan["eval_every"]), "--log-every", "25",
            "--set", f"grad_accum={plan['grad_accum']}", "--set", f"lr={plan['lr']}",
            *[arg for s in sets for arg in ("--set", s)])  # fmt: skip
    return run


def evaluate(name: str, models: list[Path], baseline: str, stores: tuple[Path, Path], work: Path) -> dict:
    out = work / "reports" / name
    distill("eval", *map(str, models), "--cache", str(stores[1]), "--split", "all", "--baseline", baseline,
            "--out", str(out))  # fmt: skip
    return json.loads((out / "report.json").read_text())


def teacher_bpb_without_bos(assets: dict[str, Path], store: Path) -> dict[str, float]:
    """The teacher's bits per byte on the held-out rows with and without its BOS, scoring the same tokens
    (text tokens 2..m of each row, which a model without a BOS can predict) on the same bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.cache.reader import CacheReader

    reader = CacheReader(str(store))
    data = reader.read_rows(reader.row_ids, ["input_ids", "offsets", "length", "target_logprob", "text"])
    model = AutoModelForCausalLM.from_pretrained(assets["gemma3"], dtype=torch.float32).eval()
    with_bos = without_bos = 0.0
    scored_bytes = 0
    for r, text in enumerate(data["text"]):
        n = int(data["length"][r])
        if n < 3:
            continue
        ids = data["input_ids"][r, :n].long()
        with_bos -= float(data["target_logprob"][r, 1 : n - 1].double().sum())
        with torch.no_grad():
            logits = model(input_ids=ids[None, 1:]).logits[0, :-1].double()
        without_bos -= float(torch.log_softmax(logits, -1).gather(1, ids[2:, None]).sum())
        first_end, last_end = int(data["offsets"][r, 1, 1]), int(data["offsets"][r, n - 1, 1])
        scored_bytes += len(text[first_end:last_end].encode())
    scale = 1 / (math.log(2) * scored_bytes)
    return {"with_bos": with_bos * scale, "without_bos": without_bos * scale, "bytes": scored_bytes}


def compare_pretrained_cut(assets: dict[str, Path], work: Path) -> dict[str, object]:
    """CE against KD fine-tuning of the cut SmolLM2, per seed, on stores made with the defaults."""
    stores = build_stores(assets, work, settings=[])
    from tests.real.assets import build_cut_smollm2

    student = build_cut_smollm2(assets["smollm2"], work / "students" / "smollm2-cut")
    per_seed: dict[str, object] = {}
    for seed in KD_MODES_SEEDS:
        ce = train(f"cut-{seed}-ce", student, stores, work, CUT_PLAN, f"seed={seed}", CE_ONLY)
        kd = train(f"cut-{seed}-kd", student, stores, work, CUT_PLAN, f"seed={seed}")
        per_seed[str(seed)] = evaluate(f"cut-{seed}", [student, ce, kd], ce.name, stores, work)
    return per_seed


def scratch_runs(
    assets: dict[str, Path], work: Path, stores: tuple[Path, Path], seed: int, variants: tuple, plan: dict, name: str
) -> dict[str, Path]:
    """Seed ``seed``'s scratch student trained with each of ``variants`` ((name, --set values), ...): the run
    ``W/runs/{name}-{seed}-{variant}`` of each (an existing one is reused)."""
    student = build_scratch_student(assets, work / "students" / f"scratch-{seed}", seed=seed)
    return {
        variant: train(f"{name}-{seed}-{variant}", student, stores, work, plan, f"seed={seed}", *sets)
        for variant, sets in variants
    }


KD_ONLY_PREFIX = ("prefix", ["objective=kd-only", "kd_mode=prefix"])


def compare_kd_modes(assets: dict[str, Path], work: Path) -> dict[str, object]:
    """CE-only, tail and prefix on the scratch student, per seed, on stores made with the defaults."""
    stores = build_stores(assets, work, settings=[])
    per_seed: dict[str, object] = {}
    for seed in KD_MODES_SEEDS:
        variants = (("ce", [CE_ONLY]), ("tail", ["objective=kd-only", "kd_mode=tail"]), KD_ONLY_PREFIX)
        runs = scratch_runs(assets, work, stores, seed, variants, KD_MODES_PLAN, "kd-modes")
        runs_list = list(runs.values())
        per_seed[str(seed)] = {
            "vs_ce": evaluate(f"kd-modes-{seed}", runs_list, runs["ce"].name, stores, work),
            "vs_tail": evaluate(f"kd-modes-{seed}-vs-tail", runs_list[1:], runs["tail"].name, stores, work),
        }
    return per_seed


def compare_default_terms(assets: dict[str, Path], work: Path) -> dict[str, object]:
    """The default objective (every curriculum term) against ``--objective kd-only`` and CE-only on the
    scratch student, per seed; reuses the kd-modes runs (same init, stores and plan)."""
    stores = build_stores(assets, work, settings=[])
    per_seed: dict[str, object] = {}
    for seed in KD_MODES_SEEDS:
        variants = (("ce", [CE_ONLY]), KD_ONLY_PREFIX, ("default", []))
        runs = scratch_runs(assets, work, stores, seed, variants, KD_MODES_PLAN, "kd-modes")
        runs_list = list(runs.values())
        per_seed[str(seed)] = {
            "vs_ce": evaluate(f"default-terms-{seed}", runs_list, runs["ce"].name, stores, work),
            "vs_kd_only": evaluate(
                f"default-terms-{seed}-vs-kd-only", runs_list[1:], runs["prefix"].name, stores, work
            ),
        }
    return per_seed


def compare_cut_objectives(assets: dict[str, Path], work: Path) -> dict[str, object]:
    """The candidate fine-tuning preset: ``--objective kd-only`` (kd + lm) against the defaults (every term) on
    the cut SmolLM2, same plan and seeds as ``pretrained-cut`` (whose runs are reused)."""
    stores = build_stores(assets, work, settings=[])
    from tests.real.assets import build_cut_smollm2

    student = build_cut_smollm2(assets["smollm2"], work / "students" / "smollm2-cut")
    per_seed: dict[str, object] = {}
    for seed in KD_MODES_SEEDS:
        full = train(f"cut-{seed}-kd", student, stores, work, CUT_PLAN, f"seed={seed}")
        kd_only = train(f"cut-{seed}-kd-only", student, stores, work, CUT_PLAN, f"seed={seed}", "objective=kd-only")
        per_seed[str(seed)] = evaluate(f"cut-{seed}-objectives", [full, kd_only], full.name, stores, work)
    return per_seed


def compare_scratch_long(assets: dict[str, Path], work: Path) -> dict[str, object]:
    """CE-only against the defaults on the scratch students for twice the kd-modes steps (about four passes over
    the 192 rows), with an eval every 100 steps: whether CE-only overfits within the run is in its eval curve."""
    stores = build_stores(assets, work, settings=[])
    per_seed: dict[str, object] = {}
    for seed in KD_MODES_SEEDS:
        runs = scratch_runs(assets, work, stores, seed, (("ce", [CE_ONLY]), ("default", [])), LONG_PLAN, "long")
        per_seed[str(seed)] = evaluate(f"long-{seed}", list(runs.values()), runs["ce"].name, stores, work)
    return per_seed


COMPARISONS = {
    "kd-modes": compare_kd_modes,
    "pretrained-cut": compare_pretrained_cut,
    "default-terms": compare_default_terms,
    "cut-objectives": compare_cut_objectives,
    "scratch-long": compare_scratch_long,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for stores, runs and reports (resumable)")
    parser.add_argument("--only", choices=["scratch", "pretrained", "teacher", *COMPARISONS], default=None)
    args = parser.parse_args()
    from tests.real.assets import fetch_all

    started = time.perf_counter()
    assets = fetch_all()
    results: dict[str, object] = {}
    if args.only in COMPARISONS:
        results[args.only] = COMPARISONS[args.only](assets, args.work)
        results["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(results))
        return
    stores = build_stores(assets, args.work)
    if args.only in (None, "teacher"):
        results["teacher"] = teacher_bpb_without_bos(assets, stores[1])
    if args.only in (None, "scratch"):
        scratch = build_scratch_student(assets, args.work / "students" / "scratch")
        runs = [
            train("scratch-ce", scratch, stores, args.work, SCRATCH, CE_ONLY),
            train("scratch-kd", scratch, stores, args.work, SCRATCH, "kd_mode=tail"),
        ]
        results["scratch"] = evaluate("scratch", runs, "scratch-ce", stores, args.work)
    if args.only in (None, "pretrained"):
        smollm2 = assets["smollm2"]
        runs = [
            smollm2,
            train("pretrained-ce", smollm2, stores, args.work, PRETRAINED, CE_ONLY),
            train("pretrained-kd", smollm2, stores, args.work, PRETRAINED, "kd_mode=tail"),
        ]
        results["pretrained"] = evaluate("pretrained", runs, "pretrained-ce", stores, args.work)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
