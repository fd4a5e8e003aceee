"""Tiny tokenizers for tests, trained in memory in well under a second (no network).

    from tests.tokenizer_utils import build_corpus, train_byte_level_tokenizer, save_and_reload
    tokenizer = save_and_reload(train_byte_level_tokenizer(300), tmp_path / "tok")

The corpus mixes ASCII words, accented words (café, naïve), CJK (日本語の文章) and emoji
(👍🏽, 🧪), so that small vocabularies split characters into byte tokens and larger ones
merge them into words: two vocab sizes give two genuinely different tokenizations.
`build_code_corpus` adds indented code, tabs and CRLF, so that whitespace-run tokens
('ĊĠĠĠ') exist. The families: byte-level BPE (trimmed or not offsets, optional NFC or other
normalizer), SentencePiece-style BPE with byte fallback (Llama: dummy prefix; Gemma: none),
WordPiece; `add_bos` gives any of them a BOS post-processor.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
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


CODE_SNIPPETS = [
    "def train(model, rows):\n    for row in rows:\n        if row.empty:\n"
    "            continue\n        model.step(row)\n",
    "class Cache:\n    def __init__(self):\n        self.rows = []  # café\n\n"
    "    def add(self, row):\n        self.rows.append(row)\n",
    "if (x) {\r\n\treturn y;\r\n}\r\n\tint z = 0;\t// tab\r\n",
    "    indented    text   with   runs   of    spaces\n        and more\n",
]


def build_code_corpus(repeat: int = 20) -> list[str]:
    """build_corpus() plus indented code, tabs, CRLF and space runs (so whitespace-run tokens are learned)."""
    return build_corpus() + CODE_SNIPPETS * repeat


def train_byte_level_tokenizer(
    vocab_size: int,
    corpus: list[str] | None = None,
    trim_offsets: bool = True,
    normalizer: normalizers.Normalizer | None = None,
) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE ('Ġ' = space), special token EOS (also the pad token).

    trim_offsets=True leaves a token's whitespace out of its span ('Ġcafé' -> 'café', 'ĊĠĠĠ' -> '\\n');
    False keeps it. normalizer: e.g. NFC (as Qwen), or one that changes the text.
    """
    tokenizer = train_tokenizer(corpus or build_corpus(), vocab_size, trim_offsets=trim_offsets, special_tokens=(EOS,))
    if normalizer is None:
        return tokenizer
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)


def train_sentencepiece_style_tokenizer(
    vocab_size: int, corpus: list[str] | None = None, dummy_prefix: bool = True, byte_fallback: bool = True
) -> PreTrainedTokenizerFast:
    """SentencePiece style BPE ('▁' = space) with the 256 <0xNN> byte-fallback pieces.

    dummy_prefix=True: Llama style, Metaspace puts a '▁' before a text that does not start with a
    space (the decoder strips it). False: Gemma style, spaces become '▁' and nothing is added.
    byte_fallback=False: characters outside the vocabulary become <unk> (cannot reproduce text).
    """
    tokenizer = Tokenizer(models.BPE(byte_fallback=byte_fallback, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        steps.append(decoders.Strip(" ", 1, 0))
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tokenizer.decoder = decoders.Sequence(steps)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(corpus or build_corpus(), trainer)
    spec = json.loads(tokenizer.to_str())
    if byte_fallback:
        vocab = spec["model"]["vocab"]
        first_byte_id = len(vocab)
        for byte in range(256):
            vocab[f"<0x{byte:02X}>"] = first_byte_id + byte
    with_bytes = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=with_bytes, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def train_wordpiece_tokenizer(vocab_size: int, corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """BERT style WordPiece ('##' continuations, whitespace dropped by the pre-tokenizer), no normalizer."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[PAD]"], show_progress=False)
    tokenizer.train_from_iterator(corpus or build_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")


def add_bos(tokenizer: PreTrainedTokenizerFast, bos: str = "<bos>") -> PreTrainedTokenizerFast:
    """The same tokenizer with a TemplateProcessing post-processor that puts `bos` before the text
    (after its own post-processor, e.g. ByteLevel offsets trimming), as Gemma and Llama do."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.add_special_tokens([bos])
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    own = backend.post_processor
    backend.post_processor = processors.Sequence([own, template]) if own is not None else template
    named = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**named, "bos_token": bos})


def save_and_reload(tokenizer: PreTrainedTokenizerFast, directory: Path) -> PreTrainedTokenizerFast:
    """Round-trip through `save_pretrained` / `AutoTokenizer.from_pretrained`, as real runs load them."""
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
