"""MEND / SaLEM editor training on Ray Train, with DeepSpeed ZeRO (or plain DDP).

Every worker loads the frozen base model itself and builds the same editor network
(editing_core.editors.mend); only the editor is trained. With `zero_stage` 1-3 the editor is a
DeepSpeed engine (ZeRO partitions the optimizer state (1), also the gradients (2), also the
parameters (3) over the workers); `offload` moves the optimizer state (and with stage 3 the
parameters) to CPU memory and steps it with DeepSpeed's CPU Adam. `zero_stage` 0 is plain
torch DistributedDataParallel, the baseline the memory benchmark compares against.
Without a GPU: gloo and DeepSpeed's CPU accelerator; with GPUs: NCCL.

Checkpoints: every `checkpoint_every` steps each worker writes its part of the training state
(DeepSpeed's `save_checkpoint`; DDP: rank 0 writes model + optimizer) and reports it to Ray
Train, which keeps the files of all workers in one checkpoint directory; rank 0 adds the editor
as safetensors (`editor/`) and the metric history. A failed worker makes Ray Train restart the
group (FailureConfig), and every worker resumes from the latest checkpoint; running the same
command again (same --out) resumes a stopped run the same way, as Ray Train finds the run's
earlier checkpoints under the same name and storage path.

Before the first step of a fresh run, an editor with `whiten_keys` gets its key preconditioners
from the first `key_stats_rows` training facts (every worker computes them from the same rows),
and then the edit rates are calibrated on the preconditioned step; a resumed run takes both
from its checkpoint.

Validation (`val_rows`, every `val_every` steps) is split over the workers when the rows split
evenly. With `select_by`, rank 0 keeps the editor of the best validation so far and every
checkpoint carries it (`best_editor/`), so a resumed run keeps its choice; the run then ends
with that editor in `out/editor` and the last step's in `out/last_editor`. The lr schedule
(`lr_schedule`) is a function of the step alone, so it resumes exactly too.

DeepSpeed compiles two C++ ops the first time they are used on a machine (its CPU Adam and
its shared-memory communication op, about a minute each); `make install` builds both into
torch's extension cache (`python -m tasks.mend_train --build-ops`), so training never waits.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

STATE_TAG = "state"
HISTORY_NAME = "history.json"
CALIBRATION_NAME = "edit_lr_calibration.json"
LAST_EDITOR_DIR = "editor"  # in a checkpoint, and the editor a run ends with (out/editor)
BEST_EDITOR_DIR = "best_editor"  # in a checkpoint, with MendTrainConfig.select_by: the best validation's editor so far
OUT_LAST_EDITOR_DIR = "last_editor"  # out/last_editor, with select_by: the last step's editor
DDP_STATE_NAME = "ddp_state.pt"


@dataclass(frozen=True)
class DistributedConfig:
    """How the editor training is spread over Ray Train workers.

    workers:          Ray Train workers (each loads the base model).
    cpus_per_worker:  CPUs each worker reserves (and torch threads it runs).
    zero_stage:       DeepSpeed ZeRO stage 1, 2 or 3; 0 = plain DDP without DeepSpeed.
    offload:          offload the optimizer state (stage >= 1) and, for stage 3, the parameters
                      to CPU, stepped by DeepSpeed's CPU Adam.
    max_failures:     worker-group failures Ray Train recovers from (from the last checkpoint).
    use_gpu:          one GPU per worker (NCCL); None: when this machine's torch sees one.
    """

    workers: int = 2
    cpus_per_worker: int = 1
    zero_stage: int = 2
    offload: bool = False
    max_failures: int = 2
    use_gpu: bool | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 1:
            raise ValueError("workers and cpus_per_worker must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0 (plain DDP), 1, 2 or 3, got {self.zero_stage}")
        if self.offload and self.zero_stage == 0:
            raise ValueError("offload needs DeepSpeed ZeRO (zero_stage 1, 2 or 3)")
        if self.max_failures < 0:
            raise ValueError("max_failures must be >= 0")


def deepspeed_config(stage: int, offload: bool, batch_size: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config of one editor-training run (fp32: the editor is small, and the
    gradients it learns from are tiny)."""
    zero: dict[str, Any] = {"stage": stage}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_ops() -> None:
    """Compile DeepSpeed's CPU Adam and shared-memory comm ops into torch's extension cache."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    for builder in (CPUAdamBuilder(), ShareMemCommBuilder()):
        started = time.perf_counter()
        builder.load(verbose=False)
        print(f"DeepSpeed op {builder.name}: ready in {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------------------------------
# inside each Ray Train worker
# ---------------------------------------------------------------------------------------


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _step_rows(rows: Sequence[Any], seed: int, rank: int, step: int, batch_size: int) -> list[Any]:
    """The training rows of one worker at one step: a function of (seed, rank, step) only, so a
    resumed run sees exactly the rows the uninterrupted one would have."""
    rng = random.Random(f"{seed}:{rank}:{step}")
    return rng.sample(list(rows), min(batch_size, len(rows)))


class _Trainer:
    """The editor, its optimizer and its engine (DeepSpeed or DDP) on one worker."""

    def __init__(self, net: Any, train: Any, dist: DistributedConfig, device: Any):
        import torch

        from editing_core.editors.mend import parameter_groups

        self.net, self.dist = net.to(device), dist
        groups = parameter_groups(net, train)
        if dist.zero_stage == 0:
            from torch.nn.parallel import DistributedDataParallel

            self.optimizer = self.base_optimizer = torch.optim.Adam(groups)
            ids = [device.index] if device.type == "cuda" else None
            self.engine = DistributedDataParallel(net, device_ids=ids)  # rank 0's running norm stats win
            self.grad_clip = train.grad_clip
        else:
            import deepspeed

            if dist.offload:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(groups)
            else:
                optimizer = torch.optim.Adam(groups)
            config = deepspeed_config(dist.zero_stage, dist.offload, train.batch_size, train.grad_clip)
            self.base_optimizer = optimizer  # ZeRO steps the base optimizer's param groups: their lr is the one used
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
        self.initial_lrs = [group["lr"] for group in self.base_optimizer.param_groups]

    def set_lr(self, factor: float) -> None:
        """Every optimizer group at `factor` times its initial lr (the lr schedule)."""
        for group, initial in zip(self.base_optimizer.param_groups, self.initial_lrs):
            group["lr"] = initial * factor

    def step(self, loss: Any) -> None:
        import torch

        if self.dist.zero_stage == 0:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
            self.optimizer.step()
        else:
            self.engine.backward(loss)
            self.engine.step()

    def save(self, directory: Path, step: int, rank: int) -> None:
        """This worker's part of the training state (collective under DeepSpeed)."""
        import torch

        if self.dist.zero_stage == 0:
            if rank == 0:
                torch.save({"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}, directory / DDP_STATE_NAME)
        else:
            self.engine.save_checkpoint(str(directory), tag=STATE_TAG, client_state={"step": step})

    def load(self, directory: Path) -> int:
        """Restore from a checkpoint directory; returns the step it was taken at."""
        import torch

        if self.dist.zero_stage == 0:
            state = torch.load(directory / DDP_STATE_NAME, map_location="cpu", weights_only=False)
            self.net.load_state_dict(state["net"])
            self.optimizer.load_state_dict(state["optimizer"])
            return int(state["step"])
        _, client = self.engine.load_checkpoint(str(directory), tag=STATE_TAG)
        return int(client["step"])

    def full_state_net(self) -> Any:
        """A context in which `self.net` holds its full parameters (gathers ZeRO-3 partitions)."""
        from contextlib import nullcontext

        if self.dist.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.net.parameters()), modifier_rank=None)
        return nullcontext()


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch
    import torch.distributed as torch_dist

    if not torch_dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return tensor.tolist()


