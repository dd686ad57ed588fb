"""The procedural mini data set: coloured shapes moving over coloured backgrounds, with template captions.

Every clip is a pure function of ``(seed, split, index)``: a :class:`ClipSpec` (shape, colours, direction, size,
start, travel) is drawn with a string-seeded ``random.Random`` (stable across processes and Python versions)
and rendered anti-aliased with signed distance functions. Videos are float tensors ``[3, F, H, W]`` in [-1, 1];
``F`` must be 4k+1 and ``H``, ``W`` multiples of 16, the sizes the 4x-time / 8x-space VAE accepts.

Attribute combinations are split once, deterministically, into ``train`` and ``heldout`` so that held-out
prompts ("a green circle moving up on a white background") are combinations the teacher never saw.
"""
from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..latents import latent_shape

SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "diamond")
SHAPE_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12), "green": (0.12, 0.72, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.98, 0.86, 0.10), "white": (0.97, 0.97, 0.97), "purple": (0.60, 0.20, 0.80),
    "orange": (1.00, 0.55, 0.08),
}
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.03, 0.03, 0.03), "gray": (0.50, 0.50, 0.50), "blue": (0.10, 0.18, 0.55),
    "green": (0.08, 0.40, 0.12), "red": (0.55, 0.08, 0.08), "white": (0.95, 0.95, 0.95),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
CAPTION_TEMPLATE = "a {color} {shape} moving {direction} on a {background} background"
MIN_CONTRAST = 0.45  # minimum RGB distance between a shape's colour and its background
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Geometry:
    """Ranges the clip geometry is drawn from: the shape's radius (fraction of the shorter side) and its travel
    over the clip (fraction of the frame along the motion axis); ``reference`` is the (radius, travel) of a
    caption's reference clip (:func:`parse_caption`)."""

    radius: tuple[float, float]
    travel: tuple[float, float]
    reference: tuple[float, float]

    def __post_init__(self) -> None:
        (r0, r1), (t0, t1) = self.radius, self.travel
        if not (0 < r0 <= r1 and 0 < t0 <= t1 and 2 * (r1 + 0.02) + t1 <= 1.0):
            raise ValueError(f"geometry radius {self.radius}, travel {self.travel}: need 0 < min <= max and "
                             "2 * (max radius + 0.02) + max travel <= 1 so the shape stays inside the frame")


GEOMETRIES: dict[str, Geometry] = {
    # shapes 18-28 px across on 64 x 64, long travel: the first family's VAE and teacher were trained on these; that
    # VAE drew them as blobs (shape probe 22 of 48 held-out encode-decodes)
    "small": Geometry(radius=(0.14, 0.22), travel=(0.3, 0.5), reference=(0.15, 0.4)),
    # shapes 33-41 px across, shorter travel: the same VAE drew them (shape probe 47 of 48) and its latents carry
    # the shape (whole-latent probe 80 % vs 27 % for "small"); the family has trained on these since (docs/demo.md)
    "large": Geometry(radius=(0.26, 0.32), travel=(0.2, 0.3), reference=(0.29, 0.25)),
}
DEFAULT_GEOMETRY = "large"


