"""Data coordinates onto the shared canvas (``utils/canvas.py``): :class:`Axes` maps data into a panel and draws
its frame, ticks and labels for the toy experiment's figure."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..utils.canvas import BLACK, GRAY, LIGHT, Canvas, Color


@dataclass
class Axes:
    """Maps data coordinates into a pixel rectangle of a canvas and draws a frame, ticks and labels."""

    canvas: Canvas
    left: int
    top: int
    width: int
    height: int
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: np.ndarray | float) -> np.ndarray:
        x0, x1 = self.xlim
        return self.left + (np.asarray(x, dtype=np.float64) - x0) / (x1 - x0) * self.width

    def py(self, y: np.ndarray | float) -> np.ndarray:
        y0, y1 = self.ylim
        return self.top + self.height - (np.asarray(y, dtype=np.float64) - y0) / (y1 - y0) * self.height

    def frame(self, title: str = "", xlabel: str = "", ylabel: str = "",
              xticks: list[float] | None = None, yticks: list[float] | None = None, fmt: str = "{:g}") -> None:
        c, l, t, w, h = self.canvas, self.left, self.top, self.width, self.height
        for tick in xticks or []:
            x = float(self.px(tick))
            c.polyline([x, x], [t, t + h], LIGHT)
            c.polyline([x, x], [t + h, t + h + 5], BLACK)
            c.text(x, t + h + 9, fmt.format(tick), scale=2, anchor="center")
        for tick in yticks or []:
            y = float(self.py(tick))
            c.polyline([l, l + w], [y, y], LIGHT)
            c.polyline([l - 5, l], [y, y], BLACK)
            c.text(l - 9, y - 7, fmt.format(tick), scale=2, anchor="right")
        c.polyline([l, l + w, l + w, l, l], [t, t, t + h, t + h, t], BLACK, width=1.5)
        if title:
            c.text(l, t - 24, title, scale=2)
        if xlabel:
            c.text(l + w / 2, t + h + 30, xlabel, scale=2, anchor="center")
        if ylabel:
            c.text(l + 6, t + 6, ylabel, scale=2, color=GRAY)

    def line(self, x, y, color: Color, width: float = 1.0, alpha: float = 1.0, dashed: bool = False) -> None:
        self.canvas.polyline(self.px(x), self.py(y), color, width=width, alpha=alpha, dashed=dashed)

    def scatter(self, x, y, color: Color, radius: float = 1.5, alpha: float = 1.0) -> None:
        self.canvas.dots(self.px(x), self.py(y), color, radius=radius, alpha=alpha)
