"""FT: plain fine-tuning of chosen weights on the new facts (the baseline every paper reports)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import WeightEditConfig, WeightEditor, register_editor


@dataclass(frozen=True)
class FTConfig(WeightEditConfig):
    """Fine-tuning: minimise the NLL of target_new after the prompt on the chosen weights.

    Every field is documented on WeightEditConfig; FT adds none.
    """


@register_editor
class FTEditor(WeightEditor):
    name = "ft"
    config_class = FTConfig
