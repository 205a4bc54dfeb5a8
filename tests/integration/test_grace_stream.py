"""GRACE on the real SmolLM2-135M: 50 sequential CounterFact edits through a pipeline (real Ray,
real MLflow server) keep edit and test retention, log their curves, and the registered codebook
reloads, answers the edits and forgets one by id while keeping the others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import yaml

from editing_core.data import load_facts
from editing_core.evaluate import teacher_forced
from editing_core.models import load_model
from infra.tracking import download_edit_artifact
from pipelines.runner import run_pipeline

pytestmark = pytest.mark.integration

N_EDITS = 50


def test_fifty_sequential_grace_edits_keep_retention_and_log_curves(
    chdir_tmp: Path, mlflow_server: str, local_ray: None, smollm2_available: None,
    counterfact_rows: Callable[..., list[dict]],
) -> None:
    from mlflow import MlflowClient

    (chdir_tmp / "facts.json").write_text(json.dumps(counterfact_rows(N_EDITS)), encoding="utf-8")
    spec = {
        "name": "grace-stream",
        "model": "smollm2-135m",
        "facts": "facts.json",
        "steps": [{"validate": {}}, {"edit": {"method": "grace", "stream_every": 25}},
                  {"evaluate": {"generated": False}}],
        "tracking": {"experiment": "it-grace"},
        "resources": {"cpus": 2},
        "registry": {"name": "it-grace-edits", "build_on_champion": False},
    }
    path = chdir_tmp / "grace.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    result = run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["stream_every"] == "25"
    err = client.get_metric_history(result.run_id, "stream_err")
    trr = client.get_metric_history(result.run_id, "stream_trr")
    assert sorted(m.step for m in err) == [25, 50] and sorted(m.step for m in trr) == [25, 50]
    final = {m.key: m.value for m in (max(err, key=lambda m: m.step), max(trr, key=lambda m: m.step))}
    assert final["stream_err"] >= 0.95 and final["stream_trr"] >= 0.95
    assert client.get_metric_history(result.run_id, "stream_size")[-1].value >= 40  # one key per edit, or nearly
    logged = {f.path for f in client.list_artifacts(result.run_id, "results")}
    assert {"results/stream.json", "results/stream.png"} <= logged
    assert run.data.metrics["edit_success"] >= 0.95 and run.data.metrics["locality"] >= 0.95

    artifact = download_edit_artifact(result.run_id, mlflow_server)
    assert artifact.kind == "grace_codebook" and len(artifact.requests) == N_EDITS
    assert result.registration is not None and result.registration.version is not None
    requests = load_facts(chdir_tmp / "facts.json")
    pairs = [(r.prompt, r.target_new) for r in requests]
    loaded = load_model("smollm2-135m")
    gone = requests[0]
    smaller = artifact.without_edits([gone.digest()])
    with smaller.attached(loaded.model):
        right = [bool(c.all()) for c in teacher_forced(loaded.model, loaded.tokenizer, pairs, 16)]
    assert not right[0]  # the forgotten fix is gone (SmolLM2 does not know the counterfactual)
    assert sum(right[1:]) >= 0.95 * (N_EDITS - 1)
