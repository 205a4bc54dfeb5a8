"""Edit metrics: one implementation, used by the CLI, the pipelines and the benchmarks.

Teacher-forced (the gold prefix is fed; a token counts when the argmax predicts it):
    edit_success  share of target_new tokens predicted after the prompt, averaged over requests
    paraphrase    the same after each rephrase prompt
    locality      share of locality-answer tokens whose argmax after the edit equals the argmax
                  before it (compared with the pre-edit model, not with the dataset answer)
    drawdown      pre-edit minus post-edit accuracy on held-out (prompt, answer) pairs that the
                  pre-edit model got fully right (default: the requests' locality pairs)
Generated (greedy decoding, exact match; teacher forcing flatters editors):
    edit_success_generated, paraphrase_generated  the greedy continuation of target length,
                  decoded, equals target_new (whitespace-stripped)
    locality_generated  the greedy continuation is token for token the pre-edit one

`evaluate` scores the model as it is, and with an artifact attached also scores it after the
edit (keys without prefix) and reports the pre-edit values under `pre_*`. No gradients; batches
are formed in request order, so results are deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .artifacts import EditArtifact
from .data.requests import EditRequest
from .models.loading import LoadedModel
from .tokens import completion_batch, completion_ids, completion_logits

log = logging.getLogger(__name__)

LOCALITY_FALLBACK_TOKENS = 8  # continuation length scored when a locality answer is missing


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate.

    batch_size: prompts per forward pass.
    generated:  also compute the `*_generated` metrics (greedy decoding; slower).
    progress:   show progress bars.
    """

    batch_size: int = 16
    generated: bool = True
    progress: bool = False


@dataclass
class EvalReport:
    metrics: dict[str, float | int | None]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per request: before / after answers


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int) -> list[torch.Tensor]:
    """For each (prompt, completion): a bool tensor over the completion's tokens, True where the
    argmax prediction given the gold prefix is that token."""
    return [pred == gold for pred, gold in teacher_forced_predictions(model, tokenizer, pairs, batch_size)]


@torch.no_grad()
def teacher_forced_predictions(
    model: torch.nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (prompt, completion): (argmax ids, gold ids) at the completion's positions."""
    device = next(model.parameters()).device
    out = []
    for chunk in _chunks(pairs, batch_size):
        batch = completion_batch(tokenizer, chunk).to(device)
        predictions = completion_logits(model, batch).argmax(-1)  # (B, T)
        for b in range(len(chunk)):
            mask = batch.target_mask[b]
            out.append((predictions[b][mask].cpu(), batch.targets[b][mask].cpu()))
    return out


@torch.no_grad()
def greedy_continuations(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], lengths: Sequence[int], batch_size: int
) -> list[list[int]]:
    """Greedy continuation ids of each prompt, exactly `lengths[i]` tokens long (left-padded batches)."""
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for chunk in _chunks(list(zip(prompts, lengths)), batch_size):
        encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p, _ in chunk]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, ids in enumerate(encoded):
            input_ids[b, width - len(ids) :] = torch.tensor(ids)
            attention[b, width - len(ids) :] = 1
        steps = max(n for _, n in chunk)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=False,
            max_new_tokens=steps, min_new_tokens=steps, pad_token_id=tokenizer.pad_token_id,
        )[:, width:]
        out.extend(generated[b, :n].tolist() for b, (_, n) in enumerate(chunk))
    return out


