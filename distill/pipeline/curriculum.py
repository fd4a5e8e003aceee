"""Loss-weight curriculum over optimizer steps.

Default schedule (fractions of the total optimizer steps):

    0-10%    kd + lm only
    10-40%   feature and attention ramp 0 -> full
    40-70%   layerwise ramps 0 -> full
    70-100%  contrastive ramps 0 -> full

`lm` always weighs (1 - kd). A term whose weight is 0 is not computed by the loop:

    weights = weights_at(step, total_steps, cfg.curriculum)     # {'kd': 0.7, 'lm': 0.3, ...}
    for term in enabled_terms(weights): ...

Baselines are presets of `disabled` (`--objective` of `distill train`, see OBJECTIVES): `ce` disables
every distillation term, so lm weighs 1; `kd-only` keeps kd + lm; `full` (default) keeps them all.
"""

from __future__ import annotations

from dataclasses import dataclass

TERMS = ("kd", "lm", "alm", "feature", "attention", "layerwise", "contrastive")
RAMPED_TERMS = ("feature", "attention", "layerwise", "contrastive")
OBJECTIVES: dict[str, tuple[str, ...]] = {
    "full": (),
    "kd-only": RAMPED_TERMS,
    "ce": ("kd", "alm", *RAMPED_TERMS),
}
"""Training objective presets -> the terms each one disables (added to ``curriculum.disabled``)."""


@dataclass
class CurriculumConfig:
    """Per-term base weights and the phases, as fractions of the run's total optimizer steps."""

    kd: float = 0.7
    """Weight of the teacher top-K KD term, on from step 0; in [0, 1). lm weighs 1 - kd."""
    alm: float = 0.0
    """Weight of the ALM chunk-likelihood term (xtok_losses.alm_loss), on from step 0 next to kd and lm; 0 = off.
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

    def _validate_weights(self) -> None:
        for name in ("kd", "alm", *RAMPED_TERMS):
            if not getattr(self, name) >= 0:
                raise ValueError(f"curriculum.{name} must be >= 0, got {getattr(self, name)}")
        if not self.kd < 1:
            raise ValueError(f"curriculum.kd must be < 1 so that lm (weight 1 - kd) stays on, got {self.kd}")

    def _validate_phases(self) -> None:
        if not 0 <= self.kd_only_until <= 1:
            raise ValueError(f"curriculum.kd_only_until must be in [0, 1], got {self.kd_only_until}")
        for term in RAMPED_TERMS:
            name = f"{term}_ramp"
            ramp = tuple(getattr(self, name))
            if len(ramp) != 2:
                raise ValueError(f"curriculum.{name} must be (start, end), got {ramp}")
            start, end = float(ramp[0]), float(ramp[1])
            if not (0 <= start <= 1 and 0 <= end <= 1):
                raise ValueError(f"curriculum.{name} fractions must be in [0, 1], got {ramp}")
            if start > end:
                raise ValueError(f"curriculum.{name} needs start <= end, got {ramp}")
            setattr(self, name, (start, end))  # YAML gives lists

    def _validate_disabled(self) -> None:
        names = (self.disabled,) if isinstance(self.disabled, str) else tuple(self.disabled)
        unknown = sorted(set(names) - {"kd", "alm", *RAMPED_TERMS})
        if unknown:
            hint = " (lm is always on; lower kd instead)" if "lm" in unknown else ""
            raise ValueError(f"curriculum.disabled has unknown terms {unknown}{hint}; allowed: kd, alm, {RAMPED_TERMS}")
        self.disabled = tuple(sorted(set(names)))


def compute_ramp(progress: float, start: float, end: float) -> float:
    """Share of full weight at `progress`: 0 before start, linear in [start, end], 1 after; start == end jumps."""
    if progress < start:
        return 0.0
    if progress >= end:
        return 1.0
    return (progress - start) / (end - start)


def weights_at(step: int, total_steps: int, cfg: CurriculumConfig) -> dict[str, float]:
    """Weights of every term in TERMS at optimizer step `step` of `total_steps` (progress = step / total)."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step / total_steps, 1.0)
    kd = 0.0 if "kd" in cfg.disabled else cfg.kd
    weights = {"kd": kd, "lm": 1.0 - kd, "alm": 0.0 if "alm" in cfg.disabled else cfg.alm}
    for term in RAMPED_TERMS:
        start, end = getattr(cfg, f"{term}_ramp")
        on = term not in cfg.disabled and progress >= cfg.kd_only_until
        weights[term] = getattr(cfg, term) * compute_ramp(progress, start, end) if on else 0.0
    return weights


def enabled_terms(weights: dict[str, float]) -> set[str]:
    """Terms with weight > 0: the only ones the training loop computes."""
    return {term for term, weight in weights.items() if weight > 0}


def apply_objective(cfg: CurriculumConfig, objective: str) -> None:
    """Disable the terms the ``objective`` preset leaves out (on top of any already disabled)."""
    cfg.disabled = tuple(sorted({*cfg.disabled, *OBJECTIVES[objective]}))


def active_terms(cfg: CurriculumConfig) -> list[str]:
    """The terms that weigh at some point of the run (base weight > 0, not disabled); lm always does."""
    terms = [t for t in ("kd", "alm", *RAMPED_TERMS) if getattr(cfg, t) > 0 and t not in cfg.disabled]
    return [*(["kd"] if "kd" in terms else []), "lm", *(t for t in terms if t != "kd")]
