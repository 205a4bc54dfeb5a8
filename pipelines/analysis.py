"""Model analysis end to end: importance scores (sharded on Ray), pruning curves and the pruned
model, induction heads. One implementation behind `editflow importance`, `editflow prune` and
the `prune` pipeline.

    scores = score_model(model, tasks, (0, 5), config, workers=2, ablation=True, induction=InductionConfig())
    write_scores(scores, out)                    # importance.json, heads.png, ffn.png, induction.png
    pruned = prune_model(loaded, tasks, (0, 5), scores.head, scores.ffn, heads=0.5, ffn=0.2, ...)
    write_pruning(pruned, out)                   # prune.json, curves.json, curves.png, artifact/

With workers >= 1 the caller holds a Ray session (`tasks.sharding.ray_connected`).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from editing_core.importance import (
    ImportanceConfig,
    ImportanceSums,
    Task,
    masks_curve,
    plot_ffn_bars,
    plot_head_heatmap,
    plot_pruning_curves,
    prune_masks,
    pruned_artifact,
    removable_share,
    select_rows,
    spearman,
    iterative_head_masks,
)
from tasks.importance import sharded_ablation, sharded_importance
from tasks.sharding import worker_pool

if TYPE_CHECKING:  # pragma: no cover - typing only
    from editing_core.artifacts import WeightDeltaArtifact
    from editing_core.induction import InductionConfig, InductionScores
    from editing_core.models import LoadedModel

SCORES_JSON = "importance.json"


# ---------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------


@dataclass
class ModelScores:
    """Importance of every head (L, H) and FFN (L,) over all tasks and shots, with what went in.

    head / ffn: mean over all scored tokens of |z . dL/dz| (the reduce of every (task, shots)).
    head_taylor / ffn_taylor: first-order estimates of the loss increase per row when a unit
        is removed alone (see ImportanceSums.head_taylor).
    by_key: the sums per (task, shots); ablation: the exact reference per (task, shots), if run.
    """

    model: str
    tasks: list[str]
    shots: list[int]
    config: ImportanceConfig
    workers: int
    head: torch.Tensor
    ffn: torch.Tensor
    head_taylor: torch.Tensor
    ffn_taylor: torch.Tensor
    by_key: dict[tuple[str, int], ImportanceSums]
    seconds: dict[str, float] = field(default_factory=dict)
    ablation: dict[str, Any] | None = None
    induction: "InductionScores | None" = None
    overlap: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "model": self.model, "tasks": self.tasks, "shots": self.shots, "config": asdict(self.config),
            "workers": self.workers, "layers": self.head.shape[0], "heads": self.head.shape[1],
            "head_scores": self.head.tolist(), "ffn_scores": self.ffn.tolist(),
            "head_taylor": self.head_taylor.tolist(), "ffn_taylor": self.ffn_taylor.tolist(),
            "by_task": [
                {"task": task, "shots": shots, "rows": sums.rows, "accuracy": sums.accuracy,
                 "mean_nll": sums.nll_sum / max(sums.rows, 1),
                 "head_scores": sums.head_scores().tolist(), "ffn_scores": sums.ffn_scores().tolist()}
                for (task, shots), sums in self.by_key.items()
            ],
            "seconds": self.seconds,
        }
        if self.ablation is not None:
            document["ablation"] = self.ablation
        if self.induction is not None:
            document["induction"] = {**self.induction.to_json(), "overlap_with_importance": self.overlap}
        return document


def score_model(model_name: str, tasks: Sequence[Task], shots_list: Sequence[int], config: ImportanceConfig,
                workers: int = 0, cpus_per_worker: float = 1.0, loaded: "LoadedModel | None" = None,
                ablation: bool = False, induction: "InductionConfig | None" = None, top_k: int | None = None) -> ModelScores:
    """Gradient importance of every head and FFN on `tasks` at each shots count, over `workers`
    Ray workers (0: this process, on `loaded`; the workers load the model once for both
    scorings); optionally the exact ablation reference (its
    Spearman correlation with the gradient scores and its cost) and induction-head scores (their
    top-k overlap with the top-k important heads; k defaults to a tenth of all heads)."""
    if not tasks:
        raise ValueError("no tasks to score")
    with worker_pool(model_name, workers, cpus_per_worker) if workers else nullcontext() as pool:
        started = time.perf_counter()
        by_key = sharded_importance(model_name, tasks, shots_list, config, workers, cpus_per_worker, loaded, pool)
        seconds = {"gradient": time.perf_counter() - started}
        total = ImportanceSums.reduce(list(by_key.values()))
        scores = ModelScores(model_name, [t.name for t in tasks], list(shots_list), config, workers,
                             total.head_scores(), total.ffn_scores(), total.head_taylor(), total.ffn_taylor(), by_key, seconds)
        if ablation:
            started = time.perf_counter()
            parts = sharded_ablation(model_name, tasks, shots_list, config, workers, cpus_per_worker, loaded, pool)
            seconds["ablation"] = time.perf_counter() - started
            scores.ablation = _ablation_summary(list(parts.values()), scores, seconds)
    if induction is not None:
        from editing_core.induction import induction_scores, overlap, top_heads

        if loaded is None:
            from editing_core.models import load_model

            loaded = load_model(model_name)
        started = time.perf_counter()
        scores.induction = induction_scores(loaded, induction)
        seconds["induction"] = time.perf_counter() - started
        k = top_k or max(1, round(0.1 * scores.head.numel()))
        scores.overlap = {"k": k, **overlap(top_heads(scores.induction.prefix_matching, k), top_heads(scores.head, k))}
    return scores


def _ablation_summary(parts: list[Any], scores: ModelScores, seconds: dict[str, float]) -> dict[str, Any]:
    """The ablation reference reduced over (task, shots), and how the gradient scores rank against it."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return {
        "base_accuracy": total.base_accuracy,
        "head_accuracy_drop": total.head_accuracy_drop.tolist(), "head_nll_increase": total.head_nll_increase.tolist(),
        "ffn_accuracy_drop": total.ffn_accuracy_drop.tolist(), "ffn_nll_increase": total.ffn_nll_increase.tolist(),
        "spearman": {
            "heads_vs_nll_increase": spearman(scores.head, total.head_nll_increase),
            "heads_vs_accuracy_drop": spearman(scores.head, total.head_accuracy_drop),
            "ffn_vs_nll_increase": spearman(scores.ffn, total.ffn_nll_increase),
            "ffn_vs_accuracy_drop": spearman(scores.ffn, total.ffn_accuracy_drop),
            "taylor_heads_vs_nll_increase": spearman(scores.head_taylor, total.head_nll_increase),
            "taylor_heads_vs_accuracy_drop": spearman(scores.head_taylor, total.head_accuracy_drop),
            "taylor_ffn_vs_nll_increase": spearman(scores.ffn_taylor, total.ffn_nll_increase),
            "taylor_ffn_vs_accuracy_drop": spearman(scores.ffn_taylor, total.ffn_accuracy_drop),
        },
        "cost_ratio": seconds["ablation"] / max(seconds["gradient"], 1e-9),
    }


