"""Bridges between host samplers (e.g. ComfyUI's k-diffusion wrapper) and our flow-matching Euler sampler.

A host denoiser answers ``denoised = D(x, sigma)``; for flow matching (ComfyUI's CONST model sampling)
``denoised = x - sigma * v``, so the velocity is ``(x - denoised) / sigma``. Written here, once, so the node pack
stays free of math.
"""
from __future__ import annotations

from typing import Callable

import torch

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
