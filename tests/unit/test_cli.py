"""The `editflow` CLI in-process: validate, edit and eval on tiny random models saved to disk
(the local-directory path of load_model), and the exit status / stderr of user errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from editing_core.artifacts import load_artifact
from editing_core.models.tiny import tiny_model
from pipelines.cli import _demo_pipeline, main
from pipelines.spec import load_pipeline

FACTS = [
    {"prompt": "the capital of France is", "target_new": "Rome", "rephrase": ["the capital city of France is"],
     "locality_prompt": "Alice plays", "locality_answer": "chess"},
    {"prompt": "Bob works for", "target_new": "Sega", "rephrase": ["Bob plays for"],
     "locality_prompt": "the capital of Egypt is", "locality_answer": "Cairo"},
]
# plain FT on the tiny model: reaches edit_success 1.0 in well under a second
FT_CONFIG = "lr: 0.01\nsteps: 20\n"
METRIC_KEYS = ("edit_success", "paraphrase", "locality", "edit_success_generated",
               "paraphrase_generated", "locality_generated", "n_requests")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def save_tiny(directory: Path, seed: int) -> str:
    loaded = tiny_model("llama", seed=seed)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two tiny llama models with different random weights, as local directories."""
    base = tmp_path_factory.mktemp("models")
    return {"a": save_tiny(base / "tiny-a", seed=0), "b": save_tiny(base / "tiny-b", seed=1)}


@pytest.fixture
def facts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "facts.jsonl", FACTS)


@pytest.fixture
def ft_config(tmp_path: Path) -> Path:
    path = tmp_path / "ft.yaml"
    path.write_text(FT_CONFIG, encoding="utf-8")
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def edit(models: dict[str, str], facts: Path, config: Path, out: Path, *extra: str) -> list[str]:
    return ["edit", "--model", models["a"], "--method", "ft", "--facts", str(facts), "--layers", "0,1",
            "--config", str(config), "--out", str(out), *extra]


# ---------------------------------------------------------------------------------------
# validate
# ---------------------------------------------------------------------------------------


def test_validate_prints_format_and_counts(facts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["validate", str(facts)], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"{facts}: valid, generic format"
    counts = dict(line.split() for line in out.splitlines()[1:])
    assert counts == {"n_requests": "2", "with_rephrase": "2", "n_rephrases": "2", "with_locality": "2", "with_subject": "0"}


def test_validate_reports_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [FACTS[0], {"prompt": "Bob works for"}, "{oops", {"prompt": "x", "target_new": ""}])
    code, out, err = run(["validate", str(bad)], capsys)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert lines[0] == "editflow: invalid facts (3 problems):"
    assert lines[1] == f"  {bad} line 2, field 'target_new': missing field"
    assert lines[2].startswith(f"  {bad} line 3: not valid JSON")
    assert lines[3].startswith(f"  {bad} line 4, field 'target_new': ")
    assert "Traceback" not in err


