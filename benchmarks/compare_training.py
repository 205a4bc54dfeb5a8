"""Training curves of several editor runs on the same axes, from each run's history.json.

    .venv/bin/python benchmarks/compare_training.py --run "rates from 1e-3=/tmp/bench/mend" \
        --run "rates calibrated=/tmp/bench5/mend" --max-step 2000 --every 100 \
        --plot docs/results/mend_calibration.png

--run LABEL=DIR takes DIR/history.json (what `editflow train-editor --out DIR` writes). Prints
a table of the train and validation edit accuracy every --every steps and draws loss, edit NLL
and edit accuracy against the step (tasks.mend_train.plot_histories).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tasks.mend_train import HISTORY_NAME, plot_histories


def load_run(spec: str, max_step: int | None) -> tuple[str, list[dict]]:
    label, sep, directory = spec.partition("=")
    if not sep or not label or not directory:
        raise SystemExit(f"--run {spec!r}: expected LABEL=DIR")
    path = Path(directory) / HISTORY_NAME
    if not path.exists():
        raise SystemExit(f"--run {spec!r}: {path} does not exist")
    history = json.loads(path.read_text())
    return label, [h for h in history if max_step is None or h["step"] <= max_step]


def table(runs: dict[str, list[dict]], every: int) -> str:
    """Markdown: per step, each run's train / val edit accuracy ("-" where it has none)."""
    steps = sorted({h["step"] for history in runs.values() for h in history if h["step"] % every == 0})
    by_step = {label: {h["step"]: h for h in history} for label, history in runs.items()}
    header = ["step", *(f"{label} {part}" for label in runs for part in ("train", "val"))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for step in steps:
        cells = [str(step)]
        for label in runs:
            row = by_step[label].get(step, {})
            cells += [f"{row[k]:.3f}" if k in row else "-" for k in ("edit_accuracy", "val_edit_accuracy")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR", help="a train-editor output directory")
    parser.add_argument("--max-step", type=int, help="only the steps up to this one")
    parser.add_argument("--every", type=int, default=100, help="table rows every this many steps")
    parser.add_argument("--title", default="MEND editor training")
    parser.add_argument("--plot", type=Path, help="draw the curves as a PNG here")
    args = parser.parse_args()
    runs = dict(load_run(spec, args.max_step) for spec in args.run)
    print(table(runs, args.every))
    if args.plot:
        print(f"wrote {plot_histories(runs, args.plot, args.title)}")


if __name__ == "__main__":
    main()
