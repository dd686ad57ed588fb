"""Triton is trusted only after it is checked: the first time a kernel runs on a device in a process (per dtype),
the dispatch compares the Triton kernel with the torch reference on a small input, forward and - where the kernel
has a Triton backward - backward. On a mismatch it warns once (one line) and uses the reference for that kernel,
device and dtype from then on; with the backend forced to ``"triton"`` a mismatch is an error instead.

A check takes milliseconds on a GPU (a few small launches plus their compilation, which the real call would pay
anyway). Accuracy rule, per output and gradient: the kernel's error against the reference computed in fp32 from the
same (rounded) inputs must be at most twice the low-precision reference's own error plus a tolerance of the
dtype's precision times the output's scale, i.e. the kernel may not be less accurate than the reference it
replaces. A wrong kernel (a sign, a missing term, a wrong index) is off by O(scale) and fails.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Callable

import torch

from . import reference

# Relative tolerance (of the output's max abs) on top of twice the low-precision reference's own error.
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2.0 ** -9, torch.bfloat16: 2.0 ** -6}


class KernelMismatchWarning(UserWarning):
    """A Triton kernel disagreed with the torch reference on this device; the reference is used instead."""


@dataclass
class Verdict:
    kernel: str
    device: str
    dtype: str
    ok: bool
    # worst (error - 2 x reference error) / scale over outputs and gradients, >= 0; None when the kernel raised
    excess_error: float | None
    tolerance: float  # the check fails when excess_error > tolerance
    detail: str
    seconds: float


_verdicts: dict[tuple[str, str, torch.dtype], Verdict] = {}


def results() -> list[dict]:
    """Every check made in this process so far, as dicts (kernel, device, dtype, ok, errors, seconds)."""
    return [asdict(v) for v in _verdicts.values()]


def reset() -> None:
    """Forget every verdict (the next call of each kernel is checked again)."""
    _verdicts.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def trusted(name: str, module: ModuleType, like: torch.Tensor, *, forced: bool) -> bool:
    """Whether ``module.<name>`` may run for tensors like ``like`` (checked on first use per device and dtype)."""
    key = (name, str(like.device), like.dtype)
    verdict = _verdicts.get(key)
    if verdict is None:
        if _capturing(like.device):  # no extra work inside a CUDA graph capture; check on a later call
            return True
        verdict = compare(name, module, like.device, like.dtype)
        _verdicts[key] = verdict
        if not verdict.ok:
            message = (f"accvideo kernels: Triton {name} disagrees with the torch reference on {verdict.device} "
                       f"{verdict.dtype} ({verdict.detail}); using the reference from now on")
            if forced:
                raise RuntimeError(message.replace("using the reference from now on",
                                                   "kernel backend 'triton' was forced; use ACCVIDEO_KERNELS=auto"))
            warnings.warn(message, KernelMismatchWarning, stacklevel=4)
    return verdict.ok


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device="cpu") * scale + offset


def _cases(name: str, gen: torch.Generator, n: int) -> list[tuple[Callable, list[torch.Tensor | None], bool]]:
    """(call(fn, *inputs), fp32 CPU inputs, whether gradients are checked) for kernel ``name``.

    Shapes are small but use the HunyuanVideo inner sizes (head dim 128 with partial RoPE, 3072 channels, 32
    VAE groups), so the checked launch configurations are those the models use. ``n`` scales the token count."""
    if name == "rms_norm_rope":
        angles = _randn(gen, n, 64, scale=3.0)
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        x, w = _randn(gen, 1, n + 2, 2, 128), _randn(gen, 128, scale=0.3, offset=1.0)
        return [(lambda fn, a, b: fn(a, b, cos.to(a.device), sin.to(a.device)), [x, w], True),
                (lambda fn, a, b: fn(a, b), [x, w], True)]
    if name == "layer_norm_modulate":
        x = _randn(gen, 2, n, 3072, scale=2.0, offset=0.5)
        return [(lambda fn, a, s, c: fn(a, s, c), [x, _randn(gen, 2, 3072, scale=0.5), _randn(gen, 2, 3072, scale=0.5)],
                 True)]
    if name == "gated_residual":
        return [(lambda fn, a, b, g: fn(a, b, g), [_randn(gen, 2, n, 3072), _randn(gen, 2, n, 3072),
                                                  _randn(gen, 2, 3072, scale=0.5)], True)]
    if name == "group_norm_silu":
        x, w, b = _randn(gen, 1, 64, 3, 6, n + 2, scale=1.5, offset=0.3), _randn(gen, 64, scale=0.3, offset=1.0), \
            _randn(gen, 64, scale=0.2)
        s, q, n = reference.group_norm_stats(x, 32)
        mean, rstd = reference.stats_to_mean_rstd(s, q, n, 1e-6)
        return [(lambda fn, a, ww, bb: fn(a, ww, bb, 32), [x, w, b], False),
                (lambda fn, a, ww, bb: fn(a, ww, bb, 32, 1e-6, True, mean.to(a.device), rstd.to(a.device)),
                 [x, w, b], False)]
    if name == "group_norm_stats":  # a time slice, as the VAE's chunked decode reads it
        video = _randn(gen, 1, 64, 4, 6, n + 2, scale=1.5, offset=2.0)
        return [(lambda fn, a: fn(a[:, :, 1:], 32)[:2], [video], False)]
    raise ValueError(f"no self-check for kernel {name!r}")


def _keep(t: torch.Tensor) -> torch.Tensor:
    """Identity pack / unpack hook for saved tensors."""
    return t


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _worst(got: list[torch.Tensor], low_ref: list[torch.Tensor], exact: list[torch.Tensor], tol: float) -> float:
    """Max over tensors of (error - 2 x reference error) / scale, minus the tolerance: > 0 means a mismatch."""
    worst = -tol  # the initial value: no tensor exceeded anything
    for g, r, e in zip(got, low_ref, exact):
        e64 = e.detach().double().cpu()
        scale = max(e64.abs().max().item(), 1e-30)
        err = (g.detach().double().cpu() - e64).abs().max().item()
        ref_err = (r.detach().double().cpu() - e64).abs().max().item()
        worst = max(worst, (err - 2 * ref_err) / scale - tol)
    return worst


def compare(name: str, module: ModuleType, device: torch.device | str, dtype: torch.dtype,
            tokens: int = 5) -> Verdict:
    """Run ``module.<name>`` and the reference on the same random inputs (``tokens`` rows) on ``device`` in
    ``dtype``, forward and backward, and judge the kernel by the accuracy rule of this module."""
    device = torch.device(device)
    started = time.perf_counter()
    tol = _TOLERANCE.get(dtype, 1e-4)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    worst, detail = -tol, "matches"
    try:
        # Own saved-tensor hooks (identity) mask the caller's: a first use inside a non-reentrant gradient
        # checkpoint would otherwise hand the check's saved tensors to the checkpoint, whose unpack during the
        # check's backward recomputes the caller's block (the check then fails spuriously and the later backward
        # raises CheckpointError for a different number of saved tensors).
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            for call, inputs, with_grad in _cases(name, gen, tokens):
                low = [t.to(device=device, dtype=dtype).requires_grad_(with_grad) for t in inputs]
                exact_in = [t.detach().float().requires_grad_(with_grad) for t in low]
                runs = [_flat(call(fn, *args)) for fn, args in ((getattr(module, name), low),
                                                              (getattr(reference, name), low),
                                                              (getattr(reference, name), exact_in))]
                worst = max(worst, _worst(*runs, tol))
                if with_grad:
                    grad_out = _randn(gen, *runs[2][0].shape).to(device)
                    grads = [torch.autograd.grad(run[0], args, grad_out.to(run[0].dtype))
                             for run, args in zip(runs, (low, low, exact_in))]
                    worst = max(worst, _worst(*grads, tol))
        if worst > 0:
            detail = f"error {worst + tol:.3g} of the output scale beyond twice the reference's own"
    except Exception as exc:  # a kernel that fails to compile or launch is not trusted either
        worst, detail = float("inf"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    excess = max(0.0, round(worst + tol, 9)) if worst < float("inf") else None
    return Verdict(kernel=name, device=str(device), dtype=str(dtype).removeprefix("torch."), ok=worst <= 0,
                   excess_error=excess, tolerance=tol, detail=detail, seconds=round(time.perf_counter() - started, 4))
