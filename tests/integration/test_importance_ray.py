"""Importance scoring sharded on a real local Ray: the scores do not depend on the worker count,
`editflow importance` on SmolLM2-135M with 2 workers writes its JSON and PNGs, and the prune
pipeline logs scores, curves and the pruned model to a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from editing_core.importance import ImportanceConfig, ImportanceSums, load_tasks, shipped_tasks_dir
from pipelines.cli import main
from pipelines.runner import run_pipeline
from tasks.importance import sharded_importance

pytestmark = pytest.mark.integration

def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_sharded_scores_equal_in_process_for_1_2_3_workers(copy_task: Callable[..., Path], tiny_llama_dir: str, tmp_path: Path, local_ray: None) -> None:
    tasks = load_tasks(copy_task(tmp_path / "tasks"))
    config = ImportanceConfig(batch_size=4)
    reference = ImportanceSums.reduce(list(sharded_importance(tiny_llama_dir, tasks, (0, 1), config, workers=0).values()))
    for workers in (1, 2, 3):
        # 3 workers x 0.5 CPU fit the 2-CPU test cluster
        by_key = sharded_importance(tiny_llama_dir, tasks, (0, 1), config, workers=workers, cpus_per_worker=0.5)
        assert set(by_key) == {("copy", 0), ("copy", 1)}
        total = ImportanceSums.reduce(list(by_key.values()))
        assert total.rows == reference.rows and total.tokens == reference.tokens
        assert relative_error(total.head_scores(), reference.head_scores()) < 1e-5
        assert relative_error(total.ffn_scores(), reference.ffn_scores()) < 1e-5


def test_importance_command_on_smollm2_with_two_workers(tmp_path: Path, local_ray: None, smollm2_available: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "copy_word.jsonl").write_text((shipped_tasks_dir() / "copy_word.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "scores"
    code = main(["importance", "--model", "smollm2-135m", "--tasks", str(tasks_dir), "--shots", "1", "--max-rows", "8",
                 "--workers", "2", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    document = json.loads((out / "importance.json").read_text())
    assert document["workers"] == 2 and document["layers"] == 30 and document["heads"] == 9
    head = torch.tensor(document["head_scores"])
    assert head.shape == (30, 9) and bool((head > 0).all())
    assert document["by_task"][0]["rows"] == 8
    for png in ("heads.png", "ffn.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prune_pipeline_logs_scores_curves_and_pruned_model(copy_task: Callable[..., Path], tiny_llama_dir: str, chdir_tmp: Path, mlflow_server: str,
                                                            local_ray: None) -> None:
    from mlflow import MlflowClient

    copy_task(chdir_tmp / "tasks")
    spec = {"kind": "prune", "name": "prune-tiny", "model": tiny_llama_dir, "tasks": "tasks", "shots": [0, 1],
            "workers": 2, "cpus_per_worker": 0.5, "heads": 0.5, "ffn": 0.5, "curve_heads": [0.25, 0.5],
            "curve_ffn": [0.5], "ablation": True, "induction": True, "tracking": {"experiment": "it-prune"}}
    path = chdir_tmp / "prune.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    result = run_pipeline(path, tracking_uri=mlflow_server, output_dir=chdir_tmp / "runs")

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2" and run.data.tags["kind"] == "prune"
    metrics = run.data.metrics
    assert {"acc_mean_0shot", "pruned_acc_mean_1shot", "removable_heads_0shot", "spearman_heads_vs_nll_increase",
            "induction_overlap_jaccard", "seconds_gradient"} <= set(metrics)
    curve = client.get_metric_history(result.run_id, "curve_heads_0shot_accuracy")
    assert sorted(m.step for m in curve) == [0, 25, 50]
    logged = {f.path for f in client.list_artifacts(result.run_id, "results")}
    assert {"results/importance.json", "results/heads.png", "results/ffn.png", "results/induction.png",
            "results/prune.json", "results/curves.json", "results/curves.png"} <= logged
    assert {f.path for f in client.list_artifacts(result.run_id, "edit_artifact")} >= {"edit_artifact/artifact.json"}
    assert result.artifact_dir is not None and (result.artifact_dir / "artifact.json").exists()
