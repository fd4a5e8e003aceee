"""``distill eval``: tokenizer-independent quality of students against the teacher and a baseline.

    distill eval runs/kd runs/ce_only --cache cache/train --baseline ce_only --out reports/demo

For each student, on the held-out rows (those its run held out, or every row of --cache):
bits per byte of the row texts, held-out kd loss, top-1 agreement with the teacher at aligned
positions, expected calibration error; the teacher's bits per byte from the cached
``target_logprob``; with a baseline, the share of the baseline -> teacher gap each student
closed. Writes report.json, report.md and PNG plots of the runs' metrics.

[bpb note] Bits per byte = total NLL in nats / (ln 2 x UTF-8 bytes of the scored text). A
row's first token has no context, so each model scores its tokens after the first one, and
the bytes counted are exactly those of the text those tokens cover: ``text[end of first
token:]`` (its own first token for each model, so two tokenizers score the same text up to
the first token of each row).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader
from distill.pipeline.align import align_batch, is_same_tokenizer, load_or_build_vocab_map, pad_vocab_map
from distill.pipeline.losses import kd_tail_loss

ECE_BINS = 15


@dataclass
class StudentSource:
    """A student to evaluate: where its weights are and which rows it is scored on."""

    name: str
    model_dir: Path
    store: str
    rows: np.ndarray
    temperature: float
    run_dir: Path | None


def resolve_student(path: Path, cache: str | None, split: str) -> StudentSource:
    """A run directory (uses final/ and the rows the run held out) or a plain HF model directory."""
    config_file = path / "config.json"
    if (path / "final").is_dir() and config_file.exists():
        saved = json.loads(config_file.read_text())
        if split == "all":  # every row of --cache (default: the store the run held its rows out of)
            store = cache or saved["eval_source"]
            rows = CacheReader(store).row_ids
        else:  # exactly the rows the run held out
            store, rows = saved["eval_source"], np.asarray(saved["eval_rows"], dtype=np.int64)
        return StudentSource(path.name, path / "final", store, rows, saved["train"]["temperature"], path)
    if cache is None:
        raise ValueError(f"{path}: not a run directory; pass --cache STORE to score a plain model on its rows")
    return StudentSource(path.name, path, cache, CacheReader(cache).row_ids, 4.0, None)


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """[bpb note] total NLL in nats / (ln 2 x bytes)."""
    return nll_nats / (math.log(2) * num_bytes) if num_bytes else float("nan")


def scored_bytes(text: str, first_token_end: int) -> int:
    """UTF-8 bytes of the text scored after a row's first token."""
    return len(text[first_token_end:].encode("utf-8"))


def teacher_nll(reader: CacheReader, rows: np.ndarray, batch_size: int = 64) -> tuple[float, int]:
    """Teacher NLL (nats) of every token after each row's first, and the bytes those tokens cover."""
    nll, nbytes = 0.0, 0
    for start in range(0, len(rows), batch_size):
        data = reader.read_rows(rows[start : start + batch_size], ["target_logprob", "length", "offsets", "text"])
        for i, text in enumerate(data["text"]):
            n = int(data["length"][i])
            if n < 2:
                continue
            nll -= float(data["target_logprob"][i, : n - 1].double().sum())
            nbytes += scored_bytes(text, int(data["offsets"][i, 0, 1]))
    return nll, nbytes


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_bins |accuracy - mean confidence| weighted by the share of predictions in the bin."""
    if len(confidence) == 0:
        return float("nan")
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


@torch.no_grad()
def evaluate_student(source: StudentSource, batch_size: int = 8) -> dict[str, Any]:
    """bpb, held-out kd, top-1 agreement and ECE of one student on its held-out rows (fp32, no autocast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.pipeline.train import load_cache_tokenizer

    reader = CacheReader(source.store)
    model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.model_dir)
    teacher_tokenizer = load_cache_tokenizer(reader)
    same = is_same_tokenizer(teacher_tokenizer, tokenizer)
    vocab_map = None
    if not same:
        built = load_or_build_vocab_map(
            teacher_tokenizer, tokenizer, (source.run_dir or source.model_dir) / "vocab_map"
        )
        vocab_map = torch.from_numpy(pad_vocab_map(built, reader.manifest["teacher"]["vocab_size"]))
    t_index = reader.temperature_index(source.temperature)
    max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    nll, nbytes, kd_sum, kd_count, agree, aligned = 0.0, 0, 0.0, 0, 0, 0
    confidences, corrects = [], []
    fields = ["input_ids", "length", "offsets", "text", "topk_ids", "topk_logits", "lse"]
    for start in range(0, len(source.rows), batch_size):
        data = reader.read_rows(source.rows[start : start + batch_size], fields)
        batch = align_batch(
            data["text"],
            data["offsets"].numpy(),
            data["length"].numpy(),
            tokenizer,
            max_length,
            teacher_input_ids=data["input_ids"].numpy(),
            same_tokenizer=same,
        )
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # (B, Ls, V)
        logp = torch.log_softmax(logits, dim=-1)
        for b, offsets in enumerate(batch.student_offsets):
            n = len(offsets)
            if n < 2:
                continue
            ids = batch.input_ids[b, 1:n]
            token_logp = logp[b, : n - 1].gather(1, ids[:, None])[:, 0]
            nll -= float(token_logp.double().sum())
            nbytes += scored_bytes(data["text"][b], int(offsets[0][1]))
            probs = logp[b, : n - 1].exp()
            conf, pred = probs.max(dim=-1)
            confidences.append(conf.numpy())
            corrects.append((pred == ids).numpy())
        bi, tp, sp = batch.batch_idx, batch.teacher_pos, batch.student_pos
        if len(bi) == 0:
            continue
        student_logits = logits[bi, sp]
        teacher_ids = data["topk_ids"][bi, tp]
        mapped = vocab_map[teacher_ids] if vocab_map is not None else teacher_ids
        kd = kd_tail_loss(
            student_logits, mapped, data["topk_logits"][bi, tp], data["lse"][bi, tp, t_index], source.temperature
        )
        kd_sum += float(kd) * len(bi)
        kd_count += len(bi)
        agree += int((student_logits.argmax(dim=-1) == mapped[:, 0]).sum())
        aligned += len(bi)
    return {
        "bpb": bits_per_byte(nll, nbytes),
        "nll_nats": nll,
        "bytes": nbytes,
        "kd_loss": kd_sum / kd_count if kd_count else float("nan"),
        "top1_agreement": agree / aligned if aligned else float("nan"),
        "ece": expected_calibration_error(np.concatenate(confidences), np.concatenate(corrects).astype(float)),
        "aligned_positions": aligned,
        "rows": len(source.rows),
        "store": source.store,
        "same_tokenizer": same,
    }


