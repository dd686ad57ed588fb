"""Flow-matching Euler sampling exactly as AccVideo / HunyuanVideo (k-diffusion style: short pure functions).

Schedule for n steps: ``s = linspace(1, 0, n + 1)``, ``sigma = shift * s / (1 + (shift - 1) * s)`` (fp32); the model receives ``sigma * 1000``. Update: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v``.
Latents stay fp32 between steps whatever the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def flow_sigmas(steps: int, shift: float = 7.0) -> torch.Tensor:
    """Shifted flow-matching sigmas from 1 (noise) to 0 (data): fp32 tensor ``[steps + 1]``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    # linspace in fp64 rounded once to fp32 (numpy / diffusers style), then the shift in fp32: this reproduces the
    # official 50-step timesteps bit for bit (an fp32 torch.linspace is off by an ulp at 9 of 51 points).
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).to(torch.float32)
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class FlowPreset:
    """A named sampling recipe."""

    name: str
    steps: int
    shift: float
    guidance: float  # embedded guidance scale given to the model
    cfg_scale: float  # real classifier-free guidance (1.0 = off, one model call per step)

    def sigmas(self) -> torch.Tensor:
        return flow_sigmas(self.steps, self.shift)


ACCVIDEO_STUDENT = FlowPreset("accvideo_student", steps=5, shift=7.0, guidance=6.0, cfg_scale=1.0)
HUNYUAN_TEACHER = FlowPreset("hunyuan_teacher", steps=50, shift=7.0, guidance=6.0, cfg_scale=1.0)
PRESETS = {p.name: p for p in (ACCVIDEO_STUDENT, HUNYUAN_TEACHER)}


def euler_flow(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor | list[float], *,
               callback: Callback | None = None) -> torch.Tensor:
    """Integrate ``dx/dsigma = v(x, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    ``velocity_fn(x, sigma)`` gets the fp32 latent and ``sigma`` as a python float. After step i,
    ``callback({"i", "x" (latent at sigmas[i+1]), "sigma", "sigma_next", "velocity"})`` is called; raising from it
    interrupts sampling. Returns the fp32 latent at ``sigmas[-1]``.
    """
    values = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) < 2:
        raise ValueError("sigmas needs at least 2 values (start and end)")
    x = x.float()
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        v = velocity_fn(x, sigma)
        x = x + (sigma_next - sigma) * v.float()
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "velocity": v})
    return x


def _conditioning(negative: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(negative, Mapping):
        missing = [k for k in ("text_states", "text_mask", "pooled") if k not in negative]
        if missing:
            raise ValueError(f"negative conditioning lacks {missing}; expected text_states, text_mask, pooled")
        return negative["text_states"], negative["text_mask"], negative["pooled"]
    if isinstance(negative, (tuple, list)) and len(negative) == 3:
        return tuple(negative)
    raise ValueError("negative must be a dict with text_states, text_mask, pooled (or a 3-tuple of them)")


def sample_flow(model: torch.nn.Module, noise: torch.Tensor, sigmas: torch.Tensor | list[float], *,
                text_states: torch.Tensor, text_mask: torch.Tensor, pooled: torch.Tensor,
                guidance: float | torch.Tensor | None = 6.0, cfg_scale: float = 1.0, negative: Any = None,
                callback: Callback | None = None) -> torch.Tensor:
    """Euler flow matching with our transformer: ``noise`` (model space, at ``sigmas[0]``) -> fp32 latents.

    ``guidance`` is the embedded guidance scale (6.0 for AccVideo and the teacher). ``cfg_scale != 1`` turns on
    real classifier-free guidance ``v = v_neg + cfg_scale * (v_pos - v_neg)`` with ``negative`` = dict of
    ``text_states``, ``text_mask``, ``pooled`` (two model calls per step; teacher baselines only). The callback
    sees every intermediate latent (see :func:`euler_flow`).
    """
    use_cfg = cfg_scale != 1.0
    if use_cfg and negative is None:
        raise ValueError("cfg_scale != 1 needs a negative conditioning (text_states, text_mask, pooled)")
    neg = _conditioning(negative) if use_cfg else None
    b = noise.shape[0]
    noise = noise.to(next(model.parameters()).device)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((b,), sigma * 1000.0, dtype=torch.float32, device=x.device)
        v = model(x, t, text_states, text_mask, pooled, guidance).float()
        if neg is not None:
            v_neg = model(x, t, *neg, guidance).float()
            v = v_neg + cfg_scale * (v - v_neg)
        return v

    with torch.no_grad():
        return euler_flow(velocity, noise, sigmas, callback=callback)
