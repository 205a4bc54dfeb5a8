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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from editing_core.editors.mend import MendNetConfig, MendTrainConfig
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
    salient:        SaLEM: choose the one layer by saliency over the first `saliency_rows`
                    training facts and train an SVD-factor editor on it (net.layers is ignored).
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
    saliency_rows: int = 20
    max_rows: int | None = None
    tracking_uri: str | None = None
    experiment: str = "editflow-editors"


def _salient_layer(spec: EditorTrainingSpec, loaded: Any, requests: list[Any], out: Path) -> int:
    """The SaLEM layer of the first `saliency_rows` facts (sharded over the training workers)."""
    from editing_core.saliency import SaliencyConfig, build_samples, write_saliency
    from tasks.saliency import sharded_saliency

    rows = requests[: spec.saliency_rows]
    samples = build_samples(loaded, rows)
    sums = sharded_saliency(spec.model, samples, SaliencyConfig(roles=spec.net.roles), spec.distributed.workers,
                            spec.distributed.cpus_per_worker, loaded, share_weights=True)
    write_saliency(sums, out / "saliency", f"saliency of {spec.model}", model=spec.model, facts=str(spec.facts), rows=len(rows))
    layer = sums.scores().chosen_layer
    log.info("salient layer: %d (of %d rows)", layer, len(rows))
    return layer


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
    missing = [i for i, r in enumerate(requests) if not r.locality_prompt]
    if missing:
        raise ValueError(f"{spec.facts}: rows {missing[:10]} have no locality prompt; MEND training needs one on every row")
    net = spec.net
    info: dict[str, Any] = {"facts": str(spec.facts), "rows": len(requests), "method": "mend"}
    loaded = load_model(spec.model)  # for the saliency and the hash of the weights the editor learns
    if spec.salient:
        layer = _salient_layer(spec, loaded, requests, out)
        net = replace(net, layers=(layer,), factors="svd")
        info.update(method="salem", salient_layer=layer)
    info["base_hash"] = weights_hash(loaded.model, [name for name, _, _ in net_targets(loaded, net)])
    del loaded
    result = train_editor(spec.model, requests, val, net, spec.train, spec.distributed, out, info, fail_once_at)
    plot_history(result.history, out / "training.png", f"{info['method']} editor for {spec.model}")
    if spec.tracking_uri:
        _log_to_mlflow(spec, net, info, result, out)
    return result


def _log_to_mlflow(spec: EditorTrainingSpec, net: MendNetConfig, info: dict[str, Any], result: TrainingResult, out: Path) -> None:
    from editing_core.config import config_to_dict
    from infra.tracking import flatten_params, tracked_run

    with tracked_run(spec.tracking_uri, spec.experiment, f"train-{info['method']}-editor",
                     tags={"kind": "editor_training", "method": info["method"], "base_model": spec.model}) as run:
        run.log_params(flatten_params({"net": config_to_dict(net), "train": asdict(spec.train),
                                       "distributed": asdict(spec.distributed), **{k: v for k, v in info.items() if k != "base_hash"}}))
        run.log_metric_series(result.history, "step")
        run.log_metrics({"train_seconds": result.seconds, **{f"final_{k}": v for k, v in result.history[-1].items()}})
        run.log_file(out / "training.png")
        run.log_file(out / "history.json")
        run.log_dir(result.editor_dir, "editor")
        if (out / "saliency").is_dir():
            run.log_dir(out / "saliency", "saliency")
        (out / "mlflow_run.json").write_text(json.dumps({"tracking_uri": spec.tracking_uri, "run_id": run.run_id}))
    log.info("editor training logged to MLflow run %s", run.run_id)

