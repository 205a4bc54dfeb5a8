"""FT, FT+KL, MEND and SaLEM on CounterFact val: single edits and batches, every metric, speed.

    # editors trained first, e.g.
    editflow train-editor --model smollm2-135m --facts ../shared/data/counterfact/train.json \
        --val ../shared/data/counterfact/val.json --steps 800 --out /tmp/bench/mend
    editflow train-editor ... --salient --out /tmp/bench/salem
    .venv/bin/python benchmarks/mend_salem.py --n 200 --batches 1,10 \
        --mend /tmp/bench/mend/editor --salem /tmp/bench/salem/editor \
        --json docs/results/mend_salem.json --plot docs/results/mend_salem.png

The first N val rows are edited in consecutive groups of B (B=1: the usual one-fact protocol;
B=10: ten facts in one edit), each group scored before and after with editing_core.evaluate
(edit success, paraphrase, locality, drawdown on held-out pairs the model knows, teacher-forced
and generated) and detached again. Metrics are means over rows (group means weighted by size).
FT / FT+KL use the same settings as benchmarks/ft_vs_ftkl.py (FT+KL anchors from the train split).

Methods take config overrides after a colon, `;`-separated: `ft:steps=5;ft:steps=6` (FT's cost
of edit success), `mend:edit_scale=1.5` (a trained editor applied at 1.5x its learned edit
rates, MendConfig.edit_scale). --tradeoff-plot draws every single-edit result as edit success
against seconds per edit and drawdown against edit success, one line per method and tag: the
comparison at equal edit success.

--latency: a MEND edit's wall time divided by one forward+backward of the base model on the same
prompt (gradients of the edited weights only, which is what a gradient edit needs), median of
--latency-reps single-fact edits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from ft_vs_ftkl import COLUMNS, edit_and_score, known_heldout, load_rows, method_overrides, plot  # benchmarks/ is on sys.path when a script here runs
from editing_core.editors import make_editor
from editing_core.models import load_model
from editing_core.tokens import completion_batch, completion_logits, completion_nll


def make_method(spec: str, editors: dict[str, str], n_kl_texts: int, n_swaps: int) -> Any:
    """`method` or `method:field=value,field=value` (config overrides, e.g. `ft:steps=4`)."""
    method, _, settings = spec.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    if method in ("mend", "salem"):
        if not editors.get(method):
            raise SystemExit(f"--{method} DIR is needed to benchmark {method}")
        return make_editor(method, editor=editors[method], **overrides)
    return make_editor(method, **{**method_overrides(method, n_kl_texts, n_swaps), **overrides})


def latency(loaded: Any, editor: Any, requests: list, reps: int) -> dict[str, float]:
    """Median wall time of a single-fact MEND edit and of one forward+backward on its prompt."""
    names = editor.edited_params(loaded)
    params = [loaded.model.get_parameter(n) for n in names]
    edit_s, fwd_bwd_s = [], []
    for request in requests[:reps]:
        started = time.perf_counter()
        editor.edit(loaded, [request])
        edit_s.append(time.perf_counter() - started)
        batch = completion_batch(loaded.tokenizer, [(request.prompt, request.target_new)])
        for p in params:
            p.requires_grad_(True)
        started = time.perf_counter()
        loss = completion_nll(completion_logits(loaded.model, batch), batch).sum()
        torch.autograd.grad(loss, params)
        fwd_bwd_s.append(time.perf_counter() - started)
        for p in params:
            p.requires_grad_(False)
    return {"edit_s": median(edit_s), "forward_backward_s": median(fwd_bwd_s), "ratio": median(edit_s) / median(fwd_bwd_s)}


def markdown(results: dict[str, dict]) -> str:
    header = ["method", "batch", *COLUMNS, "seconds_per_edit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in results.values():
        cells = [summary["method"], str(summary["batch"])] + [
            f"{summary[k]:.3f}" if summary.get(k) is not None else "n/a" for k in header[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n", type=int, default=200, help="val rows edited")
    parser.add_argument("--start", type=int, default=0, help="first val row edited (e.g. 1000: rows kept apart for "
                                                            "choosing an edit_scale, disjoint from the first 200)")
    parser.add_argument("--batches", default="1,10", help="facts per edit, comma-separated")
    parser.add_argument("--methods", default="ft,ft_kl,mend,salem",
                        help="comma-separated; `;` separates methods with overrides, e.g. 'ft:steps=4;ft:steps=8'")
    parser.add_argument("--mend", help="trained MEND editor directory")
    parser.add_argument("--salem", help="trained SaLEM editor directory")
    parser.add_argument("--heldout", type=int, default=50, help="held-out known pairs for drawdown")
    parser.add_argument("--kl-texts", type=int, default=16)
    parser.add_argument("--subject-swaps", type=int, default=8)
    parser.add_argument("--no-generated", action="store_true", help="skip the generated metrics (faster)")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--latency-reps", type=int, default=20)
    parser.add_argument("--tag", default="", help="appended to the result labels (e.g. the editor's training steps)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--plot-labels", help="comma-separated result labels of the JSON to plot (default: all); "
                                              "with --methods \"\" only redraws the plot")
    parser.add_argument("--tradeoff-plot", type=Path, help="also draw edit success against seconds per edit and "
                                                           "drawdown against edit success, one line per method "
                                                           "and tag through its knob (FT steps, MEND edit_scale)")
    args = parser.parse_args()

    previous = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    separator = ";" if ";" in args.methods or ":" in args.methods else ","
    methods = [m.strip() for m in args.methods.split(separator) if m.strip()]
    if not methods:  # redraw the plots of the JSON's results
        draw(previous.get("results", {}), args, f"{args.model}: CounterFact val")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(args.model)
    requests = load_rows("val", args.n, args.start)
    heldout = known_heldout(loaded, args.heldout)
    editors = {"mend": args.mend, "salem": args.salem}
    results: dict[str, dict] = {}
    for method in methods:
        editor = make_method(method, editors, args.kl_texts, args.subject_swaps)
        for batch in [int(b) for b in args.batches.split(",") if b.strip()]:  # --batches "": latency only
            label = f"{method}{'@' + args.tag if args.tag else ''} x{batch}"
            results[label] = {"method": method, **edit_and_score(loaded, editor, requests, batch, heldout, not args.no_generated)}
            print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in results[label].items()}, flush=True)
        if args.latency and editor.name in ("mend", "salem"):
            label = f"{method}{'@' + args.tag if args.tag else ''} latency"
            results[label] = {"method": method, "batch": 1, **latency(loaded, editor, requests, args.latency_reps)}
            print(label, results[label], flush=True)
    print(markdown({k: v for k, v in results.items() if "latency" not in k}))
    merged = {**previous.get("results", {}), **results}  # runs of other methods stay in the file
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "n": args.n, "heldout": len(heldout), "results": merged}, indent=2))
    draw(merged, args, f"{args.model}: CounterFact val, {args.n} rows")


def draw(results: dict[str, dict], args: argparse.Namespace, title: str) -> None:
    """The figures asked for (--plot, --tradeoff-plot) of the --plot-labels results."""
    chosen = _plotted(results, args.plot_labels)
    if args.plot:
        plot(chosen, args.plot, title)
    if args.tradeoff_plot:
        plot_tradeoff(chosen, args.tradeoff_plot, f"{args.model}: CounterFact val")


def _series(label: str) -> tuple[str, str]:
    """`method:knob=value@tag xB` -> (`method@tag`, `knob=value`); no knob: the method's default."""
    spec, _, tag = label.rpartition(" x")[0].partition("@")
    method, _, knob = spec.partition(":")
    return method + (f"@{tag}" if tag else ""), knob or "default"


