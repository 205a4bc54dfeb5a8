"""Which single layer can a SaLEM editor edit? One calibrated plain-gradient step per layer.

    .venv/bin/python benchmarks/salem_layers.py --layers 0,5,10,15,20,24,25,26,27,28,29 \
        --saliency /tmp/bench/salem/saliency/saliency.json \
        --json docs/results/salem_layers.json --plot docs/results/salem_layers.png

For every layer, an untrained SaLEM editor (rank-`--svd-rank` SVD of the gradient summed over
each batch of `--batch-size` facts, mlp_in + mlp_out) is the plain low-rank gradient step; its
edit rate is searched over MendTrainConfig's grid by `calibrate_edit_rates`, exactly as editor
training starts (`editing_core.editors.salem.edit_gain_scan`, what `train-editor --salient-by
edit_gain` ranks layers by). Reported per layer at the best rate: the MEND training loss, the edit accuracy
(prompt + rephrases, every target token the argmax), edit NLL and locality KL, on the first
`--rows` CounterFact train facts. This is the starting point a trained editor improves on; with
`--saliency` the layer's gradient saliency (editflow saliency) is printed beside it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ft_vs_ftkl import load_rows  # benchmarks/ is on sys.path when a script here runs
from editing_core.editors.mend import MendNetConfig, MendTrainConfig
from editing_core.editors.salem import edit_gain_scan
from editing_core.models import load_model
from pipelines.editor_training import plot_edit_gain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="0,5,10,15,20,24,25,26,27,28,29")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=10, help="facts whose gradients are summed before the SVD")
    parser.add_argument("--svd-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--saliency", type=Path, help="a saliency.json to print the layers' gradient saliency beside")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    loaded.model.eval().requires_grad_(False)
    train = MendTrainConfig(batch_size=args.batch_size)
    saliency = json.loads(args.saliency.read_text())["layer_scores"] if args.saliency else None
    layers = [int(x) for x in args.layers.split(",")]
    results = edit_gain_scan(loaded, load_rows("train", args.rows), layers, train, MendNetConfig(svd_rank=args.svd_rank))
    print("| layer | gradient saliency | best edit rate | loss | edit accuracy | edit NLL | locality KL |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        score = f"{saliency[r['layer']]:.2e}" if saliency else "n/a"
        print(f"| {r['layer']} | {score} | {r['edit_lr']:g} | {r['loss']:.3f} | {r['edit_accuracy']:.3f} | {r['edit_nll']:.2f} | {r['locality_kl']:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "rows": args.rows, "batch_size": args.batch_size,
                                         "svd_rank": args.svd_rank, "saliency": saliency, "results": results}, indent=2))
    if args.plot:
        plot_edit_gain(results, saliency, args.plot, f"{args.model}: one calibrated rank-{args.svd_rank} gradient step per layer")


if __name__ == "__main__":
    main()
