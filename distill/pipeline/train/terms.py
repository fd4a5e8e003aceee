"""The loss-term table: every stage-2 loss term, declared once.

Each ``Term`` says which teacher fields it reads, which trainable modules it adds beside the student,
what it checks in the store, how its logged parts weigh as the curriculum moves, and how it is
computed from one micro-batch (a ``StepView``). Everything else reads the table:

    needed_signals(cfg)          -> the teacher fields to read (setup)
    check_layout(cfg, layout)    -> refuse a store that lacks what a term needs (setup)
    build_modules(inputs)        -> the router, projections, projector (setup)
    part_weights(cfg, weights)   -> the weight of every logged term at a step (the loss, the logs)
    learner.Learner              -> one micro-batch's loss: the student forward + the terms whose weight > 0

Which terms are on in a run is ``curriculum.terms_on`` (base weight > 0 and not disabled; lm always is), the
one answer training and eval share; at a step a term is computed when one of its parts weighs > 0. To add a
term: its schedule in ``config.TERM_SCHEDULES`` (with its ``CurriculumConfig`` weight, and ramp), its loss in
losses/, and one entry in ``TERMS`` here. To add a kd mode: its name in ``config.KD_MODES`` and one entry in
``KD_MODES`` here, which says what it reads, what the output-layer pass computes for it and what it builds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from distill.cache.schema import CacheError
from distill.cache.targets import kind_of, target_kind
from distill.config import TERM_SCHEDULES, TrainConfig
from distill.curriculum import terms_on
from distill.pipeline.losses.fused_head import lm_loss
from distill.pipeline.losses.kd import kd_tail_loss, projector_kd_loss, uld_loss
from distill.pipeline.losses.representation import (
    attention_span_loss,
    contrastive_loss,
    importance_loss,
    layerwise_loss,
    load_balance_loss,
    pool_attention_to_spans,
    routed_feature_loss,
)
from distill.pipeline.losses.sampled_kd import sampled_kd_loss
from distill.pipeline.train.router import (
    LogitProjector,
    StudentAwareRouter,
    StudentProjection,
    expert_usage,
)
from distill.pipeline.train.step_view import HeadPass, StepView

# --- the terms ------------------------------------------------------------------------------


def compute_lm(view: StepView) -> dict[str, Tensor]:
    raw = {"lm": view.head["lm"]}
    if view.head["lm_unaligned"] is not None:
        raw["lm_unaligned"] = view.head["lm_unaligned"]
    return raw


def compute_kd(view: StepView) -> dict[str, Tensor]:
    return KD_MODES[view.cfg.kd_mode].compute(view)


def compute_kd_projector(view: StepView) -> dict[str, Tensor]:
    projected = view.learner.aux["projector"](view.sig.vocab_proj[view.b, view.tp])  # (N, Vs); fp16 cast inside
    # The projector is itself trained: anchor it on the next student token, and let the student
    # match a detached projection (otherwise both sides could drift to agree on anything).
    next_tokens = view.labels[view.b, view.sp]  # -100 at a row's last position (ignored)
    return {
        "kd": projector_kd_loss(view.aligned_logits, projected.detach(), view.cfg.temperature),
        "projector_anchor": lm_loss(projected[:, None], next_tokens[:, None]),
    }


def compute_kd_uld(view: StepView) -> dict[str, Tensor]:
    b, tp, sig = view.b, view.tp, view.sig
    return {
        "kd": uld_loss(
            view.aligned_logits, sig.topk_logits[b, tp], sig.lse[b, tp, view.facts.t_index], view.cfg.temperature
        )
    }


def compute_kd_tail(view: StepView) -> dict[str, Tensor]:
    kd = view.head["kd"]  # fused into the output-layer pass
    if kd is not None:
        return {"kd": kd}
    ids, logits, lse = view.kd_inputs()
    if view.kd_multiplier is not None:  # sampled targets: the unbiased estimate of the full KL
        return {"kd": sampled_kd_loss(view.aligned_logits, ids, logits, view.kd_multiplier, lse, view.cfg.temperature)}
    return {"kd": kd_tail_loss(view.aligned_logits, ids, logits, lse, view.cfg.temperature)}


def compute_kd_prefix(view: StepView) -> dict[str, Tensor]:
    """Shared-prefix bins ([prefix-bin note] in prefix_map.py); with one tokenizer every token is its own bin.

    Sampled targets (``--targets sampled|hybrid``) train with the unbiased estimate over the exact map instead
    (``compute_kd_tail``): binning draws would need their own importance weights per bin."""
    if view.facts.prefix_bins is None or view.kd_multiplier is not None:
        return compute_kd_tail(view)
    return {"kd": view.head["kd"]}  # fused into the output-layer pass (StepView.prefix_fused)


def compute_kd_alm(view: StepView) -> dict[str, Tensor]:
    return {"kd": view.alm}


def compute_alm(view: StepView) -> dict[str, Tensor]:
    return {"alm": view.alm}


def compute_feature(view: StepView) -> dict[str, Tensor]:
    """The student-aware router's feature term and its balance, importance and attention-alignment terms."""
    router, on = view.learner.aux["router"], view.on
    teacher_h = {layer: view.teacher_hidden(layer) for layer in router.layers}
    routed = router(view.student_hidden(-1), teacher_h, with_attention="router_attention" in on)
    raw = {}
    if "feature" in on:
        raw["feature"] = routed_feature_loss(routed.router_probs, routed.expert_error)
    if "router_balance" in on:
        raw["router_balance"] = load_balance_loss(routed.router_probs, routed.expert_index)
    if "router_importance" in on:
        raw["router_importance"] = importance_loss(routed.router_probs)
    if routed.attention_alignment is not None:
        raw["router_attention"] = routed.attention_alignment
    view.logs["expert_usage"] = expert_usage(routed.router_probs.detach())
    return raw


