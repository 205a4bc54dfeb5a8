"""What every editor shares: the Editor interface, the registry, and the weight-editing loop.

An editor takes a loaded model and edit requests and returns an edit artifact; the model is
left exactly as it was given, also when the edit fails.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..artifacts import ArtifactError, ArtifactMeta, EditArtifact, WeightDelta, WeightDeltaArtifact, weights_hash
from ..config import config_to_dict, load_config
from ..data.requests import EditRequest
from ..models.architectures import ROLES
from ..models.loading import LoadedModel
from ..tokens import completion_batch, completion_logits, completion_nll

log = logging.getLogger(__name__)

EDITORS: dict[str, type["Editor"]] = {}


def register_editor(cls: type["Editor"]) -> type["Editor"]:
    """Class decorator: make an editor available by its `name` (CLI, pipelines, registry)."""
    EDITORS[cls.name] = cls
    return cls


class Editor(ABC):
    """Base of every editing method. Subclasses set `name` and `config_class`."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any = None):
        self.config = config if config is not None else self.config_class()

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | str | None = None, **overrides: Any) -> "Editor":
        """Build from a mapping or YAML file, strictly (unknown keys are errors)."""
        return cls(load_config(cls.config_class, source, **overrides))

    @abstractmethod
    def edit(self, loaded: LoadedModel, requests: Sequence[EditRequest], parent: EditArtifact | None = None) -> EditArtifact:
        """Compute the edit for `requests`; `parent` is the artifact attached to the model, if any."""

    def sequential(self, loaded: LoadedModel, parent: EditArtifact | None = None) -> "SequentialSession":
        """A session that applies edits one at a time, each on top of the ones before (lifelong
        editing); leaving it restores the model. See SequentialSession."""
        raise NotImplementedError(f"{self.name} has no sequential mode")

    @staticmethod
    def hashed_params(loaded: LoadedModel, touched: Sequence[str], parent: EditArtifact | None) -> tuple[str, ...]:
        """The parameters an edit's base hash covers: those it touches and, when it is computed
        on top of a parent, the parent's too (its numbers hold only with the parent in place).
        The parent must be attached to the model."""
        if parent is None:
            return tuple(sorted(touched))
        if not parent.is_attached(loaded.model):
            raise ArtifactError(
                f"parent artifact {parent.meta.artifact_id} is not attached to the model: attach it "
                "before computing an edit on top of it"
            )
        return tuple(sorted(set(touched) | set(parent.meta.hashed_params)))

    def _meta(self, loaded: LoadedModel, requests: Sequence[EditRequest], hashed: Sequence[str], base_hash: str, parent: EditArtifact | None) -> ArtifactMeta:
        return ArtifactMeta(
            base_model=loaded.name,
            base_hash=base_hash,
            hashed_params=tuple(hashed),
            method=self.name,
            config=config_to_dict(self.config),
            requests=tuple(requests),
            parent=parent.meta.artifact_id if parent else None,
        )


@dataclass(frozen=True)
class EditOutcome:
    """What one edit of a sequential session did.

    action: GRACE: added / split / expanded / skipped (see editors/grace.py); weight editors:
            applied. key_index: the codebook key that serves the edit (GRACE). steps: optimizer
            steps taken, when known. target_nll: the target NLL at the end, when known.
    """

    edit_id: str
    action: str
    key_index: int | None = None
    steps: int | None = None
    target_nll: float | None = None


class SequentialSession(ABC):
    """Edits applied one at a time, each seeing the ones before it; the model carries them
    while the session is open and leaves exactly as it came.

        with editor.sequential(loaded) as session:
            for request in stream:
                session.add(request)
            artifact = session.artifact()   # everything edited so far, as one artifact
    """

    @abstractmethod
    def __enter__(self) -> "SequentialSession": ...

    @abstractmethod
    def __exit__(self, *exc: Any) -> None: ...

    @abstractmethod
    def add(self, request: EditRequest) -> EditOutcome:
        """Edit one request into the model."""

    @abstractmethod
    def artifact(self) -> EditArtifact:
        """All edits so far as one artifact on the model the session started from."""

    @property
    def size(self) -> int | None:
        """Entries the edits occupy (GRACE: codebook keys); None when that means nothing."""
        return None


class FoldingSession(SequentialSession):
    """Sequential weight edits: each request is edited alone on the weights the previous edits
    left, and its delta is added to the model at once. The artifact is the total change.
    The editor must return WeightDeltaArtifacts and name its weights with `edited_params`."""

    def __init__(self, editor: "Editor", loaded: LoadedModel, parent: EditArtifact | None):
        self.editor, self.loaded, self.parent = editor, loaded, parent
        self.names = editor.edited_params(loaded)
        self.hashed = editor.hashed_params(loaded, self.names, parent)
        self.base_hash = weights_hash(loaded.model, self.hashed)
        self.requests: list[EditRequest] = []
        self.originals: dict[str, torch.Tensor] = {}

    def __enter__(self) -> "FoldingSession":
        self.originals = {name: self.loaded.model.get_parameter(name).detach().clone() for name in self.names}
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self.loaded.model.get_parameter(name).copy_(original)

    def add(self, request: EditRequest) -> EditOutcome:
        artifact = self.editor.edit(self.loaded, [request])
        with torch.no_grad():
            for name, delta in artifact.deltas.items():
                param = self.loaded.model.get_parameter(name)
                param.add_(delta.tensor().to(param))
        self.requests.append(request)
        return EditOutcome(request.digest(), "applied")

    def artifact(self) -> WeightDeltaArtifact:
        deltas = {
            name: WeightDelta(dense=(self.loaded.model.get_parameter(name).detach() - original).clone())
            for name, original in self.originals.items()
        }
        meta = self.editor._meta(self.loaded, self.requests, self.hashed, self.base_hash, self.parent)
        return WeightDeltaArtifact(meta, deltas)


