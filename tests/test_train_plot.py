"""The trainer's loss-curve PNG (train/plot.py on the shared canvas), read back with Pillow."""
from __future__ import annotations

import numpy as np

from accvideo_core.train.plot import SERIES_COLORS, plot_panels
from tests.test_toy1d import read_png


def test_loss_curves_draw_every_series_in_its_colour(tmp_path):
    panels = [("LOSS", {"a": [(i, 1.0 / (i + 1)) for i in range(20)], "b": [(i, 2.0) for i in range(20)]}, True),
              ("EMPTY", {"c": [(0, float("nan"))]}, False)]
    img = read_png(plot_panels(panels, tmp_path / "curves.png", width=300, panel_height=120).read_bytes())
    assert img.shape == (240, 300, 3)
    colours = {tuple(int(round(v * 255)) for v in c) for c in SERIES_COLORS[:2]}
    found = {c for c in colours if (img[:120] == c).all(axis=-1).sum() > 50}  # legend text + the line
    assert found == colours
    assert not any((img[120:] == c).all(axis=-1).any() for c in colours)  # a panel without finite points
    assert (img == 255).all(axis=-1).mean() > 0.8  # mostly background
