"""Stage 2 through the real CLI on tiny models: logging, curriculum, dtypes, errors, cache vs live teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill.cli import app
from distill.config import TrainConfig
from distill.config_loading import load_config
from distill.curriculum import weights_at
from distill.pipeline.train import step_view as step_view_mod
from distill.pipeline.train import terms as terms_mod
from distill.pipeline.train.loop import evaluate
from distill.pipeline.train.setup import setup
from tests.helpers import cache_args, config_from_args, read_metrics, run_train, train_args

TERMS = (
    "kd",
    "lm",
    "feature",
    "router_balance",
    "router_importance",
    "router_attention",
    "attention",
    "layerwise",
    "contrastive",
)


def make_config(args: list[str]) -> TrainConfig:
    """The TrainConfig the CLI would build from ``args`` (for in-process setup/fit)."""
    return config_from_args(TrainConfig, args)


@pytest.fixture(scope="module")
def short_run(train_assets, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "short"
    result = run_train(train_args(train_assets, out), steps=6, log_every=1, eval_every=3)
    return out, result.stdout


def test_metrics_total_equals_sum_of_weighted_terms(short_run):
    out, _ = short_run
    records = [r for r in read_metrics(out) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        weighted = sum(v for k, v in r.items() if k.startswith("weighted/"))
        assert r["loss/total"] == pytest.approx(weighted, rel=1e-5)
        for term in TERMS:
            assert f"loss/{term}" in r and f"weight/{term}" in r and f"weighted/{term}" in r
            assert r[f"weighted/{term}"] == pytest.approx(r[f"loss/{term}"] * r[f"weight/{term}"], rel=1e-5, abs=1e-9)
        assert r["lr"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["aligned_share"] <= 1
        assert len(r["expert_usage"]) == 2  # cached layers 1, 2 (0 = embeddings is no expert)
        assert sum(r["expert_usage"]) == pytest.approx(1.0)
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval/loss"] > 0 for r in evals)


def test_run_dir_holds_config_and_a_loadable_student(short_run, train_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, stdout = short_run
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["student"] == str(train_assets["student"]) and saved["eval_rows"]
    assert saved["same_tokenizer"] is False and saved["cache_manifest"]["layout"]["top_k"] == 16
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok("The cat sees", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] == ids.shape[1] + 5
    assert "student saved in" in stdout


def test_terms_at_zero_weight_are_not_computed(train_assets, tmp_path, monkeypatch):
    cfg = make_config(
        train_args(
            train_assets,
            tmp_path / "run",
            **{
                "curriculum.kd_only_until": 0.1,
                "curriculum.feature_ramp": "[0.1,0.4]",
                "curriculum.attention_ramp": "[0.1,0.4]",
                "curriculum.layerwise_ramp": "[0.4,0.7]",
                "curriculum.contrastive_ramp": "[0.7,1.0]",
            },
        )
    )
    run = setup(cfg)
    calls: list[str] = []
    for name in (
        "routed_feature_loss",
        "attention_span_loss",
        "layerwise_loss",
        "contrastive_loss",
        "load_balance_loss",
        "importance_loss",
        "lm_and_kd_prefix_from_hidden",
    ):
        module = step_view_mod if name == "lm_and_kd_prefix_from_hidden" else terms_mod
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    batch = run.batches.prepare_batch(run.train_rows[:2])
    early = weights_at(5, 100, cfg.curriculum)
    assert all(early[t] == 0 for t in ("feature", "attention", "layerwise", "contrastive"))
    _, logs = run.learner(batch, early)
    assert set(calls) == {"lm_and_kd_prefix_from_hidden"} and "loss/kd" in logs  # the default kd mode, fused
    assert "loss/feature" not in logs and logs["loss/total"] == pytest.approx(
        0.7 * logs["loss/kd"] + 0.3 * logs["loss/lm"] + 0.7 * logs["loss/lm_unaligned"], rel=1e-6
    )
    calls.clear()
    mid = weights_at(25, 100, cfg.curriculum)
    assert mid["feature"] == pytest.approx(0.05) and mid["attention"] == pytest.approx(0.05)
    run.learner(batch, mid)
    assert {"routed_feature_loss", "attention_span_loss", "load_balance_loss"} <= set(calls)
    assert "layerwise_loss" not in calls and "contrastive_loss" not in calls


def test_router_attention_is_not_computed_at_weight_zero(train_assets, tmp_path, monkeypatch):
    cfg = make_config(train_args(train_assets, tmp_path / "run"))
    run = setup(cfg)
    router = run.learner.aux["router"]
    calls: list[int] = []
    original = router._attention_alignment
    monkeypatch.setattr(router, "_attention_alignment", lambda *a: (calls.append(1), original(*a))[1])
    batch = run.batches.prepare_batch(run.train_rows[:2])
    weights = {**weights_at(100, 100, cfg.curriculum), "attention": 0.0}  # feature on, attention off
    _, logs = run.learner(batch, weights)
    assert calls == [] and "loss/router_attention" not in logs
    assert logs["loss/feature"] > 0 and len(logs["expert_usage"]) == 2
    _, logs = run.learner(batch, weights_at(100, 100, cfg.curriculum))
    assert calls == [1] and logs["loss/router_attention"] > 0


@pytest.mark.parametrize(("seq_len", "hidden"), [(32, 32), (32, 256), (512, 32), (512, 256)])
def test_every_term_is_order_one_at_initialization(tiny_assets, tmp_path, seq_len, hidden):
    from transformers import AutoTokenizer

    from distill.pipeline.demo import build_model, generate_corpus, student_config, teacher_config, write_jsonl

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    teacher = tmp_path / "teacher"
    build_model(teacher_config(len(tok), hidden=hidden, layers=2, experts=4), teacher, tok, seed=1)
    data = write_jsonl([" ".join(generate_corpus(40, seed=3))] * 2, tmp_path / "long.jsonl")
    store = tmp_path / "store"
    result = CliRunner().invoke(
        app,
        [
            "cache-teacher",
            *cache_args(
                {**tiny_assets, "teacher": teacher, "data": data},
                store,
                seq_len=seq_len,
                max_rows=2,
                batch_size=2,
                calibration_rows=2,
            ),
        ],
    )
    assert result.exit_code == 0, result.output
    student_tok = tmp_path / "stok"
    from distill.pipeline.demo import train_tokenizer

    s_tok = train_tokenizer(generate_corpus(80, seed=4), 300, student_tok)
    student = tmp_path / "student"
    build_model(student_config(len(s_tok), hidden=hidden, layers=3, max_position_embeddings=2048), student, s_tok)
    # an untrained teacher is near uniform: at T = 1 both sides' top-K are flat and kd is ~0; T = 4 (x T^2) is not
    run_args = train_args({"store": store, "student": student}, tmp_path / "run", eval_fraction=0, temperature=4.0)
    cfg = make_config(run_args)
    run = setup(cfg)
    batch = run.batches.prepare_batch(run.train_rows[:2])
    full = weights_at(100, 100, cfg.curriculum)
    _, logs = run.learner(batch, full)
    for term in ("kd", "lm", "feature", "router_balance", "router_attention", "attention", "layerwise", "contrastive"):
        assert 1e-3 <= logs[f"loss/{term}"] <= 20, (term, logs[f"loss/{term}"])
    assert 0 <= logs["loss/router_importance"] <= 20
    # [student-norm note] A student with outlier dimensions (a pretrained one's residual stream: SmolLM2 reads
    # rms 75, max 23,874): scale three dims of what block 1 writes by 1e3..1e4. Every later hidden state
    # carries them; the hidden-state terms must stay O(1) (the layerwise term read 1,730 on the real pair).
    scale = torch.ones(hidden)
    scale[:3] = torch.tensor([1e3, 3e3, 1e4])

    def add_outliers(module, args, output):
        return (output[0] * scale, *output[1:]) if isinstance(output, tuple) else output * scale

    handle = run.learner.student.model.layers[0].register_forward_hook(add_outliers)
    try:
        _, logs = run.learner(batch, full)
    finally:
        handle.remove()
    for term in ("feature", "layerwise", "contrastive"):
        assert 0.1 <= logs[f"loss/{term}"] <= 10, (term, logs[f"loss/{term}"])
    for term in ("kd", "lm", "attention", "router_balance"):
        assert 1e-3 <= logs[f"loss/{term}"] <= 20, (term, logs[f"loss/{term}"])
    assert 0 <= logs["loss/router_attention"] <= 10  # KL of two near-uniform distributions at init: ~0


def test_eval_runs_on_fp16_cache_with_fp32_student_without_autocast_and_training_runs_in_bf16(train_assets, tmp_path):
    cfg = make_config(train_args(train_assets, tmp_path / "fp32", precision="fp32"))
    run = setup(cfg)
    assert run.learner.autocast_dtype is None and next(run.learner.student.parameters()).dtype == torch.float32
    batch = run.eval_batches.prepare_batch(run.eval_rows[:2])
    assert batch.signal.topk_logits.dtype == torch.float16 and batch.signal.hidden[1].dtype == torch.float16
    result = evaluate(run)
    assert result["eval/loss"] > 0 and torch.isfinite(torch.tensor(result["eval/loss"]))
    out = tmp_path / "bf16"
    run_train(train_args(train_assets, out, precision="bf16"), steps=2, eval_every=2)
    records = read_metrics(out)
    assert records[-1]["split"] == "eval" and records[-1]["eval/loss"] > 0


def test_cache_trained_and_live_teacher_trained_students_agree(train_assets, tmp_path):
    curves = {}
    for mode in ("cache", "live"):
        extra = ["--live-teacher", str(train_assets["teacher"])] if mode == "live" else []
        out = tmp_path / mode
        run_train(
            train_args(train_assets, out, num_workers_prefetch=0),
            steps=4,
            log_every=1,
            eval_every=100,
            extra=tuple(extra),
        )
        curves[mode] = [r["loss/total"] for r in read_metrics(out) if r["split"] == "train"]
    assert len(curves["cache"]) == 4
    for a, b in zip(curves["cache"], curves["live"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_clear_errors_before_training(train_assets, tmp_path):
    runner = CliRunner()

    def error(args: list[str]) -> str:
        result = runner.invoke(app, ["train", *args, "--max-steps", "1"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1
        return lines[0]

    assert "temperature 3.0 is not stored" in error(train_args(train_assets, tmp_path / "a", temperature=3.0))
    assert "--student /nope" in error(train_args({**train_assets, "student": "/nope"}, tmp_path / "b"))
    no_attention = tmp_path / "no_attention"
    made = runner.invoke(
        app, ["cache-teacher", *cache_args(train_assets, no_attention, attention_layers="none", max_rows=16)]
    )
    assert made.exit_code == 0, made.output
    message = error(train_args({**train_assets, "store": no_attention}, tmp_path / "c"))
    assert "no attention maps" in message and "--attention-layers" in message
    no_proj = tmp_path / "no_vocab_proj"
    made = runner.invoke(app, ["cache-teacher", *cache_args(train_assets, no_proj, vocab_proj=None, max_rows=16)])
    assert made.exit_code == 0, made.output
    message = error(train_args({**train_assets, "store": no_proj}, tmp_path / "f", kd_mode="projector"))
    assert "['vocab_proj']" in message and "--vocab-proj" in message
    no_hidden = tmp_path / "no_hidden"
    made = runner.invoke(app, ["cache-teacher", *cache_args(train_assets, no_hidden, hidden_layers="0", max_rows=16)])
    assert made.exit_code == 0, made.output
    message = error(train_args({**train_assets, "store": no_hidden}, tmp_path / "e", **{"curriculum.attention": 0}))
    assert "hidden states of blocks >= 1" in message and "--hidden-layers" in message
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(train_assets["store"], no_tokenizer)
    shutil.rmtree(no_tokenizer / "teacher_tokenizer")
    # (verification would refuse the store first, for its tokenizer hash; switch it off to reach this check)
    message = error(train_args({**train_assets, "store": no_tokenizer}, tmp_path / "d", verify_cache="off"))
    assert "no teacher tokenizer files" in message
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_identical_tokenizers_take_the_identity_fast_path(train_assets, tmp_path):
    cfg = make_config(train_args(train_assets, tmp_path / "same", student="student_same_tok"))
    run = setup(cfg)
    assert run.learner.facts.same_tokenizer and run.learner.facts.vocab_map is None
    batch = run.batches.prepare_batch(run.train_rows[:2])
    assert batch.aligned.aligned_share == 1.0
    assert torch.equal(batch.aligned.teacher_pos, batch.aligned.student_pos)


def test_reference_configs_load_and_validate():
    from distill.config import CacheConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    train = load_config(TrainConfig, root / "reference.yaml", {"cache": "c", "out": "o"})
    assert (train.batch_size, train.grad_accum, train.lr, train.router_lr) == (2, 16, 5e-5, 1e-4)
    assert (train.warmup, train.temperature, train.eval_every, train.patience) == (0.1, 1.0, 500, 20)
    assert train.early_stop_warmup == 1000 and train.curriculum.kd == 0.7
    assert train.curriculum.feature == 0.1 and train.curriculum.attention == 0.1
    cache = load_config(CacheConfig, root / "reference-cache.yaml", {})
    assert cache.top_k == 256 and cache.teacher == "huihui-ai/Huihui-MoE-1B-A0.6B"


@pytest.mark.parametrize("mode", ["projector", "uld", "prefix", "alm"])
def test_alternative_kd_modes_train_through_the_same_loop(train_assets, tmp_path, mode):
    out = tmp_path / mode
    extra = {"curriculum.alm": 0.5} if mode == "prefix" else {}  # prefix also carries an ALM term next to kd
    run_train(train_args(train_assets, out, kd_mode=mode, **extra), steps=2, log_every=1, eval_every=2)
    records = [r for r in read_metrics(out) if r["split"] == "train"]
    assert all(0 < r["loss/kd"] < 20 and r["weight/kd"] == pytest.approx(0.7) for r in records)
    if mode == "prefix":
        assert all(0 < r["loss/alm"] < 20 and r["weight/alm"] == pytest.approx(0.5) for r in records)
        assert list((out / "vocab_map").glob("prefix_map-v1-*.npz"))
    if mode == "projector":  # the projector is anchored on the next student token, logged as its own term
        assert all("loss/projector_anchor" in r for r in records)


def test_early_stopping_honours_patience_min_delta_and_warmup(train_assets, tmp_path):
    def stop_step(warmup: int) -> tuple[int, str]:
        out = tmp_path / f"warmup{warmup}"
        args = train_args(train_assets, out, patience=1, min_delta=1e9, early_stop_warmup=warmup)
        result = run_train(args, steps=20, eval_every=2)
        evals = [r["step"] for r in read_metrics(out) if r["split"] == "eval"]
        return evals[-1], result.stdout

    # with min_delta huge, only the first eval improves (on +inf); the next counted eval stops the run
    step, stdout = stop_step(0)
    assert step == 4 and "early stopping at step 4" in stdout
    step, _ = stop_step(9)  # evals before step 9 do not count
    assert step == 10


def test_train_refuses_a_store_with_a_flipped_byte(train_assets, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(train_assets["store"], store)
    chunk = sorted((store / "shards" / "00000" / "topk_logits" / "c").rglob("*"))
    chunk = [p for p in chunk if p.is_file()][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    result = CliRunner().invoke(
        app, ["train", *train_args({**train_assets, "store": store}, tmp_path / "run"), "--max-steps", "1"]
    )
    assert result.exit_code == 1  # a damaged store is a failure, not a usage error
    assert "not sound" in result.stderr and "shard 00000 chunk" in result.stderr


def test_train_warns_before_any_step_when_the_teacher_is_not_better(train_assets, tmp_path):
    # the teacher as the student: KD cannot pay, and train says so in one line before the first step
    out = tmp_path / "run"
    args = train_args(train_assets, out, student="teacher", objective="kd-only", preflight_rows=4)
    result = run_train(args, steps=1)
    report = json.loads((out / "preflight.json").read_text())
    assert report["verdict"] != "better" and report["rows"] == 4
    warning = [line for line in result.output.splitlines() if line.startswith("warning: on 4 rows")]
    assert len(warning) == 1 and "not" in warning[0] and "--objective ce" in warning[0]
    assert result.output.index(warning[0]) < result.output.index("step ")
    # a student the teacher is better than gets one plain line; 0 rows skips the check
    quiet = run_train(train_args(train_assets, tmp_path / "off", preflight_rows=0, objective="kd-only"), steps=1)
    assert "preflight:" not in quiet.output and not (tmp_path / "off" / "preflight.json").exists()


def test_prefix_kd_of_a_training_step_equals_kd_prefix_loss_on_the_aligned_logits(train_assets, tmp_path, monkeypatch):
    """The learner's fused prefix kd ([bin-sums note]) is kd_prefix_loss on the aligned positions' full logits."""
    import torch.nn.functional as F

    from distill.config import CurriculumConfig, TrainConfig
    from distill.curriculum import weights_at
    from distill.pipeline.losses.prefix_kd import kd_prefix_loss
    from distill.pipeline.train import learner as learner_module
    from distill.pipeline.train.setup import setup

    views = []

    class RecordedView(learner_module.StepView):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            views.append(self)

    monkeypatch.setattr(learner_module, "StepView", RecordedView)
    cfg = TrainConfig(
        cache=str(train_assets["store"]), student=str(train_assets["student"]), out=str(tmp_path / "run"),
        batch_size=2, grad_accum=1, max_steps=1, eval_fraction=0.0, num_workers_prefetch=0, device="cpu",
        curriculum=CurriculumConfig(disabled=("feature", "attention", "layerwise", "contrastive")),
    )  # fmt: skip
    assert cfg.kd_mode == "prefix"
    run = setup(cfg)
    _, logs = run.learner(run.batches.prepare_batch(run.train_rows[:2]), weights_at(0, 1, cfg.curriculum))
    (view,) = views
    assert view.prefix_fused
    bins, t_logits, lse, student_bin, t, size = view.prefix_inputs()
    logits = view.aligned_logits  # (N, Vs) the full logits, which the training step never made
    student_bin = F.pad(student_bin, (0, logits.shape[-1] - student_bin.shape[0]), value=-1)
    want = kd_prefix_loss(logits, bins, t_logits, lse, student_bin, t, size)
    assert (bins >= 0).any(), "no teacher token of the batch has a bin"
    assert float(want.detach()) > 0
    # the KL is a sum of O(0.1) terms that nearly cancel here (small heads): fp32 rounding of those terms
    assert logs["loss/kd"] == pytest.approx(float(want.detach()), abs=1e-6)