def write_scores(scores: ModelScores, out: Path) -> list[Path]:
    """importance.json, heads.png (layers x heads), ffn.png and, with induction scores,
    induction.png; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SCORES_JSON
    path.write_text(json.dumps(scores.to_json(), indent=1) + "\n", encoding="utf-8")
    files = [
        path,
        plot_head_heatmap(scores.head, out / "heads.png", f"head importance: {scores.model}, shots {scores.shots}"),
        plot_ffn_bars(scores.ffn, out / "ffn.png", f"FFN importance: {scores.model}, shots {scores.shots}"),
    ]
    if scores.induction is not None:
        files.append(plot_head_heatmap(scores.induction.prefix_matching, out / "induction.png",
                                       f"induction (prefix matching): {scores.model}"))
    return files


def read_scores(directory: Path, rank_by: str = "gradient") -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(head scores (L, H), FFN scores (L,), the whole document) of an importance output dir;
    rank_by: "gradient" (head_scores, ffn_scores) or "taylor" (head_taylor, ffn_taylor)."""
    path = directory / SCORES_JSON if directory.is_dir() else directory
    keys = ("head_taylor", "ffn_taylor") if rank_by == "taylor" else ("head_scores", "ffn_scores")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        head = torch.tensor(document[keys[0]], dtype=torch.float64)
        ffn = torch.tensor(document[keys[1]], dtype=torch.float64)
    except FileNotFoundError:
        raise ValueError(f"{path}: no importance scores here (run `editflow importance --out DIR` first)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not an importance scores file: {exc}") from None
    if head.dim() != 2 or ffn.dim() != 1 or head.shape[0] != ffn.shape[0]:
        raise ValueError(f"{path}: head_scores must be layers x heads and ffn_scores one per layer")
    return head, ffn, document


