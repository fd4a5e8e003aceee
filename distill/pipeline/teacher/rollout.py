"""``distill rollout``: the student writes continuations of prompts, for the teacher to score once.

    distill rollout --student runs/smol --dataset data/train.jsonl --out rollouts/smol.jsonl \
        --num-prompts 1024 --prompt-chars 256 --max-new-tokens 128 --temperature 1 --top-p 0.95 --seed 0

One JSON line per prompt (docs/cache-format.md, "Rollout files"):

    {"text": prompt + continuation, "prompt_chars": len(prompt), "prompt_index": i, "source_document": d,
     "rollout": {"student": {...}, "sampling": {...}, "prompts": {...}}}

``distill cache-teacher --dataset FILE.jsonl`` makes an ordinary store of it; its manifest keeps ``rollout`` (who
wrote the text, how) and each row's prompt boundary, so that stage 2 trains on the continuations only
(``continuation_only``). Batch k is sampled with the seed (seed, k) and written whole or not at all, so a re-run
appends only the prompts the file lacks and ends with the file an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.config import ConfigError, RolloutConfig
from distill.pipeline.text.data import DataError, load_text_dataset

# --- the student and its identity -----------------------------------------------------------


def describe_student(source: str) -> tuple[str, dict[str, Any]]:
    """The model folder to load and the student's identity: a run directory gives its final/ and final/'s step."""
    path = Path(source)
    if (path / "final").is_dir() and (path / "config.json").is_file():
        model = path / "final"
        choice = json.loads((model / "final.json").read_text()) if (model / "final.json").is_file() else {}
        identity = {"path": str(model.resolve()), "run": str(path.resolve()), "step": choice.get("step")}
    elif path.is_dir():
        model, identity = path, {"path": str(path.resolve()), "run": None, "step": None}
    elif path.is_absolute() or source.startswith("."):
        raise ConfigError(f"--student {source}: no such folder — pass a run directory, a model folder or a hub id")
    else:
        return source, {"path": source, "run": None, "step": None, "weights_sha256": None}
    weights = model / "model.safetensors"
    identity["weights_sha256"] = file_sha256(weights) if weights.is_file() else None
    return str(model), identity


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_student(model_dir: str, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--student {model_dir}: cannot load it ({str(exc).splitlines()[0]})") from None
    tokenizer.padding_side = "left"  # generation continues each prompt from its last token
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"--student {model_dir}: its tokenizer has neither a pad nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


# --- prompts --------------------------------------------------------------------------------


def load_documents(cfg: RolloutConfig) -> tuple[list[str], dict[str, Any]]:
    """The documents prompts are cut from, and what identifies them: a dataset, or a store's rows."""
    from distill.cache.store import find_manifest

    if Path(cfg.dataset).is_dir() and find_manifest(cfg.dataset) is not None:
        return read_store_documents(cfg.dataset)
    ds = load_text_dataset(cfg.dataset, cfg.dataset_config, cfg.split, cfg.text_field)
    source = {"dataset": cfg.dataset, "config": cfg.dataset_config, "split": cfg.split, "text_field": cfg.text_field}
    return [t or "" for t in ds[cfg.text_field]], {**source, "num_documents": len(ds)}


def read_store_documents(url: str) -> tuple[list[str], dict[str, Any]]:
    """Each row's first document (segment 0 of a packed row) as one document."""
    from distill.cache.reader import CacheReader

    reader = CacheReader(url)
    fields = ["text", "offsets", "length", *(["segment_ids"] if reader.packed else [])]
    data = reader.read_rows(reader.row_ids, fields)
    texts = []
    for b, text in enumerate(data["text"]):
        n = int(data["length"][b])
        ends = data["offsets"][b, :n, 1]
        if "segment_ids" in data:
            ends = ends[data["segment_ids"][b, :n] == 0]
        texts.append(text[: int(ends.max())] if len(ends) else "")
    return texts, {"store": url, "num_documents": len(texts)}


def cut_prompt(text: str, chars: int) -> str:
    """The first ``chars`` characters of ``text``, cut back to the last whitespace (and without trailing
    whitespace) when there is one, so that the continuation starts a word as the tokenizers expect."""
    head = text[: chars + 1]
    cut = max((i for i, c in enumerate(head) if c.isspace()), default=-1)
    prompt = (head[:cut] if cut > 0 else text[:chars]).rstrip()
    return prompt or text[:chars]


def choose_prompts(texts: list[str], num: int, chars: int, seed: int) -> list[tuple[int, str]]:
    """(document index, prompt) of the first ``num`` non-blank documents of a seeded shuffle: a larger ``num`` keeps
    the first ones."""
    chosen = []
    for doc in np.random.default_rng(seed).permutation(len(texts)).tolist():
        if texts[doc].strip():
            chosen.append((doc, cut_prompt(texts[doc], chars)))
            if len(chosen) == num:
                break
    if not chosen:
        raise DataError("no prompts: every document is empty — check --dataset and --text-field")
    return chosen


# --- sampling -------------------------------------------------------------------------------


def batch_seed(seed: int, batch: int) -> int:
    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


