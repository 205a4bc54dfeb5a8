"""Submitting pipelines to a Ray cluster as Ray jobs (the Jobs API on the head's dashboard port).

`submit_pipeline` validates the pipeline here first (a bad YAML or facts file is refused before
anything is sent), stages the YAML and its facts files in a fresh directory that becomes the job's
`working_dir`, and submits `editflow run` with the tracking URI in the job's environment.

Token authentication (Ray 2.59+ clusters create a token at `~/.ray/auth_token`): the Jobs client
sends the token only when `RAY_AUTH_MODE=token`. `enable_token_auth()` sets that for this process
when a token is available (`RAY_AUTH_TOKEN`, or the token file) and the user has not chosen a
mode; authentication is never switched off.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ray.job_submission import JobSubmissionClient

    from pipelines.spec import PipelineSpec

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TOKEN_FILE = Path("~/.ray/auth_token")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def resolve_address(address: str | None) -> str:
    """The Jobs API address: the flag, else $RAY_ADDRESS when it is an http(s) URL, else the local default."""
    if address:
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def enable_token_auth() -> bool:
    """Turn on token auth for this process's Ray clients when a token exists and no mode is set."""
    if os.environ.get("RAY_AUTH_MODE"):
        return os.environ["RAY_AUTH_MODE"] == "token"
    if os.environ.get("RAY_AUTH_TOKEN") or TOKEN_FILE.expanduser().is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        return True
    return False


def job_client(address: str | None) -> "JobSubmissionClient":
    from ray.job_submission import JobSubmissionClient

    enable_token_auth()
    resolved = resolve_address(address)
    try:
        return JobSubmissionClient(resolved)
    except (ConnectionError, RuntimeError) as exc:
        hint = ""
        if "authentication" in str(exc).lower():
            hint = " (the cluster wants a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or copy its ~/.ray/auth_token)"
        raise ConnectionError(f"cannot reach the Ray Jobs API at {resolved}: {exc}{hint}") from exc


def stage_pipeline(spec: "PipelineSpec", directory: Path) -> Path:
    """Copy the (validated) pipeline YAML and its facts / heldout files into `directory` (paths
    rewritten to the copies), so the job's working_dir holds exactly what the run reads."""
    document = yaml.safe_load(spec.source.read_text(encoding="utf-8"))
    inputs = directory / "inputs"
    inputs.mkdir(parents=True)
    if spec.facts.is_dir():
        shutil.copytree(spec.facts, inputs / spec.facts.name)
    else:
        shutil.copy(spec.facts, inputs / spec.facts.name)
    document["facts"] = f"inputs/{spec.facts.name}"
    if spec.heldout is not None:
        (inputs / "heldout").mkdir()
        shutil.copy(spec.heldout, inputs / "heldout" / spec.heldout.name)
        document["heldout"] = f"inputs/heldout/{spec.heldout.name}"
    staged = directory / spec.source.name
    staged.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return staged


def check_tracking_uri_reachable_from(tracking_uri: str, address: str) -> None:
    """A SQLite store is a file on this machine: only a cluster on this machine can write it."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if tracking_uri.startswith("sqlite:") and host not in LOOPBACK:
        raise ValueError(
            f"the tracking URI {tracking_uri} is a file on this machine, which the cluster at {address} "
            "cannot write: start an MLflow server (mlflow server --backend-store-uri sqlite:///mlflow.db "
            "--host 0.0.0.0) and pass --tracking-uri http://HOST:5000"
        )


def submit_pipeline(path: str | os.PathLike[str], address: str | None, tracking_uri: str, extra_env: dict[str, str] | None = None) -> str:
    """Validate, stage and submit the pipeline as a Ray job; returns the job's submission id."""
    from pipelines.spec import load_pipeline

    spec = load_pipeline(path)  # refused here, before any network call, when invalid
    resolved = resolve_address(address)
    check_tracking_uri_reachable_from(tracking_uri, resolved)
    client = job_client(resolved)
    with tempfile.TemporaryDirectory(prefix="editflow-job-") as tmp:
        staged = stage_pipeline(spec, Path(tmp))
        job_id = f"editflow-{_safe(spec.name)}-{uuid.uuid4().hex[:8]}"
        entrypoint = f"editflow run {shlex.quote(staged.name)} --tracking-uri {shlex.quote(tracking_uri)}"
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env={"working_dir": tmp, "env_vars": {"MLFLOW_TRACKING_URI": tracking_uri, **(extra_env or {})}},
            metadata={"editflow_pipeline": spec.name, "model": spec.model},
        )
    log.info("submitted %s to %s: %s", job_id, resolved, entrypoint)
    return job_id


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:40] or "pipeline"


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """Jobs on the cluster, newest first, as plain data."""
    jobs = job_client(address).list_jobs()
    rows = [_job_row(job) for job in jobs]
    return sorted(rows, key=lambda row: row["start_time"] or 0, reverse=True)


def job_status(address: str | None, job_id: str) -> dict[str, Any]:
    return _job_row(job_client(address).get_job_info(job_id))


def job_logs(address: str | None, job_id: str) -> str:
    return job_client(address).get_job_logs(job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    return job_client(address).stop_job(job_id)


def _job_row(job: Any) -> dict[str, Any]:
    return {
        "job_id": job.submission_id or job.job_id,
        "status": str(getattr(job.status, "value", job.status)),
        "entrypoint": job.entrypoint,
        "start_time": job.start_time,
        "end_time": job.end_time,
        "message": job.message,
        "metadata": job.metadata or {},
    }
