"""The one runner: a validated pipeline spec -> a Ray model worker -> one MLflow run.

    spec = load_pipeline(path)            # everything checkable without a model, before Ray
    MLflow run opened (RUNNING), params and inputs logged
    Ray initialised (local unless `address`), ModelWorker started (loads the model once)
    with an edit step and registry.build_on_champion: the champion's lineage is downloaded
    steps: validate (prompt lengths) -> edit -> evaluate, each a call on the worker (the edit is
        computed, and scored, with the champion's lineage attached)
    outputs written to a local run directory and logged: metrics, tags, edit_artifact/,
    results/ (before/after table as CSV + JSON + MLflow table, metrics.json, metrics.png)
    with an edit step: a new registry version (candidate; champion when the gates pass)

A failing step marks the MLflow run FAILED with its error and the exception propagates (an
exception raised inside the worker is re-raised as itself, not as Ray's wrapper). A Ray session
the caller initialised is used and left running; one this runner started is shut down.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from tqdm.auto import tqdm

from editing_core.config import ConfigError, config_to_dict
from editing_core.data import EditRequest, load_facts
from infra.tracking import (
    EDIT_ARTIFACT_PATH,
    RunRecord,
    TrackedRun,
    check_reachable,
    flatten_params,
    log_pipeline_run,
    resolve_tracking_uri,
    tracked_run,
)
from pipelines import report
from pipelines.spec import PipelineSpec, load_any_pipeline
from tasks.model_worker import requests_to_dicts, start_model_worker
from tasks.sharding import get_unwrapped as _get, ray_connected

if TYPE_CHECKING:  # pragma: no cover - typing only
    from editing_core.artifacts import EditArtifact
    from editing_core.evaluate import EvalReport
    from infra.registry import Registration

log = logging.getLogger(__name__)

# metrics of a baseline run (evaluate without edit) describe the unedited model: logged as pre_*
BASELINE_METRICS = ("edit_success", "paraphrase", "edit_success_generated", "paraphrase_generated")


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run produced and where it is recorded.

    metrics:      the logged metrics (post-edit, pre_* and timings).
    rows:         the before/after table, one row per request.
    artifact_dir: local copy of the edit artifact (None without an edit step).
    output_dir:   the local run directory (artifact, table, chart).
    registration: the registry version made by the run (None without an edit step, or with
                  registry.register false).
    """

    run_id: str
    experiment_id: str
    experiment_name: str
    tracking_uri: str
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    artifact_dir: Path | None
    artifact_id: str | None
    output_dir: Path
    registration: "Registration | None" = None


@dataclass
class _Inputs:
    """What the driver reads from disk and sends to the worker.

    base: the champion's lineage the edit builds on (oldest first; empty: the bare base model),
    base_version: that champion's version number.
    """

    requests: list[EditRequest]
    heldout: list[tuple[str, str]] | None
    facts_sha256: str
    base: tuple["EditArtifact", ...] = ()
    base_version: str | None = None


@dataclass
class _Outcome:
    """What the steps produced."""

    worker: dict[str, Any] = field(default_factory=dict)
    artifact: "EditArtifact | None" = None
    report: "EvalReport | None" = None
    seconds: dict[str, float] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)  # stream checkpoints (stream_every > 0)
    editor_training: dict[str, Any] = field(default_factory=dict)  # an edit step's trained editor (mend / salem)


def run_pipeline(
    spec_path: str | os.PathLike[str] | PipelineSpec,
    address: str | None = None,
    tracking_uri: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
) -> PipelineResult:
    """Validate the pipeline at `spec_path` (or take an already loaded spec), run it on Ray and
    record it as one MLflow run.

    address:      a Ray cluster address (None: use the caller's Ray session, else start a local one).
    tracking_uri: MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else ./mlruns.db).
    output_dir:   where the local run directory goes (default: ./runs).
    """
    spec = spec_path if isinstance(spec_path, PipelineSpec) else load_any_pipeline(spec_path)
    if not isinstance(spec, PipelineSpec):  # kind: prune
        from pipelines.prune import run_prune_pipeline

        return run_prune_pipeline(spec, address, tracking_uri, output_dir)
    inputs = _read_inputs(spec)
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    registering = spec.edit is not None and spec.registry.register
    with tracked_run(uri, spec.experiment, spec.name, tags={"pipeline": spec.name, "base_model": spec.model}) as run:
        log_pipeline_run(run, _start_record(spec, inputs))
        if registering and spec.registry.build_on_champion:
            _add_champion_lineage(spec, inputs, uri, run)
        if not inputs.requests:
            return _nothing_new(spec, inputs, run, output_dir)
        with ray_session(address, spec):
            outcome = _run_steps(spec, inputs)
        run_dir = _run_directory(output_dir, spec, run)
        metrics = _metrics(outcome)
        rows = outcome.report.rows if outcome.report is not None else []
        log_pipeline_run(run, _end_record(spec, outcome, metrics, rows, run_dir))
        registration = _register(spec, inputs, outcome, metrics, run, run_dir) if registering else None
    return _result(run, run_dir, metrics, rows, outcome.artifact, registration)


