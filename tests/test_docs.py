"""Every ```python snippet of README.md and docs/*.md runs on a real store, and what its comments claim holds.

A new snippet fails ``test_every_snippet_is_run`` until it gets a setup here (the names it reads)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from distill.cache.reader import CacheReader
from tests.helpers import REPO, cache_args, invoke

FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_snippets() -> dict[str, str]:
    """``{"docs/cache-format.md:230": code}`` for every python block (the line of its fence)."""
    found = {}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            found[f"{path.relative_to(REPO)}:{text[: match.start()].count(chr(10)) + 1}"] = match.group(1)
    return found


def snippet(start: str) -> str:
    """The one snippet whose code starts with ``start``."""
    matches = [code for code in python_snippets().values() if code.startswith(start)]
    assert len(matches) == 1, f"{len(matches)} snippets start with {start!r}"
    return matches[0]


STARTS = {  # the first line of each snippet -> the test that runs it
    "p_topk = np.exp(": "test_recovering_top_k_probabilities",
    'seg = shard["segment_ids"]': "test_segment_bounds_of_a_packed_row",
    "import numpy as np, zarr": "test_reading_a_row_with_plain_zarr",
    "import json, h5py": "test_reading_an_exported_file_with_h5py",
}


def test_every_snippet_is_run():
    for where, code in python_snippets().items():
        assert any(code.startswith(s) for s in STARTS), f"{where}: a python snippet no test runs — add it to STARTS"


@pytest.fixture(scope="module")
def topk_store(tiny_assets, tmp_path_factory) -> Path:
    """A small store with the default compact targets (--targets topk), exported to HDF5 beside it."""
    out = tmp_path_factory.mktemp("docs") / "store"
    result = invoke("cache-teacher", *cache_args(tiny_assets, out, targets="topk", max_rows=16, vocab_proj=None))
    assert result.exit_code == 0, result.output
    exported = invoke("cache", "export", out, out.with_suffix(".h5"))
    assert exported.exit_code == 0, exported.output
    return out


def shard_of(store: Path):
    import zarr

    return zarr.open_group(str(store), mode="r")["shards/00000"]


def test_recovering_top_k_probabilities(train_assets):
    shard = shard_of(train_assets["store"])
    n = int(shard["length"][0])
    given = {"np": np, "T": 1.0, "j": 0, "logsumexp": lambda x, axis: np.logaddexp.reduce(x, axis=axis)}
    given |= {"topk_logits": shard["topk_logits"][0, :n], "lse": shard["lse"][0, :n]}
    exec(snippet("p_topk = np.exp("), given)
    np.testing.assert_allclose(given["p_topk"].sum(-1) + given["tail"], 1.0, atol=2e-3)  # its comment's claim


def test_segment_bounds_of_a_packed_row(train_assets):
    shard = shard_of(train_assets["store"])
    r = int(np.argmax(shard["segment_ids"][:].max(axis=1)))  # a row holding several documents
    n = int(shard["length"][r])
    given = {"np": np, "shard": shard, "r": r, "n": n}
    exec(snippet('seg = shard["segment_ids"]'), given)
    bounds = given["bounds"]
    assert len(bounds) > 1 and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(bounds, bounds[1:]))  # contiguous tokens and text


def test_reading_a_row_with_plain_zarr(topk_store):
    given: dict = {}
    exec(snippet("import numpy as np, zarr").replace('"STORE"', repr(str(topk_store))), given)
    p, k = given["p"], given["k"]
    assert p.shape[0] == given["n"] and np.all(p <= 1 + 1e-6)
    decoded = CacheReader(str(topk_store)).read_rows([0], ["topk_ids"])["topk_ids"][0].numpy()  # (L, S)
    for t in range(given["n"]):  # the snippet's ids are distill's (in rank order, not logit order)
        assert sorted(given["ids"][t, : k[t]]) == sorted(decoded[t][decoded[t] >= 0])
    head = np.arange(p.shape[1])[None, :] < k[:, None]  # the used slots
    assert np.all(np.where(head, p, 0).sum(-1) <= 1 + 1e-3)


def test_reading_an_exported_file_with_h5py(topk_store):
    given: dict = {}
    exec(snippet("import json, h5py").replace('"wt103.h5"', repr(str(topk_store.with_suffix(".h5")))), given)
    assert given["manifest"]["layout"]["targets"]["kind"] == "topk" and isinstance(given["text"], str)
