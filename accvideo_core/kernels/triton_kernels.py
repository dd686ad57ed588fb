"""Triton implementations of the fused kernels (semantics: ``reference.py``).

Imported lazily by the dispatch in ``__init__.py``, only when a CUDA tensor reaches a kernel or when
``TRITON_INTERPRET=1`` is set (Triton's interpreter then runs the same kernels on CPU tensors, which is how CI
tests them). Every kernel loads its inputs in their storage dtype, computes in fp32 and rounds where the
reference rounds, so fp32 results match the reference to ~1e-6 and bf16/fp16 results to the dtype's precision.

Backward passes:
- ``rms_norm_rope``, ``layer_norm_modulate``, ``gated_residual``: Triton backward kernels (one fused pass each;
  per-program partial sums for the weight / shift / scale / gate gradients are reduced with ``torch.sum``).
- ``group_norm_silu`` (VAE only, not trained): forward in Triton, backward recomputes with the reference under
  autograd (correct, not fused). ``group_norm_stats`` has no backward (with grad enabled it uses the reference).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import reference


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes", "y")


# Triton decides between compiled and interpreted kernels when ``@triton.jit`` runs, i.e. at this import.
INTERPRET = _env_flag("TRITON_INTERPRET")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports(*tensors: torch.Tensor | None) -> bool:
    """True when these kernels can run on these tensors: one CUDA device (or the CPU in interpreter mode),
    fp32/fp16/bf16."""
    present = [t for t in tensors if t is not None]
    if not present:
        return False
    if len({t.device for t in present}) != 1:  # mixed devices: the reference raises torch's clear error
        return False
    device_type = present[0].device.type
    if not (device_type == "cuda" or (INTERPRET and device_type == "cpu")):
        return False
    return all(t.dtype in _FLOAT_DTYPES for t in present)


def _on_input_device(fn):
    """Launch on the device of the first tensor argument (Triton launches on the *current* CUDA device)."""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)
    return wrapper


def _rows_per_program(block_cols: int, budget: int = 2048, cap: int = 64) -> int:
    return max(1, min(cap, budget // block_cols))


def _num_warps(block_elems: int) -> int:
    """~8 elements per thread: 16-byte bf16 accesses, and few enough registers for several programs per SM."""
    return max(1, min(16, block_elems // 256))


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` precision with round-to-nearest-even, kept in fp32.

    bf16 is rounded with integer ops: compiled Triton rounds to nearest even anyway, but the interpreter
    truncates fp32 -> bf16, which would make the CPU tests check a different rounding than the GPU runs.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even (see ``_round``)."""
    return _round(x, dtype).to(dtype)


# Backward kernels that reduce over tokens give each program a run of rows, so the fp32 partial sums they write
# stay small (at most ``_MAX_PARTIAL_ROWS`` rows per batch, or ``max_programs``) instead of one row per block.
_MAX_PARTIAL_ROWS = 1024


def _token_split(n_rows: int, block_r: int, max_programs: int | None = None) -> tuple[int, int]:
    """(rows per program, programs) covering ``n_rows`` rows in whole ``block_r`` steps."""
    per_program = triton.cdiv(triton.cdiv(n_rows, max_programs or _MAX_PARTIAL_ROWS), block_r) * block_r
    return per_program, triton.cdiv(n_rows, per_program)


