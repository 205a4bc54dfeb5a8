"""SaLEM layer saliency sharded on Ray: every sample of the edit dataset is one work item.

Workers score their share of the samples with `editing_core.saliency` and return sums (never
means); the driver adds them, so the scores are the same for any number of workers and the
same as in one process.

    samples = build_samples(loaded, requests, heldout)            # in the driver: needs the model
    sums = sharded_saliency(model, samples, config, workers=2, loaded=loaded, share_weights=True)

Where the workers' weights come from:
- by name (default, `run_sharded`): each worker loads the model itself, from the local cache
  or hub of the node it runs on;
- share_weights=True with the driver's `loaded` model: the driver puts the model (its
  state_dict as numpy arrays, plus its config and tokenizer) in the Ray object store ONCE,
  and every worker builds its model from that one copy (numpy arrays are read zero-copy from
  the object store) instead of reading the weights from disk. Nodes then need no model files.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from editing_core.saliency import SaliencyConfig, SaliencySums, Sample, saliency_sums

from .sharding import ShardWorker, WorkerPool, run_sharded, scorer_options


def saliency_shard(loaded: Any, items: list[Sample], options: dict) -> SaliencySums:
    """The saliency sums of one shard of samples (a scorer for `run_sharded`)."""
    return saliency_sums(loaded, items, SaliencyConfig(**options))


# ---------------------------------------------------------------------------------------
# the model through the object store
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSnapshot:
    """Everything a worker needs to rebuild a loaded model, as plain picklable data.

    name:      the model's name (as the user gave it).
    config:    the transformers config object.
    tokenizer: the tokenizer object.
    arrays:    state_dict entry -> numpy array (tensors sharing storage, e.g. tied embeddings,
               map to the same array object, so the object store holds them once).
    dtypes:    state_dict entry -> torch dtype name, for the entries numpy cannot hold (bfloat16
               travels as its int16 bit pattern).
    dtype:     the dtype of the model's parameters ("float32", "bfloat16", ...).
    """

    name: str
    config: Any
    tokenizer: Any
    arrays: dict[str, Any]
    dtypes: dict[str, str]
    dtype: str


def snapshot_model(loaded: Any) -> ModelSnapshot:
    """The model's weights as numpy arrays (views of the tensors: no copy here)."""
    import torch

    arrays: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    seen: dict[tuple[int, torch.dtype, tuple[int, ...]], Any] = {}
    for name, tensor in loaded.model.state_dict().items():
        tensor = tensor.detach().cpu()
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in seen:
            if tensor.dtype == torch.bfloat16:
                seen[key] = tensor.view(torch.int16).numpy()
            else:
                seen[key] = tensor.numpy()
        arrays[name] = seen[key]
        if tensor.dtype == torch.bfloat16:
            dtypes[name] = "bfloat16"
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return ModelSnapshot(loaded.name, loaded.model.config, loaded.tokenizer, arrays, dtypes, dtype)


def model_from_snapshot(snapshot: ModelSnapshot) -> Any:
    """A LoadedModel (eval mode, gradients off) built from the config and the snapshot's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from editing_core.models import LoadedModel
    from editing_core.models.adapter import ModelAdapter

    state = {}
    with warnings.catch_warnings():
        # arrays from the object store are read-only; they are only read (copied into the model)
        warnings.filterwarnings("ignore", message=".*not writable.*")
        for name, array in snapshot.arrays.items():
            tensor = torch.from_numpy(array)
            state[name] = tensor.view(torch.bfloat16) if snapshot.dtypes.get(name) == "bfloat16" else tensor
    model = AutoModelForCausalLM.from_config(snapshot.config, dtype=getattr(torch, snapshot.dtype))
    model.load_state_dict(state, strict=True)  # copies into the model's own tensors
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=snapshot.tokenizer, adapter=ModelAdapter.for_model(model), name=snapshot.name)


class SnapshotWorker(ShardWorker):
    """A ShardWorker whose model is built from a `ModelSnapshot` (resolved by Ray from the
    object store) instead of loaded by name."""

    def __init__(self, snapshot: ModelSnapshot, threads: int = 1) -> None:
        import torch

        # not super().__init__(): that loads the model by name
        torch.set_num_threads(max(1, threads))
        self.loaded = model_from_snapshot(snapshot)


class SnapshotPool(WorkerPool):
    """A WorkerPool of `SnapshotWorker`s sharing one object-store copy of the driver's model."""

    def __init__(self, loaded: Any, workers: int, cpus_per_worker: float = 1.0) -> None:
        import ray

        # not super().__init__(): its workers load the model by name
        if workers < 1:
            raise ValueError(f"a worker pool needs at least 1 worker, got {workers}")
        snapshot = ray.put(snapshot_model(loaded))  # once, whatever the number of workers and tasks
        actor = ray.remote(SnapshotWorker).options(num_cpus=cpus_per_worker, max_restarts=0)
        self.actors = [actor.remote(snapshot, max(1, int(cpus_per_worker))) for _ in range(workers)]


@contextmanager
def snapshot_pool(loaded: Any, workers: int, cpus_per_worker: float = 1.0) -> Iterator[SnapshotPool]:
    """`workers` Ray actors built from one object-store copy of `loaded`; killed on exit."""
    pool = SnapshotPool(loaded, workers, cpus_per_worker)
    try:
        yield pool
    finally:
        pool.close()


# ---------------------------------------------------------------------------------------
# the sharded scoring
# ---------------------------------------------------------------------------------------


def sharded_saliency(model_name: str, samples: Sequence[Sample], config: SaliencyConfig, workers: int,
                     cpus_per_worker: float = 1.0, loaded: Any = None, share_weights: bool = False) -> SaliencySums:
    """Saliency sums of `samples` over `workers` Ray workers (0: this process, on `loaded` or
    a model loaded here). share_weights (workers >= 1, needs `loaded`): the workers build their
    model from one object-store copy of `loaded` instead of loading `model_name`. Ray must be
    initialised when workers >= 1 (`tasks.sharding.ray_connected`)."""
    if not samples:
        raise ValueError("no samples to score")
    options = scorer_options(config, workers)
    if workers >= 1 and share_weights:
        if loaded is None:
            raise ValueError("share_weights needs the driver's loaded model (`loaded`)")
        with snapshot_pool(loaded, min(workers, len(samples)), cpus_per_worker) as pool:
            return SaliencySums.reduce(pool.run(saliency_shard, samples, options, config.progress))
    partials = run_sharded(model_name, saliency_shard, samples, options, workers, cpus_per_worker, loaded, config.progress)
    return SaliencySums.reduce(partials)