def plot_tradeoff(results: dict[str, dict], path: Path, title: str) -> None:
    """Single edits only: edit success against seconds per edit (log) and drawdown against edit
    success, each method / tag one line through its settings, each point named by its knob."""
    from editing_core.plotting import agg_figure

    lines: dict[str, list[tuple[str, dict]]] = {}
    for label, result in results.items():
        if result.get("batch") == 1 and "latency" not in label:
            series, knob = _series(label)
            lines.setdefault(series, []).append((knob, result))
    figure = agg_figure((13, 5.5))
    speed, harm = figure.subplots(1, 2)
    for series, points in sorted(lines.items()):
        points.sort(key=lambda p: p[1]["edit_success"])
        es = [r["edit_success"] for _, r in points]
        seconds = [r["seconds_per_edit"] for _, r in points]
        rows = points[0][1].get("n_edits", "?")
        line, = speed.plot(seconds, es, "o-", label=f"{series} ({rows} rows)")
        harm.plot(es, [r["drawdown"] for _, r in points], "o-", color=line.get_color())
        cost_varies = max(seconds) > 1.2 * min(seconds)  # FT's steps; an editor's scale costs nothing
        for knob, r in points:
            if cost_varies:
                speed.annotate(knob, (r["seconds_per_edit"], r["edit_success"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
            harm.annotate(knob, (r["edit_success"], r["drawdown"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    speed.set(xscale="log", xlabel="seconds per edit (one fact)", ylabel="edit success", title="cost of edit success")
    harm.set(xlabel="edit success", ylabel="drawdown (held-out known pairs)", title="harm at each edit success")
    speed.legend(fontsize=7, loc="lower right")
    for axis in (speed, harm):
        axis.grid(alpha=0.3)
    figure.suptitle(f"{title}: single edits")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def _plotted(results: dict[str, dict], labels: str | None) -> dict[str, dict]:
    if labels:
        return {label: results[label] for label in (x.strip() for x in labels.split(",")) if label}
    return {k: v for k, v in results.items() if "latency" not in k}


if __name__ == "__main__":
    main()
