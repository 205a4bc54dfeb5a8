"""Tiny random models of every supported architecture, and a word-level tokenizer, for tests.

Built from configs in memory: no download, a few milliseconds each.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .adapter import ModelAdapter
from .loading import LoadedModel

WORDS = (
    "the of is in a to and capital city country language river born plays works for "
    "Paris Rome London Berlin Madrid Tokyo Lisbon Vienna Oslo Cairo "
    "France Italy England Germany Spain Japan Portugal Austria Norway Egypt "
    "French Italian English German Spanish Japanese football piano guitar chess "
    "Apple Google Sega BBC Toyota Nokia Alice Bob Carol Dave . , ?"
).split()
SPECIALS = ("[UNK]", "[PAD]", "[BOS]")

# hidden 32-64, 2 layers; vocab_size is filled in from the tokenizer.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=128, word_embed_proj_dim=32),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=128),
}


def tiny_tokenizer(words: Sequence[str] = WORDS) -> Any:
    """A fast word-level tokenizer over `words` (whitespace split, punctuation kept)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # joins words with single spaces; cleanup=False keeps " ." instead of gluing it to the word
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[PAD]"
    )


def tiny_model(model_type: str = "llama", seed: int = 0) -> LoadedModel:
    """A 2-layer random model of `model_type` with the tiny tokenizer, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **TINY_CONFIGS[model_type])
    config.pad_token_id = config.eos_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    model_class = AutoModelForMaskedLM if model_type == "bert" else AutoModelForCausalLM
    model = model_class.from_config(config)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=ModelAdapter.for_model(model), name=f"tiny-{model_type}")
