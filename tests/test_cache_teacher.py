"""Stage 1 end to end on a tiny Qwen3-MoE teacher: stored fields against a full-vocabulary fp32 reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import zarr
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cli import app
from tests.helpers import assert_stores_equal, cache_args, config_from_args

TEMPS = [1.0, 2.0, 4.0]


@pytest.fixture(scope="module")
def store(tiny_assets, tmp_path_factory) -> Path:
    """Unpacked, so that each row is compared with the model on that row alone (packed rows: test_packing.py)."""
    out = tmp_path_factory.mktemp("stores") / "main"
    result = CliRunner().invoke(app, ["cache-teacher", *cache_args(tiny_assets, out, packing="none")])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def reference(tiny_assets):
    """The teacher in fp32 with eager attention: full logits, hidden states, attention maps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_assets["teacher"], dtype=torch.float32, attn_implementation="eager"
    ).eval()

    def run(ids: torch.Tensor):
        with torch.no_grad():
            return model(input_ids=ids[None], output_hidden_states=True, output_attentions=True)

    return model, run


def test_logit_fields_match_full_vocabulary_reference(store, reference):
    model, run = reference
    reader = CacheReader(str(store))
    batch = reader.read_rows(range(min(10, reader.num_rows)))
    assert batch["topk_logits"].dtype == torch.float16 and batch["lse"].dtype == torch.float32
    assert batch["topk_ids"].dtype == torch.int64
    for r in range(len(batch["length"])):
        n = int(batch["length"][r])
        out = run(batch["input_ids"][r, :n])
        logits = out.logits[0].float()  # (n, V)
        ids = batch["topk_ids"][r, :n]
        stored = batch["topk_logits"][r, :n].float()
        for ti, t in enumerate(TEMPS):
            ref_logp = torch.log_softmax(logits / t, dim=-1)
            lse = batch["lse"][r, :n, ti]
            torch.testing.assert_close(lse, torch.logsumexp(logits / t, dim=-1), atol=1e-4, rtol=1e-5)
            probs = torch.exp(stored / t - lse[:, None])  # (n, K) from the store
            ref_probs = ref_logp.exp().gather(1, ids)
            assert (probs - ref_probs).abs().max() < 1e-3
            # the tail from lse, computed independently of the head sum
            head_lse = torch.logsumexp(stored / t, dim=-1)
            tail = -torch.expm1(head_lse - lse)
            ref_tail = 1 - ref_probs.sum(-1)
            assert (tail - ref_tail).abs().max() < 1e-3
            assert (probs.sum(-1) + tail - 1).abs().max() < 1e-5
        ref_top = logits.topk(ids.shape[1], dim=-1)
        assert torch.equal(ids, ref_top.indices)
        target = batch["target_logprob"][r]
        ref_target = torch.log_softmax(logits, -1)[:-1].gather(1, batch["input_ids"][r, 1:n, None])[:, 0]
        assert (target[: n - 1] - ref_target).abs().max() < 1e-4
        assert torch.isnan(target[n - 1 :]).all()
        t_star = reader.layout["vocab_proj_temperature"]
        ref_proj = torch.softmax(logits / t_star, -1) @ model.get_input_embeddings().weight.float()
        torch.testing.assert_close(batch["vocab_proj"][r, :n].float(), ref_proj, atol=2e-3, rtol=2e-3)


