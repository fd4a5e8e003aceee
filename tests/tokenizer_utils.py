"""Tiny tokenizers for tests, trained in memory in well under a second (no network).

    from tests.tokenizer_utils import build_corpus, train_byte_level_tokenizer, save_and_reload
    tokenizer = save_and_reload(train_byte_level_tokenizer(300), tmp_path / "tok")

The corpus mixes ASCII words, accented words (café, naïve), CJK (日本語の文章) and emoji
(👍🏽, 🧪), so that small vocabularies split characters into byte tokens and larger ones
merge them into words: two vocab sizes give two genuinely different tokenizations.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from distill.pipeline.demo import train_tokenizer

EOS = "<|endoftext|>"
SPECIAL_WORDS = [
    "café",
    "Café",
    "naïve",
    "résumé",
    "über",
    "日本語の文章",
    "東京",
    "👍🏽",
    "🧪",
    "the",
    "student",
    "teacher",
]
_SYLLABLES = ["ka", "to", "ri", "mu", "sen", "dor", "la", "vi", "qua", "ber", "stil", "on", "ex", "pra", "gul", "té"]


def build_corpus(num_sentences: int = 600, seed: int = 0) -> list[str]:
    """Deterministic sentences of made-up words plus the SPECIAL_WORDS (accents, CJK, emoji)."""
    rng = random.Random(seed)
    made_up = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words = made_up + SPECIAL_WORDS * 8
    sentences = []
    for _ in range(num_sentences):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        sentences.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?", ","]))
    return sentences


def train_byte_level_tokenizer(
    vocab_size: int, corpus: list[str] | None = None, trim_offsets: bool = True
) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE ('Ġ' = space), special token EOS (also the pad token).

    trim_offsets=True leaves a token's leading space out of its span ('Ġcafé' -> 'café');
    False keeps it. Ends are the same either way.
    """
    return train_tokenizer(corpus or build_corpus(), vocab_size, trim_offsets=trim_offsets, special_tokens=(EOS,))


def train_sentencepiece_style_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Llama/SentencePiece style BPE ('▁' = space) with the 256 <0xNN> byte-fallback pieces."""
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(corpus or build_corpus(), trainer)
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first_byte_id = len(vocab)
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = first_byte_id + byte
    with_bytes = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=with_bytes, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_and_reload(tokenizer: PreTrainedTokenizerFast, directory: Path) -> PreTrainedTokenizerFast:
    """Round-trip through `save_pretrained` / `AutoTokenizer.from_pretrained`, as real runs load them."""
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
