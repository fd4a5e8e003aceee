"""On-policy top-up: ``distill rollout`` (deterministic, resumable), its provenance and prompt boundaries through
``cache-teacher``, continuation-only targets, several stores mixed by weight, and the whole loop through the CLI:
train -> rollout -> cache-teacher -> train --resume with both stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.pipeline.text.align import AlignedBatch, restrict_to_continuation
from distill.pipeline.train.mixing import MixedRowOrder, RowOrder, decode_rows
from tests.helpers import cache_args, invoke, read_metrics, run_train, train_args


def rollout_args(student: Path, dataset: Path, out: Path, **extra: object) -> list[str]:
    settings = {"num-prompts": 5, "prompt-chars": 30, "max-new-tokens": 8, "batch-size": 2, "seed": 3, **extra}
    args = ["rollout", "--student", student, "--dataset", dataset, "--out", out]
    for key, value in settings.items():
        args += [f"--{key}", value]
    return args


def rollout(*args: object) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def one_line_error(result, *needles: str) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert all(n in errors[0] for n in needles), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def rollout_file(train_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rollout") / "r.jsonl"
    rollout(*rollout_args(train_assets["student"], train_assets["data"], out))
    return out


# --- distill rollout ------------------------------------------------------------------------


def test_rollout_writes_prompt_boundary_identity_and_settings(train_assets, rollout_file):
    lines = [json.loads(line) for line in rollout_file.read_text().splitlines()]
    texts = train_assets["texts"]
    assert [r["prompt_index"] for r in lines] == [0, 1, 2, 3, 4]
    for record in lines:
        prompt = record["text"][: record["prompt_chars"]]
        assert 0 < record["prompt_chars"] <= 30 and texts[record["source_document"]].startswith(prompt)
        assert record["text"] != prompt  # the student wrote something after it
    provenance = lines[0]["rollout"]
    assert all(r["rollout"] == provenance for r in lines)
    assert provenance["student"]["path"] == str(Path(train_assets["student"]).resolve())
    assert provenance["student"]["step"] is None and len(provenance["student"]["weights_sha256"]) == 64
    assert provenance["sampling"] == {
        "prompt_chars": 30, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0, "seed": 3, "batch_size": 2
    }  # fmt: skip


def test_rollout_is_deterministic_and_a_resumed_run_equals_an_uninterrupted_one(train_assets, rollout_file, tmp_path):
    student, data = train_assets["student"], train_assets["data"]
    again = tmp_path / "again.jsonl"
    rollout(*rollout_args(student, data, again))
    assert again.read_bytes() == rollout_file.read_bytes()
    grown = tmp_path / "grown.jsonl"  # 3 prompts, then 5: the first 3 kept, 2 appended
    rollout(*rollout_args(student, data, grown, **{"num-prompts": 3}))
    output = rollout(*rollout_args(student, data, grown))
    assert "2 prompts written, 3 kept" in output and grown.read_bytes() == rollout_file.read_bytes()
    torn = tmp_path / "torn.jsonl"  # killed while writing line 4 (mid-batch): the torn line goes, the batch is redone
    lines = rollout_file.read_text().splitlines(keepends=True)
    torn.write_text("".join(lines[:3]) + lines[3][:25])
    output = rollout(*rollout_args(student, data, torn))
    assert "2 prompts written, 3 kept" in output and torn.read_bytes() == rollout_file.read_bytes()
    other = rollout_args(student, data, torn, temperature=0.5)
    one_line_error(invoke(*other), f"--out {torn} holds rollouts", "sampling.temperature")
    greedy = tmp_path / "greedy.jsonl"
    rollout(*rollout_args(student, data, greedy, temperature=0))
    assert greedy.read_text() != rollout_file.read_text()


# --- the teacher scores it once -------------------------------------------------------------


@pytest.fixture(scope="module")
def rollout_store(train_assets, rollout_file, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("rollout_store") / "store"
    result = invoke("cache-teacher", *cache_args({**train_assets, "data": rollout_file}, store, packing="none"))
    assert result.exit_code == 0, result.output
    return store


def test_cache_teacher_keeps_the_provenance_and_each_rows_prompt_boundary(rollout_file, rollout_store):
    from distill.cache.reader import CacheReader

    reader = CacheReader(str(rollout_store))
    rollout_record = reader.manifest["dataset"]["rollout"]
    lines = [json.loads(line) for line in rollout_file.read_text().splitlines()]
    assert {k: rollout_record[k] for k in ("student", "sampling", "prompts")} == lines[0]["rollout"]
    rows = reader.read_rows(reader.row_ids, ["text", "doc_id"])
    context = rollout_record["context_chars"]
    assert len(context) == reader.num_rows
    for row, (text, doc) in enumerate(zip(rows["text"], rows["doc_id"].tolist())):
        record = lines[doc]
        if record["text"].startswith(text):  # the document's first piece: its prompt, cut to the piece
            assert context[row] == [min(record["prompt_chars"], len(text))]
        else:  # a later piece of a long document: all continuation
            assert context[row] == [0]


# --- continuation-only targets: hand-computed cases -----------------------------------------


def aligned_by_hand(student_offsets: list[list[tuple[int, int]]], pairs: list[tuple[int, int, int]], segments=None):
    width = max(len(o) for o in student_offsets)
    b, tp, sp = (torch.tensor([p[i] for p in pairs], dtype=torch.int64) for i in range(3))
    mask = torch.tensor([[1] * len(o) + [0] * (width - len(o)) for o in student_offsets])
    return AlignedBatch(
        torch.zeros_like(mask), mask, b, tp, sp, 1.0, [np.array(o) for o in student_offsets], 1,
        torch.zeros(len(student_offsets), dtype=torch.int64), segments,
    )  # fmt: skip


def test_continuation_only_drops_the_prompts_targets_and_keeps_the_first_continuation_prediction():
    # text "abcdef", prompt "abc": teacher BOS|ab|c|def, student BOS|a|bc|d|ef; pairs at ends 3 and 6
    teacher = torch.tensor([[[0, 0], [0, 2], [2, 3], [3, 6]]])
    aligned = aligned_by_hand([[(0, 0), (0, 1), (1, 3), (3, 4), (4, 6)]], [(0, 2, 2), (0, 3, 4)])
    kept = restrict_to_continuation(aligned, teacher, torch.tensor([4]), None, [[3]])
    assert kept.teacher_pos.tolist() == [2, 3]  # end 3 has read exactly the prompt: it predicts "d"
    assert kept.target_mask[0].tolist() == [False, False, True, True, True]
    kept = restrict_to_continuation(aligned, teacher, torch.tensor([4]), None, [[4]])
    assert kept.teacher_pos.tolist() == [3] and kept.target_mask[0].tolist() == [False, False, False, True, True]
    kept = restrict_to_continuation(aligned, teacher, torch.tensor([4]), None, [[0]])
    assert kept.teacher_pos.tolist() == [2, 3] and kept.target_mask[0].all()


def test_continuation_only_in_a_packed_row_uses_each_documents_own_prompt():
    # documents "abc" (prompt "a") and "def" (prompt "d") packed: teacher BOS|ab|c|BOS|de|f, student BOS|a|bc|BOS|d|ef
    teacher = torch.tensor([[[0, 0], [0, 2], [2, 3], [0, 0], [3, 5], [5, 6]]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1]])
    aligned = aligned_by_hand(
        [[(0, 0), (0, 1), (1, 3), (0, 0), (3, 4), (4, 6)]], [(0, 2, 2), (0, 5, 5)], segments=segments.clone()
    )
    kept = restrict_to_continuation(aligned, teacher, torch.tensor([6]), segments, [[1, 1]])
    assert kept.teacher_pos.tolist() == [2, 5]
    assert kept.target_mask[0].tolist() == [False, True, True, False, True, True]
    kept = restrict_to_continuation(aligned, teacher, torch.tensor([6]), segments, [[3, 0]])  # first all prompt
    assert kept.teacher_pos.tolist() == [2, 5] and kept.target_mask[0].tolist() == [False] * 2 + [True] * 4


# --- several stores mixed by weight ---------------------------------------------------------


def test_mixed_rows_hold_each_stores_share_in_every_batch_and_resume_exactly():
    rows = [np.arange(50), np.arange(7)]
    order = MixedRowOrder(rows, [0.7, 0.3], seed=1)
    batches = [np.asarray(order.take(10)) for _ in range(6)]
    for batch in batches:
        stores, local = decode_rows(batch)
        assert abs((stores == 1).sum() - 3) <= 1 and local.max() < 50 and local[stores == 1].max() < 7
    assert (decode_rows(np.concatenate(batches))[0] == 1).sum() == 18  # exactly 30% of 60 rows
    halfway = MixedRowOrder(rows, [0.7, 0.3], seed=1)
    for _ in range(3):
        halfway.take(10)
    resumed = MixedRowOrder(rows, [0.7, 0.3], seed=1, cursor=json.loads(json.dumps(halfway.cursor)))
    assert np.array_equal(np.concatenate([resumed.take(10) for _ in range(3)]), np.concatenate(batches[3:]))
    single = RowOrder(rows[0], [1])  # a single-store run: store 0 continues its own order when a store is added
    single.take(12)
    added = MixedRowOrder(rows, [0.5, 0.5], seed=1, cursor=single.cursor)
    first = [r for r in added.take(10) if r < 50]
    assert first == RowOrder(rows[0], [1], single.cursor).take(len(first))


def store_with_other_manifest(store: Path, dest: Path, change) -> Path:
    shutil.copytree(store, dest)
    meta = json.loads((dest / "zarr.json").read_text())
    change(meta["attributes"]["distill"])
    (dest / "zarr.json").write_text(json.dumps(meta))
    return dest


def test_stores_of_another_teacher_or_layout_are_refused_in_one_line(train_assets, rollout_store, tmp_path):
    other = store_with_other_manifest(
        rollout_store, tmp_path / "other_tok", lambda m: m["tokenizer"].update(sha256="0" * 64)
    )
    args = train_args(train_assets, tmp_path / "run", objective="kd-only", verify_cache="off")  # verify: "not sound"
    refused = invoke("train", *args, "--cache", other, "--max-steps", 1)
    one_line_error(refused, f"--cache {other}", "another teacher tokenizer", f"--cache {train_assets['store']}")
    refused = invoke("train", *args, "--cache", rollout_store, "--cache-weights", "1,2,3", "--max-steps", 1)
    one_line_error(refused, "--cache-weights 1,2,3", "one weight per --cache")
    refused = invoke("train", *train_args(train_assets, tmp_path / "run2"), "--cache", rollout_store, "--max-steps", 1)
    one_line_error(refused, f"--cache {rollout_store}", "hidden-state statistics", "--objective kd-only")


# --- the whole loop through the CLI ---------------------------------------------------------


def test_train_rollout_score_and_continue_with_both_stores(train_assets, tmp_path):
    out = tmp_path / "run"
    settings = dict(objective="kd-only", checkpoint_last="true", final="last")
    run_train(train_args(train_assets, out, **settings), steps=2)
    rollouts = tmp_path / "r1.jsonl"
    rollout(*rollout_args(out, train_assets["store"], rollouts, **{"num-prompts": 4}))
    provenance = json.loads(rollouts.read_text().splitlines()[0])["rollout"]["student"]
    assert provenance["run"] == str(out.resolve()) and provenance["step"] == 2
    store = tmp_path / "r1"
    result = invoke("cache-teacher", *cache_args({**train_assets, "data": rollouts}, store))
    assert result.exit_code == 0, result.output
    both = [*train_args(train_assets, out, **settings), "--cache", store, "--cache-weights", "0.5,0.5"]
    swapped = [*train_args({**train_assets, "store": store}, out, **settings), "--cache", train_assets["store"]]
    refused = invoke("train", *swapped, "--max-steps", 4, "--resume", "auto")
    one_line_error(refused, f"--cache {store}", "another store", f"--cache {train_assets['store']}")
    result = run_train(both, steps=4, log_every=1, extra=("--resume", "auto"))
    added = [line for line in result.output.splitlines() if "store(s) added" in line]
    assert len(added) == 1 and f"{store} (rollouts of {out.resolve()} step 2" in added[0], result.output
    assert "resumed from" in result.output and "step_000002" in result.output
    assert [r["step"] for r in read_metrics(out) if r["split"] == "train"] == [1, 2, 3, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["cache"] == [str(train_assets["store"]), str(store)]
    assert [m["dataset"].get("rollout", {}).get("student", {}).get("step") for m in config["cache_manifests"]] == [
        None, 2
    ]  # fmt: skip
    meta = json.loads((out / "checkpoints" / "step_000004" / "meta.json").read_text())
    assert meta["cursor"]["taken"] == [4, 4] and meta["cursor"]["weights"] == [0.5, 0.5]
    assert json.loads((out / "final" / "final.json").read_text())["step"] == 4
