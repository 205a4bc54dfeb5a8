"""A `method: salem` pipeline end to end on a real local Ray and a real MLflow server, with the
tiny Llama: saliency picks the layer, Ray Train + DeepSpeed trains the editor, the worker edits
with it and the run logs the training curves, the saliency and the metrics. (Reusing a trained
editor on a rerun is a unit test: tests/unit/test_pipeline_spec.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from editing_core.data import EditRequest
from editing_core.editors.mend import load_net
from pipelines.runner import run_pipeline

pytestmark = pytest.mark.integration


def test_salem_pipeline_trains_edits_evaluates_and_reuses_its_editor(
    chdir_tmp: Path, tiny_llama_dir: str, facts: list[EditRequest], mlflow_server: str, local_ray: None,
) -> None:
    from mlflow import MlflowClient

    (chdir_tmp / "facts.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in facts), encoding="utf-8")
    document = {
        "name": "salem", "model": tiny_llama_dir, "facts": "facts.jsonl",
        "steps": [{"validate": {}},
                  {"edit": {"method": "salem", "train": {
                      "facts": "facts.jsonl", "out": "editors/salem", "workers": 2, "zero_stage": 2,
                      "net": {"rank": 4}, "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "lr": 1e-2}}}},
                  {"evaluate": {"generated": False}}],
        "tracking": {"experiment": "it-salem"}, "resources": {"cpus": 2}, "registry": {"register": False},
    }
    path = chdir_tmp / "salem.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")

    result = run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")
    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    layer = int(run.data.tags["salient_layer"])
    assert 0 <= layer < 2 and run.data.tags["editor_trained_steps"] == "4"
    assert [m.step for m in client.get_metric_history(result.run_id, "editor_loss")] == [2, 4]
    assert "edit_success" in run.data.metrics and "seconds_train_editor" in run.data.metrics
    logged = {f.path for f in client.list_artifacts(result.run_id, "editor_training")}
    assert {"editor_training/training.png", "editor_training/saliency.json", "editor_training/history.json"} <= logged

    net, document_json = load_net(chdir_tmp / "editors" / "salem" / "editor")
    assert net.config.layers == (layer,) and net.config.factors == "svd" and document_json["method"] == "salem"
    artifact = json.loads((result.artifact_dir / "artifact.json").read_text())
    assert artifact["meta"]["method"] == "salem"
    assert all(f".layers.{layer}." in name for name in artifact["data"]["params"])
