"""Compare miniature teacher checkpoints on every held-out prompt, with noise seeds the demo and tests never use.

``python -m accvideo_core.mini.validate CANDIDATE.safetensors [...] [--prompts 59] [--steps 50] [--guidance 4 6]
[--vae VAE.safetensors] [--usage [--geometry large]]``

Each candidate generates one video per held-out prompt at the miniature's teacher recipe (50 steps, shift 7 as
``sampling.HUNYUAN_TEACHER``; guidance ``family.GUIDANCE``, 4.0, or each ``--guidance`` value; seeds 100, 101,
...; the demo and the tests use 7, 8 and 11) and is scored with the demo's probes
(:func:`~accvideo_core.mini.family.prompt_checks`): how many videos show the prompted shape colour, the prompted
motion, both, the prompted shape, and all three. This is how a teacher run is chosen among candidates trained side
by side, without looking at the demo's or the tests' videos.

``--usage`` also prints how much the teacher relies on each caption attribute (:func:`attribute_usage`).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from ..demo import heldout_prompts
from ..sampling import HUNYUAN_TEACHER
from .data import (BACKGROUND_COLORS, DEFAULT_GEOMETRY, DIRECTIONS, GEOMETRIES, MIN_CONTRAST, SHAPE_COLORS, SHAPES,
                   ClipSpec, attribute_combos, clip_spec, contrast)
from .family import GUIDANCE, MiniFamily, load_family, prompt_checks
from .train_teacher import encode_clips

FIRST_SEED = 100
ATTRIBUTES = {"shape": SHAPES, "color": tuple(SHAPE_COLORS), "background": tuple(BACKGROUND_COLORS),
              "direction": tuple(DIRECTIONS)}


def validate_teacher(family: MiniFamily, *, prompts: int | None = None, steps: int = HUNYUAN_TEACHER.steps,
                     guidance: float = GUIDANCE) -> dict:
    """Colour / motion / both / shape / all-three counts of ``family.teacher`` over ``prompts`` held-out prompts
    (default: all)."""
    captions = heldout_prompts(prompts or len(attribute_combos("heldout")))
    videos, _ = family.generate(captions, [FIRST_SEED + i for i in range(len(captions))], steps, guidance=guidance)
    checks = [prompt_checks(video, caption) for video, caption in zip(videos, captions)]
    return {"videos": len(captions), "steps": steps, "colour_ok": sum(c.colour for c in checks),
            "motion_ok": sum(c.motion for c in checks), "both_ok": sum(c.colour and c.motion for c in checks),
            "shape_ok": sum(c.shape for c in checks), "all_ok": sum(all(c) for c in checks)}


@torch.no_grad()
def attribute_usage(family: MiniFamily, *, clips: int = 96, sigmas: tuple[float, ...] = (0.5, 0.8, 0.95),
                    geometry: str = DEFAULT_GEOMETRY) -> dict[str, dict[str, float]]:
    """How much the teacher (conditional, guidance 1) relies on each caption attribute: its flow loss on ``clips``
    encoded held-out clips with the true caption, and how much it rises when one attribute of every caption is
    replaced by another value (keeping the colour contrast the data set requires), per noise level sigma."""
    seed = 5
    specs = [clip_spec(i, seed=seed, split="heldout", geometry_name=geometry) for i in range(clips)]
    x0 = encode_clips(family.vae, family.text_encoder, clips, seed, log=lambda _: None, geometry=geometry,
                      split="heldout")["latents"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)

    def swapped(spec: ClipSpec, field: str) -> ClipSpec:
        while True:
            other = replace(spec, **{field: rng.choice([v for v in ATTRIBUTES[field] if v != getattr(spec, field)])})
            if contrast(other.color, other.background) >= MIN_CONTRAST:
                return other

    def loss(captions: list[str], sigma: float) -> float:
        text, xt = family.encode(captions), (1 - sigma) * x0 + sigma * noise
        v = torch.cat([family.teacher(xt[s:s + 16], torch.full((len(xt[s:s + 16]),), sigma * 1000.0),
                                      text.states[s:s + 16], text.mask[s:s + 16], text.pooled[s:s + 16], 1.0)
                       for s in range(0, clips, 16)])
        return float((v - (noise - x0)).square().mean())

    result = {}
    for sigma in sigmas:
        true = loss([s.caption() for s in specs], sigma)
        result[f"sigma_{sigma:g}"] = {"true_caption_loss": true, **{
            f"{field}_swapped_increase": loss([swapped(s, field).caption() for s in specs], sigma) - true
            for field in ATTRIBUTES}}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.mini.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("teachers", nargs="+", type=Path, help="teacher .safetensors files to compare")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts to use (default: all)")
    p.add_argument("--steps", type=int, default=HUNYUAN_TEACHER.steps,
                   help=f"sampling steps (default: the teacher recipe's {HUNYUAN_TEACHER.steps})")
    p.add_argument("--guidance", type=float, nargs="+", default=[GUIDANCE],
                   help=f"embedded guidance values to score (default: the miniature recipe's {GUIDANCE:g})")
    p.add_argument("--vae", type=Path, default=None, help="VAE file to decode with (default: the shipped one)")
    p.add_argument("--usage", action="store_true", help="also print attribute_usage (flow loss with swapped captions)")
    p.add_argument("--geometry", default=DEFAULT_GEOMETRY, choices=sorted(GEOMETRIES),
                   help="clip geometry of the --usage clips (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for teacher in args.teachers:
        family = load_family(teacher=teacher, vae=args.vae)
        for guidance in args.guidance:
            result = validate_teacher(family, prompts=args.prompts, steps=args.steps, guidance=guidance)
            print(json.dumps({"teacher": str(teacher), "guidance": guidance, **result}), flush=True)
        if args.usage:
            usage = attribute_usage(family, geometry=args.geometry)
            print(json.dumps({"teacher": str(teacher), "geometry": args.geometry, "usage": usage}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
