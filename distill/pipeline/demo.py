"""Embedded default assets: a generated corpus, locally trained tokenizers, tiny teacher and student.

Nothing here downloads anything: the corpus comes from a seeded grammar, the tokenizers are
trained on it with ``tokenizers``, the models are built from configs and saved with
``save_pretrained``, so that every stage loads them back through the real
``from_pretrained`` / ``load_dataset`` code paths. Tests use the same builders.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# --- corpus -------------------------------------------------------------------------------

SUBJECTS = {
    "sg": ["the cat", "a teacher", "my friend", "the old café owner", "the naïve student", "Zoë", "the robot 🤖"],
    "pl": ["the cats", "two teachers", "my friends", "the café owners", "the students", "the robots 🤖"],
}
VERBS = {  # (singular, plural)
    "see": ("sees", "see"),
    "like": ("likes", "like"),
    "count": ("counts", "count"),
    "draw": ("draws", "draw"),
    "find": ("finds", "find"),
    "carry": ("carries", "carry"),
}
OBJECTS = [
    "the apples 🍎",
    "a red book",
    "three stones",
    "the crème brûlée",
    "東京の地図",
    "the small 🧪 tube",
    "a blue kite",
    "the résumé",
    "北京的书",
    "a map of Zürich",
]
CONNECTIVES = ["because", "although", "while", "and then"]
CJK_SENTENCES = ["今日は天気がいいです。", "我喜欢学习语言。", "猫が好きです。", "这是一个测试。"]


def make_clause(rng: random.Random, depth: int = 0) -> str:
    """Subject-verb agreement, an object, optional numbers and a nested clause."""
    number = rng.choice(["sg", "pl"])
    subject = rng.choice(SUBJECTS[number])
    verb = VERBS[rng.choice(list(VERBS))][0 if number == "sg" else 1]
    clause = f"{subject} {verb} {rng.choice(OBJECTS)}"
    if rng.random() < 0.3:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        clause += f" and {a} plus {b} is {a + b}"
    if depth < 2 and rng.random() < 0.35:
        clause += f" {rng.choice(CONNECTIVES)} {make_clause(rng, depth + 1)}"
    return clause


def make_document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.15:
            sentences.append(rng.choice(CJK_SENTENCES))
        else:
            s = make_clause(rng)
            sentences.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", " 👍🏽."]))
    return " ".join(sentences)


def generate_corpus(num_docs: int, seed: int = 0, empty_every: int = 0) -> list[str]:
    """``num_docs`` documents from the seeded grammar (every ``empty_every``-th one empty, if > 0)."""
    rng = random.Random(seed)
    return ["" if empty_every and (i + 1) % empty_every == 0 else make_document(rng) for i in range(num_docs)]


def write_jsonl(texts: list[str], path: Path, field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t}, ensure_ascii=False) + "\n")
    return path


# --- tokenizers ---------------------------------------------------------------------------


def train_tokenizer(
    texts: list[str],
    vocab_size: int,
    out_dir: Path | None = None,
    trim_offsets: bool = False,
    special_tokens: tuple[str, ...] = ("<|endoftext|>", "<|pad|>"),
) -> Any:
    """A GPT-2 style byte-level BPE tokenizer trained on ``texts``; saved to ``out_dir`` if given.

    The first special token is EOS, the last one the pad token. With ``trim_offsets=False``
    (the default, as in GPT-2 / Qwen) each token's span includes its leading space.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=special_tokens[0], pad_token=special_tokens[-1])
    if out_dir is not None:
        fast.save_pretrained(out_dir)
    return fast


# --- models -------------------------------------------------------------------------------


def teacher_config(vocab_size: int, hidden: int = 128, layers: int = 4, experts: int = 4, **overrides: Any) -> Any:
    """A tiny Qwen3-MoE config (the reference teacher's family)."""
    from transformers import Qwen3MoeConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=0,
    )
    values.update(overrides)
    return Qwen3MoeConfig(**values)


def student_config(vocab_size: int, hidden: int = 64, layers: int = 6, **overrides: Any) -> Any:
    """A tiny Llama config (the reference student's family), deeper than the tiny teacher like the real pair."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=1,
        eos_token_id=0,
        bos_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def build_model(config: Any, out_dir: Path, tokenizer: Any = None, seed: int = 0) -> Any:
    """Randomly initialize a causal LM from ``config`` and save it (with its tokenizer) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return model


