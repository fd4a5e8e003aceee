"""Loss-weight curriculum over optimizer steps.

Default schedule (fractions of the total optimizer steps):

    0-10%    kd + lm only
    10-40%   feature and attention ramp 0 -> full
    40-70%   layerwise ramps 0 -> full
    70-100%  contrastive ramps 0 -> full

`lm` always weighs (1 - kd). A term whose weight is 0 is not computed by the loop:

    weights = weights_at(step, total_steps, cfg.curriculum)     # {'kd': 0.7, 'lm': 0.3, ...}
    for term in enabled_terms(weights): ...

The settings are ``config.CurriculumConfig``. Baselines are presets of `disabled` (`--objective` of
`distill train`, see ``config.OBJECTIVES``): `ce` disables
every distillation term, so lm weighs 1; `kd-only` keeps kd + lm; `full` (default) keeps them all.
"""

from __future__ import annotations

from distill.config import RAMPED_TERMS, CurriculumConfig

TERMS = ("kd", "lm", "alm", *RAMPED_TERMS)


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
    kd = cfg.base_weight("kd")
    weights = {"kd": kd, "lm": 1.0 - kd, "alm": cfg.base_weight("alm")}
    for term in RAMPED_TERMS:
        start, end = getattr(cfg, f"{term}_ramp")
        on = progress >= cfg.kd_only_until
        weights[term] = cfg.base_weight(term) * compute_ramp(progress, start, end) if on else 0.0
    return weights


def enabled_terms(weights: dict[str, float]) -> set[str]:
    """Terms with weight > 0: the only ones the training loop computes."""
    return {term for term, weight in weights.items() if weight > 0}


def active_terms(cfg: CurriculumConfig) -> list[str]:
    """The terms that weigh at some point of the run (base weight > 0, not disabled); lm always does."""
    terms = [t for t in ("kd", "alm", *RAMPED_TERMS) if cfg.base_weight(t) > 0]
    return [*(["kd"] if "kd" in terms else []), "lm", *(t for t in terms if t != "kd")]


def eval_weights(cfg: CurriculumConfig) -> dict[str, float]:
    """The fixed weights evals are scored with (base kd, lm = 1 - kd, every ramped term 0), so that evals are
    comparable across the run."""
    kd = cfg.base_weight("kd")
    return {"kd": kd, "lm": 1.0 - kd, "alm": cfg.base_weight("alm"), **dict.fromkeys(RAMPED_TERMS, 0.0)}
