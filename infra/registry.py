"""The edit registry: every edit batch a pipeline makes becomes a version of an MLflow registered
model; aliases say which version is live.

A version is self-contained: an MLflow pyfunc (`infra/edited_model.py`, models from code) whose
artifacts are the whole lineage of edit artifacts, oldest first (`edit_000`, `edit_001`, ...).
Loading it loads the base model once and attaches the chain, so `models:/NAME@champion` answers
prompts with every accepted edit in place and a rollback is only an alias move.

    candidate   the newest registered version (whatever its gates said)
    champion    the version that serves; moved only when the gates pass, or by promote / rollback

Version tags (prefix `editflow.`): base model id and weights hash, method, number of edits in
the lineage and in this batch, facts digest, parent version, pipeline file digest, gate outcome,
the previous champion (set when a version is promoted), and the metrics.

Moving `champion` (promote, rollback, a run's own promotion) happens under `champion_lock`: a
registered model `<name>.champion-lock` that exists only while the alias moves (its creation is
atomic in the registry's database), so two refreshes finishing at once cannot both promote.

Aliases are read with `get_registered_model(...).aliases` / `get_model_version_by_alias`, never
from `search_model_versions()` (it returns empty aliases). mlflow is imported lazily.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from editing_core.artifacts import EditArtifact

log = logging.getLogger(__name__)

CANDIDATE, CHAMPION = "candidate", "champion"
TAG = "editflow."
MODEL_NAME_IN_RUN = "edited_model"  # the logged model's name inside its run
LINEAGE_FILE = "lineage.json"  # in the logged model's artifacts: facts per edit artifact
PYFUNC_CODE = Path(__file__).with_name("edited_model.py")
GATED_MINIMUMS = ("edit_success", "paraphrase", "locality", "edit_success_generated", "paraphrase_generated", "locality_generated")


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown model or version, no champion, ...)."""


# ---------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gates:
    """Thresholds a new version must meet to become champion (None: not gated).

    edit_success, paraphrase, locality and their *_generated twins: minimum values (0..1).
    drawdown: maximum value (accuracy lost on held-out facts the model knew).
    A gated metric that the run did not measure fails its gate.
    """

    edit_success: float | None = 0.9
    paraphrase: float | None = None
    locality: float | None = 0.9
    edit_success_generated: float | None = None
    paraphrase_generated: float | None = None
    locality_generated: float | None = None
    drawdown: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name in GATED_MINIMUMS and not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name}: a minimum between 0 and 1 is expected, got {value}")

    def failures(self, metrics: Mapping[str, Any]) -> list[str]:
        """Why the gates fail for `metrics` (empty: they pass), one line per failed gate."""
        problems = []
        for f in fields(self):
            threshold = getattr(self, f.name)
            if threshold is None:
                continue
            value = metrics.get(f.name)
            if value is None:
                problems.append(f"{f.name} was not measured (gate {threshold:g})")
            elif f.name == "drawdown" and value > threshold:
                problems.append(f"drawdown {value:.3f} > {threshold:g}")
            elif f.name != "drawdown" and value < threshold:
                problems.append(f"{f.name} {value:.3f} < {threshold:g}")
        return problems


@dataclass(frozen=True)
class RegistrySpec:
    """How a pipeline run that edits is recorded in the Model Registry.

    name:              registered model name (default: derived from the base model id,
                       e.g. `smollm2-135m-edits`).
    register:          register a version at all (false: only the MLflow run is logged).
    build_on_champion: compute the edit on top of the current champion's lineage, so the new
                       version carries every accepted edit (false: on the bare base model).
    skip_known:        with build_on_champion, leave out facts the champion already carries
                       (same content digest); a run with nothing new edits nothing.
    promote:           move `champion` to the new version when its gates pass.
    gates:             the thresholds (see `Gates`).
    """

    name: str | None = None
    register: bool = True
    build_on_champion: bool = True
    skip_known: bool = True
    promote: bool = True
    gates: Gates = Gates()

    def model_name(self, base_model: str) -> str:
        return self.name or default_model_name(base_model)


