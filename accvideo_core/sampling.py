"""Flow-matching Euler sampling exactly as AccVideo / HunyuanVideo (k-diffusion style: short pure functions).

Schedule for n steps: ``s = linspace(1, 0, n + 1)``, ``sigma = shift * s / (1 + (shift - 1) * s)`` (fp32); the model receives ``sigma * 1000``. Update: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v``.
Latents stay fp32 between steps whatever the model dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


class NonFiniteLatentError(FloatingPointError):
    """Sampling produced NaN or Inf values (a broken model file or LoRA, or an extreme guidance)."""


def check_settings(*, shift: float | None = None, guidance: float | None = None) -> None:
    """Refuse NaN/Inf (and a shift <= 0) before any work, with the value and the fix in the message."""
    if shift is not None and not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0 (7.0 for AccVideo and HunyuanVideo); got {shift}")
    if guidance is not None and not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number (6.0 for AccVideo and HunyuanVideo); got {guidance}")


def flow_sigmas(steps: int, shift: float = 7.0) -> torch.Tensor:
    """Shifted flow-matching sigmas from 1 (noise) to 0 (data): fp32 tensor ``[steps + 1]``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    check_settings(shift=shift)
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


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """Gaussian noise ``[len(seeds), *shape]``: row i is ``torch.randn(shape, generator=manual_seed(seeds[i]))`` on
    the CPU, so a seed gives the same noise on every device and in any batch (ComfyUI's convention for one
    sample). The one formula for seeded per-sample noise (SynVid dumper, miniature family, trainer)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sampling_min_bytes(latent_shape: Sequence[int], hidden_size: int, *, mlp_ratio: float = 4.0,
                       compute_bytes: int = 2, patch: Sequence[int] = (1, 2, 2)) -> int:
    """A lower bound of the device memory one transformer step needs for a latent ``[B, C, T, H, W]``.

    Every block holds the tokens' residual stream and its normalised copy (``2 * hidden``) and the MLP's
    activation (``mlp_ratio * hidden``) per token at once; the sampler keeps the fp32 latent, the noise and the
    velocity. Weights and attention workspaces come on top, so a size above this bound can never fit.
    """
    b, c, t, h, w = latent_shape
    tokens = b * math.ceil(t / patch[0]) * math.ceil(h / patch[1]) * math.ceil(w / patch[2])
    return int(tokens * hidden_size * (2 + mlp_ratio) * compute_bytes + 3 * b * c * t * h * w * 4)


def euler_flow(velocity_fn: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor | list[float], *,
               callback: Callback | None = None, check_finite: bool = False) -> torch.Tensor:
    """Integrate ``dx/dsigma = v(x, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]`` with Euler steps.

    ``velocity_fn(x, sigma)`` gets the fp32 latent and ``sigma`` as a python float. After step i,
    ``callback({"i", "x" (latent at sigmas[i+1]), "sigma", "sigma_next", "velocity"})`` is called; raising from it
    interrupts sampling. ``check_finite``: raise :class:`NonFiniteLatentError` at the first step whose latent
    holds NaN or Inf. Returns the fp32 latent at ``sigmas[-1]``.
    """
    values = [float(s) for s in (sigmas.tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) < 2:
        raise ValueError("sigmas needs at least 2 values (start and end)")
    x = x.float()
    for i, (sigma, sigma_next) in enumerate(zip(values[:-1], values[1:])):
        v = velocity_fn(x, sigma)
        x = x + (sigma_next - sigma) * v.float()
        if check_finite and not bool(torch.isfinite(x).all()):
            raise NonFiniteLatentError(
                f"the latent holds NaN or Inf after step {i + 1} of {len(values) - 1} (sigma {sigma_next:.4g}): the "
                "model's output is not finite; check the model file, the LoRA and its strength, and the guidance")
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
                callback: Callback | None = None, check_finite: bool = False) -> torch.Tensor:
    """Euler flow matching with our transformer: ``noise`` (model space, at ``sigmas[0]``) -> fp32 latents.

    ``guidance`` is the embedded guidance scale (6.0 for AccVideo and the teacher). ``cfg_scale != 1`` turns on
    real classifier-free guidance ``v = v_neg + cfg_scale * (v_pos - v_neg)`` with ``negative`` = dict of
    ``text_states``, ``text_mask``, ``pooled`` (two model calls per step; teacher baselines only). The callback
    sees every intermediate latent; ``check_finite`` as in :func:`euler_flow`.
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
        return euler_flow(velocity, noise, sigmas, callback=callback, check_finite=check_finite)