def compute_attention(view: StepView) -> dict[str, Tensor]:
    """Mean over mapped (student block, teacher block) pairs of the per-query KL on student key spans (text keys)."""
    b, tp, sp = view.b, view.tp, view.sp
    key_spans = view.batch.key_spans.to(view.learner.device)
    terms = []
    for s_block, t_block in view.facts.attention_map.items():
        values, ids = view.sig.attn[t_block]
        student_rows = view.out.attentions[s_block - 1].float().mean(dim=1)[b, sp]  # (N, Ls) head-averaged
        head, rest, mapped = pool_attention_to_spans(values[b, tp], ids[b, tp], key_spans[b], student_rows.shape[-1])
        terms.append(attention_span_loss(student_rows, head, rest, mapped))
    return {"attention": torch.stack(terms).mean()}


def compute_layerwise(view: StepView) -> dict[str, Tensor]:
    projections = view.learner.aux["layerwise"]
    losses = [
        layerwise_loss(projections[str(i)](view.student_hidden(i)), view.teacher_hidden(m))  # normalized inside
        for i, m in view.facts.layer_map.items()
    ]
    return {"layerwise": torch.stack(losses).mean()}


def compute_contrastive(view: StepView) -> dict[str, Tensor]:
    last = max(view.facts.stats)  # the deepest cached teacher layer
    student = view.learner.aux["contrastive"](view.student_hidden(-1))
    return {"contrastive": contrastive_loss(student, view.teacher_hidden(last), view.cfg.contrastive_temperature)}


@dataclass
class BuildInputs:
    """What the modules beside the student are sized from."""

    cfg: TrainConfig
    layout: dict[str, Any]  # the store's layout
    student: Any
    layer_map: dict[int, int]

    @property
    def student_dim(self) -> int:
        return self.student.config.hidden_size

    @property
    def teacher_layers(self) -> list[int]:
        return [layer for layer in self.layout["hidden_layers"] if layer > 0]


def build_router(x: BuildInputs) -> dict[str, nn.Module]:
    layers = {layer: x.layout["hidden_dim"] for layer in x.teacher_layers}
    return {"router": StudentAwareRouter(x.student_dim, layers, top_k=x.cfg.router_top_k)}


def build_layerwise(x: BuildInputs) -> dict[str, nn.Module]:
    dim = x.layout["hidden_dim"]
    return {"layerwise": nn.ModuleDict({str(i): StudentProjection(x.student_dim, dim) for i in x.layer_map})}


def build_contrastive(x: BuildInputs) -> dict[str, nn.Module]:
    return {"contrastive": StudentProjection(x.student_dim, x.layout["hidden_dim"])}


def build_kd(x: BuildInputs) -> dict[str, nn.Module]:
    return KD_MODES[x.cfg.kd_mode].build(x)


