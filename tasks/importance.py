"""Head / FFN importance sharded on Ray: every (task, shots, row) is one work item.

Workers score their items with `editing_core.importance` and return sums per (task, shots);
the driver adds them, so the scores are the same for any number of workers (and the same as
in one process). `sharded_importance` gives the gradient scores, `sharded_ablation` the exact
ablation reference, both as {(task name, shots): sums}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from editing_core.importance import (
    AblationScores,
    ImportanceConfig,
    ImportanceSums,
    Task,
    TaskRow,
    ablation_scores,
    importance_sums,
    select_rows,
)

from .sharding import WorkerPool, run_sharded, scorer_options

Key = tuple[str, int]  # (task name, shots)


@dataclass(frozen=True)
class ScoreItem:
    task: str
    shots: int
    row: TaskRow


def score_items(tasks: Sequence[Task], shots_list: Sequence[int], config: ImportanceConfig) -> list[ScoreItem]:
    """One item per (task, shots, row), rows limited by config.max_rows."""
    for task in tasks:
        if max(shots_list) > task.max_shots:
            raise ValueError(f"task {task.name!r}: {max(shots_list)} shots asked, its rows have only {task.max_shots} examples")
    return [ScoreItem(task.name, shots, row) for task in tasks for shots in shots_list for row in select_rows(task, config)]


def _grouped(items: Sequence[ScoreItem]) -> dict[Key, list[TaskRow]]:
    groups: dict[Key, list[TaskRow]] = {}
    for item in items:
        groups.setdefault((item.task, item.shots), []).append(item.row)
    return groups


def importance_shard(loaded: Any, items: list[ScoreItem], options: dict) -> dict[Key, ImportanceSums]:
    """Gradient importance sums of one shard, per (task, shots)."""
    config = ImportanceConfig(**options)
    return {key: importance_sums(loaded, rows, key[1], config) for key, rows in _grouped(items).items()}


def ablation_shard(loaded: Any, items: list[ScoreItem], options: dict) -> dict[Key, AblationScores]:
    """Exact ablation sums of one shard, per (task, shots)."""
    config = ImportanceConfig(**options)
    return {key: ablation_scores(loaded, rows, key[1], config) for key, rows in _grouped(items).items()}


def _merged(partials: Sequence[dict[Key, Any]]) -> dict[Key, Any]:
    total: dict[Key, Any] = {}
    for partial in partials:
        for key, value in partial.items():
            total[key] = total[key] + value if key in total else value
    return total


def sharded_importance(model_name: str, tasks: Sequence[Task], shots_list: Sequence[int], config: ImportanceConfig,
                       workers: int, cpus_per_worker: float = 1.0, loaded: Any = None,
                       pool: WorkerPool | None = None) -> dict[Key, ImportanceSums]:
    """Gradient importance sums per (task, shots) over `workers` Ray workers (0: this process;
    `pool`: these already started workers)."""
    items = score_items(tasks, shots_list, config)
    if pool is not None:
        return _merged(pool.run(importance_shard, items, scorer_options(config, len(pool.actors)), config.progress))
    partials = run_sharded(model_name, importance_shard, items, scorer_options(config, workers), workers, cpus_per_worker, loaded, config.progress)
    return _merged(partials)


def sharded_ablation(model_name: str, tasks: Sequence[Task], shots_list: Sequence[int], config: ImportanceConfig,
                     workers: int, cpus_per_worker: float = 1.0, loaded: Any = None,
                     pool: WorkerPool | None = None) -> dict[Key, AblationScores]:
    """Exact ablation scores per (task, shots), sharded like `sharded_importance`."""
    items = score_items(tasks, shots_list, config)
    if pool is not None:
        return _merged(pool.run(ablation_shard, items, scorer_options(config, len(pool.actors)), config.progress))
    partials = run_sharded(model_name, ablation_shard, items, scorer_options(config, workers), workers, cpus_per_worker, loaded, config.progress)
    return _merged(partials)
