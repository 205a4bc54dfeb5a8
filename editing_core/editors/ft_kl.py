"""FT+KL: fine-tuning with a KL penalty that keeps unrelated prompts' predictions in place.

The loss is NLL(target_new | prompt) + kl_weight * KL(p_pre(. | x_loc) || p_edited(. | x_loc)),
averaged over every next-token position of the locality texts x_loc: each request's
locality_prompt (followed by its locality_answer when given) and the config's `kl_prompts`.
The locality term follows MEND's training objective (Mitchell et al. 2022,
https://arxiv.org/abs/2110.11309), applied here to direct fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..data.requests import EditRequest
from ..models.loading import LoadedModel
from ..tokens import CompletionBatch, completion_logits, kl_from_reference, text_batch
from .base import WeightEditConfig, WeightEditor, register_editor


@dataclass(frozen=True)
class FTKLConfig(WeightEditConfig):
    """FT plus a KL term to the pre-edit model (fields of WeightEditConfig, and):

    kl_weight:  weight of the KL term against the edit NLL.
    kl_prompts: extra texts whose next-token distributions must not move, used besides the
                requests' locality prompts (required when no request has a locality_prompt).
    use_request_locality: use the requests' own locality prompts (+ answers) as KL texts. The
                locality metric is scored on those same prompts, so it then flatters the edit;
                benchmarks turn this off and give kl_prompts from other data.
    subject_swaps: for each request whose prompt contains its subject, add up to this many KL
                texts made by putting other subjects into the prompt ("BBC One, by" ->
                "Galata, by"): the same relation asked of other entities must keep its
                pre-edit answer, which is where fine-tuning leaks most. 0 turns this off.
    swap_subjects: subjects to swap in besides the other requests' subjects (a single edit has
                no other request to borrow from).
    """

    kl_weight: float = 1.0
    kl_prompts: tuple[str, ...] = ()
    use_request_locality: bool = True
    subject_swaps: int = 0
    swap_subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kl_weight < 0:
            raise ValueError("kl_weight must be >= 0")
        if self.subject_swaps < 0:
            raise ValueError("subject_swaps must be >= 0")


@register_editor
class FTKLEditor(WeightEditor):
    name = "ft_kl"
    config_class = FTKLConfig
    config: FTKLConfig

    def prepare(self, loaded: LoadedModel, requests: Sequence[EditRequest]) -> tuple[CompletionBatch, torch.Tensor]:
        texts = [
            f"{r.locality_prompt} {r.locality_answer}" if r.locality_answer else r.locality_prompt
            for r in requests
            if r.locality_prompt and self.config.use_request_locality
        ] + list(self.config.kl_prompts) + self.subject_swapped_prompts(requests)
        if not texts:
            raise ValueError(
                "ft_kl needs locality texts: give the requests a locality_prompt (with "
                "use_request_locality on), or set kl_prompts in the config"
            )
        device = next(loaded.model.parameters()).device
        batch = text_batch(loaded.tokenizer, texts).to(device)
        with torch.no_grad():
            reference = completion_logits(loaded.model, batch).float().log_softmax(-1)
        return batch, reference

    def subject_swapped_prompts(self, requests: Sequence[EditRequest]) -> list[str]:
        """Each request's prompt with its subject replaced by up to `subject_swaps` others."""
        cfg = self.config
        subjects = list(dict.fromkeys([r.subject for r in requests if r.subject] + list(cfg.swap_subjects)))
        # a swap that lands on a prompt being edited would pull against that edit
        edited = {p for r in requests for p in (r.prompt, *r.rephrase)}
        texts = []
        for r in requests:
            if cfg.subject_swaps and r.subject and r.subject in r.prompt:
                swapped = (r.prompt.replace(r.subject, other) for other in subjects if other != r.subject)
                texts += [t for t in swapped if t not in edited][: cfg.subject_swaps]
        return texts

    def extra_loss(self, loaded: LoadedModel, context: tuple[CompletionBatch, torch.Tensor]) -> torch.Tensor:
        batch, reference = context
        mask = batch.attention_mask.bool()
        return self.config.kl_weight * kl_from_reference(completion_logits(loaded.model, batch), reference, mask)
