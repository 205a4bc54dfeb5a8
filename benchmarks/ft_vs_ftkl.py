"""FT vs FT+KL on CounterFact: single edits on the real model, every metric, seconds per edit.

    .venv/bin/python benchmarks/ft_vs_ftkl.py --n 100 --json docs/results/ft_vs_ftkl.json

Each of the first N rows of the split is edited alone (the usual CounterFact protocol), scored
before and after with editing_core.evaluate, and the edit is detached again. Drawdown is measured
on a fixed held-out set: the locality (prompt, answer) pairs of all N rows, of which evaluate
keeps those the unedited model gets fully right.

FT+KL's KL texts come from the train split (--kl-texts of them), never from the evaluated rows:
anchoring on the very prompts that locality is scored on would flatter it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from statistics import fmean

from tqdm.auto import tqdm

from editing_core.data import requests_from_dataset
from editing_core.editors import make_editor
from editing_core.evaluate import EvalConfig, evaluate
from editing_core.models import load_model

SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
COLUMNS = (
    "edit_success", "paraphrase", "locality", "drawdown",
    "edit_success_generated", "paraphrase_generated", "locality_generated",
)


def load_rows(split: str, n: int):
    import datasets

    path = SHARED_DATA / "counterfact" / f"{split}.json"
    rows = json.loads(path.read_text(encoding="utf-8"))[:n]
    return requests_from_dataset(datasets.Dataset.from_list(rows), f"{path.name}[:{n}]")


def kl_texts(n: int) -> list[str]:
    """Locality texts from the train split, disjoint from the evaluated val rows."""
    return [f"{r.locality_prompt} {r.locality_answer}" for r in load_rows("train", n)]


def method_overrides(method: str, n_kl_texts: int) -> dict:
    if method == "ft_kl":
        return {"use_request_locality": False, "kl_prompts": kl_texts(n_kl_texts)}
    return {}


def run_method(loaded, method: str, requests, heldout, n_kl_texts: int) -> dict:
    editor = make_editor(method, **method_overrides(method, n_kl_texts))
    per_edit: dict[str, list[float]] = {key: [] for key in (*COLUMNS, "seconds_per_edit")}
    for request in tqdm(requests, desc=method):
        start = time.perf_counter()
        artifact = editor.edit(loaded, [request])
        per_edit["seconds_per_edit"].append(time.perf_counter() - start)
        metrics = evaluate(loaded, [request], artifact, heldout=heldout, config=EvalConfig()).metrics
        for key in COLUMNS:
            if metrics.get(key) is not None:
                per_edit[key].append(metrics[key])
    summary = {key: fmean(values) if values else None for key, values in per_edit.items()}
    summary["n_edits"] = len(requests)
    summary["config"] = {k: v for k, v in editor.config.__dict__.items() if k != "kl_prompts"}
    return summary


def markdown(results: dict[str, dict]) -> str:
    header = ["method", *COLUMNS, "seconds_per_edit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, summary in results.items():
        cells = [method] + [f"{summary[k]:.3f}" if summary[k] is not None else "n/a" for k in header[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--split", default="val", choices=["train", "val"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--methods", default="ft,ft_kl")
    parser.add_argument("--kl-texts", type=int, default=16, help="FT+KL: locality texts from train")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    loaded = load_model(args.model)
    requests = load_rows(args.split, args.n)
    heldout = [(r.locality_prompt, r.locality_answer) for r in requests if r.locality_prompt and r.locality_answer]
    results = {m: run_method(loaded, m, requests, heldout, args.kl_texts) for m in args.methods.split(",")}
    print(f"\n{args.model}, CounterFact {args.split}[:{args.n}], single edits, defaults of each method\n")
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "split": args.split, "n": args.n, "results": results}, indent=2, default=list))


if __name__ == "__main__":
    main()
