"""Ray Serve under load: concurrent clients on loopback against an edited version of SmolLM2-135M
and against the unedited base model (the `base` version of the same app).

    .venv/bin/python benchmarks/serve_load.py --clients 32 --seconds 60 --json docs/results/serve_load.json

Setup: the demo facts edited with FT+KL in this process, registered as version 1 in a fresh
SQLite MLflow store, served by `infra.serve` on a local Ray (2 CPUs). Each client sends
`/generate` requests (a demo prompt, --max-new-tokens) back to back for --seconds; the two phases
run one after the other. Reported: requests, errors, requests/s, p50 / p99 latency, and the
edited / base throughput ratio.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from statistics import quantiles

from editing_core.data import load_facts
from editing_core.editors import make_editor
from editing_core.models import load_model
from infra import registry
from infra.serve import BASE_VERSION, ServeOptions, start
from infra.tracking import tracked_run

DEMO_FACTS = Path(__file__).resolve().parents[1] / "pipelines" / "examples" / "demo_facts.jsonl"
NAME = "serve-bench-edits"


def register_demo_edit(tracking_uri: str, workdir: Path) -> None:
    loaded = load_model("smollm2-135m")
    requests = load_facts(DEMO_FACTS)
    artifact = make_editor("ft_kl", layers=[4, 5, 6], lr=1e-3).edit(loaded, requests)
    with tracked_run(tracking_uri, "serve-bench", "edit") as run:
        registry.register_version(run.run_id, tracking_uri, registry.RegistrySpec(name=NAME), "smollm2-135m",
                                  [artifact], {"edit_success": 1.0, "locality": 1.0}, "0" * 64, "0" * 64, None, workdir)


def load(url: str, version: str, prompts: list[str], clients: int, seconds: float, max_new_tokens: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        i = index
        while time.monotonic() < deadline:
            body = json.dumps({"prompt": prompts[i % len(prompts)], "max_new_tokens": max_new_tokens, "version": version})
            request = urllib.request.Request(f"{url}/generate", body.encode(), {"Content-Type": "application/json"})
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    ok = response.status == 200 and json.loads(response.read())["version"] == version
                    problem = None if ok else f"status {response.status}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                problem = str(exc)
            elapsed = time.perf_counter() - started
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(elapsed)
            i += clients

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - started  # includes the requests still in flight at the deadline
    cuts = quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {"version": version, "requests": len(latencies), "errors": len(errors), "first_errors": errors[:3],
            "requests_per_s": len(latencies) / wall, "p50_s": cuts[49], "p99_s": cuts[98], "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=2.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        register_demo_edit(uri, Path(tmp))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            url = start(ServeOptions(name=NAME, tracking_uri=uri, replicas=args.replicas,
                                     cpus_per_replica=args.cpus_per_replica), port=port)
            prompts = [r.prompt for r in load_facts(DEMO_FACTS)]
            load(url, "1", prompts, 2, 5, args.max_new_tokens)  # warm-up: lineage download, first generation
            load(url, BASE_VERSION, prompts, 2, 5, args.max_new_tokens)
            results = {label: load(url, version, prompts, args.clients, args.seconds, args.max_new_tokens)
                       for label, version in (("edited", "1"), ("base", BASE_VERSION))}
        finally:
            serve.shutdown()
            ray.shutdown()
    ratio = results["edited"]["requests_per_s"] / results["base"]["requests_per_s"]
    print(f"\n{args.clients} clients x {args.seconds:g} s, {args.max_new_tokens} new tokens, {args.replicas} replica(s) "
          f"x {args.cpus_per_replica:g} CPU\n")
    print("| model | requests | errors | requests/s | p50 s | p99 s |\n|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} |")
    print(f"\nedited / base throughput: {ratio:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "results": results,
                                         "edited_over_base": ratio}, indent=2))


if __name__ == "__main__":
    main()