def _whiten(net: Any, loaded: Any, rows: Sequence[Any]) -> None:
    """Set the editor's key preconditioners from the texts of `rows` (MendNetConfig.whiten_keys)."""
    from editing_core.data import EditRequest
    from editing_core.editors.mend import key_second_moments, key_texts, set_key_preconditioners

    started = time.perf_counter()
    texts = key_texts([EditRequest.from_dict(r) for r in rows])
    set_key_preconditioners(net, key_second_moments(loaded, net.param_names, texts))
    log.info("key preconditioners from %d texts in %.1f s", len(texts), time.perf_counter() - started)


def _calibrate(net: Any, loaded: Any, rows: Sequence[Any], train: Any, rank: int) -> list[float]:
    """Start the edit rates at their best plain-gradient values (`calibrate_edit_rates` on the
    first `calibration_rows` training facts); every rank takes rank 0's choice."""
    import torch

    from editing_core.data import EditRequest
    from editing_core.editors.mend import calibrate_edit_rates, training_batches

    chosen = [0.0] * len(net.edit_lrs)
    if rank == 0:
        requests = [EditRequest.from_dict(r) for r in rows[: train.calibration_rows]]
        batches = training_batches(loaded, requests, train)
        started = time.perf_counter()
        records = calibrate_edit_rates(net, loaded, batches, train)
        chosen = net.edit_lrs.tolist()
        log.info("edit rates calibrated in %.1f s on %d facts: %s (grid losses: %s)", time.perf_counter() - started,
                 len(requests), chosen, [(r["slot"], r["edit_lr"], round(r["loss"], 4)) for r in records])
    chosen = _all_reduce(chosen)
    with torch.no_grad():
        net.edit_lrs.copy_(torch.tensor(chosen, dtype=net.edit_lrs.dtype))
    return [float(f"{x:.6g}") for x in chosen]  # float32 -> the grid's decimal values, for the editor document