@torch.no_grad()
def sample_batch(model: Any, tokenizer: Any, prompts: list[str], cfg: RolloutConfig, seed: int) -> list[str]:
    """The continuation of each prompt (text after it), sampled with torch seeded by ``seed``."""
    enc = tokenizer(prompts, add_special_tokens=True, padding=True, return_tensors="pt").to(model.device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": 0}
    out = model.generate(
        **enc,
        max_new_tokens=cfg.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **(sampling if cfg.temperature > 0 else {"do_sample": False}),
    )
    width = enc["input_ids"].shape[1]
    continuations = []
    for b, prompt in enumerate(prompts):
        prompt_ids = enc["input_ids"][b][enc["attention_mask"][b].bool()].tolist()
        new_ids = out[b, width:].tolist()
        if tokenizer.eos_token_id in new_ids:
            new_ids = new_ids[: new_ids.index(tokenizer.eos_token_id)]
        continuations.append(continuation_text(tokenizer, prompt_ids, new_ids))
    return continuations


def continuation_text(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new tokens add after the prompt: decoded together with the prompt (a token's leading space
    depends on what precedes it), minus the prompt's own decoding."""
    options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    whole = tokenizer.decode(prompt_ids + new_ids, **options)
    head = tokenizer.decode(prompt_ids, **options)
    return whole[len(head) :] if whole.startswith(head) else tokenizer.decode(new_ids, **options)


# --- the file: provenance, resuming ---------------------------------------------------------


def build_provenance(cfg: RolloutConfig, student: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    """What every line carries under ``rollout``: who wrote it and how. Equal on a re-run that may append."""
    sampling = {k: v for k, v in asdict(cfg).items() if k in SAMPLING_KEYS}
    return json.loads(json.dumps({"student": student, "sampling": sampling, "prompts": source}))


SAMPLING_KEYS = ("prompt_chars", "max_new_tokens", "temperature", "top_p", "seed", "batch_size")


def read_written(path: Path, provenance: dict[str, Any]) -> dict[int, str]:
    """prompt index -> line of a file a previous run wrote; a torn last line (a crash mid-write) is dropped from the
    file. A file written by another student or with other settings is refused."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines(keepends=True)
    written: dict[int, str] = {}
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) - 1:  # torn by a crash: rewritten below
                path.write_text("".join(lines[:-1]))
                break
            raise ConfigError(f"--out {path}: line {number + 1} is not JSON — choose another --out") from None
        if record.get("rollout") != provenance:
            raise ConfigError(
                f"--out {path} holds rollouts of another student or with other settings "
                f"({describe_change(record, provenance)}) — choose another --out, or delete the file"
            )
        written[int(record["prompt_index"])] = line if line.endswith("\n") else line + "\n"
    kept = path.read_text()
    if kept and not kept.endswith("\n"):  # a complete last line without its newline
        with path.open("a") as handle:
            handle.write("\n")
    return written


def describe_change(record: dict[str, Any], provenance: dict[str, Any]) -> str:
    old = record.get("rollout") or {}
    changed = [
        f"{group}.{key}"
        for group in provenance
        for key in set(provenance[group]) | set(old.get(group) or {})
        if (old.get(group) or {}).get(key) != provenance[group].get(key)
    ]
    return "changed: " + ", ".join(sorted(changed)) if changed else "no rollout record"


def run(cfg: RolloutConfig) -> dict[str, Any]:
    """Write the rollouts missing from ``cfg.out``. Returns a summary (written, kept, prompts, path)."""
    from distill.runtime import resolve_device

    cfg.require_io()
    model_dir, student = describe_student(cfg.student)
    texts, source = load_documents(cfg)
    provenance = build_provenance(cfg, student, source)
    path = Path(cfg.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_written(path, provenance)
    # whole batches are sampled, the last one too, so that a prompt's batch (and so its sample) never depends on N
    batches = -(-cfg.num_prompts // cfg.batch_size)
    prompts = choose_prompts(texts, batches * cfg.batch_size, cfg.prompt_chars, cfg.seed)
    wanted = min(cfg.num_prompts, len(prompts))
    missing = [i for i in range(wanted) if i not in done]
    todo = sorted({i - i % cfg.batch_size for i in missing})  # the batches (by first prompt) to sample again
    written = 0
    if todo:
        model, tokenizer = load_student(model_dir, resolve_device(cfg.device))
        bar = tqdm(total=wanted, initial=wanted - len(missing), unit="prompt", desc="rollout")
        with path.open("a") as handle:
            for start in todo:
                batch = prompts[start : start + cfg.batch_size]
                continuations = sample_batch(model, tokenizer, [p for _, p in batch], cfg, batch_seed(cfg.seed, start))
                for offset, ((doc, prompt), continuation) in enumerate(zip(batch, continuations)):
                    index = start + offset
                    if index in done or index >= wanted:
                        continue
                    record = {
                        "text": prompt + continuation,
                        "prompt_chars": len(prompt),
                        "prompt_index": index,
                        "source_document": doc,
                        "rollout": provenance,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
                    bar.update(1)
                handle.flush()
                os.fsync(handle.fileno())
        bar.close()
    kept = sum(1 for i in done if i < wanted)
    return {"written": written, "kept": kept, "prompts": wanted, "path": str(path), "student": student}
