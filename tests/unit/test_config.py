"""Strict config loading: a small frozen dataclass, and the real editor configs."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from editing_core.config import ConfigError, config_to_dict, load_config
from editing_core.editors import make_editor
from editing_core.editors.ft import FTConfig
from editing_core.editors.ft_kl import FTKLConfig


@dataclass(frozen=True)
class Inner:
    x: int = 1
    name: str = "a"


@dataclass(frozen=True)
class Small:
    rate: float
    count: int = 3
    flag: bool = False
    maybe: float | None = None
    items: tuple[int, ...] = ()
    words: list[str] = field(default_factory=list)
    mode: Literal["fast", "slow"] = "fast"
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


def error_of(cls, source=None, **overrides) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, source, **overrides)
    return str(info.value)


# -- a small dataclass --------------------------------------------------------------------


def test_a_full_valid_mapping_is_built_with_its_own_types():
    cfg = load_config(Small, {"rate": 1, "count": 2, "flag": True, "maybe": 0.5, "items": [1, 2], "words": ("a",),
                              "mode": "slow", "inner": {"x": 5}, "extra": {"k": [1]}})
    assert cfg == Small(rate=1.0, count=2, flag=True, maybe=0.5, items=(1, 2), words=["a"], mode="slow",
                        inner=Inner(x=5, name="a"), extra={"k": [1]})
    assert isinstance(cfg.rate, float)  # an int for a float field becomes a float
    assert isinstance(cfg.items, tuple) and isinstance(cfg.words, list)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rate = 2.0  # type: ignore[misc]


def test_required_field_missing():
    assert "rate: required field is missing" in error_of(Small, {})


def test_unknown_key_lists_the_known_keys():
    message = error_of(Small, {"rate": 1.0, "colour": "red"})
    assert "'colour'" in message and "Small" in message
    assert "known keys: ['count', 'extra', 'flag', 'inner', 'items', 'maybe', 'mode', 'rate', 'words']" in message


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("rate", "0.1", "rate: expected a number"),  # string for float
        ("rate", True, "rate: expected a number"),  # bool is not a number here
        ("count", True, "count: expected an integer"),  # bool for int
        ("count", 2.0, "count: expected an integer"),  # float for int, even a whole one
        ("count", "2", "count: expected an integer"),
        ("flag", 1, "flag: expected bool"),
        ("flag", "yes", "flag: expected bool"),
        ("maybe", "x", "maybe: expected"),
        ("items", "12", "items: expected a list"),
        ("items", [1, "2"], "items[1]: expected an integer"),
        ("words", [1], "words[0]: expected str"),
        ("mode", "medium", "mode: expected one of ['fast', 'slow']"),
        ("inner", 3, "inner: expected a mapping for Inner"),
        ("inner", {"x": "5"}, "inner.x: expected an integer"),
        ("extra", [1], "extra: expected a mapping"),
    ],
)
def test_wrong_types_name_the_field(key, value, expected):
    message = error_of(Small, {"rate": 1.0, key: value})
    assert message.startswith(expected)
    leaf = {"items": "2", "words": 1, "inner": "5"}.get(key, value) if isinstance(value, (list, dict)) else value
    assert message.endswith(f"got {leaf!r}")


def test_optional_fields_accept_null_and_their_type():
    assert load_config(Small, {"rate": 1.0, "maybe": None}).maybe is None
    assert load_config(Small, {"rate": 1.0, "maybe": 2}).maybe == 2.0


def test_nested_dataclass_unknown_key_names_the_path():
    message = error_of(Small, {"rate": 1.0, "inner": {"y": 1}})
    assert message.startswith("inner: unknown key(s) ['y'] for Inner")
    assert "known keys: ['name', 'x']" in message


def test_post_init_errors_become_config_errors():
    message = error_of(Small, {"rate": 1.0, "count": -1})
    assert "count must be >= 0" in message and "Small" in message


def test_top_level_errors_start_with_the_class_not_a_stray_colon(tmp_path):
    """Errors at the top level have an empty field path; the message must still read well."""
    message = error_of(FTConfig, {"bogus": 1})
    assert not message.startswith(":"), message
    path = tmp_path / "ft.yaml"
    path.write_text("bogus: 1\n")
    message = error_of(FTConfig, path)
    assert ": :" not in message, message
    assert message.startswith(str(path)) and "FTConfig" in message


def test_overrides_replace_source_keys_and_are_checked():
    cfg = load_config(Small, {"rate": 1.0, "count": 2}, count=5, items=[7])
    assert cfg.count == 5 and cfg.items == (7,)
    assert "count: expected an integer" in error_of(Small, {"rate": 1.0}, count="5")
    assert "unknown key(s) ['nope']" in error_of(Small, {"rate": 1.0}, nope=1)
    # None means "flag not given" (CLI): it leaves the source's value alone
    assert load_config(Small, {"rate": 1.0, "maybe": 0.5}, maybe=None).maybe == 0.5


def test_instance_passes_through_nested():
    inner = Inner(x=9)
    assert load_config(Small, {"rate": 1.0, "inner": inner}).inner is inner


# -- YAML files ---------------------------------------------------------------------------


def test_yaml_file_source(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("rate: 0.5\nitems: [1, 2]\ninner:\n  name: b\nmaybe: null\n")
    assert load_config(Small, path) == Small(rate=0.5, items=(1, 2), inner=Inner(name="b"))
    assert load_config(Small, str(path), rate=2.0).rate == 2.0


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rate: fast\n")
    message = error_of(Small, path)
    assert str(path) in message and "rate: expected a number" in message

    path.write_text("- rate\n- 1\n")
    message = error_of(Small, path)
    assert str(path) in message and "top level must be a mapping" in message

    path.write_text("rate: [1\n")
    message = error_of(Small, path)
    assert str(path) in message and "cannot read YAML" in message

    missing = tmp_path / "missing.yaml"
    assert str(missing) in error_of(Small, missing)


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(FTConfig, path) == FTConfig()


def test_yaml_exponent_floats_are_numbers(tmp_path):
    """`lr: 1e-3` is how everyone writes a learning rate; PyYAML's YAML 1.1 resolver reads it
    as the string '1e-3' (it wants '1.0e-3'), which then fails the float check."""
    path = tmp_path / "ft.yaml"
    path.write_text("lr: 1e-3\nlayers: [0]\n")
    assert load_config(FTConfig, path).lr == pytest.approx(1e-3)


# -- the real editor configs --------------------------------------------------------------


def test_editor_config_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        make_editor("ft", {"layer": [1]})
    message = str(info.value)
    assert "'layer'" in message
    for key in ("layers", "roles", "steps", "lr", "norm_constraint", "batch_size", "progress"):
        assert f"'{key}'" in message
    with pytest.raises(ConfigError, match="'kl_weight'"):
        make_editor("ft", {"kl_weight": 1.0})  # an FT+KL field is unknown to FT


def test_editor_config_types():
    editor = make_editor("ft_kl", {"layers": [0, -1], "kl_prompts": ["a b", "c"], "norm_constraint": None, "lr": 1})
    assert editor.config == FTKLConfig(layers=(0, -1), kl_prompts=("a b", "c"), lr=1.0)
    assert isinstance(editor.config.layers, tuple) and isinstance(editor.config.kl_prompts, tuple)
    assert make_editor("ft", layers=[1], steps=3).config == FTConfig(layers=(1,), steps=3)
    for bad, where in [({"lr": "fast"}, "lr"), ({"steps": 2.5}, "steps"), ({"steps": True}, "steps"),
                       ({"progress": "no"}, "progress"), ({"layers": 3}, "layers"), ({"norm_constraint": "1"}, "norm_constraint")]:
        with pytest.raises(ConfigError, match=f"^{where}"):
            make_editor("ft_kl", bad)


@pytest.mark.parametrize(
    "method, source, expected",
    [
        ("ft", {"roles": ["mlp_out", "mlp_gate"]}, "unknown role(s) ['mlp_gate']"),
        ("ft", {"steps": 0}, "steps and batch_size must be >= 1"),
        ("ft", {"batch_size": 0}, "steps and batch_size must be >= 1"),
        ("ft", {"lr": 0}, "lr > 0"),
        ("ft", {"layers": []}, "layers and roles must not be empty"),
        ("ft", {"norm_constraint": 0}, "norm_constraint must be > 0"),
        ("ft_kl", {"kl_weight": -0.5}, "kl_weight must be >= 0"),
        ("ft_kl", {"roles": ["nope"]}, "unknown role(s) ['nope']"),
    ],
)
def test_invalid_editor_values_are_config_errors(method, source, expected):
    with pytest.raises(ConfigError) as info:
        make_editor(method, source)
    assert expected in str(info.value)
    assert ("FTKLConfig" if method == "ft_kl" else "FTConfig") in str(info.value)


def test_editor_config_from_yaml_file(tmp_path):
    path = tmp_path / "ftkl.yaml"
    path.write_text("layers: [0, 1]\nsteps: 7\nkl_weight: 2.5\nkl_prompts: [Alice plays]\n")
    editor = make_editor("ft_kl", str(path), steps=9)
    assert editor.config == FTKLConfig(layers=(0, 1), steps=9, kl_weight=2.5, kl_prompts=("Alice plays",))
    path.write_text("layers: [0, 1]\nkl_weight: -1.0\n")
    with pytest.raises(ConfigError) as info:
        make_editor("ft_kl", str(path))
    assert str(path) in str(info.value) and "kl_weight must be >= 0" in str(info.value)


@pytest.mark.parametrize(
    "config",
    [
        FTConfig(),
        FTConfig(layers=(0, -1), roles=("mlp_in", "attn_out"), steps=3, lr=0.5, norm_constraint=0.01, batch_size=2, progress=True),
        FTKLConfig(layers=(2,), kl_weight=0.0, kl_prompts=("Alice plays chess", "Bob")),
        Small(rate=0.1, maybe=1.5, items=(3, 4), words=["z"], mode="slow", inner=Inner(2, "q"), extra={"a": {"b": [1, 2]}}),
    ],
)
def test_config_to_dict_round_trips(config):
    data = config_to_dict(config)
    assert load_config(type(config), data) == config
    # the dict is plain data: it survives JSON and YAML unchanged
    assert json.loads(json.dumps(data)) == data
    assert yaml.safe_load(yaml.safe_dump(data)) == data
    assert all(not isinstance(v, tuple) for v in data.values())


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
