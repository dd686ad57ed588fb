"""Loss curves as a PNG without plotting libraries, drawn on the project's one canvas (``utils/canvas.py``).

One panel per series group, x = iteration, y linear or log10, min/max labels. Good enough to eyeball a run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from accvideo_core.utils.canvas import BLACK, LIGHT, Canvas, Color, text_width

SERIES_COLORS: list[Color] = [tuple(v / 255 for v in c) for c in (  # the ten "tab10" colours
    (31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def plot_panels(panels: Sequence[tuple[str, Mapping[str, Sequence[tuple[float, float]]], bool]], path: str | Path,
                width: int = 900, panel_height: int = 220) -> Path:
    """Write a PNG with one panel per ``(title, {name: [(x, y), ...]}, log_y)``."""
    canvas = Canvas(width, panel_height * max(1, len(panels)))
    left, right, top, bottom = 110, 20, 30, 30
    for p, (title, series, log_y) in enumerate(panels):
        y0 = p * panel_height
        pts = {n: [(x, y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)] for n, s in series.items()}
        pts = {n: s for n, s in pts.items() if s}
        canvas.text(left, y0 + 6, title)
        x_lo, x_hi, y_top, y_bot = left, width - right, y0 + top, y0 + panel_height - bottom
        canvas.polyline([x_lo, x_hi], [y_top, y_top], LIGHT)
        canvas.polyline([x_lo, x_lo, x_hi], [y_top, y_bot, y_bot], BLACK)
        if not pts:
            continue
        xs = [x for s in pts.values() for x, _ in s]
        ys = [math.log10(y) if log_y else y for s in pts.values() for _, y in s]
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if ymax - ymin < 1e-12:
            ymin, ymax = ymin - 0.5, ymax + 0.5
        if xmax == xmin:
            xmax = xmin + 1

        def px(x: float) -> float:
            return x_lo + (x - xmin) / (xmax - xmin) * (x_hi - x_lo)

        def py(y: float) -> float:
            yy = math.log10(y) if log_y else y
            return y_bot - (yy - ymin) / (ymax - ymin) * (y_bot - y_top)

        label = (lambda v: _fmt(10 ** v)) if log_y else _fmt
        canvas.text(x_lo - 6, y_top, label(ymax), anchor="right")
        canvas.text(x_lo - 6, y_bot - 14, label(ymin), anchor="right")
        canvas.text(x_lo, y_bot + 8, _fmt(xmin))
        canvas.text(x_hi, y_bot + 8, _fmt(xmax), anchor="right")
        legend_x = left + text_width(title + "  ")
        for i, (name, s) in enumerate(pts.items()):
            c = SERIES_COLORS[i % len(SERIES_COLORS)]
            canvas.text(legend_x, y0 + 6, name, c)
            legend_x += text_width(name + "  ")
            canvas.polyline([px(x) for x, _ in s], [py(y) for _, y in s], c)
            if len(s) == 1:
                canvas.dots([px(s[0][0])], [py(s[0][1])], c)
    return canvas.save_png(path)
