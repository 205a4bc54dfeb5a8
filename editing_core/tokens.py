"""Prompt + completion batches: the one tokenisation every editor and metric uses.

A completion batch right-pads `prompt + completion` sequences and marks, for every logit
position, which token it must predict: `targets[b, t]` is the id of token t+1 when that token
belongs to the completion, else IGNORE. So `logits[b, t]` is scored against `targets[b, t]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

IGNORE = -100


def completion_ids(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt (with the tokenizer's special prefix) and of the completion.

    The completion is tokenised on its own, with a leading space unless the prompt ends in
    whitespace or the completion starts with one, so that its ids do not depend on the prompt.
    """
    if not completion.strip():
        raise ValueError(f"completion {completion!r} is empty: there is nothing to predict")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    joiner = "" if (not prompt or prompt[-1].isspace() or completion[:1].isspace()) else " "
    target_ids = tokenizer(joiner + completion, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise ValueError(f"completion {completion!r} tokenises to nothing")
    return prompt_ids, target_ids


def subject_last_token(tokenizer: Any, prompt: str, subject: str, after: int = 0) -> int | None:
    """Index, in the prompt's ids (with the special prefix), of the last token overlapping the
    first occurrence of `subject` in `prompt` from character `after` on; None when there is none."""
    start = prompt.find(subject, after) if subject else -1
    if start < 0:
        return None
    end = start + len(subject)
    offsets = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return inside[-1] if inside else None


@dataclass
class CompletionBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T): id expected from logits[b, t], or IGNORE

    @property
    def target_mask(self) -> torch.Tensor:  # (B, T) bool
        return self.targets != IGNORE

    def to(self, device: torch.device | str) -> "CompletionBatch":
        return CompletionBatch(self.input_ids.to(device), self.attention_mask.to(device), self.targets.to(device))


def completion_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> CompletionBatch:
    """Right-padded batch of `prompt + completion` for each (prompt, completion) pair."""
    return pad_completions([completion_ids(tokenizer, p, c) for p, c in pairs], tokenizer.pad_token_id)


def pad_completions(rows: Sequence[tuple[list[int], list[int]]], pad: int) -> CompletionBatch:
    """Right-padded batch of (prompt ids, completion ids) rows; a row may have no completion."""
    length = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    for b, (p, t) in enumerate(rows):
        n = len(p) + len(t)
        input_ids[b, :n] = torch.tensor(p + t)
        attention[b, :n] = 1
        targets[b, len(p) - 1 : n - 1] = torch.tensor(t, dtype=torch.long)
    return CompletionBatch(input_ids, attention, targets)


def text_batch(tokenizer: Any, texts: Sequence[str]) -> CompletionBatch:
    """Right-padded batch whose targets are every next token of each text (for KL terms)."""
    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    return pad_completions([(ids[:1], ids[1:]) for ids in encoded], tokenizer.pad_token_id)


def completion_logits(model: torch.nn.Module, batch: CompletionBatch) -> torch.Tensor:
    """(B, T, V) logits of the model on the batch."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def completion_nll(logits: torch.Tensor, batch: CompletionBatch) -> torch.Tensor:
    """(B,) mean negative log-likelihood of each row's completion tokens."""
    logprobs = logits.float().log_softmax(-1)
    mask = batch.target_mask
    picked = logprobs.gather(-1, batch.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return -(picked * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def kl_from_reference(logits: torch.Tensor, reference_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(reference || model): how far the model's next-token
    distributions moved from the reference ones. logits, reference_logprobs: (B, T, V); mask: (B, T)."""
    logprobs = logits.float().log_softmax(-1)
    kl = (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(-1)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp(min=1)
