"""Key whitening: does preconditioning a gradient edit's key side by the inverse key second
moment (MendNetConfig.whiten_keys, the C^-1 k of ROME / MEMIT) buy locality on CounterFact?

    .venv/bin/python benchmarks/key_whitening.py --layers 27 --roles mlp_out --n 40 \
        --dampings none,0.01,0.1,1 --rates 0.3,1,3,10 \
        --json docs/results/key_whitening.json --plot docs/results/key_whitening.png

An untrained MEND editor is the plain gradient step (with whitening: the preconditioned one), so
this compares the two steps before any training, over a range of edit rates: the first `--n`
CounterFact val rows, one fact per edit, scored like benchmarks/mend_salem.py (edit success,
paraphrase, locality on the row's neighbour prompt, drawdown on known held-out pairs;
teacher-forced). The key second moments come from the texts of the first `--key-rows` train
rows (`key_texts`), as editor training computes them (MendTrainConfig.key_stats_rows).
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from ft_vs_ftkl import edit_and_score, known_heldout, load_rows  # benchmarks/ is on sys.path when a script here runs
from editing_core.editors import make_editor
from editing_core.editors.mend import (MendNetConfig, build_net, key_second_moments, key_texts, net_targets, save_net,
                                       set_key_preconditioners)
from editing_core.models import load_model
from editing_core.plotting import agg_figure


def step_label(result: dict) -> str:
    step = "plain" if result["damping"] == "none" else f"whitened, damping {result['damping']}"
    positions = result.get("pair_positions", "all")  # results saved before pair_positions were all "all"
    return step if positions == "all" else f"{step}, {positions} positions"


def plot(results: list[dict], path: Path, title: str) -> None:
    fig = agg_figure((11, 4.5))
    axes = fig.subplots(1, 2)
    for label in dict.fromkeys(step_label(r) for r in results):
        points = [r for r in results if step_label(r) == label]
        for axis, metric in zip(axes, ("locality", "paraphrase")):
            axis.plot([p["edit_success"] for p in points], [p[metric] for p in points], marker="o", label=label)
            for p in points:
                axis.annotate(f"{p['rate']:g}", (p["edit_success"], p[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for axis, metric in zip(axes, ("locality", "paraphrase")):
        axis.set_xlabel("edit success")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title} (points labelled by edit rate)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="27", help="edited layers, comma-separated")
    parser.add_argument("--roles", default="mlp_out", help="edited roles, comma-separated")
    parser.add_argument("--n", type=int, default=40, help="val rows edited, one at a time")
    parser.add_argument("--key-rows", type=int, default=400, help="train rows whose texts estimate the key second moments")
    parser.add_argument("--dampings", default="none,0.01,0.1,1", help="'none' is the plain step")
    parser.add_argument("--rates", default="0.3,1,3,10", help="edit rates (the same for every edited weight)")
    parser.add_argument("--pair-positions", default="all", help="MendNetConfig.pair_positions values to compare, comma-separated")
    parser.add_argument("--heldout", type=int, default=10, help="held-out known pairs for drawdown")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()

    loaded = load_model(args.model)
    requests = load_rows("val", args.n)
    heldout = known_heldout(loaded, args.heldout)
    layers = tuple(int(x) for x in args.layers.split(","))
    roles = tuple(args.roles.split(","))
    names = [name for name, _, _ in net_targets(loaded, MendNetConfig(layers=layers, roles=roles))]
    moments = key_second_moments(loaded, names, key_texts(load_rows("train", args.key_rows)))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for positions, damping in itertools.product(args.pair_positions.split(","), args.dampings.split(",")):
            whiten = damping != "none"
            config = MendNetConfig(layers=layers, roles=roles, edit_lr_init=1.0, whiten_keys=whiten, pair_positions=positions,
                                   **({"whiten_damping": float(damping)} if whiten else {}))
            net = build_net(loaded, config)
            if whiten:
                set_key_preconditioners(net, moments)
            directory = save_net(net, Path(scratch) / f"{positions}-{damping}", {"base_model": loaded.name})
            for rate in (float(x) for x in args.rates.split(",")):  # rates 1 scaled: the edit rate
                editor = make_editor("mend", editor=str(directory), edit_scale=rate)
                summary = edit_and_score(loaded, editor, requests, 1, heldout, generated=False)
                results.append({"pair_positions": positions, "damping": damping, "rate": rate, **summary})
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[-1].items()}), flush=True)
    print("| step | edit rate | edit_success | paraphrase | locality | drawdown |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {step_label(r)} | {r['rate']:g} | {r['edit_success']:.3f} | {r['paraphrase']:.3f} | "
              f"{r['locality']:.3f} | {r['drawdown']:.3f} |")
    title = f"{args.model}: layers {args.layers} {args.roles}, {args.n} CounterFact val rows"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "layers": layers, "roles": roles, "n": args.n,
                                         "key_rows": args.key_rows, "heldout": len(heldout), "results": results}, indent=2))
    if args.plot:
        plot(results, args.plot, title)


if __name__ == "__main__":
    main()
