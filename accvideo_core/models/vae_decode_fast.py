"""Fast (approximate) VAE decoding: lowest memory and time.

- Streamed tiles (``StreamTiling``, the default): each spatial tile is decoded through time a chunk of latent
  frames at a time, carrying the causal state across chunks (the last ``k - 1`` input frames of every causal conv,
  the attention keys/values of all earlier frames), so there is no temporal overlap and no recomputation. The one
  approximation: every GroupNorm uses the running statistics of the frames of that tile decoded so far. Spatial
  tiles overlap and are accumulated straight into the output with linear-ramp weights that sum to one.
- Official overlapping tiles (``FastTiling``): diffusers' / the reference ``enable_tiling`` decode, tiles in time
  and space decoded independently and cross-faded linearly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae_decode_plan import (FastTiling, StreamTiling, fast_space_starts, fast_time_starts, stream_chunks,
                              tile_starts)
from .vae_hunyuan_video import (CausalConv3d, CausalFrameAttention, ProgressFn, ResnetBlockCausal3D, conv3d,
                                first_frame_causal_upsample)

if TYPE_CHECKING:
    from .vae_hunyuan_video import HunyuanVideoVAE


# ----------------------------------------------------------------------------------------------------------------
# Streamed tiles
# ----------------------------------------------------------------------------------------------------------------
def ramp_weights(n: int, starts: list[int], tile: int, scale: int, device, dtype) -> list[torch.Tensor]:
    """Per tile, 1D weights over its ``tile * scale`` output pixels that sum to one over all tiles: linear ramps
    across each overlap with a neighbour, 1 elsewhere."""
    weights = []
    for i, a in enumerate(starts):
        size = min(tile, n - a) * scale
        w = torch.ones(size, device=device, dtype=torch.float32)
        if i > 0:  # ramp up over the overlap with the previous tile
            extent = (starts[i - 1] + tile - a) * scale
            if extent > 0:
                w[:extent] = (torch.arange(extent, device=device, dtype=torch.float32) + 0.5) / extent
        if i + 1 < len(starts):  # ramp down over the overlap with the next tile
            extent = (a + tile - starts[i + 1]) * scale
            if extent > 0:
                w[size - extent:] = w[size - extent:] * (
                    1 - (torch.arange(extent, device=device, dtype=torch.float32) + 0.5) / extent)
        weights.append(w.to(dtype))
    return weights


class CausalStream:
    """Decoder state of one spatial tile streamed through time (fast mode): the last ``k - 1`` input frames of
    every causal conv, the attention keys/values of past frames and running GroupNorm statistics."""

    def __init__(self, vae: HunyuanVideoVAE) -> None:
        self.decoder, self.post_quant_conv = vae.decoder, vae.post_quant_conv
        self.groups = vae.config.norm_num_groups
        self.conv_cache: dict[int, torch.Tensor] = {}
        self.kv_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # count, mean, sum of squared deviations
        self.first = True

    def norm(self, norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True) -> torch.Tensor:
        """GroupNorm with the statistics of every frame of this tile so far (chunk statistics in the input dtype,
        merged in fp64 with Chan's formula), applied as one per-channel scale and shift."""
        b, c = x.shape[:2]
        g = norm.num_groups
        var, mean = torch.var_mean(x.reshape(b, g, -1).float(), dim=-1, correction=0)
        n, mean, m2 = x[0, 0].numel() * (c // g), mean.double(), var.double() * (x[0, 0].numel() * (c // g))
        if id(norm) in self.stats:
            n_a, mean_a, m2_a = self.stats[id(norm)]
            delta = mean - mean_a
            n, mean, m2 = n_a + n, mean_a + delta * (n / (n_a + n)), m2_a + m2 + delta.pow(2) * (n_a * n / (n_a + n))
        self.stats[id(norm)] = (n, mean, m2)
        rstd = torch.rsqrt(m2 / n + norm.eps)
        scale = (norm.weight.double().reshape(g, c // g) * rstd[..., None]).reshape(b, c)
        shift = norm.bias.double().reshape(1, c) - (mean[..., None] * scale.reshape(b, g, c // g)).reshape(b, c)
        shape = (b, c) + (1,) * (x.dim() - 2)
        out = torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))
        return F.silu(out, inplace=True) if silu else out

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        k = conv.kernel_size
        if k == 1:
            return conv3d(conv.conv, x)
        past = self.conv_cache.get(id(conv))
        if past is None:  # the video's first frame: replicate padding, as in the untiled decode
            past = x[:, :, :1].expand(-1, -1, k - 1, -1, -1)
        x = torch.cat((past, x), dim=2)
        self.conv_cache[id(conv)] = x[:, :, -(k - 1):].clone()
        return conv3d(conv.conv, F.pad(x, (k // 2, k // 2, k // 2, k // 2, 0, 0), mode="replicate"))

    def resnet(self, block: ResnetBlockCausal3D, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv(block.conv1, self.norm(block.norm1, x))
        hidden = self.conv(block.conv2, self.norm(block.norm2, hidden))
        return hidden + (x if block.conv_shortcut is None else self.conv(block.conv_shortcut, x))

    def attention(self, attn: CausalFrameAttention, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        tokens = self.norm(attn.group_norm, x, silu=False).flatten(2).transpose(1, 2)  # "b c t h w -> b (t h w) c"
        q, k, v = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        if id(attn) in self.kv_cache:
            past_k, past_v = self.kv_cache[id(attn)]
            k, v = torch.cat((past_k, k), dim=1), torch.cat((past_v, v), dim=1)
        self.kv_cache[id(attn)] = (k, v)
        past = k.shape[1] - q.shape[1]
        out = torch.empty_like(q)
        for f in range(t):
            rows = slice(f * h * w, (f + 1) * h * w)
            prefix = past + (f + 1) * h * w
            out[:, rows] = F.scaled_dot_product_attention(q[:, None, rows], k[:, None, :prefix],
                                                          v[:, None, :prefix])[:, 0]
        return x + attn.to_out[0](out).transpose(1, 2).unflatten(2, (t, h, w))  # "b (t h w) c -> b c t h w"

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """The next latent frames of this tile -> their decoded frames (4 per latent frame, 1 for frame 0)."""
        dec = self.decoder
        x = self.conv(dec.conv_in, conv3d(self.post_quant_conv, z))
        mid = dec.mid_block
        x = self.resnet(mid.resnets[0], x)
        if mid.attentions is not None:
            x = self.attention(mid.attentions[0], x)
        x = self.resnet(mid.resnets[1], x)
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x = self.resnet(resnet, x)
            if block.upsamplers is not None:
                up = block.upsamplers[0]
                if self.first:
                    x = first_frame_causal_upsample(x, up.time_factor, up.space_factor)
                else:  # no first frame in this chunk: every frame is repeated in time
                    # "b c t h w -> b c (t f) h w" (torch ops: a single GPU decodes without einops)
                    x = first_frame_causal_upsample(x, 1, up.space_factor).repeat_interleave(up.time_factor, dim=2)
                x = self.conv(up.conv, x)
        self.first = False
        return self.conv(dec.conv_out, self.norm(dec.conv_norm_out, x))


def decode_streamed(vae: HunyuanVideoVAE, z: torch.Tensor, tiling: StreamTiling, progress: ProgressFn | None,
                    output_device: torch.device | str | None) -> torch.Tensor:
    """Streamed fast decode of ``z`` (the model's dtype) with ``tiling``."""
    s, tc = vae.config.spatial_compression, vae.config.temporal_compression
    out_device = torch.device(output_device) if output_device is not None else vae.device
    b, _, t, h, w = z.shape
    th, tw = min(h, tiling.tile_height), min(w, tiling.tile_width)
    rows, cols = tile_starts(h, th, tiling.overlap), tile_starts(w, tw, tiling.overlap)
    row_weights = ramp_weights(h, rows, th, s, vae.device, vae.dtype)
    col_weights = ramp_weights(w, cols, tw, s, vae.device, vae.dtype)
    chunks = stream_chunks(t, tiling.chunk_frames)
    total, done = b * len(rows) * len(cols) * len(chunks), 0
    video = torch.zeros((b, vae.config.out_channels, tc * (t - 1) + 1, h * s, w * s), dtype=vae.dtype,
                        device=out_device)
    for n in range(b):
        for i, r in enumerate(rows):
            for j, c in enumerate(cols):
                stream = CausalStream(vae)
                weight = row_weights[i][:, None] * col_weights[j][None, :]
                for a, e in chunks:
                    frames = stream(z[n:n + 1, :, a:e, r:r + th, c:c + tw].to(vae.device))
                    f0 = 0 if a == 0 else tc * (a - 1) + 1
                    region = video[n:n + 1, :, f0:f0 + frames.shape[2], r * s:r * s + frames.shape[3],
                                   c * s:c * s + frames.shape[4]]
                    region += (frames * weight).to(out_device)
                    done += 1
                    if progress is not None:
                        progress(done, total)
    return video


# ----------------------------------------------------------------------------------------------------------------
# Official overlapping tiles
# ----------------------------------------------------------------------------------------------------------------
def _blend(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade of the tail of ``previous`` into the head of ``current`` along ``dim``, in place."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return
    shape = [1] * current.dim()
    shape[dim] = extent
    ramp = (torch.arange(extent, device=current.device, dtype=torch.float32) / extent).reshape(shape)
    head = current.narrow(dim, 0, extent)
    tail = previous.narrow(dim, previous.shape[dim] - extent, extent)
    head.copy_(tail * (1 - ramp) + head * ramp)


def _untiled_tile(vae: HunyuanVideoVAE, z: torch.Tensor, tick: Callable[[], None]) -> torch.Tensor:
    video = vae.decoder(conv3d(vae.post_quant_conv, z))
    tick()
    return video


def _tiled_frames(vae: HunyuanVideoVAE, z: torch.Tensor, tiling: FastTiling, tick: Callable[[], None]) -> torch.Tensor:
    """All frames of ``z`` decoded in overlapping spatial tiles, cross-faded row by row."""
    s = vae.config.spatial_compression
    _, _, _, h, w = z.shape
    lat_size = tiling.tile_size // s
    blend = tiling.tile_size - tiling.tile_stride
    out = None
    previous_row: list[torch.Tensor] | None = None  # only the row above is kept, for the cross-fade
    for i in fast_space_starts(h, w, tiling, s):
        row = [_untiled_tile(vae, z[:, :, :, i:i + lat_size, j:j + lat_size], tick)
               for j in fast_space_starts(w, h, tiling, s)]
        kept = []
        for j, tile in enumerate(row):
            if previous_row is not None:
                _blend(previous_row[j], tile, blend, dim=3)
            if j > 0:
                _blend(row[j - 1], tile, blend, dim=4)
            kept.append(tile[:, :, :, :tiling.tile_stride, :tiling.tile_stride])
        strip = torch.cat(kept, dim=4)[..., :w * s]
        if out is None:
            out = strip.new_empty((*strip.shape[:3], h * s, w * s))
        top = i * s
        n = min(strip.shape[3], h * s - top)
        out[:, :, :, top:top + n].copy_(strip[:, :, :, :n])
        previous_row = row
    return out


def decode_tiled(vae: HunyuanVideoVAE, z: torch.Tensor, tiling: FastTiling, progress: ProgressFn | None,
                 output_device: torch.device | str | None) -> torch.Tensor:
    """Official overlapping-tile decode of ``z`` (the model's dtype) with ``tiling`` (pixel units)."""
    s, tc = vae.config.spatial_compression, vae.config.temporal_compression
    out_device = torch.device(output_device) if output_device is not None else vae.device
    b, _, t, h, w = z.shape
    lat_frames = tiling.tile_frames // tc
    frame_blend = tiling.tile_frames - tiling.tile_stride_frames
    starts = fast_time_starts(t, tiling, tc)
    n_space = len(fast_space_starts(h, w, tiling, s)) * len(fast_space_starts(w, h, tiling, s))
    total = len(starts) * n_space
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    frames_out = tc * (t - 1) + 1
    video = torch.empty((b, vae.config.out_channels, frames_out, h * s, w * s), dtype=vae.dtype, device=out_device)
    previous, offset = None, 0  # only the previous temporal chunk is kept, for the cross-fade
    for j, i in enumerate(starts):
        tile = z[:, :, i:i + lat_frames + 1] if len(starts) > 1 else z
        chunk = (_tiled_frames(vae, tile.to(vae.device), tiling, tick) if n_space > 1
                 else _untiled_tile(vae, tile.to(vae.device), tick))
        if i > 0:
            chunk = chunk[:, :, 1:]
        if previous is not None:
            _blend(previous, chunk, frame_blend, dim=2)
        keep = chunk[:, :, :tiling.tile_stride_frames + (1 if j == 0 else 0)] if len(starts) > 1 else chunk
        n = min(keep.shape[2], frames_out - offset)
        video[:, :, offset:offset + n].copy_(keep[:, :, :n])
        offset += n
        previous = chunk
    return video