def test_hidden_and_attention_match_reference(store, reference):
    _, run = reference
    reader = CacheReader(str(store))
    assert reader.layout["hidden_layers"] == [0, 1, 2] and reader.layout["attention_layers"] == [1, 2]
    batch = reader.read_rows(range(min(6, reader.num_rows)))
    for r in range(len(batch["length"])):
        n = int(batch["length"][r])
        out = run(batch["input_ids"][r, :n])
        for layer in (0, 1, 2):  # stored standardized per dimension, see [hidden-range note]
            mean = torch.from_numpy(reader.root_array(f"standardize/hidden/{layer}/mean"))
            std = torch.from_numpy(reader.root_array(f"standardize/hidden/{layer}/std"))
            torch.testing.assert_close(
                batch[f"hidden/{layer}"][r, :n].float(),
                (out.hidden_states[layer][0] - mean) / std,
                atol=4e-3,
                rtol=2e-3,
            )
        for layer in (1, 2):
            averaged = out.attentions[layer - 1][0].mean(0)  # (n, n) head-averaged rows
            keys = batch[f"attn_ids/{layer}"][r, :n]
            values = batch[f"attn/{layer}"][r, :n].float()
            used = values > 0  # query t has t+1 keys; the other slots are unused (value 0, id 0)
            ka = keys.shape[1]
            assert used.sum(1).tolist() == [min(t + 1, ka) for t in range(n)]
            assert (keys[~used] == 0).all() and (keys <= torch.arange(n)[:, None]).all()  # causal, no padding
            torch.testing.assert_close(values[used], averaged.gather(1, keys)[used], atol=1e-3, rtol=1e-2)
            kk = min(ka, n)
            torch.testing.assert_close(values[:, :kk], averaged.topk(kk, dim=-1).values, atol=1e-3, rtol=1e-2)


def test_offsets_slice_the_text_of_each_token(store, tiny_assets):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    reader = CacheReader(str(store))
    batch = reader.read_rows(reader.row_ids)
    special_docs = {0, 1, 2}  # accents, CJK, emoji (see conftest.SPECIAL_TEXTS)
    seen = set()
    for r, text in enumerate(batch["text"]):
        n = int(batch["length"][r])
        ids, offs = batch["input_ids"][r, :n].tolist(), batch["offsets"][r, :n].tolist()
        i = 0
        while i < n:  # tokens with overlapping spans (byte-split characters) decode together to their text
            j, end = i + 1, offs[i][1]
            while j < n and offs[j][0] < end:
                end = max(end, offs[j][1])
                j += 1
            assert text[offs[i][0] : end] == tok.decode(ids[i:j]), (r, i, offs[i])
            assert j == n or offs[j][0] == end  # spans tile the text: no gap, no overlap between groups
            i = j
        assert offs[0][0] == 0 and end == len(text)
        seen.add(int(batch["doc_id"][r]))
    assert special_docs <= seen


def test_long_documents_become_rows_that_cover_them_and_empty_ones_are_counted(store, tiny_assets):
    reader = CacheReader(str(store))
    batch = reader.read_rows(reader.row_ids, fields=["doc_id", "text", "length"])
    texts = tiny_assets["texts"]
    docs: dict[int, list[str]] = {}
    for doc, text in zip(batch["doc_id"].tolist(), batch["text"]):
        docs.setdefault(doc, []).append(text)
    long_doc = 5
    assert len(docs[long_doc]) >= 3
    for doc, parts in docs.items():
        assert "".join(parts) == texts[doc]
    assert 3 not in docs  # the empty document
    assert reader.manifest["dataset"]["empty_documents"] == 1
    assert len(docs) == len(texts) - 1


