"""Head / FFN importance, pruning and induction heads on SmolLM2-135M (issue #5).

    .venv/bin/python benchmarks/importance_prune.py --max-rows 40 --ablation-task capitals \
        --ablation-rows 24 --json docs/results/importance_prune.json --out docs/results/importance

1. Throughput: the gradient scores of every shipped task at 0 and 5 shots, in this process
   (torch on --threads threads, model already loaded) and over 2 Ray workers (1 CPU and 1
   thread each, models already loaded; the start-up is reported beside); the scores of the
   two must agree (relative error < 1e-5).
2. Gradient vs exact ablation scores on one task (--ablation-task, --ablation-rows rows,
   --ablation-shots): Spearman correlation of the rankings and the cost ratio (ablation
   seconds / gradient seconds, same rows, same process).
3. Pruning: accuracy, averaged over the tasks, at 0 and 5 shots as the lowest-scoring heads
   (0..70%) or FFN blocks (0..30%) are removed; the share removable while the mean accuracy
   stays within 1 point of the unpruned model's. --iterative also draws the rescoring variant.
4. Induction heads: prefix-matching and copying scores, and the overlap of the top 10% of
   induction heads with the top 10% of important heads.

Timings want an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from editing_core.importance import ImportanceConfig, ImportanceSums, load_tasks, plot_pruning_curves
from editing_core.induction import InductionConfig
from editing_core.models import load_model
from pipelines.analysis import prune_model, score_model, write_scores
from tasks.importance import sharded_importance
from tasks.sharding import ray_connected, worker_pool

MODEL = "smollm2-135m"


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def throughput(tasks: list, shots: tuple[int, ...], config: ImportanceConfig, loaded: Any, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    started = time.perf_counter()
    local = sharded_importance(MODEL, tasks, shots, config, workers=0, loaded=loaded)
    local_s = time.perf_counter() - started
    with ray_connected(None, 2.0, "the throughput benchmark"):
        started = time.perf_counter()
        with worker_pool(MODEL, 2, 1.0) as pool:
            sharded_importance(MODEL, tasks[:1], shots[:1], ImportanceConfig(max_rows=2), 2, pool=pool)  # models loaded
            startup_s = time.perf_counter() - started
            started = time.perf_counter()
            ray_scores = sharded_importance(MODEL, tasks, shots, config, 2, pool=pool)
            ray_s = time.perf_counter() - started
    a, b = ImportanceSums.reduce(list(local.values())), ImportanceSums.reduce(list(ray_scores.values()))
    return {"rows": a.rows, "in_process_s": local_s, "ray_2_workers_s": ray_s, "speedup": local_s / ray_s,
            "ray_startup_s": startup_s, "speedup_with_startup": local_s / (ray_s + startup_s),
            "head_relative_error": relative_error(b.head_scores(), a.head_scores()),
            "ffn_relative_error": relative_error(b.ffn_scores(), a.ffn_scores()), "threads_in_process": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-rows", type=int, default=40)
    parser.add_argument("--shots", default="0,5")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ablation-task", default="capitals")
    parser.add_argument("--ablation-rows", type=int, default=24)
    parser.add_argument("--ablation-shots", type=int, default=5)
    parser.add_argument("--iterative", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--throughput-only", action="store_true", help="only part 1 (e.g. again with --threads 1)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/results/importance"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    shots = tuple(int(k) for k in args.shots.split(","))
    torch.set_num_threads(args.threads)
    loaded = load_model(MODEL)
    tasks = load_tasks()
    config = ImportanceConfig(shots=shots[0], batch_size=args.batch_size, max_rows=args.max_rows, progress=True)
    results: dict[str, Any] = {"model": MODEL, "tasks": [t.name for t in tasks], "shots": list(shots), "max_rows": args.max_rows}

    if not args.skip_throughput:
        results["throughput"] = throughput(tasks, shots, config, loaded, args.threads)
        print(json.dumps({"throughput": results["throughput"]}), flush=True)
    if args.throughput_only:
        _write(args.json, results)
        return

    subset = [t for t in tasks if t.name == args.ablation_task]
    small = ImportanceConfig(shots=args.ablation_shots, batch_size=args.batch_size, max_rows=args.ablation_rows, progress=True)
    reference = score_model(MODEL, subset, (args.ablation_shots,), small, loaded=loaded, ablation=True)
    results["ablation"] = {"task": args.ablation_task, "rows": args.ablation_rows, "shots": args.ablation_shots,
                           "spearman": reference.ablation["spearman"], "cost_ratio": reference.ablation["cost_ratio"],
                           "seconds": reference.seconds, "base_accuracy": reference.ablation["base_accuracy"]}
    print(json.dumps({"ablation": results["ablation"]}), flush=True)

    scores = score_model(MODEL, tasks, shots, config, loaded=loaded, induction=InductionConfig(progress=True))
    write_scores(scores, args.out)
    results["importance_seconds"] = scores.seconds
    results["induction"] = {"top_prefix_matching": scores.induction.to_json()["top_prefix_matching"],
                            "prefix_matching_chance": scores.induction.prefix_matching_chance, "overlap": scores.overlap}
    head_fractions = [round(0.1 * i, 1) for i in range(1, 8)]
    ffn_fractions = [0.1, 0.2, 0.3]
    variants = [False, True] if args.iterative else [False]
    for iterative in variants:
        pruning = prune_model(loaded, tasks, shots, scores.head, scores.ffn, 0.5, 0.2, head_fractions, ffn_fractions,
                              iterative, config)
        label = "iterative" if iterative else "ranked_once"
        results[f"pruning_{label}"] = {"removable_within_1_point": pruning.removable, "accuracy_at_50pct_heads_20pct_ffn": pruning.accuracy,
                                       "curve": pruning.curve}
        plot_pruning_curves(pruning.curve, args.out / f"curves_{label}.png", f"pruning {MODEL} ({label.replace('_', ' ')})")
        print(json.dumps({label: pruning.removable}), flush=True)
    _write(args.json, results)


def _write(path: Path | None, results: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
