"""Hidden-state targets: stage 1's calibration (which rows, the share of values stage 2 clips) and stage 2's
one scale per layer ([target-clip note] and [target-scale note] in losses/hidden_targets.py). Goldens by hand on a tiny
Llama whose embedding holds one massive activation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.pipeline.losses.hidden_targets import TARGET_CLIP, hidden_target_scale, standardize_hidden
from distill.pipeline.teacher.cache_teacher import sample_calibration_rows
from distill.pipeline.teacher.calibration import calibrate_rows
from distill.pipeline.text.data import Row
from distill.pipeline.train.setup import say_hidden_clip_share

HIDDEN, ROWS, LENGTH, SPIKE = 16, 8, 32, 5  # SPIKE: a token id whose embedding holds the massive activation


def tiny_llama(spike: float):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[SPIKE, 0] = spike
    return model


def calibration_rows() -> list[Row]:
    """ROWS rows of LENGTH text tokens, token SPIKE exactly once (row 3, position 7), every other id != SPIKE."""
    ids = np.random.default_rng(0).integers(6, 64, size=(ROWS, LENGTH))
    ids[3, 7] = SPIKE
    spans = np.stack([np.arange(LENGTH), np.arange(1, LENGTH + 1)], axis=1)
    return [Row(r, r, ids[r], spans, "x" * LENGTH) for r in range(ROWS)]


def hidden_layout(layers: list[int]) -> dict:
    """A store layout with hidden layers only (the fixed top-K targets need no rank table)."""
    return dict(
        seq_len=LENGTH,
        top_k=4,
        temperatures=[1.0],
        vocab_proj_temperature=1.0,
        hidden_layers=layers,
        attention_layers=[],
        attention_topk=1,
        vocab_proj=False,
    )


def test_one_massive_activation_is_the_clip_share_measured_at_calibration(single_thread):
    # Embedding dimension 0 is ~0 at every position but one, where it is 1e4: over N positions its std is
    # ~1e4 / sqrt(N), so that one value lies sqrt(N) ~ 16 > 10 stds out, and is the only value clipped in
    # layer 0 (the embeddings, hidden_states[0]): share = 1 / (N x H).
    n = ROWS * LENGTH
    model, rows = tiny_llama(1e4), calibration_rows()
    calibration = calibrate_rows(model, rows, hidden_layout([0, 1]), None, 4, torch.device("cpu"))
    arrays, report = calibration.arrays, calibration.report
    assert report["positions"] == {"0": n, "1": n} and report["hidden_clip"] == TARGET_CLIP
    assert report["hidden_clip_share"]["0"] == pytest.approx(1 / (n * HIDDEN), rel=1e-6)
    # the share is what stage 2 clips: the stored values (standardized, fp16) through its targets
    with torch.no_grad():
        raw = model.model.embed_tokens(torch.from_numpy(np.stack([r.input_ids for r in rows]))).reshape(n, HIDDEN)
    mean, std = (torch.from_numpy(arrays[f"standardize/hidden/0/{name}"]) for name in ("mean", "std"))
    stored = ((raw - mean) / std).half().float()
    stats = [torch.from_numpy(arrays[f"stats/hidden/0/{name}"]) for name in ("mean", "std")]
    targets = standardize_hidden(stored, *stats, hidden_target_scale(stats[1]))
    unclipped = standardize_hidden(stored, *stats, hidden_target_scale(stats[1]), clip=math.inf)
    clipped = (targets != unclipped).nonzero().tolist()
    assert clipped == [[3 * LENGTH + 7, 0]]  # the spike, and nothing else
    quiet = calibrate_rows(tiny_llama(0.0), rows, hidden_layout([0]), None, 4, torch.device("cpu")).report
    assert quiet["hidden_clip_share"]["0"] == 0.0


def test_pca_targets_keep_their_components_relative_variance():
    # Three stored components with stds 8, 2 and 0.5 (a PCA basis orders them by variance): one scale for the
    # layer, sqrt((64 + 4 + 0.25) / 3), keeps the ratios 16 : 4 : 1 and a mean square of 1 per dimension;
    # dividing each by its own std (whitening) would give all three the same weight.
    stds = torch.tensor([8.0, 2.0, 0.5])
    stored = torch.randn(20000, 3, generator=torch.Generator().manual_seed(0)) * stds + torch.tensor([1.0, -2.0, 3.0])
    mean, std = stored.mean(dim=0), stored.std(dim=0)
    scale = hidden_target_scale(std)
    assert scale.item() == pytest.approx(math.sqrt(std.pow(2).mean().item()), rel=1e-6)
    assert scale.item() == pytest.approx(math.sqrt((64 + 4 + 0.25) / 3), rel=1e-2)
    targets = standardize_hidden(stored, mean, std, scale)
    spread = targets.std(dim=0)
    torch.testing.assert_close(spread / spread[-1], torch.tensor([16.0, 4.0, 1.0]), rtol=2e-2, atol=0)
    assert targets.pow(2).mean().item() == pytest.approx(1.0, rel=2e-3)
    whitened = standardize_hidden(stored, mean, std).std(dim=0)
    torch.testing.assert_close(whitened, torch.ones(3), rtol=1e-3, atol=0)


def test_calibration_rows_are_a_seeded_sample_of_all_rows():
    rows = sample_calibration_rows(10_000, 64, seed=0)
    assert rows.dtype == np.int64 and len(np.unique(rows)) == 64 and (np.diff(rows) > 0).all()
    assert rows.max() > 5_000 and not np.array_equal(rows, np.arange(64))  # spread over the plan, not its head
    assert np.array_equal(rows, sample_calibration_rows(10_000, 64, seed=0))
    assert not np.array_equal(rows, sample_calibration_rows(10_000, 64, seed=1))
    assert sample_calibration_rows(5, 64, seed=3).tolist() == [0, 1, 2, 3, 4]  # fewer rows than asked: all of them


def test_train_prints_the_clip_share_or_that_an_old_store_lacks_it(capsys):
    say_hidden_clip_share({"calibration": {"hidden_clip_share": {"6": 2.5e-5, "12": 0.0}}})
    say_hidden_clip_share({})  # a store made before the calibration record
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("on the calibration rows: layer 6 0.003%, layer 12 0.000%")
    assert "does not record" in out[1]


def test_a_pca_store_records_its_calibration_and_trains_on_unwhitened_targets(train_assets, tmp_path, single_thread):
    """Through the real CLI: the manifest lists the sampled calibration rows (the statistics are theirs), and the
    learner's targets of a --hidden-dim store are divided by one scale per layer, not whitened per component."""
    from typer.testing import CliRunner

    from distill.cache.reader import CacheReader
    from distill.cli import app
    from distill.curriculum import weights_at
    from distill.pipeline.train.learner import StepView
    from distill.pipeline.train.setup import setup
    from tests.helpers import cache_args, train_args
    from tests.test_train import make_config

    store = tmp_path / "pca"
    args = cache_args(train_assets, store, hidden_dim=8, hidden_layers="1,2", attention_layers="", packing="none")
    result = CliRunner().invoke(app, ["cache-teacher", *args])
    assert result.exit_code == 0, result.output
    assert "calibrated on 8 rows sampled with seed 0" in result.output
    assert "cache-teacher: calibration: 100%" in result.output  # the calibration pass's progress bar, to its end
    reader = CacheReader(str(store))
    calibration = reader.manifest["calibration"]
    rows = sample_calibration_rows(reader.num_rows, 8, seed=0)
    assert calibration["seed"] == 0 and calibration["rows"] == rows.tolist() and rows.max() >= 8
    assert set(calibration["hidden_clip_share"]) == {"1", "2"}
    data = reader.read_rows(rows, ["hidden/1", "offsets", "length"])
    text = torch.cat([data["offsets"][r, : int(n), 1] > 0 for r, n in enumerate(data["length"].tolist())])
    stored = torch.cat([data["hidden/1"][r, : int(n)] for r, n in enumerate(data["length"].tolist())]).float()[text]
    mean, std = (torch.from_numpy(reader.root_array(f"stats/hidden/1/{s}")) for s in ("mean", "std"))
    torch.testing.assert_close(stored.mean(dim=0), mean, atol=5e-3, rtol=0)  # fitted on exactly these rows
    assert std[0] > 1.3 * std[-1]  # PCA components: decreasing variance

    settings = {"eval_fraction": 0, "curriculum.attention": 0}
    run = setup(make_config(train_args({**train_assets, "store": store}, tmp_path / "run", **settings)))
    batch = run.batches.prepare_batch(np.array([0, 1]))
    view = StepView(run.learner, batch, batch.signal, None, set(weights_at(0, 1, run.cfg.curriculum)))
    targets = view.teacher_hidden(1)  # (N, 8)
    raw = batch.signal.hidden[1][view.b, view.tp].float()
    expected = standardize_hidden(raw, mean, std, std.pow(2).mean().sqrt())
    torch.testing.assert_close(targets, expected)
    assert not torch.allclose(targets, standardize_hidden(raw, mean, std), atol=0.1)  # not whitened
