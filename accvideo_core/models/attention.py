"""The one attention dispatcher of the transformer.

``attention(q, k, v, key_mask=None)`` with q, k, v ``[B, L, heads, D]`` (the original HunyuanVideo layout) returns
``[B, L, heads * D]``. Backends:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``, every device and dtype;
- ``"flash"``: flash-attn 2 (``flash_attn.flash_attn_func``), CUDA, fp16/bf16;
- ``"sage"``: SageAttention (``sageattention.sageattn``), CUDA, fp16/bf16;
- ``"auto"``: flash, then sage, when installed and the tensors are CUDA fp16/bf16; otherwise SDPA.

Choose with ``set_attention_backend(name)`` or ``ACCVIDEO_ATTENTION=name``. Asking for flash or sage when the
package is missing raises an error that says how to install it. flash and sage run only on CUDA fp16/bf16 tensors;
elsewhere the call falls back to SDPA. With a per-key mask (a batch of prompts with different valid lengths) flash
runs variable-length (``flash_attn_varlen_func``, the original HunyuanVideo path); sage, and any per-query mask
(the token refiner), use SDPA.
"""
from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=None)
def is_available(name: str) -> bool:
    """Whether the optional kernel package behind backend ``name`` can be imported (checked once)."""
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
    """Select the backend for all later calls (raises when an optional package is missing). Public: documented in
    docs/transformer.md for users, and ``bench.gpu`` part c times each backend through it."""
    global _backend
    _backend = _check_backend(name)


def get_attention_backend() -> str:
    """The selected backend (``bench.gpu`` restores it after timing each one)."""
    return _backend


def _kernel_can_run(q: torch.Tensor) -> bool:
    """flash / sage kernels need CUDA fp16/bf16 tensors."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _pick(backend: str, q: torch.Tensor, key_mask: torch.Tensor | None) -> str:
    """The implementation for this call: "sdpa", "flash", "flash_varlen" (flash with a per-key mask) or "sage"."""
    if backend == "sdpa" or not _kernel_can_run(q):
        return "sdpa"
    for name in (("flash", "sage") if backend == "auto" else (backend,)):
        if not is_available(name):
            continue
        if key_mask is None:
            return name
        if name == "flash" and key_mask.dim() == 2:
            return "flash_varlen"
    return "sdpa"


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Variable-length flash attention, as the original HunyuanVideo: the True positions of each row form one
    sequence; rows at False positions get zeros (their outputs are never used)."""
    from flash_attn import flash_attn_varlen_func

    b, length, heads, dim = q.shape
    index = key_mask.reshape(-1).nonzero().squeeze(1)
    lengths = key_mask.sum(1, dtype=torch.int32)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(lengths.max())
    packed = [t.reshape(b * length, heads, dim).index_select(0, index) for t in (q, k, v)]
    out = flash_attn_varlen_func(*packed, cu_seqlens, cu_seqlens, max_len, max_len)
    return q.new_zeros(b * length, heads, dim).index_copy(0, index, out).view(b, length, heads, dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              *, backend: str | None = None) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, L, heads, D]`` tensors -> ``[B, L, heads * D]``.

    ``key_mask``: optional bool, True where attending is allowed: ``[B, L]`` (per key) or ``[B, L, L]`` (per query
    and key). Every query row must keep at least one key. Outputs at masked-out positions of a ``[B, L]`` mask are
    unspecified (flash varlen returns zeros there, SDPA attends them to the valid keys).
    """
    chosen = _pick(_check_backend(backend) if backend else _backend, q, key_mask)
    if chosen == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q, k, v)
    elif chosen == "flash_varlen":
        out = _flash_varlen(q, k, v, key_mask)
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