def _result(run: TrackedRun, run_dir: Path, metrics: dict[str, Any], rows: list[dict[str, Any]],
            artifact: "EditArtifact | None" = None, registration: "Registration | None" = None) -> PipelineResult:
    return PipelineResult(
        run_id=run.run_id, experiment_id=run.experiment_id, experiment_name=run.experiment_name,
        tracking_uri=run.tracking_uri, metrics=metrics, rows=rows,
        artifact_dir=run_dir / EDIT_ARTIFACT_PATH if artifact is not None else None,
        artifact_id=artifact.meta.artifact_id if artifact is not None else None, output_dir=run_dir,
        registration=registration,
    )


# ---------------------------------------------------------------------------------------
# inputs and Ray
# ---------------------------------------------------------------------------------------


def _read_inputs(spec: PipelineSpec) -> _Inputs:
    """The requests, the heldout pairs and the facts file's sha256 (the driver reads files; workers never do)."""
    heldout = None
    if spec.heldout is not None:
        heldout = [(r.prompt, r.target_new) for r in load_facts(spec.heldout)]
    return _Inputs(requests=load_facts(spec.facts), heldout=heldout, facts_sha256=path_sha256(spec.facts))


def _add_champion_lineage(spec: PipelineSpec, inputs: _Inputs, tracking_uri: str, run: TrackedRun) -> None:
    """Put the current champion's lineage (if there is a champion) under the edit."""
    from infra import registry

    client = registry.client_for(tracking_uri)
    name = spec.registry.model_name(spec.model)
    champion = registry.aliases(client, name).get(registry.CHAMPION)
    if champion is None:
        log.info("registered model %s has no champion yet: editing the base model", name)
        return
    version = registry.get_version(client, name, champion)
    built_on = (version.tags or {}).get(registry.TAG + "base_model")
    if built_on != spec.model:
        raise ConfigError(
            f"{spec.source}: registry.name: the champion of {name!r} (version {champion}) edits "
            f"{built_on!r}, not this pipeline's model {spec.model!r}; choose another registry.name"
        )
    inputs.base = registry.download_lineage(tracking_uri, version).artifacts
    inputs.base_version = champion
    run.set_tags({"parent_version": champion})
    log.info("building on %s champion version %s (%d edit artifacts)", name, champion, len(inputs.base))
    if spec.registry.skip_known:
        known = {fact["digest"] for fact in registry.Lineage(inputs.base).facts()}
        new = [r for r in inputs.requests if r.digest() not in known]
        if len(new) < len(inputs.requests):
            log.info("%d of %d facts are already in the champion; editing the other %d",
                     len(inputs.requests) - len(new), len(inputs.requests), len(new))
        inputs.requests = new
    run.log_metrics({"n_new_facts": len(inputs.requests)})


def _nothing_new(spec: PipelineSpec, inputs: _Inputs, run: TrackedRun, output_dir: str | os.PathLike[str] | None) -> PipelineResult:
    """Every fact is already in the champion: no edit, no version; the run says so."""
    log.info("every fact of %s is already in the champion (version %s): nothing to edit", spec.facts, inputs.base_version)
    run.set_tags({"outcome": "nothing new: every fact is already in the champion"})
    return _result(run, _run_directory(output_dir, spec, run), {"n_new_facts": 0}, [])


def _register(spec: PipelineSpec, inputs: _Inputs, outcome: _Outcome, metrics: dict[str, Any], run: TrackedRun, run_dir: Path) -> "Registration":
    from infra.registry import register_version

    assert outcome.artifact is not None
    registration = register_version(
        run.run_id, run.tracking_uri, spec.registry, spec.model, (*inputs.base, outcome.artifact), metrics,
        facts_sha256=inputs.facts_sha256, pipeline_sha256=file_sha256(spec.source),
        parent_version=inputs.base_version, workdir=run_dir,
    )
    run.set_tags({"registered_model": registration.name, "registered_version": registration.version,
                  "promoted": registration.promoted})
    return registration


