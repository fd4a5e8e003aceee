"""Typed configuration, one dataclass per stage.

A stage's config comes from three layers, later ones winning: the dataclass defaults, an
optional YAML/JSON file (``--config FILE``), and the flags and ``--set`` items given on the command
line (config_loading.py; flags.py makes a flag of each field).
Every config validates itself in ``__post_init__`` and names the flag to change when a
value is wrong; it is saved next to the artifact it produced (the cache manifest, a run
directory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from distill.cache.targets import TARGET_KINDS


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag to change."""


TERM_SCHEDULES: dict[str, str] = {
    "kd": "constant",
    "lm": "complement",
    "alm": "constant",
    "feature": "ramp",
    "attention": "ramp",
    "layerwise": "ramp",
    "contrastive": "ramp",
}
"""Every loss term of stage 2 and the kind of its schedule (curriculum.py weighs each, pipeline/train/terms.py
computes each): ``constant`` weighs its base weight ``curriculum.<term>`` from step 0; ``complement`` weighs
1 - kd (lm, always on); ``ramp`` weighs its base weight times its ramp ``curriculum.<term>_ramp``, from
``curriculum.kd_only_until`` on."""
WEIGHTED_TERMS = tuple(term for term, schedule in TERM_SCHEDULES.items() if schedule != "complement")
"""The terms with a base weight of their own (``CurriculumConfig``), which ``curriculum.disabled`` may name."""
RAMPED_TERMS = tuple(term for term, schedule in TERM_SCHEDULES.items() if schedule == "ramp")
"""The curriculum's ramped terms: each has a base weight ``<term>`` and a ramp ``<term>_ramp`` below."""
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "full": (),
    "kd-only": RAMPED_TERMS,
    "ce": WEIGHTED_TERMS,
}
"""Training objective presets -> the terms each one disables (added to ``curriculum.disabled``)."""


@dataclass
class CurriculumConfig:
    """Per-term base weights and the phases, as fractions of the run's total optimizer steps
    (curriculum.py turns them into the weights of a step)."""

    kd: float = 0.7
    """Weight of the teacher top-K KD term, on from step 0; in [0, 1). lm weighs 1 - kd."""
    alm: float = 0.0
    """Weight of the ALM chunk-likelihood term (cross_tokenizer.alm_loss), on from step 0 beside kd and lm; 0: off.
    (``--set kd_mode=alm`` puts ALM in kd's place instead.)"""
    feature: float = 0.1
    """Full weight of the student-aware router feature term (with its balance/importance terms)."""
    attention: float = 0.1
    """Full weight of the pooled-attention KL term."""
    layerwise: float = 0.1
    """Full weight of the student-layer vs teacher-layer term."""
    contrastive: float = 0.05
    """Full weight of the InfoNCE term between aligned student and teacher representations."""
    kd_only_until: float = 0.10
    """Before this fraction of training, only kd and lm are on, whatever the ramps say."""
    feature_ramp: tuple[float, float] = (0.10, 0.40)
    """(start, end) fractions: feature weight goes linearly 0 -> full; start == end jumps."""
    attention_ramp: tuple[float, float] = (0.10, 0.40)
    """(start, end) fractions for the attention weight."""
    layerwise_ramp: tuple[float, float] = (0.40, 0.70)
    """(start, end) fractions for the layerwise weight."""
    contrastive_ramp: tuple[float, float] = (0.70, 1.00)
    """(start, end) fractions for the contrastive weight."""
    disabled: tuple[str, ...] = ()
    """Terms forced to 0 (any of kd, feature, attention, layerwise, contrastive); disabling kd makes lm 1."""

    def __post_init__(self) -> None:
        self._validate_weights()
        self._validate_phases()
        self._validate_disabled()

    def base_weight(self, term: str) -> float:
        """The term's weight once fully ramped (0 when disabled); lm weighs 1 - kd."""
        if TERM_SCHEDULES[term] == "complement":
            return 1.0 - self.base_weight("kd")
        return 0.0 if term in self.disabled else float(getattr(self, term))

    def _validate_weights(self) -> None:
        for name in WEIGHTED_TERMS:
            if not getattr(self, name) >= 0:
                raise ConfigError(f"curriculum.{name} must be >= 0, got {getattr(self, name)}")
        if not self.kd < 1:
            raise ConfigError(f"curriculum.kd must be < 1 so that lm (weight 1 - kd) stays on, got {self.kd}")

    def _validate_phases(self) -> None:
        if not 0 <= self.kd_only_until <= 1:
            raise ConfigError(f"curriculum.kd_only_until must be in [0, 1], got {self.kd_only_until}")
        for term in RAMPED_TERMS:
            name = f"{term}_ramp"
            ramp = tuple(getattr(self, name))
            if len(ramp) != 2:
                raise ConfigError(f"curriculum.{name} must be (start, end), got {ramp}")
            start, end = float(ramp[0]), float(ramp[1])
            if not (0 <= start <= 1 and 0 <= end <= 1):
                raise ConfigError(f"curriculum.{name} fractions must be in [0, 1], got {ramp}")
            if start > end:
                raise ConfigError(f"curriculum.{name} needs start <= end, got {ramp}")
            setattr(self, name, (start, end))  # YAML gives lists

    def _validate_disabled(self) -> None:
        names = (self.disabled,) if isinstance(self.disabled, str) else tuple(self.disabled)
        unknown = sorted(set(names) - set(WEIGHTED_TERMS))
        if unknown:
            hint = " (lm is always on; lower kd instead)" if "lm" in unknown else ""
            allowed = ", ".join(WEIGHTED_TERMS)
            raise ConfigError(f"curriculum.disabled has unknown terms {unknown}{hint}; allowed: {allowed}")
        self.disabled = tuple(sorted(set(names)))

    def apply_objective(self, objective: str) -> None:
        """Disable the terms the ``objective`` preset leaves out (on top of any already disabled)."""
        self.disabled = tuple(sorted({*self.disabled, *OBJECTIVES[objective]}))


