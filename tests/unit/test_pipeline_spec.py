"""The pipeline spec: strict loading, clear errors (file + field path), relative paths, no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from editing_core.config import ConfigError
from editing_core.data import FactsValidationError
from editing_core.editors.ft_kl import FTKLConfig
from editing_core.evaluate import EvalConfig
from pipelines.spec import EditStep, load_pipeline

FACT = {
    "prompt": "The capital of France is", "target_new": "Rome",
    "rephrase": ["The capital city of France is"],
    "locality_prompt": "The capital of Germany is", "locality_answer": "Berlin",
}


def write_facts(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def spec_document(**changes: Any) -> dict[str, Any]:
    """A valid pipeline document (facts: facts.jsonl beside it), with top-level keys replaced."""
    document: dict[str, Any] = {
        "name": "unit",
        "model": "smollm2-135m",
        "facts": "facts.jsonl",
        "steps": [
            {"validate": {}},
            {"edit": {"method": "ft_kl", "config": {"layers": [4, 5], "steps": 5}}},
            {"evaluate": {"generated": False, "batch_size": 8}},
        ],
    }
    document.update(changes)
    return document


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    write_facts(tmp_path / "facts.jsonl", [FACT])
    return tmp_path


def write_spec(directory: Path, document: Any, name: str = "pipeline.yaml") -> Path:
    path = directory / name
    path.write_text(document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def load_error(path: Path, error: type[Exception] = ConfigError) -> str:
    """The message of the error loading `path` raises; Ray must not have been started."""
    with pytest.raises(error) as info:
        load_pipeline(path)
    assert ray.is_initialized() is False
    return str(info.value)


# ---------------------------------------------------------------------------------------
# a valid spec
# ---------------------------------------------------------------------------------------


def test_valid_spec_is_typed_completed_and_frozen(workdir: Path) -> None:
    spec = load_pipeline(write_spec(workdir, spec_document()))
    assert spec.steps == ("validate", "edit", "evaluate")
    assert spec.edit is not None and spec.edit.method == "ft_kl"
    # the method config is validated and completed with the method's defaults
    assert spec.edit.config["layers"] == [4, 5] and spec.edit.config["steps"] == 5
    assert spec.edit.config["lr"] == FTKLConfig().lr and spec.edit.config["kl_weight"] == FTKLConfig().kl_weight
    assert spec.editor_config() == FTKLConfig(layers=(4, 5), steps=5)
    assert spec.evaluate == EvalConfig(generated=False, batch_size=8)
    assert spec.experiment == "unit"  # defaults to the name
    assert spec.resources.cpus == 2 and spec.resources.threads == 2
    with pytest.raises(AttributeError):
        spec.name = "other"  # type: ignore[misc]
    assert ray.is_initialized() is False


def test_relative_paths_resolve_against_the_yaml_directory_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    write_facts(project / "data" / "facts.jsonl", [FACT])
    write_facts(project / "data" / "heldout.jsonl", [{"prompt": "The capital of Spain is", "target_new": "Madrid"}])
    spec_path = write_spec(project, spec_document(facts="data/facts.jsonl", heldout="data/heldout.jsonl"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_pipeline(Path("..") / "project" / "pipeline.yaml")
    assert spec.facts == (project / "data" / "facts.jsonl").resolve()
    assert spec.heldout == (project / "data" / "heldout.jsonl").resolve()
    assert spec.source == spec_path.resolve()


def test_absolute_facts_path_and_explicit_experiment(tmp_path: Path, workdir: Path) -> None:
    other = write_facts(tmp_path / "elsewhere" / "more.jsonl", [FACT])
    spec = load_pipeline(write_spec(workdir, spec_document(facts=str(other), tracking={"experiment": "exp"})))
    assert spec.facts == other.resolve()
    assert spec.experiment == "exp"


def test_baseline_pipeline_without_edit_and_validate_only_pipeline(workdir: Path) -> None:
    baseline = load_pipeline(write_spec(workdir, spec_document(steps=[{"validate": None}, {"evaluate": {}}])))
    assert baseline.steps == ("validate", "evaluate") and baseline.edit is None
    assert baseline.evaluate == EvalConfig() and baseline.editor_config() is None
    check_only = load_pipeline(write_spec(workdir, spec_document(steps=["validate"]), "check.yaml"))
    assert check_only.steps == ("validate",) and check_only.evaluate is None


# ---------------------------------------------------------------------------------------
# refused specs: the message names the YAML file and the field path
# ---------------------------------------------------------------------------------------


def test_bad_method_config_value_names_file_and_field_path(workdir: Path) -> None:
    steps = [{"validate": {}}, {"edit": {"method": "ft_kl", "config": {"lr": "fast"}}}]
    path = write_spec(workdir, spec_document(steps=steps))
    assert load_error(path) == f"{path}: steps[1].edit.config.lr: expected a number, got 'fast'"


def test_unknown_method_config_key_and_invalid_combination(workdir: Path) -> None:
    steps = [{"validate": {}}, {"edit": {"method": "ft", "config": {"lrr": 0.1}}}]
    message = load_error(write_spec(workdir, spec_document(steps=steps)))
    assert "pipeline.yaml: steps[1].edit.config: unknown key(s) ['lrr']" in message
    steps = [{"validate": {}}, {"edit": {"method": "ft", "config": {"steps": 0}}}]
    message = load_error(write_spec(workdir, spec_document(steps=steps)))
    assert "pipeline.yaml: steps[1].edit.config: " in message and "steps and batch_size must be >= 1" in message


def test_unknown_top_level_key(workdir: Path) -> None:
    message = load_error(write_spec(workdir, spec_document(facs="facts.jsonl")))
    assert message.startswith(f"{workdir / 'pipeline.yaml'}: unknown key(s) ['facs']")
    assert "known keys" in message


def test_missing_required_field(workdir: Path) -> None:
    document = spec_document()
    del document["model"]
    assert load_error(write_spec(workdir, document)).endswith("pipeline.yaml: model: required field is missing")


def test_unknown_step_kind(workdir: Path) -> None:
    path = write_spec(workdir, spec_document(steps=[{"validate": {}}, {"train": {}}]))
    assert load_error(path) == f"{path}: steps[1]: unknown step 'train'; steps are validate, edit, evaluate"


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([{"edit": {"method": "ft"}}], "steps[0]: the first step must be `validate`, got 'edit'"),
        ([{"validate": {}}, {"evaluate": {}}, {"edit": {"method": "ft"}}], "steps[2].edit: must come before evaluate"),
        ([{"validate": {}}, {"validate": {}}], "steps[1].validate: this step appears more than once"),
        ([{"validate": {}, "edit": {"method": "ft"}}], "steps[0]: a step is a mapping with exactly one key"),
        ([], "steps: needs at least `- validate: {}`"),
        ([{"validate": {"strict": True}}], "steps[0].validate: unknown key(s) ['strict']"),
        ([{"validate": {}}, {"evaluate": {"generated": "yes"}}], "steps[1].evaluate.generated: expected bool, got 'yes'"),
    ],
)
def test_step_structure_errors(workdir: Path, steps: list[Any], expected: str) -> None:
    message = load_error(write_spec(workdir, spec_document(steps=steps)))
    assert f"pipeline.yaml: {expected}" in message


def test_unknown_method_lists_the_available_ones(workdir: Path) -> None:
    steps = [{"validate": {}}, {"edit": {"method": "rome"}}]
    message = load_error(write_spec(workdir, spec_document(steps=steps)))
    assert "pipeline.yaml: steps[1].edit.method: unknown editing method 'rome'; available: ft, ft_kl" in message


def test_bad_resources_and_tracking_sections(workdir: Path) -> None:
    assert "pipeline.yaml: resources: cpus must be > 0" in load_error(write_spec(workdir, spec_document(resources={"cpus": 0})))
    message = load_error(write_spec(workdir, spec_document(tracking={"experiment": "x", "uri": "http://h"})))
    assert "pipeline.yaml: tracking: unknown key(s) ['uri']" in message


def test_yaml_syntax_error_names_line(workdir: Path) -> None:
    path = write_spec(workdir, "name: unit\nmodel: [smollm2-135m\nfacts: facts.jsonl\n")
    message = load_error(path)
    assert message.startswith(f"{path}: invalid YAML: line ")


def test_top_level_must_be_a_mapping(workdir: Path) -> None:
    assert "the top level must be a mapping" in load_error(write_spec(workdir, "- just\n- a list\n"))
    assert "got an empty file" in load_error(write_spec(workdir, "", "empty.yaml"))


def test_missing_pipeline_file(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: pipeline file not found"


# ---------------------------------------------------------------------------------------
# facts files
# ---------------------------------------------------------------------------------------


def test_missing_facts_file_names_the_yaml_field_and_the_resolved_path(workdir: Path) -> None:
    path = write_spec(workdir, spec_document(facts="data/missing.jsonl"))
    message = load_error(path)
    assert message.startswith(f"{path}: facts: 'data/missing.jsonl' file not found")
    assert str(workdir / "data" / "missing.jsonl") in message


def test_bad_facts_row_raises_the_loaders_error_with_row_and_field(workdir: Path) -> None:
    facts = write_facts(workdir / "bad.jsonl", [FACT, {"prompt": "The capital of Japan is", "target_new": 7}, "{not json"])
    with pytest.raises(FactsValidationError) as info:
        load_pipeline(write_spec(workdir, spec_document(facts="bad.jsonl")))
    assert ray.is_initialized() is False
    problems = info.value.problems
    assert [(p.location, p.field) for p in problems] == [("line 2", "target_new"), ("line 3", None)]
    assert all(p.file == str(facts.resolve()) for p in problems)


def test_bad_heldout_row_is_refused_too(workdir: Path) -> None:
    write_facts(workdir / "heldout.jsonl", [{"prompt": "The capital of Spain is"}])
    with pytest.raises(FactsValidationError) as info:
        load_pipeline(write_spec(workdir, spec_document(heldout="heldout.jsonl")))
    assert info.value.problems[0].file.endswith("heldout.jsonl")
    assert info.value.problems[0].location == "line 1"
    assert ray.is_initialized() is False


def test_heldout_without_an_evaluate_step_is_refused(workdir: Path) -> None:
    write_facts(workdir / "heldout.jsonl", [{"prompt": "The capital of Spain is", "target_new": "Madrid"}])
    steps = [{"validate": {}}, {"edit": {"method": "ft"}}]
    message = load_error(write_spec(workdir, spec_document(heldout="heldout.jsonl", steps=steps)))
    assert "pipeline.yaml: heldout: only the evaluate step uses it" in message


def test_edit_step_is_plain_data_for_ray(workdir: Path) -> None:
    """The worker receives the step's config as JSON-able data, not a dataclass."""
    spec = load_pipeline(write_spec(workdir, spec_document()))
    assert isinstance(spec.edit, EditStep)
    assert json.loads(json.dumps(spec.edit.config)) == spec.edit.config