def gap_closed(student_bpb: float, baseline_bpb: float, teacher_bpb: float) -> float:
    """(baseline - student) / (baseline - teacher): 1 = as good as the teacher, 0 = no better than the baseline."""
    gap = baseline_bpb - teacher_bpb
    return (baseline_bpb - student_bpb) / gap if gap > 0 else float("nan")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_runs(runs: dict[str, list[dict[str, Any]]], out: Path) -> list[str]:
    """loss_terms.png, curriculum.png, eval.png from the runs' metrics records."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for kind, prefix, title, ylabel in (
        ("loss_terms", "loss/", "Raw loss terms (train)", "loss"),
        ("curriculum", "weight/", "Curriculum weights", "weight"),
    ):
        fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(6 * max(1, len(runs)), 4), squeeze=False)
        for ax, (name, records) in zip(axes[0], runs.items()):
            train = [r for r in records if r.get("split") == "train"]
            keys = sorted({k for r in train for k in r if k.startswith(prefix)})
            for key in keys:
                ax.plot(
                    [r["step"] for r in train if key in r],
                    [r[key] for r in train if key in r],
                    label=key[len(prefix) :],
                )
            ax.set(title=f"{title}: {name}", xlabel="optimizer step", ylabel=ylabel)
            if kind == "loss_terms":
                ax.set_yscale("log")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png", dpi=100)
        plt.close(fig)
        made.append(f"{kind}.png")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, records in runs.items():
        evals = [r for r in records if r.get("split") == "eval"]
        for ax, key in zip(axes, ("eval/kd", "eval/lm")):
            ax.plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], marker="o", label=name)
    axes[0].set(title="Held-out kd loss (runs with kd)", xlabel="optimizer step", ylabel="kd (K+1 bins) x T^2")
    axes[1].set(title="Held-out student cross-entropy", xlabel="optimizer step", ylabel="nats / student token")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=100)
    plt.close(fig)
    made.append("eval.png")
    return made


def format_report(report: dict[str, Any]) -> str:
    """report.md: the table a person reads first."""
    lines = [
        "# distill eval",
        "",
        f"Teacher bits per byte: **{report['teacher_bpb']:.4f}** (from the cache's target_logprob, "
        f"{report['teacher_bytes']:,} bytes)",
        "",
        "| student | bits/byte | gap closed | kd loss | top-1 agreement | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in report["students"].items():
        gap = (
            "baseline"
            if name == report.get("baseline")
            else ("n/a" if s["gap_closed"] is None or math.isnan(s["gap_closed"]) else f"{100 * s['gap_closed']:.1f}%")
        )
        lines.append(
            f"| {name} | {s['bpb']:.4f} | {gap} | {s['kd_loss']:.4f} | {100 * s['top1_agreement']:.1f}% | "
            f"{s['ece']:.4f} |"
        )
    lines += [
        "",
        "Gap closed = (bpb_baseline - bpb_student) / (bpb_baseline - bpb_teacher).",
        "Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"]),
    ]
    return "\n".join(lines) + "\n"


def run_eval(paths: list[Path], cache: str | None, split: str, baseline: str | None, out: Path) -> dict[str, Any]:
    """Evaluate every student, write report.json / report.md / PNGs in ``out``; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    sources = [resolve_student(p, cache, split) for p in paths]
    names = [s.name for s in sources]
    if baseline is not None and baseline not in names:
        raise ValueError(f"--baseline {baseline}: not among the students {names}")
    first = sources[0]
    t_nll, t_bytes = teacher_nll(CacheReader(first.store), first.rows)
    teacher_bpb = bits_per_byte(t_nll, t_bytes)
    students = {s.name: evaluate_student(s) for s in sources}
    for name, result in students.items():
        result["gap_closed"] = (
            gap_closed(result["bpb"], students[baseline]["bpb"], teacher_bpb) if baseline and name != baseline else None
        )
    runs = {s.name: read_metrics(s.run_dir) for s in sources if s.run_dir is not None}
    plots = plot_runs(runs, out) if runs else []
    report = {
        "teacher_bpb": teacher_bpb,
        "teacher_bytes": t_bytes,
        "baseline": baseline,
        "split": split,
        "students": students,
        "plots": plots,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    return report