def default_model_name(base_model: str) -> str:
    """`<base model id, path or file stem, sanitised>-edits`."""
    stem = Path(base_model.rstrip("/")).name
    if stem.endswith(".gguf"):
        stem = stem[: -len(".gguf")]
    return (re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "model") + "-edits"


# ---------------------------------------------------------------------------------------
# the client side
# ---------------------------------------------------------------------------------------


def client_for(tracking_uri: str) -> "MlflowClient":
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _registered_model(client: "MlflowClient", name: str) -> Any:
    """The registered model `name`, or None when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def _exists(client: "MlflowClient", name: str) -> bool:
    return _registered_model(client, name) is not None


def aliases(client: "MlflowClient", name: str) -> dict[str, str]:
    """alias -> version of registered model `name` ({} when it does not exist)."""
    model = _registered_model(client, name)
    return {alias: str(version) for alias, version in (getattr(model, "aliases", None) or {}).items()}


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def get_version(client: "MlflowClient", name: str, version: str | int) -> "ModelVersion":
    """Version `version` of `name` (a number or an alias), or a RegistryError saying what exists."""
    from mlflow.exceptions import MlflowException

    try:
        if str(version).isdigit():
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, str(version))
    except MlflowException as exc:
        if _not_found(exc) or "not found" in str(exc).lower():
            known = ", ".join(f"{a}={v}" for a, v in aliases(client, name).items()) or "no aliases"
            raise RegistryError(f"registered model {name!r} has no version {version!r} ({known})") from None
        raise


def list_versions(client: "MlflowClient", name: str) -> list["ModelVersion"]:
    """All versions of `name`, oldest first (RegistryError if the model does not exist)."""
    if not _exists(client, name):
        raise RegistryError(f"no registered model {name!r}")
    versions = client.search_model_versions(f"name = '{_quote(name)}'")
    return sorted(versions, key=lambda v: int(v.version))


def _quote(name: str) -> str:
    return name.replace("'", "\\'")


# ---------------------------------------------------------------------------------------
# lineage: what a version carries
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    """The edit artifacts of a version, oldest first, with the facts each one added."""

    artifacts: tuple["EditArtifact", ...]

    def facts(self) -> list[dict[str, Any]]:
        """Every fact in the lineage: its digest, the artifact that added it, the request."""
        return [
            {"digest": r.digest(), "artifact_id": a.meta.artifact_id, "method": a.meta.method, **r.to_dict()}
            for a in self.artifacts for r in a.requests
        ]


def download_lineage(tracking_uri: str, version: "ModelVersion", dst: str | os.PathLike[str] | None = None) -> Lineage:
    """The version's edit artifacts, downloaded (to `dst`, else a temporary directory) and loaded."""
    from editing_core.artifacts import check_chain, load_artifact

    with _directory(dst) as directory:
        root = Path(_download(tracking_uri, version, "artifacts", directory))
        keys = sorted(p.name for p in root.iterdir() if p.name.startswith("edit_"))
        artifacts = tuple(load_artifact(root / key) for key in keys)
    check_chain(artifacts)
    return Lineage(artifacts)


def read_lineage_facts(tracking_uri: str, version: "ModelVersion") -> list[dict[str, Any]]:
    """The facts of a version's lineage, without downloading its tensors."""
    with tempfile.TemporaryDirectory(prefix="editflow-lineage-") as tmp:
        path = _download(tracking_uri, version, f"artifacts/{LINEAGE_FILE}", tmp)
        return json.loads(Path(path).read_text(encoding="utf-8"))["facts"]


