"""GRACE lifelong editing on CounterFact: retention curves, forward latency, value-step cache.

    .venv/bin/python benchmarks/grace_stream.py --n 1000 --json docs/results/grace_stream.json \
        --plot docs/results/grace_stream.png --compare ft_kl:100 --latency --cache-edits 50

Streams the first N CounterFact rows (duplicate prompts dropped: the same prompt with two targets
is a conflicting edit, not a new one) one at a time into a GRACE codebook on SmolLM2-135M and
every --every edits records ERR (accuracy on all past edits), TRR (unchanged argmax on a fixed
unrelated set: locality prompts + true answers of train rows from --unrelated-start on, never
streamed), paraphrase accuracy, keys and seconds per edit (editing_core.sequential).

--compare METHOD:N streams the first N rows with another method's sequential mode (ft_kl folds
each edit into the weights) into the same plot. --sweep KEY=V1,V2 reruns the stream per value
of one GRACE config field (for the key-token / radius study). --latency times forward passes with
the final codebook attached against the base model (batch 1 and 8). --cache-edits K times the
first K edits with the activation cache and without it. Timings want an idle machine: stream
with --save-artifact DIR, then time separately with --n K --latency --latency-artifact DIR
--cache-edits K (the stream of K edits is re-run; --n 0 skips it and the cache timing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

from editing_core.data import requests_from_dataset
from editing_core.editors import make_editor
from editing_core.models import load_model
from editing_core.sequential import StreamConfig, run_stream

SHARED_DATA = Path(os.environ.get("EDITFLOW_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def counterfact_rows(split: str) -> list[dict[str, Any]]:
    return json.loads((SHARED_DATA / "counterfact" / f"{split}.json").read_text(encoding="utf-8"))


def stream_requests(split: str, n: int):
    import datasets

    if n <= 0:
        return []
    seen: set[str] = set()
    rows = []
    for row in counterfact_rows(split):
        if row["prompt"] in seen or not row["target_new"].strip():
            continue
        seen.add(row["prompt"])
        rows.append(row)
        if len(rows) == n:
            break
    return requests_from_dataset(datasets.Dataset.from_list(rows), f"counterfact/{split}.json[:{n} unique prompts]")


def unrelated_pairs(split: str, start: int, n: int) -> list[tuple[str, str]]:
    rows = counterfact_rows(split)[start : start + n]
    return [(r["locality_prompt"], r["locality_ground_truth"]) for r in rows]


def parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def forward_latency(loaded, artifact, prompts: list[str], batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of one forward pass over `batch` prompts, base vs codebook attached
    (interleaved, so drifts of the machine hit both alike)."""
    tok = loaded.tokenizer
    chunk = tok(prompts[:batch], return_tensors="pt", padding=True)
    base, edited = [], []
    with torch.no_grad():
        for _ in range(3):  # warm-up
            loaded.model(**chunk)
        for _ in range(repeats):
            started = time.perf_counter()
            loaded.model(**chunk)
            base.append(time.perf_counter() - started)
            with artifact.attached(loaded.model):
                started = time.perf_counter()
                loaded.model(**chunk)
                edited.append(time.perf_counter() - started)
    return {"batch": batch, "base_s": median(base), "edited_s": median(edited), "ratio": median(edited) / median(base)}


def cache_timing(loaded, requests, config: dict[str, Any], k: int) -> dict[str, float]:
    out = {}
    for cache in (True, False):
        editor = make_editor("grace", {**config, "cache_activations": cache})
        times = []
        with editor.sequential(loaded) as session:
            for request in requests[:k]:
                started = time.perf_counter()
                session.add(request)
                times.append(time.perf_counter() - started)
        out["with_cache_s" if cache else "without_cache_s"] = median(times)
    out["speedup"] = out["without_cache_s"] / out["with_cache_s"]
    out["edits"] = k
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--split", default="train")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--unrelated-start", type=int, default=5000)
    parser.add_argument("--unrelated-n", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="GRACE config field")
    parser.add_argument("--sweep", metavar="KEY=V1,V2", help="rerun the GRACE stream for each value of one field")
    parser.add_argument("--compare", action="append", default=[], metavar="METHOD:N[:EVERY]",
                        help="also stream N edits with METHOD (checkpoints every EVERY edits, default --every)")
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--cache-edits", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-artifact", type=Path, metavar="DIR", help="save the final codebook (to time it later)")
    parser.add_argument("--latency-artifact", type=Path, metavar="DIR",
                        help="time this saved codebook instead of streaming (use with --n 0 --latency)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)

    loaded = load_model("smollm2-135m")
    requests = stream_requests(args.split, args.n)
    unrelated = unrelated_pairs(args.split, args.unrelated_start, args.unrelated_n)
    config = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    stream_config = StreamConfig(every=args.every)
    results: dict[str, Any] = {"n": len(requests), "split": args.split, "unrelated": len(unrelated), "config": config, "runs": {}}

    variants = [("grace", config)] if requests else []
    if args.sweep:
        key, values = args.sweep.split("=", 1)
        variants = [(f"grace {key}={value}", {**config, key: parse_value(value)}) for value in values.split(",")]
    final = None
    for label, variant in variants:
        editor = make_editor("grace", variant)
        result = run_stream(loaded, editor, requests, unrelated, stream_config)
        results["runs"][label] = {"config": variant, "summary": result.summary, "series": result.series}
        final = result.artifact
        print(json.dumps({label: result.summary}), flush=True)
    for item in args.compare:
        method, count, *every = item.split(":")
        compare_config = StreamConfig(every=int(every[0])) if every else stream_config
        result = run_stream(loaded, make_editor(method), requests[: int(count)], unrelated, compare_config)
        results["runs"][method] = {"config": {}, "summary": result.summary, "series": result.series}
        print(json.dumps({method: result.summary}), flush=True)
    if args.save_artifact and final is not None:
        final.save(args.save_artifact)
    if args.latency_artifact:
        from editing_core.artifacts import load_artifact

        final = load_artifact(args.latency_artifact)
    if args.latency and final is not None:
        prompts = [p for p, _ in unrelated]
        results["latency"] = [forward_latency(loaded, final, prompts, batch, 50) for batch in (1, 8)]
        results["latency_keys"] = len(final.codebook)
        print(json.dumps({"latency": results["latency"]}), flush=True)
    if args.cache_edits:
        results["cache"] = cache_timing(loaded, requests, config, args.cache_edits)
        print(json.dumps({"cache": results["cache"]}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.plot:
        from pipelines.report import plot_stream

        plot_stream({label: run["series"] for label, run in results["runs"].items()}, args.plot,
                    f"sequential CounterFact edits on smollm2-135m ({args.split})")


if __name__ == "__main__":
    main()
