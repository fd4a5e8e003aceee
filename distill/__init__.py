"""distill: distill a large (MoE) language model into a small one with another tokenizer, through a teacher cache."""

__version__ = "0.1.0"
