"""One matplotlib figure factory for the PNGs editing_core draws (imported when a plot is drawn)."""

from __future__ import annotations

from typing import Any


def agg_figure(size: tuple[float, float], dpi: int = 120) -> Any:
    """A matplotlib Figure on its own Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure
