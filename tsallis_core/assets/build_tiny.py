"""Regenerate the embedded tiny model's tokenizer and config in this folder (no weights ship).

    python -m tsallis_core.assets.build_tiny

A character-level tokenizer over printable ASCII plus whole tokens for "Q:" and "Answer:",
and a small Llama-shaped config. ``tsallis_core.training.models`` builds the model from this config
with a seed, so nothing is downloaded and no weights are committed.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

HERE = Path(__file__).parent / "tiny"
SPECIAL = ["<pad>", "<eos>", "<unk>"]
WORDS = ["Answer:", "Q:"]


def build_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """The character tokenizer; ``vocab_size`` pads it with filler tokens (to give a model a real LM-head size)."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r\t"]
    tokens = SPECIAL + WORDS + chars
    tokens += [f"<filler{i}>" for i in range((vocab_size or len(tokens)) - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"Answer:|Q:|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=256,
    )


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


if __name__ == "__main__":
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(HERE)
    build_config(tokenizer).save_pretrained(HERE)
    print(f"wrote {sorted(p.name for p in HERE.iterdir())}")
