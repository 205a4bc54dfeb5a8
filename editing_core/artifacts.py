"""The edit artifact: what an editor returns instead of leaving a model changed.

An artifact is stored as two files in a directory:
    artifact.json          kind, metadata (base model, base weights hash, method, config,
                           requests, parent, library versions) and the tensor index
    artifact.safetensors   the tensors (never pickle)

Kinds share one base class; a kind is registered by name so `load_artifact` can rebuild it.
This module has the `weight_delta` kind (dense or low-rank deltas added to named parameters);
adaptor kinds (the GRACE codebook, editors/grace.py) install hooks instead and subclass
`EditArtifact` the same way.

`attach(model)` checks that the model's weights are the ones the edit was computed on (a hash of
the touched parameters), then applies the edit; `detach(model)` restores every touched parameter
bit for bit from the copy taken at attach time (subtracting the delta again would not be exact
in floating point).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from abc import ABC, abstractmethod
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data.requests import EditRequest

FORMAT_VERSION = 1
JSON_NAME = "artifact.json"
TENSORS_NAME = "artifact.safetensors"


class ArtifactError(ValueError):
    """An artifact that cannot be attached, saved or loaded; the message says why."""


def weights_hash(model: nn.Module, names: Sequence[str]) -> str:
    """sha256 over the named parameters (name, dtype, shape and bytes), in sorted order."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names):
        if name not in params:
            raise ArtifactError(f"the model has no parameter {name!r}")
        tensor = params[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {"editflow": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


@dataclass(frozen=True)
class ArtifactMeta:
    """Where an edit came from and what it was computed on.

    base_model:    the model id / path / alias the edit was made on.
    base_hash:     `weights_hash` of `hashed_params` before the edit (with the parent attached).
    hashed_params: the parameters the hash covers (those the edit touches or hooks).
    method:        the editor's registry name; config: its config as plain data.
    requests:      the facts the edit carries.
    parent:        artifact_id of the artifact this one was computed on top of, if any.
    """

    base_model: str
    base_hash: str
    hashed_params: tuple[str, ...]
    method: str
    config: dict[str, Any]
    requests: tuple[EditRequest, ...]
    parent: str | None = None
    artifact_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: float = field(default_factory=time.time)
    versions: dict[str, str] = field(default_factory=library_versions)

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "base_hash": self.base_hash,
            "hashed_params": list(self.hashed_params),
            "method": self.method,
            "config": self.config,
            "requests": [r.to_dict() for r in self.requests],
            "parent": self.parent,
            "artifact_id": self.artifact_id,
            "created_at": self.created_at,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ArtifactMeta":
        return cls(
            base_model=data["base_model"],
            base_hash=data["base_hash"],
            hashed_params=tuple(data["hashed_params"]),
            method=data["method"],
            config=dict(data["config"]),
            requests=tuple(EditRequest.from_dict(r) for r in data["requests"]),
            parent=data.get("parent"),
            artifact_id=data["artifact_id"],
            created_at=data["created_at"],
            versions=dict(data.get("versions", {})),
        )


ARTIFACT_KINDS: dict[str, type["EditArtifact"]] = {}


class EditArtifact(ABC):
    """Base of every artifact kind: metadata, attach/detach bookkeeping, save/load."""

    kind: ClassVar[str]

    def __init__(self, meta: ArtifactMeta):
        self.meta = meta
        # model -> (undo data, hash of hashed_params right after attach); weak so a dropped model is freed
        self._undo: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str]] = weakref.WeakKeyDictionary()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        ARTIFACT_KINDS[cls.kind] = cls

    def __getstate__(self) -> dict[str, Any]:
        # attachments belong to live models in this process; a copy (Ray, pickle) starts detached
        state = self.__dict__.copy()
        state["_undo"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._undo = weakref.WeakKeyDictionary()

    # -- what a kind implements -------------------------------------------------------
    @abstractmethod
    def _apply(self, model: nn.Module) -> Any:
        """Change the model; return what `_undo_apply` needs to restore it exactly."""

    @abstractmethod
    def _undo_apply(self, model: nn.Module, undo: Any) -> None:
        """Restore the model exactly as it was before `_apply`."""

    def _check_detach(self, model: nn.Module, undo: Any) -> None:
        """Raise ArtifactError when `_undo_apply` cannot restore the model now (a kind that
        installs hooks checks nothing was stacked on top of it); nothing is changed."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The kind's tensors, by safetensors key."""

    @abstractmethod
    def kind_json(self) -> dict[str, Any]:
        """The kind's own JSON data (beyond the shared metadata)."""

    @classmethod
    @abstractmethod
    def from_parts(cls, meta: ArtifactMeta, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "EditArtifact":
        """Rebuild from `kind_json()` and `tensors()`."""

    # -- shared behaviour -------------------------------------------------------------
    @property
    def requests(self) -> tuple[EditRequest, ...]:
        return self.meta.requests

    def is_attached(self, model: nn.Module) -> bool:
        return model in self._undo

    def attach(self, model: nn.Module) -> None:
        """Apply the edit to `model`, after checking it is the model the edit was made on."""
        if self.is_attached(model):
            raise ArtifactError(f"artifact {self.meta.artifact_id} is already attached to this model")
        actual = weights_hash(model, self.meta.hashed_params)
        if actual != self.meta.base_hash:
            raise ArtifactError(
                f"artifact {self.meta.artifact_id} ({self.meta.method} on {self.meta.base_model!r}) "
                f"was computed on other weights: the touched parameters hash to {actual[:12]}, the "
                f"artifact expects {self.meta.base_hash[:12]}. Attach it to the same base model"
                + (f" with its parent artifact {self.meta.parent} attached first." if self.meta.parent else ".")
            )
        undo = self._apply(model)
        self._undo[model] = (undo, weights_hash(model, self.meta.hashed_params))

    def detach(self, model: nn.Module) -> None:
        """Undo `attach`: the model's parameters and outputs are again bit for bit the base's.

        Refused (nothing changed) when the touched parameters moved since attach, e.g. a child
        artifact attached on top: detach the artifacts in the reverse order of attaching."""
        if not self.is_attached(model):
            raise ArtifactError(f"artifact {self.meta.artifact_id} is not attached to this model")
        undo, attached_hash = self._undo[model]
        if weights_hash(model, self.meta.hashed_params) != attached_hash:
            raise ArtifactError(
                f"artifact {self.meta.artifact_id}: the parameters it edited changed after it was "
                "attached (another artifact on top?); detach in the reverse order of attaching"
            )
        self._check_detach(model, undo)
        del self._undo[model]
        self._undo_apply(model, undo)

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[nn.Module]:
        """`with artifact.attached(model): ...`: the edit is removed on exit, even on error."""
        self.attach(model)
        try:
            yield model
        finally:
            self.detach(model)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write artifact.json + artifact.safetensors into `directory`, atomically."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".artifact-", dir=directory.parent))
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}
            save_file(tensors, str(staging / TENSORS_NAME))
            document = {"format_version": FORMAT_VERSION, "kind": self.kind, "meta": self.meta.to_json(), "data": self.kind_json()}
            (staging / JSON_NAME).write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
            if directory.exists():
                for name in (JSON_NAME, TENSORS_NAME):
                    (directory / name).unlink(missing_ok=True)
                for item in staging.iterdir():
                    os.replace(item, directory / item.name)
            else:
                os.replace(staging, directory)
            _apply_umask(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory


def check_chain(artifacts: Sequence[EditArtifact]) -> None:
    """Refuse a stack of artifacts in which some artifact was not computed on top of the one
    before it (the first may have no parent or one that is already part of the base)."""
    for below, above in zip(artifacts, artifacts[1:]):
        if above.meta.parent != below.meta.artifact_id:
            raise ArtifactError(
                f"artifact {above.meta.artifact_id} was computed on top of {above.meta.parent or 'the base model'}, "
                f"not on {below.meta.artifact_id}: attach artifacts in the order they were made"
            )


@contextmanager
def attached_chain(model: nn.Module, artifacts: Sequence[EditArtifact]) -> Iterator[nn.Module]:
    """Attach `artifacts` in order, each on top of the one before; detach all in reverse on exit."""
    check_chain(artifacts)
    with ExitStack() as stack:
        for artifact in artifacts:
            stack.enter_context(artifact.attached(model))
        yield model


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a 0700 directory; give the saved artifact the modes of ordinary files and
    directories under the current umask, so other users (MLflow, Serve replicas) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for name in (JSON_NAME, TENSORS_NAME):
        (directory / name).chmod(0o666 & ~umask)


def load_artifact(directory: str | os.PathLike) -> EditArtifact:
    """Read an artifact saved by `EditArtifact.save`."""
    directory = Path(directory)
    json_path = directory / JSON_NAME
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not an edit artifact: {JSON_NAME} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{json_path}: not valid JSON: {exc}") from None
    if document.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{json_path}: unsupported format_version {document.get('format_version')!r}")
    kind = document.get("kind")
    if kind not in ARTIFACT_KINDS:
        from . import editors  # noqa: F401  (adaptor kinds live beside their editors)
    if kind not in ARTIFACT_KINDS:
        raise ArtifactError(f"{json_path}: unknown artifact kind {kind!r}; known: {sorted(ARTIFACT_KINDS)}")
    tensors_path = directory / TENSORS_NAME
    try:
        tensors = load_file(str(tensors_path))
    except FileNotFoundError:
        raise ArtifactError(f"{directory} is not a complete edit artifact: {TENSORS_NAME} is missing") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ArtifactError(f"{tensors_path}: cannot read tensors: {exc}") from None
    return ARTIFACT_KINDS[kind].from_parts(ArtifactMeta.from_json(document["meta"]), document["data"], tensors)


# ---------------------------------------------------------------------------------------
# weight deltas
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightDelta:
    """A change to one parameter, in the parameter's own storage orientation.

    Either `dense` (same shape as the parameter) or low-rank factors `left` (rows x r) and
    `right` (r x cols) with delta = left @ right.
    """

    dense: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.left is None or self.right is None):
            raise ValueError("a WeightDelta is either dense or low-rank (left and right)")

    @property
    def rank(self) -> int | None:
        return None if self.left is None else self.left.shape[1]

    def tensor(self) -> torch.Tensor:
        return self.dense if self.dense is not None else self.left @ self.right

    def num_bytes(self) -> int:
        parts = [self.dense] if self.dense is not None else [self.left, self.right]
        return sum(p.numel() * p.element_size() for p in parts)


class WeightDeltaArtifact(EditArtifact):
    """Adds deltas to named parameters on attach; restores the saved originals on detach."""

    kind = "weight_delta"

    def __init__(self, meta: ArtifactMeta, deltas: Mapping[str, WeightDelta]):
        super().__init__(meta)
        missing = set(deltas) - set(meta.hashed_params)
        if missing:
            raise ArtifactError(f"deltas for parameters outside the hashed set: {sorted(missing)}")
        self.deltas = dict(deltas)

    def _apply(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        originals = {}
        with torch.no_grad():
            for name, delta in self.deltas.items():
                param = params[name]
                originals[name] = param.detach().clone()
                param.add_(delta.tensor().to(device=param.device, dtype=param.dtype))
        return originals

    def _undo_apply(self, model: nn.Module, undo: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, original in undo.items():
                params[name].copy_(original)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, delta in self.deltas.items():
            if delta.dense is not None:
                out[f"{name}::dense"] = delta.dense
            else:
                out[f"{name}::left"], out[f"{name}::right"] = delta.left, delta.right
        return out

    def kind_json(self) -> dict[str, Any]:
        return {"params": {name: ("dense" if d.dense is not None else f"rank-{d.rank}") for name, d in self.deltas.items()}}

    @classmethod
    def from_parts(cls, meta: ArtifactMeta, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "WeightDeltaArtifact":
        deltas = {}
        for name, form in data["params"].items():
            if form == "dense":
                deltas[name] = WeightDelta(dense=tensors[f"{name}::dense"])
            else:
                deltas[name] = WeightDelta(left=tensors[f"{name}::left"], right=tensors[f"{name}::right"])
        return cls(meta, deltas)
