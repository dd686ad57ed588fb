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

The model and its untiled decode live here; ``decode`` plans with ``vae_decode_plan.plan_decode`` (pure) and runs
- ``untiled``: the plain forward pass (here);
- ``exact``: lockstep tiles with whole-volume GroupNorm statistics, equal to untiled up to float rounding
  (``vae_decode_exact``);
- ``fast`` (approximate): streamed tiles with carried causal state, or the official overlapping tiles
  (``vae_decode_fast``).
Memory probing and the working-set meter are in ``vae_memory``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..latents import SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION
from .vae_decode_plan import (FAST_OVERLAP_FRACTION, FAST_TILE_PENALTY, MODES, DecodeInfo, DecodePlan, FastTiling,
                              StreamTiling, exact_store_bytes, plan_decode, untiled_bytes)
from .vae_memory import PeakTracker, available_host_memory, free_device_memory

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
        # "b c t h w -> b c t (h i) (w j)" (torch ops: a single GPU decodes without einops, see bench.gpu)
        x = x.repeat_interleave(space_factor, dim=3).repeat_interleave(space_factor, dim=4)
    if time_factor > 1 and x.shape[2] > 1:
        x = torch.cat((x[:, :, :1], x[:, :, 1:].repeat_interleave(time_factor, dim=2)), dim=2)  # "(t f)"
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
        _, _, t, h, w = x.shape
        tokens = norm_silu(self.group_norm, x, silu=False).flatten(2).transpose(1, 2)  # "b c t h w -> b (t h w) c"
        attended = frame_causal_attention(self.to_q(tokens), self.to_k(tokens), self.to_v(tokens), h * w)
        return x + self.to_out[0](attended).transpose(1, 2).unflatten(2, (t, h, w))  # "b (t h w) c -> b c t h w"


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


class NonFiniteDecodeError(FloatingPointError):
    """A decode produced inf/NaN (which ComfyUI would clamp to black frames)."""


class HunyuanVideoVAE(nn.Module):
    """HunyuanVideo causal 3D VAE. ``encode``: video in [-1, 1] -> VAE-space latents; ``decode``: the reverse."""

    # streamed fast mode defaults (vae_decode_plan); an instance may override them (bench_vae.py --quality does)
    FAST_OVERLAP_FRACTION = FAST_OVERLAP_FRACTION
    FAST_TILE_PENALTY = FAST_TILE_PENALTY

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
        return untiled_bytes(self.config, latent_shape, self.dtype.itemsize)

    def estimate_exact_host_bytes(self, latent_shape: tuple[int, ...]) -> int:
        """Estimated bytes of the activation store of an exact chunked decode of one sample."""
        return exact_store_bytes(self.config, latent_shape, self.dtype.itemsize)

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

    def plan_decode(self, latent_shape: tuple[int, ...], *, mode: str = "exact",
                    memory_budget: int | str | None = "auto",
                    tiling: FastTiling | StreamTiling | None = None) -> DecodePlan:
        """What ``decode`` would do for latents of ``latent_shape`` (``vae_decode_plan.plan_decode`` with this
        model's config, dtype, weights, budget and the available host memory). Raises as ``decode`` would."""
        if mode not in MODES:  # before probing the budget
            raise ValueError(f"mode must be 'exact', 'fast' or 'untiled', got {mode!r}")
        return plan_decode(self.config, latent_shape, self.resolve_budget(memory_budget), mode, dtype=self.dtype,
                           weight_bytes=self.weight_bytes(), host_bytes=available_host_memory(), tiling=tiling,
                           overlap_fraction=self.FAST_OVERLAP_FRACTION, tile_penalty=self.FAST_TILE_PENALTY)

    def decode(self, latents: torch.Tensor, *, mode: str = "exact", memory_budget: int | str | None = "auto",
               tiling: FastTiling | StreamTiling | None = None, output_device: torch.device | str | None = None,
               progress: ProgressFn | None = None, measure: bool = False) -> torch.Tensor:
        """VAE-space latents ``[B, C, T, H, W]`` (ComfyUI LATENT, unscaled) -> video ``[B, 3, 4(T-1)+1, 8H, 8W]``
        in [-1, 1], in the model's dtype.

        mode:
          - ``"exact"`` (default): untiled when it fits ``memory_budget``, otherwise lockstep chunking in time and
            space with the activations in a store (device or host); equal to the untiled decode up to float
            rounding. A budget it cannot meet raises ``MemoryError`` (it never decodes approximately instead);
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
        started = time.perf_counter()
        plan = self.plan_decode(latents.shape, mode=mode, memory_budget=memory_budget, tiling=tiling)
        info = DecodeInfo.of(plan)
        z = latents.to(self.dtype)
        with torch.no_grad(), PeakTracker(self.device, measure) as tracker:
            if plan.mode in ("untiled", "exact(untiled)"):
                z = z.to(self.device)
                video = torch.cat([self.decoder(conv3d(self.post_quant_conv, z[i:i + 1])) for i in range(z.shape[0])])
                if output_device is not None:
                    video = video.to(output_device)
            elif plan.mode == "exact":
                from .vae_decode_exact import decode_exact
                video = decode_exact(self, z, plan, progress, output_device, tracker.meter)
            elif isinstance(plan.tiling, FastTiling):
                from .vae_decode_fast import decode_tiled
                video = decode_tiled(self, z, plan.tiling, progress, output_device)
            else:
                from .vae_decode_fast import decode_streamed
                video = decode_streamed(self, z, plan.tiling, progress, output_device)
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