def geometry_ranges(name: str) -> Geometry:
    if name not in GEOMETRIES:
        raise ValueError(f"unknown clip geometry {name!r}; expected one of {sorted(GEOMETRIES)}")
    return GEOMETRIES[name]


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip. Geometry is in fractions of the frame (x of the width, y of the
    height, sizes of the shorter side), so one spec renders at any resolution."""

    shape: str
    color: str
    background: str
    direction: str
    radius: float  # half the shape's extent, fraction of min(H, W)
    start: tuple[float, float]  # centre (x, y) at frame 0
    travel: float  # distance moved over the clip, fraction of the frame along the motion axis

    def caption(self) -> str:
        text = CAPTION_TEMPLATE.format(color=self.color, shape=self.shape, direction=self.direction,
                                       background=self.background)
        return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange square"

    def combo(self) -> tuple[str, str, str, str]:
        return (self.shape, self.color, self.direction, self.background)


def contrast(color: str, background: str) -> float:
    """RGB distance of a shape colour from a background colour (combinations need >= ``MIN_CONTRAST``)."""
    return math.dist(SHAPE_COLORS[color], BACKGROUND_COLORS[background])


@lru_cache(maxsize=None)
def attribute_combos(split: str = "all", heldout_fraction: float = 0.1) -> tuple[tuple[str, str, str, str], ...]:
    """All (shape, colour, direction, background) combinations with enough contrast, or one split of them.

    The held-out split is a fixed pseudo-random ``heldout_fraction`` of the combinations (independent of any
    run seed, so every script agrees on it).
    """
    combos = [c for c in itertools.product(SHAPES, SHAPE_COLORS, DIRECTIONS, BACKGROUND_COLORS)
              if contrast(c[1], c[3]) >= MIN_CONTRAST]
    if split == "all":
        return tuple(combos)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
    order = list(range(len(combos)))
    random.Random("accvideo-mini-heldout").shuffle(order)
    n_held = max(1, round(heldout_fraction * len(combos)))
    held = set(order[:n_held])
    return tuple(c for i, c in enumerate(combos) if (i in held) == (split == "heldout"))


def sample_spec(rng: random.Random, combo: tuple[str, str, str, str],
                geometry_name: str = DEFAULT_GEOMETRY) -> ClipSpec:
    """Random geometry for an attribute combination: the shape stays fully inside the frame all clip long."""
    shape, color, direction, background = combo
    ranges = geometry_ranges(geometry_name)
    radius = rng.uniform(*ranges.radius)
    travel = rng.uniform(*ranges.travel)
    dx, dy = DIRECTIONS[direction]
    lo, hi = radius + 0.02, 1.0 - radius - 0.02
    along = rng.uniform(lo, hi - travel)  # start coordinate along the motion, leaving room for the travel
    across = rng.uniform(lo, hi)
    if dx:
        start = (along if dx > 0 else 1.0 - along, across)
    else:
        start = (across, along if dy > 0 else 1.0 - along)
    return ClipSpec(shape, color, background, direction, radius, start, travel)


def clip_spec(index: int, *, seed: int = 0, split: str = "train", geometry_name: str = DEFAULT_GEOMETRY) -> ClipSpec:
    """The spec of clip ``index`` of a split: a pure function of ``(seed, split, index, geometry_name)``."""
    if index < 0:
        raise IndexError(f"clip index must be >= 0, got {index}")
    combos = attribute_combos(split)
    rng = random.Random(f"accvideo-mini/{seed}/{split}/{index}")
    return sample_spec(rng, combos[rng.randrange(len(combos))], geometry_name)


def parse_caption(caption: str) -> ClipSpec:
    """The attributes of a template caption, with default geometry (shape centred on the motion's path)."""
    words = ["a" if w == "an" else w for w in caption.lower().split()]
    template = CAPTION_TEMPLATE.split()
    fields = {}
    if len(words) == len(template):
        for word, slot in zip(words, template):
            if slot.startswith("{"):
                fields[slot[1:-1]] = word
            elif word != slot:
                break
    valid = (fields.get("shape") in SHAPES and fields.get("color") in SHAPE_COLORS
             and fields.get("direction") in DIRECTIONS and fields.get("background") in BACKGROUND_COLORS)
    if not valid or len(fields) != 4:
        raise ValueError(
            f"caption {caption!r} does not follow the template {CAPTION_TEMPLATE!r} with shape in {SHAPES}, "
            f"color in {tuple(SHAPE_COLORS)}, direction in {tuple(DIRECTIONS)}, background in "
            f"{tuple(BACKGROUND_COLORS)}")
    dx, dy = DIRECTIONS[fields["direction"]]
    radius, travel = geometry_ranges(DEFAULT_GEOMETRY).reference
    first = 0.5 - travel / 2
    start = ((first if dx > 0 else 1 - first) if dx else 0.5, (first if dy > 0 else 1 - first) if dy else 0.5)
    return ClipSpec(fields["shape"], fields["color"], fields["background"], fields["direction"], radius, start, travel)


def signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of a shape centred at the origin (image axes, y down)."""
    if shape == "circle":
        return torch.hypot(dx, dy) - radius
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    if shape == "diamond":
        return (dx.abs() + dy.abs() - 1.15 * radius) / math.sqrt(2.0)
    if shape == "triangle":  # equilateral, apex up, circumradius 1.25 * radius
        r = 1.25 * radius
        edges = torch.stack([dy, 0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy])
        return edges.max(0).values - r / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_clip(spec: ClipSpec, frames: int = 17, height: int = 64, width: int = 64) -> torch.Tensor:
    """Render a clip as a float32 tensor ``[3, frames, height, width]`` in [-1, 1] (anti-aliased edges)."""
    latent_shape(frames, height, width)  # raises a clear error for sizes the VAE cannot take
    side = min(height, width)
    t = torch.linspace(0.0, 1.0, frames) if frames > 1 else torch.zeros(1)
    dx_dir, dy_dir = DIRECTIONS[spec.direction]
    cx = (spec.start[0] + dx_dir * spec.travel * t) * width  # [F]
    cy = (spec.start[1] + dy_dir * spec.travel * t) * height
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    dx = xs[None, None, :] - cx[:, None, None]  # [F, 1, W]
    dy = ys[None, :, None] - cy[:, None, None]  # [F, H, 1]
    dx, dy = torch.broadcast_tensors(dx, dy)
    coverage = (0.5 - signed_distance(spec.shape, dx, dy, spec.radius * side)).clamp(0.0, 1.0)  # [F, H, W]
    fg = torch.tensor(SHAPE_COLORS[spec.color])[:, None, None, None]
    bg = torch.tensor(BACKGROUND_COLORS[spec.background])[:, None, None, None]
    video = bg + (fg - bg) * coverage[None]
    return video * 2.0 - 1.0


@dataclass(frozen=True)
class MiniVideoConfig:
    """Clip size, seed and geometry of a data set. Defaults: 17 frames x 64 x 64 (latent 5 x 8 x 8), large shapes."""

    frames: int = 17
    height: int = 64
    width: int = 64
    seed: int = 0
    geometry: str = DEFAULT_GEOMETRY  # a key of GEOMETRIES

    def __post_init__(self) -> None:
        latent_shape(self.frames, self.height, self.width)
        geometry_ranges(self.geometry)


class MiniVideoDataset(torch.utils.data.Dataset):
    """``size`` deterministic clips of one split; items are ``{"video", "caption", "index"}``."""

    def __init__(self, size: int, *, split: str = "train", config: MiniVideoConfig = MiniVideoConfig()):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        attribute_combos(split)  # validates the split name
        self.size, self.split, self.config = size, split, config

    def __len__(self) -> int:
        return self.size

    def spec(self, index: int) -> ClipSpec:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a data set of {self.size} clips")
        return clip_spec(index, seed=self.config.seed, split=self.split, geometry_name=self.config.geometry)

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(index)
        c = self.config
        return {"video": render_clip(spec, c.frames, c.height, c.width), "caption": spec.caption(), "index": index}
