"""Train the miniature VAE: our HunyuanVideo causal 3D VAE architecture at tiny widths, on the procedural clips.

``python -m accvideo_core.mini.train_vae [--out assets/mini/vae.safetensors] [--steps N] [--seed S]``

Loss per clip: L1 + MSE reconstruction of a posterior sample's decoding, plus ``kl_weight`` x the KL divergence
of the posterior to the prior N(0, (1 / 0.476986)^2). The prior's width comes from the scaling factor fixed in
``accvideo_core/latents.py``, so the *model-space* latent (VAE latent x 0.476986) is close to unit variance: the
convention of the HunyuanVideo VAE that every sampler in this project assumes (noise is N(0, I) there).
Training uses random 9-frame windows (start frame 0, 4 or 8) of whole 64 x 64 frames (``crop`` < 64 takes random
crops); the network is causal and convolutional (plus frame-causal attention at the latent resolution), so it
encodes and decodes whole 17-frame clips. See :func:`anchor_group_statistics_` for the one initialisation choice
without which this tiny VAE does not learn colours at all.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..latents import VAE_SCALING_FACTOR, to_model_space
from ..models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig, norm_silu
from ..models.vae_loading import load_vae, save_vae
from ..utils.io import write_json
from .data import DEFAULT_GEOMETRY, MiniVideoConfig, MiniVideoDataset
from .runlog import add_config_options, append_run, command_line

MINI_VAE = VAEConfig(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=2)
PRIOR_STD = 1.0 / VAE_SCALING_FACTOR  # VAE-space prior width: model-space latents ~ N(0, 1)


@dataclass
class VAETrainConfig:
    steps: int = 1000
    batch: int = 2
    lr: float = 4e-4
    warmup: int = 50
    kl_weight: float = 1e-4  # per latent element, relative to the per-pixel reconstruction losses
    clips: int = 4096  # size of the training split drawn from (clips are rendered on the fly)
    crop: int = 64  # whole frames
    window: int = 9  # frames per training window (4k + 1)
    anchor: float = 100.0  # see anchor_group_statistics_
    init_affine: bool = True  # step 2 of anchor_group_statistics_ (the first shipped run predates it: False)
    init_logvar: float = -6.0  # initial posterior log-variance (bias of quant_conv's logvar half)
    fg_weight: float = 0.0  # extra loss weight on shape pixels (see foreground_weights); 0 = plain loss
    save_every: int = 0  # also write the VAE (and print held-out PSNR) every N steps; 0 = only at the end
    decoder_only: bool = False  # freeze the encoder (and so every latent a teacher was trained on); train the decoder
    latent_noise: float = 0.0  # decoder sees latents + N(0, s^2), s ~ U(0, latent_noise) per clip (model space)
    latent_scale: float = 0.0  # half the clips: latents scaled about their clip mean by w ~ U(1, 1 + latent_scale)
    geometry: str = DEFAULT_GEOMETRY  # clip geometry (data.GEOMETRIES); shipped VAE: "small", runs 5-6 "large"
    seed: int = 0
    threads: int = 1  # one thread: on a loaded 2-core machine two OpenMP threads run ~10x slower


@torch.no_grad()
def anchor_group_statistics_(vae: HunyuanVideoVAE, anchor: float, sample: torch.Tensor | None = None) -> None:
    """Initialisation that lets absolute colour levels through the two output GroupNorms, at full signal scale.

    The encoder's and the decoder's last GroupNorm (``conv_norm_out``) normalise each group over the *whole clip*,
    so a clip's mean level per group is removed, and ``conv_out`` (linear) cannot put it back: a freshly
    initialised VAE cannot even learn each clip's background colour (measured: stuck at the loss of predicting
    the data set's mean colour). Two steps, both only initial values (every weight trains):

    1. add ``anchor`` to one channel per group of the residual stream feeding these norms (the bias of the last
       resnet's ``conv2``): the group statistics become nearly clip-independent, so levels pass;
    2. on ``sample`` clips, measure each group's mean and std at those norms and set the norm's affine to undo
       them (weight = std, bias = mean) on the other channels, and to 0 on the anchor channel: the norm starts as
       the identity on the signal. Without step 2 the anchor divides every signal by ~40 (std of a group holding
       a +100 channel) and ``conv_out`` must grow its weights ~40x at Adam's ~lr-per-step pace. Skipped when
       ``sample`` is None (how the first shipped run was made).
    """
    groups = vae.config.norm_num_groups
    convs = (vae.encoder.mid_block.resnets[-1].conv2.conv, vae.decoder.up_blocks[-1].resnets[-1].conv2.conv)
    for conv in convs:
        conv.bias[::conv.out_channels // groups] += anchor
    if sample is None:
        return
    for side in ("encoder", "decoder"):  # the encoder first: the decoder's inputs depend on its norm
        norm = getattr(vae, side).conv_norm_out
        features = output_norm_inputs(vae, sample)[side]
        b, c = features.shape[:2]
        per_group = c // groups
        flat = features.reshape(b, groups, -1)
        mean, std = flat.mean(dim=2).mean(0), flat.std(dim=2).mean(0)  # per group, averaged over the clips
        norm.weight.copy_(std.repeat_interleave(per_group))
        norm.bias.copy_(mean.repeat_interleave(per_group))
        norm.weight[::per_group] = 0.0
        norm.bias[::per_group] = 0.0


def output_norm_inputs(vae: HunyuanVideoVAE, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """What reaches the encoder's and the decoder's ``conv_norm_out`` when ``video`` is encoded (posterior mean)
    and decoded."""
    enc, dec = vae.encoder, vae.decoder
    h = enc.conv_in(video)
    for block in enc.down_blocks:
        h = block(h)
    enc_features = enc.mid_block(h)
    z = vae.quant_conv(enc.conv_out(norm_silu(enc.conv_norm_out, enc_features))).chunk(2, dim=1)[0]
    h = dec.mid_block(dec.conv_in(vae.post_quant_conv(z)))
    for block in dec.up_blocks:
        h = block(h)
    return {"encoder": enc_features, "decoder": h}


def kl_to_prior(mean: torch.Tensor, logvar: torch.Tensor, prior_std: float = PRIOR_STD) -> torch.Tensor:
    """Mean over elements of KL(N(mean, exp(logvar)) || N(0, prior_std^2))."""
    var = logvar.exp()
    return (math.log(prior_std) - 0.5 * logvar + (var + mean.square()) / (2 * prior_std ** 2) - 0.5).mean()


def foreground_weights(x: torch.Tensor, fg_weight: float, threshold: float = 0.1) -> torch.Tensor:
    """Per-pixel loss weights ``1 + fg_weight`` on pixels whose colour differs from their clip's median colour
    (the background) by more than ``threshold`` in some channel, 1 elsewhere. ``x``: ``[B, 3, T, H, W]``.

    Shapes cover ~10 % of a clip; with a plain loss a tiny VAE spends thousands of steps on background levels
    before it starts to place shapes. Weighting their pixels makes them matter from the start."""
    background = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    shape_pixels = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).to(x.dtype)
    return 1.0 + fg_weight * shape_pixels


def jitter_latents(z: torch.Tensor, noise: float, scale: float) -> torch.Tensor:
    """VAE-space latents ``[B, C, T, H, W]`` perturbed as a sampler's output can be: a random half of the clips
    scaled about their own per-channel mean by ``w ~ U(1, 1 + scale)`` (guidance extrapolates), plus model-space
    Gaussian noise of std ``s ~ U(0, noise)`` per clip (an imperfect last step). Identity when both are 0.

    A decoder trained only on the nearly deterministic posterior (std ~0.02) is fragile off it: scaling a real
    latent by 1.25 changes the decoded hue of 40 % of clips (docs/demo.md), so guided samples decode to the wrong
    colour. Training the decoder on jittered latents (encoder frozen) makes it map them back to the clip."""
    if not noise and not scale:
        return z
    b = z.shape[0]
    per_clip = (b,) + (1,) * (z.dim() - 1)
    scaled = torch.rand(per_clip, device=z.device) < 0.5
    w = 1.0 + scale * torch.rand(per_clip, device=z.device) * scaled
    centre = z.mean(dim=tuple(range(2, z.dim())), keepdim=True)
    s = noise * torch.rand(per_clip, device=z.device) / VAE_SCALING_FACTOR
    return centre + w * (z - centre) + s * torch.randn_like(z)


def _batch(ds: MiniVideoDataset, rng: random.Random, cfg: VAETrainConfig) -> torch.Tensor:
    clips = []
    for _ in range(cfg.batch):
        video = ds[rng.randrange(len(ds))]["video"]
        t0 = 4 * rng.randrange((video.shape[1] - cfg.window) // 4 + 1)
        y0, x0 = rng.randrange(video.shape[2] - cfg.crop + 1), rng.randrange(video.shape[3] - cfg.crop + 1)
        clips.append(video[:, t0:t0 + cfg.window, y0:y0 + cfg.crop, x0:x0 + cfg.crop])
    return torch.stack(clips)


def train_vae(cfg: VAETrainConfig, out: str | Path, *, init: str | Path | None = None, log=print) -> dict:
    """Train with ``cfg`` (from scratch, or continuing the VAE file ``init``) and write ``out`` (safetensors +
    config metadata). Returns a summary."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(f"mini-vae/{cfg.seed}")
    ds = MiniVideoDataset(cfg.clips, split="train", config=MiniVideoConfig(seed=cfg.seed, geometry=cfg.geometry))
    vae = HunyuanVideoVAE(MINI_VAE).train()
    if init is not None:
        vae.load_state_dict(load_vae(init, dtype=torch.float32).state_dict())
    else:
        sample = torch.stack([ds[i]["video"][:, :cfg.window] for i in range(4)]) if cfg.init_affine else None
        anchor_group_statistics_(vae, cfg.anchor, sample)
        with torch.no_grad():  # start with a nearly deterministic posterior: std e^-3 instead of 1, so the
            vae.quant_conv.bias[MINI_VAE.latent_channels:] = cfg.init_logvar  # decoder sees the initial means
    if cfg.decoder_only:
        if init is None:
            raise ValueError("--decoder-only continues a trained VAE: pass --init")
        vae.encoder.requires_grad_(False).eval()
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    t0, history = time.perf_counter(), []
    try:
        for step in range(cfg.steps):
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for g in opt.param_groups:
                g["lr"] = lr
            x = _batch(ds, rng, cfg)
            with torch.set_grad_enabled(not cfg.decoder_only):
                mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            z = jitter_latents(mean + (0.5 * logvar).exp() * torch.randn_like(mean), cfg.latent_noise,
                               cfg.latent_scale)
            recon = vae.decoder(vae.post_quant_conv(z))
            error = recon - x
            if cfg.fg_weight:
                w = foreground_weights(x, cfg.fg_weight)
                rec = (error.abs() * w).mean() + (error.square() * w).mean()
            else:
                rec = error.abs().mean() + error.square().mean()
            kl = kl_to_prior(mean, logvar)
            loss = rec + cfg.kl_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append((rec.item(), kl.item()))
            if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
                recent = [sum(col) / len(col) for col in zip(*history[-25:])]
                el = time.perf_counter() - t0
                log(f"vae step {step + 1}/{cfg.steps} | rec {recent[0]:.4f} | kl {recent[1]:.3f} | lr {lr:.2e} | "
                    f"{el:.0f}s | ETA {el / (step + 1) * (cfg.steps - step - 1):.0f}s")
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                vae.eval()
                log(f"vae step {step + 1}: held-out {evaluate_vae(vae, cfg.seed, geometry=cfg.geometry)} -> {out}")
                save_vae(vae, out)
                vae.decoder.train()
                vae.post_quant_conv.train()
                if not cfg.decoder_only:
                    vae.train()
    except KeyboardInterrupt:
        saved = f"{out} holds the step-{cfg.save_every * (len(history) // cfg.save_every)} weights" \
            if cfg.save_every and len(history) >= cfg.save_every else "nothing written"
        log(f"interrupted at step {len(history)}: {saved}; the run is not recorded in train_vae.json")
        raise
    vae.eval()
    summary = evaluate_vae(vae, cfg.seed, geometry=cfg.geometry)
    save_vae(vae, out)
    summary.update(steps=cfg.steps, seconds=round(time.perf_counter() - t0, 1), final_rec=history[-1][0],
                   parameters=sum(p.numel() for p in vae.parameters()))
    return summary


@torch.no_grad()
def evaluate_vae(vae: HunyuanVideoVAE, seed: int = 0, clips: int = 8, geometry: str = DEFAULT_GEOMETRY) -> dict:
    """Reconstruction PSNR on held-out clips (whole clips, and only their shape pixels as
    :func:`foreground_weights` defines them) and the model-space latent statistics."""
    ds = MiniVideoDataset(clips, split="heldout", config=MiniVideoConfig(seed=seed + 1, geometry=geometry))
    videos = torch.stack([ds[i]["video"] for i in range(clips)])
    z = vae.encode(videos)
    recon = vae.decode(z, mode="untiled").clamp(-1, 1)
    sq = (recon - videos).square() / 4.0  # in [0, 1] pixel units
    shape = foreground_weights(videos, 1.0).expand_as(videos) > 1.5
    zm = to_model_space(z)
    return {"heldout_psnr_db": round(-10 * math.log10(float(sq.mean())), 2),
            "heldout_shape_psnr_db": round(-10 * math.log10(float(sq[shape].mean())), 2),
            "model_space_latent_std": round(float(zm.std()), 3), "model_space_latent_mean": round(float(zm.mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.mini.train_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="assets/mini/vae.safetensors")
    p.add_argument("--init", help="continue training this VAE file instead of starting from scratch")
    add_config_options(p, VAETrainConfig)
    args = vars(p.parse_args(argv))
    out, init = Path(args.pop("out")), args.pop("init")
    cfg = VAETrainConfig(**args)
    try:
        summary = train_vae(cfg, out, init=init, log=lambda m: print(m, file=sys.stderr, flush=True))
    except KeyboardInterrupt:
        return 130
    log_path = out.with_name("train_vae.json")
    runs = append_run(log_path, cfg, summary, init=init)
    write_json({"vae_config": MINI_VAE.to_dict(), "runs": runs,
                "commands": [command_line("accvideo_core.mini.train_vae", r) for r in runs]}, log_path)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