KD_MODES = ("tail", "prefix", "alm", "projector", "uld")
"""The kd term's modes (pipeline/train/terms.py computes each)."""


DEVICE_MAPS = (None, "auto", "balanced", "sequential")


@dataclass
class CacheConfig:
    """Settings of ``distill cache-teacher`` (stage 1). Each field is a flag (``seq_len``: ``--seq-len``), a
    ``--set`` key and a config-file key; its docstring is the flag's help (distill/flags.py)."""

    HELP_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "Teacher and data": (
            "teacher", "revision", "trust_remote_code", "dataset", "dataset_config", "split", "text_field", "max_rows"
        ),
        "Stored outputs": (
            "seq_len", "packing", "targets", "top_k", "target_mass", "target_samples", "temperatures",
            "hidden_layers", "hidden_dim", "calibration_rows", "calibration_seed",
            "attention_layers", "attention_topk", "vocab_proj", "vocab_proj_temperature",
        ),
        "Store": ("out", "overwrite", "num_shards", "shard", "chunk_rows"),
        "Compute": ("device", "device_map", "dtype", "batch_size", "on_nonfinite"),
    }  # fmt: skip

    teacher: str = ""
    """Teacher model: a hub id or a local directory loadable with ``AutoModelForCausalLM``."""
    dataset: str = ""
    """A hub dataset id, a local dataset directory, or local .json/.jsonl/.parquet/.txt file(s), comma-separated."""
    out: str = ""
    """Where the store goes: a local path or an fsspec URL (``file://``, ``memory://``, ``s3://``...)."""
    dataset_config: str | None = None
    """The dataset's configuration name (the second argument of ``load_dataset``)."""
    split: str = "train"
    """The dataset split to cache. A store holds one split; cache a validation split into a second store."""
    text_field: str = "text"
    """The column holding the documents' text."""
    seq_len: int = 512
    """Teacher tokens per row. Longer documents are cut into pieces of at most this many tokens (prefix included)."""
    packing: str = "greedy"
    """How pieces become rows: ``greedy`` (pieces packed first fit, several documents per row, each with its own
    prefix, positions and block-diagonal attention; see docs/cache-format.md) or ``none`` (one piece per row,
    right-padded)."""
    targets: str = "topk"
    """What is kept of each next-token distribution (docs/cache-format.md, "Teacher targets"): ``topk`` an exact
    head, the largest tokens until their T=1 probability reaches ``target_mass`` (at most ``top_k``), trained
    with the K+1-bin tail loss; ``sampled`` RS-KD draws (``target_samples`` of them) from the teacher, trained
    with an unbiased estimate of the full KL; ``hybrid`` the head plus ``target_samples`` draws from its tail;
    ``topk-fp16`` the fixed top-K int32 ids and fp16 logits of schema version 2 (about 5x larger)."""
    top_k: int = 128
    """The most head tokens kept per position (``topk``, ``hybrid``), or exactly this many (``topk-fp16``)."""
    target_mass: float = 0.9
    """The head's T=1 probability to reach (``topk``, ``hybrid``). 0.9 holds 88.5% of Gemma 3 270M's
    probability with 57 tokens on average at ``top_k`` 128 (the fixed top-256: 95% with 256)."""
    target_samples: int = 32
    """Draws per position (``sampled``, ``hybrid``), stored once per distinct token with its count."""
    temperatures: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    """Temperatures at which the full-vocabulary logsumexp is stored; stage 2 may train at any of them."""
    vocab_proj: bool = False
    """Store ``vocab_proj`` = softmax(logits / T*) @ teacher input embedding: the input of the logit-projector kd
    mode (``kd_mode=projector``) only. It costs about a quarter of a teacher forward, hence off by default."""
    vocab_proj_temperature: float = 4.0
    """Temperature T* of ``vocab_proj``."""
    hidden_layers: list[int] | None = None
    """Teacher hidden states to store, by index in ``output_hidden_states`` (0 = embeddings, i = after block i).
    Default: 4 layers evenly spaced up to the last block. An empty list stores none."""
    hidden_dim: int | None = None
    """Reduce stored hidden states to this many dimensions with a PCA basis fitted on the calibration rows."""
    attention_layers: list[int] | None = None
    """Teacher blocks (1-based) whose head-averaged attention is stored. Default: the middle and the last block.
    An empty list stores none (and lets the teacher run its fast attention kernel)."""
    attention_topk: int = 32
    """Keys kept per query row of the stored attention maps."""
    calibration_rows: int = 64
    """Rows used to fit the PCA basis and the hidden-state mean/std (and the compact targets' unigram ranks): a
    random sample of all the store's rows, drawn with ``calibration_seed`` and listed in the manifest."""
    calibration_seed: int = 0
    """Seed of the calibration rows' sample (recorded in the manifest's ``calibration``)."""
    batch_size: int = 8
    """Rows per teacher forward pass."""
    chunk_rows: int = 32
    """Rows per storage chunk: the unit of writing, checksumming and resuming. Fixed when the store is created."""
    dtype: str = "auto"
    """Teacher compute dtype: auto (bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU), fp32, bf16, fp16."""
    device: str = "auto"
    """Device for the teacher: auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    device_map: str | None = None
    """Spread a teacher too large for one GPU over all visible GPUs: auto, balanced or sequential (transformers'
    ``device_map``; needs ``pip install accelerate``). The stored fields are computed on the GPU that holds the
    output head. One process per machine (not torchrun); --device stays auto; CUDA_VISIBLE_DEVICES picks the GPUs.
    Default: the whole teacher on --device."""
    max_rows: int | None = None
    """Cache only the first N rows of the dataset (after cutting documents into pieces and packing them)."""
    num_shards: int = 1
    """Shards of a new store (ignored when resuming: the store's own number is used)."""
    shard: str | None = None
    """Fill only shard ``i/n`` of the store (``n`` must equal the store's number of shards). Default: all shards."""
    on_nonfinite: str = "error"
    """What to do with a row whose teacher outputs are not finite: ``error`` stops and names the row;
    ``skip`` stores the row with length 0 (so no position of it is ever used) and counts it in the shard record."""
    overwrite: bool = False
    """Replace a store at ``out`` whose manifest differs (otherwise refused). A store with the same manifest resumes."""
    trust_remote_code: bool = False
    """Allow the teacher's own modelling code from the hub."""
    revision: str | None = None
    """Teacher revision (branch, tag or commit) on the hub."""

    def __post_init__(self) -> None:
        self.temperatures = [float(t) for t in self.temperatures]
        checks = [
            (self.seq_len >= 2, "--seq-len must be at least 2 (a row needs a token and its successor)"),
            (self.top_k >= 1, "--top-k must be at least 1"),
            (self.targets in TARGET_KINDS, f"--targets must be one of {', '.join(TARGET_KINDS)}"),
            (0 < self.target_mass <= 1, "--target-mass must be in (0, 1]"),
            (1 <= self.target_samples <= 255, "--target-samples must be in 1..255 (counts are stored in 8 bits)"),
            (
                not getattr(TARGET_KINDS.get(self.targets), "sampled", False) or 1.0 in self.temperatures,
                f"--targets {self.targets} draws at T=1: --temperatures must include 1",
            ),
            (len(self.temperatures) > 0, "--temperatures needs at least one temperature"),
            (all(t > 0 for t in self.temperatures), "--temperatures must all be > 0"),
            (len(set(self.temperatures)) == len(self.temperatures), "--temperatures lists a temperature twice"),
            (self.vocab_proj_temperature > 0, "--vocab-proj-temperature must be > 0"),
            (self.attention_topk >= 1, "--attention-topk must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.chunk_rows >= 1, "--chunk-rows must be at least 1"),
            (self.calibration_rows >= 1, "--calibration-rows must be at least 1"),
            (self.dtype in ("auto", "fp32", "bf16", "fp16"), "--dtype must be one of auto, fp32, bf16, fp16"),
            (self.on_nonfinite in ("error", "skip"), "--on-nonfinite must be 'error' or 'skip'"),
            (self.packing in ("none", "greedy"), "--packing must be 'none' or 'greedy'"),
            (self.num_shards >= 1, "--num-shards must be at least 1"),
            (self.max_rows is None or self.max_rows >= 1, "--max-rows must be at least 1"),
            (self.hidden_dim is None or self.hidden_dim >= 1, "--hidden-dim must be at least 1"),
            (self.device_map in DEVICE_MAPS, f"--device-map must be one of {', '.join(map(str, DEVICE_MAPS[1:]))}"),
            (
                self.device_map is None or self.device == "auto",
                f"--device-map {self.device_map} places the teacher itself: leave --device at auto and choose the GPUs "
                "with CUDA_VISIBLE_DEVICES",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.shard is not None:
            parse_shard(self.shard)

    def ignored_settings(self) -> list[str]:
        """A warning for each target setting given away from its default that the chosen --targets ignores."""
        uses = {
            "target_mass": [name for name, kind in TARGET_KINDS.items() if kind.reads_mass],
            "target_samples": [name for name, kind in TARGET_KINDS.items() if kind.sampled],
        }
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [
            f"--{name.replace('_', '-')} {getattr(self, name)} is ignored by --targets {self.targets} (it applies to "
            f"--targets {' and '.join(kinds)})"
            for name, kinds in uses.items()
            if self.targets not in kinds and getattr(self, name) != defaults[name]
        ]

    def require_io(self) -> None:
        """Check the three settings without which nothing can run, and that --out is not a file (before the
        teacher loads)."""
        for name in ("teacher", "dataset", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if local_path(self.out) is not None and local_path(self.out).is_file():
            raise ConfigError(f"--out {self.out}: a file, not a store folder — choose another --out")


@dataclass
class TrainConfig:
    """Settings of ``distill train`` (stage 2). Cache settings (layers, top-K, temperatures) come from the
    store's manifest, never repeated here. Each field is a flag, a ``--set`` key and a config-file key, as for
    ``CacheConfig``; ``curriculum`` is reached by ``--set curriculum.kd=0.5``."""

    HELP_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "Inputs and outputs": (
            "cache", "cache_weights", "continuation_only", "student", "out", "eval_cache", "live_teacher",
            "live_teacher_revision", "trust_remote_code", "resume", "overwrite", "report_to",
        ),
        "Objective": (
            "objective", "temperature", "kd_mode", "alm_temperature", "router_top_k", "balance_coef", "importance_coef",
            "router_attention_coef", "contrastive_temperature",
        ),
        "Optimization": (
            "max_steps", "epochs", "batch_size", "grad_accum", "lr", "router_lr", "weight_decay", "warmup",
            "min_lr_ratio", "clip", "seed",
        ),
        "Eval and checkpoints": (
            "eval_every", "eval_fraction", "eval_rows", "save_every", "checkpoint_last", "keep_checkpoints", "final",
            "patience", "min_delta", "early_stop_warmup", "verify_cache", "preflight_rows",
        ),
        "Compute": ("precision", "device", "parallel", "student_max_length", "num_workers_prefetch", "log_every"),
    }  # fmt: skip

    cache: str | list[str] = ""
    """The teacher-output store (path or fsspec URL) made by ``distill cache-teacher``. Repeat the flag (``--cache A
    --cache B``) to train on several stores of one teacher, mixed by ``cache_weights``; the first one is the primary
    store (held-out rows, the run's identity on resume). One store is kept as a plain string."""
    cache_weights: list[float] | None = None
    """With several --cache: each store's share of the rows of every batch, in --cache order (normalized to sum to
    1; each batch holds them to within one row, the run exactly). Default: equal shares."""
    continuation_only: bool = True
    """Rows of a rollout store (``distill rollout`` -> ``distill cache-teacher``) take loss terms on their
    continuation only: the prompt's positions are context, with no kd, lm or other target. Stores without prompt
    boundaries are unaffected. ``--no-continuation-only`` trains on the prompts too."""
    student: str = ""
    """Student model: hub id or local directory (``AutoModelForCausalLM`` + its tokenizer)."""
    out: str = ""
    """Run directory: config.json, metrics.jsonl, checkpoints/, final/."""
    eval_cache: str | None = None
    """A second store (a validation split) for held-out rows. Without it, ``eval_fraction`` of the rows is held out."""
    eval_fraction: float = 0.02
    """Share of the store's rows held out for eval (chosen by row id, deterministically) when no --eval-cache."""
    eval_rows: int | None = None
    """Evaluate on at most this many held-out rows (default all)."""
    max_steps: int | None = None
    """Optimizer steps to run. Default: ``epochs`` passes over the training rows."""
    epochs: float = 1.0
    """Passes over the training rows when --max-steps is not given."""
    batch_size: int = 2
    """Rows per micro-batch."""
    grad_accum: int = 16
    """Micro-batches per optimizer step (global batch = batch_size x grad_accum x world size)."""
    lr: float = 5e-5
    """Peak learning rate of the student."""
    router_lr: float = 1e-4
    """Peak learning rate of the router and projectors."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    warmup: float = 0.1
    """Warmup as a fraction of the optimizer steps (linear), then cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr x min_lr_ratio."""
    clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    temperature: float = 1.0
    """KD temperature; must be one of the store's temperatures. Default 1: on a real teacher a top-256 head holds
    ~95% of the probability at T=1 but ~3% at T=4 (the default ``topk`` head: 89% and 1%), where the K+1-bin target
    is mostly its tail bin (`cache info` shows the head mass per stored temperature; `train` warns when it is under
    half)."""
    kd_mode: str = "prefix"
    """prefix (top-K grouped into shared-prefix bins + tail bin, default: the measured best on Gemma 3 -> SmolLM2,
    docs/real-pairs.md) | tail (exact matches + tail bin) | alm (chunk likelihoods from target_logprob in kd's
    place) | projector (vocab_proj -> linear -> student vocab) | uld (sorted probs). See docs/cross-tokenizer.md."""
    alm_temperature: float = 1.0
    """τ of the ALM term (kd_mode=alm or curriculum.alm > 0): chunk likelihoods are compared as exp(log p / τ)."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Term weights and their schedule (see curriculum.py). --set curriculum.kd=0.5 etc."""
    objective: str = "full"
    """Loss preset: full (every curriculum term), kd-only (kd + lm), ce (lm only: the cross-entropy baseline, which
    reads no teacher hidden states or attention maps). Adds the terms it leaves out to curriculum.disabled."""
    router_top_k: int = 2
    """Experts (teacher layers) reported per position by the student-aware router (its feature term weighs all)."""
    balance_coef: float = 0.01
    """Weight of the router's load-balancing term, relative to the feature weight."""
    importance_coef: float = 0.01
    """Weight of the router's importance term, relative to the feature weight."""
    router_attention_coef: float = 0.1
    """Weight of the router's attention-alignment term, relative to the attention weight."""
    contrastive_temperature: float = 0.1
    """InfoNCE temperature."""
    precision: str = "auto"
    """auto (bf16 on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on CPU) | fp32 | bf16 | fp16."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    parallel: str = "ddp"
    """Under torchrun: ddp (a whole replica of the student and its optimizer state per rank; gradients averaged
    during backward) or fsdp (FSDP2: each rank keeps 1/W of the weights, gradients and optimizer state, for a
    student that does not fit one device). One process ignores it. See docs/scaling.md."""
    log_every: int = 10
    """Optimizer steps between log lines / metrics records."""
    eval_every: int = 500
    """Optimizer steps between evals (and checkpoints)."""
    save_every: int | None = None
    """Optimizer steps between checkpoints (default: eval_every)."""
    checkpoint_last: bool = False
    """Also checkpoint the last step, so that the finished run can be continued with --resume auto (more steps, or
    an on-policy round: ``distill rollout`` from the run with --final last, ``cache-teacher``, then ``train`` again
    with the rollout store added). Off: the last step is only in final/."""
    keep_checkpoints: int = 2
    """Periodic checkpoints kept on disk (older ones are deleted; checkpoints/best is kept apart)."""
    final: str = "best"
    """What final/ holds: best (the student at the lowest held-out eval loss, kept in checkpoints/best) or last (the
    last step). Without any eval, the last step; final/final.json says which step and why."""
    patience: int = 20
    """Early stopping: evals without improvement before stopping."""
    min_delta: float = 0.0
    """Early stopping: the smallest decrease of the eval loss that counts as improvement."""
    early_stop_warmup: int = 1000
    """Early stopping is not applied before this optimizer step."""
    student_max_length: int | None = None
    """Student context (default: its config's max_position_embeddings); longer student rows are cut."""
    live_teacher: str | None = None
    """Run this teacher in the loop instead of reading teacher outputs from the store (same loss code)."""
    live_teacher_revision: str | None = None
    """Revision (branch, tag or commit) of --live-teacher on the hub. Default: the store's, when --live-teacher
    names the teacher the store was made with."""
    trust_remote_code: bool = False
    """Allow --live-teacher's custom modeling code from the hub (as cache-teacher's --trust-remote-code)."""
    seed: int = 0
    """Seed of initialization of the added modules, data order and dropout."""
    resume: str | None = None
    """auto (latest checkpoint in --out, if any) or a checkpoint directory."""
    overwrite: bool = False
    """Replace the run in --out (metrics, checkpoints, final student). Without it, or --resume, a second run
    into the same --out is refused."""
    preflight_rows: int = 16
    """Before the first step, score the teacher and the student on this many held-out rows (bits per byte on
    identical bytes, with a paired interval) and warn when the teacher is not clearly better, where KD can only
    pull the student towards a worse model; 0 skips it. ``distill cache audit --student`` reports the same."""
    verify_cache: str = "auto"
    """Check the store before training: deep (re-checksum every chunk), quick (completeness and metadata),
    off, or auto (deep below 16 GiB of uncompressed rows, quick above)."""
    num_workers_prefetch: int = 2
    """Batches read and aligned ahead of the training step on a background thread (0 disables)."""
    report_to: list[str] | str = field(default_factory=list)
    """Experiment trackers that also get every metrics.jsonl record and the run parameters: any of tensorboard,
    wandb, trackio (a list or a comma-separated string; none or empty: metrics.jsonl only). Each is an extra:
    ``pip install 'distill[wandb]'``. See pipeline/tracking.py."""

    def __post_init__(self) -> None:
        self._normalize_caches()
        if isinstance(self.curriculum, dict):
            self.curriculum = CurriculumConfig(**self.curriculum)
        self.report_to = parse_report_to(self.report_to)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective {self.objective}: use one of {', '.join(OBJECTIVES)}")
        self.curriculum.apply_objective(self.objective)
        checks = [
            (self.final in ("best", "last"), "--final must be best or last"),
            (0 <= self.eval_fraction < 1, "--set eval_fraction=F needs 0 <= F < 1"),
            (self.preflight_rows >= 0, "--preflight-rows must be >= 0 (0 skips the check)"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.epochs > 0, "--set epochs=N needs N > 0"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--set grad_accum=N needs N >= 1"),
            (self.lr > 0 and self.router_lr > 0, "--set lr / router_lr must be > 0"),
            (0 <= self.warmup < 1, "--set warmup=F needs 0 <= F < 1"),
            (0 <= self.min_lr_ratio <= 1, "--set min_lr_ratio=F needs 0 <= F <= 1"),
            (self.temperature > 0, "--set temperature=T needs T > 0"),
            (self.alm_temperature > 0, "--set alm_temperature=T needs T > 0"),
            (self.kd_mode in KD_MODES, f"--set kd_mode must be one of {', '.join(KD_MODES)}"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), "--set precision must be auto, fp32, bf16 or fp16"),
            (self.parallel in ("ddp", "fsdp"), "--set parallel must be ddp or fsdp"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.eval_every >= 1, "--eval-every must be at least 1"),
            (self.patience >= 1, "--set patience=N needs N >= 1"),
            (self.keep_checkpoints >= 1, "--set keep_checkpoints=N needs N >= 1"),
            (
                self.verify_cache in ("auto", "deep", "quick", "off"),
                "--set verify_cache must be auto, deep, quick or off",
            ),
            (
                self.resume is None or self.resume == "auto" or Path(self.resume).is_dir(),
                f"--resume {self.resume}: use 'auto' or an existing checkpoint directory",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def require_io(self) -> None:
        """The settings without which nothing can run, and the local paths they name, checked before anything
        loads (and before the resolved config is printed)."""
        for name in ("cache", "student", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        for flag, store in (*(("--cache", c) for c in self.stores), ("--eval-cache", self.eval_cache)):
            path = local_path(store) if store else None
            if path is not None and not path.is_dir():
                problem = "a file, not a store folder" if path.exists() else "no such folder"
                raise ConfigError(f"{flag} {store}: {problem} — check the path, or create the store with "
                                  "`distill cache-teacher`")  # fmt: skip
        if Path(self.out).is_file():
            raise ConfigError(f"--out {self.out}: a file, not a directory — choose another --out")

    @property
    def stores(self) -> list[str]:
        """Every --cache, the primary store first."""
        return [self.cache] if isinstance(self.cache, str) else list(self.cache)

    @property
    def store_weights(self) -> list[float]:
        """Each store's share of every batch, summing to 1."""
        weights = self.cache_weights or [1.0] * len(self.stores)
        return [w / sum(weights) for w in weights]

    def _normalize_caches(self) -> None:
        """One store stays a plain string (config.json and resume as before); several are a list, each once."""
        stores = [self.cache] if isinstance(self.cache, str) else [str(c) for c in self.cache]
        stores = [c for c in stores if c]
        if len(set(stores)) < len(stores):
            raise ConfigError(f"--cache names a store twice ({', '.join(stores)}) — give each store once")
        self.cache = stores[0] if len(stores) == 1 else (stores or "")
        if self.cache_weights is None:
            return
        self.cache_weights = [float(w) for w in self.cache_weights]
        if len(self.cache_weights) != max(1, len(stores)):
            raise ConfigError(
                f"--cache-weights {','.join(f'{w:g}' for w in self.cache_weights)}: one weight per --cache "
                f"({len(stores)} given)"
            )
        if not all(w > 0 for w in self.cache_weights):
            raise ConfigError("--cache-weights must all be > 0 (leave a store out instead of weighting it 0)")


@dataclass
class RolloutConfig:
    """Settings of ``distill rollout``: the student writes continuations of prompts, the teacher scores them later
    (``distill cache-teacher`` on the file). Each field is a flag, a ``--set`` key and a config-file key."""

    HELP_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "Student, prompts and output": (
            "student", "dataset", "dataset_config", "split", "text_field", "out", "num_prompts", "prompt_chars"
        ),
        "Sampling": ("max_new_tokens", "temperature", "top_p", "seed"),
        "Compute": ("batch_size", "device"),
    }  # fmt: skip

    student: str = ""
    """The student: a run directory of ``distill train`` (its final/ writes; the run and final/'s step are recorded)
    or a model folder / hub id."""
    dataset: str = ""
    """Where the prompts come from: a dataset as for cache-teacher (hub id, folder, .jsonl/.json/.parquet/.txt files)
    or a store made by cache-teacher (the text of its rows' first documents)."""
    out: str = ""
    """The JSONL file to write (appended to when it exists: only the prompts it lacks are written)."""
    dataset_config: str | None = None
    """The dataset's configuration name (the second argument of ``load_dataset``)."""
    split: str = "train"
    """The dataset split the prompts come from."""
    text_field: str = "text"
    """The column holding the documents' text."""
    num_prompts: int = 256
    """Prompts to write: the first N documents of a seeded shuffle (``seed``) that hold at least one character; a
    larger N on a re-run appends the next ones."""
    prompt_chars: int = 256
    """Characters of a document that make its prompt, cut back to the last whitespace before this length (if any),
    so that a prompt ends between words."""
    max_new_tokens: int = 128
    """Student tokens sampled per prompt at most (sampling stops earlier at the student's end-of-text token)."""
    temperature: float = 1.0
    """Sampling temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens holding this much probability (1 = the whole vocabulary)."""
    seed: int = 0
    """Seed of the prompts' choice and of the sampling: batch k is sampled with seed (seed, k), so two runs, or a
    resumed and an uninterrupted run, write identical files."""
    batch_size: int = 16
    """Prompts sampled together (a batch is also the unit of resuming: a batch cut short is sampled again whole)."""
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda | cuda:N."""

    def __post_init__(self) -> None:
        checks = [
            (self.num_prompts >= 1, "--num-prompts must be at least 1"),
            (self.prompt_chars >= 1, "--prompt-chars must be at least 1"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.temperature >= 0, "--temperature must be >= 0 (0 is greedy)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def require_io(self) -> None:
        """The three settings without which nothing can run; --out must not be a folder."""
        for name in ("student", "dataset", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out}: a folder, not a file — pass a .jsonl file path")


def local_path(url: str) -> Path | None:
    """The path of a plain path or ``file://`` URL; None for a remote URL (s3://, memory://...)."""
    if url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None if "://" in url else Path(url)


REPORT_TO_CHOICES = ("tensorboard", "wandb", "trackio")


def parse_report_to(value: str | list[str] | None) -> list[str]:
    """``"tensorboard,wandb"``, ``["wandb", "trackio"]``, ``"none"`` -> the trackers asked for, in order, once each."""
    items = value.split(",") if isinstance(value, str) else [p for v in value or [] for p in str(v).split(",")]
    names = [p.strip().lower() for p in items if p.strip() and p.strip().lower() != "none"]
    unknown = [n for n in names if n not in REPORT_TO_CHOICES]
    if unknown:
        raise ConfigError(f"--report-to {unknown[0]}: choose from none, {', '.join(REPORT_TO_CHOICES)}")
    return list(dict.fromkeys(names))


def parse_shard(spec: str) -> tuple[int, int]:
    """Parse ``"i/n"`` into ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (for example 0/4), got {spec!r}") from None
    if not 0 <= index < count:
        raise ConfigError(f"--shard {spec}: need 0 <= i < n")
    return index, count


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)