def test_validate_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["validate", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "nope.jsonl: file not found" in err


def test_packaged_demo_pipeline_is_valid() -> None:
    """The example shipped in the package loads strictly (facts included) and edits with FT+KL."""
    with _demo_pipeline() as path:
        spec = load_pipeline(path)
    assert spec.model == "smollm2-135m" and spec.steps == ("validate", "edit", "evaluate")
    assert spec.edit is not None and spec.edit.method == "ft_kl"
    assert spec.facts.name == "demo_facts.jsonl"


# ---------------------------------------------------------------------------------------
# edit and eval on a tiny model
# ---------------------------------------------------------------------------------------


def test_edit_then_eval_json(models: dict[str, str], facts: Path, ft_config: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "artifact"
    code, out, _ = run(edit(models, facts, ft_config, out_dir), capsys)
    assert code == 0
    assert "method:          ft" in out and "requests:        2" in out
    assert "model.layers.0.mlp.down_proj.weight" in out and "model.layers.1.mlp.down_proj.weight" in out
    artifact = load_artifact(out_dir)
    assert artifact.meta.method == "ft" and artifact.meta.base_model == models["a"]
    assert artifact.meta.config["layers"] == [0, 1] and artifact.meta.config["steps"] == 20
    assert len(artifact.requests) == 2

    code, out, _ = run(["eval", "--model", models["a"], "--artifact", str(out_dir), "--facts", str(facts), "--json"], capsys)
    assert code == 0
    report = json.loads(out)  # exactly one JSON object: json.loads refuses trailing text
    assert all(key in report for key in METRIC_KEYS)
    assert report["n_requests"] == 2
    assert report["pre_edit_success"] < 0.5 and report["edit_success"] == 1.0
    assert report["edit_success_generated"] == 1.0
    assert [row["target_new"] for row in report["rows"]] == ["Rome", "Sega"]
    assert [row["after"] for row in report["rows"]] == ["Rome", "Sega"]


def test_eval_without_artifact_scores_the_unedited_model(models: dict[str, str], facts: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["eval", "--model", models["a"], "--facts", str(facts), "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["locality"] == 1.0 and report["locality_generated"] == 1.0  # the model against itself
    assert "pre_edit_success" not in report
    assert all("after" not in row for row in report["rows"])


def test_eval_table_output(models: dict[str, str], facts: Path, ft_config: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(edit(models, facts, ft_config, tmp_path / "a")) == 0
    capsys.readouterr()
    code, out, _ = run(["eval", "--model", models["a"], "--artifact", str(tmp_path / "a"), "--facts", str(facts)], capsys)
    assert code == 0
    header, rule, first, second = out.splitlines()[:4]
    assert header.split() == ["prompt", "target_new", "before", "after", "accuracy_before", "accuracy_after"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert first.startswith("the capital of France is") and first.split()[-3:-2] == ["Rome"]
    assert second.startswith("Bob works for")
    assert any(line.split()[:4] == ["edit_success", "0.00", "->", "1.00"] for line in out.splitlines())


def test_eval_refuses_an_artifact_made_on_another_model(models: dict[str, str], facts: Path, ft_config: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(edit(models, facts, ft_config, tmp_path / "a")) == 0
    capsys.readouterr()
    code, out, err = run(["eval", "--model", models["b"], "--artifact", str(tmp_path / "a"), "--facts", str(facts), "--json"], capsys)
    assert code == 2 and out == ""
    assert f"this artifact was made on base model {models['a']!r}" in err
    assert f"Evaluate it with --model {models['a']}" in err
    assert "Traceback" not in err


def test_edit_on_top_of_a_parent(models: dict[str, str], facts: Path, ft_config: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", FACTS[:1])
    second = write_jsonl(tmp_path / "second.jsonl", FACTS[1:])
    assert main(edit(models, first, ft_config, tmp_path / "v1")) == 0
    assert main(edit(models, second, ft_config, tmp_path / "v2", "--parent", str(tmp_path / "v1"))) == 0
    parent, child = load_artifact(tmp_path / "v1"), load_artifact(tmp_path / "v2")
    assert child.meta.parent == parent.meta.artifact_id
    capsys.readouterr()
    # the child only attaches on top of its parent
    code, _, err = run(["eval", "--model", models["a"], "--artifact", str(tmp_path / "v2"), "--facts", str(second)], capsys)
    assert code == 2 and f"with its parent artifact {parent.meta.artifact_id} attached (--parent)" in err
    code, out, _ = run(["eval", "--model", models["a"], "--artifact", str(tmp_path / "v2"), "--parent", str(tmp_path / "v1"),
                        "--facts", str(second), "--json"], capsys)
    assert code == 0 and json.loads(out)["edit_success"] == 1.0


# ---------------------------------------------------------------------------------------
# input errors: found before the model loads, exit 2, no traceback
# ---------------------------------------------------------------------------------------


def test_edit_checks_facts_before_loading_the_model(tmp_path: Path, ft_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])
    code, _, err = run(["edit", "--model", str(tmp_path / "no-such-model"), "--method", "ft", "--facts", str(bad),
                        "--config", str(ft_config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "field 'target_new': missing field" in err
    assert "no-such-model" not in err and not (tmp_path / "out").exists()


def test_edit_checks_the_method_config_before_loading_the_model(tmp_path: Path, facts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("lr: fast\n", encoding="utf-8")
    code, _, err = run(["edit", "--model", str(tmp_path / "no-such-model"), "--method", "ft", "--facts", str(facts),
                        "--config", str(config), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{config}: lr: expected a number, got 'fast'" in err
    code, _, err = run(["edit", "--model", "m", "--method", "rome", "--facts", str(facts), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "unknown editing method 'rome'; available: ft, ft_kl" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_edit_refuses_a_non_empty_out_dir_without_force(models: dict[str, str], facts: Path, ft_config: Path,
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("precious", encoding="utf-8")
    code, _, err = run(edit(models, facts, ft_config, out_dir), capsys)
    assert code == 2 and "directory is not empty" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep.txt"]
    assert main(edit(models, facts, ft_config, out_dir, "--force")) == 0
    assert load_artifact(out_dir).meta.method == "ft"


def test_layer_out_of_range_and_missing_model_are_user_errors(models: dict[str, str], facts: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["edit", "--model", models["a"], "--method", "ft", "--facts", str(facts), "--layers", "5",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "layer 5 is out of range" in err and "Traceback" not in err
    code, _, err = run(["eval", "--model", models["a"], "--artifact", str(tmp_path / "missing"), "--facts", str(facts)], capsys)
    assert code == 2 and "--artifact" in err and "no such directory" in err


def test_bad_layers_flag_is_an_argparse_error(facts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["edit", "--model", "m", "--method", "ft", "--facts", str(facts), "--layers", "four", "--out", "x"])
    assert info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_verbose_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["-v", "validate", str(tmp_path / "nope.jsonl")], capsys)
    assert code == 2 and "Traceback" in err


def test_prompts_longer_than_the_context_are_refused(models: dict[str, str], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    long_prompt = " ".join(["the capital of France is"] * 30)  # 150 words; the tiny context is 128
    facts = write_jsonl(tmp_path / "long.jsonl", [FACTS[0], {"prompt": long_prompt, "target_new": "Rome"}])
    code, out, err = run(["eval", "--model", models["a"], "--facts", str(facts), "--json"], capsys)
    assert code == 2 and out == ""
    assert f"{facts} line 2, field 'prompt': prompt + target_new is" in err
    assert "longer than max_length 128" in err


def test_submit_refuses_a_bad_pipeline_before_contacting_the_cluster(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: m\nfacts: missing.jsonl\nsteps: [{validate: {}}]\n", encoding="utf-8")
    # port 9 (discard) on loopback: any contact would fail with a connection error instead
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: facts" in err and "Jobs API" not in err


def test_submit_refuses_a_local_sqlite_store_for_a_remote_cluster(tmp_path, capsys):
    from infra.jobs import check_tracking_uri_reachable_from

    check_tracking_uri_reachable_from("sqlite:////tmp/mlruns.db", "http://127.0.0.1:8265")  # same machine: fine
    with pytest.raises(ValueError, match="cannot write: start an MLflow server"):
        check_tracking_uri_reachable_from("sqlite:////tmp/mlruns.db", "http://10.0.0.10:8265")


# ---------------------------------------------------------------------------------------
# GRACE: edit / eval like the other methods, and the lifelong stream
# ---------------------------------------------------------------------------------------


def test_grace_edit_then_eval(models: dict[str, str], facts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "grace.yaml"
    config.write_text("eps_init: 0.001\nn_iter: 200\nlr: 0.5\n", encoding="utf-8")
    out_dir = tmp_path / "codebook"
    code, out, err = run(["edit", "--model", models["a"], "--method", "grace", "--facts", str(facts), "--layers", "0",
                          "--config", str(config), "--out", str(out_dir)], capsys)
    assert code == 0, err
    artifact = load_artifact(out_dir)
    assert artifact.kind == "grace_codebook" and artifact.meta.config["layer"] == 0 and len(artifact.edit_ids) == 2
    code, out, _ = run(["eval", "--model", models["a"], "--artifact", str(out_dir), "--facts", str(facts), "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["edit_success"] == 1.0 and report["locality"] == 1.0


def test_grace_edit_refuses_several_layers(models: dict[str, str], facts: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["edit", "--model", models["a"], "--method", "grace", "--facts", str(facts), "--layers", "0,1",
                        "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "grace edits one layer" in err


def test_grace_stream_writes_series_plot_and_artifact(models: dict[str, str], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{**FACTS[i % 2], "prompt": prompt, "target_new": target}
            for i, (prompt, target) in enumerate([("the capital of France is", "Rome"), ("Bob works for", "Sega"),
                                                   ("the language of Japan is", "German"), ("Alice plays the", "guitar"),
                                                   ("the river of Egypt is", "Oslo")])]
    facts = write_jsonl(tmp_path / "stream.jsonl", rows)
    config = tmp_path / "grace.yaml"
    config.write_text("eps_init: 0.001\nn_iter: 200\nlr: 0.5\n", encoding="utf-8")
    out_dir = tmp_path / "stream"
    code, out, err = run(["grace-stream", "--model", models["a"], "--facts", str(facts), "--n", "4", "--layer", "0",
                          "--config", str(config), "--every", "2", "--out", str(out_dir)], capsys)
    assert code == 0, err
    document = json.loads((out_dir / "stream.json").read_text())
    assert [row["edits"] for row in document["series"]] == [2, 4]
    assert document["summary"]["err"] == 1.0 and document["summary"]["size"] == 4
    assert document["config"]["layer"] == 0
    assert (out_dir / "stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(load_artifact(out_dir / "artifact").edit_ids) == 4
    assert "err" in out
