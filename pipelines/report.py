"""Presenting edit results: readable text tables, CSV/JSON copies and a before/after chart.

Used by the CLI (eval, run, demo) and the runner (files logged to MLflow). matplotlib is driven
through its object API with the Agg canvas, so no global backend is switched and no window opens.
"""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

# metric -> its pre-edit counterpart; locality compares the edited model with the unedited one,
# so the unedited model's own locality is 1 by definition.
BEFORE_AFTER: tuple[tuple[str, str | None], ...] = (
    ("edit_success", "pre_edit_success"),
    ("paraphrase", "pre_paraphrase"),
    ("locality", None),
    ("edit_success_generated", "pre_edit_success_generated"),
    ("paraphrase_generated", "pre_paraphrase_generated"),
    ("locality_generated", None),
)

TABLE_COLUMNS = ("prompt", "target_new", "before", "after", "accuracy_before", "accuracy_after")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace("\n", "\\n")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_rows(rows: Sequence[Mapping[str, Any]], max_width: int = 44, columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """Rows as an aligned text table of `columns` (those present in some row); by default the
    per-request table (prompt, new target, answers and accuracies before/after)."""
    if not rows:
        return "(no rows)"
    columns = [c for c in columns if any(c in row for row in rows)]
    cells = [[_clip(_cell(row.get(c)), max_width) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Metrics as aligned `name  value` lines; with pre-edit values, as `before -> after`."""
    shown: set[str] = set()
    lines = []
    width = max((len(k) for k in metrics), default=0)
    for name, pre in BEFORE_AFTER:
        if name in metrics and pre is not None and pre in metrics:
            lines.append(f"{name.ljust(width)}  {_cell(metrics[pre])} -> {_cell(metrics[name])}")
            shown.update({name, pre})
    for name, value in metrics.items():
        if name not in shown:
            lines.append(f"{name.ljust(width)}  {_cell(value)}")
    return "\n".join(lines)


VERSION_COLUMNS = ("version", "aliases", "method", "n_edits", "n_new_edits", "parent_version", "gates",
                   "edit_success", "paraphrase", "locality")
FACT_COLUMNS = ("prompt", "target_new", "ground_truth", "method", "digest")


def format_edits(action: str, name: str, result: Any) -> str:
    """The text output of `editflow edits ACTION` for `result` (what infra.registry returned)."""
    if action == "list":
        rows = [{**v, **v["metrics"], "aliases": ",".join(v["aliases"])} for v in result]
        return f"{name}: {len(rows)} versions\n" + format_rows(rows, max_width=40, columns=VERSION_COLUMNS)
    if action == "show":
        head = {k: v for k, v in result.items() if k not in ("facts", "metrics")}
        head["aliases"] = ", ".join(head["aliases"]) or None
        if head.get("created"):
            head["created"] = datetime.fromtimestamp(head["created"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines = [f"{name} version {result['version']}"] + [f"  {k}: {_cell(v)}" for k, v in head.items()]
        lines += ["metrics:", *(f"  {k}: {_cell(v)}" for k, v in sorted(result["metrics"].items()))]
        lines += [f"facts ({len(result['facts'])}):", format_rows(result["facts"], columns=FACT_COLUMNS)]
        return "\n".join(lines)
    if action == "diff":
        lines = [f"{name}: version {result['old']} -> {result['new']}"]
        for label in ("added", "removed"):
            lines += [f"facts {label} ({len(result[label])}):", format_rows(result[label], columns=FACT_COLUMNS)]
        lines.append("metrics:")
        lines += [f"  {k}: {_cell(v['old'])} -> {_cell(v['new'])}" for k, v in result["metrics"].items()]
        return "\n".join(lines)
    if action == "promote":
        return f"{name}: champion is version {result['champion']} (was {result['previous'] or 'none'})"
    return f"{name}: champion rolled back from version {result['rolled_back']} to {result['champion']}"


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    columns = [c for c in TABLE_COLUMNS if any(c in row for row in rows)]
    columns += sorted({k for row in rows for k in row} - set(columns))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_json(data: Any, path: Path) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def chart_values(metrics: Mapping[str, Any]) -> list[tuple[str, float, float]]:
    """(metric, before, after) for every before/after pair the metrics hold."""
    values = []
    for name, pre in BEFORE_AFTER:
        after = metrics.get(name)
        if not isinstance(after, (int, float)) or math.isnan(after):
            continue
        before = metrics.get(pre) if pre is not None else 1.0
        if isinstance(before, (int, float)):
            values.append((name, float(before), float(after)))
    return values


def plot_before_after(metrics: Mapping[str, Any], path: Path, title: str) -> Path | None:
    """A PNG bar chart of each metric before vs after the edit; None when there is nothing to plot."""
    values = chart_values(metrics)
    if not values:
        return None
    series = {"before edit": [v[1] for v in values], "after edit": [v[2] for v in values]}
    return plot_bars(series, [v[0] for v in values], path, title)


BAR_COLORS = ("#9aa5b1", "#2f6fb3", "#d9822b", "#3c9d5d", "#8e5ea2", "#c0392b", "#16a085", "#7f6a3b")


def plot_bars(series: Mapping[str, Sequence[float]], labels: Sequence[str], path: Path, title: str) -> Path:
    """A PNG grouped bar chart of scores in [0, 1]: one group per label, one bar per series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(8, 1.1 * len(labels)), 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        axes.bar([p + offset for p in range(len(labels))], values, width=width, label=name, color=BAR_COLORS[i % len(BAR_COLORS)])
    axes.set_xticks(list(range(len(labels))), [label.replace("_", "\n") for label in labels], fontsize=8)
    axes.set_ylim(0, 1.2 + 0.1 * ((len(series) - 1) // 4))  # room for the legend rows
    axes.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("score")
    axes.set_title(title)
    axes.legend(loc="upper center", ncol=min(len(series), 4), fontsize=8, frameon=False)  # rows of 4 stay inside the axes
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


STREAM_PANELS = (("err", "edit retention (ERR)"), ("trr", "test retention (TRR)"),
                 ("paraphrase", "paraphrase accuracy"), ("seconds_per_edit", "seconds per edit"))


def plot_stream(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> Path:
    """A PNG of lifelong-editing curves against the number of edits: ERR, TRR, paraphrase
    accuracy and seconds per edit, one line per run (method)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), dpi=120)
    FigureCanvasAgg(figure)
    for i, (key, label) in enumerate(STREAM_PANELS):
        axes = figure.add_subplot(2, 2, i + 1)
        for j, (name, series) in enumerate(runs.items()):
            points = [(row["edits"], row[key]) for row in series if row.get(key) is not None]
            if points:
                axes.plot(*zip(*points), marker="o", markersize=3, label=name, color=BAR_COLORS[(j + 1) % len(BAR_COLORS)])
        axes.set_title(label, fontsize=10)
        axes.set_xlabel("edits")
        if key != "seconds_per_edit":
            axes.set_ylim(-0.02, 1.05)
        else:
            axes.set_yscale("log")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, frameon=False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path
