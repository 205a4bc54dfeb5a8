"""Peak memory per worker while training a MEND editor: plain DDP vs DeepSpeed ZeRO.

    .venv/bin/python benchmarks/mend_train_memory.py --steps 10 --ranks 64,1920 \
        --setups ddp,zero2,zero2-offload --json docs/results/mend_train_memory.json

Each setup trains the editor of SmolLM2-135M's last three MLP layers (mlp_in + mlp_out) for
--steps steps on 2 Ray Train workers (1 CPU each) on CounterFact train rows, and reports the
workers' peak resident memory (max over workers of ru_maxrss) and seconds per step. Rank 64
is editflow's default editor (about 1.1 M parameters); rank 1920 is the paper's editor size
(about 33 M parameters), where the optimizer state starts to matter next to the frozen
135 M-parameter base model every worker holds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import ray

from ft_vs_ftkl import load_rows  # benchmarks/ is on sys.path when a script here runs
from editing_core.editors.mend import MendNetConfig, MendTrainConfig
from tasks.mend_train import DistributedConfig, train_editor

SETUPS = {
    "ddp": DistributedConfig(workers=2, zero_stage=0),
    "zero1": DistributedConfig(workers=2, zero_stage=1),
    "zero2": DistributedConfig(workers=2, zero_stage=2),
    "zero2-offload": DistributedConfig(workers=2, zero_stage=2, offload=True),
    "zero3-offload": DistributedConfig(workers=2, zero_stage=3, offload=True),
}


def editor_parameters(rank: int) -> int:
    """Parameters of the default-layout editor of SmolLM2-135M at `rank` (two shapes, 2 blocks)."""
    dim, layers = 576 + 1536, 3
    block = dim * rank + rank + dim * rank + 2 * layers * dim
    return 2 * 2 * block + 2 * layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ranks", default="64,1920")
    parser.add_argument("--setups", default="ddp,zero2,zero2-offload")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = load_rows("train", 200)
    # no edit-rate calibration: it would add the same pre-training passes to every setup
    train = MendTrainConfig(steps=args.steps, batch_size=2, checkpoint_every=args.steps, val_every=0, edit_lr_grid=())
    results = []
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        for rank in [int(r) for r in args.ranks.split(",")]:
            for setup in args.setups.split(","):
                with tempfile.TemporaryDirectory() as out:
                    result = train_editor(args.model, rows, [], MendNetConfig(rank=rank), train, SETUPS[setup], out)
                last = result.history[-1]
                row = {"setup": setup, "rank": rank, "editor_params": editor_parameters(rank),
                       "peak_rss_mib": last["peak_rss_mib"], "seconds_per_step": last["seconds_per_step"],
                       "fit_seconds": result.seconds}
                results.append(row)
                print(row, flush=True)
    finally:
        ray.shutdown()
    for rank in sorted({r["rank"] for r in results}):
        base = next((r for r in results if r["rank"] == rank and r["setup"] == "ddp"), None)
        for row in (r for r in results if r["rank"] == rank):
            row["vs_ddp"] = row["peak_rss_mib"] / base["peak_rss_mib"] if base else None
    print("| setup | rank | editor params | peak RSS / worker (MiB) | vs DDP | s/step |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['vs_ddp']:.3f}" if r.get("vs_ddp") else "n/a"
        print(f"| {r['setup']} | {r['rank']} | {r['editor_params'] / 1e6:.1f} M | {r['peak_rss_mib']:.0f} | {ratio} | {r['seconds_per_step']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
