"""Bridges between host samplers (e.g. ComfyUI's k-diffusion wrapper) and our flow-matching Euler sampler.

A host denoiser answers ``denoised = D(x, sigma)``; for flow matching (ComfyUI's CONST model sampling)
``denoised = x - sigma * v``, so the velocity is ``(x - denoised) / sigma``. Written here, once, so the node pack
stays free of math.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from accvideo_core.latents import LATENT_CHANNELS, SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION, latent_shape

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class DenoiserVelocity:
    """``velocity_fn(x, sigma)`` for :func:`accvideo_core.sampling.euler_flow` built from a host denoiser.

    ``denoise(x, sigma_batch)`` gets ``sigma`` as a ``[B]`` tensor like a k-diffusion model. The last denoised
    prediction is kept in :attr:`last_denoised` (hosts use it for previews). ``before_call`` runs before every
    model call (e.g. an interruption check).
    """

    def __init__(self, denoise: DenoiseFn, before_call: Callable[[], None] | None = None):
        self.denoise = denoise
        self.before_call = before_call
        self.last_denoised: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        if self.before_call is not None:
            self.before_call()
        sigma = float(sigma)
        if sigma <= 0:
            raise ValueError(f"the velocity is undefined at sigma={sigma}; flow sampling never evaluates sigma 0")
        sigma_batch = torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
        denoised = self.denoise(x, sigma_batch)
        self.last_denoised = denoised
        return (x - denoised) / sigma


class TrajectoryRecorder:
    """Collects the Euler iterates of one sampling run at the requested step indices (0 = initial noise).

    Use :meth:`start` with the initial latent and pass :meth:`on_step` as the ``euler_flow`` callback (it reads
    ``info["i"]`` and ``info["x"]``, the latent at ``sigmas[i + 1]``). Latents are copied to ``device``.
    """

    def __init__(self, steps: Sequence[int], device: str | torch.device = "cpu"):
        self.steps = sorted(set(int(s) for s in steps))
        self.device = torch.device(device)
        self.latents: dict[int, torch.Tensor] = {}

    def start(self, x: torch.Tensor) -> None:
        self.latents.clear()
        self._keep(0, x)

    def on_step(self, info: dict) -> None:
        self._keep(int(info["i"]) + 1, info["x"])

    def _keep(self, step: int, x: torch.Tensor) -> None:
        if step in self.steps:
            self.latents[step] = x.detach().to(self.device, torch.float32, copy=True)

    def stacked(self) -> torch.Tensor:
        """``[S, B, C, T, H, W]`` in the order of :attr:`steps`; raises if a step was never reached."""
        missing = [s for s in self.steps if s not in self.latents]
        if missing:
            raise RuntimeError(f"trajectory is missing steps {missing}: sampling stopped early")
        return torch.stack([self.latents[s] for s in self.steps])


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
        raise ValueError(f"expected {LATENT_CHANNELS} latent channels (HunyuanVideo), got {channels}; make the latent with "
                         "EmptyHunyuanLatentVideo or encode with the HunyuanVideo VAE")
    frames = (t - 1) * TEMPORAL_COMPRESSION + 1
    height, width = h * SPATIAL_COMPRESSION, w * SPATIAL_COMPRESSION
    latent_shape(frames, height, width)  # raises with the fix for sizes that are not multiples of 16
    return frames, height, width
