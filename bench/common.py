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

# The reference pair (DESIGN.md): huihui-ai/Huihui-MoE-1B-A0.6B -> HuggingFaceTB/SmolLM-135M.
TEACHER_VOCAB = 151_936
STUDENT_VOCAB = 49_152


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
    """A jsonl corpus and two different byte-level BPE tokenizers trained on it (teacher 1024, student 512)."""
    from distill.pipeline.demo import generate_corpus, train_tokenizer, write_jsonl

    texts = long_documents(num_docs, docs_per_document)
    data = write_jsonl(texts, root / "data.jsonl")
    training = generate_corpus(600, seed=0)
    train_tokenizer(training, 1024, root / "teacher_tok")
    train_tokenizer(training, 512, root / "student_tok")
    return {"data": data, "teacher_tok": root / "teacher_tok", "student_tok": root / "student_tok"}


def build_teacher(
    root: Path, tokenizer_dir: Path, vocab: int, hidden: int, layers: int, experts: int = 4, **overrides: Any
) -> Path:
    """A random-init Qwen3-MoE teacher (the reference family) with the given vocabulary, saved with its tokenizer."""
    from transformers import AutoTokenizer

    from distill.pipeline.demo import build_model, teacher_config

    out = root / "teacher"
    settings = {"max_position_embeddings": 4096, **overrides}
    config = teacher_config(vocab, hidden=hidden, layers=layers, experts=experts, **settings)
    build_model(config, out, AutoTokenizer.from_pretrained(tokenizer_dir), seed=0)
    return out


def build_student(root: Path, tokenizer_dir: Path, vocab: int, hidden: int, layers: int, **overrides: Any) -> Path:
    """A random-init Llama student (the reference family, tied embeddings), saved with its tokenizer."""
    from transformers import AutoTokenizer

    from distill.pipeline.demo import build_model, student_config

    out = root / "student"
    config = student_config(vocab, hidden=hidden, layers=layers, **{"max_position_embeddings": 4096, **overrides})
    build_model(config, out, AutoTokenizer.from_pretrained(tokenizer_dir), seed=0)
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
