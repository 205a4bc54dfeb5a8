"""The `prune` pipeline: importance scores sharded on Ray -> pruning curves and the pruned model
-> induction heads, all logged as one MLflow run. `editflow run` picks it by `kind: prune`.

    kind: prune
    name: prune-smollm2
    model: smollm2-135m
    tasks: null                 # directory of k-shot task files; null: the shipped tasks
    shots: [0, 5]
    max_rows: 40                # rows of each task scored and evaluated (null: all)
    workers: 2                  # Ray workers scoring shards of the rows (0: the driver process)
    cpus_per_worker: 1
    heads: 0.5                  # the pruned model: lowest-scoring fractions removed
    ffn: 0.2
    curve_heads: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    curve_ffn: [0.1, 0.2, 0.3]
    iterative: false            # rescore heads after each curve step instead of ranking once
    rank_by: gradient           # gradient (mean |z . dL/dz|) or taylor (first-order loss increase)
    ablation: false             # also the exact ablation reference (slow: L*H + L passes)
    induction: true             # induction-head scores and their overlap with important heads
    tracking: {experiment: editflow-analysis}

Logged: params; metrics (accuracy per task and shots before / after pruning, the share of heads
and FFNs removable within 1 point, Spearman correlations, seconds); the accuracy curves as metric
histories (step = percent removed); importance.json, heads.png, ffn.png, induction.png,
prune.json, curves.json, curves.png and the pruned model's edit artifact.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editing_core.config import ConfigError, config_to_dict
from editing_core.importance import RANKINGS, ImportanceConfig, Task, TaskError, load_tasks
from pipelines.spec import TrackingSpec
from infra.tracking import RunRecord, check_reachable, flatten_params, log_pipeline_run, resolve_tracking_uri, tracked_run

KIND = "prune"


@dataclass(frozen=True)
class PruneFile:
    """A prune pipeline as written; every field is described in the module docstring."""

    kind: str
    name: str
    model: str
    tasks: str | None = None
    shots: tuple[int, ...] = (0, 5)
    max_rows: int | None = None
    batch_size: int = 8
    workers: int = 2
    cpus_per_worker: float = 1.0
    heads: float = 0.5
    ffn: float = 0.2
    curve_heads: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
    curve_ffn: tuple[float, ...] = (0.1, 0.2, 0.3)
    iterative: bool = False
    rank_by: str = "gradient"
    ablation: bool = False
    induction: bool = True
    tracking: TrackingSpec = field(default_factory=TrackingSpec)


@dataclass(frozen=True)
class PruneSpec:
    """A validated prune pipeline: the file's fields, the tasks loaded, the source path."""

    pipeline: PruneFile
    tasks: tuple[Task, ...]
    source: Path

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def experiment(self) -> str:
        return self.pipeline.tracking.experiment or self.pipeline.name

    def importance_config(self) -> ImportanceConfig:
        p = self.pipeline
        return ImportanceConfig(shots=p.shots[0], batch_size=p.batch_size, max_rows=p.max_rows, progress=True)


def load_prune_pipeline(path: str | os.PathLike[str], document: Any) -> PruneSpec:
    """Validate a prune pipeline (its YAML already parsed into `document`); the task files are
    read and checked here, before any Ray call. Errors name the file and the field."""
    from pipelines.spec import _existing_file, _load_section

    where = str(path)
    raw: PruneFile = _load_section(PruneFile, document, where, "")
    problems = [
        (not raw.name.strip(), "name: must not be empty"),
        (not raw.model.strip(), "model: must not be empty"),
        (not raw.shots or min(raw.shots) < 0, "shots: one or more counts >= 0"),
        (raw.max_rows is not None and raw.max_rows < 1, "max_rows: must be >= 1 (or null for all rows)"),
        (raw.batch_size < 1, "batch_size: must be >= 1"),
        (raw.workers < 0, "workers: must be >= 0 (0: score in the driver process)"),
        (raw.cpus_per_worker <= 0, "cpus_per_worker: must be > 0"),
        (not 0 <= raw.heads <= 1, "heads: a fraction in [0, 1]"),
        (not 0 <= raw.ffn <= 1, "ffn: a fraction in [0, 1]"),
        (any(not 0 <= f <= 1 for f in (*raw.curve_heads, *raw.curve_ffn)), "curve_heads / curve_ffn: fractions in [0, 1]"),
        (raw.rank_by not in RANKINGS, f"rank_by: one of {', '.join(RANKINGS)}"),
    ]
    for failed, message in problems:
        if failed:
            raise ConfigError(f"{where}: {message}")
    directory = None
    if raw.tasks is not None:
        directory = _existing_file(raw.tasks, Path(path).resolve().parent, where, "tasks", directory_ok=True)
        if not directory.is_dir():
            raise ConfigError(f"{where}: tasks: {raw.tasks!r} is a file; give the directory of task files (*.jsonl)")
    try:
        tasks = load_tasks(directory)
    except TaskError as exc:
        raise ConfigError(f"{where}: tasks: {exc}") from None
    if not tasks:
        raise ConfigError(f"{where}: tasks: no task files (*.jsonl) in {directory}")
    for task in tasks:
        if max(raw.shots) > task.max_shots:
            raise ConfigError(f"{where}: shots: {max(raw.shots)} shots need that many examples per row; task {task.name} has {task.max_shots}")
    return PruneSpec(raw, tuple(tasks), Path(path).resolve())


