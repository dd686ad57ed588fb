"""Compare miniature teacher checkpoints on every held-out prompt, with noise seeds the demo and tests never use.

``python -m accvideo_core.mini.validate CANDIDATE.safetensors [...] [--prompts 59] [--steps 50]``

Each candidate generates one video per held-out prompt at the teacher recipe (``sampling.HUNYUAN_TEACHER``, 50
steps; seeds 100, 101, ...; the demo and the tests use 7, 8 and 11) and is scored with the demo's probes
(:func:`~accvideo_core.mini.family.prompt_checks`): how many videos show the prompted shape colour, the prompted
motion, both, the prompted shape, and all three. This is how a
teacher run is chosen among candidates trained side by side, without looking at the demo's or the tests' videos.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..demo import heldout_prompts
from ..sampling import HUNYUAN_TEACHER
from .data import attribute_combos
from .family import MiniFamily, load_family, prompt_checks

FIRST_SEED = 100


def validate_teacher(family: MiniFamily, *, prompts: int | None = None, steps: int = HUNYUAN_TEACHER.steps) -> dict:
    """Colour / motion / both / shape / all-three counts of ``family.teacher`` over ``prompts`` held-out prompts
    (default: all)."""
    captions = heldout_prompts(prompts or len(attribute_combos("heldout")))
    videos, _ = family.generate(captions, [FIRST_SEED + i for i in range(len(captions))], steps)
    checks = [prompt_checks(video, caption) for video, caption in zip(videos, captions)]
    return {"videos": len(captions), "steps": steps, "colour_ok": sum(c.colour for c in checks),
            "motion_ok": sum(c.motion for c in checks), "both_ok": sum(c.colour and c.motion for c in checks),
            "shape_ok": sum(c.shape for c in checks), "all_ok": sum(all(c) for c in checks)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.mini.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("teachers", nargs="+", type=Path, help="teacher .safetensors files to compare")
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts to use (default: all)")
    p.add_argument("--steps", type=int, default=HUNYUAN_TEACHER.steps,
                   help=f"sampling steps (default: the teacher recipe's {HUNYUAN_TEACHER.steps})")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for teacher in args.teachers:
        result = validate_teacher(load_family(teacher=teacher), prompts=args.prompts, steps=args.steps)
        print(json.dumps({"teacher": str(teacher), **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