# ---------------------------------------------------------------------------------------------------------------
# (a) RMSNorm over the head dim + interleaved RoPE on the first n_rope tokens
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _rms_norm_rope_fwd(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr,
                       n_rows, seq_len, heads, head_dim, n_rope, sx_b, sx_l, sx_h, eps,
                       HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < head_dim
    mask = row_ok[:, None] & col_ok[None, :]
    b = rows // (seq_len * heads)
    token = (rows // heads) % seq_len
    head = rows % heads
    x_row = b.to(tl.int64) * sx_b + token.to(tl.int64) * sx_l + head.to(tl.int64) * sx_h
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / head_dim + eps)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out_ty = out_ptr.dtype.element_ty
    # The reference rounds to x's dtype after normalising and again after the weight.
    normed = _round(_round(x * rstd[:, None], out_ty) * w[None, :], out_ty)
    if HAS_ROPE:
        partner = cols ^ 1
        x_p = tl.load(x_ptr + x_row[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        w_p = tl.load(w_ptr + partner, mask=col_ok, other=0.0).to(tl.float32)
        normed_p = _round(_round(x_p * rstd[:, None], out_ty) * w_p[None, :], out_ty)
        rotated_half = tl.where((cols % 2 == 0)[None, :], -normed_p, normed_p)
        is_rope = token < n_rope
        rope_mask = mask & is_rope[:, None]
        angle_off = token.to(tl.int64)[:, None] * head_dim + cols[None, :]
        c = tl.load(cos_ptr + angle_off, mask=rope_mask, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + angle_off, mask=rope_mask, other=0.0).to(tl.float32)
        normed = tl.where(is_rope[:, None], normed * c + rotated_half * s, normed)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * head_dim + cols[None, :], _cast(normed, out_ty), mask=mask)


@triton.jit
def _rms_norm_rope_bwd(grad_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
                       n_rows, seq_len, heads, head_dim, n_rope, rows_per_program, sx_b, sx_l, sx_h,
                       HAS_ROPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each program walks ``rows_per_program`` (token, head) rows, accumulating d(weight)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, rows_per_program, BLOCK_R):
        rows = pid * rows_per_program + start + tl.arange(0, BLOCK_R)
        row_ok = (rows < n_rows) & (start + tl.arange(0, BLOCK_R) < rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        b = rows // (seq_len * heads)
        token = (rows // heads) % seq_len
        head = rows % heads
        x_row = b.to(tl.int64) * sx_b + token.to(tl.int64) * sx_l + head.to(tl.int64) * sx_h
        g_row = rows.to(tl.int64) * head_dim
        x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + g_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        normed = x * rstd[:, None]
        if HAS_ROPE:
            # y[d] = c[d] z[d] + s[d] rot(z)[d] with rot(z)[2i] = -z[2i+1], rot(z)[2i+1] = z[2i]
            # => dz[d] = c[d] g[d] + (+s[d+1] g[d+1] for even d, -s[d-1] g[d-1] for odd d)
            partner = cols ^ 1
            is_rope = token < n_rope
            rope_mask = mask & is_rope[:, None]
            angle_row = token.to(tl.int64)[:, None] * head_dim
            c = tl.load(cos_ptr + angle_row + cols[None, :], mask=rope_mask, other=1.0).to(tl.float32)
            s_p = tl.load(sin_ptr + angle_row + partner[None, :], mask=rope_mask, other=0.0).to(tl.float32)
            g_p = tl.load(grad_ptr + g_row[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            cross = s_p * g_p
            g = c * g + tl.where((cols % 2 == 0)[None, :], cross, -cross)
        acc_w += tl.sum(g * normed, axis=0)
        dn = g * w[None, :]
        dot = tl.sum(dn * normed, axis=1) / head_dim
        dx = rstd[:, None] * (dn - normed * dot[:, None])
        tl.store(dx_ptr + g_row[:, None] + cols[None, :], _cast(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_part_ptr + pid.to(tl.int64) * head_dim + cols, acc_w, mask=col_ok)


def _rms_norm_rope_launch_args(x: torch.Tensor):
    batch, seq_len, heads, head_dim = x.shape
    block_d = triton.next_power_of_2(head_dim)
    block_r = _rows_per_program(block_d)
    n_rows = batch * seq_len * heads
    return n_rows, block_r, block_d, (triton.cdiv(n_rows, block_r),)


class _RMSNormRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, cos, sin, eps):
        x = _last_dim_contiguous(x)
        w = weight.to(x.dtype).contiguous()
        has_rope = cos is not None
        n_rope = cos.shape[0] if has_rope else 0
        cos_f = cos.float().contiguous() if has_rope else x  # dummy pointer when unused
        sin_f = sin.float().contiguous() if has_rope else x
        n_rows, block_r, block_d, grid = _rms_norm_rope_launch_args(x)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        _rms_norm_rope_fwd[grid](x, w, cos_f, sin_f, out, rstd, n_rows, x.shape[1], x.shape[2], x.shape[3], n_rope,
                                 x.stride(0), x.stride(1), x.stride(2), eps, HAS_ROPE=has_rope,
                                 BLOCK_R=block_r, BLOCK_D=block_d, num_warps=_num_warps(block_r * block_d))
        ctx.save_for_backward(x, w, cos_f, sin_f, rstd)
        ctx.has_rope, ctx.n_rope, ctx.weight_dtype = has_rope, n_rope, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w, cos_f, sin_f, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        n_rows, block_r, block_d, _ = _rms_norm_rope_launch_args(x)
        per_program, programs = _token_split(n_rows, block_r, max_programs=8 * _MAX_PARTIAL_ROWS)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw_part = torch.empty(programs, x.shape[3], dtype=torch.float32, device=x.device)
        _rms_norm_rope_bwd[(programs,)](grad_out, x, w, cos_f, sin_f, rstd, dx, dw_part, n_rows, x.shape[1],
                                        x.shape[2], x.shape[3], ctx.n_rope, per_program, x.stride(0), x.stride(1),
                                        x.stride(2), HAS_ROPE=ctx.has_rope, BLOCK_R=block_r, BLOCK_D=block_d,
                                        num_warps=_num_warps(block_r * block_d))
        dw = dw_part.sum(0).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None


@_on_input_device
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Triton ``reference.rms_norm_rope`` (x ``[B, L, heads, D]``; any shape ``[..., D]`` without RoPE)."""
    if cos is None and sin is None and x.dim() != 4 and x.dim() >= 1 and weight.shape == (x.shape[-1],):
        return rms_norm_rope(x.reshape(-1, 1, 1, x.shape[-1]), weight, eps=eps).reshape(x.shape)
    if x.dim() != 4 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm_rope expects x [B, L, heads, D] and weight [D]; got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("rms_norm_rope needs both cos and sin, or neither")
    if cos is not None:
        if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != x.shape[-1] or cos.shape[0] > x.shape[1]:
            raise ValueError(f"cos/sin must be [L_rope <= {x.shape[1]}, {x.shape[-1]}]; got cos {tuple(cos.shape)}, "
                             f"sin {tuple(sin.shape)}")
        if x.shape[-1] % 2:
            raise ValueError(f"RoPE needs an even head dim; got {x.shape[-1]}")
        if _needs_grad(cos, sin):  # gradients w.r.t. the angles are not fused
            return reference.rms_norm_rope(x, weight, cos, sin, eps)
        if cos.shape[0] == 0:
            cos = sin = None
    if x.numel() == 0:
        return reference.rms_norm_rope(x, weight, cos, sin, eps)
    return _RMSNormRoPE.apply(x, weight, cos, sin, eps)


# ---------------------------------------------------------------------------------------------------------------
# (b) LayerNorm (no affine) + adaLN modulation: LN(x) * (1 + scale) + shift
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _layer_norm_modulate_fwd(x_ptr, shift_ptr, scale_ptr, out_ptr, mean_ptr, rstd_ptr,
                             seq_len, channels, sx_b, sx_l, s_shift, s_scale, eps,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    mask = (tokens < seq_len)[:, None] & col_ok[None, :]
    x_row = b.to(tl.int64) * sx_b + tokens.to(tl.int64) * sx_l
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0)
    x_ty = x.dtype
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / channels
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / channels + eps)
    row = b * seq_len + tokens
    tl.store(mean_ptr + row, mean, mask=tokens < seq_len)
    tl.store(rstd_ptr + row, rstd, mask=tokens < seq_len)
    shift = tl.load(shift_ptr + b.to(tl.int64) * s_shift + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b.to(tl.int64) * s_scale + cols, mask=col_ok, other=0.0)
    # As in the reference: LN output in x's dtype, (1 + scale) in scale's dtype, one fused multiply-add.
    one_plus_scale = _round(scale.to(tl.float32) + 1.0, scale.dtype)
    normed = _round(centred * rstd[:, None], x_ty)
    out = normed * one_plus_scale[None, :] + shift[None, :]
    tl.store(out_ptr + row.to(tl.int64)[:, None] * channels + cols[None, :], _cast(out, out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _layer_norm_modulate_bwd(grad_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, dshift_part_ptr,
                             dscale_part_ptr, seq_len, channels, tokens_per_program, sx_b, sx_l, s_scale,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each program walks ``tokens_per_program`` tokens of one batch row, accumulating d(shift), d(scale)."""
    pid_l = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    scale = tl.load(scale_ptr + b.to(tl.int64) * s_scale + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_scale = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid_l * tokens_per_program
    for start in range(0, tokens_per_program, BLOCK_R):
        tokens = first + start + tl.arange(0, BLOCK_R)
        tok_ok = (tokens < seq_len) & (start + tl.arange(0, BLOCK_R) < tokens_per_program)
        mask = tok_ok[:, None] & col_ok[None, :]
        row = b * seq_len + tokens
        out_off = row.to(tl.int64)[:, None] * channels + cols[None, :]
        x_row = b.to(tl.int64) * sx_b + tokens.to(tl.int64) * sx_l
        x = tl.load(x_ptr + x_row[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row, mask=tok_ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=tok_ok, other=0.0)
        normed = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_shift += tl.sum(g, axis=0)
        acc_scale += tl.sum(g * normed, axis=0)
        dn = g * (1.0 + scale[None, :])
        mean_dn = tl.sum(dn, axis=1) / channels
        mean_dn_n = tl.sum(dn * normed, axis=1) / channels
        dx = rstd[:, None] * (dn - mean_dn[:, None] - normed * mean_dn_n[:, None])
        tl.store(dx_ptr + out_off, _cast(dx, dx_ptr.dtype.element_ty), mask=mask)
    part = (b.to(tl.int64) * tl.num_programs(0) + pid_l) * channels + cols
    tl.store(dshift_part_ptr + part, acc_shift, mask=col_ok)
    tl.store(dscale_part_ptr + part, acc_scale, mask=col_ok)


def _layer_norm_launch_args(x: torch.Tensor):
    batch, seq_len, channels = x.shape
    block_c = triton.next_power_of_2(channels)
    block_r = _rows_per_program(block_c, cap=16)
    return block_r, block_c, (triton.cdiv(seq_len, block_r), batch)


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        x, shift, scale = _last_dim_contiguous(x), _last_dim_contiguous(shift), _last_dim_contiguous(scale)
        batch, seq_len, channels = x.shape
        block_r, block_c, grid = _layer_norm_launch_args(x)
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(shift.dtype, scale.dtype))
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        mean = torch.empty(batch * seq_len, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        _layer_norm_modulate_fwd[grid](x, shift, scale, out, mean, rstd, seq_len, channels, x.stride(0), x.stride(1),
                                       shift.stride(0), scale.stride(0), eps, BLOCK_R=block_r, BLOCK_C=block_c,
                                       num_warps=_num_warps(block_r * block_c))
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, mean, rstd = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, seq_len, channels = x.shape
        block_r, block_c, _ = _layer_norm_launch_args(x)
        per_program, programs = _token_split(seq_len, block_r)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dshift_part = torch.empty(batch, programs, channels, dtype=torch.float32, device=x.device)
        dscale_part = torch.empty_like(dshift_part)
        _layer_norm_modulate_bwd[(programs, batch)](
            grad_out, x, scale, mean, rstd, dx, dshift_part, dscale_part, seq_len, channels, per_program,
            x.stride(0), x.stride(1), scale.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_num_warps(block_r * block_c))
        dshift = dshift_part.sum(1).to(ctx.shift_dtype) if ctx.needs_input_grad[1] else None
        dscale = dscale_part.sum(1).to(scale.dtype) if ctx.needs_input_grad[2] else None
        return dx, dshift, dscale, None


@_on_input_device
def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    """Triton ``reference.layer_norm_modulate`` (x ``[B, L, C]``, shift/scale ``[B, C]``)."""
    if x.dim() != 3 or shift.shape != (x.shape[0], x.shape[2]) or scale.shape != shift.shape:
        raise ValueError(f"layer_norm_modulate expects x [B, L, C], shift and scale [B, C]; got x {tuple(x.shape)}, "
                         f"shift {tuple(shift.shape)}, scale {tuple(scale.shape)}")
    if x.numel() == 0:
        return reference.layer_norm_modulate(x, shift, scale, eps)
    return _LayerNormModulate.apply(x, shift, scale, eps)


# ---------------------------------------------------------------------------------------------------------------
# (c) gated residual: x + y * gate
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _gated_residual_fwd(x_ptr, y_ptr, gate_ptr, out_ptr, seq_len, channels, sx_b, sx_l, sy_b, sy_l, s_gate,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(1)
    tokens = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    mask = (tokens < seq_len)[:, None] & col_ok[None, :]
    b64, t64 = b.to(tl.int64), tokens.to(tl.int64)
    x = tl.load(x_ptr + (b64 * sx_b + t64 * sx_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + (b64 * sy_b + t64 * sy_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b64 * s_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = x + y * gate[None, :]
    out_off = (b64 * seq_len + t64)[:, None] * channels + cols[None, :]
    tl.store(out_ptr + out_off, _cast(out, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd(grad_ptr, y_ptr, gate_ptr, dy_ptr, dgate_part_ptr, seq_len, channels, tokens_per_program,
                        sy_b, sy_l, s_gate, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each program walks ``tokens_per_program`` tokens of one batch row and column block, accumulating d(gate)."""
    pid_l = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    gate = tl.load(gate_ptr + b64 * s_gate + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_gate = tl.zeros((BLOCK_C,), dtype=tl.float32)
    first = pid_l * tokens_per_program
    for start in range(0, tokens_per_program, BLOCK_R):
        tokens = first + start + tl.arange(0, BLOCK_R)
        tok_ok = (tokens < seq_len) & (start + tl.arange(0, BLOCK_R) < tokens_per_program)
        mask = tok_ok[:, None] & col_ok[None, :]
        t64 = tokens.to(tl.int64)
        out_off = (b64 * seq_len + t64)[:, None] * channels + cols[None, :]
        g = tl.load(grad_ptr + out_off, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + (b64 * sy_b + t64 * sy_l)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + out_off, _cast(g * gate[None, :], dy_ptr.dtype.element_ty), mask=mask)
        acc_gate += tl.sum(g * y, axis=0)
    tl.store(dgate_part_ptr + (b64 * tl.num_programs(0) + pid_l) * channels + cols, acc_gate, mask=col_ok)


def _gated_residual_launch_args(x: torch.Tensor):
    batch, seq_len, channels = x.shape
    block_c = min(1024, triton.next_power_of_2(channels))
    block_r = _rows_per_program(block_c, cap=32)
    return block_r, block_c, (triton.cdiv(seq_len, block_r), batch, triton.cdiv(channels, block_c))


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate):
        x, y, gate = _last_dim_contiguous(x), _last_dim_contiguous(y), _last_dim_contiguous(gate)
        block_r, block_c, grid = _gated_residual_launch_args(x)
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype))
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        _gated_residual_fwd[grid](x, y, gate, out, x.shape[1], x.shape[2], x.stride(0), x.stride(1), y.stride(0),
                                  y.stride(1), gate.stride(0), BLOCK_R=block_r, BLOCK_C=block_c,
                                  num_warps=_num_warps(block_r * block_c))
        ctx.save_for_backward(y, gate)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, gate = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dx = grad_out.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return dx, None, None
        block_r, block_c, grid = _gated_residual_launch_args(y)
        per_program, programs = _token_split(y.shape[1], block_r)
        dy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
        dgate_part = torch.empty(y.shape[0], programs, y.shape[2], dtype=torch.float32, device=y.device)
        _gated_residual_bwd[(programs, grid[1], grid[2])](
            grad_out, y, gate, dy, dgate_part, y.shape[1], y.shape[2], per_program, y.stride(0), y.stride(1),
            gate.stride(0), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_num_warps(block_r * block_c))
        dgate = dgate_part.sum(1).to(gate.dtype) if ctx.needs_input_grad[2] else None
        return dx, dy, dgate


@_on_input_device
def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Triton ``reference.gated_residual`` (x, y ``[B, L, C]``, gate ``[B, C]``)."""
    if x.dim() != 3 or y.shape != x.shape or gate.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"gated_residual expects x and y [B, L, C] and gate [B, C]; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}, gate {tuple(gate.shape)}")
    if x.numel() == 0:
        return reference.gated_residual(x, y, gate)
    return _GatedResidual.apply(x, y, gate)


# ---------------------------------------------------------------------------------------------------------------
# (d) GroupNorm (+ SiLU) for the VAE, with optional externally supplied statistics
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _group_norm_partial_stats(x_ptr, part_ptr, groups, channels_per_group, inner, sx_b, sx_c, n_chunks,
                              BLOCK: tl.constexpr):
    """Per (batch*group, chunk): element count, chunk mean and the chunk's sum of squared deviations.

    Each channel's ``inner`` elements are contiguous; batch and channel strides are free (time slices of a video).
    Grid ``(chunks, batch*groups)`` (see ``_group_grid``).
    """
    chunk = tl.program_id(0)
    bg = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < channels_per_group * inner
    channel = (bg % groups) * channels_per_group + offs // inner
    ptrs = x_ptr + (bg // groups).to(tl.int64) * sx_b + channel.to(tl.int64) * sx_c + offs % inner
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    count = tl.sum(ok.to(tl.float32), axis=0)
    mean = tl.sum(x, axis=0) / count
    dev = tl.where(ok, x - mean, 0.0)
    base = (bg.to(tl.int64) * n_chunks + chunk) * 3
    tl.store(part_ptr + base, count)
    tl.store(part_ptr + base + 1, mean)
    tl.store(part_ptr + base + 2, tl.sum(dev * dev, axis=0))


@triton.jit
def _group_norm_silu_apply(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, out_ptr, groups, channels_per_group, spatial,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ROUND_NORMED: tl.constexpr,
                           SILU: tl.constexpr, BLOCK: tl.constexpr):
    """One (batch, group) per grid column: its channels x spatial elements are contiguous in memory. Grid
    ``(chunks, batch*groups)`` (see ``_group_grid``)."""
    bg = tl.program_id(1)
    group_numel = channels_per_group * spatial
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < group_numel
    c = (bg % groups) * channels_per_group + offs // spatial
    mean = tl.load(mean_ptr + bg).to(tl.float32)
    rstd = tl.load(rstd_ptr + bg).to(tl.float32)
    base = bg.to(tl.int64) * group_numel
    x = tl.load(x_ptr + base + offs, mask=ok, other=0.0)
    y = (x.to(tl.float32) - mean) * rstd
    if ROUND_NORMED:  # the reference rounds to x's dtype before the affine when statistics are supplied
        y = _round(y, x.dtype)
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(out_ptr + base + offs, _cast(y, out_ptr.dtype.element_ty), mask=ok)


_STATS_BLOCK = 4096
_MAX_GRID_YZ = 65535  # CUDA's limit of grid dimensions 1 and 2 (dimension 0 allows 2**31 - 1)


def _group_grid(batch_groups: int, group_numel: int, block: int) -> tuple[int, int]:
    """Launch grid of the GroupNorm kernels: the chunks of one group on axis 0, the (batch, group) pairs on axis 1.

    The chunk count reaches ~116k for one 720x1280x129 VAE activation with 4 channels per group, over CUDA's 65535
    limit of axes 1 and 2; the (batch, group) count stays small."""
    if batch_groups > _MAX_GRID_YZ:
        raise ValueError(f"GroupNorm over {batch_groups} (batch, group) pairs exceeds one launch ({_MAX_GRID_YZ}); "
                         "split the batch")
    return triton.cdiv(group_numel, block), batch_groups


def _channel_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy unless every ``x[b, c]`` is already contiguous (e.g. a time slice of a video)."""
    inner = x[0, 0] if x.shape[0] and x.shape[1] else x
    return x if inner.is_contiguous() else x.contiguous()


def _chunk_stats(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per (batch*group, chunk) (count, mean, M2) in fp32, from one Triton pass over ``x`` (channel-contiguous)."""
    batch, channels = x.shape[:2]
    inner = x[0, 0].numel()
    group_numel = channels // num_groups * inner
    block = min(_STATS_BLOCK, triton.next_power_of_2(group_numel))
    n_chunks = triton.cdiv(group_numel, block)
    part = torch.empty(batch * num_groups, n_chunks, 3, dtype=torch.float32, device=x.device)
    grid = _group_grid(batch * num_groups, group_numel, block)
    _group_norm_partial_stats[grid](x, part, num_groups, channels // num_groups, inner, x.stride(0), x.stride(1),
                                    n_chunks, BLOCK=block, num_warps=_num_warps(block))
    return part


def _group_mean_rstd(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-tensor per-(batch, group) mean and 1/std: chunk statistics in Triton, Chan's combination in fp64."""
    count, chunk_mean, chunk_m2 = _chunk_stats(x, num_groups).double().unbind(-1)
    group_numel = x[0].numel() // num_groups
    mean = (count * chunk_mean).sum(1) / group_numel
    m2 = chunk_m2.sum(1) + (count * (chunk_mean - mean[:, None]) ** 2).sum(1)
    rstd = torch.rsqrt(m2 / group_numel + eps)
    return mean.float().reshape(x.shape[0], num_groups), rstd.float().reshape(x.shape[0], num_groups)


@_on_input_device
def group_norm_stats(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Triton ``reference.group_norm_stats``: per (batch, group) fp64 sum and sum of squares, and the count.

    Reads ``x`` once (a time slice of a video is read in place) instead of making an fp64 copy. Chunk sums are
    fp32 over <= 4096 elements each, combined in fp64; the sum of squares is rebuilt from chunk mean and squared
    deviations, so it stays accurate when the mean is large.
    """
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_stats expects x [B, C, ...] with C divisible by num_groups={num_groups}; "
                         f"got {tuple(x.shape)}")
    if x.numel() == 0 or _needs_grad(x):
        return reference.group_norm_stats(x, num_groups)
    count, chunk_mean, chunk_m2 = _chunk_stats(_channel_contiguous(x), num_groups).double().unbind(-1)
    total = (count * chunk_mean).sum(1)
    total_sq = (chunk_m2 + count * chunk_mean * chunk_mean).sum(1)
    batch = x.shape[0]
    return total.reshape(batch, num_groups), total_sq.reshape(batch, num_groups), x[0].numel() // num_groups


def _group_norm_silu_forward(x, weight, bias, num_groups, eps, silu, mean, rstd):
    x = x.contiguous()  # the apply pass writes a contiguous output with the same flat indexing
    stats_given = mean is not None
    if stats_given:
        mean_f, rstd_f = mean.float().contiguous(), rstd.float().contiguous()
        out_dtype = x.dtype
        for t in (weight, bias):  # the reference applies the affine in promoted precision on this path
            out_dtype = torch.promote_types(out_dtype, t.dtype) if t is not None else out_dtype
    else:
        mean_f, rstd_f = _group_mean_rstd(x, num_groups, eps)
        out_dtype = x.dtype
    batch, channels = x.shape[:2]
    spatial = x[0, 0].numel()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    group_numel = channels // num_groups * spatial
    block = min(4096, triton.next_power_of_2(group_numel))
    grid = _group_grid(batch * num_groups, group_numel, block)
    _group_norm_silu_apply[grid](x, mean_f, rstd_f, weight if weight is not None else x,
                                 bias if bias is not None else x, out, num_groups, channels // num_groups, spatial,
                                 HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                                 ROUND_NORMED=stats_given, SILU=silu, BLOCK=block, num_warps=_num_warps(block))
    return out


class _GroupNormSiLU(torch.autograd.Function):
    """Triton forward; the backward recomputes the reference under autograd (the VAE is not trained)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, mean, rstd):
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.config = (num_groups, eps, silu)
        return _group_norm_silu_forward(x, weight, bias, num_groups, eps, silu, mean, rstd)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(saved, [ctx.needs_input_grad[i] for i in (0, 1, 2, 6, 7)])]
        x, weight, bias, mean, rstd = inputs
        num_groups, eps, silu = ctx.config
        with torch.enable_grad():
            out = reference.group_norm_silu(x, weight, bias, num_groups, eps, silu, mean, rstd)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        x_g, w_g, b_g, m_g, r_g = [next(grads) if t is not None and t.requires_grad else None for t in inputs]
        return x_g, w_g, b_g, None, None, None, m_g, r_g


@_on_input_device
def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                    eps: float = 1e-6, silu: bool = True, mean: torch.Tensor | None = None,
                    rstd: torch.Tensor | None = None) -> torch.Tensor:
    """Triton ``reference.group_norm_silu`` (x ``[B, C, *spatial]``)."""
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_silu expects x [B, C, ...] with C divisible by num_groups={num_groups}; "
                         f"got {tuple(x.shape)}")
    channels = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"group_norm_silu {name} must be [{channels}]; got {tuple(t.shape)}")
    if (mean is None) != (rstd is None):
        raise ValueError("group_norm_silu needs both mean and rstd, or neither")
    if mean is not None and (mean.shape != (x.shape[0], num_groups) or rstd.shape != mean.shape):
        raise ValueError(f"mean/rstd must be [B={x.shape[0]}, G={num_groups}]; got {tuple(mean.shape)}, "
                         f"{tuple(rstd.shape)}")
    if x.numel() == 0:
        return reference.group_norm_silu(x, weight, bias, num_groups, eps, silu, mean, rstd)
    if _needs_grad(x, weight, bias, mean, rstd):
        return _GroupNormSiLU.apply(x, weight, bias, num_groups, eps, silu, mean, rstd)
    return _group_norm_silu_forward(x, weight, bias, num_groups, eps, silu, mean, rstd)
