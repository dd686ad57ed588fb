"""HunyuanVideo causal 3D VAE ("884-16c-hy": 4x time, 8x space, 16 latent channels).

Module names follow the original HunyuanVideo / diffusers key layout (``decoder.up_blocks.0.resnets.0.norm1``,
``decoder.mid_block.attentions.0.to_q``, ...), so ``vae.state_dict()`` is an original-layout checkpoint.

Architecture facts that shape the decoding code:
- every 3D convolution is causal in time: the past is replicate-padded by ``kernel - 1`` frames, space is
  replicate-padded symmetrically;
- every GroupNorm normalises over (channels / groups, T, H, W): its statistics span the whole video;
- the mid-block attention is a single head over all tokens with a frame-causal mask (a token of frame t sees
  every token of frames <= t);
- upsampling repeats the first frame in space only and every later frame ``ft`` times in time.

Three ways to decode, all taking ComfyUI-convention latents (VAE space, unscaled, ``[B, 16, T, H, W]``):
- ``untiled``: the plain forward pass;
- ``exact``: layer-by-layer lockstep over tiles in time and space. Each layer's output lives in a "store"
  (host memory when the device budget is small); each output tile is computed on the device from its input
  region with the causal/spatial halo, GroupNorms use whole-volume statistics reduced over all tiles of the
  previous layer, and the mid-block attention streams keys/values of the past frames with an online softmax.
  The result equals the untiled decode up to float rounding;
- ``fast`` (approximate): spatial tiles streamed through time carrying causal conv caches and attention
  keys/values across temporal chunks (no temporal overlap), GroupNorms with running per-tile statistics, tiles
  cross-faded over ``FAST_OVERLAP_FRACTION`` of their size; or, given a ``FastTiling``, the official
  overlapping-tile decode with linear blending (diffusers-compatible tile settings).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .. import kernels
from ..latents import TEMPORAL_COMPRESSION, SPATIAL_COMPRESSION

NORM_EPS = 1e-6
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the causal 3D VAE. Defaults are the released HunyuanVideo VAE (246.5 M parameters)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    temporal_compression: int = TEMPORAL_COMPRESSION
    spatial_compression: int = SPATIAL_COMPRESSION
    has_encoder: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        n = len(self.block_out_channels)
        problems = []
        for name, ratio in (("temporal_compression", self.temporal_compression),
                            ("spatial_compression", self.spatial_compression)):
            if ratio < 1 or ratio & (ratio - 1) or int(math.log2(ratio)) > n - 1:
                problems.append(f"{name}={ratio} must be a power of two <= 2**(len(block_out_channels) - 1)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(f"block_out_channels {bad} are not divisible by norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            problems.append(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if problems:
            raise ValueError("invalid VAEConfig: " + "; ".join(problems))

    def up_factors(self) -> list[tuple[int, int] | None]:
        """(time factor, space factor) of each decoder up block's upsampler, ``None`` when it has none."""
        n = len(self.block_out_channels)
        n_space, n_time = int(math.log2(self.spatial_compression)), int(math.log2(self.temporal_compression))
        factors = []
        for i in range(n):
            final = i == n - 1
            space = i < n_space
            time_ = i >= n - 1 - n_time and not final
            factors.append((2 if time_ else 1, 2 if space else 1) if (space or time_) else None)
        return factors

    def down_strides(self) -> list[tuple[int, int] | None]:
        """(time stride, space stride) of each encoder down block's downsampler (the decoder's mirror)."""
        return self.up_factors()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VAEConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown VAEConfig fields {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------
def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = True, mean: torch.Tensor | None = None,
              rstd: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm (+SiLU) through the fused kernel API; ``mean``/``rstd`` are whole-volume statistics when given."""
    return kernels.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu, mean, rstd)


def first_frame_causal_upsample(x: torch.Tensor, time_factor: int, space_factor: int) -> torch.Tensor:
    """Nearest upsampling of ``[B, C, T, H, W]``: frame 0 in space only, frames 1.. also ``time_factor`` times."""
    if space_factor > 1:
        x = x.repeat_interleave(space_factor, dim=3).repeat_interleave(space_factor, dim=4)
    if time_factor > 1 and x.shape[2] > 1:
        x = torch.cat((x[:, :, :1], x[:, :, 1:].repeat_interleave(time_factor, dim=2)), dim=2)
    return x


def upsampled_frame_source(index: torch.Tensor, time_factor: int) -> torch.Tensor:
    """Source frame of each upsampled frame index (the inverse map of ``first_frame_causal_upsample``)."""
    if time_factor == 1:
        return index
    return torch.where(index == 0, index, 1 + (index - 1).div(time_factor, rounding_mode="floor"))


def conv3d(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``, with fp32 CPU inputs sent to oneDNN directly: PyTorch routes small fp32 CPU conv3d calls
    (``N * C * T * H <= 20480``, common at batch 1 in narrow VAEs) to its slow native kernel. Same result."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and conv.weight.dtype == torch.float32
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return torch.mkldnn_convolution(x.contiguous(), conv.weight, conv.bias, conv.padding, conv.stride,
                                        conv.dilation, conv.groups)
    return conv(x)


class CausalConv3d(nn.Module):
    """3D convolution, causal in time: replicate-pad ``k - 1`` past frames and ``k // 2`` pixels on each side."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride=1) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride)

    @property
    def padding(self) -> tuple[int, int, int, int, int, int]:
        k = self.kernel_size
        return (k // 2, k // 2, k // 2, k // 2, k - 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size > 1:
            x = F.pad(x, self.padding, mode="replicate")
        return conv3d(self.conv, x)


class ResnetBlockCausal3D(nn.Module):
    """GroupNorm-SiLU-CausalConv twice, plus a (1x1x1-projected when widths differ) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=NORM_EPS)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=NORM_EPS)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(norm_silu(self.norm1, x))
        hidden = self.conv2(norm_silu(self.norm2, hidden))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return hidden + skip


def frame_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """Single-head attention over ``[B, T*HW, C]`` where frame t attends to frames <= t.

    Computed one query frame at a time against the key prefix, so no ``(T*HW)^2`` mask is ever built.
    """
    frames = q.shape[1] // tokens_per_frame
    out = torch.empty_like(q)
    for t in range(frames):
        rows = slice(t * tokens_per_frame, (t + 1) * tokens_per_frame)
        prefix = (t + 1) * tokens_per_frame
        out[:, rows] = F.scaled_dot_product_attention(
            q[:, None, rows], k[:, None, :prefix], v[:, None, :prefix])[:, 0]
    return out


class CausalFrameAttention(nn.Module):
    """Mid-block self-attention: GroupNorm, one head of width C, frame-causal mask, residual."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        tokens = norm_silu(self.group_norm, x, silu=False).permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
        attended = frame_causal_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), h * w)
        attended = self.to_out[0](attended)
        return x + attended.reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class MidBlockCausal3D(nn.Module):
    """resnet -> frame-causal attention -> resnet."""

    def __init__(self, channels: int, groups: int, add_attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([CausalFrameAttention(channels, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class UpsampleCausal3D(nn.Module):
    def __init__(self, channels: int, time_factor: int, space_factor: int) -> None:
        super().__init__()
        self.time_factor, self.space_factor = time_factor, space_factor
        self.conv = CausalConv3d(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(first_frame_causal_upsample(x, self.time_factor, self.space_factor))


class DownsampleCausal3D(nn.Module):
    def __init__(self, channels: int, time_stride: int, space_stride: int) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=(time_stride, space_stride, space_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpBlockCausal3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int,
                 factor: tuple[int, int] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels,
                                                          groups) for i in range(num_resnets)])
        self.upsamplers = nn.ModuleList([UpsampleCausal3D(out_channels, *factor)]) if factor else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class DownBlockCausal3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_resnets: int, groups: int,
                 stride: tuple[int, int] | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlockCausal3D(in_channels if i == 0 else out_channels, out_channels,
                                                          groups) for i in range(num_resnets)])
        self.downsamplers = nn.ModuleList([DownsampleCausal3D(out_channels, *stride)]) if stride else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class EncoderCausal3D(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, widths[0], 3)
        strides = config.down_strides()
        self.down_blocks = nn.ModuleList([
            DownBlockCausal3D(widths[max(i - 1, 0)], widths[i], config.layers_per_block, groups, strides[i])
            for i in range(len(widths))])
        self.mid_block = MidBlockCausal3D(widths[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], 2 * config.latent_channels, 3)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(video)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class DecoderCausal3D(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = CausalConv3d(config.latent_channels, widths[0], 3)
        self.mid_block = MidBlockCausal3D(widths[0], groups, config.mid_block_add_attention)
        factors = config.up_factors()
        self.up_blocks = nn.ModuleList([
            UpBlockCausal3D(widths[max(i - 1, 0)], widths[i], config.layers_per_block + 1, groups, factors[i])
            for i in range(len(widths))])
        self.conv_norm_out = nn.GroupNorm(groups, widths[-1], eps=NORM_EPS)
        self.conv_out = CausalConv3d(widths[-1], config.out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


# ----------------------------------------------------------------------------------------------------------------
# Memory accounting
# ----------------------------------------------------------------------------------------------------------------
class WorkingSetMeter(TorchDispatchMode):
    """Measures the peak bytes of tensors *allocated* while active (the device-side working set on CPU).

    Every op output whose storage is not shared with an input counts as a new allocation until its storage is
    freed. Writes into pre-existing buffers (``copy_`` into the host store) and views add nothing. On CUDA
    prefer ``torch.cuda.max_memory_allocated``; this meter is the CPU stand-in.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0
        self.ignore = False

    @contextlib.contextmanager
    def ignoring(self) -> Iterator[None]:
        """Allocations inside this block (host-side store buffers) are not counted."""
        previous, self.ignore = self.ignore, True
        try:
            yield
        finally:
            self.ignore = previous

    def _prune(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        if self.ignore:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self._prune()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (self.device is not None and t.device != self.device):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue
            self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


class _PeakTracker:
    """Peak device bytes of a decode: CUDA allocator statistics on CUDA, ``WorkingSetMeter`` elsewhere."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.meter: WorkingSetMeter | None = None
        self.base = 0
        self.peak: int | None = None

    def __enter__(self) -> "_PeakTracker":
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.meter = WorkingSetMeter(self.device)
            self.meter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self.meter is not None:
            self.meter.__exit__(*exc)
            self.peak = self.meter.peak
        else:
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


def free_device_memory(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (available RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _available_host_memory()


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# ----------------------------------------------------------------------------------------------------------------
# Exact decoding: tiles advance layer by layer in lockstep
# ----------------------------------------------------------------------------------------------------------------
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


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


@dataclass
class DecodeInfo:
    """What a decode did: mode, chunking, budget and measured peak device working set."""

    mode: str
    budget_bytes: int | None = None
    weight_bytes: int = 0
    device_peak_bytes: int | None = None
    max_time_chunks: int = 1
    max_space_chunks: int = 1
    tiles: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class _LockstepDecoder:
    """Exact chunked decoding of one sample, layer by layer, with the activations in a store."""

    def __init__(self, vae: "HunyuanVideoVAE", budget: int, store: torch.device, info: DecodeInfo,
                 progress: ProgressFn | None, meter: WorkingSetMeter | None = None,
                 store_on_device: bool = False) -> None:
        self.vae, self.dec = vae, vae.decoder
        self.device = vae.device
        self.dtype = vae.dtype
        self.esize = torch.empty((), dtype=self.dtype).element_size()
        self.groups = vae.config.norm_num_groups
        self.budget, self.store, self.info, self.progress = budget, store, info, progress
        self.meter = meter
        self.store_on_device = store_on_device
        self.layers_done, self.layers_total = 0, self._count_layers()

    def _count_layers(self) -> int:
        n = 1 + 2 * 2 + (1 if self.dec.mid_block.attentions is not None else 0) + 1
        for block in self.dec.up_blocks:
            n += 2 * len(block.resnets) + (1 if block.upsamplers is not None else 0)
        return n

    def _step(self) -> None:
        self.layers_done += 1
        if self.progress is not None:
            self.progress(self.layers_done, self.layers_total)

    def _store_empty(self, shape: tuple[int, ...], dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """A buffer in the store (host memory): not part of the device working set."""
        ctx = self.meter.ignoring() if self.meter is not None else contextlib.nullcontext()
        with ctx:
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

    # -- tile planning -------------------------------------------------------------------------------------------
    def _plan(self, shape: tuple[int, int, int], bytes_fn: Callable[[int, int, int], int], what: str,
              min_time_parts: int = 1) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
        """Largest tiles (halving the longest side) whose estimated working set fits the budget."""
        parts = [min(min_time_parts, shape[0]), 1, 1]
        while True:
            sizes = [-(-n // p) for n, p in zip(shape, parts)]
            if bytes_fn(*sizes) <= self.budget:
                break
            splittable = [i for i in range(3) if sizes[i] > (1 if i == 0 else 4)]
            if not splittable:
                raise MemoryError(
                    f"exact VAE decode: even the smallest tile of {what} needs ~{bytes_fn(*sizes) / 2**20:.1f} MiB "
                    f"of device memory beyond the weights, over the budget of {self.budget / 2**20:.1f} MiB; "
                    "raise memory_budget or use mode='fast'")
            i = max(splittable, key=lambda d: sizes[d] * (1.0 if d else 1.5))
            parts[i] = min(shape[i], parts[i] * 2)
        tiles = [(t, h, w) for t in _split(shape[0], parts[0]) for h in _split(shape[1], parts[1])
                 for w in _split(shape[2], parts[2])]
        self.info.max_time_chunks = max(self.info.max_time_chunks, len(_split(shape[0], parts[0])))
        self.info.max_space_chunks = max(self.info.max_space_chunks,
                                         len(_split(shape[1], parts[1])) * len(_split(shape[2], parts[2])))
        self.info.tiles += len(tiles)
        return tiles

    # -- one convolution layer over all tiles --------------------------------------------------------------------
    def conv_layer(self, src: torch.Tensor, conv: CausalConv3d, *, norm: nn.GroupNorm | None = None,
                   stats: _Stats | None = None, pre: nn.Conv3d | None = None,
                   up: tuple[int, int] | None = None, residual: torch.Tensor | None = None,
                   shortcut: CausalConv3d | None = None, out: torch.Tensor | None = None,
                   out_device: torch.device | None = None, out_dtype: torch.dtype | None = None,
                   want_stats: bool = True, overwrite_src: bool = False) -> tuple[torch.Tensor, _Stats | None]:
        """``conv(upsample(norm_silu(pre(src))))`` (+ residual), tile by tile, into ``out``.

        ``overwrite_src``: write the result over ``src`` itself (same width, no upsampling), saving a full-volume
        buffer. Temporal chunks then run from the last to the first, each computed into a chunk buffer and
        copied back once complete: a chunk only reads its own and earlier frames (causal), which are untouched
        until then.
        """
        _, c_in, t_in, h_in, w_in = src.shape
        ft, fs = up or (1, 1)
        t_up = t_in if ft == 1 else 1 + ft * (t_in - 1)
        h_up, w_up = h_in * fs, w_in * fs
        c_out, k = conv.conv.out_channels, conv.kernel_size
        c_mid = pre.out_channels if pre is not None else c_in
        pad = k // 2
        if overwrite_src:
            if up is not None or c_out != c_in or out is not None:
                raise ValueError("overwrite_src needs a same-width convolution without upsampling")
            out = src
        elif out is None:
            out = self._store_empty((1, c_out, t_up, h_up, w_up), out_dtype, out_device)
        mean = rstd = None
        if norm is not None:
            mean, rstd = self._mean_rstd(stats, norm.eps)
        es = self.esize

        def tile_bytes(tt: int, th: int, tw: int) -> int:
            halo = (tt + k - 1) * (th + 2 * pad) * (tw + 2 * pad)
            region = c_in * ((tt + k - 1) // ft + 2) * ((th + 2 * pad) // fs + 2) * ((tw + 2 * pad) // fs + 2)
            moved = region + (c_mid * region // c_in if pre is not None else 0)
            normed = region * c_mid // c_in if norm is not None else 0
            expanded = c_mid * halo
            y = c_out * tt * th * tw
            res = (c_in + c_out) * tt * th * tw if residual is not None else 0
            stats_tmp = 2 * 8 * c_out * min(tt, 4) * th * tw
            return int(1.1 * es * (moved + normed + expanded + 2 * y + res) + stats_tmp)

        acc = _Stats(self.groups) if want_stats else None
        tiles = self._plan((t_up, h_up, w_up), tile_bytes, f"{c_out}-channel conv", 4 if overwrite_src else 1)
        if overwrite_src:
            spans = sorted({tile[0] for tile in tiles}, reverse=True)
            schedule = [(span, [tile for tile in tiles if tile[0] == span]) for span in spans]
        else:
            schedule = [(None, tiles)]
        for span, span_tiles in schedule:
            self._conv_tiles(src, conv, span_tiles, out, span, norm, mean, rstd, pre, residual, shortcut, acc,
                             (t_up, h_up, w_up), (ft, fs))
        self._step()
        return out, acc

    def _conv_tiles(self, src: torch.Tensor, conv: CausalConv3d, tiles: list, out: torch.Tensor,
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

    def resnet(self, x: torch.Tensor, stats: _Stats, block: ResnetBlockCausal3D) -> tuple[torch.Tensor, _Stats]:
        hidden, hidden_stats = self.conv_layer(x, block.conv1, norm=block.norm1, stats=stats)
        if block.conv_shortcut is None:  # each output tile reads only its own skip tile: write over x
            return self.conv_layer(hidden, block.conv2, norm=block.norm2, stats=hidden_stats, residual=x, out=x)
        # widths differ: x must survive for the skip, so write over the hidden activation instead
        return self.conv_layer(hidden, block.conv2, norm=block.norm2, stats=hidden_stats, residual=x,
                               shortcut=block.conv_shortcut, overwrite_src=True)

    # -- frame-causal attention with streamed keys/values --------------------------------------------------------
    def attention(self, x: torch.Tensor, stats: _Stats, attn: CausalFrameAttention) -> tuple[torch.Tensor, _Stats]:
        _, c, t, h, w = x.shape
        hw = h * w
        es = self.esize
        mean, rstd = self._mean_rstd(stats, attn.group_norm.eps)

        def tokens(t0: int, t1: int, r0: int, r1: int) -> torch.Tensor:
            tile = self._to_device(x[:, :, t0:t1, r0:r1])
            normed = norm_silu(attn.group_norm, tile, False, mean, rstd)
            return normed[0].permute(1, 2, 3, 0).reshape(-1, c)

        # Keys and values of every token, in the store: [T, H*W, C].
        kv_bytes = lambda tt, th, _w: int(1.2 * es * c * tt * th * w * 5)  # noqa: E731
        keys = self._store_empty((t, hw, c))
        values = self._store_empty((t, hw, c))
        for (t0, t1), (r0, r1), _ in self._plan((t, h, 1), kv_bytes, "attention keys/values"):
            normed = tokens(t0, t1, r0, r1)
            keys[t0:t1, r0 * w:r1 * w].copy_(attn.to_k(normed).reshape(t1 - t0, -1, c))
            values[t0:t1, r0 * w:r1 * w].copy_(attn.to_v(normed).reshape(t1 - t0, -1, c))
            del normed

        # Query tiles x key chunks, with an online softmax; scores in fp32.
        def attn_bytes(tq: int, rq: int, _w: int) -> int:
            nq = tq * rq * w
            return int(1.2 * (es * c * nq * 5 + 4 * c * nq * 2 + 4 * nq * nq * 3))
        query_tiles = self._plan((t, h, 1), attn_bytes, "attention queries")
        acc = _Stats(self.groups)
        scale = c ** -0.5
        for (t0, t1), (r0, r1), _ in query_tiles:
            nq_frames, nq_rows = t1 - t0, r1 - r0
            q = attn.to_q(tokens(t0, t1, r0, r1)).float() * scale
            q_frame = torch.arange(t0, t1, device=self.device).repeat_interleave(nq_rows * w)
            key_rows = nq_frames * nq_rows  # a key chunk holds about as many tokens as the query tile
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
            attended = attended.reshape(nq_frames, nq_rows, w, c).permute(3, 0, 1, 2)[None]
            y = self._to_device(x[:, :, t0:t1, r0:r1]) + attended
            acc.add(y)
            del attended, q
            x[:, :, t0:t1, r0:r1].copy_(y)  # K/V were taken before: in place is safe
        self._step()
        return x, acc

    # -- the whole decoder ---------------------------------------------------------------------------------------
    def __call__(self, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        dec = self.dec
        x, stats = self.conv_layer(z, dec.conv_in, pre=self.vae.post_quant_conv)
        x, stats = self.resnet(x, stats, dec.mid_block.resnets[0])
        if dec.mid_block.attentions is not None:
            x, stats = self.attention(x, stats, dec.mid_block.attentions[0])
        x, stats = self.resnet(x, stats, dec.mid_block.resnets[1])
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x, stats = self.resnet(x, stats, resnet)
            if block.upsamplers is not None:
                upsampler = block.upsamplers[0]
                x, stats = self.conv_layer(x, upsampler.conv, up=(upsampler.time_factor, upsampler.space_factor))
        self.conv_layer(x, dec.conv_out, norm=dec.conv_norm_out, stats=stats, out=out, want_stats=False)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Fast decoding: overlapping tiles blended linearly (the official / diffusers scheme)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FastTiling:
    """Tile settings in *pixel* units, as in diffusers' ``enable_tiling``; defaults are the official 0.25 overlap
    of 256-pixel, 64-frame tiles."""

    tile_size: int = 256
    tile_stride: int = 192
    tile_frames: int = 64
    tile_stride_frames: int = 48

    def __post_init__(self) -> None:
        if not (0 < self.tile_stride <= self.tile_size and 0 < self.tile_stride_frames <= self.tile_frames):
            raise ValueError(f"FastTiling needs 0 < stride <= size in space and time, got {self}")
        if self.tile_size % SPATIAL_COMPRESSION or self.tile_stride % SPATIAL_COMPRESSION or \
                self.tile_frames % TEMPORAL_COMPRESSION or self.tile_stride_frames % TEMPORAL_COMPRESSION:
            raise ValueError(f"FastTiling sizes must be multiples of {SPATIAL_COMPRESSION} pixels and "
                             f"{TEMPORAL_COMPRESSION} frames, got {self}")


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


@dataclass(frozen=True)
class StreamTiling:
    """Fast-mode default: spatial tiles in *latent* pixels streamed through time ``chunk_frames`` latent frames at
    a time. Causal conv caches and attention keys/values are carried across temporal chunks (no temporal overlap,
    no recomputation in time); GroupNorms use running statistics of the frames decoded so far in the tile.
    Spatial tiles overlap by ``overlap`` latent pixels and are cross-faded with weights that sum to one."""

    tile_height: int
    tile_width: int
    chunk_frames: int
    overlap: int = 0

    def __post_init__(self) -> None:
        if min(self.tile_height, self.tile_width, self.chunk_frames) < 1 or self.overlap < 0 or \
                2 * self.overlap > min(self.tile_height, self.tile_width):
            raise ValueError(f"StreamTiling needs positive tile sizes and chunk_frames and 0 <= 2 * overlap <= tile "
                             f"size; got {self}")


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` covering ``n`` with neighbours overlapping by exactly ``overlap``
    (the last tile is shifted back to end at ``n``, so its overlap with the previous one can be larger)."""
    if tile >= n:
        return [0]
    starts = list(range(0, n - tile, tile - overlap)) + [n - tile]
    return starts


def _ramp_weights(n: int, starts: list[int], tile: int, scale: int, device, dtype) -> list[torch.Tensor]:
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


class _CausalStream:
    """Decoder state of one spatial tile streamed through time (fast mode): the last ``k - 1`` input frames of
    every causal conv, the attention keys/values of past frames and running GroupNorm statistics."""

    def __init__(self, vae: "HunyuanVideoVAE") -> None:
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
        b, c, t, h, w = x.shape
        tokens = self.norm(attn.group_norm, x, silu=False).permute(0, 2, 3, 4, 1).reshape(b, t * h * w, c)
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
        return x + attn.to_out[0](out).reshape(b, t, h, w, c).permute(0, 4, 1, 2, 3)

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
                    x = first_frame_causal_upsample(x, 1, up.space_factor).repeat_interleave(up.time_factor, dim=2)
                x = self.conv(up.conv, x)
        self.first = False
        return self.conv(dec.conv_out, self.norm(dec.conv_norm_out, x))


# ----------------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------------
class NonFiniteDecodeError(FloatingPointError):
    """A decode produced inf/NaN (which ComfyUI would clamp to black frames)."""


class HunyuanVideoVAE(nn.Module):
    """HunyuanVideo causal 3D VAE. ``encode``: video in [-1, 1] -> VAE-space latents; ``decode``: the reverse."""

    FAST_OVERLAP_FRACTION = 0.125  # streamed fast mode: spatial tile overlap (latent pixels / tile size)
    FAST_TILE_PENALTY = 0.5  # streamed fast mode: planner cost per extra spatial tile (relative)

    def __init__(self, config: VAEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = EncoderCausal3D(config) if config.has_encoder else None
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1) \
            if config.has_encoder else None
        self.decoder = DecoderCausal3D(config)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.last_decode_info: DecodeInfo | None = None

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    # -- encoding ------------------------------------------------------------------------------------------------
    def encode(self, video: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, 4k+1, 8h, 8w]`` video in [-1, 1] -> VAE-space latents ``[B, C, k+1, h, w]`` (the posterior
        mean, or a sample of the posterior with ``sample=True``)."""
        if self.encoder is None:
            raise RuntimeError("this VAE was loaded without encoder weights (decoder-only checkpoint); "
                               "load a full VAE checkpoint to encode")
        if video.dim() != 5 or video.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects video [B, {self.config.in_channels}, frames, height, width], "
                             f"got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        s, tc = self.config.spatial_compression, self.config.temporal_compression
        if (t - 1) % tc or h % s or w % s:
            raise ValueError(f"encode needs {tc}k+1 frames and height/width multiples of {s}; got {t}x{h}x{w}")
        moments = conv3d(self.quant_conv, self.encoder(video.to(self.device, self.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        if not sample:
            return mean
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise

    # -- decoding ------------------------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        """Bytes of the decoder-side weights (what a decode keeps on the device)."""
        params = list(self.decoder.parameters()) + list(self.post_quant_conv.parameters())
        return sum(p.numel() * p.element_size() for p in params)

    def estimate_untiled_bytes(self, latent_shape: tuple[int, ...]) -> int:
        """Estimated peak device bytes of an untiled decode of one sample (activations only)."""
        _, _, t, h, w = latent_shape
        es = torch.empty((), dtype=self.dtype).element_size()
        widths = list(reversed(self.config.block_out_channels))
        factors = self.config.up_factors()
        peak = 0
        for i in range(len(widths) + 1):  # stage i: up block i's resnets at the resolution after block i-1
            if i > 0 and factors[i - 1] is not None:
                ft, fs = factors[i - 1]
                t, h, w = (t if ft == 1 else 1 + ft * (t - 1)), h * fs, w * fs
            c = max(widths[max(i - 1, 0)], widths[min(i, len(widths) - 1)])
            # a resnet holds its input, the normalised copy and the padded copy while its conv output grows
            # (measured on CPU: ~3 such tensors at the widest stage; 4 leaves room for allocator workspaces)
            peak = max(peak, 4 * c * (t + 2) * (h + 2) * (w + 2) * es)
        if self.config.mid_block_add_attention:
            _, _, t0, h0, w0 = latent_shape
            peak = max(peak, 8 * h0 * w0 * t0 * h0 * w0 + 6 * widths[0] * t0 * h0 * w0 * es)
        return int(peak)

    def estimate_exact_host_bytes(self, latent_shape: tuple[int, ...]) -> int:
        """Estimated host bytes of the activation store of an exact chunked decode of one sample."""
        _, _, t, h, w = latent_shape
        es = torch.empty((), dtype=self.dtype).element_size()
        widths = list(reversed(self.config.block_out_channels))
        factors = self.config.up_factors()
        peak = 0
        for i in range(len(widths) + 1):
            if i > 0 and factors[i - 1] is not None:
                ft, fs = factors[i - 1]
                t, h, w = (t if ft == 1 else 1 + ft * (t - 1)), h * fs, w * fs
            c_in, c_out = widths[max(i - 1, 0)], widths[min(i, len(widths) - 1)]
            # a resnet's input and hidden activation, plus one temporal chunk (<= 1/4) when they differ in width
            peak = max(peak, (c_in + c_out * (1.25 if c_in != c_out else 1)) * t * h * w * es)
        return int(peak + self.config.out_channels * t * h * w * es)

    def resolve_budget(self, memory_budget: int | str | None) -> int:
        """``"auto"`` -> 90 % of the free device memory (a quarter of the available RAM on the CPU)."""
        if memory_budget is None or memory_budget == "auto":
            free = free_device_memory(self.device)
            return int(0.9 * free) if self.device.type == "cuda" else free // 4
        if isinstance(memory_budget, str):
            raise ValueError(f"memory_budget must be a byte count or 'auto', got {memory_budget!r}")
        if memory_budget <= 0:
            raise ValueError(f"memory_budget must be positive, got {memory_budget}")
        return int(memory_budget)

    def decode(self, latents: torch.Tensor, *, mode: str = "exact", memory_budget: int | str | None = "auto",
               tiling: FastTiling | StreamTiling | None = None, output_device: torch.device | str | None = None,
               progress: ProgressFn | None = None, measure: bool = False) -> torch.Tensor:
        """VAE-space latents ``[B, C, T, H, W]`` (ComfyUI LATENT, unscaled) -> video ``[B, 3, 4(T-1)+1, 8H, 8W]``
        in [-1, 1], in the model's dtype.

        mode:
          - ``"exact"`` (default): untiled when it fits ``memory_budget``, otherwise lockstep chunking in time and
            space with the activations on the host; equal to the untiled decode up to float rounding.
          - ``"fast"``: approximate, lowest memory and time. By default (``tiling=None`` or a ``StreamTiling``)
            spatial tiles streamed through time with carried causal state (no temporal recomputation), GroupNorm
            statistics running per tile, tiles cross-faded over a small overlap; chosen to fit the budget. With a
            ``FastTiling``: the official / diffusers overlapping-tile decode with those tile settings.
          - ``"untiled"``: the plain forward pass.
        memory_budget: device bytes for the decode (weights included), or ``"auto"``.
        progress: ``progress(done, total)`` after each layer (exact) or tile (fast); raising from it aborts.
        measure: record the peak device working set in ``self.last_decode_info``.

        The output has the model's dtype and lives on ``output_device`` (default: the model's device; the host
        for exact decodes that spill). Non-finite output raises ``NonFiniteDecodeError``.
        """
        self._check_latents(latents)
        if mode not in ("exact", "fast", "untiled"):
            raise ValueError(f"mode must be 'exact', 'fast' or 'untiled', got {mode!r}")
        started = time.perf_counter()
        budget = self.resolve_budget(memory_budget)
        info = DecodeInfo(mode=mode, budget_bytes=budget, weight_bytes=self.weight_bytes())
        activation_budget = budget - info.weight_bytes
        if activation_budget <= 0 and mode != "untiled":
            raise MemoryError(f"VAE decode budget {budget / 2**20:.1f} MiB does not even hold the decoder weights "
                              f"({info.weight_bytes / 2**20:.1f} MiB); raise memory_budget")
        fits = self.estimate_untiled_bytes(latents.shape) <= activation_budget
        z = latents.to(self.dtype)
        with torch.no_grad(), _PeakTracker(self.device, measure) as tracker:
            if mode == "untiled" or (mode == "exact" and fits):
                info.mode = "untiled" if mode == "untiled" else "exact(untiled)"
                z = z.to(self.device)
                video = torch.cat([self.decoder(conv3d(self.post_quant_conv, z[i:i + 1])) for i in range(z.shape[0])])
                if output_device is not None:
                    video = video.to(output_device)
            elif mode == "exact" and (store_bytes := self.estimate_exact_host_bytes(latents.shape)) * 1.15 \
                    <= activation_budget:
                # the activation store itself fits the device: no host round trips, tiles get the rest
                info.notes.append("store=device")
                video = self._decode_exact(z, activation_budget - store_bytes, info, progress, output_device,
                                           tracker.meter, store_on_device=True)
            elif mode == "exact" and store_bytes > 0.9 * _available_host_memory():
                message = (f"exact VAE decode needs ~{self.estimate_exact_host_bytes(latents.shape) / 2**30:.1f} GiB "
                           "of host memory for its activation store, more than is available: falling back to "
                           "mode='fast' (blended tiles)")
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                info.mode = "fast(fallback)"
                info.notes.append(message)
                video = self._decode_fast(z, tiling, activation_budget, info, progress, output_device)
            elif mode == "exact":
                info.notes.append("store=host")
                video = self._decode_exact(z, activation_budget, info, progress, output_device, tracker.meter,
                                           store_on_device=False)
            else:
                video = self._decode_fast(z, tiling, activation_budget, info, progress, output_device)
        info.device_peak_bytes = None if tracker.peak is None else tracker.peak + info.weight_bytes
        info.seconds = time.perf_counter() - started
        self.last_decode_info = info
        self._check_finite(video)
        return video

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.config.latent_channels
        if latents.dim() != 5 or latents.shape[1] != c:
            hint = " (a 4D tensor is an image latent; video latents are [B, C, T, H, W])" if latents.dim() == 4 else ""
            raise ValueError(f"decode expects latents [B, {c}, T, H, W] in VAE space (ComfyUI LATENT, unscaled), "
                             f"got {tuple(latents.shape)}{hint}")
        if not torch.isfinite(latents).all():
            raise NonFiniteDecodeError("latents passed to the VAE contain NaN/inf: the sampler diverged or the "
                                       "latents were scaled wrongly; nothing to decode")

    def _check_finite(self, video: torch.Tensor) -> None:
        """Raise ``NonFiniteDecodeError`` (naming the dtype and the fix) when ``video`` holds inf/NaN."""
        if torch.isfinite(video).all():
            return
        dtype = self.dtype
        hint = ("fp16 overflows in this VAE; decode in bfloat16 or float32 "
                "(load_vae(..., dtype=torch.bfloat16) or torch.float32)") if dtype == torch.float16 else \
            "decode in float32 (load_vae(..., dtype=torch.float32)) or bfloat16"
        raise NonFiniteDecodeError(f"VAE decode in {dtype} produced non-finite values (inf/NaN), which would show "
                                   f"as black frames; {hint}")

    def _decode_exact(self, z: torch.Tensor, budget: int, info: DecodeInfo, progress: ProgressFn | None,
                      output_device, meter: WorkingSetMeter | None, store_on_device: bool) -> torch.Tensor:
        store = self.device if store_on_device else torch.device("cpu")
        host_meter = None if store_on_device else meter  # host-store buffers are not device memory
        out_device = torch.device(output_device) if output_device is not None else store
        b, _, t, h, w = z.shape
        s, tc = self.config.spatial_compression, self.config.temporal_compression
        ctx = host_meter.ignoring() if host_meter is not None else contextlib.nullcontext()
        with ctx:
            video = torch.empty((b, self.config.out_channels, tc * (t - 1) + 1, s * h, s * w), dtype=self.dtype,
                                device=out_device)
            z = z.to(store)
        for i in range(b):
            runner = _LockstepDecoder(self, budget, store, info, progress, host_meter, store_on_device)
            runner(z[i:i + 1], video[i:i + 1])
        return video

    def estimate_stream_bytes(self, latent_shape: tuple[int, ...], tiling: StreamTiling) -> int:
        """Estimated peak device bytes (activations and output, no weights) of a streamed fast decode."""
        _, c, t, h, w = latent_shape
        th, tw, m = min(h, tiling.tile_height), min(w, tiling.tile_width), min(t, tiling.chunk_frames)
        es = torch.empty((), dtype=self.dtype).element_size()
        working = self.estimate_untiled_bytes((1, c, m + 1, th, tw))
        widths = list(reversed(self.config.block_out_channels))
        n_res = self.config.layers_per_block + 1
        caches = c + 4 * widths[0]  # conv_in, mid-block resnets: (k - 1) = 2 frames of each conv's input
        area = th * tw
        cache_elems = caches * area
        for i, factor in enumerate(self.config.up_factors()):
            c_in = widths[max(i - 1, 0)]
            cache_elems += (c_in + (2 * n_res - 1) * widths[i]) * area
            if factor is not None:
                area *= factor[1] ** 2
                cache_elems += widths[i] * area
        cache_elems += widths[-1] * area  # conv_out
        kv = 2 * t * th * tw * widths[0] * es if self.config.mid_block_add_attention else 0
        s, tc = self.config.spatial_compression, self.config.temporal_compression
        video = self.config.out_channels * (tc * (t - 1) + 1) * h * s * w * s * es
        return int(working + 2 * cache_elems * es + 2 * kv + video)

    def _stream_tiling_for_budget(self, latent_shape: tuple[int, ...], budget: int) -> StreamTiling:
        """The streamed tiling of least predicted cost (decoded latent voxels, spatial overlaps included, plus a
        small per-chunk and per-tile overhead) whose estimated working set fits ``budget``."""
        _, _, t, h, w = latent_shape
        best: tuple[float, StreamTiling] | None = None

        def layouts(n: int) -> Iterator[tuple[int, int]]:
            for k in range(1, n + 1):
                size = -(-n // k)
                overlap = 0 if k == 1 else max(1, math.ceil(self.FAST_OVERLAP_FRACTION * size))
                size = -(-(n + (k - 1) * overlap) // k)
                if 2 * overlap <= size:
                    yield size, overlap
        for th, oh in layouts(h):
            for tw, ow in layouts(w):
                overlap = max(oh, ow)
                if 2 * overlap > min(th, tw):
                    continue
                n_h, n_w = len(tile_starts(h, th, overlap)), len(tile_starts(w, tw, overlap))
                for m in range(t, 0, -1):
                    tiling = StreamTiling(th, tw, m, overlap)
                    if self.estimate_stream_bytes(latent_shape, tiling) > budget:
                        continue
                    chunks = -(-(t - 1) // m) + 1 if m < t else 1
                    # spatial splits cost quality (per-tile statistics), temporal chunks almost none: weigh tiles
                    tiles = n_h * n_w
                    cost = n_h * th * n_w * tw * (t + 0.25 * chunks) * (1 + self.FAST_TILE_PENALTY * (tiles - 1))
                    if best is None or cost < best[0]:
                        best = (cost, tiling)
                    break  # smaller chunks of the same tiles only cost more
        if best is None:
            raise MemoryError(f"fast VAE decode: even 1-latent-frame chunks of the smallest tiles need more than the "
                              f"budget of {budget / 2**20:.1f} MiB beyond the weights; raise memory_budget or use "
                              "mode='exact'")
        return best[1]

    def stream_overhead(self, latent_shape: tuple[int, ...], tiling: StreamTiling) -> float:
        """Latent voxels a streamed fast decode pushes through the decoder per latent voxel (1.0 = none)."""
        _, _, t, h, w = latent_shape
        th, tw = min(h, tiling.tile_height), min(w, tiling.tile_width)
        n_h, n_w = len(tile_starts(h, th, tiling.overlap)), len(tile_starts(w, tw, tiling.overlap))
        return n_h * th * n_w * tw / (h * w)

    def _decode_streamed(self, z: torch.Tensor, tiling: StreamTiling | None, budget: int, info: DecodeInfo,
                         progress: ProgressFn | None, output_device) -> torch.Tensor:
        tiling = tiling or self._stream_tiling_for_budget(z.shape, budget)
        info.notes.append(f"tiling={tiling}")
        info.notes.append(f"recompute_overhead={self.stream_overhead(z.shape, tiling):.2f}")
        s, tc = self.config.spatial_compression, self.config.temporal_compression
        out_device = torch.device(output_device) if output_device is not None else self.device
        b, _, t, h, w = z.shape
        th, tw, m = min(h, tiling.tile_height), min(w, tiling.tile_width), min(t, tiling.chunk_frames)
        rows, cols = tile_starts(h, th, tiling.overlap), tile_starts(w, tw, tiling.overlap)
        row_weights = _ramp_weights(h, rows, th, s, self.device, self.dtype)
        col_weights = _ramp_weights(w, cols, tw, s, self.device, self.dtype)
        chunks = [(0, m)] + [(a, min(a + m, t)) for a in range(m, t, m)] if t > m else [(0, t)]
        total, done = b * len(rows) * len(cols) * len(chunks), 0
        info.max_time_chunks, info.max_space_chunks, info.tiles = len(chunks), len(rows) * len(cols), total
        video = torch.zeros((b, self.config.out_channels, tc * (t - 1) + 1, h * s, w * s), dtype=self.dtype,
                            device=out_device)
        for n in range(b):
            for i, r in enumerate(rows):
                for j, c in enumerate(cols):
                    stream = _CausalStream(self)
                    weight = row_weights[i][:, None] * col_weights[j][None, :]
                    for a, e in chunks:
                        frames = stream(z[n:n + 1, :, a:e, r:r + th, c:c + tw].to(self.device))
                        f0 = 0 if a == 0 else tc * (a - 1) + 1
                        region = video[n:n + 1, :, f0:f0 + frames.shape[2], r * s:r * s + frames.shape[3],
                                       c * s:c * s + frames.shape[4]]
                        region += (frames * weight).to(out_device)
                        done += 1
                        if progress is not None:
                            progress(done, total)
        return video

    def fast_overhead(self, latent_shape: tuple[int, ...], tiling: FastTiling) -> float:
        """Latent voxels a fast decode pushes through the decoder per latent voxel (1.0 = no recomputation)."""
        _, _, t, h, w = latent_shape
        s, tc = self.config.spatial_compression, self.config.temporal_compression
        lat_frames, lat_stride_frames = tiling.tile_frames // tc, tiling.tile_stride_frames // tc
        lat_size, lat_stride = tiling.tile_size // s, tiling.tile_stride // s
        spatial = h > lat_size or w > lat_size
        frames = (sum(min(t, i + lat_frames + 1) - i for i in range(0, t, lat_stride_frames))
                  if t > lat_frames else t)

        def covered(n: int) -> int:
            return sum(min(n, i + lat_size) - i for i in range(0, n, lat_stride)) if spatial else n
        return frames * covered(h) * covered(w) / (t * h * w)

    def _decode_fast(self, z: torch.Tensor, tiling: FastTiling | StreamTiling | None, budget: int,
                     info: DecodeInfo, progress: ProgressFn | None, output_device) -> torch.Tensor:
        if not isinstance(tiling, FastTiling):
            return self._decode_streamed(z, tiling, budget, info, progress, output_device)
        info.notes.append(f"tiling={tiling}")
        info.notes.append(f"recompute_overhead={self.fast_overhead(z.shape, tiling):.2f}")
        s, tc = self.config.spatial_compression, self.config.temporal_compression
        out_device = torch.device(output_device) if output_device is not None else self.device
        b, _, t, h, w = z.shape
        lat_frames, lat_stride_frames = tiling.tile_frames // tc, tiling.tile_stride_frames // tc
        frame_blend = tiling.tile_frames - tiling.tile_stride_frames
        starts = list(range(0, t, lat_stride_frames)) if t > lat_frames else [0]
        spatial = h > tiling.tile_size // s or w > tiling.tile_size // s
        n_space = (len(range(0, h, tiling.tile_stride // s)) * len(range(0, w, tiling.tile_stride // s))
                   if spatial else 1)
        total, done = len(starts) * n_space, [0]
        info.max_time_chunks, info.max_space_chunks, info.tiles = len(starts), n_space, total

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], total)

        frames_out = tc * (t - 1) + 1
        video = torch.empty((b, self.config.out_channels, frames_out, h * s, w * s), dtype=self.dtype,
                            device=out_device)
        previous, offset = None, 0  # only the previous temporal chunk is kept, for the cross-fade
        for j, i in enumerate(starts):
            tile = z[:, :, i:i + lat_frames + 1] if len(starts) > 1 else z
            chunk = (self._fast_spatial(tile.to(self.device), tiling, tick) if spatial
                     else self._untiled_tile(tile.to(self.device), tick))
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

    def _untiled_tile(self, z: torch.Tensor, tick: Callable[[], None]) -> torch.Tensor:
        video = self.decoder(conv3d(self.post_quant_conv, z))
        tick()
        return video

    def _fast_spatial(self, z: torch.Tensor, tiling: FastTiling, tick: Callable[[], None]) -> torch.Tensor:
        s = self.config.spatial_compression
        _, _, _, h, w = z.shape
        lat_size, lat_stride = tiling.tile_size // s, tiling.tile_stride // s
        blend = tiling.tile_size - tiling.tile_stride
        out = None
        previous_row: list[torch.Tensor] | None = None  # only the row above is kept, for the cross-fade
        for i in range(0, h, lat_stride):
            row = [self._untiled_tile(z[:, :, :, i:i + lat_size, j:j + lat_size], tick)
                   for j in range(0, w, lat_stride)]
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
