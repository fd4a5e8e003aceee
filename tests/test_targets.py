"""The compact target codec (distill/cache/targets.py) and stage 1's choice of targets, on hand-made rows."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cache.schema import FIELD_DTYPES
from distill.cache.targets import (
    TARGET_KINDS,
    build_target_layout,
    count_head,
    decode_targets,
    draw_samples,
    target_field_shapes,
    target_slots,
)
from distill.pipeline.teacher.logit_pass import LogitSlice
from distill.pipeline.teacher.target_fields import (
    compute_target_slice,
    decoded_logits,
    find_head,
    fit_rank_table,
    kish_ess,
    measure_draws_ess,
    measure_head_bins,
)


def test_count_head_stops_once_the_mass_is_reached() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    lse = torch.zeros(2)
    assert count_head(logits, lse, 0.8, 0.1).tolist() == [2, 1]  # 0.5 + 0.3 reaches 0.8; 0.97 alone
    assert count_head(logits, lse, 0.81, 0.1).tolist() == [3, 1]
    assert count_head(logits, lse, 0.999, 0.1).tolist() == [4, 4]
    far = torch.tensor([[0.0, -30.0]])  # 30 nats below the max: beyond 255 codes of 0.1
    assert count_head(far, far.logsumexp(-1), 1.0, 0.1).tolist() == [1]


def test_draw_samples_counts_distinct_ids_and_skips_excluded() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]])
    ids, draws = draw_samples(probs, 16, torch.tensor([[0, -1], [3, -1]]), torch.Generator().manual_seed(0))
    assert draws[0].sum() == 16 and set(ids[0][draws[0] > 0].tolist()) <= {1, 2}
    assert (ids[0][draws[0] == 0] == -1).all()
    assert draws[1].sum() == 0 and (ids[1] == -1).all()  # nothing left to draw once 3 is excluded
    used = ids[0][ids[0] >= 0]
    assert len(used) == len(set(used.tolist()))


def make_layout(kind: str, top_k: int = 4, samples: int = 6) -> dict:
    return {
        "seq_len": 1,
        "top_k": top_k,
        "temperatures": [1.0, 2.0],
        "targets": build_target_layout(kind, top_k, 0.9, samples),
    }


@pytest.mark.parametrize("kind", ["topk", "sampled", "hybrid"])
def test_round_trip_through_zarr_keeps_ids_and_values_within_the_bound(kind: str, tmp_path) -> None:
    import zarr

    from distill.cache.shards import read_rows_of
    from distill.cache.store import compressor_for, delta_attributes, encode_rows

    g = torch.Generator().manual_seed(0)
    vocab, positions = 50, 7
    logits = torch.randn(positions, vocab, generator=g) * 3
    lse1 = logits.logsumexp(-1)
    layout = make_layout(kind)
    top = logits.topk(layout["top_k"], dim=-1)
    rank_of_id = torch.randperm(vocab, generator=g)
    arrays = compute_target_slice(
        logits, logits.softmax(-1), lse1, top.values, top.indices, layout["targets"], rank_of_id, g
    )
    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    stored = {}
    for name, shape in target_field_shapes({**layout, "seq_len": 1}):
        dtype = FIELD_DTYPES[name]
        value = arrays[name].numpy().astype(dtype).reshape(positions, *shape)
        array = root.create_array(
            name,
            shape=value.shape,
            chunks=value.shape,
            dtype=dtype,
            compressors=compressor_for(name),
            attributes=delta_attributes(name, value.ndim),
        )
        array[:] = encode_rows(array, value)
        read = read_rows_of(array, slice(0, positions))
        stored[name] = torch.from_numpy(read.astype(np.int64 if dtype != "float32" else np.float32))
    assert (stored["target_ids"].numpy() == arrays["target_ids"].numpy().reshape(stored["target_ids"].shape)).all()
    ids, z, mult = decode_targets(stored, lse1[:, None], layout, torch.argsort(rank_of_id))
    ids, z = ids[:, 0], z[:, 0]
    for p in range(positions):
        used = ids[p] >= 0
        assert (z[p][used] - logits[p, ids[p][used]]).abs().max() <= 0.05 + 1e-5  # value_error_bound
        assert len(set(ids[p][used].tolist())) == int(used.sum())
        if kind != "sampled":
            head = top.indices[p, : count_head(top.values[p : p + 1], lse1[p : p + 1], 0.9, 0.1)[0]]
            assert set(head.tolist()) <= set(ids[p][used].tolist())
    if kind == "sampled":  # at T=1 the weights are exactly draws / n (the quantization cancels)
        w = mult[:, 0] * torch.exp(z - lse1[:, None])
        assert torch.allclose(w.sum(-1), torch.ones(positions), atol=1e-5)
    if kind == "topk":
        assert mult is None


def test_delta_coding_stores_gaps_and_reads_back_exactly_whatever_the_values(tmp_path) -> None:
    import zarr

    from distill.cache.shards import read_rows_of
    from distill.cache.store import DELTA_ATTR, compressor_for, delta_attributes, encode_rows

    rng = np.random.default_rng(0)
    ranks = np.sort(rng.integers(0, 2**18, size=(6, 5, 4), dtype=np.uint32), axis=-1)  # (rows, L, S) ascending
    ranks[1, 2] = [2**32 - 1, 0, 7, 3]  # unsorted and at the ends of uint32: the gaps wrap around, and back
    root = zarr.open_group(str(tmp_path / "z"), mode="w")
    array = root.create_array(
        "target_ids", shape=ranks.shape, chunks=(4, 5, 4), dtype="uint32", compressors=compressor_for("target_ids"),
        attributes=delta_attributes("target_ids", ranks.ndim),
    )  # fmt: skip
    array[:] = encode_rows(array, ranks.astype(np.int64))
    assert dict(array.attrs) == {DELTA_ATTR: {"axis": 2}}
    assert np.array_equal(array[:, :, 0], ranks[:, :, 0])  # the first slot as it is, then the gaps
    assert np.array_equal(array[0, 0, 1:], np.diff(ranks[0, 0]))
    assert np.array_equal(read_rows_of(array, slice(0, 6)), ranks)
    assert np.array_equal(read_rows_of(array, np.array([5, 1, 3])), ranks[[5, 1, 3]])  # rows across chunks
    plain = root.create_array("length", shape=(6,), dtype="int32", attributes=delta_attributes("length", 1))
    lengths = ranks[:, 0, 0]
    assert encode_rows(plain, lengths) is lengths and not dict(plain.attrs)  # other fields are stored as they are


def test_rank_table_orders_by_mean_probability_then_id() -> None:
    id_by_rank, rank_of_id = fit_rank_table(torch.tensor([0.1, 0.5, 0.1, 0.3]))
    assert id_by_rank.tolist() == [1, 3, 0, 2]
    assert rank_of_id.tolist() == [2, 0, 3, 1]


def head_figures(logits: torch.Tensor, targets: dict, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The [fidelity note] figures of ``logits`` (P, V) as ``TargetCalibration`` measures them."""
    ids, keep = find_head(logits, targets)
    decoded = decoded_logits(logits.gather(1, ids), targets, logits.max(dim=-1, keepdim=True).values)
    kl, tail = measure_head_bins(logits, ids, keep, decoded, [t])
    return kl[:, 0], tail[:, 0]