def build_projector(x: BuildInputs) -> dict[str, nn.Module]:
    return {"projector": LogitProjector(x.layout["teacher_hidden_size"], x.student.get_output_embeddings())}


def check_hidden_layers(cfg: TrainConfig, layout: dict[str, Any]) -> str | None:
    if [layer for layer in layout["hidden_layers"] if layer > 0]:
        return None
    return (
        "the feature/layerwise/contrastive terms need teacher hidden states of blocks >= 1, the store has layers "
        f"{layout['hidden_layers']}; re-cache with --hidden-layers, or set curriculum.feature, curriculum.layerwise "
        "and curriculum.contrastive to 0 (--objective kd-only or ce)"
    )


def check_attention_maps(cfg: TrainConfig, layout: dict[str, Any]) -> str | None:
    if layout["attention_layers"]:
        return None
    return (
        "the attention term is on (curriculum.attention > 0) but the store has no attention maps; re-cache with "
        "--attention-layers, or pass --set curriculum.attention=0 (--objective kd-only or ce: no attention term)"
    )


def check_kd_targets(cfg: TrainConfig, layout: dict[str, Any]) -> str | None:
    kind = target_kind(layout)
    mode = KD_MODES[cfg.kd_mode]
    if "kd" not in mode.signals or not kind_of(layout).sampled:
        return None
    if not mode.reads_draws:
        return (
            f"kd_mode={cfg.kd_mode} compares the teacher's top-K probabilities rank by rank, and {kind} targets hold "
            "draws, not the top-K; use kd_mode tail or prefix, or re-cache with --targets topk"
        )
    if cfg.temperature == 1.0:
        return None
    return (
        f"--set temperature={cfg.temperature:g} with {kind} targets: their draws are made at T=1 and re-weighted "
        "to another T would train with several times the variance (and a bias where a drawn logit is clamped); "
        "train at temperature=1, or re-cache with --targets topk for kd at another temperature"
    )


