"""Per-GPU memory (and compute) estimate of an AccVideo training run, from the model config and video size.

``python -m accvideo_core.train.estimate [--frames 93 --height 544 --width 960 --gpus 8 --sp 1 --ema]``

The formulas are those of docs/training.md ("13B on 8 GPUs"): FSDP2 over ``gpus`` ranks, fp32 master weights,
gradients and AdamW states, bf16 frozen teacher, per-block gradient checkpointing, micro-batch 1, O(N)-memory
attention; ``sp`` = sequence-parallel degree dividing the activations. Parameter counts come from building the
transformer on the meta device, so they are exact for the given config.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from accvideo_core.latents import latent_shape
from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig
from accvideo_core.train.heads import DiscriminatorHead

GB = 1e9
RECOMPUTE_FACTOR = 20  # one single block's recompute + backward working set, in hidden-state tensors (~6 GB at 544p)


@dataclass
class Estimate:
    params: int
    tokens: int
    static: dict[str, float]
    activations: dict[str, float]

    @property
    def peak(self) -> float:
        return sum(self.static.values()) + max(self.activations.values())


def estimate(config: TransformerConfig, *, frames: int, height: int, width: int, gpus: int, sp: int = 1,
             text_tokens: int = 256, ema: bool = False, segments: int = 5, head_width: int = 256) -> Estimate:
    with torch.device("meta"):
        model = HunyuanVideoTransformer3D(config)
        head = DiscriminatorHead(config.hidden_size, head_width)
    p = sum(t.numel() for t in model.parameters())
    biggest_block = max(sum(t.numel() for t in b.parameters()) for b in list(model.double_blocks) +
                        list(model.single_blocks))
    heads = segments * sum(t.numel() for t in head.parameters())
    _, _, t, h, w = latent_shape(frames, height, width)
    pt, ph, pw = config.patch_size
    tokens = (t // pt) * (h // ph) * (w // pw) + text_tokens
    static = {
        "student fp32 weights": 4 * p / gpus, "student fp32 gradients": 4 * p / gpus,
        "AdamW states": 8 * p / gpus, "teacher bf16": 2 * p / gpus, "heads (replicated)": 16 * heads,
        "unsharded blocks in flight": 2 * 2 * biggest_block,
    }
    if ema:
        static["EMA fp32"] = 4 * p / gpus
    hidden = tokens * config.hidden_size * 2 / sp           # one bf16 [tokens, hidden] tensor (per SP rank)
    graph = config.num_layers * hidden                      # checkpointed block inputs of one forward graph
    recompute = RECOMPUTE_FACTOR * hidden
    activations = {"trajectory phase": graph + recompute, "adversarial phase": 2 * graph + recompute}
    return Estimate(p, tokens, {k: v / GB for k, v in static.items()},
                    {k: v / GB for k, v in activations.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m accvideo_core.train.estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=93)
    ap.add_argument("--height", type=int, default=544)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--sp", type=int, default=1, help="sequence-parallel degree (not implemented by the trainer yet)")
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    e = estimate(TransformerConfig(), frames=args.frames, height=args.height, width=args.width, gpus=args.gpus,
                 sp=args.sp, ema=args.ema)
    if args.json:
        print(json.dumps({"params": e.params, "tokens": e.tokens, "static_gb": e.static,
                          "activations_gb": e.activations, "peak_gb": e.peak}, indent=2))
        return 0
    print(f"HunyuanVideo {e.params / 1e9:.3f} B params, {args.frames}x{args.height}x{args.width} -> {e.tokens} "
          f"tokens, {args.gpus} GPUs (FSDP2), SP degree {args.sp}")
    for name, value in e.static.items():
        print(f"  {name:<30}{value:8.2f} GB")
    print(f"  {'static total':<30}{sum(e.static.values()):8.2f} GB")
    for name, value in e.activations.items():
        print(f"  {'activations, ' + name:<30}{value:8.2f} GB")
    print(f"  {'peak per GPU':<30}{e.peak:8.2f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
