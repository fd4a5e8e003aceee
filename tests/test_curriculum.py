"""Curriculum schedule: phase boundaries, ramp midpoints, lm = 1 - kd, validation messages."""

from __future__ import annotations

import pytest

from distill.config import TERM_SCHEDULES, CurriculumConfig
from distill.curriculum import terms_on, weights_at

TERMS = tuple(TERM_SCHEDULES)


def enabled_terms(weights: dict[str, float]) -> set[str]:
    return {term for term, weight in weights.items() if weight > 0}


TOTAL = 1000
RAMPED = ("feature", "attention", "layerwise", "contrastive")


def test_kd_only_phase_at_5_percent():
    weights = weights_at(50, TOTAL, CurriculumConfig())
    assert set(weights) == set(TERMS)
    assert all(weights[term] == 0.0 for term in RAMPED)
    assert weights["kd"] == 0.7
    assert weights["lm"] == pytest.approx(0.3, abs=1e-12)
    assert enabled_terms(weights) == {"kd", "lm"}


def test_feature_and_attention_half_at_25_percent():
    cfg = CurriculumConfig()
    weights = weights_at(250, TOTAL, cfg)
    assert weights["feature"] == pytest.approx(cfg.feature / 2, rel=1e-12)
    assert weights["attention"] == pytest.approx(cfg.attention / 2, rel=1e-12)
    assert weights["layerwise"] == 0.0
    assert weights["contrastive"] == 0.0
    assert enabled_terms(weights) == {"kd", "lm", "feature", "attention"}


def test_layerwise_half_at_55_percent():
    cfg = CurriculumConfig()
    weights = weights_at(550, TOTAL, cfg)
    assert weights["feature"] == cfg.feature
    assert weights["attention"] == cfg.attention
    assert weights["layerwise"] == pytest.approx(cfg.layerwise / 2, rel=1e-12)
    assert weights["contrastive"] == 0.0


def test_contrastive_half_at_85_percent():
    cfg = CurriculumConfig()
    weights = weights_at(850, TOTAL, cfg)
    assert weights["layerwise"] == cfg.layerwise
    assert weights["contrastive"] == pytest.approx(cfg.contrastive / 2, rel=1e-12)


def test_everything_full_at_100_percent_and_beyond():
    cfg = CurriculumConfig()
    expected = {"kd": 0.7, "feature": 0.1, "attention": 0.1, "layerwise": 0.1, "contrastive": 0.05}
    for step in (TOTAL, TOTAL + 7):
        weights = weights_at(step, TOTAL, cfg)
        assert {term: weights[term] for term in expected} == expected
        assert enabled_terms(weights) == set(TERMS) - {"alm"}  # ALM is off unless curriculum.alm > 0
        assert weights["alm"] == 0.0 and weights_at(step, TOTAL, CurriculumConfig(alm=0.3))["alm"] == 0.3


def test_lm_is_one_minus_kd_at_every_step():
    for cfg in (CurriculumConfig(), CurriculumConfig(kd=0.25), CurriculumConfig(kd=0.0)):
        for step in range(0, 101):
            weights = weights_at(step, 100, cfg)
            assert weights["lm"] == pytest.approx(1.0 - weights["kd"], abs=1e-12)
            assert weights["lm"] > 0


def test_ramp_is_monotone_and_linear():
    cfg = CurriculumConfig()
    values = [weights_at(step, TOTAL, cfg)["feature"] for step in range(100, 401, 30)]
    assert values == sorted(values)
    assert values[0] == 0.0 and values[-1] == cfg.feature
    steps = [(values[i + 1] - values[i]) for i in range(len(values) - 1)]
    assert steps == pytest.approx([cfg.feature / 10] * 10, rel=1e-9)


def test_zero_width_ramp_jumps():
    cfg = CurriculumConfig(contrastive_ramp=(0.5, 0.5))
    assert weights_at(499, TOTAL, cfg)["contrastive"] == 0.0
    assert weights_at(500, TOTAL, cfg)["contrastive"] == cfg.contrastive


