"""The one place where the latent scaling convention is written down.

Two latent spaces exist:
- **VAE space** ("unscaled"): what the VAE encoder outputs and the decoder takes. ComfyUI's ``LATENT["samples"]``
  holds latents in this space.
- **model space** ("scaled"): VAE latents times ``VAE_SCALING_FACTOR``. The transformer, the samplers, SynVid
  files and the trainer all work in this space; Gaussian noise for sampling is N(0, I) in this space.

Every caller converts with these two functions; nobody multiplies by the constant directly.
"""
from __future__ import annotations

import torch

VAE_SCALING_FACTOR = 0.476986  # HunyuanVideo "884-16c-hy" VAE
LATENT_CHANNELS = 16
TEMPORAL_COMPRESSION = 4
SPATIAL_COMPRESSION = 8


def to_model_space(vae_latents: torch.Tensor) -> torch.Tensor:
    """VAE-space (ComfyUI LATENT) latents -> the transformer's scaled space."""
    return vae_latents * VAE_SCALING_FACTOR


def to_vae_space(model_latents: torch.Tensor) -> torch.Tensor:
    """Transformer-space latents -> VAE space (what the decoder and ComfyUI's LATENT expect)."""
    return model_latents / VAE_SCALING_FACTOR


def latent_shape(frames: int, height: int, width: int, batch: int = 1) -> tuple[int, int, int, int, int]:
    """Latent shape for a video of ``frames`` x ``height`` x ``width`` pixels, with a clear error when impossible."""
    problems = []
    if frames < 1 or (frames - 1) % TEMPORAL_COMPRESSION:
        lo = max(1, (frames - 1) // TEMPORAL_COMPRESSION * TEMPORAL_COMPRESSION + 1)
        problems.append(f"frames must be 4k+1 (1, 5, ..., 93, ..., 129); got {frames}, try {lo} or {lo + 4}")
    for name, size in (("height", height), ("width", width)):
        if size < 16 or size % 16:
            near = max(16, round(size / 16) * 16)
            problems.append(f"{name} must be a positive multiple of 16; got {size}, try {near}")
    if problems:
        raise ValueError("; ".join(problems))
    return (batch, LATENT_CHANNELS, (frames - 1) // TEMPORAL_COMPRESSION + 1,
            height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)


def video_size_of_latent(latent: torch.Tensor) -> tuple[int, int, int]:
    """(frames, height, width) of the video a HunyuanVideo VAE-space latent ``[B, 16, T, H/8, W/8]`` decodes to.

    Raises ``ValueError`` with a fix when the latent cannot be a HunyuanVideo video latent (wrong rank or channel
    count, or a size that is not a multiple of 16 pixels).
    """
    if latent.ndim != 5:
        raise ValueError(f"expected a video latent [batch, 16, frames, height/8, width/8], got shape "
                         f"{tuple(latent.shape)}; make it with EmptyHunyuanLatentVideo")
    _, channels, t, h, w = latent.shape
    if channels != LATENT_CHANNELS:
        raise ValueError(f"expected {LATENT_CHANNELS} latent channels (HunyuanVideo), got {channels}; make the "
                         "latent with EmptyHunyuanLatentVideo or encode with the HunyuanVideo VAE")
    frames = (t - 1) * TEMPORAL_COMPRESSION + 1
    height, width = h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION
    latent_shape(frames, height, width)  # raises with the fix for sizes that are not multiples of 16
    return frames, height, width