def path_sha256(path: Path) -> str:
    """sha256 of a file; of a directory, over its files' names and sha256s (name order)."""
    if not path.is_dir():
        return file_sha256(path)
    listing = "".join(f"{p.name}\t{file_sha256(p)}\n" for p in sorted(path.iterdir()) if p.is_file())
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def ray_session(address: str | None, spec: PipelineSpec) -> Iterator[None]:
    """Use the caller's Ray session if there is one; else start (and later shut down) our own:
    a local cluster, or a connection to `address`. A local cluster too small for the model
    worker is refused (ConfigError naming the spec's resources.cpus)."""
    with ray_connected(address, spec.resources.cpus, f"{spec.source}: resources.cpus: the model worker", ConfigError):
        yield


# ---------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------


def _run_steps(spec: PipelineSpec, inputs: _Inputs) -> _Outcome:
    """Start the worker and run the spec's steps on it, with a progress bar over the steps."""
    import ray

    outcome = _Outcome()
    requests = requests_to_dicts(inputs.requests)
    if spec.edit is not None and spec.edit.train is not None:  # before the model worker takes its CPUs
        started = time.perf_counter()
        outcome.editor_training = _train_editor_step(spec)
        outcome.seconds["train editor"] = time.perf_counter() - started
    worker = start_model_worker(spec.model, spec.resources.cpus)
    phases: list[tuple[str, Callable[[], None]]] = [
        ("load model", lambda: outcome.worker.update(_get(worker.describe.remote()))),
    ]
    for kind in spec.steps:
        phases.append((kind, lambda kind=kind: _STEPS[kind](worker, spec, inputs, requests, outcome)))
    try:
        with tqdm(total=len(phases), desc=f"pipeline {spec.name}", unit="step") as bar:
            for name, run in phases:
                bar.set_postfix_str(name)
                log.info("step %s", name)
                started = time.perf_counter()
                run()
                outcome.seconds[name] = time.perf_counter() - started
                bar.update()
    finally:
        ray.kill(worker)
    return outcome


def _train_editor_step(spec: PipelineSpec) -> dict[str, Any]:
    """Train (or reuse, or resume) the edit step's editor; returns what the run logs about it."""
    from editing_core.config import load_config
    from editing_core.editors.mend import NET_CONFIG_NAME, MendNetConfig, MendTrainConfig
    from pipelines.editor_training import EditorTrainingSpec, train_editor_run
    from tasks.mend_train import HISTORY_NAME, DistributedConfig

    assert spec.edit is not None and spec.edit.train is not None
    t = spec.edit.train
    out = Path(t.out)
    train = load_config(MendTrainConfig, t.train)
    trained = out / "editor" / NET_CONFIG_NAME
    if trained.is_file() and json.loads(trained.read_text()).get("trained_steps", 0) >= train.steps:
        log.info("reusing the editor in %s (trained %d steps)", out / "editor", train.steps)
    else:
        training = EditorTrainingSpec(
            model=spec.model, facts=Path(t.facts), val=Path(t.val) if t.val else None,
            net=load_config(MendNetConfig, t.net), train=train,
            distributed=DistributedConfig(workers=t.workers, cpus_per_worker=t.cpus_per_worker, zero_stage=t.zero_stage, offload=t.offload),
            salient=spec.edit.method == "salem", salient_by=t.salient_by, salient_layers=t.salient_layers,
            saliency_rows=t.saliency_rows, max_rows=t.max_rows)
        train_editor_run(training, out)
    files = [p for p in (out / "training.png", out / HISTORY_NAME, out / "saliency" / "saliency.json", out / "saliency" / "saliency.png",
                         out / "edit_gain" / "edit_gain.json", out / "edit_gain" / "edit_gain.png") if p.is_file()]
    document = json.loads(trained.read_text())
    return {"history": json.loads((out / HISTORY_NAME).read_text()), "files": files,
            "salient_layer": document.get("salient_layer"), "trained_steps": document.get("trained_steps")}


def _validate_step(worker: Any, spec: PipelineSpec, inputs: _Inputs, requests: list[dict[str, Any]], outcome: _Outcome) -> None:
    _get(worker.check_lengths.remote(requests))


def _edit_step(worker: Any, spec: PipelineSpec, inputs: _Inputs, requests: list[dict[str, Any]], outcome: _Outcome) -> None:
    assert spec.edit is not None
    if not spec.edit.stream_every:
        outcome.artifact = _get(worker.edit.remote(spec.edit.method, spec.edit.config, requests, inputs.base))
        return
    unrelated = inputs.heldout if inputs.heldout is not None else [
        (r.locality_prompt, r.locality_answer) for r in inputs.requests if r.locality_prompt and r.locality_answer
    ]
    result = _get(worker.stream.remote(spec.edit.method, spec.edit.config, requests, unrelated, spec.edit.stream_every, inputs.base))
    outcome.artifact, outcome.series = result.artifact, result.series