def logit_slice(logits: torch.Tensor, k: int) -> LogitSlice:
    """``logits`` (P, V) as the logit pass hands them to ``observe``."""
    top = logits.topk(k, dim=-1)
    return LogitSlice(logits, logits.softmax(-1), logits.logsumexp(-1), top.values, top.indices)


def test_fidelity_is_the_k_plus_1_bin_kl_of_the_decoded_head_and_the_tail_mass_by_hand() -> None:
    logits = torch.tensor([[1.0, 0.53, -0.21, -3.04]])  # off the 0.1 grid: 0.53 is read back as 0.5
    targets = {"kind": "topk", "value_step": 0.1, "mass": 0.8, "top_k": 4}  # p = .515 .322 .154 .009: head 2
    ids, keep = find_head(logits, targets)
    assert ids[keep].tolist() == [0, 1]
    decoded = decoded_logits(logits, targets, logits.max(dim=-1, keepdim=True).values)
    assert decoded[0, :2].tolist() == pytest.approx([1.0, 0.5])
    for t in (1.0, 2.0):
        kl, tail = head_figures(logits, targets, t)
        p = (logits[0] / t).softmax(-1).double()
        q_head = torch.exp(decoded[0, :2].double() / t - (logits[0] / t).logsumexp(-1).double())
        p_tail, q_tail = 1 - p[:2].sum(), 1 - q_head.sum()
        expected = float((p[:2] * (p[:2] / q_head).log()).sum() + p_tail * math.log(p_tail / q_tail))
        assert kl.item() == pytest.approx(expected, rel=1e-3) and 1e-5 < kl.item() < 1e-3  # the stored values' loss
        assert tail.item() == pytest.approx(float(p_tail), rel=1e-5)  # what the K+1 bins cannot resolve
    exact, on_grid = {**targets, "mass": 1.0}, torch.tensor([[1.0, 0.5, -0.2, -3.0]])  # every token, read back exactly
    kl, tail = head_figures(on_grid, exact, 4.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6) and tail.item() == 0.0
    fp16 = {"kind": "topk-fp16", "top_k": 3}  # the fixed top-3, fp16 logits
    ids, keep = find_head(logits, fp16)
    assert ids[keep].tolist() == [0, 1, 2]
    kl, _ = head_figures(logits, fp16, 1.0)
    assert 0 <= kl.item() < 1e-6