def generate_texts(loaded: LoadedModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of `prompts` as text, at most `max_new_tokens` tokens each, cut at
    the end-of-sequence token (what serving answers)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = loaded.tokenizer
    ids = greedy_continuations(loaded.model, tok, prompts, [max_new_tokens] * len(prompts), batch_size)
    if tok.eos_token_id is not None:
        ids = [seq[: seq.index(tok.eos_token_id)] if tok.eos_token_id in seq else seq for seq in ids]
    return [tok.decode(seq, skip_special_tokens=True) for seq in ids]

@dataclass
class _Probe:
    """Everything that is scored on the model: built once, run before and after the edit."""

    edits: list[tuple[str, str]]  # (prompt, target_new) per request
    paraphrases: list[tuple[str, str]]  # (rephrase, target_new)
    locality: list[tuple[str, str]]  # (locality prompt, answer)
    heldout: list[tuple[str, str]]


def _build_probe(loaded: LoadedModel, requests: Sequence[EditRequest], heldout: Sequence[tuple[str, str]] | None, config: EvalConfig) -> _Probe:
    locality, missing = [], []
    for r in requests:
        if r.locality_prompt:
            locality.append((r.locality_prompt, r.locality_answer))
            if not r.locality_answer:
                missing.append(len(locality) - 1)
    if missing:  # score the pre-edit model's own continuation where no answer is given
        prompts = [locality[i][0] for i in missing]
        ids = greedy_continuations(loaded.model, loaded.tokenizer, prompts, [LOCALITY_FALLBACK_TOKENS] * len(prompts), config.batch_size)
        for i, continuation in zip(missing, ids):
            locality[i] = (locality[i][0], loaded.tokenizer.decode(continuation))
    return _Probe(
        edits=[(r.prompt, r.target_new) for r in requests],
        paraphrases=[(p, r.target_new) for r in requests for p in r.rephrase],
        locality=locality,
        # default held-out set: the locality facts the user gave an answer for (not the fallbacks)
        heldout=list(heldout) if heldout is not None else [
            (r.locality_prompt, r.locality_answer) for r in requests if r.locality_prompt and r.locality_answer
        ],
    )


def _run_probe(loaded: LoadedModel, probe: _Probe, config: EvalConfig, label: str) -> dict[str, Any]:
    """Raw per-item results of one pass over the probe (accuracies, predictions, continuations)."""
    model, tok, bs = loaded.model, loaded.tokenizer, config.batch_size

    def accuracies(pairs: list[tuple[str, str]]) -> list[float]:
        return [c.float().mean().item() for c in teacher_forced(model, tok, pairs, bs)] if pairs else []

    def continuations(pairs: list[tuple[str, str]]) -> list[list[int]]:
        lengths = [len(completion_ids(tok, p, c)[1]) for p, c in pairs]
        return greedy_continuations(model, tok, [p for p, _ in pairs], lengths, bs) if pairs else []

    def predictions(pairs: list[tuple[str, str]]) -> list[torch.Tensor]:
        return [p for p, _ in teacher_forced_predictions(model, tok, pairs, bs)] if pairs else []

    steps = {
        "edit": lambda: accuracies(probe.edits),
        "paraphrase": lambda: accuracies(probe.paraphrases),
        "locality": lambda: predictions(probe.locality),
        "heldout": lambda: accuracies(probe.heldout),
    }
    if config.generated:
        steps["edit_gen"] = lambda: continuations(probe.edits)
        steps["paraphrase_gen"] = lambda: continuations(probe.paraphrases)
        steps["locality_gen"] = lambda: continuations(probe.locality)
    return {name: run() for name, run in tqdm(steps.items(), desc=f"evaluate ({label})", disable=not config.progress)}


def _mean(values: Sequence[float]) -> float | None:
    return fmean(values) if values else None


def _matches(tokenizer: Any, continuation: list[int], target: str) -> bool:
    return tokenizer.decode(continuation).strip() == target.strip()


def _metrics(tok: Any, probe: _Probe, before: dict[str, Any], after: dict[str, Any], generated: bool) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "n_requests": len(probe.edits),
        "edit_success": _mean(after["edit"]),
        "paraphrase": _mean(after["paraphrase"]),
        "locality": _mean([(a == b).float().mean().item() for a, b in zip(after["locality"], before["locality"])]),
    }
    known = [i for i, acc in enumerate(before["heldout"]) if acc == 1.0]
    metrics["n_drawdown"] = len(known)
    metrics["drawdown"] = (
        _mean([before["heldout"][i] for i in known]) - _mean([after["heldout"][i] for i in known]) if known else None
    )
    if generated:
        metrics["edit_success_generated"] = _mean([float(_matches(tok, g, t)) for g, (_, t) in zip(after["edit_gen"], probe.edits)])
        metrics["paraphrase_generated"] = _mean([float(_matches(tok, g, t)) for g, (_, t) in zip(after["paraphrase_gen"], probe.paraphrases)])
        metrics["locality_generated"] = _mean([float(a == b) for a, b in zip(after["locality_gen"], before["locality_gen"])])
    return metrics


def evaluate(
    loaded: LoadedModel,
    requests: Sequence[EditRequest],
    artifact: EditArtifact | None = None,
    heldout: Sequence[tuple[str, str]] | None = None,
    config: EvalConfig = EvalConfig(),
) -> EvalReport:
    """Score `requests` on the model; with `artifact`, before and after attaching it.

    The model is left exactly as it was given (the artifact is detached on exit, even on error).
    """
    if not requests:
        raise ValueError("evaluate needs at least one request")
    if not loaded.adapter.arch.causal:
        raise ValueError(f"edit metrics need a causal language model; {loaded.adapter.model_type} is not one")
    probe = _build_probe(loaded, requests, heldout, config)
    before = _run_probe(loaded, probe, config, "before edit" if artifact else "model")
    if artifact is None:
        return EvalReport(_metrics(loaded.tokenizer, probe, before, before, config.generated), _rows(loaded.tokenizer, requests, before, None, config))
    with artifact.attached(loaded.model):
        after = _run_probe(loaded, probe, config, "after edit")
    metrics = _metrics(loaded.tokenizer, probe, before, after, config.generated)
    pre = _metrics(loaded.tokenizer, probe, before, before, config.generated)
    for key in ("edit_success", "paraphrase", "edit_success_generated", "paraphrase_generated"):
        if key in pre:
            metrics[f"pre_{key}"] = pre[key]
    return EvalReport(metrics, _rows(loaded.tokenizer, requests, before, after, config))


def _rows(tok: Any, requests: Sequence[EditRequest], before: dict[str, Any], after: dict[str, Any] | None, config: EvalConfig) -> list[dict[str, Any]]:
    rows = []
    for i, r in enumerate(requests):
        row: dict[str, Any] = {"prompt": r.prompt, "target_new": r.target_new, "accuracy_before": before["edit"][i]}
        if config.generated:
            row["before"] = tok.decode(before["edit_gen"][i]).strip()
        if after is not None:
            row["accuracy_after"] = after["edit"][i]
            if config.generated:
                row["after"] = tok.decode(after["edit_gen"][i]).strip()
        rows.append(row)
    return rows
