"""The project's one drawing canvas: an RGB float raster with alpha-blended lines, dots, rectangles and a 5x7
bitmap font, written as PNG by ``utils/png.py``.

Just enough for the toy experiment's figure (``toy/plot.py`` maps data onto it) and the trainer's loss curves
(``train/plot.py``) without adding matplotlib to anybody's environment. Coordinates are pixels (x right, y down).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .png import write_png

Color = tuple[float, float, float]

BLACK: Color = (0.0, 0.0, 0.0)
GRAY: Color = (0.55, 0.55, 0.55)
LIGHT: Color = (0.88, 0.88, 0.88)
BLUE: Color = (0.12, 0.35, 0.75)
RED: Color = (0.85, 0.12, 0.12)
GREEN: Color = (0.1, 0.6, 0.2)
ORANGE: Color = (0.95, 0.55, 0.05)
PURPLE: Color = (0.5, 0.2, 0.7)

# 5x7 glyphs, one int per row, bit 4 = leftmost column (classic LCD character set). Text is drawn upper-case.
_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 17, 31, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0, 0, 0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8),
    "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), "=": (0, 0, 31, 0, 31, 0, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    ":": (0, 12, 12, 0, 12, 12, 0), ";": (0, 12, 12, 0, 12, 4, 8), "/": (0, 1, 2, 4, 8, 16, 0), "_": (0, 0, 0, 0, 0, 0, 31),
    "<": (2, 4, 8, 16, 8, 4, 2), ">": (8, 4, 2, 1, 2, 4, 8), "[": (14, 8, 8, 8, 8, 8, 14),
    "]": (14, 2, 2, 2, 2, 2, 14), "|": (4, 4, 4, 4, 4, 4, 4), "'": (12, 4, 8, 0, 0, 0, 0),
    "*": (0, 4, 21, 14, 21, 4, 0), "?": (14, 17, 1, 2, 4, 0, 4), "{": (2, 4, 4, 8, 4, 4, 2),
    "}": (8, 4, 4, 2, 4, 4, 8), "#": (10, 10, 31, 10, 31, 10, 10), "~": (0, 0, 8, 21, 2, 0, 0),
}
GLYPH_W, GLYPH_H = 5, 7


class Canvas:
    """An RGB float image in [0, 1] with alpha-blended drawing primitives."""

    def __init__(self, width: int, height: int, background: Color = (1.0, 1.0, 1.0)):
        self.width, self.height = int(width), int(height)
        self.pixels = np.empty((self.height, self.width, 3), dtype=np.float32)
        self.pixels[:] = background

    def blend(self, xs: np.ndarray, ys: np.ndarray, color: Color, alpha: float = 1.0) -> None:
        """Blend ``color`` into the given pixel coordinates (each pixel once, out-of-canvas pixels dropped)."""
        xs = np.asarray(xs, dtype=np.int64).ravel()
        ys = np.asarray(ys, dtype=np.int64).ravel()
        keep = (xs >= 0) & (xs < self.width) & (ys >= 0) & (ys < self.height)
        if not keep.any():
            return
        flat = np.unique(ys[keep] * self.width + xs[keep])
        view = self.pixels.reshape(-1, 3)
        view[flat] = (1.0 - alpha) * view[flat] + alpha * np.asarray(color, dtype=np.float32)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: Color, alpha: float = 1.0) -> None:
        xa, xb = sorted((int(round(x0)), int(round(x1))))
        ya, yb = sorted((int(round(y0)), int(round(y1))))
        yy, xx = np.mgrid[ya:yb + 1, xa:xb + 1]
        self.blend(xx, yy, color, alpha)

    def dots(self, x: np.ndarray, y: np.ndarray, color: Color, radius: float = 1.5, alpha: float = 1.0) -> None:
        """Filled discs at many centres (alpha is applied once per pixel, so overlaps do not darken)."""
        r = int(np.ceil(radius))
        oy, ox = np.mgrid[-r:r + 1, -r:r + 1]
        disc = (ox ** 2 + oy ** 2) <= radius ** 2 + 0.25
        ox, oy = ox[disc], oy[disc]
        cx = np.rint(np.asarray(x, dtype=np.float64)).astype(np.int64).ravel()
        cy = np.rint(np.asarray(y, dtype=np.float64)).astype(np.int64).ravel()
        self.blend(cx[:, None] + ox[None], cy[:, None] + oy[None], color, alpha)

    def polyline(self, x: np.ndarray, y: np.ndarray, color: Color, width: float = 1.0, alpha: float = 1.0,
                 dashed: bool = False) -> None:
        """A polyline through the points, sampled every half pixel and stamped with a disc of ``width``."""
        x = np.asarray(x, dtype=np.float64).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        px, py = [], []
        for i in range(len(x) - 1):
            n = max(2, int(np.hypot(x[i + 1] - x[i], y[i + 1] - y[i]) * 2) + 1)
            f = np.linspace(0.0, 1.0, n)
            px.append(x[i] + f * (x[i + 1] - x[i]))
            py.append(y[i] + f * (y[i + 1] - y[i]))
        if not px:
            return
        sx, sy = np.concatenate(px), np.concatenate(py)
        if dashed:
            arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(sx), np.diff(sy)))])
            on = (arc // 6) % 2 == 0
            sx, sy = sx[on], sy[on]
        self.dots(sx, sy, color, radius=max(0.5, width / 2), alpha=alpha)

    def text(self, x: float, y: float, s: str, color: Color = BLACK, scale: int = 2, anchor: str = "left") -> None:
        """Bitmap text with its top at ``y``; ``anchor`` is "left", "center" or "right" for ``x``."""
        s = s.upper()
        w = text_width(s, scale)
        x0 = int(round(x - (w / 2 if anchor == "center" else w if anchor == "right" else 0)))
        y0 = int(round(y))
        xs, ys = [], []
        for i, ch in enumerate(s):
            rows = _GLYPHS.get(ch, _GLYPHS["?"])
            for r, bits in enumerate(rows):
                for c in range(GLYPH_W):
                    if bits >> (GLYPH_W - 1 - c) & 1:
                        gx = x0 + i * (GLYPH_W + 1) * scale + c * scale
                        gy = y0 + r * scale
                        yy, xx = np.mgrid[gy:gy + scale, gx:gx + scale]
                        xs.append(xx.ravel())
                        ys.append(yy.ravel())
        if xs:
            self.blend(np.concatenate(xs), np.concatenate(ys), color)

    def to_uint8(self) -> np.ndarray:
        return (np.clip(self.pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def save_png(self, path: str | Path) -> Path:
        return write_png(self.to_uint8(), path)


def text_width(s: str, scale: int = 2) -> int:
    return max(0, len(s) * (GLYPH_W + 1) * scale - scale)
