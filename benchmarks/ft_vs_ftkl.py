"""FT vs FT+KL on CounterFact: single edits on the real model, every metric, seconds per edit.

    .venv/bin/python benchmarks/ft_vs_ftkl.py --n 100 --json docs/results/ft_vs_ftkl.json

Each of the first N rows of the split is edited alone (the usual CounterFact protocol), scored
before and after with editing_core.evaluate, and the edit is detached again. Drawdown is measured
on a fixed held-out set: the first --heldout locality (prompt, answer) pairs of the train split,
from row 1000 on (away from the KL anchors), that the unedited model answers fully right
(SmolLM2-135M knows about 3% of them, so a few hundred rows are scanned once).

FT+KL's KL texts come from the train split, never from the evaluated rows: --kl-texts locality
texts, and --subject-swaps copies of the edited prompt with a train subject in place of the
edited one. Anchoring on the very prompts that locality is scored on would flatter it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from statistics import fmean, median

from tqdm.auto import tqdm

from editing_core.data import requests_from_dataset
from editing_core.editors import make_editor
from editing_core.evaluate import EvalConfig, evaluate, teacher_forced
from editing_core.models import load_model

SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
HELDOUT_START = 1000  # train rows used for drawdown start here
COLUMNS = (
    "edit_success", "paraphrase", "locality", "drawdown",
    "edit_success_generated", "paraphrase_generated", "locality_generated",
)


def load_rows(split: str, n: int, start: int = 0):
    import datasets

    path = SHARED_DATA / "counterfact" / f"{split}.json"
    rows = json.loads(path.read_text(encoding="utf-8"))[start : start + n]
    return requests_from_dataset(datasets.Dataset.from_list(rows), f"{path.name}[{start or ''}:{start + n}]")


def known_heldout(loaded, n: int, batch_size: int = 16) -> list[tuple[str, str]]:
    """The first n train locality pairs (from HELDOUT_START) the unedited model gets fully right."""
    path = SHARED_DATA / "counterfact" / "train.json"
    rows = json.loads(path.read_text(encoding="utf-8"))[HELDOUT_START:]
    pairs = [(r["locality_prompt"], r["locality_ground_truth"]) for r in rows]
    known: list[tuple[str, str]] = []
    for start in tqdm(range(0, len(pairs), 10 * batch_size), desc="held-out pairs the model knows"):
        chunk = pairs[start : start + 10 * batch_size]
        right = teacher_forced(loaded.model, loaded.tokenizer, chunk, batch_size)
        known += [pair for pair, ok in zip(chunk, right) if ok.all()]
        if len(known) >= n:
            return known[:n]
    return known


def method_overrides(method: str, n_kl_texts: int, n_swaps: int) -> dict:
    """FT+KL anchors from the train split (disjoint from the evaluated val rows)."""
    if method != "ft_kl":
        return {}
    train = load_rows("train", max(n_kl_texts, n_swaps))
    return {
        "use_request_locality": False,
        "kl_prompts": [f"{r.locality_prompt} {r.locality_answer}" for r in train[:n_kl_texts]],
        "subject_swaps": n_swaps,
        "swap_subjects": [r.subject for r in train[:n_swaps] if r.subject],
    }


def edit_and_score(loaded, editor, requests, batch: int, heldout, generated: bool = True) -> dict:
    """Edit `requests` in consecutive groups of `batch`, score each group before and after
    (editing_core.evaluate) and detach it again. Metrics are means over rows (a group's mean
    weighted by its size; drawdown, one number per edit, by edit); seconds per edit are per fact."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    seconds: list[float] = []
    groups = [requests[i : i + batch] for i in range(0, len(requests), batch)]
    for group in tqdm(groups, desc=f"{editor.name} x{batch}"):
        started = time.perf_counter()
        artifact = editor.edit(loaded, group)
        seconds.append((time.perf_counter() - started) / len(group))
        metrics = evaluate(loaded, group, artifact, heldout=heldout, config=EvalConfig(generated=generated)).metrics
        for key in COLUMNS:
            if metrics.get(key) is not None:
                weight = len(group) if key != "drawdown" else 1
                sums[key] = sums.get(key, 0.0) + metrics[key] * weight
                counts[key] = counts.get(key, 0) + weight
    summary: dict = {key: sums[key] / counts[key] for key in sums}
    summary.update(seconds_per_edit=fmean(seconds), seconds_per_edit_median=median(seconds), n_edits=len(requests), batch=batch)
    return summary


def run_method(loaded, method: str, requests, heldout, n_kl_texts: int, n_swaps: int) -> dict:
    editor = make_editor(method, **method_overrides(method, n_kl_texts, n_swaps))
    summary = edit_and_score(loaded, editor, requests, 1, heldout)
    summary["config"] = {k: v for k, v in editor.config.__dict__.items() if k not in ("kl_prompts", "swap_subjects")}
    return summary


def markdown(results: dict[str, dict]) -> str:
    header = ["method", *COLUMNS, "seconds_per_edit", "seconds_per_edit_median"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, summary in results.items():
        cells = [method] + [f"{summary[k]:.3f}" if summary.get(k) is not None else "n/a" for k in header[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    from pipelines.report import plot_bars

    scored = [c for c in COLUMNS if c != "drawdown"]  # drawdown can be negative: it is in the table
    plot_bars({m: [r.get(c) or 0.0 for c in scored] for m, r in results.items()}, scored, path, title)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--methods", default="ft,ft_kl")
    parser.add_argument("--kl-texts", type=int, default=8, help="FT+KL: locality texts from train")
    parser.add_argument("--subject-swaps", type=int, default=4, help="FT+KL: edited prompt with train subjects")
    parser.add_argument("--heldout", type=int, default=20, help="known train locality pairs that measure drawdown")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also draw them as a PNG bar chart here")
    parser.add_argument("--from-json", type=Path, help="do not run: print (and plot) results saved with --json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if args.from_json:
        saved = json.loads(args.from_json.read_text(encoding="utf-8"))
        results = saved["results"]
        title = saved.get("title") or f"{saved['model']}, CounterFact {saved['split']}[:{saved['n']}], single edits"
    else:
        loaded = load_model(args.model)
        requests = load_rows(args.split, args.n)
        heldout = known_heldout(loaded, args.heldout)
        results = {m: run_method(loaded, m, requests, heldout, args.kl_texts, args.subject_swaps) for m in args.methods.split(",")}
        title = (f"{args.model}, CounterFact {args.split}[:{args.n}], single edits, defaults of each method "
                 f"(FT+KL: {args.kl_texts} KL texts and {args.subject_swaps} subject swaps from train; "
                 f"drawdown on {len(heldout)} known train pairs)")
    print(f"\n{title}\n")
    print(markdown(results))
    if args.json and not args.from_json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"model": args.model, "split": args.split, "n": args.n, "title": title, "results": results}
        args.json.write_text(json.dumps(document, indent=2, default=list))
    if args.plot:
        plot(results, args.plot, title.split(", defaults")[0])


if __name__ == "__main__":
    main()
