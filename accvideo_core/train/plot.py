"""Loss curves as a PNG without plotting libraries: a tiny raster and a 3x5 pixel font (PNG by ``utils/png.py``).

One panel per series group, x = iteration, y linear or log10, min/max labels. Good enough to eyeball a run.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from accvideo_core.utils.png import write_png

_FONT = {  # 3x5 glyphs, rows top to bottom, '1' = ink
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "_": "000000000000111", "/": "001001010100100", ":": "000010000010000",
    "=": "000111000111000", " ": "000000000000000", "(": "010100100100010", ")": "010001001001010",
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111",
}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


class Canvas:
    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.px = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, c: tuple[int, int, int]) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i:i + 3] = bytes(c)

    def line(self, x0: int, y0: int, x1: int, y1: int, c: tuple[int, int, int]) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(n + 1):
            self.dot(round(x0 + (x1 - x0) * s / n), round(y0 + (y1 - y0) * s / n), c)

    def text(self, x: int, y: int, s: str, c: tuple[int, int, int] = (0, 0, 0), scale: int = 2) -> None:
        for ch in s.upper():
            glyph = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for col in range(3):
                    if glyph[r * 3 + col] == "1":
                        for dy in range(scale):
                            for dx in range(scale):
                                self.dot(x + col * scale + dx, y + r * scale + dy, c)
            x += 4 * scale

    def rgb(self) -> np.ndarray:
        """The raster as an ``[H, W, 3]`` uint8 array."""
        return np.frombuffer(bytes(self.px), dtype=np.uint8).reshape(self.h, self.w, 3)


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def plot_panels(panels: Sequence[tuple[str, Mapping[str, Sequence[tuple[float, float]]], bool]], path: str | Path,
                width: int = 900, panel_height: int = 220) -> Path:
    """Write a PNG with one panel per ``(title, {name: [(x, y), ...]}, log_y)``."""
    canvas = Canvas(width, panel_height * max(1, len(panels)))
    left, right, top, bottom = 90, 20, 28, 26
    for p, (title, series, log_y) in enumerate(panels):
        y0 = p * panel_height
        pts = {n: [(x, y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)] for n, s in series.items()}
        pts = {n: s for n, s in pts.items() if s}
        canvas.text(left, y0 + 6, title)
        x_lo, x_hi, y_top, y_bot = left, width - right, y0 + top, y0 + panel_height - bottom
        for x in range(x_lo, x_hi + 1):
            canvas.dot(x, y_bot, (0, 0, 0))
            canvas.dot(x, y_top, (200, 200, 200))
        for y in range(y_top, y_bot + 1):
            canvas.dot(x_lo, y, (0, 0, 0))
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

        def to_px(x: float, y: float) -> tuple[int, int]:
            yy = math.log10(y) if log_y else y
            return (round(x_lo + (x - xmin) / (xmax - xmin) * (x_hi - x_lo)),
                    round(y_bot - (yy - ymin) / (ymax - ymin) * (y_bot - y_top)))

        label = (lambda v: _fmt(10 ** v)) if log_y else _fmt
        canvas.text(4, y_top, label(ymax))
        canvas.text(4, y_bot - 10, label(ymin))
        canvas.text(x_lo, y_bot + 8, _fmt(xmin))
        canvas.text(x_hi - 8 * len(_fmt(xmax)), y_bot + 8, _fmt(xmax))
        legend_x = left + 8 * (len(title) + 2)
        for i, (name, s) in enumerate(pts.items()):
            c = COLORS[i % len(COLORS)]
            canvas.text(legend_x, y0 + 6, name, c)
            legend_x += 8 * (len(name) + 2)
            prev = None
            for x, y in s:
                cur = to_px(x, y)
                if prev is not None:
                    canvas.line(*prev, *cur, c)
                else:
                    canvas.dot(*cur, c)
                prev = cur
    return write_png(canvas.rgb(), path)
