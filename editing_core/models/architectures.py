"""Architecture knowledge as data: where each role lives, keyed on `config.model_type`.

Module paths are relative to the model's base model (`model.base_model`: `LlamaModel` inside
`LlamaForCausalLM`, `GPT2Model` inside `GPT2LMHeadModel`, ...), so one table serves the bare model,
the causal LM and the classifier heads alike. `{i}` is the layer index.

Roles:
    block     one transformer layer
    mlp_in    the FFN's input projection (up_proj / c_fc / fc1 / dense_h_to_4h / intermediate)
    mlp_out   the FFN's output projection; its output is the FFN's contribution to the residual
    attn_out  the attention output projection; its input is (batch, tokens, heads * head_dim)

To add an architecture, add one `Architecture` row to `ARCHITECTURES` and one tiny config to
`editing_core/models/tiny.py` (the unit tests then cover it).
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("mlp_in", "mlp_out", "attn_out")


@dataclass(frozen=True)
class Architecture:
    """Where the editable pieces of one model family live.

    blocks:      path of the ModuleList of transformer layers, relative to the base model.
    mlp_in / mlp_out / attn_out: paths of those Linear (or Conv1D) modules inside one block.
    conv1d:      True when weights are stored (in_features, out_features), as GPT-2's Conv1D
                 does; False for nn.Linear's (out_features, in_features).
    kv_heads_attr: config attribute holding the number of key/value heads (grouped-query
                 attention), or None when every query head has its own key/value head.
    causal:      True for decoder-only language models; False for encoders (BERT).
    final:       paths (relative to the base model) of the modules applied, in order, between
                 the last block and the LM head (final norm, OPT's optional projection); a path
                 whose module is None in a given config is skipped. Lets an editor run only
                 the layers above a cached activation.
    """

    blocks: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    conv1d: bool = False
    kv_heads_attr: str | None = None
    causal: bool = True
    final: tuple[str, ...] = ()


_LLAMA_LIKE = Architecture(
    blocks="layers",
    mlp_in="mlp.up_proj",
    mlp_out="mlp.down_proj",
    attn_out="self_attn.o_proj",
    kv_heads_attr="num_key_value_heads",
    final=("norm",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gpt2": Architecture(
        blocks="h", mlp_in="mlp.c_fc", mlp_out="mlp.c_proj", attn_out="attn.c_proj", conv1d=True,
        final=("ln_f",),
    ),
    "gpt_neox": Architecture(
        blocks="layers",
        mlp_in="mlp.dense_h_to_4h",
        mlp_out="mlp.dense_4h_to_h",
        attn_out="attention.dense",
        final=("final_layer_norm",),
    ),
    "opt": Architecture(
        blocks="decoder.layers", mlp_in="fc1", mlp_out="fc2", attn_out="self_attn.out_proj",
        final=("decoder.final_layer_norm", "decoder.project_out"),
    ),
    "bert": Architecture(
        blocks="encoder.layer",
        mlp_in="intermediate.dense",
        mlp_out="output.dense",
        attn_out="attention.output.dense",
        causal=False,
    ),
}


class UnsupportedModelError(ValueError):
    """The model's type has no row in ARCHITECTURES."""


def architecture_for(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported types: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add one, add an Architecture row to "
            "ARCHITECTURES in editing_core/models/architectures.py (module paths of the blocks, "
            "mlp_in, mlp_out and attn_out relative to the base model) and a tiny config in "
            "editing_core/models/tiny.py."
        ) from None
