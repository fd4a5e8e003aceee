"""How a model's tokenizer turns a row's text into the input the model was trained on.

[input-as-trained note] A model sees its text the way it was trained: with the tokens its
tokenizer puts before the text (Gemma's and Llama's ``<bos>``; Qwen3 and SmolLM put none)
and nothing else that changes the text (no EOS, no chat template). Those prefix tokens have
the span (0, 0): they consume no text, are never a prediction target and never aligned. The
prediction made *at* the prefix is the model's prediction of the first text token, so a model
with a BOS scores every byte of a row, and one without cannot score its first token.
"""

from __future__ import annotations

from typing import Any

_PROBE = "a"


def prefix_ids(tokenizer: Any) -> list[int]:
    """The ids ``tokenizer`` puts before any text when it adds its special tokens (its BOS), else ``[]``.

    Found by comparing the encoding of a probe text with and without special tokens, so it
    follows the tokenizer's own post-processor rather than a ``bos_token`` attribute that many
    tokenizers set without ever adding it. Tokens added after the text (an EOS) are left out.
    """
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return [int(i) for i in full[:start]]
    return []