def no_check(cfg: TrainConfig, layout: dict[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class KdMode:
    """One way to compute the kd term (``TrainConfig.kd_mode``)."""

    signals: frozenset[str]  # teacher signal families it reads (signals.signal_fields)
    compute: Callable[[StepView], dict[str, Tensor]]
    parts: tuple[str, ...] = ("kd",)  # logged terms, each weighing kd's weight
    head_pass: HeadPass = HeadPass()  # what the output-layer pass computes for it (StepView.head)
    tail_bin: bool = False  # the head against one tail bin: warned when the head holds little mass
    reads_draws: bool = True  # takes sampled targets' draws (uld reads the head rank by rank: it cannot)
    build: Callable[[BuildInputs], dict[str, nn.Module]] = lambda x: {}  # trainable modules it adds


KD_MODES: dict[str, KdMode] = {
    "tail": KdMode(frozenset({"kd"}), compute_kd_tail, head_pass=HeadPass(fused=True), tail_bin=True),
    "projector": KdMode(
        frozenset({"projector"}), compute_kd_projector, parts=("kd", "projector_anchor"), build=build_projector
    ),
    "uld": KdMode(frozenset({"kd"}), compute_kd_uld, reads_draws=False),
    "prefix": KdMode(
        frozenset({"kd"}), compute_kd_prefix, head_pass=HeadPass(fused=True, prefix_bins=True), tail_bin=True
    ),
    "alm": KdMode(frozenset({"alm"}), compute_kd_alm, head_pass=HeadPass(chunks=True)),
}


@dataclass(frozen=True)
class Term:
    """One loss term: its inputs, its modules, its weights and its computation."""

    name: str
    """The curriculum weight it follows (``CurriculumConfig``; lm weighs 1 - kd)."""
    weights: Callable[[TrainConfig, dict[str, float]], dict[str, float]]
    """Curriculum weights of a step -> the weight of each part it logs as ``loss/<part>``."""
    compute: Callable[[StepView], dict[str, Tensor]]
    """The parts' raw values (only those whose weight is > 0 need be computed)."""
    signals: Callable[[TrainConfig], frozenset[str]] = lambda cfg: frozenset()
    """Teacher signal families it reads: kd, projector, alm, hidden, attention (signals.signal_fields)."""
    student_outputs: frozenset[str] = frozenset()
    """Extra student outputs it reads: hidden_states, attentions (the latter needs eager attention)."""
    build: Callable[[BuildInputs], dict[str, nn.Module]] = lambda x: {}
    """Trainable modules it adds beside the student (names in ``Learner.aux``)."""
    check: Callable[[TrainConfig, dict[str, Any]], str | None] = no_check
    """What the store's layout lacks for this term and how to fix it (None: nothing)."""
    autocast: bool = True
    """Computed under the run's autocast (the output-layer terms); the hidden-state terms run in fp32."""

    @property
    def schedule(self) -> str:
        """The kind of its schedule: constant, complement or ramp (``config.TERM_SCHEDULES``)."""
        return TERM_SCHEDULES[self.name]


HIDDEN = frozenset({"hidden_states"})
TERMS: tuple[Term, ...] = (
    Term("lm", lambda cfg, w: {"lm": w["lm"], "lm_unaligned": w["kd"]}, compute_lm),  # [unaligned-lm note]
    Term(
        "kd",
        lambda cfg, w: dict.fromkeys(KD_MODES[cfg.kd_mode].parts, w["kd"]),
        compute_kd,
        signals=lambda cfg: KD_MODES[cfg.kd_mode].signals,
        build=build_kd,
        check=check_kd_targets,
    ),
    Term("alm", lambda cfg, w: {"alm": w["alm"]}, compute_alm, signals=lambda cfg: frozenset({"alm"})),
    Term(
        "feature",
        lambda cfg, w: {
            "feature": w["feature"],
            "router_balance": w["feature"] * cfg.balance_coef,
            "router_importance": w["feature"] * cfg.importance_coef,
            "router_attention": w["attention"] * cfg.router_attention_coef,
        },
        compute_feature,
        signals=lambda cfg: frozenset({"hidden"}),
        student_outputs=HIDDEN,
        build=build_router,
        check=check_hidden_layers,
        autocast=False,
    ),
    Term(
        "attention",
        lambda cfg, w: {"attention": w["attention"]},
        compute_attention,
        signals=lambda cfg: frozenset({"attention"}),
        student_outputs=frozenset({"attentions"}),
        check=check_attention_maps,
        autocast=False,
    ),
    Term(
        "layerwise",
        lambda cfg, w: {"layerwise": w["layerwise"]},
        compute_layerwise,
        signals=lambda cfg: frozenset({"hidden"}),
        student_outputs=HIDDEN,
        build=build_layerwise,
        check=check_hidden_layers,
        autocast=False,
    ),
    Term(
        "contrastive",
        lambda cfg, w: {"contrastive": w["contrastive"]},
        compute_contrastive,
        signals=lambda cfg: frozenset({"hidden"}),
        student_outputs=HIDDEN,
        build=build_contrastive,
        check=check_hidden_layers,
        autocast=False,
    ),
)


# --- what the rest of stage 2 asks the table -----------------------------------------------


def run_terms(cfg: TrainConfig) -> list[Term]:
    """The terms on in this run, in table order."""
    on = set(terms_on(cfg.curriculum))
    return [term for term in TERMS if term.name in on]


def needed_signals(cfg: TrainConfig) -> set[str]:
    """The teacher signal families the run's terms read (kd, projector, hidden, attention)."""
    return {family for term in run_terms(cfg) for family in term.signals(cfg)}


def check_layout(cfg: TrainConfig, layout: dict[str, Any]) -> None:
    """Refuse a store that lacks what the run's terms need: one CacheError naming every problem and its fix."""
    problems = dict.fromkeys(filter(None, (term.check(cfg, layout) for term in run_terms(cfg))))
    if problems:
        raise CacheError(f"{cfg.cache}: " + "; and ".join(problems))


def build_modules(inputs: BuildInputs) -> nn.ModuleDict:
    """Trainable modules beside the student: all on the student side (teacher targets stay fixed)."""
    torch.manual_seed(inputs.cfg.seed)
    modules = nn.ModuleDict()
    for term in run_terms(inputs.cfg):
        modules.update(term.build(inputs))
    return modules


def part_weights(cfg: TrainConfig, weights: dict[str, float]) -> dict[str, float]:
    """Curriculum weights of a step -> the weight of every logged term of every term in the table."""
    return {part: value for term in TERMS for part, value in term.weights(cfg, weights).items()}