# ---------------------------------------------------------------------------------------
# pruning
# ---------------------------------------------------------------------------------------


@dataclass
class Pruning:
    """A pruned model (as an edit artifact), its accuracy, and accuracy-vs-pruned curves."""

    heads: float
    ffn: float
    artifact: "WeightDeltaArtifact"
    accuracy: list[dict[str, Any]]  # per task and shots: unpruned and pruned
    curve: list[dict[str, Any]]
    removable: dict[str, float]  # "heads@0shot": share removable within 1 point, ...
    iterative: bool

    def to_json(self) -> dict[str, Any]:
        return {"heads": self.heads, "ffn": self.ffn, "iterative": self.iterative, "accuracy": self.accuracy,
                "removable_within_1_point": self.removable, "removed": self.artifact.meta.config}


def pruning_grid(head_fractions: Sequence[float], ffn_fractions: Sequence[float]) -> list[tuple[float, float]]:
    """The curve's points: every head fraction with no FFN removed, every FFN fraction with no
    head removed (the two one-dimensional curves)."""
    points = [(p, 0.0) for p in sorted({0.0, *head_fractions})] + [(0.0, q) for q in sorted(set(ffn_fractions) - {0.0})]
    return points


def prune_model(loaded: "LoadedModel", tasks: Sequence[Task], shots_list: Sequence[int], head_scores: torch.Tensor,
                ffn_scores: torch.Tensor, heads: float, ffn: float, head_fractions: Sequence[float] = (),
                ffn_fractions: Sequence[float] = (), iterative: bool = False,
                config: ImportanceConfig | None = None, rank_by: str = "gradient") -> Pruning:
    """Remove the lowest-scoring `heads` / `ffn` fractions: the pruned model as an edit
    artifact, the tasks' accuracy before and after, and the accuracy curves over the
    fractions. iterative: head masks are rescored after each step of the head fractions (on
    the tasks' rows at the first shots count, by `rank_by`) instead of ranked once."""
    config = config or ImportanceConfig()
    shape = (loaded.adapter.num_layers, loaded.adapter.num_heads)
    if tuple(head_scores.shape) != shape or tuple(ffn_scores.shape) != shape[:1]:
        raise ValueError(f"the scores are for a {tuple(head_scores.shape)} model; {loaded.name} has layers x heads {shape}")
    head_steps = sorted({*head_fractions, heads} - {0.0})
    if iterative and head_steps:
        rows = [row for task in tasks for row in select_rows(task, config)]
        head_masks = dict(zip(head_steps, iterative_head_masks(loaded, rows, shots_list[0], head_steps, config, rank_by)))
    else:
        head_masks = {p: prune_masks(head_scores, ffn_scores, p, 0.0)[0] for p in head_steps}
    head_masks[0.0] = torch.ones(shape)

    def masks(p: float, q: float) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        return p, q, head_masks[p], prune_masks(head_scores, ffn_scores, 0.0, q)[1]

    grid = pruning_grid(head_fractions, ffn_fractions)
    curve = masks_curve(loaded, tasks, shots_list, [masks(p, q) for p, q in grid], config)
    chosen = masks(heads, ffn)
    final = masks_curve(loaded, tasks, shots_list, [(0.0, 0.0, None, None), chosen], config)
    accuracy = [
        {"task": before["task"], "shots": before["shots"], "unpruned": before["accuracy"], "pruned": after["accuracy"]}
        for before, after in zip(final[: len(final) // 2], final[len(final) // 2 :])
    ]
    removable = {}
    for k in shots_list:
        if len(head_fractions):
            removable[f"heads@{k}shot"] = removable_share(curve, "heads", k)
        if len(ffn_fractions):
            removable[f"ffn@{k}shot"] = removable_share(curve, "ffn", k)
    artifact = pruned_artifact(loaded, chosen[2], chosen[3])
    return Pruning(heads, ffn, artifact, accuracy, curve, removable, iterative)


def write_pruning(pruning: Pruning, out: Path, title: str) -> list[Path]:
    """prune.json, curves.json, curves.png and the pruned model's edit artifact in artifact/."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "prune.json", out / "curves.json"]
    files[0].write_text(json.dumps(pruning.to_json(), indent=1) + "\n", encoding="utf-8")
    files[1].write_text(json.dumps(pruning.curve, indent=1) + "\n", encoding="utf-8")
    if pruning.curve:
        files.append(plot_pruning_curves(pruning.curve, out / "curves.png", title))
    pruning.artifact.save(out / "artifact")
    return files
