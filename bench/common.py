"""Shared helpers of the bench scripts: offline settings, assets at the reference vocabularies, memory, output.

Every bench prints a short human summary and, as its LAST line, one JSON object (``emit``).
Figures are ratios of things measured in the same run: the machines are noisy, absolute
times are reported for context only.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

# The reference pair (DESIGN.md): huihui-ai/Huihui-MoE-1B-A0.6B -> HuggingFaceTB/SmolLM-135M, as
# transformers config fields. The teacher's shape is that of its published GGUF metadata (qwen3moe:
# 28 blocks, 16/8 heads of 128, 3 experts of 3,072 with 1 used per token: ~0.44B active parameters in
# the blocks + a 0.16B lm_head, "A0.6B"); the student's is SmolLM-135M's config.
REFERENCE_TEACHER: dict[str, Any] = dict(
    vocab_size=151_936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, num_local_experts=3, num_experts_per_tok=1, moe_intermediate_size=3072, intermediate_size=3072,
)  # fmt: skip
REFERENCE_STUDENT: dict[str, Any] = dict(
    vocab_size=49_152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, intermediate_size=1536,
)  # fmt: skip
TEACHER_VOCAB = REFERENCE_TEACHER["vocab_size"]
STUDENT_VOCAB = REFERENCE_STUDENT["vocab_size"]
WIDTHS = ("hidden_size", "head_dim", "intermediate_size", "moe_intermediate_size")


def narrowed(config: dict[str, Any], factor: int, **changes: Any) -> dict[str, Any]:
    """``config`` with every width (hidden, head, MLP, expert) divided by ``factor``; counts, vocabulary kept.

    Dividing every width by the same factor keeps the pair's proportions (teacher/student width,
    depth, heads, experts); the body's multiply-adds shrink by factor², the vocabulary-sized
    products (lm_head, vocab_proj, projector) only by factor.
    """
    out = {key: value // factor if key in WIDTHS else value for key, value in config.items()}
    return {**out, **changes}


def describe(config: dict[str, Any]) -> str:
    """One line: the shape of a model config, for the bench summaries."""
    keys = {
        "vocab_size": "vocab",
        "hidden_size": "hidden",
        "num_hidden_layers": "blocks",
        "num_attention_heads": "heads",
        "num_key_value_heads": "kv",
        "head_dim": "head_dim",
        "intermediate_size": "mlp",
        "num_local_experts": "experts",
        "num_experts_per_tok": "used",
        "moe_intermediate_size": "expert_mlp",
    }
    return " ".join(f"{short}={config[key]}" for key, short in keys.items() if key in config)


def offline_env() -> None:
    """No network, no progress bars, quiet transformers (set before importing transformers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="distill-bench-hf-"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def long_documents(num_docs: int, docs_per_document: int = 8, seed: int = 0) -> list[str]:
    """Documents of several generated ones joined, so that rows of a few hundred tokens are full (not padded)."""
    from distill.pipeline.demo import generate_corpus

    parts = generate_corpus(num_docs * docs_per_document, seed=seed)
    return [" ".join(parts[i : i + docs_per_document]) for i in range(0, len(parts), docs_per_document)]


def build_corpus_and_tokenizers(root: Path, num_docs: int, docs_per_document: int = 8) -> dict[str, Path]:
    """A jsonl corpus and two different byte-level BPE tokenizers trained on it.

    The two cut the corpus into about as many tokens (student ~1.04 per teacher token) but at
    different places (~3% of the student's token ends are not teacher token ends). The reference
    pair's real tokenizers make 1.06 SmolLM2 tokens per Qwen3 token on real English text and share
    89% of the student's token ends (``bench/tokenizer_pair.py``; ``real_corpus_and_tokenizers``
    uses them). The stage-2 step time scales with the student's tokens and the live teacher's cost
    with the teacher's, so this ratio matters; the bench reports it (``student_tokens_per_teacher_token``).
    """
    from distill.pipeline.demo import generate_corpus, train_tokenizer, write_jsonl

    texts = long_documents(num_docs, docs_per_document)
    data = write_jsonl(texts, root / "data.jsonl")
    train_tokenizer(generate_corpus(600, seed=0), 1024, root / "teacher_tok")
    train_tokenizer(generate_corpus(600, seed=1), 560, root / "student_tok")
    return {"data": data, "teacher_tok": root / "teacher_tok", "student_tok": root / "student_tok"}


def real_cache() -> Path:
    """The real assets of the `real` test tier (``python -m tests.real.assets`` fetches them)."""
    return Path(os.environ.get("DISTILL_REAL_CACHE", "~/.cache/distill-real")).expanduser()


def real_corpus_and_tokenizers(root: Path, min_chars: int) -> dict[str, Path]:
    """Real text and the reference pair's real tokenizers (Qwen3 for the teacher, SmolLM2's for the student).

    The text is CPython's ``pydoc_data`` topics (the real tier's text, tests/real/assets.py) in name order,
    joined into documents of at least ``min_chars`` characters so that rows are full. The tokenizer folders
    are those of the real cache (``real_cache()``); the models built on them stay random-init.
    """
    from pydoc_data.topics import topics

    from distill.pipeline.demo import write_jsonl

    teacher_tok, student_tok = real_cache() / "qwen3-tokenizer", real_cache() / "smollm2-135m"
    for folder in (teacher_tok, student_tok):
        if not (folder / "tokenizer.json").is_file():
            raise SystemExit(f"{folder} is missing: fetch the real assets with `python -m tests.real.assets`")
    documents, current = [], ""
    for name in sorted(topics):
        current = f"{current}\n\n{topics[name]}" if current else topics[name]
        if len(current) >= min_chars:
            documents.append(current)
            current = ""
    data = write_jsonl(documents, root / "data.jsonl")
    return {"data": data, "teacher_tok": teacher_tok, "student_tok": student_tok}


def build_teacher(root: Path, tokenizer_dir: Path, config: dict[str, Any]) -> Path:
    """A random-init Qwen3-MoE teacher (the reference family) of the given shape, saved with its tokenizer."""
    from transformers import AutoTokenizer

    from distill.pipeline.demo import build_model, teacher_config

    out = root / "teacher"
    shape = {"max_position_embeddings": 4096, **config}
    build_model(teacher_config(**shape), out, AutoTokenizer.from_pretrained(tokenizer_dir), seed=0)
    return out


def build_student(root: Path, tokenizer_dir: Path, config: dict[str, Any]) -> Path:
    """A random-init Llama student (the reference family, tied embeddings) of the given shape, with its tokenizer."""
    from transformers import AutoTokenizer

    from distill.pipeline.demo import build_model, student_config

    out = root / "student"
    shape = {"max_position_embeddings": 4096, **config}
    build_model(student_config(**shape), out, AutoTokenizer.from_pretrained(tokenizer_dir), seed=0)
    return out


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kb("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process (since start or the last ``reset_peak_rss``)."""
    return _status_kb("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def emit(result: dict[str, Any]) -> None:
    """The bench's machine-readable result: one JSON object on the last line of stdout."""
    print(json.dumps(result, sort_keys=True), flush=True)
