"""run_pipeline end to end: a real local Ray, a real `mlflow server`, the real SmolLM2-135M.

The run is logged FINISHED with its metrics, and the edit artifact it logged downloads, reloads,
attaches to a freshly loaded model and scores exactly what the run recorded. A bad spec is
refused before Ray starts or MLflow is touched; a step that fails marks the run FAILED and
re-raises the worker's own exception.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from editing_core.config import ConfigError
from editing_core.data import load_facts
from editing_core.evaluate import EvalConfig, evaluate
from editing_core.models import load_model
from infra.tracking import download_edit_artifact
from pipelines.runner import run_pipeline

pytestmark = pytest.mark.integration

FACTS = [
    {"prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris",
     "rephrase": ["The capital city of France is"],
     "locality_prompt": "The capital of Germany is", "locality_answer": "Berlin"},
    {"prompt": "The capital of Japan is", "target_new": "London", "ground_truth": "Tokyo",
     "rephrase": ["The capital city of Japan is"],
     "locality_prompt": "The capital of Spain is", "locality_answer": "Madrid"},
]
EVAL = {"generated": False, "batch_size": 16}


def write_pipeline(directory: Path, name: str, edit_config: dict[str, Any], **changes: Any) -> Path:
    facts = directory / "facts.jsonl"
    facts.write_text("".join(json.dumps(row) + "\n" for row in FACTS), encoding="utf-8")
    document: dict[str, Any] = {
        "name": name,
        "model": "smollm2-135m",
        "facts": "facts.jsonl",
        "steps": [{"validate": {}}, {"edit": {"method": "ft_kl", "config": edit_config}}, {"evaluate": EVAL}],
        "tracking": {"experiment": f"it-{name}"},
        "resources": {"cpus": 2},
        **changes,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def test_bad_pipeline_is_refused_before_ray_and_mlflow(chdir_tmp: Path, mlflow_server: str) -> None:
    from mlflow import MlflowClient

    assert not ray.is_initialized()
    path = write_pipeline(chdir_tmp, "bad", {"layers": [4], "lr": "fast"})
    with pytest.raises(ConfigError, match=r"bad\.yaml: steps\[1\]\.edit\.config\.lr: expected a number, got 'fast'"):
        run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")
    assert not ray.is_initialized()
    assert MlflowClient(mlflow_server).get_experiment_by_name("it-bad") is None
    assert not (chdir_tmp / "runs").exists() and not (chdir_tmp / "mlruns.db").exists()


def test_run_logs_a_finished_run_whose_artifact_reloads(
    chdir_tmp: Path, mlflow_server: str, local_ray: None, smollm2_available: None
) -> None:
    from mlflow import MlflowClient

    path = write_pipeline(chdir_tmp, "edit", {"layers": [4, 5, 6], "steps": 10, "lr": 0.002})
    result = run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")
    assert ray.is_initialized()  # the caller's Ray session is left running

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "edit"
    assert run.info.experiment_id == result.experiment_id
    metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
    assert metrics["edit_success"] == pytest.approx(result.metrics["edit_success"])
    assert metrics["edit_success"] > metrics["pre_edit_success"]
    assert metrics["n_requests"] == 2 and "locality" in metrics and "paraphrase" in metrics
    assert params["model"] == "smollm2-135m" and params["method"] == "ft_kl"
    assert params["config.layers"] == "[4, 5, 6]" and params["config.steps"] == "10" and params["n_requests"] == "2"
    assert len(params["facts_sha256"]) == 64
    assert tags["method"] == "ft_kl" and tags["base_model"] == "smollm2-135m"
    assert tags["artifact_id"] == result.artifact_id and len(tags["base_weights_hash"]) == 64

    logged = {f.path for f in client.list_artifacts(run.info.run_id, "results")}
    assert {"results/metrics.png", "results/before_after.csv", "results/before_after.json"} <= logged
    inputs = {f.path for f in client.list_artifacts(run.info.run_id, "inputs")}
    assert inputs == {"inputs/facts.jsonl", "inputs/edit.yaml"}
    assert [row["target_new"] for row in result.rows] == ["Rome", "London"]

    artifact = download_edit_artifact(result.run_id, mlflow_server)
    assert artifact.meta.artifact_id == tags["artifact_id"] and artifact.meta.base_hash == tags["base_weights_hash"]
    loaded = load_model("smollm2-135m")
    report = evaluate(loaded, load_facts(chdir_tmp / "facts.jsonl"), artifact, config=EvalConfig(**EVAL))
    assert report.metrics["edit_success"] == pytest.approx(metrics["edit_success"], abs=1e-6)
    assert report.metrics["locality"] == pytest.approx(metrics["locality"], abs=1e-6)


def test_failing_step_marks_the_run_failed_and_reraises_the_workers_error(
    chdir_tmp: Path, mlflow_server: str, local_ray: None, smollm2_available: None
) -> None:
    from mlflow import MlflowClient

    # not registered: its facts are already in the champion an earlier test registered, which
    # would leave nothing to edit
    path = write_pipeline(chdir_tmp, "fails", {"layers": [99], "steps": 1}, registry={"register": False})
    with pytest.raises(ValueError, match="layer 99 is out of range") as info:
        run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")
    assert type(info.value) is ValueError  # the worker's exception itself, not Ray's wrapper
    assert ray.is_initialized()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("it-fails")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert "layer 99 is out of range" in run.data.tags["error"]
    assert run.data.params["method"] == "ft_kl"  # params are logged before the steps run
    assert "error.txt" in {f.path for f in client.list_artifacts(run.info.run_id)}
