"""Lifelong editing: a stream of edits applied one at a time, with retention measured as it goes.

Any editor with a sequential session (GRACE's codebook, FT / FT+KL folding their deltas into
the weights) runs the same stream, so their curves are comparable. Every `every` edits (and
after the last) one checkpoint row is recorded:

    edits              edits applied so far
    err                edit retention: mean teacher-forced accuracy of target_new over all
                       past edits (how many fixes still hold)
    trr                test retention: share of the unrelated set's answer tokens whose argmax
                       is still the pre-stream model's
    paraphrase         mean accuracy of target_new after the past edits' rephrase prompts
    newest_success     mean, over the edits since the previous checkpoint, of each edit's
                       accuracy measured right after it was applied
    size               codebook keys (GRACE) or None
    seconds_per_edit   mean wall time of the edits since the previous checkpoint (scoring
                       excluded); seconds_per_edit_median beside it
    actions            how many edits since the previous checkpoint were added / split /
                       expanded / skipped / applied
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from statistics import fmean, median
from typing import Any, Sequence

from tqdm.auto import tqdm

from .artifacts import EditArtifact
from .data.requests import EditRequest
from .editors.base import EditOutcome, Editor
from .evaluate import teacher_forced, teacher_forced_predictions
from .models.loading import LoadedModel


@dataclass(frozen=True)
class StreamConfig:
    """How a stream is run and scored.

    every:      edits between checkpoints (a checkpoint is also taken after the last edit).
    batch_size: prompts per forward pass when scoring.
    progress:   show a progress bar over the stream.
    """

    every: int = 50
    batch_size: int = 16
    progress: bool = True

    def __post_init__(self) -> None:
        if self.every < 1 or self.batch_size < 1:
            raise ValueError("every and batch_size must be >= 1")


@dataclass
class StreamResult:
    series: list[dict[str, Any]]  # one row per checkpoint (see the module docstring)
    outcomes: list[EditOutcome]
    artifact: EditArtifact | None = None  # every edit of the stream as one artifact
    summary: dict[str, Any] = field(default_factory=dict)


def _accuracies(loaded: LoadedModel, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[float]:
    if not pairs:
        return []
    return [c.float().mean().item() for c in teacher_forced(loaded.model, loaded.tokenizer, pairs, batch_size)]


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def run_stream(
    loaded: LoadedModel,
    editor: Editor,
    requests: Sequence[EditRequest],
    unrelated: Sequence[tuple[str, str]],
    config: StreamConfig = StreamConfig(),
    parent: EditArtifact | None = None,
) -> StreamResult:
    """Apply `requests` one at a time with `editor`'s sequential session and score retention
    every `config.every` edits. The model is left exactly as it was given."""
    if not requests:
        raise ValueError("a stream needs at least one request")
    tok, bs = loaded.tokenizer, config.batch_size
    base_predictions = [p for p, _ in teacher_forced_predictions(loaded.model, tok, unrelated, bs)] if unrelated else []
    series: list[dict[str, Any]] = []
    outcomes: list[EditOutcome] = []
    all_seconds: list[float] = []
    window_seconds: list[float] = []
    window_success: list[float] = []

    def checkpoint(session: Any, done: int) -> dict[str, Any]:
        past = requests[:done]
        now = [p for p, _ in teacher_forced_predictions(loaded.model, tok, unrelated, bs)] if unrelated else []
        row = {
            "edits": done,
            "err": _mean(_accuracies(loaded, [(r.prompt, r.target_new) for r in past], bs)),
            "trr": _mean([(a == b).float().mean().item() for a, b in zip(now, base_predictions)]),
            "paraphrase": _mean(_accuracies(loaded, [(p, r.target_new) for r in past for p in r.rephrase], bs)),
            "newest_success": _mean(window_success),
            "size": session.size,
            "seconds_per_edit": _mean(window_seconds),
            "seconds_per_edit_median": median(window_seconds) if window_seconds else None,
            "actions": dict(Counter(o.action for o in outcomes[done - len(window_seconds) : done])),
        }
        window_seconds.clear()
        window_success.clear()
        return row

    with editor.sequential(loaded, parent) as session:
        bar = tqdm(requests, desc=f"{editor.name} stream", unit="edit", disable=not config.progress)
        for done, request in enumerate(bar, start=1):
            started = time.perf_counter()
            outcomes.append(session.add(request))
            window_seconds.append(time.perf_counter() - started)
            all_seconds.append(window_seconds[-1])
            window_success.append(_accuracies(loaded, [(request.prompt, request.target_new)], bs)[0])
            if done % config.every == 0 or done == len(requests):
                series.append(checkpoint(session, done))
                bar.set_postfix(err=f"{series[-1]['err']:.3f}", trr=f"{series[-1]['trr'] or 0:.3f}")
        artifact = session.artifact()
    last = series[-1]
    summary = {
        "method": editor.name,
        "edits": len(requests),
        "err": last["err"],
        "trr": last["trr"],
        "paraphrase": last["paraphrase"],
        "size": last["size"],
        "seconds_per_edit": _mean(all_seconds),
        "seconds_per_edit_median": median(all_seconds),
        "n_unrelated": len(unrelated),
    }
    return StreamResult(series, outcomes, artifact, summary)
