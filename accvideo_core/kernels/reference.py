"""Pure-torch reference implementations of the fused kernels.

These define the semantics; the Triton kernels must match them. They are also what runs on CPU and
whenever Triton or a CUDA device is absent. All are differentiable through autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_adjacent_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the original HunyuanVideo RoPE rotation."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the head dim, then RoPE on the first ``cos.shape[0]`` tokens.

    x: ``[B, L, heads, D]`` (q or k); weight: ``[D]``; cos, sin: ``[L_rope, D]`` fp32 with each frequency
    repeated for the two members of a pair (interleaved layout), L_rope <= L. Tokens past L_rope (text tokens,
    which follow the image tokens) are normalised but not rotated. Normalisation and rotation run in fp32; the
    result has x's dtype.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    # The original casts back to the input dtype before applying the weight.
    normed = normed.to(x.dtype) * weight.to(x.dtype)
    if cos is None:
        return normed
    n_rope = cos.shape[0]
    head = normed[:, :n_rope].float()
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    rotated = (head * c + rotate_adjacent_pairs(head) * s).to(x.dtype)
    if n_rope == normed.shape[1]:
        return rotated
    return torch.cat((rotated, normed[:, n_rope:]), dim=1)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine over the last dim, then ``x * (1 + scale) + shift``.

    x: ``[B, L, C]``; shift, scale: ``[B, C]`` (broadcast over tokens).
    """
    normed = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return torch.addcmul(shift.unsqueeze(1), normed, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate``: x, y ``[B, L, C]``, gate ``[B, C]`` (broadcast over tokens)."""
    return torch.addcmul(x, y, gate.unsqueeze(1))


def group_norm_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per (batch, group) sum and sum of squares in fp64 plus the element count, for whole-volume statistics
    accumulated over tiles. x: ``[B, C, ...]``. Returns (sum ``[B, G]``, sumsq ``[B, G]``, count)."""
    b = x.shape[0]
    grouped = x.reshape(b, num_groups, -1).double()
    return grouped.sum(-1), grouped.pow(2).sum(-1), grouped.shape[-1]


def stats_to_mean_rstd(total: torch.Tensor, total_sq: torch.Tensor, count: int,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn accumulated (sum, sumsq, count) into (mean, 1/std) in fp32."""
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0)
    return mean.float(), torch.rsqrt(var + eps).float()


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-6, silu: bool = True, mean: torch.Tensor | None = None,
                    rstd: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm (optionally with SiLU) over ``[B, C, *spatial]``.

    With ``mean``/``rstd`` (``[B, G]``, e.g. statistics of a whole video gathered over tiles) the given
    statistics are used instead of the tile's own, which is what makes tiled decoding exact.
    """
    if mean is None:
        out = F.group_norm(x, num_groups, weight, bias, eps)
    else:
        b, c = x.shape[:2]
        shape = (b, num_groups) + (1,) * (x.dim() - 1)
        xg = x.reshape(b, num_groups, c // num_groups, *x.shape[2:]).float()
        out = ((xg - mean.reshape(shape)) * rstd.reshape(shape)).reshape(x.shape).to(x.dtype)
        affine = (1, c) + (1,) * (x.dim() - 2)
        if weight is not None:
            out = out * weight.reshape(affine)
        if bias is not None:
            out = out + bias.reshape(affine)
    return F.silu(out) if silu else out
