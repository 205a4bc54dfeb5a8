"""ModelWorker: one process that loads a model once and edits / evaluates it on request.

The driver sends small, plain data (the model name, a method name and its config as a dict,
requests as dicts) and gets back an `EditArtifact` or an `EvalReport`. The worker never reads the
facts file, so it runs the same on this machine and on a remote Ray cluster.

`ModelWorker` is a plain class (usable, and testable, without Ray); `start_model_worker` turns it
into a Ray actor that reserves `cpus` CPUs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Sequence

from editing_core.data import EditRequest

if TYPE_CHECKING:  # pragma: no cover - typing only
    from editing_core.artifacts import EditArtifact
    from editing_core.evaluate import EvalReport
    from editing_core.models import LoadedModel
    from editing_core.sequential import StreamResult

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# the wire format of requests
# ---------------------------------------------------------------------------------------


def requests_to_dicts(requests: Sequence[EditRequest]) -> list[dict[str, Any]]:
    """Requests as plain dicts, keeping `source` so the worker's errors still name file and row."""
    return [{**request.to_dict(), "source": request.source} for request in requests]


def requests_from_dicts(rows: Sequence[dict[str, Any]]) -> list[EditRequest]:
    return [EditRequest.from_dict(row) for row in rows]


# ---------------------------------------------------------------------------------------
# the worker
# ---------------------------------------------------------------------------------------


class ModelWorker:
    """Holds one loaded model; each call leaves it exactly as loaded (artifacts are detached).

    A model that fails to load does not fail the constructor: Ray would replace the exception
    with a generic "actor died" error. The failure is kept and raised, as itself, by every call.
    """

    def __init__(self, model_name: str, threads: int = 1) -> None:
        import torch

        from editing_core.models import load_model

        torch.set_num_threads(max(1, threads))
        started = time.perf_counter()
        self._model: LoadedModel | None = None
        self._load_error: Exception | None = None
        try:
            self._model = load_model(model_name)
        except Exception as exc:  # noqa: BLE001 - re-raised by every call, see the class docstring
            self._load_error = exc
        self._load_seconds = time.perf_counter() - started
        if self._model is not None:
            log.info("loaded %s in %.1f s (%d torch threads)", model_name, self._load_seconds, torch.get_num_threads())

    @property
    def _loaded(self) -> "LoadedModel":
        if self._load_error is not None:
            raise self._load_error
        assert self._model is not None
        return self._model

    def describe(self) -> dict[str, Any]:
        """What the worker holds: model name, type, layers, context length, threads, load time."""
        import torch

        adapter = self._loaded.adapter
        return {
            "model": self._loaded.name,
            "model_type": adapter.model_type,
            "num_layers": adapter.num_layers,
            "context_length": adapter.context_length,
            "threads": torch.get_num_threads(),
            "load_seconds": self._load_seconds,
        }

    def check_lengths(self, requests: list[dict[str, Any]]) -> None:
        """Refuse prompts (with their answers) longer than the model's context
        (FactsValidationError naming file, row and field)."""
        from editing_core.data import check_prompt_lengths

        context = self._loaded.adapter.context_length
        if context is None:
            log.warning("%s does not declare a context length; prompt lengths are not checked", self._loaded.name)
            return
        check_prompt_lengths(requests_from_dicts(requests), self._loaded.tokenizer, context)

    def edit(
        self, method: str, config: dict[str, Any], requests: list[dict[str, Any]], base: "Sequence[EditArtifact]" = ()
    ) -> "EditArtifact":
        """Compute the edit of `requests` with `method` configured by `config` (strictly checked),
        on top of the `base` artifacts (attached in order, e.g. the champion's lineage)."""
        from editing_core.artifacts import attached_chain
        from editing_core.editors import make_editor

        editor = make_editor(method, config)
        started = time.perf_counter()
        with attached_chain(self._loaded.model, base):
            artifact = editor.edit(self._loaded, requests_from_dicts(requests), parent=base[-1] if base else None)
        log.info("%s edit of %d requests took %.1f s", method, len(requests), time.perf_counter() - started)
        return artifact

    def stream(
        self,
        method: str,
        config: dict[str, Any],
        requests: list[dict[str, Any]],
        unrelated: list[tuple[str, str]],
        every: int,
        base: "Sequence[EditArtifact]" = (),
    ) -> "StreamResult":
        """Apply `requests` one at a time (lifelong editing) on top of `base`, scoring retention
        every `every` edits; the result carries the series and the final artifact."""
        from editing_core.artifacts import attached_chain
        from editing_core.editors import make_editor
        from editing_core.sequential import StreamConfig, run_stream

        editor = make_editor(method, config)
        pairs = [tuple(pair) for pair in unrelated]
        with attached_chain(self._loaded.model, base):
            return run_stream(self._loaded, editor, requests_from_dicts(requests), pairs,
                              StreamConfig(every=every, progress=False), parent=base[-1] if base else None)

    def evaluate(
        self,
        requests: list[dict[str, Any]],
        artifact: "EditArtifact | None",
        heldout: list[tuple[str, str]] | None,
        eval_config: dict[str, Any],
        base: "Sequence[EditArtifact]" = (),
    ) -> "EvalReport":
        """Score the requests on the model with the `base` artifacts attached, before and (with
        `artifact`) after the edit."""
        from editing_core.artifacts import attached_chain
        from editing_core.config import load_config
        from editing_core.evaluate import EvalConfig, evaluate

        config = load_config(EvalConfig, eval_config)
        pairs = [tuple(pair) for pair in heldout] if heldout is not None else None
        with attached_chain(self._loaded.model, base):
            return evaluate(self._loaded, requests_from_dicts(requests), artifact, pairs, config)


def start_model_worker(model_name: str, cpus: float) -> Any:
    """A `ModelWorker` Ray actor reserving `cpus` CPUs (torch uses that many threads).

    Ray must already be initialised. The model loads in the actor's constructor; the first
    method call waits for it.
    """
    import ray

    actor_class = ray.remote(ModelWorker)
    threads = max(1, int(cpus))
    return actor_class.options(num_cpus=cpus, max_restarts=0).remote(model_name, threads)