# --- the demo run -------------------------------------------------------------------------


def build_demo_assets(out: Path, seed: int = 0, num_docs: int = 1500) -> dict[str, Path]:
    """Corpus (train + held-out), teacher and student tokenizers, tiny teacher and student: reused when present."""
    paths = {
        "train": out / "data" / "train.jsonl",
        "eval": out / "data" / "eval.jsonl",
        "teacher_tokenizer": out / "tokenizers" / "teacher",
        "student_tokenizer": out / "tokenizers" / "student",
        "teacher": out / "models" / "teacher",
        "student": out / "models" / "student",
    }
    if not paths["eval"].exists():
        texts = generate_corpus(num_docs + num_docs // 10, seed=seed)
        write_jsonl(texts[:num_docs], paths["train"])
        write_jsonl(texts[num_docs:], paths["eval"])
    if not (paths["student"] / "config.json").exists():
        texts = [json.loads(line)["text"] for line in paths["train"].read_text(encoding="utf-8").splitlines()]
        teacher_tok = train_tokenizer(texts, 1024, paths["teacher_tokenizer"])
        student_tok = train_tokenizer(texts, 512, paths["student_tokenizer"])
        build_model(teacher_config(len(teacher_tok)), paths["teacher"], teacher_tok, seed=seed)
        build_model(student_config(len(student_tok)), paths["student"], student_tok, seed=seed)
    return paths


def pretrain_teacher(
    model_dir: Path,
    texts: list[str],
    steps: int,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """A short causal-LM pretraining of the tiny teacher on ``texts`` (packed); saved back to ``model_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stream = [i for t in texts for i in tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]]
    data = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    started, report_every = time.perf_counter(), max(1, steps // 10)
    for step in range(1, steps + 1):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % report_every == 0 or step == steps:  # minutes on 2 cores: show that it moves
            elapsed = time.perf_counter() - started
            print(
                f"[demo] teacher pretraining: step {step}/{steps} | loss {losses[-1]:.3f} | "
                f"{elapsed:.0f}s, eta {elapsed / step * (steps - step):.0f}s",
                flush=True,
            )
    model.save_pretrained(model_dir)
    return losses


@dataclass
class DemoSettings:
    """Sizes of the embedded default: about 75 s of CPU in all (measured in the README), ~40% of it the teacher's
    pretraining, the rest the two student runs and the stores."""

    num_docs: int = 1500
    """Training documents generated (plus 10% held out): the teacher pretrains on all of them."""
    cache_rows: int = 32
    """Rows of the training split cached for the students (the same rows for KD and CE-only). Few rows make
    the point of distillation visible in minutes: the students see a small sample, the teacher's soft targets
    carry what it learned from every document."""
    teacher_steps: int = 150
    """Optimizer steps of the teacher's pretraining (batch 16 x seq_len tokens): about half of the demo's CPU time.
    300 steps at ``teacher_lr`` 3e-3 reached a last-batch loss of 1.28 in 55 s of CPU, 150 at 5e-3 1.35 in 30 s."""
    teacher_lr: float = 5e-3
    """Peak learning rate of the teacher's pretraining (one-cycle schedule)."""
    seq_len: int = 128
    """Teacher tokens per row (pretraining and cache)."""
    train_steps: int = 150
    """Optimizer steps of each student run."""
    batch_size: int = 8
    """Rows per micro-batch of the student runs."""
    grad_accum: int = 1
    """Micro-batches per optimizer step of the student runs."""
    lr: float = 2e-3
    """Student learning rate (tiny models take a large one)."""
    router_lr: float = 2e-3
    """Router/projector learning rate."""
    temperature: float = 1.0
    """KD temperature (one of the stored 1, 2, 4)."""
    threads: int = 1
    """torch intra-op threads while the demo runs ([demo-threads note])."""


# [demo-threads note] The demo's models are tiny (hidden 128 and 64): their matrix products are too small to
# share between threads, so a second thread only adds synchronization, and on a busy machine far more: with
# torch's default 2 threads on 2 cores shared with other work (load ~6), a teacher pretraining step (16 x 128
# tokens) took 2.6 s of CPU and 5.2 s of wall time, with 1 thread 0.2 s and 0.45 s. The tests' single_thread
# fixture does the same for the same reason.


def timed(times: dict[str, float], name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    times[name] = time.perf_counter() - start
    print(f"[demo] {name}: {times[name]:.1f}s", flush=True)
    return result


def run_demo(out: Path, seed: int = 0, settings: DemoSettings | None = None) -> dict[str, Any]:
    """corpus -> tokenizers -> teacher pretraining -> cache-teacher -> train (KD) -> train (CE-only) -> eval.

    Every stage goes through the same functions as the CLI commands; a stage whose output exists is reused.
    Runs with ``settings.threads`` torch intra-op threads ([demo-threads note]), restored afterwards.
    """
    import torch

    s = settings or DemoSettings()
    previous = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        return run_stages(out, seed, s)
    finally:
        torch.set_num_threads(previous)


def run_stages(out: Path, seed: int, s: DemoSettings) -> dict[str, Any]:
    """The stages of ``run_demo``, in order."""
    from distill.config import CacheConfig, TrainConfig
    from distill.pipeline.eval import evaluate
    from distill.pipeline.teacher import cache_teacher
    from distill.pipeline.train import loop as train

    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    paths = timed(times, "assets", build_demo_assets, out, seed, s.num_docs)
    marker = paths["teacher"] / "pretrained.json"
    if not marker.exists():
        texts = [json.loads(line)["text"] for line in paths["train"].read_text(encoding="utf-8").splitlines()]
        losses = timed(
            times,
            "teacher pretraining",
            pretrain_teacher,
            paths["teacher"],
            texts,
            s.teacher_steps,
            s.seq_len,
            lr=s.teacher_lr,
            seed=seed,
        )
        marker.write_text(json.dumps({"steps": s.teacher_steps, "first_loss": losses[0], "last_loss": losses[-1]}))
    stores = {}
    for split in ("train", "eval"):
        stores[split] = str(out / "cache" / split)
        # The teacher learned from every document; the students see the first `cache_rows` rows
        # only (both of them the same ones): distillation carries what the teacher knows beyond them.
        cfg = CacheConfig(
            max_rows=s.cache_rows if split == "train" else None,
            split="train" if split == "train" else "validation",
            teacher=str(paths["teacher"]),
            dataset=str(paths[split]),
            out=stores[split],
            seq_len=s.seq_len,
            batch_size=16,
            chunk_rows=32,
            calibration_rows=64,
            # The students' sample is `cache_rows` rows of one document piece each, as the slow tier's
            # "KD beats CE-only" was measured; packed, the same rows would hold several times the documents.
            packing="none",
        )
        timed(times, f"cache-teacher ({split})", cache_teacher.run, cfg)
    runs = {}
    for name, objective in (("kd", "full"), ("ce_only", "ce")):
        run_dir = out / "runs" / name
        runs[name] = run_dir
        if (run_dir / "final" / "config.json").exists():
            continue
        cfg = TrainConfig(
            cache=stores["train"],
            eval_cache=stores["eval"],
            student=str(paths["student"]),
            out=str(run_dir),
            max_steps=s.train_steps,
            batch_size=s.batch_size,
            grad_accum=s.grad_accum,
            lr=s.lr,
            router_lr=s.router_lr,
            temperature=s.temperature,
            objective=objective,
            log_every=max(1, s.train_steps // 10),
            eval_every=max(1, s.train_steps // 5),
            early_stop_warmup=s.train_steps,
            seed=seed,
            eval_rows=64,
            resume="auto",  # a run stopped half-way continues (a finished one was skipped above)
        )
        timed(times, f"train ({name})", train.run, cfg)
    report = timed(
        times, "eval", evaluate.run_eval, [runs["kd"], runs["ce_only"]], None, "eval", "ce_only", out / "report"
    )
    report["stage_seconds"] = times
    (out / "report" / "report.json").write_text(json.dumps(report, indent=2))
    print(evaluate.format_report(report))
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    print(f"files: {out}/ (report/report.md, report/*.png, runs/*/final, cache/)")
    return report
