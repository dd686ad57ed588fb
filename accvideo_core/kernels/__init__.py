"""Fused element-wise / normalisation kernels of the transformer and the VAE (everything else uses them via those).

Callers always import from here: ``from accvideo_core import kernels; kernels.rms_norm_rope(...)``.
The backend is chosen per call: the Triton kernels (``triton_kernels.py``) when the tensors are on a CUDA device,
Triton imports and the backend is not forced to the reference; otherwise the pure-torch reference
(``reference.py``), which defines the semantics. CPU tensors use the reference and never import Triton, unless
``TRITON_INTERPRET=1`` is set (Triton's interpreter then runs the Triton kernels on CPU: slow, for tests).

Force the reference with ``ACCVIDEO_KERNELS=torch`` in the environment or ``kernels.set_backend("torch")``;
``"triton"`` makes a missing Triton path an error instead of a silent fallback. Code traced by ``torch.compile``
always uses the reference (Inductor generates its own fused kernels from it).

Triton is trusted only after it is checked (``selfcheck.py``): the first call of each kernel per device and dtype
compares it with the reference on a small input; on a mismatch one warning line, then the reference.
"""
from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from . import reference, selfcheck
from .reference import rotate_adjacent_pairs, stats_to_mean_rstd

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("ACCVIDEO_KERNELS", "auto").strip().lower() or "auto"
if _backend not in _BACKENDS:
    raise ValueError(f"ACCVIDEO_KERNELS={_backend!r}; expected one of {_BACKENDS}")

# Triton import state, resolved once on first need: None = not tried yet, a module, or False = unavailable.
_triton: ModuleType | bool | None = None
_triton_error: str = ""


def set_backend(name: str) -> None:
    """Select ``"auto"`` (Triton on CUDA when available), ``"torch"`` (reference) or ``"triton"`` (required)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {_BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes", "y")


def _compiling() -> bool:
    """Inside ``torch.compile`` the reference is traced instead: Inductor fuses it into its own kernels, with no
    graph break at an opaque launch."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _load_triton() -> ModuleType | None:
    """Import ``triton_kernels`` once per process; remember failure and why."""
    global _triton, _triton_error
    if _triton is None:
        try:
            from . import triton_kernels
            _triton = triton_kernels
        except Exception as exc:  # ImportError, or a broken Triton install failing at import
            _triton, _triton_error = False, f"{type(exc).__name__}: {exc}"
            if torch.cuda.is_available() and _backend == "auto":
                warnings.warn(f"accvideo kernels: Triton unavailable ({_triton_error}); using the torch reference",
                              stacklevel=3)
    return _triton or None


def selfcheck_results() -> list[dict]:
    """The Triton-vs-reference checks made so far in this process (one per kernel, device and dtype)."""
    return selfcheck.results()


def triton_available() -> bool:
    """Whether the Triton kernels import here (imports Triton if it was not tried yet)."""
    return _load_triton() is not None


def _impl(name: str, *tensors: torch.Tensor | None):
    """Pick the implementation of kernel ``name`` for these tensors."""
    if _backend == "torch" or _compiling():
        return getattr(reference, name)
    first = next(t for t in tensors if t is not None)
    why = ""
    if first.is_cuda or _interpret_requested():
        module = _load_triton()
        if module is not None and module.supports(*tensors):
            if selfcheck.trusted(name, module, first, forced=_backend == "triton"):
                return getattr(module, name)
            return getattr(reference, name)
        why = f"Triton missing ({_triton_error})" if module is None else (
            "tensors are not all on one kind of device Triton can use, or not fp32/fp16/bf16 "
            f"(Triton interpreter active: {module.INTERPRET})")
    else:
        why = "tensors are on the CPU and TRITON_INTERPRET is unset"
    if _backend == "triton":
        raise RuntimeError(f"kernel backend 'triton' was forced but cannot run {name} here: {why}. "
                           "Use ACCVIDEO_KERNELS=auto (or torch), move the tensors to CUDA, or set "
                           "TRITON_INTERPRET=1 before Triton is imported to run the kernels on CPU.")
    return getattr(reference, name)


def rms_norm_rope(x, weight, cos=None, sin=None, eps: float = 1e-6):
    """See ``reference.rms_norm_rope``."""
    return _impl("rms_norm_rope", x, weight, cos, sin)(x, weight, cos, sin, eps)


def layer_norm_modulate(x, shift, scale, eps: float = 1e-6):
    """See ``reference.layer_norm_modulate``."""
    return _impl("layer_norm_modulate", x, shift, scale)(x, shift, scale, eps)


def gated_residual(x, y, gate):
    """See ``reference.gated_residual``."""
    return _impl("gated_residual", x, y, gate)(x, y, gate)


def group_norm_silu(x, weight, bias, num_groups: int, eps: float = 1e-6, silu: bool = True, mean=None, rstd=None):
    """See ``reference.group_norm_silu``."""
    return _impl("group_norm_silu", x, weight, bias, mean, rstd)(x, weight, bias, num_groups, eps, silu, mean, rstd)


def group_norm_stats(x, num_groups: int):
    """See ``reference.group_norm_stats`` (the Triton version reads x once, without an fp64 copy)."""
    return _impl("group_norm_stats", x)(x, num_groups)


__all__ = ["rms_norm_rope", "layer_norm_modulate", "gated_residual", "group_norm_silu", "group_norm_stats",
           "stats_to_mean_rstd", "rotate_adjacent_pairs", "set_backend", "get_backend", "triton_available",
           "selfcheck_results"]