def check_targets(layers: Sequence[int], roles: Sequence[str]) -> None:
    """The layers and roles of an editor config: both non-empty, every role a known one."""
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; roles: {list(ROLES)}")
    if not layers or not roles:
        raise ValueError("layers and roles must not be empty")


@dataclass(frozen=True)
class WeightEditConfig:
    """Shared fields of the editors that fine-tune weights (FT, FT+KL).

    layers:          layer indices to edit; negative ones count from the end (-1 = last).
    roles:           which weight of each layer to edit: mlp_in, mlp_out or attn_out.
    steps:           optimizer steps, each over all requests of the edit.
    lr:              Adam learning rate.
    norm_constraint: if set, every weight stays within +-norm_constraint of its original value
                     (the constrained fine-tuning of Zhu et al. 2020, "FT-L" in the editing
                     literature, https://arxiv.org/abs/2012.00363); None leaves it free.
    stop_loss:       stop early once the target NLL (nats per token, averaged per request then
                     over requests, measured before a step) is below this; None runs all `steps`. Stopping once the new facts
                     are likely keeps the change small, which protects unrelated prompts.
    batch_size:      requests per forward pass (gradients accumulate over a step's batches).
    progress:        show a progress bar.
    """

    layers: tuple[int, ...] = (4, 5, 6)
    roles: tuple[str, ...] = ("mlp_out",)
    steps: int = 20
    lr: float = 1e-3
    norm_constraint: float | None = None
    stop_loss: float | None = None
    batch_size: int = 16
    progress: bool = False

    def __post_init__(self) -> None:
        check_targets(self.layers, self.roles)
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if self.norm_constraint is not None and self.norm_constraint <= 0:
            raise ValueError("norm_constraint must be > 0 (or null for none)")
        if self.stop_loss is not None and self.stop_loss <= 0:
            raise ValueError("stop_loss must be > 0 (or null for none)")


class WeightEditor(Editor):
    """Fine-tunes the configured weights on prompt -> target_new (prompt tokens masked) and
    returns the weight change as a dense-delta artifact. Subclasses add loss terms."""

    config: WeightEditConfig

    def sequential(self, loaded: LoadedModel, parent: EditArtifact | None = None) -> FoldingSession:
        return FoldingSession(self, loaded, parent)

    def edited_params(self, loaded: LoadedModel) -> list[str]:
        return loaded.adapter.param_names(self.config.roles, self.config.layers)

    def prepare(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> Any:
        """Anything the extra loss needs from the unedited model (computed once)."""
        return None

    def extra_loss(self, loaded: LoadedModel, context: Any) -> torch.Tensor | float:
        """A term added to the edit loss at every step (0 for plain fine-tuning)."""
        return 0.0

    def edit(self, loaded: LoadedModel, requests: Sequence[EditRequest], parent: EditArtifact | None = None) -> WeightDeltaArtifact:
        if not requests:
            raise ValueError("an edit needs at least one request")
        cfg, model = self.config, loaded.model
        names = self.edited_params(loaded)
        params = {name: model.get_parameter(name) for name in names}
        hashed = self.hashed_params(loaded, names, parent)
        base_hash = weights_hash(model, hashed)
        originals = {name: p.detach().clone() for name, p in params.items()}
        device = next(model.parameters()).device
        batches = [
            completion_batch(loaded.tokenizer, [(r.prompt, r.target_new) for r in requests[i : i + cfg.batch_size]]).to(device)
            for i in range(0, len(requests), cfg.batch_size)
        ]
        context = self.prepare(loaded, requests)
        try:
            for p in params.values():
                p.requires_grad_(True)
            optimizer = torch.optim.Adam(params.values(), lr=cfg.lr)
            for step in tqdm(range(cfg.steps), desc=f"{self.name} edit", disable=not cfg.progress):
                optimizer.zero_grad(set_to_none=True)
                target_nll = 0.0  # mean over requests of each request's per-token NLL
                for batch in batches:  # accumulate: the loss is the mean NLL over all requests
                    nll = completion_nll(completion_logits(model, batch), batch).sum() / len(requests)
                    nll.backward()
                    target_nll += nll.item()
                if cfg.stop_loss is not None and target_nll < cfg.stop_loss:
                    log.info("%s: stopped before step %d, target NLL %.4f", self.name, step + 1, target_nll)
                    break
                extra = self.extra_loss(loaded, context)
                if torch.is_tensor(extra):
                    extra.backward()
                optimizer.step()
                if cfg.norm_constraint is not None:
                    self._clamp(params, originals, cfg.norm_constraint)
            deltas = {name: WeightDelta(dense=(p.detach() - originals[name]).clone()) for name, p in params.items()}
        finally:  # the model leaves exactly as it came, whatever happened
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(originals[name])
                    p.requires_grad_(False)
                    p.grad = None
        return WeightDeltaArtifact(self._meta(loaded, requests, hashed, base_hash, parent), deltas)

    @staticmethod
    @torch.no_grad()
    def _clamp(params: dict[str, torch.nn.Parameter], originals: dict[str, torch.Tensor], eps: float) -> None:
        for name, p in params.items():
            p.copy_(torch.clamp(p, originals[name] - eps, originals[name] + eps))