def _validate(trainer: _Trainer, loaded: Any, rows: Sequence[Any], train: Any, rank: int, world: int) -> dict[str, float]:
    """Mean MEND loss parts over the validation rows. When the rows split evenly, each worker
    scores its share and the sums are all-reduced; otherwise every worker scores all of them
    (the editor's forward is collective under DDP and ZeRO-3: every worker must run as many)."""
    from editing_core.editors.mend import mend_loss, training_batches

    shard = rows[rank::world] if len(rows) % world == 0 else rows
    totals: dict[str, float] = {}
    trainer.net.eval()
    for batch in training_batches(loaded, shard, train):
        _, parts = mend_loss(trainer.net, loaded, batch, train, call=trainer.engine)
        for key, value in parts.items():
            totals[key] = totals.get(key, 0.0) + value * len(batch.requests)
    trainer.net.train()
    keys = sorted(totals)
    sums = _all_reduce([totals[k] for k in keys]) if shard is not rows else [totals[k] for k in keys]
    return {f"val_{k}": v / len(rows) for k, v in zip(keys, sums)}


def _selected_value(best_dir: Path, metric: str) -> float | None:
    """The validation value of `metric` that chose the editor in `best_dir`, from its document;
    None when there is none, or it was chosen by another metric (selection then starts afresh)."""
    from editing_core.editors.mend import NET_CONFIG_NAME

    path = best_dir / NET_CONFIG_NAME
    if not path.exists():
        return None
    document = json.loads(path.read_text())
    return document["metrics"][f"val_{metric}"] if document.get("selected_by") == f"val_{metric}" else None


