"""MLflow tracking for editflow: where runs go, how a pipeline run is recorded, how to get an
edit artifact back.

Where runs go (`resolve_tracking_uri`): the `--tracking-uri` flag, else `MLFLOW_TRACKING_URI`,
else a SQLite store `mlruns.db` in the current directory. With a SQLite store, artifacts of new
experiments go to the absolute directory `mlruns/` beside the database file, never to a path
relative to whatever process happens to log; with an `http(s)://` server the server stores them.
Several processes writing one SQLite file race: anything concurrent should go through a
`mlflow server`.

Only the driver process logs; Ray workers never talk to MLflow. mlflow is imported lazily so
that importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient

    from editing_core.artifacts import EditArtifact

log = logging.getLogger(__name__)

DEFAULT_DB_NAME = "mlruns.db"
LOCAL_ARTIFACT_DIR = "mlruns"
EDIT_ARTIFACT_PATH = "edit_artifact"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
MAX_TAG_CHARS = 5000  # well under MLflow's limit on a tag value


# ---------------------------------------------------------------------------------------
# where runs go
# ---------------------------------------------------------------------------------------


def default_tracking_uri(directory: str | os.PathLike[str] | None = None) -> str:
    """The embedded default: a SQLite store `mlruns.db` in `directory` (default: the cwd)."""
    base = Path(directory) if directory is not None else Path.cwd()
    return f"sqlite:///{(base / DEFAULT_DB_NAME).resolve()}"


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    """The tracking URI to use: the CLI flag, else $MLFLOW_TRACKING_URI, else `default_tracking_uri()`."""
    if cli_value:
        return cli_value
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return env or default_tracking_uri()


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store)."""
    if not tracking_uri.startswith("sqlite:"):
        return None
    path = unquote(urlparse(tracking_uri).path)
    return Path(path).resolve() if path else None


def local_artifact_root(tracking_uri: str) -> str | None:
    """Absolute file URI where a SQLite store's new experiments keep artifacts; None otherwise.

    It is the `mlruns/` directory beside the database, so `sqlite:///<cwd>/mlruns.db` puts them
    under `<cwd>/mlruns/`.
    """
    db = sqlite_path(tracking_uri)
    return (db.parent / LOCAL_ARTIFACT_DIR).as_uri() if db is not None else None


