"""The shipped miniature HunyuanVideo family (``assets/mini/``): tiny text encoder, tiny VAE, tiny teacher.

Loaded through the project's own loaders (``load_vae``, ``load_transformer``, ``TinyTextEncoder.load``), so the
miniature pipeline exercises the same code as the real 13B one: text encoding -> flow sampling in model space
-> ``to_vae_space`` -> VAE decoding.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from ..latents import latent_shape, to_vae_space
from ..models.loading import load_transformer
from ..models.vae_loading import load_vae
from ..sampling import HUNYUAN_TEACHER, flow_sigmas, sample_flow, seeded_noise
from .data import BACKGROUND_COLORS, SHAPE_COLORS, SHAPES, MiniVideoConfig, parse_caption, render_clip, signed_distance
from .text_encoder import TextEncoding, TinyTextEncoder

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "mini"
FILES = {"text_encoder": "text_encoder.safetensors", "vae": "vae.safetensors", "teacher": "teacher.safetensors"}
VIDEO = MiniVideoConfig()  # 17 frames x 64 x 64 -> latent 5 x 8 x 8
# Embedded guidance of the miniature's recipes. HunyuanVideo's (and AccVideo's) is 6; this 2.5M-parameter teacher
# draws the prompted colour in 42 of the 59 validation prompts at 6 and in 48 at 4, where teacher-5 is still far
# from teacher-50 (docs/demo.md, "Pictures that follow the prompt"). Steps and shift stay the real recipes'.
GUIDANCE = 4.0


@dataclass
class MiniFamily:
    """The three models plus where they came from. ``teacher`` is fp32 for compute (stored bf16)."""

    text_encoder: TinyTextEncoder
    vae: torch.nn.Module
    teacher: torch.nn.Module
    paths: dict[str, Path] = field(default_factory=dict)

    def encode(self, prompts: Sequence[str]) -> TextEncoding:
        return self.text_encoder.encode(list(prompts))

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Seeded model-space noise, made on the CPU like ComfyUI (and the SynVid dumper)."""
        return seeded_noise(latent_shape(VIDEO.frames, VIDEO.height, VIDEO.width)[1:], seeds)

    def sample(self, model: torch.nn.Module, text: TextEncoding, noise: torch.Tensor, steps: int, *,
               guidance: float = GUIDANCE, shift: float = HUNYUAN_TEACHER.shift) -> torch.Tensor:
        """Euler flow sampling (``sample_flow``) from ``noise`` -> model-space latents; shift defaults to the
        teacher recipe's (``sampling.HUNYUAN_TEACHER``; the student recipe uses the same), guidance to the
        miniature's ``GUIDANCE``."""
        return sample_flow(model, noise, flow_sigmas(steps, shift), text_states=text.states, text_mask=text.mask,
                           pooled=text.pooled, guidance=guidance)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> videos ``[B, 3, F, H, W]`` in [-1, 1]."""
        return self.vae.decode(to_vae_space(latents), mode="untiled").clamp(-1, 1)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = HUNYUAN_TEACHER.steps, *,
                 model: torch.nn.Module | None = None,
                 guidance: float = GUIDANCE) -> tuple[torch.Tensor, dict]:
        """Text -> video for each prompt, one at a time. Returns (videos ``[B, 3, F, H, W]``, seconds per stage)."""
        model = model or self.teacher
        times = {"text": 0.0, "sampling": 0.0, "decode": 0.0}
        videos = []
        for prompt, seed in zip(prompts, seeds):
            t0 = time.perf_counter()
            text = self.encode([prompt])
            t1 = time.perf_counter()
            lat = self.sample(model, text, self.noise([seed]), steps, guidance=guidance)
            t2 = time.perf_counter()
            videos.append(self.decode(lat))
            t3 = time.perf_counter()
            for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[k] += dt
        return torch.cat(videos), times


def asset_paths(root: str | os.PathLike | None = None) -> dict[str, Path]:
    root = Path(root) if root is not None else ASSETS
    paths = {k: root / name for k, name in FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"miniature family files missing: {missing}. They ship in the repository under "
                                "assets/mini/ (retrain: python -m accvideo_core.mini.train_vae, then "
                                "python -m accvideo_core.mini.train_teacher)")
    return paths


def load_family(root: str | os.PathLike | None = None, *, teacher: str | os.PathLike | None = None,
                vae: str | os.PathLike | None = None) -> MiniFamily:
    """Load the shipped family (or one under ``root``); ``teacher`` replaces the teacher file (e.g. a student),
    ``vae`` the VAE file (e.g. a decoder candidate)."""
    paths = asset_paths(root)
    if teacher is not None:
        paths["teacher"] = Path(teacher)
    if vae is not None:
        paths["vae"] = Path(vae)
    return MiniFamily(text_encoder=TinyTextEncoder.load(paths["text_encoder"]),
                      vae=load_vae(paths["vae"], dtype=torch.float32).eval(),
                      teacher=load_transformer(paths["teacher"], dtype=torch.float32).eval(), paths=paths)


def _far_from_background(video: torch.Tensor, caption: str, frame: int) -> torch.Tensor:
    """Per-pixel RGB distance ``[H, W]`` of ``frame`` from the prompted background colour."""
    rgb = (video[:, frame].float() + 1) / 2
    bg = torch.tensor(BACKGROUND_COLORS[parse_caption(caption).background])[:, None, None]
    return (rgb - bg).norm(dim=0)


def _drawn_shape(video: torch.Tensor, caption: str, frame: int) -> torch.Tensor:
    """``[H, W]`` mask of the pixels of ``frame`` at least half as far from the prompted background as the farthest."""
    far = _far_from_background(video, caption, frame)
    return far >= 0.5 * far.max()


def shape_region_colour(video: torch.Tensor, caption: str, *, frame: int) -> tuple[str, float]:
    """Nearest named shape colour to the mean colour of ``video`` (``[3, F, H, W]`` in [-1, 1]) over the pixels
    of ``frame`` that differ most from the prompted background, and that distance."""
    rgb = (video[:, frame].float() + 1) / 2  # [3, H, W] in [0, 1]
    mean = rgb[:, _drawn_shape(video, caption, frame)].mean(dim=1)
    names = list(SHAPE_COLORS)
    dists = torch.stack([(mean - torch.tensor(SHAPE_COLORS[n])).norm() for n in names])
    return names[int(dists.argmin())], float(dists.min())


def centroid(video: torch.Tensor, caption: str, frame: int) -> tuple[float, float]:
    """(x, y) in [0, 1] of the pixels of ``frame`` least like the prompted background (weighted centroid)."""
    w = (_far_from_background(video, caption, frame) - 0.25).clamp_min(0)
    h, wd = w.shape
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(wd) + 0.5) / wd
    total = w.sum().clamp_min(1e-6)
    return float((w.sum(0) * xs).sum() / total), float((w.sum(1) * ys).sum() / total)


@lru_cache(maxsize=None)
def _unit_shape_areas(n: int = 512) -> dict[str, float]:
    """Area of each shape at radius 1 (numerically, on an ``n`` x ``n`` grid over [-2, 2]^2)."""
    c = (torch.arange(n) + 0.5) / n * 4 - 2
    dy, dx = torch.meshgrid(c, c, indexing="ij")
    return {s: float((signed_distance(s, dx, dy, 1.0) <= 0).float().mean()) * 16 for s in SHAPES}


def shape_fit(video: torch.Tensor, caption: str, *, frame: int) -> dict[str, float]:
    """How well each shape fits the drawn one at ``frame``: IoU of the pixels at least half as far from the
    prompted background as the farthest (the drawn shape) with each shape's mask of the same area and centroid."""
    mask = _drawn_shape(video, caption, frame)
    h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    area = mask.sum().clamp_min(1)
    cx, cy = (xs * mask).sum() / area, (ys * mask).sum() / area
    fits = {}
    for shape, unit_area in _unit_shape_areas().items():
        template = signed_distance(shape, xs - cx, ys - cy, math.sqrt(float(area) / unit_area)) <= 0
        fits[shape] = float((template & mask).sum() / (template | mask).sum())
    return fits


class PromptChecks(NamedTuple):
    colour: bool
    motion: bool
    shape: bool


def prompt_checks(video: torch.Tensor, caption: str) -> PromptChecks:
    """Colour, motion and shape of a decoded video ``[3, F, H, W]`` against its template caption: the pixels least
    like the prompted background have the prompted shape colour at the middle frame (:func:`shape_region_colour`),
    their centroid moves the prompted way by more than 5 % of the frame from the first to the last frame, and the
    prompted shape fits them best at the middle frame (:func:`shape_fit`; the renderer's clips score 48 of 48)."""
    spec = parse_caption(caption)
    middle = video.shape[1] // 2
    colour_ok = shape_region_colour(video, caption, frame=middle)[0] == spec.color
    (x0, y0), (x1, y1) = centroid(video, caption, 0), centroid(video, caption, -1)
    moved = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}[spec.direction]
    fits = shape_fit(video, caption, frame=middle)
    return PromptChecks(colour_ok, moved > 0.05, max(fits, key=fits.get) == spec.shape)


def reference_video(caption: str) -> torch.Tensor:
    """The procedural renderer's version of a caption (default geometry), for side-by-side pictures."""
    return render_clip(parse_caption(caption), VIDEO.frames, VIDEO.height, VIDEO.width)
