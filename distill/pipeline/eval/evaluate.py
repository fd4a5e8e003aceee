"""``distill eval``: tokenizer-independent quality of students against the teacher and a baseline.

    distill eval runs/kd runs/ce_only --cache cache/train --baseline ce_only --out reports/demo

For each student, on the held-out rows (those its run held out, or every row of --cache):
bits per byte of the row texts, held-out kd loss, top-1 agreement with the teacher at aligned
positions, expected calibration error; the teacher's bits per byte from the cached
``target_logprob``; with a baseline, the share of the baseline -> teacher gap each student
closed; 95% bootstrap intervals over documents for bits per byte and gap closed. Writes report.json,
report.md and PNG plots of the runs' metrics.

[eval-kd note] The kd column is one fixed measure for every model, whatever trained it: at one
temperature (``--temperature``, default 1; a run's training T does not count), and of the kind the
store allows: ``tail`` (the K+1-bin KL over the teacher's head tokens that have a student token of
identical bytes plus one tail bin, losses.kd.kd_tail_loss) on top-K stores, ``sampled`` (the unbiased
estimate of the full KL from the draws, sampled_kd.sampled_kd_loss) on sampled and hybrid stores; × T².
Top-1 agreement needs the teacher's top-1: a ``sampled`` store holds only draws, whose most probable
one misses it at many positions, so top-1 is not reported there (None).

The scores themselves (bits per byte on identical bytes, [scored-bytes note]; bootstrap intervals,
[bootstrap note]; calibration, gap closed) are in eval/scores.py.

[row-set note] All students are scored on the same rows. Run directories bring the rows their
run held out; when those differ but come from one store, the report uses their intersection
and says so (``row_selection``); runs held out on different stores are refused (score them
with ``--split all --cache STORE``).

[packed-eval note] A packed store's row holds several documents ([packing note] in packing.py).
Eval scores each document segment as a row of its own (``read_document_rows`` in packing.py): the teacher's
``target_logprob`` there already ignores the other segments, each student reads the segment alone
(the same as reading the packed row with a block-diagonal mask), and the segment's first token
is predicted only by a model with a prefix, as for any row. The bootstrap resamples documents ([bootstrap note]).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.cache.reader import CacheReader
from distill.cache.targets import TARGET_KINDS, kind_of, target_kind
from distill.config import ConfigError, CurriculumConfig
from distill.curriculum import terms_on
from distill.pipeline.eval.category_scores import format_category_table, score_categories, summarize_categories
from distill.pipeline.eval.scores import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    RowScores,
    bits_per_byte,
    bootstrap_bpb,
    build_student_spans,
    expected_calibration_error,
    gap_closed,
    percentile_interval,
    score_identical_bytes,
    score_row,
    sum_by_document,
    teacher_scores,
)
from distill.pipeline.losses.kd import kd_tail_loss
from distill.pipeline.losses.sampled_kd import sampled_kd_loss
from distill.pipeline.text.align import (
    align_batch,
    is_same_tokenizer,
    load_or_build_vocab_map,
    pad_vocab_map,
)
from distill.pipeline.text.packing import read_document_rows
from distill.pipeline.text.tokens import prefix_ids

_WHOLE_ROW = 2**62  # a "context" no row reaches: the student's tokens of the whole row
KD_MODES = {  # [eval-kd note]: the kd column's measure, by the store's kind of targets
    "tail": "the K+1-bin KL (the teacher's head tokens with a student token, one tail bin)",
    "sampled": "the unbiased estimate of the full KL from the stored draws (noisy: a mean of estimates, it can read "
    "below 0 where the student gives the drawn tokens more than the teacher)",
}


@dataclass
class StudentSource:
    """A student to evaluate: where its weights are and which rows it is scored on."""

    name: str
    model_dir: Path
    store: str
    rows: np.ndarray
    run_dir: Path | None
    training: dict[str, Any] = dataclasses.field(default_factory=dict)  # objective, terms, final step and why


def describe_training(saved: dict[str, Any], final_dir: Path) -> dict[str, Any]:
    """How a run's student was trained, for the report: its objective preset (runs from before the presets:
    None), the terms on, and which step final/ holds and why (final/final.json, when the run wrote one)."""
    curriculum = CurriculumConfig(**saved["train"]["curriculum"])
    final = json.loads((final_dir / "final.json").read_text()) if (final_dir / "final.json").exists() else {}
    return {
        "objective": saved["train"].get("objective"),
        "trained_temperature": saved["train"]["temperature"],
        "trained_targets": target_kind(saved["cache_manifest"]["layout"]) if "cache_manifest" in saved else None,
        "terms": terms_on(curriculum),
        "final_step": final.get("step"),
        "final_reason": final.get("reason"),
    }


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
            if cache is not None and _store_key(cache) != _store_key(store):
                raise ValueError(
                    f"--cache {cache}: {path} is scored on the rows it held out of {store}; add --split all to "
                    f"score it on every row of {cache}"
                )
        training = describe_training(saved, path / "final")
        return StudentSource(path.name, path / "final", store, rows, path, training)
    if cache is None:
        raise ValueError(f"{path}: not a run directory; pass --cache STORE to score a plain model on its rows")
    return StudentSource(path.name, path, cache, CacheReader(cache).row_ids, None)


def warn_other_targets(sources: list[StudentSource], kind: str) -> None:
    """One line per run trained on another kind of teacher targets than the store it is scored on holds."""
    for source in sources:
        trained = source.training.get("trained_targets")
        if trained is not None and trained != kind:
            print(
                f"warning: {source.name} was trained on {trained} targets and is scored on a store of {kind} targets: "
                "its kd column measures another target than it trained on (bits per byte are unaffected)",
                file=sys.stderr,
                flush=True,
            )


def _json_interval(interval: tuple[float, float]) -> list[float] | None:
    return None if any(math.isnan(x) for x in interval) else [interval[0], interval[1]]


@torch.no_grad()
def evaluate_student(
    source: StudentSource, vocab_map_dir: Path, temperature: float = 1.0, batch_size: int = 8
) -> tuple[dict[str, Any], RowScores]:
    """kd at ``temperature``, top-1 agreement and ECE of one student on its rows (fp32, no autocast), and its row
    scores for bpb ([eval-kd note]: top-1 is None on a ``sampled`` store).

    vocab_map_dir: where the teacher -> student vocabulary map is kept (never a plain model folder).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reader = CacheReader(source.store)
    model = AutoModelForCausalLM.from_pretrained(source.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.model_dir)
    prefix = prefix_ids(tokenizer)
    teacher_tokenizer = reader.load_tokenizer()
    same = is_same_tokenizer(teacher_tokenizer, tokenizer)
    vocab_map = None
    if not same:
        built = load_or_build_vocab_map(teacher_tokenizer, tokenizer, vocab_map_dir)
        vocab_map = torch.from_numpy(pad_vocab_map(built, reader.manifest["teacher"]["vocab_size"]))
    t_index = reader.temperature_index(temperature)
    has_top1 = kind_of(reader.layout).head  # [eval-kd note]
    max_length = int(getattr(model.config, "max_position_embeddings", 2048))
    kd_sum, kd_count, agree, compared, unmapped, aligned = 0.0, 0, 0, 0, 0, 0
    confidences, corrects = [], []
    scores = RowScores([], [])
    fields = ["input_ids", "length", "offsets", "text", "topk_ids", "topk_logits", "target_multiplier", "lse"]
    for start in range(0, len(source.rows), batch_size):
        data = read_document_rows(reader, source.rows[start : start + batch_size], fields)
        row_args = (data["text"], data["offsets"].numpy(), data["length"].numpy(), tokenizer)
        row_kwargs = dict(teacher_input_ids=data["input_ids"].numpy(), same_tokenizer=same)
        batch = align_batch(*row_args, max_length, **row_kwargs)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()  # (B, Ls, V)
        logp = torch.log_softmax(logits, dim=-1)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        # a row that fills the context may have been cut: whether its last kept token ends cleanly
        # depends on the first dropped one, so the boundaries come from the whole row's tokens
        whole = align_batch(*row_args, _WHOLE_ROW, **row_kwargs) if max(lengths) >= max_length else batch
        for b, n in enumerate(lengths):
            ids = batch.input_ids[b, :n]
            whole_n = int(whole.attention_mask[b].sum())
            spans = build_student_spans(whole.input_ids[b, :whole_n].numpy(), whole.student_offsets[b], prefix)
            token_logp = logp[b, : max(n - 1, 0)].gather(1, ids[1:, None])[:, 0]  # (n - 1,): q predicts q + 1
            ends, cum = score_row(spans, n, -token_logp.double().numpy())
            scores.ends.append(ends)
            scores.cum_nll.append(cum)
            if n >= 2:
                conf, pred = logp[b, : n - 1].exp().max(dim=-1)
                confidences.append(conf.numpy())
                corrects.append((pred == ids[1:]).numpy())
        bi, tp, sp = batch.batch_idx, batch.teacher_pos, batch.student_pos
        if len(bi) == 0:
            continue
        student_logits = logits[bi, sp]
        teacher_ids = data["topk_ids"][bi, tp]
        if vocab_map is not None:  # -1 (an unused slot of compact targets) stays -1
            mapped = torch.where(teacher_ids >= 0, vocab_map[teacher_ids.clamp(min=0)], -1)
        else:
            mapped = teacher_ids
        kd_args = (student_logits, mapped, data["topk_logits"][bi, tp])
        if data["target_multiplier"] is not None:  # sampled targets: the unbiased estimate of the full KL
            kd = sampled_kd_loss(*kd_args, data["target_multiplier"][bi, tp], data["lse"][bi, tp, t_index], temperature)
        else:
            kd = kd_tail_loss(*kd_args, data["lse"][bi, tp, t_index], temperature)
        kd_sum += float(kd) * len(bi)
        kd_count += len(bi)
        aligned += len(bi)
        # a teacher top-1 with no student token cannot be agreed with: counted apart, not as a miss
        has_token = mapped[:, 0] >= 0
        unmapped += int((~has_token).sum())
        compared += int(has_token.sum())
        agree += int((student_logits.argmax(dim=-1) == mapped[:, 0])[has_token].sum())
    metrics = {
        "kd_loss": kd_sum / kd_count if kd_count else float("nan"),
        "top1_agreement": (agree / compared if compared else float("nan")) if has_top1 else None,
        "top1_positions": compared if has_top1 else None,
        "top1_unmapped_positions": unmapped if has_top1 else None,
        "ece": expected_calibration_error(
            np.concatenate(confidences or [np.zeros(0)]), np.concatenate(corrects or [np.zeros(0)]).astype(float)
        ),
        "aligned_positions": aligned,
        "rows": len(source.rows),
        "store": source.store,
        "same_tokenizer": same,
    }
    return metrics, scores


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl; a torn last line (a run killed mid-write) is skipped, any other
    line that is not a JSON object stops with the file and line named."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            if n == last:
                continue
            raise ConfigError(
                f"{path}:{n + 1}: not a JSON record ({exc.msg}) — the file is damaged; fix or delete that line"
            ) from None
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{n + 1}: a {type(record).__name__}, not a JSON object — fix or delete that line")
        records.append(record)
    return records


