"""GRACE: lifelong editing with a discrete key-value codebook wrapped around one layer.

Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023, https://arxiv.org/abs/2211.11031.

The weights never change. A codebook at one layer holds keys (the layer's input activation at
the edited prompt), values (a vector that replaces the layer's output there, learned so that
the model then produces target_new), a radius per key and the key's label (target token ids).
At inference every token position's query is compared with all keys in one distance
computation; a position inside the radius of its nearest key gets that key's value, every
other position passes through untouched.

Queries are per position, and the models are causal, so the activation at the last prompt
token is the same whether the prompt is run alone, with the target appended (teacher forcing)
or token by token with a KV cache: one rule serves scoring and generation alike.

Codebook update for a new edit (query q, label y), against the nearest key k (distance d):
    no key, or d > radius_k + eps_init   add (q, value, eps_init)
    inside and label_k != y              add q and shrink both radii so the balls just touch
    inside and label_k == y              expand radius_k to d and train k's value on the edit too
"""

from __future__ import annotations

import logging
import time
import uuid
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Literal, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts import ArtifactError, ArtifactMeta, EditArtifact, weights_hash
from ..data.requests import EditRequest
from ..models.architectures import ROLES
from ..models.loading import LoadedModel
from ..tokens import completion_batch, completion_ids, completion_nll
from .base import EditOutcome, Editor, SequentialSession, register_editor

log = logging.getLogger(__name__)

KeyToken = Literal["last_prompt", "last_subject", "prompt_mean"]
Replace = Literal["last", "prompt", "all"]


@dataclass(frozen=True)
class GraceConfig:
    """GRACE codebook adaptor (https://arxiv.org/abs/2211.11031).

    layer:      index of the wrapped layer; negative counts from the end (-1 = last).
    role:       which module of that layer is wrapped: mlp_in, mlp_out or attn_out. The key is
                its input activation, the value replaces its output.
    key_token:  where the key is read at edit time: the last prompt token, the last token of
                the request's subject (the last prompt token when the prompt lacks it), or the
                mean over the prompt's tokens. At inference a position's query is its own
                activation (prompt_mean: the running mean over the positions up to it).
    replace:    which positions get the value when a position matches a key: only the
                matching one ("last"), every position up to it ("prompt"), or the whole
                sequence ("all"; under KV-cached generation later tokens are only replaced
                when they match themselves).
    eps_init:   radius of a new key (Euclidean distance in the key space). The default 1.0
                was measured on SmolLM2-135M layer 21 (input norms ~15): larger radii start
                to capture unrelated prompts (docs/benchmarks.md, GRACE).
    n_iter:     at most this many optimizer steps to learn a value.
    lr:         Adam learning rate of the value.
    stop_loss:  stop learning a value once the target NLL (nats per token) is below this and
                every target token is the argmax; None runs all n_iter steps.
    only_on_error: skip a request the model (with the codebook so far) already answers right,
                as in the paper's protocol.
    cache_activations: run only the layers from the wrapped one up during value steps, from
                activations cached once per edit; False runs the whole model every step.
    progress:   show a progress bar over the requests of an edit.
    """

    layer: int = -9
    role: str = "mlp_out"
    key_token: KeyToken = "last_prompt"
    replace: Replace = "last"
    eps_init: float = 1.0
    n_iter: int = 100
    lr: float = 0.5
    stop_loss: float | None = 0.05
    only_on_error: bool = False
    cache_activations: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}; roles: {list(ROLES)}")
        if self.eps_init <= 0 or self.lr <= 0 or self.n_iter < 1:
            raise ValueError("eps_init and lr must be > 0 and n_iter >= 1")
        if self.stop_loss is not None and self.stop_loss <= 0:
            raise ValueError("stop_loss must be > 0 (or null for none)")


# ---------------------------------------------------------------------------------------
# the codebook
# ---------------------------------------------------------------------------------------