def _edit_steps(edit: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"validate": {}}, {"edit": edit}, {"evaluate": {"generated": False}}]


def test_mend_and_salem_steps_resolve_the_editor_and_its_training_relative_to_the_file(workdir: Path) -> None:
    (workdir / "editors" / "mend").mkdir(parents=True)
    spec = load_pipeline(write_spec(workdir, spec_document(steps=_edit_steps(
        {"method": "mend", "config": {"editor": "editors/mend"}}))))
    assert spec.edit.config["editor"] == str((workdir / "editors" / "mend").resolve()) and spec.edit.train is None

    write_facts(workdir / "train.jsonl", [FACT])
    spec = load_pipeline(write_spec(workdir, spec_document(steps=_edit_steps({
        "method": "salem", "train": {"facts": "train.jsonl", "out": "editors/salem", "zero_stage": 3,
                                     "net": {"rank": 8}, "train": {"steps": 30}}}))))
    train = spec.edit.train
    assert train.facts == str(workdir / "train.jsonl") and train.out == str(workdir / "editors" / "salem")
    assert train.zero_stage == 3 and train.net == {"rank": 8} and train.train == {"steps": 30}
    assert spec.edit.config["editor"] == str(workdir / "editors" / "salem" / "editor")


@pytest.mark.parametrize("edit, expected", [
    ({"method": "mend"}, "steps[1].edit.config.editor: mend needs a trained editor directory, or a `train:` section"),
    ({"method": "mend", "config": {"editor": "nowhere"}}, "is not a directory"),
    ({"method": "ft", "train": {"facts": "facts.jsonl", "out": "e"}}, "steps[1].edit.train: method 'ft' trains no editor"),
    ({"method": "mend", "config": {"editor": "e"}, "train": {"facts": "facts.jsonl", "out": "e"}}, "not both"),
    ({"method": "mend", "train": {"facts": "facts.jsonl", "out": "e", "net": {"rnak": 8}}}, "steps[1].edit.train.net"),
    ({"method": "mend", "train": {"facts": "missing.jsonl", "out": "e"}}, "steps[1].edit.train.facts"),
    ({"method": "salem", "train": {"facts": "facts.jsonl", "out": "e", "salient_by": "magnitude"}}, "steps[1].edit.train.salient_by"),
    ({"method": "salem", "train": {"facts": "facts.jsonl", "out": "e", "train": {"edit_lr_grid": [0.0]}}}, "steps[1].edit.train.train"),
])
def test_bad_editor_steps_name_the_field(workdir: Path, edit: dict[str, Any], expected: str) -> None:
    (workdir / "e").mkdir()
    assert expected in load_error(write_spec(workdir, spec_document(steps=_edit_steps(edit))))


def test_a_trained_editor_is_reused_without_starting_ray(workdir: Path) -> None:
    from pipelines.runner import _train_editor_step

    write_facts(workdir / "train.jsonl", [FACT])
    spec = load_pipeline(write_spec(workdir, spec_document(steps=_edit_steps({
        "method": "mend", "train": {"facts": "train.jsonl", "out": "editors/mend", "train": {"steps": 30}}}))))
    out = workdir / "editors" / "mend"
    (out / "editor").mkdir(parents=True)
    (out / "editor" / "editor.json").write_text(json.dumps({"trained_steps": 30}), encoding="utf-8")
    (out / "history.json").write_text(json.dumps([{"step": 30, "loss": 0.5}]), encoding="utf-8")
    logged = _train_editor_step(spec)
    assert logged["history"] == [{"step": 30, "loss": 0.5}] and logged["trained_steps"] == 30
    assert logged["files"] == [out / "history.json"] and ray.is_initialized() is False
