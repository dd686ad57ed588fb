"""Fused element-wise / normalisation kernels shared by the transformer, the VAE, the trainer and the nodes.

Callers always import from here: ``from accvideo_core import kernels; kernels.rms_norm_rope(...)``.
The backend is chosen per call: Triton when it is importable, the tensor is on CUDA and the backend is not
forced to the reference; otherwise the pure-torch reference in ``reference.py``.

Force the reference with ``ACCVIDEO_KERNELS=torch`` in the environment or ``kernels.set_backend("torch")``.
"""
from __future__ import annotations

import os

from . import reference
from .reference import group_norm_stats, rotate_adjacent_pairs, stats_to_mean_rstd

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("ACCVIDEO_KERNELS", "auto").lower()
if _backend not in _BACKENDS:
    raise ValueError(f"ACCVIDEO_KERNELS={_backend!r}; expected one of {_BACKENDS}")


def set_backend(name: str) -> None:
    """Select ``"auto"`` (Triton on CUDA when available), ``"torch"`` (reference) or ``"triton"`` (required)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def _impl(name: str, *tensors):
    """Pick the implementation of kernel ``name`` for these tensors."""
    if _backend != "torch":
        try:
            from . import triton_kernels
        except ImportError:
            triton_kernels = None
        if triton_kernels is not None and triton_kernels.supports(*tensors):
            return getattr(triton_kernels, name)
        if _backend == "triton":
            raise RuntimeError(
                f"kernel backend 'triton' was forced but cannot run {name} here (Triton missing, or tensors "
                "not on a CUDA device and TRITON_INTERPRET unset); use ACCVIDEO_KERNELS=auto or torch"
            )
    return getattr(reference, name)


def rms_norm_rope(x, weight, cos=None, sin=None, eps: float = 1e-6):
    """See ``reference.rms_norm_rope``."""
    return _impl("rms_norm_rope", x)(x, weight, cos, sin, eps)


def layer_norm_modulate(x, shift, scale, eps: float = 1e-6):
    """See ``reference.layer_norm_modulate``."""
    return _impl("layer_norm_modulate", x)(x, shift, scale, eps)


def gated_residual(x, y, gate):
    """See ``reference.gated_residual``."""
    return _impl("gated_residual", x)(x, y, gate)


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-6, silu: bool = True, mean=None, rstd=None):
    """See ``reference.group_norm_silu``."""
    return _impl("group_norm_silu", x)(x, weight, bias, num_groups, eps, silu, mean, rstd)


__all__ = ["rms_norm_rope", "layer_norm_modulate", "gated_residual", "group_norm_silu", "group_norm_stats",
           "stats_to_mean_rstd", "rotate_adjacent_pairs", "set_backend", "get_backend"]