def _evaluate_step(worker: Any, spec: PipelineSpec, inputs: _Inputs, requests: list[dict[str, Any]], outcome: _Outcome) -> None:
    assert spec.evaluate is not None
    config = config_to_dict(spec.evaluate)
    outcome.report = _get(worker.evaluate.remote(requests, outcome.artifact, inputs.heldout, config, inputs.base))


_STEPS: dict[str, Callable[..., None]] = {
    "validate": _validate_step,
    "edit": _edit_step,
    "evaluate": _evaluate_step,
}


# ---------------------------------------------------------------------------------------
# what gets recorded
# ---------------------------------------------------------------------------------------


def _metrics(outcome: _Outcome) -> dict[str, Any]:
    """Numeric metrics to log: the evaluation (None values dropped) and step timings.

    A baseline run (no edit) scores the unedited model: its metrics are logged as pre_*.
    """
    metrics: dict[str, Any] = {}
    if outcome.report is not None:
        values = outcome.report.metrics
        if outcome.artifact is None:
            values = {**{f"pre_{k}": values.get(k) for k in BASELINE_METRICS}, "n_requests": values.get("n_requests")}
        metrics.update({k: v for k, v in values.items() if v is not None})
    metrics.update({f"seconds_{name.replace(' ', '_')}": round(s, 3) for name, s in outcome.seconds.items()})
    return metrics


def _start_record(spec: PipelineSpec, inputs: _Inputs) -> RunRecord:
    """Params and input files, logged as soon as the run opens (so a failed run has them too)."""
    params: dict[str, Any] = {
        "model": spec.model,
        "method": spec.edit.method if spec.edit else "none",
        "steps": ",".join(spec.steps),
        "n_requests": len(inputs.requests),
        "facts_file": spec.facts.name,
        "facts_sha256": inputs.facts_sha256,
        "cpus": spec.resources.cpus,
    }
    if spec.edit is not None:
        params.update(flatten_params(spec.edit.config, "config."))
        params["stream_every"] = spec.edit.stream_every
    if spec.evaluate is not None:
        params.update(flatten_params(config_to_dict(spec.evaluate), "eval."))
    files = [(spec.source, "inputs")]
    dirs = []
    if spec.facts.is_dir():
        dirs.append((spec.facts, f"inputs/{spec.facts.name}"))
    else:
        files.append((spec.facts, "inputs"))
    if spec.heldout is not None:
        params["heldout_sha256"] = file_sha256(spec.heldout)
        files.append((spec.heldout, "inputs/heldout"))
    return RunRecord(params=params, files=files, dirs=dirs)


def _run_directory(output_dir: str | os.PathLike[str] | None, spec: PipelineSpec, run: TrackedRun) -> Path:
    base = Path(output_dir) if output_dir is not None else Path.cwd() / "runs"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)
    path = (base / f"{safe}-{run.run_id[:8]}").resolve()
    path.mkdir(parents=True, exist_ok=False)
    return path


def _end_record(spec: PipelineSpec, outcome: _Outcome, metrics: dict[str, Any], rows: list[dict[str, Any]], run_dir: Path) -> RunRecord:
    """Metrics, tags and result files: the edit artifact, the table and the chart."""
    record = RunRecord(metrics=metrics, table_rows=rows)
    record.tags["model_type"] = outcome.worker.get("model_type")
    if outcome.artifact is not None:
        meta = outcome.artifact.meta
        record.tags.update(method=meta.method, artifact_id=meta.artifact_id, base_weights_hash=meta.base_hash)
        record.dirs.append((outcome.artifact.save(run_dir / EDIT_ARTIFACT_PATH), EDIT_ARTIFACT_PATH))
    results = run_dir / "results"
    results.mkdir()
    files = [report.write_json(metrics, results / "metrics.json")]
    if rows:
        files += [report.write_rows_csv(rows, results / "before_after.csv"), report.write_json(rows, results / "before_after.json")]
    chart = report.plot_before_after(metrics, results / "metrics.png", f"{spec.name}: {spec.model}")
    if chart is not None:
        files.append(chart)
    if outcome.editor_training:
        record.editor_history = outcome.editor_training["history"]
        record.files += [(path, "editor_training") for path in outcome.editor_training["files"]]
        record.tags.update(salient_layer=outcome.editor_training["salient_layer"], editor_trained_steps=outcome.editor_training["trained_steps"])
    if outcome.series:
        record.series = outcome.series
        files.append(report.write_json(outcome.series, results / "stream.json"))
        files.append(report.plot_stream({spec.edit.method: outcome.series}, results / "stream.png", f"{spec.name}: {spec.model}"))
    record.files += [(path, "results") for path in files]
    return record
