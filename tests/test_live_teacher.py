"""The live teacher of stage 2 (train/signals.py): loaded by stage 1's loader, computing only the fields its
terms read, equal to the store's rows, and blanking a row whose output is not finite as cache-teacher does."""

from __future__ import annotations

import pytest
import torch

from distill.cache.reader import CacheReader
from distill.config import TrainConfig
from distill.pipeline.teacher.model import TeacherSource
from distill.pipeline.train import signals
from distill.pipeline.train.signals import CachedTeacher, LiveTeacher, live_teacher_source, signal_fields


@pytest.fixture(scope="module")
def reader(train_assets) -> CacheReader:
    return CacheReader(str(train_assets["store"]))


def live(train_assets, reader: CacheReader, need: set[str]) -> LiveTeacher:
    fields = signal_fields(reader.layout, need)
    return LiveTeacher(TeacherSource(str(train_assets["teacher"])), reader, torch.device("cpu"), fields)


def test_the_live_teacher_computes_only_the_fields_its_terms_read(train_assets, reader, monkeypatch, single_thread):
    asked = []
    original = signals.compute_batch_fields
    monkeypatch.setattr(
        signals, "compute_batch_fields", lambda *a, **k: (asked.append(a[4]), original(*a, **k))[1]
    )  # a[4]: the fields asked for
    teacher = live(train_assets, reader, {"kd"})
    rows = reader.row_ids[:2]
    sig = teacher.read(rows)
    assert set(asked[0]) == {"topk_ids", "topk_logits", "lse"}  # the store's kind (topk-fp16) and lse, no more
    assert sig.hidden is None and sig.attn is None and sig.vocab_proj is None
    cached = CachedTeacher(reader, signal_fields(reader.layout, {"kd"})).read(rows)
    assert torch.equal(sig.topk_ids, cached.topk_ids) and torch.equal(sig.length, cached.length)
    assert torch.allclose(sig.topk_logits.float(), cached.topk_logits.float(), atol=1e-2)
    assert torch.allclose(sig.lse, cached.lse, atol=1e-4)


def test_a_row_with_non_finite_teacher_output_is_blanked_as_cache_teacher_stores_it(
    train_assets, reader, monkeypatch, capsys, single_thread
):
    original = signals.compute_batch_fields

    def first_row_overflows(*args, **kwargs):
        arrays, _ = original(*args, **kwargs)
        return arrays, [0]

    monkeypatch.setattr(signals, "compute_batch_fields", first_row_overflows)
    teacher = live(train_assets, reader, {"kd", "hidden"})
    rows = reader.row_ids[:2]
    sig = teacher.read(rows)
    assert teacher.nonfinite_rows == [int(rows[0])]
    assert int(sig.length[0]) == 0 and int(sig.length[1]) > 0
    assert not sig.topk_logits[0].any() and sig.topk_logits[1].any()
    assert all(not h[0].any() for h in sig.hidden.values())
    assert "not finite" in capsys.readouterr().err


def test_the_live_teacher_loads_with_the_stores_revision_and_the_remote_code_flag():
    manifest = {"teacher": {"name_or_path": "org/teacher", "revision": "abc123"}}
    same = live_teacher_source(TrainConfig(live_teacher="org/teacher", trust_remote_code=True), manifest)
    assert (same.name, same.revision, same.trust_remote_code, same.flag) == (
        "org/teacher",
        "abc123",
        True,
        "--live-teacher",
    )
    other = live_teacher_source(TrainConfig(live_teacher="local/dir"), manifest)
    assert other.revision is None and other.trust_remote_code is False
    pinned = live_teacher_source(TrainConfig(live_teacher="org/teacher", live_teacher_revision="main"), manifest)
    assert pinned.revision == "main"