def test_cache_info_reports_rows_shards_and_bytes(store):
    result = CliRunner().invoke(app, ["cache", "info", str(store), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    reader = CacheReader(str(store))
    assert info["complete"] and info["rows"] == reader.num_rows == info["rows_committed"]
    assert info["tokens_committed"] == int(reader.read_rows(reader.row_ids, ["length"])["length"].sum())
    assert set(info["bytes"]["fields"]) == set(reader.fields)
    assert all(b > 0 for b in info["bytes"]["fields"].values())
    assert info["bytes_per_token"]["total"] > 0
    per_field = info["bytes_per_token"]["fields"].values()
    assert info["bytes_per_token"]["rows"] == pytest.approx(sum(per_field))
    assert info["bytes_per_token"]["rows"] < info["bytes_per_token"]["total"]  # the store-level arrays come on top
    assert "all row fields" in CliRunner().invoke(app, ["cache", "info", str(store)]).stdout
    human = CliRunner().invoke(app, ["cache", "info", str(store)])
    assert "complete" in human.stdout and "topk_logits" in human.stdout
    # head mass per stored temperature: recomputed here from every stored position
    batch = reader.read_rows(reader.row_ids, ["topk_logits", "lse", "length"])
    valid = torch.arange(batch["topk_logits"].shape[1])[None, :] < batch["length"][:, None]
    for j, t in enumerate(TEMPS):
        mass = (batch["topk_logits"].float()[valid] / t - batch["lse"][valid][:, j : j + 1]).exp().sum(-1)
        assert info["head_mass"][str(t)]["mean"] == pytest.approx(mass.mean().item(), abs=1e-5)
        assert info["head_mass"][str(t)]["p10"] == pytest.approx(mass.quantile(0.1).item(), abs=1e-5)
    masses = [info["head_mass"][str(t)]["mean"] for t in TEMPS]
    assert masses == sorted(masses, reverse=True)  # a hotter distribution puts less mass in its top-K
    assert f"T=1 {masses[0]:.3f}" in human.stdout


def test_reader_checks_fields_and_temperatures(store):
    from distill.cache.schema import CacheError

    reader = CacheReader(str(store))
    assert reader.temperature_index(4.0) == 2
    with pytest.raises(CacheError, match="temperature 3.0 is not stored"):
        reader.temperature_index(3.0)
    with pytest.raises(CacheError, match="hidden/7"):
        reader.require_fields(["hidden/7"])
    files = reader.tokenizer_files()
    assert "tokenizer.json" in files and json.loads(files["tokenizer.json"])["model"]["type"] == "BPE"
    stats = reader.root_array("stats/hidden/2/std")
    assert stats.shape == (reader.layout["hidden_dim"],) and (stats > 0).all()
    ordered = reader.read_rows([3, 1, 2], ["row_id"])["row_id"]
    assert ordered.tolist() == [3, 1, 2]


def test_hidden_states_beyond_fp16_range_are_stored_finite_and_recoverable(tiny_assets, tmp_path):
    """A teacher whose residual stream passes 65,504 (as Gemma 3's does) stores finite, standardized states."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e7)  # the residual stream now exceeds fp16 in every block
    loud = tmp_path / "loud_teacher"
    model.save_pretrained(loud)
    AutoTokenizer.from_pretrained(tiny_assets["teacher"]).save_pretrained(loud)
    out = tmp_path / "store"
    args = cache_args({**tiny_assets, "teacher": loud}, out, max_rows=8, hidden_layers=None, attention_layers="")
    result = CliRunner().invoke(app, ["cache-teacher", *args])
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out))
    assert reader.layout["hidden_layers"] == [1, 2]  # the default layers
    batch = reader.read_rows(reader.row_ids)
    ids = batch["input_ids"][0, : int(batch["length"][0])]
    with torch.no_grad():
        raw = model(input_ids=ids[None], output_hidden_states=True).hidden_states
    assert raw[1].abs().max() > 65504  # the case being tested (the last layer is after the final norm)
    for layer in reader.layout["hidden_layers"]:
        stored = batch[f"hidden/{layer}"]
        assert torch.isfinite(stored.float()).all()
        mean = torch.from_numpy(reader.root_array(f"standardize/hidden/{layer}/mean"))
        std = torch.from_numpy(reader.root_array(f"standardize/hidden/{layer}/std"))
        recovered = stored[0, : len(ids)].float() * std + mean
        torch.testing.assert_close(recovered, raw[layer][0], rtol=2e-3, atol=2e-3 * float(std.max()))


@pytest.mark.parametrize("kind", ["topk", "hybrid"])
def test_each_row_runs_through_the_teacher_once_and_is_stored_as_computed_alone(
    tiny_assets, tmp_path, monkeypatch, kind, single_thread
):
    """[calibration note] in calibration.py: the calibration pass's rows are stored from that pass, not run again,
    and every stored row equals ``compute_batch_fields`` run apart on the batch that computed it (the calibration's
    batches of 4, then each chunk's other rows 4 at a time) with the store's fitted statistics, PCA basis and rank
    table: packed rows, hidden states, attention, vocab_proj and the compact targets (``hybrid``: with draws, seeded
    per row), byte for byte. A row's values may differ in the last bit with its batch's shape (sdpa's kernels, and
    several intra-op threads), so the batches are the store's (test_cache_resume.py's kill test runs with several
    threads: the rows a resume recomputes are batched as before, see CalibratedRows in cache_teacher.py)."""
    import numpy as np

    from distill.pipeline.teacher import fields
    from distill.pipeline.teacher.model import TeacherSource, load_teacher
    from distill.pipeline.text.data import Row

    forwarded = []
    real_forward = fields.forward_teacher

    def counting_forward(model, input_ids, *args, **kwargs):
        forwarded.extend(input_ids.shape[:1])
        return real_forward(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(fields, "forward_teacher", counting_forward)
    out = tmp_path / kind
    args = cache_args(tiny_assets, out, targets=kind, target_samples=8, hidden_dim=8, calibration_rows=8)
    result = CliRunner().invoke(app, ["cache-teacher", *args])
    assert result.exit_code == 0, result.output
    reader = CacheReader(str(out))
    assert sum(forwarded) == reader.num_rows and reader.num_rows > 8  # one teacher pass per row, calibration included
    assert reader.layout["packing"] == "greedy" and "pca/hidden/1/components" in reader.root

    stored = reader.read_rows(reader.row_ids)
    rows = [
        Row(
            int(stored["row_id"][i]),
            int(stored["doc_id"][i]),
            stored["input_ids"][i, :n].numpy(),
            stored["offsets"][i, :n].numpy(),
            stored["text"][i],
            stored["segment_ids"][i, :n].numpy(),
        )
        for i, n in enumerate(stored["length"].tolist())
    ]
    model = load_teacher(TeacherSource(str(tiny_assets["teacher"])), torch.device("cpu"), torch.float32, True)
    settings = fields.field_settings(reader.layout, reader.root, torch.device("cpu"))
    calibrated = reader.manifest["calibration"]["rows"]
    batches = [calibrated[a : a + 4] for a in range(0, len(calibrated), 4)]  # --batch-size 4, --chunk-rows 8
    for start in range(0, len(rows), 8):
        others = [i for i in range(start, min(start + 8, len(rows))) if i not in calibrated]
        batches += [others[a : a + 4] for a in range(0, len(others), 4)]
    assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    parts = [fields.compute_batch_fields(model, [rows[i] for i in b], settings, torch.device("cpu")) for b in batches]
    assert all(bad == [] for _, bad in parts)
    order = np.argsort([i for batch in batches for i in batch])
    for name in reader.fields:
        alone = np.concatenate([part[name] for part, _ in parts])[order]
        if name == "text":
            assert alone.tolist() == stored["text"]
        else:
            assert np.array_equal(alone, stored[name].numpy().astype(alone.dtype), equal_nan=True), name
    assert reader.manifest["fidelity"]["rows"] == len(calibrated) == 8
    if kind == "hybrid":  # a row's draws are its own (seeded with its row id), whichever batch computes it
        for i, row in enumerate(rows):
            alone, _ = fields.compute_batch_fields(model, [row], settings, torch.device("cpu"))
            for name in ("target_ids", "target_draws"):
                assert np.array_equal(alone[name][0], stored[name][i].numpy().astype(alone[name].dtype)), (i, name)

    # A crash after the first chunk: the rerun computes the calibration rows past it with their calibration batch
    # (not kept: a resume runs no calibration pass), so the store is the uninterrupted one, byte for byte.
    resumed = tmp_path / f"{kind}-resumed"
    shutil.copytree(out, resumed)
    group = zarr.open_group(str(resumed / "shards" / "00000"), mode="a")
    record = dict(group.attrs["shard"])
    group.attrs["shard"] = {**record, "status": "partial", "checksums": record["checksums"][:1]}
    forwarded.clear()
    args = cache_args(tiny_assets, resumed, targets=kind, target_samples=8, hidden_dim=8, calibration_rows=8)
    assert CliRunner().invoke(app, ["cache-teacher", *args]).exit_code == 0
    assert_stores_equal(resumed, out)
    assert max(calibrated) >= 8 and sum(forwarded) >= reader.num_rows - 8


def test_setup_loads_the_teacher_and_plans_the_rows_without_touching_the_store(tiny_assets, tmp_path):
    from distill.config import CacheConfig
    from distill.pipeline.teacher.cache_teacher import setup

    out = tmp_path / "store"
    t = setup(config_from_args(CacheConfig, cache_args(tiny_assets, out)))
    assert not out.exists()  # the store is prepare_store's, after setup
    assert len(t.plan) > 0 and t.builder.row(0).input_ids.size > 0
    assert not t.model.training and t.device == torch.device("cpu") and t.dtype == torch.float32
