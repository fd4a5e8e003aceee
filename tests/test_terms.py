"""The loss-term table: what each objective reads, how the logged parts weigh, what a store must hold."""

from __future__ import annotations

import pytest

from distill import config
from distill.cache.schema import CacheError
from distill.config import TrainConfig
from distill.curriculum import weights_at
from distill.pipeline.train.terms import KD_MODES, TERMS, check_layout, needed_signals, part_weights, run_terms


def test_every_kd_mode_the_config_accepts_is_computed_and_back():
    assert set(KD_MODES) == set(config.KD_MODES)


@pytest.mark.parametrize(
    ("settings", "terms", "signals"),
    [
        ({}, ["lm", "kd", "feature", "attention", "layerwise", "contrastive"], {"kd", "hidden", "attention"}),
        ({"objective": "kd-only"}, ["lm", "kd"], {"kd"}),
        ({"objective": "ce"}, ["lm"], set()),
        ({"objective": "kd-only", "kd_mode": "projector"}, ["lm", "kd"], {"projector"}),
        ({"objective": "kd-only", "kd_mode": "uld"}, ["lm", "kd"], {"kd"}),
        ({"objective": "kd-only", "kd_mode": "prefix"}, ["lm", "kd"], {"kd"}),
        ({"objective": "kd-only", "kd_mode": "alm"}, ["lm", "kd"], {"alm"}),
        ({"objective": "kd-only", "curriculum": {"alm": 0.5}}, ["lm", "kd", "alm"], {"kd", "alm"}),
        ({"objective": "ce", "curriculum": {"alm": 0.5}}, ["lm"], set()),
        ({"curriculum": {"feature": 0, "layerwise": 0, "contrastive": 0}}, ["lm", "kd", "attention"],
         {"kd", "attention"}),
        ({"curriculum": {"disabled": ["attention"]}}, ["lm", "kd", "feature", "layerwise", "contrastive"],
         {"kd", "hidden"}),
    ],
)  # fmt: skip
def test_the_objective_decides_the_terms_and_the_fields_read(settings, terms, signals):
    cfg = TrainConfig(**settings)
    assert [t.name for t in run_terms(cfg)] == terms
    assert needed_signals(cfg) == signals


def test_part_weights_follow_the_curriculum_by_hand():
    cfg = TrainConfig(balance_coef=0.5, importance_coef=0.25, router_attention_coef=0.1, kd_mode="projector")
    w = {"kd": 0.7, "lm": 0.3, "alm": 0.4, "feature": 0.1, "attention": 0.2, "layerwise": 0.0, "contrastive": 0.05}
    assert part_weights(cfg, w) == pytest.approx(
        {
            "lm": 0.3,
            "lm_unaligned": 0.7,
            "kd": 0.7,
            "projector_anchor": 0.7,
            "alm": 0.4,
            "feature": 0.1,
            "router_balance": 0.05,
            "router_importance": 0.025,
            "router_attention": 0.02,
            "attention": 0.2,
            "layerwise": 0.0,
            "contrastive": 0.05,
        }
    )
    # every curriculum weight is some term's (the table and the curriculum name the same terms)
    assert {t.name for t in TERMS} == set(weights_at(0, 10, cfg.curriculum))


def test_a_store_without_hidden_states_or_attention_maps_is_refused_with_both_fixes():
    layout = {"hidden_layers": [0], "attention_layers": []}
    with pytest.raises(CacheError) as err:
        check_layout(TrainConfig(cache="store"), layout)
    message = str(err.value)
    assert message.startswith("store: ") and message.count("hidden states of blocks >= 1") == 1
    assert "no attention maps" in message and "--attention-layers" in message and "--hidden-layers" in message
    check_layout(TrainConfig(cache="store", objective="kd-only"), layout)  # nothing to refuse
