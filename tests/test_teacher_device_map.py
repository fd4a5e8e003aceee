"""--device-map: the teacher loaded through accelerate's device map stores what a plain load stores.

Here on the CPU only (accelerate maps every module to it); spreading over several GPUs runs the same code with
the outputs gathered on the output head's GPU ([device-map note] in teacher/model.py)."""

from __future__ import annotations

import pytest

from distill.config import CacheConfig, ConfigError
from tests.helpers import assert_stores_equal, cache_args, invoke

pytest.importorskip("accelerate")

SMALL = dict(max_rows=16, num_shards=1)


def test_a_device_mapped_teacher_stores_the_same_fields(tiny_assets, tmp_path, single_thread):
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    first = invoke("cache-teacher", *cache_args(tiny_assets, plain, **SMALL))
    assert first.exit_code == 0, first.output
    second = invoke("cache-teacher", *cache_args(tiny_assets, mapped, device_map="auto", **SMALL))
    assert second.exit_code == 0, second.output
    assert "device_map: auto" in second.stderr  # the printed config
    assert_stores_equal(mapped, plain)


def test_on_one_device_the_map_places_every_module_there(tiny_assets):
    import torch

    from distill.pipeline.teacher.model import TeacherSource, load_teacher, output_device

    cfg = CacheConfig(teacher=str(tiny_assets["teacher"]), device_map="auto")
    model = load_teacher(TeacherSource.of(cfg), torch.device("cpu"), torch.float32, need_attention=True)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and output_device(model) == torch.device("cpu")
    assert getattr(model, "hf_device_map", None) is None  # one device: transformers dispatches nothing


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(device_map="gpu"), "--device-map must be one of auto, balanced, sequential"),
        (dict(device_map="auto", device="cuda:1"), "leave --device at auto"),
    ],
)
def test_bad_device_map_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        CacheConfig(**settings)


def test_device_map_under_torchrun_is_refused(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("cache-teacher", *cache_args(tiny_assets, tmp_path / "s", device_map="auto", **SMALL))
    assert result.exit_code == 2
    assert "error: --device-map auto spreads one teacher over all the GPUs of a machine" in result.stderr
    assert not (tmp_path / "s").exists()
