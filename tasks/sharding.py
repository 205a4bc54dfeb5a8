"""Sharded scoring on Ray: N workers each load the model once, score their share of the work
items and return sums; the driver adds them up.

A scorer is a module-level function `scorer(loaded, items, options) -> partial result` whose
result is a sum over its items (never a mean), so adding the partial results of any split of
the items gives the same total: scores do not depend on the worker count.

    results = run_sharded("smollm2-135m", score_items, items, options, workers=2)

workers=0 runs the scorer in this process (no Ray). With workers >= 1 each worker is a Ray
actor reserving `cpus_per_worker` CPUs and running that many torch threads; Ray must be
initialised by the caller (see `ray_connected`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Scorer = Callable[[Any, list, dict], Any]


def scorer_options(config: Any, workers: int) -> dict:
    """A scorer's config dataclass as the plain options sent to the workers. Progress bars
    inside Ray workers would interleave: there the driver shows one over the shards instead."""
    from dataclasses import asdict

    options = asdict(config)
    options["progress"] = bool(options.get("progress")) and workers == 0
    return options


def split_round_robin(items: Sequence[Item], parts: int) -> list[list[Item]]:
    """`parts` shards of `items`, item i in shard i % parts: each shard gets a like mix of
    items (short and long prompts alike), so the workers finish together. Empty shards dropped."""
    if parts < 1:
        raise ValueError(f"the number of shards must be >= 1, got {parts}")
    return [shard for shard in (list(items[i::parts]) for i in range(parts)) if shard]


class ShardWorker:
    """One process holding one loaded model; `score` runs a scorer on a shard of items."""

    def __init__(self, model_name: str, threads: int = 1) -> None:
        import torch

        from editing_core.models import load_model

        torch.set_num_threads(max(1, threads))
        self.loaded = load_model(model_name)

    def score(self, scorer: Scorer, items: list, options: dict) -> Any:
        return scorer(self.loaded, items, options)


@contextmanager
def ray_connected(address: str | None = None, cpus_needed: float = 0.0, what: str = "the work",
                  error: type[Exception] = ValueError) -> Iterator[bool]:
    """Use the caller's Ray session if there is one; else start (and on exit shut down) a local
    cluster, or connect to `address` / $RAY_ADDRESS. Yields True when this call started Ray.

    A local cluster this call started with fewer CPUs than `cpus_needed` is refused (`error`,
    naming `what`); otherwise that only warns (a remote cluster may autoscale)."""
    import ray

    started = False
    if not ray.is_initialized():
        local = not address and not os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"include_dashboard": False} if local else {}
        log.info("starting Ray %s", "locally" if local else f"connection to {address or os.environ['RAY_ADDRESS']}")
        ray.init(address=address or None, logging_level=logging.WARNING, **kwargs)
        started = True
    elif address:
        log.warning("Ray is already initialised by the caller; ignoring address %r", address)
    try:
        available = ray.cluster_resources().get("CPU", 0.0)
        if cpus_needed > available:
            message = f"{what} asks for {cpus_needed:g} CPUs but the Ray cluster has {available:g}"
            if started and not address and not os.environ.get("RAY_ADDRESS"):
                raise error(message)
            log.warning("%s; it waits until the cluster grows", message)
        yield started
    finally:
        if started:
            ray.shutdown()


class WorkerPool:
    """`workers` ShardWorker actors that stay loaded between calls (see `worker_pool`)."""

    def __init__(self, model_name: str, workers: int, cpus_per_worker: float = 1.0) -> None:
        import ray

        if workers < 1:
            raise ValueError(f"a worker pool needs at least 1 worker, got {workers}")
        actor = ray.remote(ShardWorker).options(num_cpus=cpus_per_worker, max_restarts=0)
        self.actors = [actor.remote(model_name, max(1, int(cpus_per_worker))) for _ in range(workers)]

    def run(self, scorer: Scorer, items: Sequence[Any], options: dict, progress: bool = True) -> list[Any]:
        """The scorer's partial results over round-robin shards of `items`, one per non-empty shard."""
        import ray

        shards = split_round_robin(items, len(self.actors))
        pending = {actor.score.remote(scorer, shard, options): i for i, (actor, shard) in enumerate(zip(self.actors, shards))}
        results: list[Any] = [None] * len(shards)
        with tqdm(total=len(shards), desc=f"{len(shards)} Ray worker(s)", unit="shard", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = get_unwrapped(done[0])
                bar.update()
        return results

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


@contextmanager
def worker_pool(model_name: str, workers: int, cpus_per_worker: float = 1.0) -> Iterator[WorkerPool]:
    """Start `workers` Ray actors that each load the model once; killed on exit. Ray must be
    initialised."""
    pool = WorkerPool(model_name, workers, cpus_per_worker)
    try:
        yield pool
    finally:
        pool.close()


def run_sharded(model_name: str, scorer: Scorer, items: Sequence[Any], options: dict, workers: int,
                cpus_per_worker: float = 1.0, loaded: Any = None, progress: bool = True) -> list[Any]:
    """The scorer's partial results over `workers` round-robin shards of `items` (one result
    per non-empty shard, in shard order). workers=0: one shard, scored in this process on
    `loaded` (or a model loaded here). Ray must be initialised when workers >= 1; the workers
    live for this call only (use `worker_pool` to keep them for several)."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: in this process), got {workers}")
    if workers == 0:
        if loaded is None:
            from editing_core.models import load_model

            loaded = load_model(model_name)
        return [scorer(loaded, list(items), options)]
    with worker_pool(model_name, min(workers, max(1, len(items))), cpus_per_worker) as pool:
        return pool.run(scorer, items, options, progress)


def get_unwrapped(ref: Any) -> Any:
    """`ray.get`, re-raising an exception from the worker as itself (its Ray wrapper as the cause)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from exc
        raise
