"""Train the miniature teacher: our HunyuanVideo transformer at tiny size, flow matching + the guidance embedding.

``python -m accvideo_core.mini.train_teacher [--vae assets/mini/vae.safetensors] [--out assets/mini/teacher.safetensors]``

Data: ``clips`` procedural training clips (17 x 64 x 64), encoded once by the mini VAE (posterior mean) and
converted to model space with :func:`accvideo_core.latents.to_model_space`; captions encoded by the tiny text
encoder (written next to the teacher as ``text_encoder.safetensors``).

Two stages, both flow matching in model space (``x_sigma = (1 - sigma) x_0 + sigma * noise``, velocity target
``noise - x_0``, timestep ``sigma * 1000``, sigma half uniform and half shift-7 uniform as the sampler uses):

1. **Conditional model with caption dropout.** The caption is replaced by the empty prompt (only ``<bos>``)
   with probability ``caption_dropout``; the guidance embedding is fed 1.0 ("no guidance") throughout.
2. **Guidance distillation** (as HunyuanVideo's cfg-distilled teacher): a frozen copy ``F`` of the stage-1 EMA
   model gives ``v_g = F(x, empty) + g * (F(x, caption) - F(x, empty))`` for ``g ~ U(guidance_min, guidance_max)``;
   the model, fed ``g`` through the guidance embedding, regresses ``v_g`` with one call. Sampling then uses the
   embedded guidance 6.0 with one model call per step, exactly like HunyuanVideo / AccVideo.

Both stages can weight the squared error at the latent positions that cover the shape by ``1 + fg_weight``
(:func:`latent_foreground`): the shape is ~15 % of the latent and carries the prompt's shape and colour.
The shipped weights are the stage-2 EMA, stored in bf16 (loaded as fp32 for compute).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..latents import to_model_space
from ..models.loading import load_transformer, save_transformer
from ..models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig
from ..models.vae_loading import load_vae
from ..sampling import HUNYUAN_TEACHER
from ..synvid.format import state_dict_sha256
from ..utils.io import write_json
from .data import DEFAULT_GEOMETRY, MiniVideoConfig, MiniVideoDataset
from .runlog import add_config_options, append_run, command_line
from .text_encoder import TinyTextEncoder, TinyTextEncoderConfig
from .train_vae import foreground_weights

ENCODER_CONFIG = TinyTextEncoderConfig()
MINI_TRANSFORMER = TransformerConfig(
    hidden_size=128, num_heads=2, num_double_blocks=2, num_single_blocks=2, num_refiner_blocks=2, mlp_ratio=4.0,
    patch_size=(1, 1, 1), in_channels=16, out_channels=16, text_dim=ENCODER_CONFIG.text_dim,
    pooled_dim=ENCODER_CONFIG.pooled_dim, guidance_embed=True)


@dataclass
class TeacherTrainConfig:
    clips: int = 1536
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    stage1_steps: int = 1600
    stage2_steps: int = 400
    stage2_lr: float = 2e-4
    caption_dropout: float = 0.15
    guidance_min: float = 1.0
    guidance_max: float = 8.0
    shift: float = HUNYUAN_TEACHER.shift  # the shifted half of the training sigmas follows the sampler's schedule
    ema_decay: float = 0.998
    fg_weight: float = 0.0  # extra loss weight on latent positions covering the shape (latent_foreground); 0 = off
    geometry: str = DEFAULT_GEOMETRY  # clip geometry (data.GEOMETRIES); the shipped teacher: "small", then "large"
    seed: int = 0
    threads: int = 1


def encoder_sha256(vae: torch.nn.Module) -> str:
    """Hash of everything that makes a VAE's latents (encoder + quant_conv): a teacher trained on one VAE's
    latents fits every VAE file with the same hash, whatever its decoder."""
    return state_dict_sha256({k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))})


def latent_foreground(video: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T', H/8, W/8]`` mask of the latent positions whose pixels include shape pixels
    (:func:`~accvideo_core.mini.train_vae.foreground_weights`), on the causal 4x-time / 8x-space grid: latent frame
    0 covers pixel frame 0, latent frame t covers pixel frames 4t-3 .. 4t."""
    shape = foreground_weights(video, 1.0) > 1.5  # [B, 1, F, H, W]
    first = shape[:, :, :1]
    rest = shape[:, :, 1:].unflatten(2, (-1, 4)).any(dim=3)
    grid = torch.cat([first, rest], dim=2).float()  # [B, 1, T', H, W]
    return torch.nn.functional.max_pool3d(grid, (1, 8, 8))


@torch.no_grad()
def encode_clips(vae, encoder: TinyTextEncoder, clips: int, seed: int, log=print,
                 geometry: str = DEFAULT_GEOMETRY, split: str = "train") -> dict[str, torch.Tensor]:
    """Model-space latents ``[N, 16, 5, 8, 8]``, their shape masks ``[N, 1, 5, 8, 8]`` (:func:`latent_foreground`)
    and text encodings of the first ``clips`` clips of ``split``."""
    ds = MiniVideoDataset(clips, split=split, config=MiniVideoConfig(seed=seed, geometry=geometry))
    latents, foreground, captions = [], [], []
    for start in range(0, clips, 16):
        items = [ds[i] for i in range(start, min(clips, start + 16))]
        videos = torch.stack([it["video"] for it in items])
        latents.append(to_model_space(vae.encode(videos)))
        foreground.append(latent_foreground(videos))
        captions += [it["caption"] for it in items]
        log(f"encoding clips {start + len(items)}/{clips}")
    text = encoder.encode(captions)
    empty = encoder.encode([""])
    return {"latents": torch.cat(latents), "foreground": torch.cat(foreground),
            "states": text.states, "mask": text.mask, "pooled": text.pooled,
            "empty_states": empty.states, "empty_mask": empty.mask, "empty_pooled": empty.pooled}


