"""SaLEM saliency on SmolLM2-135M: the chosen layer, and throughput with 2 Ray workers vs one
process (issue #3, section 1).

    .venv/bin/python benchmarks/saliency_throughput.py --n 20 --json docs/results/saliency_throughput.json

The first --n CounterFact val rows (distinct prompts) become fail / adapt / pass samples; their
per-sample gradient sums are computed in this process (torch on 2 threads, then on 1) and over
2 Ray workers (1 CPU and 1 thread each) built from one object-store copy of the weights, the
workers started and warmed up before the clock starts. The scores must agree (relative error
< 1e-5). Wants an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from editing_core.data import requests_from_dataset
from editing_core.models import load_model
from editing_core.saliency import SaliencyConfig, build_samples, count_groups, saliency_sums
from tasks.saliency import SnapshotPool, saliency_shard
from tasks.sharding import ray_connected, scorer_options

SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def counterfact_requests(n: int) -> list:
    import datasets

    rows, seen = [], set()
    for row in json.loads((SHARED_DATA / "counterfact" / "val.json").read_text(encoding="utf-8")):
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
        if len(rows) == n:
            break
    return requests_from_dataset(datasets.Dataset.from_list(rows), f"counterfact/val.json[:{n}]")


def timed(function: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    samples = build_samples(loaded, counterfact_requests(args.n))
    config = SaliencyConfig()
    results: dict[str, Any] = {"samples": count_groups(samples)}
    torch.set_num_threads(2)
    local, results["in_process_2_threads_s"] = timed(lambda: saliency_sums(loaded, samples, config))
    torch.set_num_threads(1)
    _, results["in_process_1_thread_s"] = timed(lambda: saliency_sums(loaded, samples, config))
    torch.set_num_threads(2)
    with ray_connected(None, 2.0, "the saliency benchmark"):
        options = scorer_options(config, 2)
        started = time.perf_counter()
        pool = SnapshotPool(loaded, 2, 1.0)
        try:
            pool.run(saliency_shard, samples[:2], options, progress=False)  # workers built and warm
            results["ray_startup_s"] = time.perf_counter() - started
            parts, results["ray_2_workers_s"] = timed(lambda: pool.run(saliency_shard, samples, options))
        finally:
            pool.close()
    sharded = parts[0]
    for part in parts[1:]:
        sharded = sharded + part
    a, b = local.scores(), sharded.scores()
    results["relative_error"] = float((a.layer_scores - b.layer_scores).abs().max() / a.layer_scores.abs().max())
    results["speedup_vs_2_threads"] = results["in_process_2_threads_s"] / results["ray_2_workers_s"]
    results["speedup_vs_1_thread"] = results["in_process_1_thread_s"] / results["ray_2_workers_s"]
    results["chosen_layer"] = a.chosen_layer
    results["chosen_layer_by_group"] = {g: s.chosen_layer for g, s in a.by_group.items()}
    results["layer_scores"] = a.layer_scores.tolist()
    print(json.dumps({k: v for k, v in results.items() if k != "layer_scores"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
