"""Exact memory-bounded VAE decoding: the layers advance in lockstep over tiles in time and space.

Every layer's output lives in a store (on the device when it fits, else host memory); each output tile is
computed on the device from its input region plus the causal/spatial halo (upsampling folded into the index map),
GroupNorms use whole-volume statistics reduced over all tiles of the previous layer, and the mid-block attention
streams the keys/values of past frames with an online softmax. The result equals the untiled decode up to float
rounding. The tiles of every layer come from ``vae_decode_plan.exact_layer_plans``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

from .. import kernels
from .vae_decode_plan import DECODER_KERNEL, DecodePlan, LayerPlan, Tile
from .vae_hunyuan_video import (CausalConv3d, CausalFrameAttention, ProgressFn, ResnetBlockCausal3D, conv3d,
                                norm_silu, upsampled_frame_source)
from .vae_memory import WorkingSetMeter, ignoring

if TYPE_CHECKING:
    from .vae_hunyuan_video import HunyuanVideoVAE


class _Stats:
    """Per-group sums over every tile of one activation, turned into whole-volume (mean, rstd)."""

    def __init__(self, groups: int) -> None:
        self.groups = groups
        self.total = self.total_sq = None
        self.count = 0

    def add(self, x: torch.Tensor, frames_per_call: int = 4) -> None:
        for t0 in range(0, x.shape[2], frames_per_call):  # bounded fp64 temporaries
            s, sq, n = kernels.group_norm_stats(x[:, :, t0:t0 + frames_per_call], self.groups)
            self.total = s if self.total is None else self.total + s
            self.total_sq = sq if self.total_sq is None else self.total_sq + sq
            self.count += n

    def mean_rstd(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.stats_to_mean_rstd(self.total, self.total_sq, self.count, eps)


class _LockstepDecoder:
    """Exact chunked decoding of one sample, layer by layer, with the activations in a store."""

    def __init__(self, vae: HunyuanVideoVAE, layers: tuple[LayerPlan, ...], store: torch.device,
                 progress: ProgressFn | None, meter: WorkingSetMeter | None = None,
                 store_on_device: bool = False) -> None:
        self.vae, self.dec = vae, vae.decoder
        self.device = vae.device
        self.dtype = vae.dtype
        self.groups = vae.config.norm_num_groups
        self.store, self.progress = store, progress
        self.meter = meter
        self.store_on_device = store_on_device
        self.plans: Iterator[LayerPlan] = iter(layers)
        self.layers_done, self.layers_total = 0, len(layers)

    def _next_plan(self, name: str, conv: CausalConv3d | None = None) -> LayerPlan:
        """The planned tiles of layer ``name``; the plan and the decoder must agree on the layers."""
        plan = next(self.plans, None)
        if plan is None or plan.name != name or (conv is not None and conv.kernel_size != DECODER_KERNEL):
            raise RuntimeError(f"exact VAE decode: the plan ({plan.name if plan else 'none'}) does not match the "
                               f"decoder layer {name} (kernel {conv.kernel_size if conv else '-'}, planned "
                               f"{DECODER_KERNEL})")
        return plan

    def _step(self) -> None:
        self.layers_done += 1
        if self.progress is not None:
            self.progress(self.layers_done, self.layers_total)

    def _store_empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """A buffer in the store (host memory): not part of the device working set."""
        with ignoring(self.meter):
            return torch.empty(shape, dtype=dtype or self.dtype, device=device or self.store)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A store region on the device: a fresh copy from a host store (also when host and device are both the
        CPU), the region itself when the store is on the device (no caller modifies it in place)."""
        if self.store_on_device:
            return x
        if x.device == self.device:
            return x.clone(memory_format=torch.contiguous_format)
        return x.to(self.device, non_blocking=True)

    def _mean_rstd(self, stats: _Stats, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-volume statistics; non-finite ones abort the decode at once instead of after every layer."""
        if not (torch.isfinite(stats.total).all() and torch.isfinite(stats.total_sq).all()):
            self.vae._check_finite(torch.tensor(float("inf")))
        return stats.mean_rstd(eps)

    # -- one convolution layer over all tiles --------------------------------------------------------------------
    def conv_layer(self, name: str, src: torch.Tensor, conv: CausalConv3d, *, norm: nn.GroupNorm | None = None,
                   stats: _Stats | None = None, pre: nn.Conv3d | None = None,
                   up: tuple[int, int] | None = None, residual: torch.Tensor | None = None,
                   shortcut: CausalConv3d | None = None, out: torch.Tensor | None = None,
                   want_stats: bool = True, overwrite_src: bool = False) -> tuple[torch.Tensor, _Stats | None]:
        """``conv(upsample(norm_silu(pre(src))))`` (+ residual), tile by tile as planned for ``name``, into ``out``.

        ``overwrite_src``: write the result over ``src`` itself (same width, no upsampling), saving a full-volume
        buffer. Temporal chunks then run from the last to the first, each computed into a chunk buffer and
        copied back once complete: a chunk only reads its own and earlier frames (causal), which are untouched
        until then.
        """
        _, c_in, t_in, h_in, w_in = src.shape
        ft, fs = up or (1, 1)
        up_shape = (t_in if ft == 1 else 1 + ft * (t_in - 1), h_in * fs, w_in * fs)
        c_out = conv.conv.out_channels
        if overwrite_src:
            if up is not None or c_out != c_in or out is not None:
                raise ValueError("overwrite_src needs a same-width convolution without upsampling")
            out = src
        elif out is None:
            out = self._store_empty((1, c_out, *up_shape))
        mean = rstd = None
        if norm is not None:
            mean, rstd = self._mean_rstd(stats, norm.eps)
        acc = _Stats(self.groups) if want_stats else None
        tiles = self._next_plan(name, conv).tiles
        if overwrite_src:
            spans = sorted({tile[0] for tile in tiles}, reverse=True)
            schedule = [(span, [tile for tile in tiles if tile[0] == span]) for span in spans]
        else:
            schedule = [(None, tiles)]
        for span, span_tiles in schedule:
            self._conv_tiles(src, conv, span_tiles, out, span, norm, mean, rstd, pre, residual, shortcut, acc,
                             up_shape, (ft, fs))
        self._step()
        return out, acc

    def _conv_tiles(self, src: torch.Tensor, conv: CausalConv3d, tiles: list[Tile], out: torch.Tensor,
                    span: tuple[int, int] | None, norm: nn.GroupNorm | None, mean: torch.Tensor | None,
                    rstd: torch.Tensor | None, pre: nn.Conv3d | None, residual: torch.Tensor | None,
                    shortcut: CausalConv3d | None, acc: _Stats | None, up_shape: tuple[int, int, int],
                    factors: tuple[int, int]) -> None:
        """The tiles of ``conv_layer``; with a temporal ``span``, into a chunk buffer copied onto ``out`` at the end."""
        t_up, h_up, w_up = up_shape
        ft, fs = factors
        k, pad = conv.kernel_size, conv.kernel_size // 2
        target, t_offset = out, 0
        if span is not None:
            target = self._store_empty((1, out.shape[1], span[1] - span[0], h_up, w_up))
            t_offset = span[0]
        for (t0, t1), (h0, h1), (w0, w1) in tiles:
            idx = []
            for lo, hi, before, size, factor, is_time in ((t0, t1, k - 1, t_up, ft, True),
                                                          (h0, h1, pad, h_up, fs, False),
                                                          (w0, w1, pad, w_up, fs, False)):
                up_index = torch.arange(lo - before, hi + (0 if is_time else pad)).clamp_(0, size - 1)
                idx.append(upsampled_frame_source(up_index, factor) if is_time else up_index.div(
                    factor, rounding_mode="floor"))
            lows = [int(i[0]) for i in idx]
            highs = [int(i[-1]) + 1 for i in idx]
            x = self._to_device(src[:, :, lows[0]:highs[0], lows[1]:highs[1], lows[2]:highs[2]])
            if pre is not None:
                x = conv3d(pre, x)
            if norm is not None:
                x = norm_silu(norm, x, True, mean, rstd)
            for dim, (index, low, high) in enumerate(zip(idx, lows, highs)):
                if len(index) != high - low or bool((index.diff() != 1).any()):
                    x = x.index_select(dim + 2, (index - low).to(self.device))
            y = conv3d(conv.conv, x)
            del x
            if residual is not None:
                skip = self._to_device(residual[:, :, t0:t1, h0:h1, w0:w1])
                if shortcut is not None:
                    skip = conv3d(shortcut.conv, skip)
                y += skip
                del skip
            if acc is not None:
                acc.add(y)
            target[:, :, t0 - t_offset:t1 - t_offset, h0:h1, w0:w1].copy_(y)
            del y
        if span is not None:
            out[:, :, span[0]:span[1]].copy_(target)

    def resnet(self, name: str, x: torch.Tensor, stats: _Stats,
               block: ResnetBlockCausal3D) -> tuple[torch.Tensor, _Stats]:
        hidden, hidden_stats = self.conv_layer(f"{name}.conv1", x, block.conv1, norm=block.norm1, stats=stats)
        if block.conv_shortcut is None:  # each output tile reads only its own skip tile: write over x
            return self.conv_layer(f"{name}.conv2", hidden, block.conv2, norm=block.norm2, stats=hidden_stats,
                                   residual=x, out=x)
        # widths differ: x must survive for the skip, so write over the hidden activation instead
        return self.conv_layer(f"{name}.conv2", hidden, block.conv2, norm=block.norm2, stats=hidden_stats,
                               residual=x, shortcut=block.conv_shortcut, overwrite_src=True)

    # -- frame-causal attention with streamed keys/values --------------------------------------------------------
    def attention(self, name: str, x: torch.Tensor, stats: _Stats,
                  attn: CausalFrameAttention) -> tuple[torch.Tensor, _Stats]:
        _, c, t, h, w = x.shape
        plan = self._next_plan(name)
        mean, rstd = self._mean_rstd(stats, attn.group_norm.eps)

        def tokens(t0: int, t1: int, r0: int, r1: int) -> torch.Tensor:
            tile = self._to_device(x[:, :, t0:t1, r0:r1])
            return norm_silu(attn.group_norm, tile, False, mean, rstd)[0].flatten(1).T  # "1 c t h w -> (t h w) c"

        # Keys and values of every token, in the store: [T, H*W, C].
        keys = self._store_empty((t, h * w, c))
        values = self._store_empty((t, h * w, c))
        for (t0, t1), (r0, r1), _ in plan.kv_tiles:
            normed = tokens(t0, t1, r0, r1)
            # "(t n) c -> t n c" (torch ops: a single GPU decodes without einops, see bench.gpu)
            keys[t0:t1, r0 * w:r1 * w].copy_(attn.to_k(normed).unflatten(0, (t1 - t0, -1)))
            values[t0:t1, r0 * w:r1 * w].copy_(attn.to_v(normed).unflatten(0, (t1 - t0, -1)))
            del normed
        acc = _Stats(self.groups)
        for (t0, t1), (r0, r1), _ in plan.tiles:
            attended = self._attend_tile(attn, tokens(t0, t1, r0, r1), keys, values, (t0, t1), (r0, r1), h, w)
            y = self._to_device(x[:, :, t0:t1, r0:r1]) + attended
            acc.add(y)
            del attended
            x[:, :, t0:t1, r0:r1].copy_(y)  # K/V were taken before: in place is safe
        self._step()
        return x, acc

    def _attend_tile(self, attn: CausalFrameAttention, normed: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, frames: tuple[int, int], rows: tuple[int, int], h: int,
                     w: int) -> torch.Tensor:
        """One query tile against the key/value chunks of frames <= its own, with an online softmax (fp32)."""
        (t0, t1), (r0, r1) = frames, rows
        c = normed.shape[-1]
        q = attn.to_q(normed).float() * c ** -0.5
        q_frame = torch.arange(t0, t1, device=self.device).repeat_interleave((r1 - r0) * w)
        key_rows = (t1 - t0) * (r1 - r0)  # a key chunk holds about as many tokens as the query tile
        run_max = torch.full((q.shape[0], 1), -math.inf, device=self.device)
        run_sum = torch.zeros((q.shape[0], 1), device=self.device)
        run_out = torch.zeros((q.shape[0], c), device=self.device)
        for kf in range(t1):
            for kr0 in range(0, h, key_rows):
                kr1 = min(h, kr0 + key_rows)
                k_chunk = self._to_device(keys[kf, kr0 * w:kr1 * w]).float()
                v_chunk = self._to_device(values[kf, kr0 * w:kr1 * w]).float()
                scores = q @ k_chunk.T
                if kf > t0:
                    scores.masked_fill_((q_frame < kf)[:, None], -math.inf)
                new_max = torch.maximum(run_max, scores.amax(-1, keepdim=True))
                correction = torch.exp(run_max - new_max)
                probs = torch.exp(scores - new_max)
                run_sum = run_sum * correction + probs.sum(-1, keepdim=True)
                run_out = run_out * correction + probs @ v_chunk
                run_max = new_max
                del scores, probs, k_chunk, v_chunk
        attended = attn.to_out[0]((run_out / run_sum).to(self.dtype))
        return attended.T.unflatten(1, (t1 - t0, r1 - r0, -1))[None]  # "(t h w) c -> 1 c t h w"

    # -- the whole decoder ---------------------------------------------------------------------------------------
    def __call__(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        dec = self.dec
        x, stats = self.conv_layer("conv_in", z, dec.conv_in, pre=self.vae.post_quant_conv)
        x, stats = self.resnet("mid_block.resnets.0", x, stats, dec.mid_block.resnets[0])
        if dec.mid_block.attentions is not None:
            x, stats = self.attention("mid_block.attentions.0", x, stats, dec.mid_block.attentions[0])
        x, stats = self.resnet("mid_block.resnets.1", x, stats, dec.mid_block.resnets[1])
        for i, block in enumerate(dec.up_blocks):
            for j, resnet in enumerate(block.resnets):
                x, stats = self.resnet(f"up_blocks.{i}.resnets.{j}", x, stats, resnet)
            if block.upsamplers is not None:
                upsampler = block.upsamplers[0]
                x, stats = self.conv_layer(f"up_blocks.{i}.upsamplers.0.conv", x, upsampler.conv,
                                           up=(upsampler.time_factor, upsampler.space_factor))
        self.conv_layer("conv_out", x, dec.conv_out, norm=dec.conv_norm_out, stats=stats, out=out, want_stats=False)
        return out


def decode_exact(vae: HunyuanVideoVAE, z: torch.Tensor, plan: DecodePlan, progress: ProgressFn | None,
                 output_device: torch.device | str | None, meter: WorkingSetMeter | None) -> torch.Tensor:
    """Decode VAE-space latents ``z`` (the model's dtype) as planned (``plan.mode == "exact"``), sample by sample."""
    store_on_device = plan.store == "device"
    store = vae.device if store_on_device else torch.device("cpu")
    host_meter = None if store_on_device else meter  # host-store buffers are not device memory
    out_device = torch.device(output_device) if output_device is not None else store
    b, _, t, h, w = z.shape
    s, tc = vae.config.spatial_compression, vae.config.temporal_compression
    with ignoring(host_meter):
        video = torch.empty((b, vae.config.out_channels, tc * (t - 1) + 1, s * h, s * w), dtype=vae.dtype,
                            device=out_device)
        z = z.to(store)
    for i in range(b):
        runner = _LockstepDecoder(vae, plan.layers, store, progress, host_meter, store_on_device)
        runner(z[i:i + 1], video[i:i + 1])
    return video
