"""Small transformer configs, deterministic random weights and inputs, and the diffusers oracle, shared by the tests
and the benchmarks.

It ships in the package (not under tests/) because ``bench/`` imports it (``bench_transformer``, ``bench_vae``,
``bench_lora``, ``bench_train``), as does the integration tier's model maker, and a benchmark must not depend on the
test suite; nothing else in ``accvideo_core`` imports it. ``diffusers_transformer`` needs diffusers (a test
dependency, imported only when called).

Random test weights are deliberately NON-degenerate: every bias is non-zero and every norm weight is away from 1,
so a differential test exercises every parameter (a zero bias or a unit norm weight hides wrong mappings).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .models.transformer_hunyuan_video import TransformerConfig

# A config the native ComfyUI HunyuanVideo loader can build: it hard-codes head dim 128, rope axes (16, 56, 56),
# pooled (vec) dim 768, 2 refiner blocks, mlp ratio 4 and theta 256; hidden 256 = 2 heads of 128.
COMFY_COMPATIBLE: dict[str, Any] = dict(
    hidden_size=256, num_heads=2, rope_axes=(16, 56, 56), pooled_dim=768, num_refiner_blocks=2,
    mlp_ratio=4.0, rope_theta=256.0, patch_size=(1, 2, 2), in_channels=16, out_channels=16,
    num_double_blocks=1, num_single_blocks=1, text_dim=32, guidance_embed=True,
)

TINY: dict[str, Any] = dict(
    hidden_size=32, num_heads=2, rope_axes=(4, 6, 6), pooled_dim=24, num_refiner_blocks=2, mlp_ratio=4.0,
    rope_theta=256.0, patch_size=(1, 2, 2), in_channels=16, out_channels=16, num_double_blocks=2,
    num_single_blocks=2, text_dim=40, guidance_embed=True,
)


def tiny_transformer_config(*, comfy_compatible: bool = False, **overrides: Any) -> TransformerConfig:
    """A small HunyuanVideo config for tests (CPU, milliseconds per forward).

    Default: hidden 32 = 2 heads of 16, rope axes (4, 6, 6), 2 double + 2 single + 2 refiner blocks, text dim 40,
    pooled dim 24, guidance embedding. ``comfy_compatible=True``: hidden 256 = 2 heads of 128, rope (16, 56, 56),
    pooled 768, 1 double + 1 single block, text dim 32 - loadable by native ComfyUI. Any field can be overridden.
    """
    base = dict(COMFY_COMPATIBLE if comfy_compatible else TINY)
    base.update(overrides)
    if ("num_heads" in overrides or "hidden_size" in overrides) and "rope_axes" not in overrides:
        base["rope_axes"] = None  # recomputed from the new head dim (default_rope_axes)
    return TransformerConfig(**base)


def _away_from(center: float, lo: float, hi: float, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Values ``center +- U(lo, hi)`` with a random sign: never closer than ``lo`` to ``center``."""
    magnitude = lo + (hi - lo) * torch.rand(shape, generator=gen)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return center + sign * magnitude


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0, *, gain: float = 1.0) -> nn.Module:
    """Fill every parameter of ``module`` with deterministic, non-degenerate random values (in place).

    - weights with 2+ dims: N(0, gain / sqrt(fan_in));
    - 1-D ``*.weight``/``*.scale`` (norm weights): 1 +- U(0.1, 0.5), never near 1;
    - biases and any other 1-D parameter: +-U(0.02, 0.2), never near 0.

    Works for any module (transformer, VAE, LoRA adapters, heads) and any parameter dtype (values are drawn in
    fp32 and cast, fp8 included). Returns the module.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        shape = param.shape
        if param.dim() >= 2:
            fan_in = param[0].numel()
            values = torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)
        elif name.endswith(("weight", "scale", "gamma")):
            values = _away_from(1.0, 0.1, 0.5, shape, gen)
        else:
            values = _away_from(0.0, 0.02, 0.2, shape, gen)
        param.copy_(values.to(param.dtype))
    return module


def tiny_transformer(seed: int = 0, **config_overrides: Any):
    """A randomized tiny ``HunyuanVideoTransformer3D`` in fp32 on CPU (see :func:`tiny_transformer_config`)."""
    from .models.transformer_hunyuan_video import HunyuanVideoTransformer3D

    return randomize_(HunyuanVideoTransformer3D(tiny_transformer_config(**config_overrides)), seed).eval()


def dequantized_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An fp8 (possibly scaled) state dict as the fp32 values its layers compute with, ``scale_weight`` keys
    dropped: the oracle that fp8-stored models are compared with."""
    from .models.loading import FP8_DTYPES, dequantized

    out = {}
    for key, value in sd.items():
        if key.endswith(".scale_weight"):
            continue
        if value.dtype in FP8_DTYPES:
            value = dequantized(value, sd.get(key.removesuffix("weight") + "scale_weight"), torch.float32)
        out[key] = value.float() if value.is_floating_point() else value
    return out