def train_loop(config: dict) -> None:
    """The Ray Train worker function (`train_loop_config` is `config`)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    from tqdm.auto import tqdm

    from editing_core.data import EditRequest
    from editing_core.editors.mend import (NET_CONFIG_NAME, MendNetConfig, MendTrainConfig, build_net, is_better, lr_factor,
                                           mend_loss, save_net, training_batch)
    from editing_core.models import load_model

    dist = DistributedConfig(**config["distributed"])
    net_config = MendNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["net"].items()})
    train = MendTrainConfig(**config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(dist.cpus_per_worker)
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")

    loaded = load_model(config["model"], device=str(device) if device.type == "cuda" else None)
    loaded.model.eval().requires_grad_(False)
    rows = [EditRequest.from_dict(r) for r in config["rows"]][rank::world]
    val_rows = [EditRequest.from_dict(r) for r in config["val_rows"]]
    net = build_net(loaded, net_config, seed=train.seed).train()
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint and net_config.whiten_keys:  # every rank, from the same rows: the same matrices
        _whiten(net, loaded, config["rows"][: train.key_stats_rows])
    if not checkpoint and train.edit_lr_grid:
        config["info"]["edit_lr_calibration"] = _calibrate(net, loaded, config["rows"], train, rank)
    trainer = _Trainer(net, train, dist, device)

    start, history = 0, []
    best_dir = Path(tempfile.mkdtemp(prefix="best_editor_"))  # rank 0's copy of the selected editor
    if checkpoint:
        with checkpoint.as_directory() as directory:
            start = trainer.load(Path(directory))
            history = json.loads((Path(directory) / HISTORY_NAME).read_text())
            if (Path(directory) / CALIBRATION_NAME).exists():  # the editor document keeps the starting rates
                config["info"]["edit_lr_calibration"] = json.loads((Path(directory) / CALIBRATION_NAME).read_text())
            if (Path(directory) / BEST_EDITOR_DIR).is_dir():
                shutil.copytree(Path(directory) / BEST_EDITOR_DIR, best_dir, dirs_exist_ok=True)
        log.info("worker %d resumed at step %d", rank, start)
    best = _selected_value(best_dir, train.select_by) if train.select_by else None

    window: dict[str, float] = {}
    window_start = time.perf_counter()
    steps = tqdm(range(start + 1, train.steps + 1), desc="editor training", unit="step", initial=start,
                 total=train.steps, disable=rank != 0, mininterval=30)  # one bar: rank 0's
    for step in steps:
        if config.get("fail_once_at") == step and rank == world - 1 and not Path(config["fail_marker"]).exists():
            Path(config["fail_marker"]).write_text(f"worker {rank} killed itself at step {step}\n")
            os._exit(1)  # an injected worker crash: Ray Train restarts the group from the last checkpoint
        batch = training_batch(loaded, _step_rows(rows, train.seed, rank, step, train.batch_size), train.locality_positions)
        loss, parts = mend_loss(trainer.net, loaded, batch, train, call=trainer.engine)
        trainer.set_lr(lr_factor(train, step))
        trainer.step(loss)
        for key, value in parts.items():
            window[key] = window.get(key, 0.0) + value

        if step % train.checkpoint_every == 0 or step == train.steps:
            count = train.checkpoint_every if step % train.checkpoint_every == 0 else step % train.checkpoint_every
            keys = sorted(window)
            means = [v / (count * world) for v in _all_reduce([window[k] for k in keys])]
            metrics: dict[str, float] = {"step": step, **dict(zip(keys, means))}
            metrics["seconds_per_step"] = (time.perf_counter() - window_start) / count
            metrics["lr"] = train.lr * lr_factor(train, step)
            metrics["peak_rss_mib"] = _all_reduce([_peak_rss_mib()], op="max")[0]
            if device.type == "cuda":
                metrics["peak_cuda_mib"] = _all_reduce([torch.cuda.max_memory_allocated(device) / 2**20], op="max")[0]
            if val_rows and (step == train.steps or (train.val_every and step % train.val_every == 0)):
                metrics.update(_validate(trainer, loaded, val_rows, train, rank, world))
            history.append(metrics)
            selected = train.select_by and f"val_{train.select_by}" in metrics and is_better(
                train.select_by, metrics[f"val_{train.select_by}"], best)
            if selected:
                best = metrics[f"val_{train.select_by}"]
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp)
                trainer.save(directory, step, rank)
                document = {**config["info"], "trained_steps": step, "metrics": metrics}
                with trainer.full_state_net():
                    if rank == 0:
                        save_net(trainer.net, directory / LAST_EDITOR_DIR, document)
                        if selected:
                            save_net(trainer.net, best_dir, {**document, "selected_by": f"val_{train.select_by}"})
                if rank == 0:
                    if (best_dir / NET_CONFIG_NAME).exists():
                        shutil.copytree(best_dir, directory / BEST_EDITOR_DIR)
                    (directory / HISTORY_NAME).write_text(json.dumps(history))
                    if "edit_lr_calibration" in config["info"]:
                        (directory / CALIBRATION_NAME).write_text(json.dumps(config["info"]["edit_lr_calibration"]))
                has_files = any(directory.iterdir())
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
            window, window_start = {}, time.perf_counter()
    shutil.rmtree(best_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------


@dataclass
class TrainingResult:
    """What a finished training run left: the editor directory, the metric history, the
    directory of Ray Train's checkpoints, how long the fit took and the step whose editor
    `editor_dir` holds (the last one, or the best validation's with `select_by`)."""

    editor_dir: Path
    history: list[dict[str, float]]
    storage: Path
    seconds: float
    selected_step: int


def train_editor(model: str, rows: Sequence[Any], val_rows: Sequence[Any], net: Any, train: Any,
                 dist: DistributedConfig, out: str | Path, info: Mapping[str, Any] | None = None,
                 fail_once_at: int | None = None) -> TrainingResult:
    """Train a MEND editor for `model` on the requests `rows` with Ray Train; Ray must be
    initialised. Writes `out/editor` (the trained editor: the last step's, or with
    `train.select_by` the best validation's, the last one then also in `out/last_editor`) and
    `out/history.json`; Ray Train's run (checkpoints) lives in `out/ray_train`, which is also
    where a rerun resumes from.
    `fail_once_at` kills the last worker once at that step (to test recovery)."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from editing_core.config import config_to_dict

    if train.select_by and not val_rows:
        raise ValueError(f"select_by={train.select_by!r} chooses the editor by validation: give validation rows (--val)")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    use_gpu = torch.cuda.is_available() if dist.use_gpu is None else dist.use_gpu
    loop_config = {
        "model": model,
        "rows": [r.to_dict() for r in rows],
        "val_rows": [r.to_dict() for r in val_rows],
        "net": config_to_dict(net),
        "train": asdict(train),
        "distributed": asdict(dist),
        "info": {"base_model": model, **(info or {}), "train": asdict(train), "distributed": asdict(dist)},
        "fail_once_at": fail_once_at,
        "fail_marker": str(out / "injected_failure.txt"),
    }
    env = {"DS_ACCELERATOR": "cpu"} if not use_gpu else {}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=dist.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": dist.cpus_per_worker}),
        run_config=RunConfig(
            name="editor",
            storage_path=str(out / "ray_train"),
            failure_config=FailureConfig(max_failures=dist.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"editor training produced no checkpoint (see {out / 'ray_train'})")
    from editing_core.editors.mend import NET_CONFIG_NAME

    with result.checkpoint.as_directory() as directory:
        copies = {"editor": LAST_EDITOR_DIR}
        if train.select_by:
            copies = {"editor": BEST_EDITOR_DIR, OUT_LAST_EDITOR_DIR: LAST_EDITOR_DIR}
        for target, source in copies.items():
            if (out / target).exists():
                shutil.rmtree(out / target)
            shutil.copytree(Path(directory) / source, out / target)
        history = json.loads((Path(directory) / HISTORY_NAME).read_text())
    (out / HISTORY_NAME).write_text(json.dumps(history, indent=2))
    selected_step = int(json.loads((out / "editor" / NET_CONFIG_NAME).read_text())["trained_steps"])
    if train.select_by:
        log.info("editor of step %d selected by val_%s (last step %d in %s)", selected_step, train.select_by,
                 history[-1]["step"], out / OUT_LAST_EDITOR_DIR)
    return TrainingResult(out / "editor", history, out / "ray_train", seconds, selected_step)


def plot_history(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "MEND editor training") -> Path:
    """Training (and validation) loss, edit NLL and edit accuracy against the step."""
    return plot_histories({"": history}, path, title)


def plot_histories(runs: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                   title: str = "MEND editor training") -> Path:
    """`plot_history` of several runs on the same axes, one colour per run (label -> history)."""
    from editing_core.plotting import agg_figure

    figure = agg_figure((11, 3.4))
    panels = [("loss", "loss"), ("edit_nll", "edit NLL (prompt + rephrases)"), ("edit_accuracy", "edit accuracy")]
    for index, (key, label) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, index)
        for run, (name, history) in enumerate(runs.items()):
            colour = f"C{2 * run}"
            axes.plot([h["step"] for h in history], [h[key] for h in history], color=colour, label=f"{name} train".strip())
            val = [(h["step"], h[f"val_{key}"]) for h in history if f"val_{key}" in h]
            if val:
                axes.plot(*zip(*val), color=f"C{2 * run + 1}", marker="s", markersize=3, label=f"{name} val".strip())
        axes.set_xlabel("step")
        axes.set_title(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--build-ops"]:
        build_ops()
    else:
        sys.exit("usage: python -m tasks.mend_train --build-ops")
