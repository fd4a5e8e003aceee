"""Stage 1 stores the teacher's own output logits for every supported family, see [logit-postprocess note].

Each family's tiny random model is built with ``from_config``, saved, cached through the real CLI and compared
with ``model(...).logits``; families that transform their logits after the head get a transform large enough
to matter (the test checks that it does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from distill.cache.reader import CacheReader
from distill.cli import app
from distill.config import ConfigError
from distill.pipeline.demo import build_model
from distill.pipeline.teacher.model import TeacherSource, load_teacher
from tests.helpers import cache_args

TEMPS = [1.0, 2.0]
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=0,
)


def family_config(family: str, vocab_size: int):
    """(config, name of the logit transform it sets or None)."""
    import transformers as tf

    extra: dict = {}
    cls, transform = {
        "llama": (tf.LlamaConfig, None),
        "qwen3": (tf.Qwen3Config, None),
        "qwen3_moe": (tf.Qwen3MoeConfig, None),
        "gemma2": (tf.Gemma2Config, "final_logit_softcapping"),
        "gemma3_text": (tf.Gemma3TextConfig, "final_logit_softcapping"),
        "cohere": (tf.CohereConfig, "logit_scale"),
        "granite": (tf.GraniteConfig, "logits_scaling"),
    }[family]
    if family == "qwen3_moe":
        extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    if family.startswith("gemma"):
        extra = dict(final_logit_softcapping=2.0, query_pre_attn_scalar=8)
    if family == "cohere":
        extra = dict(logit_scale=0.25)
    if family == "granite":
        extra = dict(logits_scaling=4.0)
    return cls(vocab_size=vocab_size, **COMMON, **extra), transform


def build_family_teacher(family: str, tiny_assets, out: Path) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    config, _ = family_config(family, len(tokenizer))
    model = build_model(config, out, tokenizer, seed=0)
    with torch.no_grad():  # logits of O(5), so that a cap at 2 or a scale changes them visibly
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "cohere", "granite"])
def test_stored_logits_are_the_models_own(family, tiny_assets, tmp_path, single_thread):
    from transformers import AutoModelForCausalLM

    teacher = build_family_teacher(family, tiny_assets, tmp_path / "teacher")
    out = tmp_path / "store"
    args = cache_args(
        tiny_assets,
        out,
        teacher=teacher,
        max_rows=6,
        hidden_layers="2",
        attention_layers="2",
        temperatures="1,2",
        vocab_proj=None,
        packing="none",  # each row is compared with the model on it alone (packed rows: test_packing.py)
    )
    result = CliRunner().invoke(app, ["cache-teacher", *args])
    assert result.exit_code == 0, result.output

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, attn_implementation="eager").eval()
    _, transform = family_config(family, model.config.vocab_size)
    reader = CacheReader(str(out))
    batch = reader.read_rows(range(reader.num_rows))
    assert reader.num_rows == 6
    for r in range(reader.num_rows):
        n = int(batch["length"][r])
        ids = batch["input_ids"][r, :n]
        with torch.no_grad():
            out_model = model(input_ids=ids[None], output_attentions=True)
            logits = out_model.logits[0].float()  # (n, V), the model's own
            raw = model.get_output_embeddings()(model.model(input_ids=ids[None]).last_hidden_state[0])
        if transform is not None:  # the transform matters here, so storing raw logits would fail below
            assert (raw - logits).abs().max() > 0.5
        top = logits.topk(batch["topk_ids"].shape[-1], dim=-1)
        assert torch.equal(batch["topk_ids"][r, :n], top.indices)
        torch.testing.assert_close(batch["topk_logits"][r, :n].float(), top.values, atol=5e-3, rtol=1e-3)
        for ti, t in enumerate(TEMPS):
            torch.testing.assert_close(batch["lse"][r, :n, ti], torch.logsumexp(logits / t, -1), atol=1e-5, rtol=1e-5)
        ref_target = torch.log_softmax(logits, -1)[:-1].gather(1, ids[1:, None])[:, 0]
        torch.testing.assert_close(batch["target_logprob"][r, : n - 1], ref_target, atol=1e-5, rtol=1e-5)
        # attention maps (Gemma 2 caps its attention logits too, which sdpa cannot do)
        ref_attn = out_model.attentions[1][0].float().mean(0).topk(min(8, n), dim=-1).values  # (n, <= 8)
        stored_attn = batch["attn/2"][r, :n, : ref_attn.shape[1]].float()
        torch.testing.assert_close(stored_attn, ref_attn, atol=1e-3, rtol=1e-3)


def test_a_head_that_is_not_linear_is_refused(tiny_assets, tmp_path):
    teacher = build_family_teacher("llama", tiny_assets, tmp_path / "teacher")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))
    from distill.pipeline.teacher.model import find_logit_transforms

    with pytest.raises(ConfigError, match="not a linear map"):
        find_logit_transforms(model)


def test_an_unknown_logit_setting_is_refused(tiny_assets, tmp_path):
    teacher = build_family_teacher("llama", tiny_assets, tmp_path / "teacher")
    import json

    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "output_logit_multiplier": 3.0}))
    with pytest.raises(ConfigError, match="output_logit_multiplier=3.0"):
        load_teacher(TeacherSource(str(teacher)), torch.device("cpu"), torch.float32, need_attention=False)


def test_a_transform_the_model_does_not_apply_is_caught_by_its_own_forward(tiny_assets, tmp_path):
    """A Llama config carrying Gemma's softcap attribute: Llama ignores it, so applying it would be wrong."""
    teacher = build_family_teacher("llama", tiny_assets, tmp_path / "teacher")
    import json

    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "final_logit_softcapping": 2.0}))
    with pytest.raises(ConfigError, match="output logits differ"):
        load_teacher(TeacherSource(str(teacher)), torch.device("cpu"), torch.float32, need_attention=False)
