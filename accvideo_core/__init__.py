"""accvideo_core: pure-PyTorch HunyuanVideo + AccVideo distillation library. Never imports ComfyUI.

Public names are resolved lazily so ``import accvideo_core`` stays cheap (ComfyUI imports every custom-node pack
at start-up).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY = {
    "HunyuanVideoTransformer3D": "models.transformer_hunyuan_video",
    "TransformerConfig": "models.transformer_hunyuan_video",
    "load_transformer": "models.loading",
    "HunyuanVideoVAE": "models.vae_hunyuan_video",
    "VAEConfig": "models.vae_hunyuan_video",
    "load_vae": "models.vae_loading",
    "flow_sigmas": "sampling",
    "sample_flow": "sampling",
    "euler_flow": "sampling",
    "VAE_SCALING_FACTOR": "latents",
    "to_model_space": "latents",
    "to_vae_space": "latents",
    "latent_shape": "latents",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'accvideo_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