def run_prune_pipeline(spec: PruneSpec, address: str | None = None, tracking_uri: str | None = None,
                       output_dir: str | os.PathLike[str] | None = None) -> Any:
    """Run a validated prune pipeline as one MLflow run; returns a `PipelineResult`."""
    from pipelines.analysis import prune_model, score_model, write_pruning, write_scores
    from pipelines.runner import PipelineResult, _run_directory
    from tasks.sharding import ray_connected

    p = spec.pipeline
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    config = spec.importance_config()
    with tracked_run(uri, spec.experiment, spec.name, tags={"pipeline": spec.name, "kind": KIND, "base_model": p.model}) as run:
        params = {key: value for key, value in flatten_params(config_to_dict(p)).items() if key != "kind"}
        run.log_params({**params, "tasks": ",".join(t.name for t in spec.tasks)})
        from editing_core.models import load_model

        loaded = load_model(p.model)
        induction = None
        if p.induction:
            from editing_core.induction import InductionConfig

            induction = InductionConfig(progress=True)
        with ray_connected(address, p.workers * p.cpus_per_worker, f"{spec.source}: workers x cpus_per_worker", ConfigError) if p.workers else nullcontext():
            scores = score_model(p.model, spec.tasks, p.shots, config, p.workers, p.cpus_per_worker, loaded,
                                 ablation=p.ablation, induction=induction)
        head, ffn = (scores.head_taylor, scores.ffn_taylor) if p.rank_by == "taylor" else (scores.head, scores.ffn)
        pruning = prune_model(loaded, spec.tasks, p.shots, head, ffn, p.heads, p.ffn,
                              p.curve_heads, p.curve_ffn, p.iterative, config, p.rank_by)
        run_dir = _run_directory(output_dir, spec, run)
        files = write_scores(scores, run_dir / "scores") + write_pruning(pruning, run_dir / "pruning", f"pruning {p.model}")
        metrics = _metrics(scores, pruning)
        record = RunRecord(metrics=metrics, tags={"model_type": loaded.adapter.model_type, "artifact_id": pruning.artifact.meta.artifact_id})
        record.files = [(f, "results") for f in files]
        record.dirs = [(run_dir / "pruning" / "artifact", "edit_artifact")]
        log_pipeline_run(run, record)
        for k in p.shots:
            for axis in ("heads", "ffn"):
                run.log_metric_series(_curve_series(pruning.curve, axis, k), "percent", f"curve_{axis}_{k}shot_")
    return PipelineResult(run_id=run.run_id, experiment_id=run.experiment_id, experiment_name=run.experiment_name,
                          tracking_uri=run.tracking_uri, metrics=metrics, rows=[], artifact_dir=run_dir / "pruning" / "artifact",
                          artifact_id=pruning.artifact.meta.artifact_id, output_dir=run_dir)


def _metrics(scores: Any, pruning: Any) -> dict[str, float]:
    """Flat numeric metrics of the run."""
    metrics: dict[str, float] = {f"seconds_{k}": round(v, 3) for k, v in scores.seconds.items()}
    for row in pruning.accuracy:
        metrics[f"acc_{row['task']}_{row['shots']}shot"] = row["unpruned"]
        metrics[f"pruned_acc_{row['task']}_{row['shots']}shot"] = row["pruned"]
    for k in scores.shots:
        rows = [r for r in pruning.accuracy if r["shots"] == k]
        metrics[f"acc_mean_{k}shot"] = sum(r["unpruned"] for r in rows) / len(rows)
        metrics[f"pruned_acc_mean_{k}shot"] = sum(r["pruned"] for r in rows) / len(rows)
    metrics.update({f"removable_{key.replace('@', '_')}": value for key, value in pruning.removable.items()})
    if scores.ablation is not None:
        metrics.update({f"spearman_{key}": value for key, value in scores.ablation["spearman"].items()})
        metrics["ablation_cost_ratio"] = scores.ablation["cost_ratio"]
    if scores.overlap is not None:
        metrics["induction_overlap_jaccard"] = scores.overlap["jaccard"]
        metrics["induction_overlap_count"] = scores.overlap["count"]
    return metrics


def _curve_series(curve: list[dict[str, Any]], axis: str, shots: int) -> list[dict[str, Any]]:
    """Mean accuracy over tasks at each fraction of `axis` removed (the other at 0), keyed by percent."""
    other = "ffn" if axis == "heads" else "heads"
    points: dict[float, list[float]] = {}
    for row in curve:
        if row["shots"] == shots and row[other] == 0:
            points.setdefault(row[axis], []).append(row["accuracy"])
    return [{"percent": round(100 * fraction), "accuracy": sum(v) / len(v)} for fraction, v in sorted(points.items())]
