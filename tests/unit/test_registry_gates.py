"""Registry logic that needs no MLflow: gates, default names, the spec's registry section, and
the text of `editflow edits`. (Registering, promoting and serving versions are integration tests.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from editing_core.config import ConfigError
from infra.registry import Gates, RegistrySpec, default_model_name
from pipelines.report import format_edits
from pipelines.spec import load_pipeline
from test_pipeline_spec import spec_document, workdir, write_spec  # noqa: F401 - workdir is a fixture


def test_default_gates_require_edit_success_and_locality() -> None:
    gates = Gates()
    assert gates.failures({"edit_success": 0.95, "locality": 0.9}) == []
    assert gates.failures({"edit_success": 0.5, "locality": 0.95}) == ["edit_success 0.500 < 0.9"]
    assert gates.failures({"edit_success": 1.0}) == ["locality was not measured (gate 0.9)"]


def test_drawdown_is_a_maximum_and_ungated_metrics_are_ignored() -> None:
    gates = Gates(edit_success=None, locality=None, drawdown=0.05)
    assert gates.failures({"drawdown": 0.05, "paraphrase": 0.0}) == []
    assert gates.failures({"drawdown": 0.2}) == ["drawdown 0.200 > 0.05"]


def test_a_minimum_outside_0_1_is_refused() -> None:
    with pytest.raises(ValueError, match="locality: a minimum between 0 and 1"):
        Gates(locality=90)


@pytest.mark.parametrize(("model", "name"), [
    ("smollm2-135m", "smollm2-135m-edits"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct-edits"),
    ("/models/llama 3/", "llama-3-edits"),
    ("/models/tiny.Q8_0.gguf", "tiny.Q8_0-edits"),
])
def test_default_model_name_is_derived_from_the_base_model(model: str, name: str) -> None:
    assert default_model_name(model) == name
    assert RegistrySpec().model_name(model) == name and RegistrySpec(name="mine").model_name(model) == "mine"


def test_registry_section_is_loaded_strictly(workdir: Path) -> None:
    spec = load_pipeline(write_spec(workdir, spec_document(registry={"name": "facts", "gates": {"drawdown": 0.1}})))
    assert spec.registry == RegistrySpec(name="facts", gates=Gates(drawdown=0.1))
    assert load_pipeline(write_spec(workdir, spec_document())).registry == RegistrySpec()
    with pytest.raises(ConfigError, match=r"pipeline\.yaml: registry\.gates.*edit_sucess"):
        load_pipeline(write_spec(workdir, spec_document(registry={"gates": {"edit_sucess": 0.9}})))
    with pytest.raises(ConfigError, match=r"pipeline\.yaml: registry\.name"):
        load_pipeline(write_spec(workdir, spec_document(registry={"name": "  "})))


def test_edits_text_output() -> None:
    version = {"version": "2", "aliases": ["champion"], "method": "ft_kl", "n_edits": 3, "n_new_edits": 1,
               "parent_version": "1", "gates": "passed", "metrics": {"edit_success": 1.0, "locality": 0.75}}
    listing = format_edits("list", "m", [version])
    assert listing.splitlines()[0] == "m: 1 versions"
    assert "champion" in listing and "0.75" in listing and "ft_kl" in listing
    fact = {"prompt": "Bob works for", "target_new": "Sega", "digest": "abc"}
    diff = {"old": "1", "new": "2", "added": [fact], "removed": [], "metrics": {"locality": {"old": 1.0, "new": 0.75}}}
    text = format_edits("diff", "m", diff)
    assert "facts added (1)" in text and "Bob works for" in text and "locality: 1.00 -> 0.75" in text
    assert format_edits("rollback", "m", {"champion": "1", "rolled_back": "2"}) == "m: champion rolled back from version 2 to 1"


def test_a_registry_name_mlflow_would_refuse_is_refused_at_load(workdir: Path) -> None:
    with pytest.raises(ConfigError, match=r"registry\.name: 'team/facts': MLflow model names cannot contain"):
        load_pipeline(write_spec(workdir, spec_document(registry={"name": "team/facts"})))