def tiny_inputs(config: TransformerConfig, *, batch: int = 1, frames: int = 2, height: int = 4, width: int = 6,
                text_len: int = 7, valid: list[int] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random model inputs for ``config``: latents ``[B, C, frames, height, width]``, sigma*1000 timesteps, text
    states with a left-aligned mask (``valid[b]`` valid tokens per prompt, default all), pooled vector."""
    gen = torch.Generator().manual_seed(seed)
    valid = valid or [text_len] * batch
    mask = torch.zeros(batch, text_len, dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
    return dict(
        latents=torch.randn(batch, config.in_channels, frames, height, width, generator=gen),
        timestep=torch.rand(batch, generator=gen) * 1000,
        text_states=torch.randn(batch, text_len, config.text_dim, generator=gen),
        text_mask=mask,
        pooled=torch.randn(batch, config.pooled_dim, generator=gen),
    )


def diffusers_transformer(config: TransformerConfig):
    """diffusers' ``HunyuanVideoTransformer3DModel`` with the same architecture as ``config`` (test oracle; needs
    diffusers). Load weights with ``key_maps.original_to_diffusers(model.state_dict())``."""
    from diffusers import HunyuanVideoTransformer3DModel

    pt, ph, pw = config.patch_size
    if ph != pw:
        raise ValueError(f"diffusers needs a square spatial patch; got {config.patch_size}")
    return HunyuanVideoTransformer3DModel(
        in_channels=config.in_channels, out_channels=config.out_channels, num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim, num_layers=config.num_double_blocks,
        num_single_layers=config.num_single_blocks, num_refiner_layers=config.num_refiner_blocks,
        mlp_ratio=config.mlp_ratio, patch_size=ph, patch_size_t=pt, qk_norm="rms_norm",
        guidance_embeds=config.guidance_embed, text_embed_dim=config.text_dim,
        pooled_projection_dim=config.pooled_dim, rope_theta=config.rope_theta, rope_axes_dim=config.rope_axes,
    ).eval()


def diffusers_twin(model) -> Any:
    """diffusers' transformer with ``model``'s architecture and weights (test oracle; needs diffusers)."""
    from accvideo_core.models.key_maps import original_to_diffusers

    twin = diffusers_transformer(model.config)
    twin.load_state_dict(original_to_diffusers(model.state_dict()), strict=True)
    return twin


def diffusers_forward(twin, inputs: dict[str, torch.Tensor], guidance: float | list[float] | None) -> torch.Tensor:
    """The output of diffusers' transformer on :func:`tiny_inputs` (its guidance is embedded x 1000)."""
    b = inputs["latents"].shape[0]
    g = None if guidance is None else torch.as_tensor(guidance, dtype=torch.float32).expand(b) * 1000.0
    return twin(inputs["latents"], inputs["timestep"], inputs["text_states"], inputs["text_mask"], inputs["pooled"],
                guidance=g, return_dict=False)[0]
