"""The one attention dispatcher of the transformer.

``attention(q, k, v, key_mask=None)`` with q, k, v ``[B, L, heads, D]`` (the original HunyuanVideo layout) returns
``[B, L, heads * D]``. Backends:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, every device and dtype;
- ``"flash"``: flash-attn 2 (``flash_attn.flash_attn_func``), CUDA, fp16/bf16;
- ``"sage"``: SageAttention (``sageattention.sageattn``), CUDA, fp16/bf16;
- ``"auto"``: flash, then sage, when installed and the tensors are CUDA fp16/bf16; otherwise SDPA.

Choose with ``set_attention_backend(name)`` or ``ACCVIDEO_ATTENTION=name``. Asking for flash or sage when the
package is missing raises an error that says how to install it; on CPU / fp32 tensors, or when a key mask is needed
(batches of prompts with different valid lengths), the explicit choice falls back to SDPA for that call, because
these kernels cannot run there.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flash", "sage", "auto")
_INSTALL_HINT = {
    "flash": "pip install flash-attn --no-build-isolation (needs a CUDA toolkit matching your torch)",
    "sage": "pip install sageattention (needs Triton and a CUDA GPU)",
}
_MODULE = {"flash": "flash_attn", "sage": "sageattention"}


def _check_backend(name: str) -> str:
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    if name in _MODULE and not is_available(name):
        raise ImportError(
            f"attention backend {name!r} was requested but the package {_MODULE[name]!r} is not installed "
            f"(or fails to import); install it with: {_INSTALL_HINT[name]} - or use 'sdpa'"
        )
    return name


def is_available(name: str) -> bool:
    """Whether the optional kernel package behind backend ``name`` can be imported."""
    if name in ("sdpa", "auto"):
        return True
    if importlib.util.find_spec(_MODULE[name]) is None:
        return False
    try:
        importlib.import_module(_MODULE[name])
    except Exception:  # broken installs (ABI mismatch, missing CUDA libs) fail at import time
        return False
    return True


_backend = _check_backend(os.environ.get("ACCVIDEO_ATTENTION", "sdpa"))


def set_attention_backend(name: str) -> None:
    """Select the backend for all later calls (raises when an optional package is missing)."""
    global _backend
    _backend = _check_backend(name)


def get_attention_backend() -> str:
    return _backend


def _kernel_can_run(q: torch.Tensor, key_mask: torch.Tensor | None) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key_mask is None


def _pick(backend: str, q: torch.Tensor, key_mask: torch.Tensor | None) -> str:
    if backend == "sdpa" or not _kernel_can_run(q, key_mask):
        return "sdpa"
    if backend == "auto":
        return next((b for b in ("flash", "sage") if is_available(b)), "sdpa")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              *, backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, L, heads, D]`` tensors -> ``[B, L, heads * D]``.

    ``key_mask``: optional bool, True where attending is allowed: ``[B, L]`` (per key) or ``[B, L, L]`` (per query
    and key). Every query row must keep at least one key.
    """
    chosen = _pick(_check_backend(backend) if backend else _backend, q, key_mask)
    if chosen == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q, k, v)
    elif chosen == "sage":
        from sageattention import sageattn

        out = sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    else:
        mask = None
        if key_mask is not None:
            mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask).transpose(1, 2)
    return out.reshape(q.shape[0], q.shape[1], -1)
