"""The real assets: converted checkpoints equal their GGUFs and know English; the Qwen3 tokenizer; the text split."""

from __future__ import annotations

import json
import math

import pytest

pytestmark = pytest.mark.real

PROMPT = "The capital of France is"


def load_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def text_bits_per_byte(model_dir, texts: list[str], max_tokens: int = 128) -> float:
    """Bits per byte of the first ``max_tokens`` tokens of each text, tokenized the model's own way.

    The scored bytes are those of the predicted tokens (every text token after a BOS; all but the first
    without one), read from the tokenizer's offsets.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll = 0.0
    scored_bytes = 0
    for text in texts:
        enc = tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=max_tokens)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        spans = enc["offset_mapping"][1:]
        start = min(s for s, e in spans if e > s)
        end = max(e for _, e in spans)
        scored_bytes += len(text[start:end].encode("utf-8"))
    return nll / (math.log(2) * scored_bytes)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_converted_folder_equals_the_gguf(real_assets, name):
    """The saved HF folder (no quantization_config) gives the logits of transformers' own GGUF load, exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = real_assets[name], real_assets[f"{name}_gguf"]
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    ids = AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        reference = loaded.eval()(ids).logits
    assert torch.equal(saved, reference)


def test_smollm2_knows_the_capital_of_france(real_assets):
    from tests.real.assets import generate_greedy

    assert "Paris" in generate_greedy(real_assets["smollm2"], PROMPT, new_tokens=4)


def test_gemma3_continues_in_english(real_assets):
    from tests.real.assets import generate_greedy

    continuation = generate_greedy(real_assets["gemma3"], PROMPT, new_tokens=8)
    words = continuation.split()
    assert len(words) >= 3 and all(word.strip(".,").isalpha() for word in words), continuation


@pytest.mark.parametrize(("name", "bound"), [("smollm2", 1.4), ("gemma3", 1.3)])
def test_models_predict_real_text(real_assets, name, bound):
    """Held-out pydoc text, each model with its own special tokens: ~1 bit per byte (a random model: ~15)."""
    texts = [row["text"] for row in load_jsonl(real_assets["validation"])[:4]]
    assert text_bits_per_byte(real_assets[name], texts) < bound


def test_qwen3_tokenizer_loads_both_ways(real_assets):
    """tokenizer.json alone (PreTrainedTokenizerFast) and the folder (AutoTokenizer) encode alike, with no BOS."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from distill.pipeline.text.tokens import prefix_ids

    folder = real_assets["qwen3_tokenizer"]
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(folder)
    assert len(auto) == len(fast) == 151_669
    text = load_jsonl(real_assets["validation"])[0]["text"]
    ids = auto(text, add_special_tokens=False).input_ids
    assert ids == fast(text, add_special_tokens=False).input_ids
    assert auto.decode(ids) == text
    assert auto("Hello world").input_ids == [9707, 1879]  # Qwen2/Qwen3's ids for these two words
    assert prefix_ids(auto) == []


def test_text_split_is_disjoint_and_deterministic(real_assets, tmp_path):
    from pydoc_data.topics import topics

    from tests.real.assets import write_text

    train, validation = load_jsonl(real_assets["train"]), load_jsonl(real_assets["validation"])
    train_topics, validation_topics = {r["topic"] for r in train}, {r["topic"] for r in validation}
    assert not train_topics & validation_topics
    assert train_topics | validation_topics == set(topics)
    assert len(train) > len(validation) >= 8
    assert all(row["text"] == topics[row["topic"]] for row in train + validation)
    write_text(tmp_path)
    assert (tmp_path / "train.jsonl").read_bytes() == real_assets["train"].read_bytes()


def test_tokenizer_pair_bench_on_the_reference_tokenizers(real_assets):
    """bench/tokenizer_pair.py on Qwen3 -> SmolLM2: both spell the text exactly; docs/benchmarks.md's figures."""
    import subprocess
    import sys

    from tests.real.conftest import REPO

    proc = subprocess.run(
        [sys.executable, "bench/tokenizer_pair.py", "--teacher", str(real_assets["qwen3_tokenizer"])]
        + ["--student", str(real_assets["smollm2"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_reproduce_text"]
    assert result["vocab_size"] == {"teacher": 151_669, "student": 49_152}
    # A property of the two pinned tokenizers alone (not of the text): bytes-identical tokens.
    assert result["vocab_mapped_tokens"] == 39_237
    # Of the text (CPython's own topics, which change a little between versions): 1.063 on 3.11.
    assert 1.0 < result["student_tokens_per_teacher_token"] < 1.15
    assert 0.85 < result["text_tokens_mapped"] < 0.95
