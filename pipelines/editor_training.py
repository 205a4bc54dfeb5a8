"""Training a MEND or SaLEM editor end to end: facts -> (saliency -> salient layer) -> Ray Train
+ DeepSpeed -> editor directory, loss curves as PNG, and the run in MLflow.

    result = train_editor_run(EditorTrainingSpec(model="smollm2-135m", facts=Path("train.json"),
                                                 salient=True), out="editors/salem")

Used by `editflow train-editor` and by pipelines whose edit step trains its editor (method
salem / mend without an `editor`). Ray must be initialised by the caller.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from editing_core.editors.mend import MendNetConfig, MendTrainConfig
from editing_core.editors.salem import LAYER_CRITERIA, edit_gain_scan, salem_layer_config
from tasks.mend_train import DistributedConfig, TrainingResult, plot_history, train_editor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditorTrainingSpec:
    """One editor training.

    model:          the base model (alias, directory or hub id).
    facts:          training facts (each needs a locality_prompt); val: validation facts.
    net:            the editor network (layers, roles, rank, factors...).
    train:          the optimisation (steps, batch size, learning rates, loss weights...).
    distributed:    Ray Train workers, ZeRO stage, offload.
    salient:        SaLEM: choose the one layer over the first `saliency_rows` training facts
                    and train an SVD-factor editor on it (net.layers is ignored).
    salient_by:     how: `gradient`, the layer saliency of editing_core/saliency.py (the
                    SaLEM paper's mean |dL/dW|); `edit_gain`, the layer whose calibrated plain
                    low-rank step lowers the training loss most (editors/salem.py
                    `edit_gain_scan`; about 20 s per layer for SmolLM2-135M on 2 cores).
    salient_layers: the candidate layers (negative counts from the end); empty: all.
    max_rows:       use at most this many training facts (None: all).
    tracking_uri:   log the run to MLflow there (None: no MLflow run).
    experiment:     MLflow experiment name.
    """

    model: str
    facts: Path
    val: Path | None = None
    net: MendNetConfig = field(default_factory=MendNetConfig)
    train: MendTrainConfig = field(default_factory=MendTrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    salient: bool = False
    salient_by: str = "gradient"
    salient_layers: tuple[int, ...] = ()
    saliency_rows: int = 20
    max_rows: int | None = None
    tracking_uri: str | None = None
    experiment: str = "editflow-editors"

    def __post_init__(self) -> None:
        object.__setattr__(self, "salient_layers", tuple(self.salient_layers))
        if self.salient_by not in LAYER_CRITERIA:
            raise ValueError(f"salient_by must be one of {LAYER_CRITERIA}, got {self.salient_by!r}")
        if self.salient_by == "edit_gain" and not self.train.edit_lr_grid:
            raise ValueError("salient_by edit_gain searches the edit rate over train.edit_lr_grid, which is empty")


def _salient_layer(spec: EditorTrainingSpec, loaded: Any, requests: list[Any], out: Path) -> int:
    """The SaLEM layer of the first `saliency_rows` facts: by gradient saliency (sharded over
    the training workers; out/saliency) or by edit gain (in this process; out/edit_gain)."""
    from editing_core.saliency import SaliencyConfig, build_samples, write_saliency
    from tasks.saliency import sharded_saliency

    rows = requests[: spec.saliency_rows]
    candidates = loaded.adapter.resolve_layers(spec.salient_layers or range(loaded.adapter.num_layers))
    if spec.salient_by == "edit_gain":
        scan = edit_gain_scan(loaded, rows, candidates, spec.train, spec.net)
        layer = min(scan, key=lambda r: r["loss"])["layer"]
        (out / "edit_gain").mkdir(parents=True, exist_ok=True)
        (out / "edit_gain" / "edit_gain.json").write_text(json.dumps({"model": spec.model, "rows": len(rows), "chosen_layer": layer, "layers": scan}, indent=2))
        plot_edit_gain(scan, None, out / "edit_gain" / "edit_gain.png", f"SaLEM layers of {spec.model}: one calibrated low-rank step")
    else:
        samples = build_samples(loaded, rows)
        sums = sharded_saliency(spec.model, samples, SaliencyConfig(roles=spec.net.roles), spec.distributed.workers,
                                spec.distributed.cpus_per_worker, loaded, share_weights=True)
        write_saliency(sums, out / "saliency", f"saliency of {spec.model}", model=spec.model, facts=str(spec.facts), rows=len(rows))
        layer = sums.scores().chosen_among(candidates)
    log.info("salient layer by %s: %d (of %d rows)", spec.salient_by, layer, len(rows))
    return layer


def plot_edit_gain(scan: Sequence[Mapping[str, Any]], saliency: Sequence[float] | None, path: Path, title: str) -> None:
    """Bars per layer: edit accuracy after the best plain step (and the gradient saliency)."""
    from editing_core.plotting import agg_figure

    layers = [r["layer"] for r in scan]
    fig = agg_figure((8, 4))
    ax = fig.add_subplot()
    ax.bar([x - 0.2 for x in layers], [r["edit_accuracy"] for r in scan], width=0.4, label="edit accuracy after the best plain step")
    ax.set_xlabel("layer")
    ax.set_ylabel("edit accuracy")
    handles = ax.get_legend_handles_labels()
    if saliency:
        right = ax.twinx()
        right.bar([x + 0.2 for x in layers], [saliency[x] for x in layers], width=0.4, color="tab:orange", label="gradient saliency (right axis)")
        right.set_ylabel("mean |dL/dW|")
        more = right.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    ax.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def train_editor_run(spec: EditorTrainingSpec, out: str | Path, fail_once_at: int | None = None) -> TrainingResult:
    """Train the editor of `spec` into `out` (editor/, history.json, training.png; saliency/
    with `salient`); a rerun with the same `out` resumes from the last checkpoint."""
    from editing_core.artifacts import weights_hash
    from editing_core.data import load_facts
    from editing_core.editors.mend import net_targets
    from editing_core.models import load_model

    out = Path(out)
    requests = load_facts(spec.facts, allow_conflicts=True)  # training edits, one per row
    val = load_facts(spec.val, allow_conflicts=True)[: spec.train.val_rows] if spec.val else []
    if spec.max_rows is not None:
        requests = requests[: spec.max_rows]
    net = spec.net
    _check_rows(spec.facts, requests, net)
    if spec.val:
        _check_rows(spec.val, val, net)
    info: dict[str, Any] = {"facts": str(spec.facts), "rows": len(requests), "method": "salem" if net.factors == "svd" else "mend"}
    loaded = load_model(spec.model)  # for the saliency and the hash of the weights the editor learns
    if spec.salient:
        layer = _salient_layer(spec, loaded, requests, out)
        net = salem_layer_config(net, layer)
        info.update(method="salem", salient_layer=layer, salient_by=spec.salient_by)
    info["base_hash"] = weights_hash(loaded.model, [name for name, _, _ in net_targets(loaded, net)])
    del loaded
    result = train_editor(spec.model, requests, val, net, spec.train, spec.distributed, out, info, fail_once_at)
    plot_history(result.history, out / "training.png", f"{info['method']} editor for {spec.model}")
    if spec.tracking_uri:
        _log_to_mlflow(spec, net, info, result, out)
    return result


def _check_rows(path: Path, requests: Sequence[Any], net: MendNetConfig) -> None:
    """Every row needs a locality prompt; with pair_positions "subject" also a subject inside its
    prompt. Checked before anything starts, so a bad row never stops a run halfway."""
    missing = [i for i, r in enumerate(requests) if not r.locality_prompt]
    if missing:
        raise ValueError(f"{path}: rows {missing[:10]} have no locality prompt; MEND training needs one on every row")
    if net.pair_positions == "subject":
        missing = [i for i, r in enumerate(requests) if not r.subject or r.subject not in r.prompt]
        if missing:
            raise ValueError(f"{path}: rows {missing[:10]}: field 'subject' is missing or not in the prompt; "
                             "an editor with pair_positions 'subject' needs it on every row")


def _log_to_mlflow(spec: EditorTrainingSpec, net: MendNetConfig, info: dict[str, Any], result: TrainingResult, out: Path) -> None:
    from editing_core.config import config_to_dict
    from infra.tracking import flatten_params, tracked_run

    with tracked_run(spec.tracking_uri, spec.experiment, f"train-{info['method']}-editor",
                     tags={"kind": "editor_training", "method": info["method"], "base_model": spec.model}) as run:
        run.log_params(flatten_params({"net": config_to_dict(net), "train": asdict(spec.train),
                                       "distributed": asdict(spec.distributed), **{k: v for k, v in info.items() if k != "base_hash"}}))
        run.log_metric_series(result.history, "step")
        run.log_metrics({"train_seconds": result.seconds, "selected_step": result.selected_step,
                         **{f"final_{k}": v for k, v in result.history[-1].items()}})
        run.log_file(out / "training.png")
        run.log_file(out / "history.json")
        run.log_dir(result.editor_dir, "editor")
        for part in ("saliency", "edit_gain"):
            if (out / part).is_dir():
                run.log_dir(out / part, part)
        (out / "mlflow_run.json").write_text(json.dumps({"tracking_uri": spec.tracking_uri, "run_id": run.run_id}))
    log.info("editor training logged to MLflow run %s", run.run_id)