def is_server_uri(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def ui_hint(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """How a person opens this run in the MLflow UI, as one or two lines of text."""
    page = f"#/experiments/{experiment_id}/runs/{run_id}"
    if is_server_uri(tracking_uri):
        return f"open {tracking_uri.rstrip('/')}/{page}"
    return (
        f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000\n"
        f"then browse http://127.0.0.1:5000/{page}"
    )


def check_reachable(tracking_uri: str, timeout: float = 10.0) -> None:
    """Fail fast (ConnectionError) when an http(s) tracking server does not answer /health;
    MLflow's own retries would take minutes to give up. Other stores need no check."""
    if not is_server_uri(tracking_uri):
        return
    from urllib.error import URLError
    from urllib.request import urlopen

    url = f"{tracking_uri.rstrip('/')}/health"
    try:
        with urlopen(url, timeout=timeout) as response:  # noqa: S310 - the user's own tracking URI
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConnectionError(f"MLflow tracking server {tracking_uri} is not reachable ({url}: {problem})")


def _client(tracking_uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client: "MlflowClient", name: str, tracking_uri: str) -> str:
    """The id of experiment `name`, created (with a sane artifact location) when missing."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted in {tracking_uri}; restore it "
                f"(mlflow experiments restore --experiment-id {existing.experiment_id}) or use another name"
            )
        return existing.experiment_id
    location = local_artifact_root(tracking_uri)
    if location is not None:
        location = f"{location}/{_safe_name(name)}"
    log.info("creating MLflow experiment %r (artifacts: %s)", name, location or "managed by the server")
    return client.create_experiment(name, artifact_location=location)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------


@dataclass
class TrackedRun:
    """An MLflow run being written by this process (see `tracked_run`)."""

    client: "MlflowClient"
    tracking_uri: str
    experiment_id: str
    experiment_name: str
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Numeric metrics; None (a metric that does not apply) is skipped, never logged as NaN."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_metric_series(self, series: Sequence[Mapping[str, Any]], step_key: str, prefix: str = "") -> None:
        """One MLflow metric history per numeric key of the rows, at step `row[step_key]` (the
        UI draws them as curves)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(prefix + k, float(v), now, int(row[step_key])) for row in series
                 for k, v in row.items() if k != step_key and _is_number(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value)[:MAX_TAG_CHARS])

    def log_file(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dir(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_table(self, rows: Sequence[Mapping[str, Any]], artifact_file: str) -> bool:
        """`MlflowClient.log_table` (the UI's table view); False, with a warning, if it fails."""
        import pandas as pd
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_table(self.run_id, pd.DataFrame(list(rows)), artifact_file)
        except (MlflowException, ValueError, TypeError) as exc:
            log.warning("mlflow log_table failed (the CSV/JSON copies are logged anyway): %s", exc)
            return False
        return True


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def flatten_params(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted keys ({"config": {"lr": 1e-3}} -> {"config.lr": 1e-3})."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """Keep MLflow from writing "View run ... at" links to stdout (our own output says where
    the run is); the environment variable is put back as it was."""
    key = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    saved = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


@contextmanager
def tracked_run(
    tracking_uri: str, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None
) -> Iterator[TrackedRun]:
    """Open an MLflow run; on exit mark it FINISHED, or FAILED (KILLED on Ctrl-C) with the
    error message as the `error` tag and the traceback as `error.txt`, and re-raise."""
    client = _client(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()})
    tracked = TrackedRun(client, tracking_uri, experiment_id, experiment, run.info.run_id)
    log.info("MLflow run %s in experiment %r (%s)", tracked.run_id, experiment, tracking_uri)
    try:
        yield tracked
    except BaseException as exc:
        with quiet_mlflow():
            _record_failure(tracked, exc)
        raise
    with quiet_mlflow():
        client.set_terminated(tracked.run_id, "FINISHED")


def _record_failure(run: TrackedRun, exc: BaseException) -> None:
    """Mark the run FAILED/KILLED with the error; never hide the original exception."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    message = f"{type(exc).__name__}: {exc}"
    try:
        run.set_tags({"error": message})
        run.log_text("".join(traceback.format_exception(exc)), "error.txt")
    except Exception as logging_error:  # noqa: BLE001 - the run's own error matters more
        log.warning("could not record the error in MLflow run %s: %s", run.run_id, logging_error)
    finally:
        try:
            run.client.set_terminated(run.run_id, status)
        except Exception as logging_error:  # noqa: BLE001
            log.warning("could not mark MLflow run %s %s: %s", run.run_id, status, logging_error)


# ---------------------------------------------------------------------------------------
# what a pipeline run records
# ---------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """Everything a pipeline run logs once its steps are done.

    files: (local file, artifact directory or None) pairs; dirs: (local dir, artifact
    directory) pairs; table_rows: the before/after table for `log_table`; series: the
    checkpoints of a lifelong stream (one row per checkpoint, keyed by `edits`).
    """

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[Path, str | None]] = field(default_factory=list)
    dirs: list[tuple[Path, str | None]] = field(default_factory=list)
    table_rows: list[dict[str, Any]] = field(default_factory=list)
    table_file: str = "results/before_after_table.json"
    series: list[dict[str, Any]] = field(default_factory=list)  # stream checkpoints, logged as stream_* curves
    editor_history: list[dict[str, Any]] = field(default_factory=list)  # editor training, logged as editor_* curves


def log_pipeline_run(run: TrackedRun, record: RunRecord) -> None:
    """Log a finished pipeline's params, metrics, tags, files and table to `run`."""
    run.log_params(record.params)
    run.log_metrics(record.metrics)
    run.set_tags(record.tags)
    for path, artifact_path in record.files:
        run.log_file(path, artifact_path)
    for path, artifact_path in record.dirs:
        run.log_dir(path, artifact_path)
    if record.table_rows:
        run.log_table(record.table_rows, record.table_file)
    if record.series:
        run.log_metric_series(record.series, "edits", "stream_")
    if record.editor_history:
        run.log_metric_series(record.editor_history, "step", "editor_")


# ---------------------------------------------------------------------------------------
# reading back
# ---------------------------------------------------------------------------------------


def download_edit_artifact(
    run_id: str, tracking_uri: str | None = None, dst: str | os.PathLike[str] | None = None
) -> "EditArtifact":
    """The edit artifact logged by run `run_id`, downloaded and loaded with `load_artifact`.

    With `dst` the files stay there (`dst/edit_artifact/`); otherwise a temporary directory is
    used and removed (the loaded artifact holds its tensors in memory).
    """
    from editing_core.artifacts import load_artifact

    client = _client(resolve_tracking_uri(tracking_uri))
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
        return load_artifact(client.download_artifacts(run_id, EDIT_ARTIFACT_PATH, str(dst)))
    with tempfile.TemporaryDirectory(prefix="editflow-artifact-") as tmp:
        return load_artifact(client.download_artifacts(run_id, EDIT_ARTIFACT_PATH, tmp))
