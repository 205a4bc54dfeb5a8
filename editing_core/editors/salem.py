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

Gradient saliency is not editability: on SmolLM2-135M it picks layer 0, where even the best
plain rank-8 gradient step edits nothing (docs/benchmarks.md). `edit_gain_scan` ranks layers
by what an edit there achieves instead: the training loss after one calibrated plain low-rank
step (`train-editor --salient-by edit_gain`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

from tqdm.auto import tqdm

from ..data import EditRequest
from ..models import LoadedModel
from .base import register_editor
from .mend import MendConfig, MendEditor, MendNetConfig, MendTrainConfig, build_net, calibrate_edit_rates, training_batches

LAYER_CRITERIA = ("gradient", "edit_gain")


@dataclass(frozen=True)
class SalemConfig(MendConfig):
    """Applying a trained SaLEM editor: the fields of MendConfig (`editor` must be a directory
    written by `editflow train-editor --salient`)."""


def salem_layer_config(net: MendNetConfig, layer: int) -> MendNetConfig:
    """`net` restricted to one layer, with SVD-aggregated gradients: the editor SaLEM trains."""
    return replace(net, layers=(layer,), factors="svd")


def salem_net_config(layer: int, **overrides: object) -> MendNetConfig:
    """The SaLEM editor of `layer` from MendNetConfig's defaults (svd_group 10) and `overrides`."""
    return salem_layer_config(MendNetConfig(**overrides), layer)


def edit_gain_scan(loaded: LoadedModel, requests: Sequence[EditRequest], layers: Sequence[int], train: MendTrainConfig,
                   net: MendNetConfig | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """For each of `layers`, an untrained SaLEM editor of that layer (its edit is the plain
    rank-`svd_rank` gradient step of each batch) with its edit rate calibrated on `requests`
    (batches of `train.batch_size`, the grid `train.edit_lr_grid`). One record per layer: layer,
    the best edit_lr and its mean MEND loss parts (loss, edit_nll, locality_kl, edit_accuracy),
    and `grid`, every rate's record. `net` gives the other editor fields (roles, svd_rank...)."""
    base = net or MendNetConfig()
    batches = training_batches(loaded, requests, train)
    results = []
    for layer in tqdm(layers, desc="edit gain per layer", disable=not progress):
        candidate = build_net(loaded, salem_layer_config(base, layer))
        records = calibrate_edit_rates(candidate, loaded, batches, train)
        best = min(records, key=lambda r: r["loss"])
        results.append({"layer": layer, **{k: v for k, v in best.items() if k != "slot"}, "grid": records})
    return results


@register_editor
class SalemEditor(MendEditor):
    name = "salem"
    config_class = SalemConfig
    expected_factors = "svd"