def _download(tracking_uri: str, version: "ModelVersion", subpath: str, directory: str) -> str:
    """Download `subpath` of the version's logged model; the local path."""
    from mlflow.artifacts import download_artifacts

    model_id = version.model_id or version.source.removeprefix("models:/")  # the store may not echo model_id
    location = client_for(tracking_uri).get_logged_model(model_id).artifact_location
    with _tracking_uri(tracking_uri):
        return download_artifacts(artifact_uri=f"{location.rstrip('/')}/{subpath}", dst_path=directory, tracking_uri=tracking_uri)


@contextmanager
def _directory(dst: str | os.PathLike[str] | None) -> Iterator[str]:
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
        yield str(dst)
        return
    with tempfile.TemporaryDirectory(prefix="editflow-version-") as tmp:
        yield tmp


# ---------------------------------------------------------------------------------------
# registering a version
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What `register_version` did: the version, whether it became champion, and why not."""

    name: str
    version: str
    promoted: bool
    gate_failures: tuple[str, ...]
    previous_champion: str | None


def register_version(
    run_id: str,
    tracking_uri: str,
    spec: RegistrySpec,
    base_model: str,
    lineage: Sequence["EditArtifact"],
    metrics: Mapping[str, Any],
    facts_sha256: str,
    pipeline_sha256: str,
    parent_version: str | None,
    workdir: str | os.PathLike[str],
) -> Registration:
    """Log the pyfunc model with the whole `lineage` into run `run_id`, register it as a new
    version of `spec.model_name(base_model)`, tag it, give it `candidate`, and make it champion
    when the gates pass and the champion is still `parent_version` (the version the edit was
    computed on: a champion that moved meanwhile is not overwritten by an edit that lacks its
    facts). On an error before the version exists nothing is left; after, the version is
    deleted again (best effort) and no alias has moved."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    name = spec.model_name(base_model)
    newest = lineage[-1]
    failures = tuple(spec.gates.failures(metrics))
    tags = {
        "base_model": base_model,
        "base_weights_hash": lineage[0].meta.base_hash,
        "method": newest.meta.method,
        "artifact_id": newest.meta.artifact_id,
        "n_edits": sum(len(a.requests) for a in lineage),
        "n_new_edits": len(newest.requests),
        "facts_sha256": facts_sha256,
        "pipeline_sha256": pipeline_sha256,
        "parent_version": parent_version or "",
        "gates": "passed" if not failures else "failed: " + "; ".join(failures),
        **{f"metric.{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    }
    try:
        model_uri, model_id = log_edited_model(run_id, tracking_uri, base_model, lineage, Path(workdir))
        if not _exists(client, name):
            client.create_registered_model(name, description=f"Edits of {base_model} made by editflow")
        with _tracking_uri(tracking_uri):  # the registry resolves the models:/ source through the global URI
            created = client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id,
                                                  tags={TAG + k: str(v) for k, v in tags.items()})
    except Exception as exc:
        raise RuntimeError(f"registering a new version of {name!r} at {tracking_uri} failed; no alias moved: "
                           f"{type(exc).__name__}: {exc}") from exc
    version = str(created.version)
    try:
        client.set_registered_model_alias(name, CANDIDATE, version)
        with champion_lock(client, name):  # compare-and-set: read the champion, move it only if unchanged
            promoted, previous = False, aliases(client, name).get(CHAMPION)
            if spec.promote and not failures:
                if previous != parent_version:
                    log.warning("champion of %s moved from %s to %s during this run: version %s stays candidate "
                                "(run the refresh again to build on the new champion)", name, parent_version, previous, version)
                else:
                    _promote(client, name, version)
                    promoted = True
    except (MlflowException, OSError, RegistryError) as exc:
        _quietly(f"remove version {version} of {name} after a failed registration",
                 lambda: client.delete_model_version(name, version))
        raise RuntimeError(f"registering version {version} of {name!r} failed; the version was removed and "
                           f"no alias moved: {exc}") from exc
    log.info("registered %s version %s (%s)", name, version, "champion" if promoted else "candidate; gates: " + tags["gates"])
    return Registration(name, version, promoted, failures, previous)


def log_edited_model(run_id: str, tracking_uri: str, base_model: str, lineage: Sequence["EditArtifact"], workdir: Path) -> tuple[str, str]:
    """Log the pyfunc (base model id + lineage of artifacts) into run `run_id`; (model URI, model id)."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from infra.tracking import quiet_mlflow

    staging = workdir / "registry_lineage"
    artifacts: dict[str, str] = {}
    for index, artifact in enumerate(lineage):
        artifacts[f"edit_{index:03d}"] = str(artifact.save(staging / f"edit_{index:03d}"))
    lineage_file = staging / LINEAGE_FILE
    lineage_file.write_text(json.dumps({"base_model": base_model, "facts": Lineage(tuple(lineage)).facts()}, indent=2), encoding="utf-8")
    artifacts[LINEAGE_FILE.removesuffix(".json")] = str(lineage_file)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]),
    )
    with _tracking_uri(tracking_uri), quiet_mlflow(), \
            mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None), warnings.catch_warnings():
        # the signature is explicit; an input example would load the base model just to log it
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN, python_model=str(PYFUNC_CODE), artifacts=artifacts,
            model_config={"base_model": base_model}, signature=signature,
            pip_requirements=_pip_requirements(),
        )
    return info.model_uri, info.model_id


def _pip_requirements() -> list[str]:
    """The serving environment: editflow's own runtime dependencies at the versions installed here."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("torch", "transformers", "safetensors", "mlflow", "gguf", "accelerate"):
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


_GLOBAL_URI_LOCK = threading.RLock()


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's fluent API pointed at `uri` for the block. The tracking URI is process-global,
    so blocks in different threads (two refreshes, Serve's lineage downloads) run one at a time;
    `set_tracking_uri` also writes $MLFLOW_TRACKING_URI: both are put back as they were."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        saved_global = getattr(tracking_utils, "_tracking_uri", None)
        saved_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_global)
            if saved_env is not None:
                os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _quietly(what: str, action: Callable[[], Any]) -> None:
    """Clean-up that must not hide the error being handled: a failure is only logged."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the original error (or a stale lock, broken later) matters more
        log.warning("could not %s: %s", what, exc)


# ---------------------------------------------------------------------------------------
# moving the champion
# ---------------------------------------------------------------------------------------


LOCK_SUFFIX = ".champion-lock"


@contextmanager
def champion_lock(client: "MlflowClient", name: str, timeout_s: float = 60.0, stale_s: float = 300.0) -> Iterator[None]:
    """Mutual exclusion around moving `champion` of `name`, across processes and machines.

    Creating a registered model is atomic in the registry's database (a second create of the
    same name fails with RESOURCE_ALREADY_EXISTS), so the lock is the registered model
    `<name>.champion-lock`, deleted on release. A lock older than `stale_s` (its holder died) is
    broken; waiting longer than `timeout_s` raises RegistryError.
    """
    from mlflow.exceptions import MlflowException

    lock = name + LOCK_SUFFIX
    deadline = time.monotonic() + timeout_s
    holder = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        try:
            client.create_registered_model(lock, tags={TAG + "lock_holder": holder, TAG + "lock_since": str(time.time())},
                                           description="editflow: exists only while the champion alias of its model moves")
            break
        except MlflowException as exc:
            if getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        age = _lock_age(client, lock)
        if age is not None and age > stale_s:
            log.warning("breaking the stale champion lock of %s (held %.0f s)", name, age)
            _quietly(f"break the lock {lock}", lambda: client.delete_registered_model(lock))
        elif time.monotonic() > deadline:
            raise RegistryError(f"the champion of {name!r} is being moved by another process (lock {lock!r} "
                                f"held for {age or 0:.0f} s); try again")
        else:
            time.sleep(0.2)
    try:
        yield
    finally:
        _quietly(f"release the lock {lock}", lambda: client.delete_registered_model(lock))


def _lock_age(client: "MlflowClient", lock: str) -> float | None:
    model = _registered_model(client, lock)  # None: released meanwhile
    since = model.tags.get(TAG + "lock_since") if model is not None else None
    return time.time() - float(since) if since else None


def promote(client: "MlflowClient", name: str, version: str | int) -> str | None:
    """Make `version` the champion; returns the previous champion (recorded on the version as
    `editflow.previous_champion`, which `rollback` follows)."""
    with champion_lock(client, name):
        return _promote(client, name, version)


def _promote(client: "MlflowClient", name: str, version: str | int) -> str | None:
    target = get_version(client, name, version)
    previous = aliases(client, name).get(CHAMPION)
    if previous == str(target.version):
        return previous
    if previous is not None:
        client.set_model_version_tag(name, target.version, TAG + "previous_champion", previous)
    client.set_registered_model_alias(name, CHAMPION, target.version)
    log.info("%s: champion %s -> %s", name, previous, target.version)
    return previous


def rollback(client: "MlflowClient", name: str) -> tuple[str, str]:
    """Move champion back to the champion before it; returns (from, to)."""
    with champion_lock(client, name):
        return _rollback(client, name)


def _rollback(client: "MlflowClient", name: str) -> tuple[str, str]:
    current = aliases(client, name).get(CHAMPION)
    if current is None:
        raise RegistryError(f"registered model {name!r} has no champion to roll back")
    previous = get_version(client, name, current).tags.get(TAG + "previous_champion")
    if not previous:
        raise RegistryError(f"{name!r} version {current} is the first champion: there is nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current, TAG + "rolled_back", "true")
    log.info("%s: rolled champion back %s -> %s", name, current, previous)
    return current, previous


# ---------------------------------------------------------------------------------------
# describing versions
# ---------------------------------------------------------------------------------------


def version_summary(version: "ModelVersion", alias_map: Mapping[str, str]) -> dict[str, Any]:
    """One version as plain data: number, aliases, method, edits, gates, metrics, lineage."""
    tags = version.tags or {}
    return {
        "version": str(version.version),
        "aliases": sorted(a for a, v in alias_map.items() if v == str(version.version)),
        "created": version.creation_timestamp,
        "run_id": version.run_id,
        "method": tags.get(TAG + "method"),
        "base_model": tags.get(TAG + "base_model"),
        "n_edits": _int(tags.get(TAG + "n_edits")),
        "n_new_edits": _int(tags.get(TAG + "n_new_edits")),
        "parent_version": tags.get(TAG + "parent_version") or None,
        "previous_champion": tags.get(TAG + "previous_champion"),
        "gates": tags.get(TAG + "gates"),
        "metrics": {k[len(TAG + "metric."):]: float(v) for k, v in tags.items() if k.startswith(TAG + "metric.")},
    }


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def diff_versions(tracking_uri: str, name: str, old: str, new: str) -> dict[str, Any]:
    """Facts added and removed from version `old` to `new`, and how each metric changed."""
    client = client_for(tracking_uri)
    versions = {label: get_version(client, name, v) for label, v in (("old", old), ("new", new))}
    facts = {label: {f["digest"]: f for f in read_lineage_facts(tracking_uri, v)} for label, v in versions.items()}
    alias_map = aliases(client, name)
    metrics = {label: version_summary(v, alias_map)["metrics"] for label, v in versions.items()}
    return {
        "old": str(versions["old"].version),
        "new": str(versions["new"].version),
        "added": [facts["new"][d] for d in facts["new"] if d not in facts["old"]],
        "removed": [facts["old"][d] for d in facts["old"] if d not in facts["new"]],
        "metrics": {
            key: {"old": metrics["old"].get(key), "new": metrics["new"].get(key)}
            for key in sorted(set(metrics["old"]) | set(metrics["new"]))
        },
    }
