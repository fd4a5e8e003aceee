"""Shared fixtures: offline HF settings and tiny assets built, saved and reloaded like real ones. Helper
functions (CLI arguments, running the CLI) are in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.helpers import cache_args

_HF_HOME = tempfile.mkdtemp(prefix="distill-hf-")
os.environ.update(
    HF_HUB_OFFLINE="1",
    HF_DATASETS_OFFLINE="1",
    HF_HOME=_HF_HOME,
    TOKENIZERS_PARALLELISM="false",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    TRANSFORMERS_VERBOSITY="error",
)

SPECIAL_TEXTS = [
    "Le café est très naïve, déjà vu à Zürich — ça coûte 3,50 €.",
    "日本語の文章と中文句子混在。東京タワー！",
    "Emoji test 👍🏽 🧪 🤖 and a family 👨‍👩‍👧 at the end 🎉",
    "",
    "Short one.",
]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """A corpus with accents, CJK, emoji, a long and an empty document; a BPE tokenizer; a tiny Qwen3-MoE teacher."""
    from distill.pipeline.demo import build_model, generate_corpus, teacher_config, train_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("assets")
    corpus = generate_corpus(120, seed=1)
    long_doc = " ".join(corpus[:12])  # several rows' worth of tokens
    texts = SPECIAL_TEXTS + [long_doc] + corpus[12:60]
    data = write_jsonl(texts, root / "data.jsonl")
    tokenizer = train_tokenizer(corpus + SPECIAL_TEXTS, 400, root / "tokenizer")
    teacher = root / "teacher"
    build_model(teacher_config(len(tokenizer), hidden=64, layers=2, experts=4), teacher, tokenizer, seed=0)
    return {"root": root, "data": data, "teacher": teacher, "tokenizer": root / "tokenizer", "texts": texts}


@pytest.fixture
def single_thread():
    """Tiny tensors: one intra-op thread is faster, and immune to a busy machine's oversubscription."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def train_assets(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """A complete store on the tiny assets, a student with another tokenizer and one sharing the teacher's."""
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from distill.cli import app
    from distill.pipeline.demo import build_model, generate_corpus, student_config, train_tokenizer

    root = tmp_path_factory.mktemp("train")
    store = root / "store"
    result = CliRunner().invoke(app, ["cache-teacher", *cache_args(tiny_assets, store)])
    assert result.exit_code == 0, result.output
    student_tok = train_tokenizer(generate_corpus(120, seed=1) + SPECIAL_TEXTS, 300, root / "student_tok")
    student = root / "student"
    build_model(student_config(len(student_tok), hidden=32, layers=3), student, student_tok, seed=0)
    teacher_tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    same = root / "student_same_tok"
    build_model(student_config(len(teacher_tok), hidden=32, layers=3), same, teacher_tok, seed=0)
    return {"store": store, "student": student, "student_same_tok": same, **tiny_assets}


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Tokenizer pairs for alignment and vocabulary maps (test files may define their own ``tokenizers``).

    big/small: byte-level BPE, vocab 1000/300, same corpus; sp: SentencePiece-style 1000; untrimmed offsets 600."""
    from tests.tokenizer_utils import save_and_reload, train_byte_level_tokenizer, train_sentencepiece_style_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "big": save_and_reload(train_byte_level_tokenizer(1000), root / "big"),
        "small": save_and_reload(train_byte_level_tokenizer(300), root / "small"),
        "sp": save_and_reload(train_sentencepiece_style_tokenizer(1000), root / "sp"),
        "untrimmed": save_and_reload(train_byte_level_tokenizer(600, trim_offsets=False), root / "untrimmed"),
    }