LINE_STYLES = ("-", "--", "-.", ":")


def line_style(index: int) -> dict[str, Any]:
    """Colour and dash of a plot's ``index``-th line: 20 colours (tab20) and 4 dashes, so up to 20 lines differ in
    colour and two lines with equal values (kd and lm_unaligned follow one curriculum weight) both stay visible."""
    import matplotlib

    return {"color": matplotlib.colormaps["tab20"](index % 20), "linestyle": LINE_STYLES[index % len(LINE_STYLES)]}


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
            for index, key in enumerate(keys):
                ax.plot(
                    [r["step"] for r in train if key in r],
                    [r[key] for r in train if key in r],
                    label=key[len(prefix) :],
                    **line_style(index),
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


def _format_share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _format_interval(interval: list[float] | None, scale: float = 1.0, digits: int = 4) -> str:
    return "" if interval is None else f" [{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"


def format_objective(student: dict[str, Any]) -> str:
    """``ce (lm), step 40: best eval loss``; empty for a plain model."""
    if "terms" not in student:
        return ""
    text = f"{student['objective'] or 'custom'} ({' + '.join(student['terms'])})"
    return text + (f", step {student['final_step']}: {student['final_reason']}" if student["final_step"] else "")


def format_report(report: dict[str, Any]) -> str:
    """report.md: the table a person reads first."""
    boot, kd = report["bootstrap"], report["kd"]
    lines = [
        "# distill eval",
        "",
        f"Teacher bits per byte: **{report['teacher_bpb']:.4f}**{_format_interval(report['teacher_bpb_ci'])} "
        "(from the cache's target_logprob)",
        "",
        f"| student | objective | bits/byte [{100 * boot['confidence']:.0f}% CI] | gap closed [CI] "
        f"| kd ({kd['mode']}, T={kd['temperature']:g}) | top-1 agreement | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in report["students"].items():
        if name == report.get("baseline"):
            gap = "baseline"
        elif s["gap_closed"] is None or math.isnan(s["gap_closed"]):
            gap = "n/a"
        else:
            gap = f"{100 * s['gap_closed']:.1f}%{_format_interval(s['gap_closed_ci'], 100, 1)}"
        lines.append(
            f"| {name} | {format_objective(s)} | {s['bpb']:.4f}{_format_interval(s['bpb_ci'])} | {gap} | "
            f"{s['kd_loss']:.4f} | {_format_share(s['top1_agreement'])} | {s['ece']:.4f} |"
        )
    if report.get("category_bpb"):
        lines += format_category_table(report["category_bpb"])
    lines += [
        "",
        f"Every model is scored on the same {report['scored_bytes']:,} bytes of {report['rows']} rows of "
        f"{report['store']}: per row, from the first to the last character boundary that all of them predict "
        f"({report['rows_unscored']} rows share none).",
    ]
    if report["row_selection"] == "intersection":
        held = ", ".join(f"{name} {s['rows_held_out']}" for name, s in report["students"].items())
        lines.append(f"The students held out different rows ({held}): scored on their intersection.")
    whole = ", each with the other documents of its packed rows (the store names a row's first only)"
    whole = whole if boot["packed_rows_kept_whole"] else ""
    lines += [
        f"Intervals: percentile, {boot['resamples']:,} bootstrap resamples (seed {boot['seed']}) of the "
        f"{boot['documents']:,} documents{whole}.",
        "Gap closed = (bpb_baseline - bpb_student) / (bpb_baseline - bpb_teacher).",
        f"kd: {KD_MODES[kd['mode']]} × T², at T = {kd['temperature']:g} for every model, whatever kd mode and "
        "temperature trained it.",
    ]
    if not TARGET_KINDS[report["targets"]].head:
        lines.append(
            f"Top-1 agreement: n/a on a {report['targets']} store (its draws need not hold the teacher's top-1)."
        )
    else:
        lines.append(
            "Top-1 agreement leaves out aligned positions whose teacher top-1 has no student token: "
            + ", ".join(f"{name} {s['top1_unmapped_positions']:,}" for name, s in report["students"].items())
            + "."
        )
    lines.append("Plots: " + ", ".join(f"[{p}]({p})" for p in report["plots"]))
    return "\n".join(lines) + "\n"


def _store_key(url: str) -> str:
    return url if "://" in url else str(Path(url).resolve())


def select_rows(sources: list[StudentSource]) -> tuple[str, np.ndarray, str]:
    """[row-set note] The one store and the rows every student is scored on, and how: same or intersection."""
    stores = {_store_key(s.store) for s in sources}
    if len(stores) > 1:
        named = ", ".join(f"{s.name}: {s.store}" for s in sources)
        raise ValueError(
            f"the students were held out on different stores ({named}); score them on one store with "
            "--split all --cache STORE"
        )
    rows = reduce(np.intersect1d, [s.rows for s in sources])
    same = all(len(s.rows) == len(rows) for s in sources)
    if len(rows) == 0:
        raise ValueError("the students share no held-out row; score them on one store with --split all --cache STORE")
    return sources[0].store, (sources[0].rows if same else rows), "same" if same else "intersection"


def run_eval(
    paths: list[Path],
    cache: str | None,
    split: str,
    baseline: str | None,
    out: Path,
    verify_cache: str = "auto",
    report_to: list[str] | None = None,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Evaluate every student, write report.json / report.md / PNGs in ``out``; return the report.

    verify_cache: how the store is checked first, as train does (auto, deep, quick or off).
    report_to: trackers that also get the report table and plots (see tracking.py).
    temperature: the one T of every model's kd ([eval-kd note]); bits per byte is at T = 1 whatever it is.
    """
    from distill.cache.verify import check_store
    from distill.pipeline.tracking import log_eval_report, require_trackers

    require_trackers(report_to or [])

    sources = [resolve_student(p, cache, split) for p in paths]
    names = [s.name for s in sources]
    if baseline is not None and baseline not in names:
        raise ValueError(f"--baseline {baseline}: not among the students {names}")
    runs = {s.name: read_metrics(s.run_dir) for s in sources if s.run_dir is not None}  # before the long part
    store, rows, selection = select_rows(sources)
    warn_other_targets(sources, CacheReader(store).target_kind)
    check_store(store, verify_cache)
    out.mkdir(parents=True, exist_ok=True)
    reader = CacheReader(store)
    reader.temperature_index(temperature)  # stored, or a clear error before any student is run
    texts, t_scores, documents = teacher_scores(reader, rows)
    students, scores = {}, [t_scores]
    for s in sources:
        vocab_dir = (s.run_dir / "vocab_map") if s.run_dir is not None else (out / "vocab_map")
        metrics, student_scores = evaluate_student(dataclasses.replace(s, rows=rows), vocab_dir, temperature)
        students[s.name] = {**s.training, **metrics, "rows_held_out": len(s.rows)}
        scores.append(student_scores)
    nll, nbytes = score_identical_bytes(texts, scores)
    category_nll, category_bytes = score_categories(texts, scores)
    by_document = (sum_by_document(category_nll, documents, 1), sum_by_document(category_bytes, documents, 0))
    categories = summarize_categories(*by_document, ["teacher", *students])  # [bootstrap note]: documents resampled
    total_bytes = int(nbytes.sum())
    bpb = [bits_per_byte(float(nll[m].sum()), total_bytes) for m in range(len(scores))]
    samples = bootstrap_bpb(sum_by_document(nll, documents, 1), sum_by_document(nbytes, documents, 0))
    for m, (name, result) in enumerate(students.items(), start=1):
        result.update(bpb=bpb[m], bpb_ci=_json_interval(percentile_interval(samples[:, m])))
        result.update(nll_nats=float(nll[m].sum()), bytes=total_bytes, gap_closed=None, gap_closed_ci=None)
        if baseline and name != baseline:
            b = 1 + names.index(baseline)
            closed = gap_closed(bpb[m], bpb[b], bpb[0])
            result["gap_closed"] = None if math.isnan(closed) else closed  # null: the teacher is not better
            with np.errstate(invalid="ignore", divide="ignore"):
                gaps = (samples[:, b] - samples[:, m]) / (samples[:, b] - samples[:, 0])
            gaps[samples[:, b] <= samples[:, 0]] = np.nan  # gap_closed is undefined where the teacher is not better
            result["gap_closed_ci"] = _json_interval(percentile_interval(gaps))
    plots = plot_runs(runs, out) if runs else []
    kd_mode = "sampled" if kind_of(reader.layout).sampled else "tail"  # [eval-kd note]
    report = {
        "teacher_bpb": bpb[0],
        "teacher_bpb_ci": _json_interval(percentile_interval(samples[:, 0])),
        "teacher_nll_nats": float(nll[0].sum()),
        "teacher_bytes": total_bytes,
        "scored_bytes": total_bytes,
        "rows": len(rows),
        "rows_unscored": int((nbytes == 0).sum()),
        "store": store,
        "row_selection": selection,
        "bootstrap": {  # [bootstrap note]
            "resamples": BOOTSTRAP_RESAMPLES,
            "seed": BOOTSTRAP_SEED,
            "confidence": CONFIDENCE,
            "unit": "documents",
            "documents": int(np.unique(documents).size),
            "packed_rows_kept_whole": reader.packed,
        },
        "targets": reader.target_kind,
        "kd": {"mode": kd_mode, "temperature": temperature},
        "baseline": baseline,
        "split": split,
        "students": students,
        "category_bpb": categories,
        "plots": plots,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(format_report(report))
    log_eval_report(report_to or [], out, report)
    return report