def sample_sigmas(n: int, shift: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    shifted = shift * u / (1 + (shift - 1) * u)
    return torch.where(torch.rand(n, generator=gen) < 0.5, u, shifted).clamp(1e-3, 1.0)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def _stage(model, ema, data, cfg: TeacherTrainConfig, *, steps: int, lr: float, distil_from=None, log=print,
           tag: str = "") -> list[float]:
    gen = torch.Generator().manual_seed(cfg.seed + (1 if distil_from is not None else 0))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    n = data["latents"].shape[0]
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        cur = lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x0 = data["latents"][idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(cfg.batch, cfg.shift, gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        t = sigma * 1000.0
        states, mask, pooled = data["states"][idx], data["mask"][idx], data["pooled"][idx]
        if distil_from is None:
            drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
            states = torch.where(drop[:, None, None], data["empty_states"], states)
            mask = torch.where(drop[:, None], data["empty_mask"], mask)
            pooled = torch.where(drop[:, None], data["empty_pooled"], pooled)
            guidance = torch.ones(cfg.batch)
            target = noise - x0
        else:
            guidance = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(cfg.batch, generator=gen)
            b = cfg.batch
            with torch.no_grad():
                both = distil_from(torch.cat([xt, xt]), torch.cat([t, t]),
                                   torch.cat([states, data["empty_states"].expand_as(states)]),
                                   torch.cat([mask, data["empty_mask"].expand_as(mask)]),
                                   torch.cat([pooled, data["empty_pooled"].expand_as(pooled)]), torch.ones(2 * b))
            v_cond, v_uncond = both[:b], both[b:]
            target = v_uncond + guidance.view(-1, 1, 1, 1, 1) * (v_cond - v_uncond)
        v = model(xt, t, states, mask, pooled, guidance)
        weight = 1.0 + cfg.fg_weight * data["foreground"][idx]
        loss = ((v - target).square() * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == steps:
            el = time.perf_counter() - t0
            log(f"teacher {tag} step {step + 1}/{steps} | loss {sum(losses[-25:]) / len(losses[-25:]):.4f} | "
                f"lr {cur:.2e} | {el:.0f}s | ETA {el / (step + 1) * (steps - step - 1):.0f}s")
    return losses


def train_teacher(cfg: TeacherTrainConfig, vae_path: str | Path, out: str | Path, *, init: str | Path | None = None,
                  log=print) -> dict:
    """Train both stages (from scratch, or continuing the teacher file ``init``) and write ``out`` (bf16
    safetensors with config metadata) and the text encoder file."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    t_start = time.perf_counter()
    encoder = TinyTextEncoder(ENCODER_CONFIG)
    encoder.save(out.with_name("text_encoder.safetensors"))
    vae = load_vae(vae_path, dtype=torch.float32).eval()
    data = encode_clips(vae, encoder, cfg.clips, cfg.seed, log=log, geometry=cfg.geometry)
    log(f"model-space latents: std {float(data['latents'].std()):.3f}, mean {float(data['latents'].mean()):.3f}")
    model = HunyuanVideoTransformer3D(MINI_TRANSFORMER).train()
    if init is not None:  # a guidance-distilled teacher at guidance 1.0 is the conditional model stage 1 trains
        model.load_state_dict(load_transformer(init, dtype=torch.float32).state_dict())
    ema = copy.deepcopy(model).requires_grad_(False)
    try:
        l1 = _stage(model, ema, data, cfg, steps=cfg.stage1_steps, lr=cfg.lr, log=log, tag="stage 1 (flow)")
        frozen = copy.deepcopy(ema).eval()
        model.load_state_dict(ema.state_dict())
        l2 = _stage(model, ema, data, cfg, steps=cfg.stage2_steps, lr=cfg.stage2_lr, distil_from=frozen, log=log,
                    tag="stage 2 (guidance)")
    except KeyboardInterrupt:
        log("interrupted: nothing written (rerun to train from scratch)")
        raise
    save_transformer(copy.deepcopy(ema).to(torch.bfloat16), out)
    return {"stage1_final_loss": sum(l1[-50:]) / len(l1[-50:]), "stage2_final_loss": sum(l2[-50:]) / len(l2[-50:]),
            "latent_std": float(data["latents"].std()), "vae_encoder_sha256": encoder_sha256(vae),
            "seconds": round(time.perf_counter() - t_start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.mini.train_teacher",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", default="assets/mini/vae.safetensors")
    p.add_argument("--out", default="assets/mini/teacher.safetensors")
    p.add_argument("--init", help="continue training this teacher file instead of starting from scratch")
    add_config_options(p, TeacherTrainConfig)
    args = vars(p.parse_args(argv))
    vae_path, out, init = args.pop("vae"), Path(args.pop("out")), args.pop("init")
    cfg = TeacherTrainConfig(**args)
    try:
        summary = train_teacher(cfg, vae_path, out, init=init, log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        return 130
    log_path = out.with_name("train_teacher.json")
    runs = append_run(log_path, cfg, summary, init=init, vae=vae_path)
    write_json({"transformer_config": MINI_TRANSFORMER.to_dict(),
                "text_encoder_config": {**asdict(ENCODER_CONFIG), "vocab": list(ENCODER_CONFIG.vocab)},
                "runs": runs, "commands": [command_line("accvideo_core.mini.train_teacher", r, ("vae",))
                                           for r in runs]}, log_path)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
