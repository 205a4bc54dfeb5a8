"""SaLEM: MEND on the one most salient layer, from low-rank aggregated gradients.

SaLEM ("salient-layers editing model"; Amazon, EACL 2024; summary at
https://www.amazon.science/blog/updating-large-language-models-by-directly-editing-network-layers).
No public code exists; this is the reference implementation here. Three choices differ from MEND
(editors/mend.py), all fixed when the editor is trained (`editflow train-editor --salient`):
  - the edited layer is the argmax of the layer saliency (editing_core/saliency.py) over the
    edit dataset's fail / adapt / pass samples;
  - the gradient is summed over each group of `svd_group` (10) requests and replaced by its
    top-`svd_rank` SVD approximation before the editor (`MendNetConfig.factors = "svd"`);
  - the editor is trained with the NLL of fail (prompt) and adapt (rephrase) samples after the
    edit and the KL of pass (locality) samples, MEND's loss on SaLEM's groups.
Applying a SaLEM editor is applying a MEND editor; this class only checks the editor is one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import register_editor
from .mend import MendConfig, MendEditor, MendNetConfig


@dataclass(frozen=True)
class SalemConfig(MendConfig):
    """Applying a trained SaLEM editor: the fields of MendConfig (`editor` must be a directory
    written by `editflow train-editor --salient`)."""


def salem_net_config(layer: int, **overrides: object) -> MendNetConfig:
    """The editor network SaLEM trains: MEND's, on `layer` only, with SVD-aggregated gradients."""
    defaults: dict = {"layers": (layer,), "factors": "svd", "svd_group": 10}
    return MendNetConfig(**{**defaults, **overrides})


@register_editor
class SalemEditor(MendEditor):
    name = "salem"
    config_class = SalemConfig
    expected_factors = "svd"
