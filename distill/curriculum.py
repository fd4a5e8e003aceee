"""Loss-weight curriculum over optimizer steps.

Default schedule (fractions of the total optimizer steps):

    0-10%    kd + lm only
    10-40%   feature and attention ramp 0 -> full
    40-70%   layerwise ramps 0 -> full
    70-100%  contrastive ramps 0 -> full

`lm` always weighs (1 - kd). A term whose weight is 0 is not computed by the loop:

    weights = weights_at(step, total_steps, cfg.curriculum)     # {'kd': 0.7, 'lm': 0.3, ...}
    terms_on(cfg.curriculum)                                     # the terms that weigh at some step

The settings are ``config.CurriculumConfig``. Baselines are presets of `disabled` (`--objective` of
`distill train`, see ``config.OBJECTIVES``): `ce` disables
every distillation term, so lm weighs 1; `kd-only` keeps kd + lm; `full` (default) keeps them all.
"""

from __future__ import annotations

from distill.config import TERM_SCHEDULES, CurriculumConfig


def compute_ramp(progress: float, start: float, end: float) -> float:
    """Share of full weight at `progress`: 0 before start, linear in [start, end], 1 after; start == end jumps."""
    if progress < start:
        return 0.0
    if progress >= end:
        return 1.0
    return (progress - start) / (end - start)


def weights_at(step: int, total_steps: int, cfg: CurriculumConfig) -> dict[str, float]:
    """Weights of every term of ``config.TERM_SCHEDULES`` at optimizer step `step` of `total_steps` (progress =
    step / total), each by the kind of its schedule."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    progress = min(step / total_steps, 1.0)
    weights = {}
    for term, schedule in TERM_SCHEDULES.items():
        if schedule != "ramp":  # constant, and lm's complement of kd
            weights[term] = cfg.base_weight(term)
            continue
        start, end = getattr(cfg, f"{term}_ramp")
        on = progress >= cfg.kd_only_until
        weights[term] = cfg.base_weight(term) * compute_ramp(progress, start, end) if on else 0.0
    return weights


def terms_on(cfg: CurriculumConfig) -> list[str]:
    """The terms on in a run, in table order: those that weigh at some point (base weight > 0, not disabled); lm
    always is. Training computes these (terms.run_terms), eval reports them."""
    return [term for term in TERM_SCHEDULES if cfg.base_weight(term) > 0]


def eval_weights(cfg: CurriculumConfig) -> dict[str, float]:
    """The fixed weights evals are scored with (every term at its base weight but the ramped ones, at 0), so that
    evals are comparable across the run."""
    return {term: 0.0 if schedule == "ramp" else cfg.base_weight(term) for term, schedule in TERM_SCHEDULES.items()}