@dataclass
class Codebook:
    """Keys (K, d_in), values (K, d_out), radii (K,), and per key its label (target token ids)
    and the ids of the edits it serves. Row i of every field belongs to key i."""

    keys: torch.Tensor
    values: torch.Tensor
    radii: torch.Tensor
    labels: list[tuple[int, ...]] = field(default_factory=list)
    edit_ids: list[list[str]] = field(default_factory=list)

    @classmethod
    def empty(cls, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> "Codebook":
        return cls(torch.empty(0, d_in, dtype=dtype, device=device), torch.empty(0, d_out, dtype=dtype, device=device),
                   torch.empty(0, dtype=dtype, device=device))

    def __len__(self) -> int:
        return self.keys.shape[0]

    def clone(self) -> "Codebook":
        return Codebook(self.keys.clone(), self.values.clone(), self.radii.clone(), list(self.labels), [list(i) for i in self.edit_ids])

    def to(self, device: torch.device | str) -> "Codebook":
        return Codebook(self.keys.to(device), self.values.to(device), self.radii.to(device), self.labels, self.edit_ids)

    def check(self) -> None:
        """Every per-key field has one row per key (the misalignment bug of a popular port)."""
        sizes = {len(self.keys), len(self.values), len(self.radii), len(self.labels), len(self.edit_ids)}
        if len(sizes) != 1:
            raise ArtifactError(
                f"codebook fields disagree in length: keys {len(self.keys)}, values {len(self.values)}, "
                f"radii {len(self.radii)}, labels {len(self.labels)}, edit_ids {len(self.edit_ids)}"
            )
        if any(not isinstance(i, str) for ids in self.edit_ids for i in ids):
            raise ArtifactError("codebook edit ids must be flat lists of strings, one list per key")

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key for each query row (N, d_in); keys must exist."""
        distances = torch.cdist(queries.to(self.keys.dtype), self.keys)  # (N, K)
        return distances.min(dim=-1)

    def add(self, key: torch.Tensor, value: torch.Tensor, radius: float, label: tuple[int, ...], edit_id: str) -> int:
        self.keys = torch.cat([self.keys, key.reshape(1, -1).to(self.keys)])
        self.values = torch.cat([self.values, value.reshape(1, -1).to(self.values)])
        self.radii = torch.cat([self.radii, torch.tensor([radius]).to(self.radii)])
        self.labels.append(tuple(label))
        self.edit_ids.append([edit_id])
        return len(self) - 1

    def remove(self, edit_id: str) -> bool:
        """Forget one edit: drop its id from its key; a key left without edits is deleted.
        Returns False when no key serves `edit_id`."""
        for index, ids in enumerate(self.edit_ids):
            if edit_id in ids:
                ids.remove(edit_id)
                if not ids:
                    keep = [i for i in range(len(self)) if i != index]
                    self.keys, self.values, self.radii = self.keys[keep], self.values[keep], self.radii[keep]
                    del self.labels[index], self.edit_ids[index]
                return True
        return False

    def all_edit_ids(self) -> list[str]:
        return [i for ids in self.edit_ids for i in ids]


def position_queries(activations: torch.Tensor, mask: torch.Tensor | None, key_token: str) -> torch.Tensor:
    """The query of every position: (B, T, d) activations -> (B, T, d) queries.

    prompt_mean: the mean over the (unmasked) positions up to and including each one; the
    token modes: the position's own activation."""
    if key_token != "prompt_mean":
        return activations
    weights = torch.ones(activations.shape[:2], dtype=activations.dtype, device=activations.device) if mask is None else mask.to(activations)
    sums = (activations * weights.unsqueeze(-1)).cumsum(dim=1)
    return sums / weights.cumsum(dim=1).clamp(min=1).unsqueeze(-1)


def as_rows(activations: torch.Tensor, rows: int) -> torch.Tensor:
    """(B, T, d) activations; a module that sees them flattened to (B*T, d) is unflattened."""
    return activations if activations.dim() == 3 else activations.reshape(rows, -1, activations.shape[-1])


def replaced_positions(hits: torch.Tensor, replace: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Which positions get a value, and from which position's match.

    hits: (B, T) bool. Returns (where (B, T) bool, source (B, T) long): position t takes the
    value matched at position source[b, t]."""
    batch, length = hits.shape
    positions = torch.arange(length, device=hits.device).expand(batch, length)
    if replace == "last":
        return hits, positions
    # the last matching position of each row decides for the rows' other positions
    last = torch.where(hits, positions, torch.full_like(positions, -1)).max(dim=1).values  # (B,)
    source = last.unsqueeze(1).expand(batch, length)
    where = positions <= source if replace == "prompt" else (last >= 0).unsqueeze(1).expand(batch, length)
    return where & (source >= 0), source.clamp(min=0)


# ---------------------------------------------------------------------------------------
# the hook that applies a codebook
# ---------------------------------------------------------------------------------------


class _Adaptor:
    """The hooks on one wrapped module: a stack of codebooks, the top one answers.

    An artifact computed on top of another GRACE artifact at the same module holds the whole
    codebook, so attaching it pushes a codebook that supersedes its parent's, and detaching it
    brings the parent's back."""

    def __init__(self, model: nn.Module, module: nn.Module):
        self.stack: list[tuple[Codebook, str, str]] = []  # (codebook, key_token, replace)
        self.mask: torch.Tensor | None = None  # the current forward's attention mask
        self.rows = 1  # the current forward's batch size (OPT runs its FFN on (B*T, d))
        self._handles = [
            model.register_forward_pre_hook(self._remember_mask, with_kwargs=True),
            module.register_forward_hook(self._replace),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _remember_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.mask = kwargs.get("attention_mask")
        tokens = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        self.rows = tokens.shape[0] if tokens is not None else 1

    def _replace(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.stack or not len(self.stack[-1][0]):
            return None
        codebook, key_token, replace_mode = self.stack[-1]
        x = as_rows(inputs[0], self.rows)  # (B, T, d_in)
        mask = self.mask[:, -x.shape[1]:] if self.mask is not None and self.mask.dim() == 2 else None
        queries = position_queries(x, mask, key_token)
        distance, index = codebook.nearest(queries.reshape(-1, x.shape[-1]))  # (B*T,)
        hits = (distance <= codebook.radii[index]).reshape(x.shape[:2])
        if not hits.any():
            return None
        where, source = replaced_positions(hits, replace_mode)
        chosen = index.reshape(x.shape[:2]).gather(1, source)  # (B, T): key index per position
        values = codebook.values[chosen].to(output.dtype)  # (B, T, d_out)
        return torch.where(where.unsqueeze(-1), values, as_rows(output, x.shape[0])).reshape(output.shape)


_ADAPTORS: "weakref.WeakKeyDictionary[nn.Module, _Adaptor]" = weakref.WeakKeyDictionary()


def _push(model: nn.Module, module: nn.Module, entry: tuple[Codebook, str, str]) -> None:
    if module not in _ADAPTORS:
        _ADAPTORS[module] = _Adaptor(model, module)
    _ADAPTORS[module].stack.append(entry)


def _pop(module: nn.Module, entry: tuple[Codebook, str, str]) -> None:
    adaptor = _ADAPTORS[module]
    if not adaptor.stack or adaptor.stack[-1] is not entry:
        raise ArtifactError("a GRACE codebook was attached on top of this one: detach in the reverse order of attaching")
    adaptor.stack.pop()
    if not adaptor.stack:
        adaptor.remove()
        del _ADAPTORS[module]


def active_codebook(module: nn.Module) -> Codebook | None:
    """The codebook that currently answers at `module`, if any."""
    adaptor = _ADAPTORS.get(module)
    return adaptor.stack[-1][0] if adaptor and adaptor.stack else None


def _is_top(module: nn.Module, entry: Any) -> bool:
    adaptor = _ADAPTORS.get(module)
    return bool(adaptor and adaptor.stack and adaptor.stack[-1] is entry)


# ---------------------------------------------------------------------------------------
# the artifact
# ---------------------------------------------------------------------------------------


class GraceArtifact(EditArtifact):
    """A GRACE codebook at one module: the whole codebook after this edit (parent's keys
    included), so that attaching it on top of its parent supersedes the parent's codebook."""

    kind = "grace_codebook"

    def __init__(self, meta: ArtifactMeta, module_path: str, codebook: Codebook, key_token: str, replace_mode: str):
        super().__init__(meta)
        codebook.check()
        self.module_path = module_path
        self.codebook = codebook
        self.key_token = key_token
        self.replace_mode = replace_mode

    @property
    def edit_ids(self) -> list[str]:
        return self.codebook.all_edit_ids()

    def _apply(self, model: nn.Module) -> tuple[Codebook, str, str]:
        module = model.get_submodule(self.module_path)
        entry = (self.codebook.to(module.weight.device), self.key_token, self.replace_mode)
        _push(model, module, entry)
        return entry

    def _check_detach(self, model: nn.Module, undo: Any) -> None:
        if not _is_top(model.get_submodule(self.module_path), undo):
            raise ArtifactError(
                f"artifact {self.meta.artifact_id}: another GRACE codebook was attached on top of it; "
                "detach in the reverse order of attaching"
            )

    def _undo_apply(self, model: nn.Module, undo: tuple[Codebook, str, str]) -> None:
        _pop(model.get_submodule(self.module_path), undo)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"keys": self.codebook.keys, "values": self.codebook.values, "radii": self.codebook.radii}

    def kind_json(self) -> dict[str, Any]:
        return {
            "module": self.module_path,
            "key_token": self.key_token,
            "replace": self.replace_mode,
            "labels": [list(label) for label in self.codebook.labels],
            "edit_ids": self.codebook.edit_ids,
        }

    @classmethod
    def from_parts(cls, meta: ArtifactMeta, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "GraceArtifact":
        codebook = Codebook(tensors["keys"], tensors["values"], tensors["radii"],
                            [tuple(label) for label in data["labels"]], [list(ids) for ids in data["edit_ids"]])
        return cls(meta, data["module"], codebook, data["key_token"], data["replace"])

    def without_edits(self, edit_ids: Sequence[str]) -> "GraceArtifact":
        """A new artifact with the given edits forgotten (rollback of single fixes); the other
        edits keep working. Unknown ids are an error. The artifact itself is not changed."""
        codebook = self.codebook.clone()
        unknown = [i for i in edit_ids if not codebook.remove(i)]
        if unknown:
            raise ArtifactError(f"artifact {self.meta.artifact_id} has no edit(s) {unknown}; its edits: {self.edit_ids}")
        gone = set(edit_ids)
        meta = replace(
            self.meta,
            requests=tuple(r for r in self.meta.requests if r.digest() not in gone),
            artifact_id=uuid.uuid4().hex,
            created_at=time.time(),
        )
        return GraceArtifact(meta, self.module_path, codebook, self.key_token, self.replace_mode)


# ---------------------------------------------------------------------------------------
# learning a value: capture once, then run only the layers above
# ---------------------------------------------------------------------------------------


@dataclass
class _Capture:
    """One forward of the model on an edit: what the value steps reuse."""

    block_input: torch.Tensor  # (1, T, hidden): input of the wrapped module's block
    block_calls: list[tuple[tuple, dict]]  # (args, kwargs) of every block from that one up
    inputs: torch.Tensor  # (1, T, d_in): the wrapped module's input
    outputs: torch.Tensor  # (1, T, d_out): its output
    logits: torch.Tensor  # (1, T, V)


@contextmanager
def _hooked(*registrations: Any) -> Iterator[None]:
    """Hooks that are removed on exit, whatever happens."""
    handles = list(registrations)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _capture(loaded: LoadedModel, layer: int, module: nn.Module, input_ids: torch.Tensor) -> _Capture:
    blocks = loaded.adapter.blocks()
    calls: dict[int, tuple[tuple, dict]] = {}
    seen: dict[str, torch.Tensor] = {}

    def remember_call(index: int):
        def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[index] = (args, dict(kwargs))
        return hook

    def remember_io(_: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["inputs"], seen["outputs"] = as_rows(inputs[0], 1).detach(), as_rows(output, 1).detach()

    registrations = [blocks[i].register_forward_pre_hook(remember_call(i), with_kwargs=True) for i in range(layer, len(blocks))]
    with torch.no_grad(), _hooked(*registrations, module.register_forward_hook(remember_io)):
        logits = loaded.model(input_ids=input_ids, use_cache=False).logits
    args, kwargs = calls[layer]
    block_input = args[0] if args else kwargs["hidden_states"]
    return _Capture(block_input.detach(), [calls[i] for i in range(layer, len(blocks))], seen["inputs"], seen["outputs"], logits)


def _run_above(loaded: LoadedModel, capture: _Capture) -> torch.Tensor:
    """Logits from the cached block input, running only the blocks from the wrapped one up."""
    hidden = capture.block_input
    first = len(loaded.adapter.blocks()) - len(capture.block_calls)
    for offset, (args, kwargs) in enumerate(capture.block_calls):
        block = loaded.adapter.blocks()[first + offset]
        if args:
            out = block(hidden, *args[1:], **kwargs)
        else:
            out = block(**{**kwargs, "hidden_states": hidden})
        hidden = out[0] if isinstance(out, tuple) else out
    for module in loaded.adapter.final_modules():
        hidden = module(hidden)
    return loaded.model.get_output_embeddings()(hidden)


# ---------------------------------------------------------------------------------------
# the editor and its session
# ---------------------------------------------------------------------------------------


class GraceSession(SequentialSession):
    """An open codebook on a model: add edits one at a time (each sees the ones before it),
    forget one by id, export the artifact. Entering attaches the working codebook; leaving
    removes it, so the model leaves as it came.

        with editor.sequential(loaded) as session:
            for request in stream: session.add(request)
            artifact = session.artifact()
    """

    def __init__(self, editor: "GraceEditor", loaded: LoadedModel, parent: EditArtifact | None = None):
        cfg = editor.config
        self.editor, self.loaded, self.parent = editor, loaded, parent
        adapter = loaded.adapter
        self.layer = adapter.resolve_layers([cfg.layer])[0]
        self.module_path = adapter.module_path(cfg.role, self.layer)
        self.module = loaded.model.get_submodule(self.module_path)
        weight_name = adapter.param_name(cfg.role, self.layer)
        self.hashed = editor.hashed_params(loaded, [weight_name], parent)
        self.base_hash = weights_hash(loaded.model, self.hashed)
        self.requests: list[EditRequest] = []
        self._entry: tuple[Codebook, str, str] | None = None

    @property
    def codebook(self) -> Codebook:
        assert self._entry is not None, "enter the session first (with editor.sequential(...) as session)"
        return self._entry[0]

    def __enter__(self) -> "GraceSession":
        cfg = self.editor.config
        start = active_codebook(self.module)
        if start is None:
            device = self.module.weight.device
            d_in, d_out = self._module_dims()
            start = Codebook.empty(d_in, d_out, self.module.weight.dtype, device)
        self._entry = (start.clone(), cfg.key_token, cfg.replace)
        _push(self.loaded.model, self.module, self._entry)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._entry is not None
        _pop(self.module, self._entry)

    def _module_dims(self) -> tuple[int, int]:
        out_in = self.loaded.adapter.as_out_in(self.module.weight)
        return out_in.shape[1], out_in.shape[0]

    @property
    def size(self) -> int:
        """Keys in the codebook."""
        return len(self.codebook)

    def add(self, request: EditRequest) -> EditOutcome:
        """Edit one request into the codebook."""
        cfg, tok = self.editor.config, self.loaded.tokenizer
        prompt_ids, target_ids = completion_ids(tok, request.prompt, request.target_new)
        device = self.module.weight.device
        batch = completion_batch(tok, [(request.prompt, request.target_new)]).to(device)
        capture = _capture(self.loaded, self.layer, self.module, batch.input_ids)
        edit_id = request.digest()
        self.requests.append(request)
        if cfg.only_on_error and bool((capture.logits.argmax(-1)[batch.target_mask] == batch.targets[batch.target_mask]).all()):
            return EditOutcome(edit_id, "skipped", None, 0, float(completion_nll(capture.logits, batch)[0]))
        position = self._key_position(request, len(prompt_ids))
        query = position_queries(capture.inputs, None, cfg.key_token)[0, position]  # (d_in,)
        label = tuple(target_ids)
        codebook = self.codebook
        action, index = "added", None
        if len(codebook):
            distance, nearest = (t.item() for t in codebook.nearest(query.unsqueeze(0)))
            radius = codebook.radii[nearest].item()
            if distance <= radius + cfg.eps_init:
                if codebook.labels[nearest] == label:
                    action, index = "expanded", nearest
                else:
                    action = "split"
        start = codebook.values[index] if index is not None else capture.outputs[0, position]
        value, steps, nll = self._learn_value(capture, batch, position, start)
        if action == "expanded":
            codebook.radii[index] = max(codebook.radii[index].item(), distance)
            codebook.values[index] = value
            codebook.edit_ids[index].append(edit_id)
        elif action == "split":
            kept = min(radius, distance / 2)
            codebook.radii[nearest] = kept
            index = codebook.add(query, value, min(cfg.eps_init, distance - kept), label, edit_id)
        else:
            index = codebook.add(query, value, cfg.eps_init, label, edit_id)
        return EditOutcome(edit_id, action, index, steps, nll)

    def _key_position(self, request: EditRequest, prompt_length: int) -> int:
        last_prompt = prompt_length - 1
        if self.editor.config.key_token != "last_subject" or not request.subject or request.subject not in request.prompt:
            return last_prompt
        end = request.prompt.index(request.subject) + len(request.subject)
        prefix = self.loaded.tokenizer(request.prompt[:end], add_special_tokens=True)["input_ids"]
        return min(len(prefix), prompt_length) - 1

    def _learn_value(self, capture: _Capture, batch: Any, position: int, start: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        """Gradient descent on the value that replaces the module's output at the edit's
        positions, until the target is the argmax with NLL below stop_loss (or n_iter steps)."""
        cfg, model = self.editor.config, self.loaded.model
        value = start.detach().clone().float().requires_grad_(True)
        length = capture.inputs.shape[1]
        where = torch.zeros(1, length, dtype=torch.bool, device=value.device)
        if cfg.replace == "last":
            where[0, position] = True
        elif cfg.replace == "prompt":
            where[0, : position + 1] = True
        else:
            where[:] = True

        def substitute(_: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return torch.where(where.unsqueeze(-1), value.to(output.dtype), as_rows(output, 1)).reshape(output.shape)

        optimizer = torch.optim.Adam([value], lr=cfg.lr)
        mask = batch.target_mask
        nll_value, step = float("nan"), 0
        with _hooked(self.module.register_forward_hook(substitute)):
            for step in range(cfg.n_iter + 1):
                if cfg.cache_activations:
                    logits = _run_above(self.loaded, capture)
                else:
                    logits = model(input_ids=batch.input_ids, use_cache=False).logits
                nll = completion_nll(logits, batch)[0]
                nll_value = nll.item()
                right = bool((logits.argmax(-1)[mask] == batch.targets[mask]).all())
                if step == cfg.n_iter or (cfg.stop_loss is not None and right and nll_value < cfg.stop_loss):
                    break
                optimizer.zero_grad(set_to_none=True)
                nll.backward()
                optimizer.step()
        return value.detach().to(start.dtype), step, nll_value

    def forget(self, edit_id: str) -> None:
        """Remove one edit from the working codebook (the others stay)."""
        if not self.codebook.remove(edit_id):
            raise KeyError(f"no edit {edit_id!r} in this codebook")
        self.requests = [r for r in self.requests if r.digest() != edit_id]

    def artifact(self) -> GraceArtifact:
        """The codebook as it is now, as an artifact (a copy: later edits do not change it)."""
        meta = self.editor._meta(self.loaded, self.requests, self.hashed, self.base_hash, self.parent)
        codebook = self.codebook.clone().to("cpu")
        return GraceArtifact(meta, self.module_path, codebook, self.editor.config.key_token, self.editor.config.replace)


@register_editor
class GraceEditor(Editor):
    name = "grace"
    config_class = GraceConfig
    config: GraceConfig

    def sequential(self, loaded: LoadedModel, parent: EditArtifact | None = None) -> GraceSession:
        """A session that adds edits one at a time (see GraceSession)."""
        if not loaded.adapter.arch.causal:
            raise ValueError(f"GRACE edits causal language models; {loaded.adapter.model_type} is not one")
        return GraceSession(self, loaded, parent)

    def edit(self, loaded: LoadedModel, requests: Sequence[EditRequest], parent: EditArtifact | None = None) -> GraceArtifact:
        if not requests:
            raise ValueError("an edit needs at least one request")
        with self.sequential(loaded, parent) as session:
            for request in tqdm(requests, desc="grace edit", disable=not self.config.progress):
                session.add(request)
            return session.artifact()
