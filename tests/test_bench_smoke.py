"""The bench scripts run end to end (--quick) and end with one JSON line holding their keys.

Times are never asserted here (the machines are noisy): only that each script works and reports.
About 45 s on 2 cores in all, hence the slow tier (`make test-slow`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

KEYS = {
    "stage1.py": {
        "cache_over_forward",
        "cache_over_teacher_forward",
        "fill_over_forward",
        "fields_over_forward",
        "marginal_over_forward",
        "tokens_per_s",
        "settings",
        "sizes",
    },
    "stage2.py": {
        "kd_over_ce",
        "all_over_ce",
        "prefix_over_tail",
        "live_over_cache",
        "kd_mem_over_ce",
        "mem_cache_over_live",
        "tokens_per_s",
        "peak_mem_bytes",
        "settings",
        "sizes",
    },
    "cache_size.py": {"logits_over_naive", "values_exact_fp16", "bytes_per_token", "total_bytes_per_token", "sizes"},
}
RATIOS = {
    "stage1.py": ["cache_over_forward", "cache_over_teacher_forward", "fill_over_forward", "fields_over_forward"],
    "stage2.py": [
        "kd_over_ce",
        "all_over_ce",
        "prefix_over_tail",
        "live_over_cache",
        "kd_mem_over_ce",
        "mem_cache_over_live",
    ],
    "cache_size.py": ["logits_over_naive"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(KEYS))
def test_quick_run_ends_with_a_json_line(script):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) >= 2, proc.stdout  # a human summary, then the JSON
    result = json.loads(lines[-1])
    assert KEYS[script] <= set(result), sorted(KEYS[script] - set(result))
    for key in RATIOS[script]:
        assert isinstance(result[key], float) and result[key] > 0, (key, result[key])
    assert result["quick"] is True
    if script == "stage1.py":
        assert set(result["marginal_over_forward"]) == {"hidden", "vocab_proj", "attention", "logits"}
        from distill.config import CacheConfig

        default = CacheConfig()
        assert (result["settings"]["packing"], result["settings"]["targets"]) == (default.packing, default.targets)
    if script == "stage2.py":
        assert set(result["tokens_per_s"]) == {"ce", "kd", "all", "kd_tail", "live"}
        from distill.config import TrainConfig

        default = TrainConfig()  # the figures are measured at the tool's defaults, not restated ones
        assert result["settings"]["kd"]["kd_mode"] == default.kd_mode
        assert result["settings"]["kd"]["temperature"] == default.temperature
        assert result["settings"]["kd_tail"]["kd_mode"] == "tail"
        sizes = result["sizes"]
        assert sizes["teacher"]["vocab_size"] == 151_936 and sizes["student"]["vocab_size"] == 49_152
        assert 0.9 < result["student_tokens_per_teacher_token"] < 1.2
    if script == "cache_size.py":
        assert result["values_exact_fp16"] is True and result["positions_checked"] > 0