def test_kd_only_phase_overrides_an_earlier_ramp():
    cfg = CurriculumConfig(feature_ramp=(0.0, 0.2), kd_only_until=0.1)
    assert weights_at(50, TOTAL, cfg)["feature"] == 0.0
    assert weights_at(100, TOTAL, cfg)["feature"] == pytest.approx(cfg.feature / 2)


def test_ce_only_baseline_disables_kd_and_lm_takes_all():
    cfg = CurriculumConfig(disabled={"kd", "feature", "attention", "layerwise", "contrastive"})
    assert cfg.disabled == ("attention", "contrastive", "feature", "kd", "layerwise")
    for step in (0, 300, 1000):
        weights = weights_at(step, TOTAL, cfg)
        assert weights["kd"] == 0.0 and weights["lm"] == 1.0
        assert enabled_terms(weights) == {"lm"}


def test_disabling_one_term_leaves_the_others():
    weights = weights_at(TOTAL, TOTAL, CurriculumConfig(disabled=["attention"]))
    assert weights["attention"] == 0.0
    assert weights["feature"] == 0.1
    assert "attention" not in enabled_terms(weights)


def test_yaml_lists_become_tuples():
    cfg = CurriculumConfig(feature_ramp=[0.2, 0.3])
    assert cfg.feature_ramp == (0.2, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"feature": -0.1}, "curriculum.feature"),
        ({"contrastive": float("nan")}, "curriculum.contrastive"),
        ({"kd": -1.0}, "curriculum.kd"),
        ({"kd": 1.0}, "curriculum.kd"),
        ({"kd_only_until": 1.5}, "curriculum.kd_only_until"),
        ({"feature_ramp": (0.5, 0.2)}, "curriculum.feature_ramp"),
        ({"attention_ramp": (-0.1, 0.2)}, "curriculum.attention_ramp"),
        ({"layerwise_ramp": (0.4, 1.2)}, "curriculum.layerwise_ramp"),
        ({"contrastive_ramp": (0.7,)}, "curriculum.contrastive_ramp"),
        ({"disabled": ("lm",)}, "curriculum.disabled"),
        ({"disabled": ("kdd",)}, "curriculum.disabled"),
    ],
)
def test_validation_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        CurriculumConfig(**kwargs)


def test_weights_at_rejects_bad_steps():
    with pytest.raises(ValueError, match="total_steps"):
        weights_at(0, 0, CurriculumConfig())
    with pytest.raises(ValueError, match="step"):
        weights_at(-1, 10, CurriculumConfig())


def test_terms_on_is_the_one_answer_for_training_and_eval():
    from distill.config import TrainConfig
    from distill.pipeline.train.terms import TERMS as TERM_TABLE
    from distill.pipeline.train.terms import run_terms

    assert sorted(term.name for term in TERM_TABLE) == sorted(TERM_SCHEDULES)  # a computation for each scheduled term
    assert {term.schedule for term in TERM_TABLE} == {"constant", "complement", "ramp"}
    assert terms_on(CurriculumConfig()) == ["kd", "lm", "feature", "attention", "layerwise", "contrastive"]
    assert terms_on(CurriculumConfig(disabled=["kd", "feature"], alm=0.2)) == [
        "lm",
        "alm",
        "attention",
        "layerwise",
        "contrastive",
    ]
    cfg = TrainConfig(objective="kd-only")
    assert {term.name for term in run_terms(cfg)} == set(terms_on(cfg.curriculum)) == {"kd", "lm"}


def test_no_module_lists_terms_outside_the_table():
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "distill"
    listing = re.compile(r"""["'](kd|lm|alm)["'],\s*["'](kd|lm|alm)["']|\*RAMPED_TERMS""")
    offenders = [
        f"{path.relative_to(package.parent)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        if path != package / "config.py"
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if listing.search(line)
    ]
    assert not offenders, "ask config.TERM_SCHEDULES or curriculum.terms_on instead: " + "; ".join(offenders)
