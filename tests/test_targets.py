"""The compact target codec (distill/cache/targets.py) and stage 1's choice of targets, on hand-made rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.cache.targets import (
    build_target_layout,
    count_head,
    decode_targets,
    draw_samples,
    target_field_shapes,
)
from distill.pipeline.target_fields import compute_target_slice, fit_rank_table, kl_to_reconstruction


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

    from distill.cache.store import compressor_for, filters_for

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
    for name, dtype, shape in target_field_shapes({**layout, "seq_len": 1}):
        value = arrays[name].numpy().astype(dtype).reshape(positions, *shape)
        array = root.create_array(
            name,
            shape=value.shape,
            chunks=value.shape,
            dtype=dtype,
            compressors=compressor_for(dtype, name),
            filters=filters_for(name, dtype),
        )
        array[:] = value
        stored[name] = torch.from_numpy(np.asarray(array[:]).astype(np.int64 if dtype != "float32" else np.float32))
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


def test_rank_table_orders_by_mean_probability_then_id() -> None:
    id_by_rank, rank_of_id = fit_rank_table(torch.tensor([0.1, 0.5, 0.1, 0.3]))
    assert id_by_rank.tolist() == [1, 3, 0, 2]
    assert rank_of_id.tolist() == [2, 0, 3, 1]


def test_fidelity_kl_is_zero_when_nothing_is_lost_and_grows_with_a_smaller_head() -> None:
    logits = torch.tensor([[1.0, 0.53, -0.21, -3.04]])  # off the 0.1 grid: quantization error is real but tiny
    full = {"kind": "topk", "value_step": 0.02, "mass": 1.0, "top_k": 4}  # codes up to 200: all in range
    assert kl_to_reconstruction(logits, full, 1.0).item() == pytest.approx(0.0, abs=1e-4)
    small = {**full, "mass": 0.5, "value_step": 1e-3}
    p = logits.softmax(-1)[0]
    tail = p[1:].sum()
    expected = float((p[1:] * (p[1:].log() - math.log(tail / 3))).sum())  # the tail spread evenly
    assert kl_to_reconstruction(logits, small, 1.0).item() == pytest.approx(expected, rel=1e-3)
    sampled = {"kind": "sampled", "value_step": 0.1, "samples": 8}
    assert kl_to_reconstruction(logits, sampled, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert 0 < kl_to_reconstruction(logits, sampled, 2.0).item() < 1e-3  # only the quantization, in expectation