def test_fidelity_matches_the_full_vocabulary_formula_in_fp64() -> None:
    """The one-pass figures equal the definition computed over every token in fp64, on a real-sized row: at T = 1, 2,
    4 through the exponential chain ([exp-chain note]), at T = 3 and 8 over the logits / T; a tail reaching 150 nats
    below the max (its T = 1 probabilities underflow fp32) included."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=generator) * 3.0
    logits[:, :40] += 8.0  # a peaked head, a long tail
    logits[:3, 4000:] -= torch.linspace(0.0, 150.0, 1000)  # a far tail on half the rows
    for kind, targets in {
        "topk": {"kind": "topk", "value_step": 0.1, "mass": 0.9, "top_k": 64},
        "topk-fp16": {"kind": "topk-fp16", "top_k": 32},
    }.items():
        ids, keep = find_head(logits, targets)
        head = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, torch.where(keep, ids, ids[:, :1]), True)
        decoded = decoded_logits(logits, targets, logits.max(dim=-1, keepdim=True).values).double()
        for t in (1.0, 2.0, 3.0, 4.0, 8.0):
            scaled = logits.double() / t
            log_p = scaled - scaled.logsumexp(dim=-1, keepdim=True)
            p_head = torch.where(head, log_p.exp(), 0.0)
            q_head = torch.where(head, (decoded / t - scaled.logsumexp(dim=-1, keepdim=True)).exp(), 0.0)
            tail, q_tail = 1 - p_head.sum(-1), 1 - q_head.sum(-1)
            ratio = torch.where(head, (logits.double() - decoded) / t, 0.0)
            expected = (p_head * ratio).sum(-1) + tail * (tail / q_tail).log()
            kl, measured_tail = head_figures(logits, targets, t)
            assert torch.allclose(measured_tail, tail, rtol=1e-5, atol=1e-9), kind
            assert torch.allclose(kl, expected, rtol=1e-3, atol=1e-8), (kind, t, kl, expected)


def test_exp_sums_give_the_logsumexp_at_1_2_and_4_and_the_t1_exponentials() -> None:
    """[exp-chain note]: one exponential at T = 4, then squares: lse_T = max / T + log Σ exp((z - max) / T) to fp32
    rounding, tails 200 nats down included; ``out`` ends as exp(z - max); a T outside 1, 2, 4 is refused."""
    from distill.pipeline.teacher.logit_pass import exp_sums

    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30000, generator=generator) * 4.0
    logits[:2, 20000:] -= torch.linspace(0.0, 200.0, 10000)
    row_max = logits.max(dim=-1, keepdim=True).values
    out = torch.empty_like(logits)
    sums = exp_sums(logits, row_max, [1.0, 4.0, 2.0], out)
    for j, t in enumerate((1.0, 4.0, 2.0)):
        exact = (logits.double() / t).logsumexp(-1)
        torch.testing.assert_close((row_max[:, 0] / t + sums[:, j].log()).double(), exact, atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(out, (logits - row_max).exp(), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(exp_sums(logits, row_max, [1.0], out)[:, 0], sums[:, 0], rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match="not"):
        exp_sums(logits, row_max, [2.0, 4.0], out)  # without 1


def test_effective_sample_size_of_weighted_draws_by_hand() -> None:
    counts = torch.tensor([[2, 1, 0], [1, 1, 1], [0, 0, 0]])
    log_w = torch.tensor([[0.0, math.log(2.0), 5.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    ess = kish_ess(log_w, counts)  # (2·1 + 1·2)² / (2·1 + 1·4) = 16 / 6; equal weights: the draws; none: 0
    assert ess.tolist() == pytest.approx([16 / 6, 3.0, 0.0])
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]] * 64)
    sampled = {"kind": "sampled", "value_step": 0.1, "samples": 8}
    ids, keep = find_head(logits, sampled)
    generator = torch.Generator().manual_seed(0)
    ess = measure_draws_ess(logits, logits.softmax(-1), torch.where(keep, ids, -1), sampled, [1.0, 4.0], generator)
    assert ess[:, 0].tolist() == pytest.approx([8.0] * 64)  # at T = 1 every draw weighs the same
    assert (ess[:, 1] <= 8.0 + 1e-9).all() and (ess[:, 1] >= 1.0).all() and ess[:, 1].mean() < 7.0  # T = 4: fewer


def test_info_names_an_older_stores_fidelity_figure_for_what_it_is() -> None:
    from distill.cache.info import describe_fidelity

    old = {"kind": "topk", "rows": 16, "positions": 2044, "expectation_over_draws": False}
    old["kl_full_reconstructed"] = {"1.0": 0.7026, "2.0": 2.2135, "4.0": 0.5822}
    (line,) = describe_fidelity(old)
    assert "(older store)" in line and "tail spread evenly" in line and "T=1 0.7026" in line
    assert "not the loss of the stored values" in line
    (line,) = describe_fidelity({**old, "kind": "sampled", "expectation_over_draws": True})
    assert "the draws' expectation" in line
    new = {"kind": "hybrid", "rows": 16, "positions": 2044, "ess_samples": 32, "ess_positions": 2040}
    new.update(kl_head_bins={"1.0": 3e-4}, tail_mass={"1.0": 0.115}, ess={"1.0": 32.0})
    head, draws = describe_fidelity(new)
    assert "T=1 3.00e-04 (0.115)" in head and "T=1 32.0" in draws and draws.startswith(" " * 10)
    assert describe_fidelity(None) == []


def test_calibration_measures_fidelity_and_ranks_on_a_stride_of_positions(monkeypatch) -> None:
    from distill.pipeline.teacher import target_fields
    from distill.pipeline.teacher.target_fields import FIDELITY_POSITIONS, TargetCalibration

    monkeypatch.setattr(target_fields, "UNIGRAM_POSITIONS", 2 * FIDELITY_POSITIONS)  # the rank table: stride 2

    layout = {"targets": {"kind": "topk", "value_step": 0.1, "mass": 0.9}, "top_k": 8, "temperatures": [1.0]}
    total = 3 * FIDELITY_POSITIONS  # stride 3: every third position over the calls, wherever a call ends
    calibration = TargetCalibration(layout, 50, torch.device("cpu"), total)
    logits = torch.randn(total, 50, generator=torch.Generator().manual_seed(0))
    for a, b in ((0, 1000), (1000, 1001), (1001, total)):
        calibration.observe(logit_slice(logits[a:b], 8))
    _, fidelity = calibration.finish(rows=1)
    assert fidelity["positions"] == FIDELITY_POSITIONS
    kl, _ = head_figures(logits[::3], layout["targets"] | {"top_k": 8}, 1.0)
    assert fidelity["kl_head_bins"]["1.0"] == pytest.approx(float(kl.mean()), rel=1e-6)
    assert torch.allclose(calibration.unigram, logits[::2].softmax(-1).sum(0).double(), rtol=1e-5)


PACKAGE = Path(__file__).resolve().parents[1] / "distill"
KIND_NAME_TEST = re.compile(
    r"""(==|!=)\s*["'](%s)["']|["'](%s)["']\s*(==|!=)|\bin\s*[(\[{][^)\]}]*["'](%s)["']"""
    % (("|".join(map(re.escape, TARGET_KINDS)),) * 3)
)


def test_no_module_compares_a_target_kinds_name_outside_the_table():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "cache" / "targets.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if KIND_NAME_TEST.search(line)
    ]
    assert KIND_NAME_TEST.search('if kind == "hybrid":') and KIND_NAME_TEST.search('kind in ("sampled", "hybrid")')
    assert not offenders, "ask cache.targets.TARGET_KINDS instead: " + "; ".join(offenders)


@pytest.mark.parametrize("name", list(TARGET_KINDS))
def test_every_kind_declares_fields_with_a_schema_dtype_and_decodes_them(name):
    kind = TARGET_KINDS[name]
    assert kind.fields and all(field in FIELD_DTYPES for field in kind.fields)
    layout = {"seq_len": 3, "top_k": 4, "temperatures": [1.0], "targets": build_target_layout(name, 4, 0.9, 2)}
    if name == "topk-fp16":
        layout.pop("targets")  # schema 2 stores hold no targets entry
    shapes = dict(target_field_shapes(layout))
    assert list(shapes) == list(kind.fields)
    data = {f: torch.zeros((1, *shape), dtype=torch.float32) for f, shape in shapes.items()}
    if "target_count" in data:
        data["target_count"] = torch.full((1, 3), 2)
    if "target_draws" in data:
        data["target_draws"][..., 0] = 1
    ids, logits, multiplier = decode_targets(data, torch.zeros(1, 3), layout, torch.arange(8))
    assert ids.shape == logits.shape == (1, 3, target_slots(layout))
    assert (multiplier is not None) == kind.sampled


def test_two_level_top_k_is_torch_topk() -> None:
    """[two-level note]: the values of torch.topk, descending, and its columns where no values tie; a vocabulary not
    a multiple of the block, a peaked row, a row whose top values crowd one block, and a short row (torch.topk)."""
    from distill.pipeline.teacher.logit_pass import TOPK_BLOCK, top_k_rows

    generator = torch.Generator().manual_seed(2)
    for v, k in ((37984 + 7, 128), (5000, 16), (300, 32)):
        x = torch.randn(5, v, generator=generator, dtype=torch.float64).float() * 3.0
        x[1, :40] += 20.0  # peaked
        x[2, torch.arange(0, v - v % TOPK_BLOCK, v // TOPK_BLOCK)] += 30.0  # every top value in block 0
        x[3, -(v % TOPK_BLOCK or 1) :] += 25.0  # the columns past the last block
        values, ids = torch.empty(5, k), torch.empty(5, k, dtype=torch.long)
        top_k_rows(x, k, out=(values, ids))
        ref = torch.topk(x, k, dim=-1)
        assert torch.equal(values, ref.values) and torch.equal(ids, ref.indices), (v, k)
