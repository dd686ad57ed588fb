"""Planning a VAE decode: ``plan_decode(config, latent_shape, budget, mode, ...)`` -> ``DecodePlan``.

Pure: no tensors are created and nothing is allocated; the plan says which decoder runs and how it is cut up,
from the config, the latent shape, the dtype's element size and the memory budget. An impossible budget raises
``MemoryError`` here, before any decoding. ``exact`` never becomes ``fast``: a budget that exact decoding cannot
meet is an error that names the fix.

Working-set estimates (device bytes of activations, weights excluded) follow the decoder's structure:
- untiled: a resnet holds its input, the normalised and the padded copy while its conv output grows;
- exact (lockstep): per layer, the largest tiles (halving the longest side) whose working set fits; the
  activation store holds ~(C_in + 1.25 C_out) x the largest activation;
- fast (streamed): a chunk's untiled working set, the causal conv caches, 2x the attention keys/values and the
  output video.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from ..latents import SPATIAL_COMPRESSION, TEMPORAL_COMPRESSION

if TYPE_CHECKING:
    from .vae_hunyuan_video import VAEConfig

MODES = ("exact", "fast", "untiled")
FAST_OVERLAP_FRACTION = 0.125  # streamed fast mode: spatial tile overlap (latent pixels / tile size)
FAST_TILE_PENALTY = 0.5  # streamed fast mode: planner cost per extra spatial tile (relative)
DECODER_KERNEL = 3  # every decoder convolution is a 3x3x3 causal conv (checked against the model when decoding)
STORE_DEVICE_MARGIN = 1.15  # exact: the store goes on the device when it fits the budget with 15 % to spare
STORE_HOST_FRACTION = 0.9  # exact: a host store may use up to 90 % of the available RAM

Tile = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (t0, t1), (h0, h1), (w0, w1)


# ----------------------------------------------------------------------------------------------------------------
# Tilings of fast mode
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
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def stream_chunks(frames: int, chunk_frames: int) -> list[tuple[int, int]]:
    """Latent-frame ranges of a streamed decode: the first frame alone, then ``chunk_frames`` at a time."""
    m = min(frames, chunk_frames)
    return [(0, m)] + [(a, min(a + m, frames)) for a in range(m, frames, m)] if frames > m else [(0, frames)]


def fast_time_starts(frames: int, tiling: FastTiling, temporal_compression: int) -> list[int]:
    """First latent frame of each temporal tile of the official fast decode."""
    lat_frames = tiling.tile_frames // temporal_compression
    return list(range(0, frames, tiling.tile_stride_frames // temporal_compression)) if frames > lat_frames else [0]


def fast_space_starts(n: int, other: int, tiling: FastTiling, spatial_compression: int) -> list[int]:
    """First latent row (or column) of each spatial tile of the official fast decode along a side of ``n``
    (``other``: the other side); ``[0]`` when the latent fits one tile."""
    lat_size, lat_stride = tiling.tile_size // spatial_compression, tiling.tile_stride // spatial_compression
    return list(range(0, n, lat_stride)) if n > lat_size or other > lat_size else [0]


# ----------------------------------------------------------------------------------------------------------------
# Working-set estimates
# ----------------------------------------------------------------------------------------------------------------
def _stages(config: VAEConfig, t: int, h: int, w: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(C_in, C_out, T, H, W) of each decoder stage: up block i's resnets at the resolution after block i-1."""
    widths = list(reversed(config.block_out_channels))
    factors = config.up_factors()
    for i in range(len(widths) + 1):
        if i > 0 and factors[i - 1] is not None:
            ft, fs = factors[i - 1]
            t, h, w = (t if ft == 1 else 1 + ft * (t - 1)), h * fs, w * fs
        yield widths[max(i - 1, 0)], widths[min(i, len(widths) - 1)], t, h, w


def untiled_bytes(config: VAEConfig, latent_shape: tuple[int, ...], itemsize: int) -> int:
    """Estimated peak device bytes of an untiled decode of one sample (activations only)."""
    _, _, t, h, w = latent_shape
    peak = 0
    for c_in, c_out, tt, hh, ww in _stages(config, t, h, w):
        # a resnet holds its input, the normalised copy and the padded copy while its conv output grows
        # (measured on CPU: ~3 such tensors at the widest stage; 4 leaves room for allocator workspaces)
        peak = max(peak, 4 * max(c_in, c_out) * (tt + 2) * (hh + 2) * (ww + 2) * itemsize)
    if config.mid_block_add_attention:
        width = config.block_out_channels[-1]
        peak = max(peak, 8 * h * w * t * h * w + 6 * width * t * h * w * itemsize)
    return int(peak)


def exact_store_bytes(config: VAEConfig, latent_shape: tuple[int, ...], itemsize: int) -> int:
    """Estimated bytes of the activation store of an exact chunked decode of one sample."""
    _, _, t, h, w = latent_shape
    peak = 0
    for c_in, c_out, t, h, w in _stages(config, t, h, w):
        # a resnet's input and hidden activation, plus one temporal chunk (<= 1/4) when they differ in width
        peak = max(peak, (c_in + c_out * (1.25 if c_in != c_out else 1)) * t * h * w * itemsize)
    return int(peak + config.out_channels * t * h * w * itemsize)


def stream_bytes(config: VAEConfig, latent_shape: tuple[int, ...], tiling: StreamTiling, itemsize: int) -> int:
    """Estimated peak device bytes (activations and output, no weights) of a streamed fast decode."""
    _, c, t, h, w = latent_shape
    th, tw, m = min(h, tiling.tile_height), min(w, tiling.tile_width), min(t, tiling.chunk_frames)
    working = untiled_bytes(config, (1, c, m + 1, th, tw), itemsize)
    widths = list(reversed(config.block_out_channels))
    n_res = config.layers_per_block + 1
    area = th * tw
    cache_elems = (c + 4 * widths[0]) * area  # conv_in, mid-block resnets: (k - 1) = 2 frames of each conv's input
    for i, factor in enumerate(config.up_factors()):
        cache_elems += (widths[max(i - 1, 0)] + (2 * n_res - 1) * widths[i]) * area
        if factor is not None:
            area *= factor[1] ** 2
            cache_elems += widths[i] * area
    cache_elems += widths[-1] * area  # conv_out
    kv = 2 * t * th * tw * widths[0] * itemsize if config.mid_block_add_attention else 0
    s, tc = config.spatial_compression, config.temporal_compression
    video = config.out_channels * (tc * (t - 1) + 1) * h * s * w * s * itemsize
    return int(working + 2 * cache_elems * itemsize + 2 * kv + video)


def stream_overhead(latent_shape: tuple[int, ...], tiling: StreamTiling) -> float:
    """Latent voxels a streamed fast decode pushes through the decoder per latent voxel (1.0 = none)."""
    _, _, t, h, w = latent_shape
    th, tw = min(h, tiling.tile_height), min(w, tiling.tile_width)
    n_h, n_w = len(tile_starts(h, th, tiling.overlap)), len(tile_starts(w, tw, tiling.overlap))
    return n_h * th * n_w * tw / (h * w)


def fast_overhead(config: VAEConfig, latent_shape: tuple[int, ...], tiling: FastTiling) -> float:
    """Latent voxels an official-tile fast decode pushes through the decoder per latent voxel (1.0 = none)."""
    _, _, t, h, w = latent_shape
    s, tc = config.spatial_compression, config.temporal_compression
    lat_frames, lat_stride_frames = tiling.tile_frames // tc, tiling.tile_stride_frames // tc
    lat_size, lat_stride = tiling.tile_size // s, tiling.tile_stride // s
    spatial = h > lat_size or w > lat_size
    frames = (sum(min(t, i + lat_frames + 1) - i for i in range(0, t, lat_stride_frames))
              if t > lat_frames else t)

    def covered(n: int) -> int:
        return sum(min(n, i + lat_size) - i for i in range(0, n, lat_stride)) if spatial else n
    return frames * covered(h) * covered(w) / (t * h * w)


def stream_tiling_for_budget(config: VAEConfig, latent_shape: tuple[int, ...], budget: int, itemsize: int, *,
                             overlap_fraction: float = FAST_OVERLAP_FRACTION,
                             tile_penalty: float = FAST_TILE_PENALTY) -> StreamTiling:
    """The streamed tiling of least predicted cost (decoded latent voxels, spatial overlaps included, plus a
    per-chunk and a per-tile overhead) whose estimated working set fits ``budget`` (activation bytes)."""
    _, _, t, h, w = latent_shape
    best: tuple[float, StreamTiling] | None = None

    def layouts(n: int) -> Iterator[tuple[int, int]]:
        for k in range(1, n + 1):
            size = -(-n // k)
            overlap = 0 if k == 1 else max(1, math.ceil(overlap_fraction * size))
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
                if stream_bytes(config, latent_shape, tiling, itemsize) > budget:
                    continue
                chunks = -(-(t - 1) // m) + 1 if m < t else 1
                # spatial splits cost quality (per-tile statistics), temporal chunks almost none: weigh tiles
                tiles = n_h * n_w
                cost = n_h * th * n_w * tw * (t + 0.25 * chunks) * (1 + tile_penalty * (tiles - 1))
                if best is None or cost < best[0]:
                    best = (cost, tiling)
                break  # smaller chunks of the same tiles only cost more
    if best is None:
        raise MemoryError(f"fast VAE decode: even 1-latent-frame chunks of the smallest tiles need more than the "
                          f"budget of {budget / 2**20:.1f} MiB beyond the weights; raise memory_budget or use "
                          "mode='exact'")
    return best[1]


# ----------------------------------------------------------------------------------------------------------------
# Exact mode: the tiles of every layer of the lockstep decoder
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """Tiles of one lockstep layer, in output coordinates; the attention has its key/value tiles as well."""

    name: str
    tiles: tuple[Tile, ...]
    kv_tiles: tuple[Tile, ...] = ()
    time_chunks: int = 1
    space_chunks: int = 1


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _tiles(shape: tuple[int, int, int], bytes_fn: Callable[[int, int, int], int], budget: int, what: str,
           min_time_parts: int = 1) -> tuple[tuple[Tile, ...], int, int]:
    """Largest tiles (halving the longest side) whose estimated working set fits the budget; with the number of
    temporal and spatial chunks."""
    parts = [min(min_time_parts, shape[0]), 1, 1]
    while True:
        sizes = [-(-n // p) for n, p in zip(shape, parts)]
        if bytes_fn(*sizes) <= budget:
            break
        splittable = [i for i in range(3) if sizes[i] > (1 if i == 0 else 4)]
        if not splittable:
            raise MemoryError(
                f"exact VAE decode: even the smallest tile of {what} needs ~{bytes_fn(*sizes) / 2**20:.1f} MiB "
                f"of device memory beyond the weights, over the budget of {budget / 2**20:.1f} MiB; "
                "raise memory_budget or use mode='fast'")
        i = max(splittable, key=lambda d: sizes[d] * (1.0 if d else 1.5))
        parts[i] = min(shape[i], parts[i] * 2)
    spans = [_split(n, p) for n, p in zip(shape, parts)]
    tiles = tuple((t, h, w) for t in spans[0] for h in spans[1] for w in spans[2])
    return tiles, len(spans[0]), len(spans[1]) * len(spans[2])


def _conv_plan(name: str, src: tuple[int, int, int, int], c_out: int, budget: int, itemsize: int, *,
               c_mid: int | None = None, norm: bool = False, up: tuple[int, int] | None = None,
               residual: bool = False, overwrite_src: bool = False) -> LayerPlan:
    """``conv(upsample(norm_silu(pre(src))))`` (+ residual) over ``src = (C, T, H, W)``; ``c_mid``: the width
    after the 1x1 ``pre`` conv (``None``: no pre conv)."""
    c_in, t_in, h_in, w_in = src
    ft, fs = up or (1, 1)
    k, pad = DECODER_KERNEL, DECODER_KERNEL // 2
    shape = (t_in if ft == 1 else 1 + ft * (t_in - 1), h_in * fs, w_in * fs)
    mid = c_mid if c_mid is not None else c_in

    def tile_bytes(tt: int, th: int, tw: int) -> int:
        halo = (tt + k - 1) * (th + 2 * pad) * (tw + 2 * pad)
        region = c_in * ((tt + k - 1) // ft + 2) * ((th + 2 * pad) // fs + 2) * ((tw + 2 * pad) // fs + 2)
        moved = region + (mid * region // c_in if c_mid is not None else 0)
        normed = region * mid // c_in if norm else 0
        expanded = mid * halo
        y = c_out * tt * th * tw
        res = (c_in + c_out) * tt * th * tw if residual else 0
        stats_tmp = 2 * 8 * c_out * min(tt, 4) * th * tw
        return int(1.1 * itemsize * (moved + normed + expanded + 2 * y + res) + stats_tmp)

    tiles, t_chunks, s_chunks = _tiles(shape, tile_bytes, budget, f"{c_out}-channel conv", 4 if overwrite_src else 1)
    return LayerPlan(name, tiles, time_chunks=t_chunks, space_chunks=s_chunks)


def _attention_plan(name: str, src: tuple[int, int, int, int], budget: int, itemsize: int) -> LayerPlan:
    """Key/value tiles (whole rows of frames) and query tiles of the streamed frame-causal attention."""
    c, t, h, w = src
    kv, kv_t, kv_s = _tiles((t, h, 1), lambda tt, th, _w: int(1.2 * itemsize * c * tt * th * w * 5), budget,
                            "attention keys/values")

    def attn_bytes(tq: int, rq: int, _w: int) -> int:
        nq = tq * rq * w
        return int(1.2 * (itemsize * c * nq * 5 + 4 * c * nq * 2 + 4 * nq * nq * 3))
    queries, q_t, q_s = _tiles((t, h, 1), attn_bytes, budget, "attention queries")
    return LayerPlan(name, queries, kv, max(kv_t, q_t), max(kv_s, q_s))


def exact_layer_plans(config: VAEConfig, latent_shape: tuple[int, ...], budget: int,
                      itemsize: int) -> tuple[LayerPlan, ...]:
    """The tiles of every layer of a lockstep exact decode of one sample, in decoder order, for ``budget``
    device bytes of tiles (weights and a device-side store excluded)."""
    _, c_lat, t, h, w = latent_shape
    widths = list(reversed(config.block_out_channels))
    plans = [_conv_plan("conv_in", (c_lat, t, h, w), widths[0], budget, itemsize, c_mid=c_lat)]

    def resnet(name: str, c_in: int, c_out: int) -> None:
        plans.append(_conv_plan(f"{name}.conv1", (c_in, t, h, w), c_out, budget, itemsize, norm=True))
        plans.append(_conv_plan(f"{name}.conv2", (c_out, t, h, w), c_out, budget, itemsize, norm=True,
                                residual=True, overwrite_src=c_in != c_out))

    resnet("mid_block.resnets.0", widths[0], widths[0])
    if config.mid_block_add_attention:
        plans.append(_attention_plan("mid_block.attentions.0", (widths[0], t, h, w), budget, itemsize))
    resnet("mid_block.resnets.1", widths[0], widths[0])
    for i, factor in enumerate(config.up_factors()):
        for j in range(config.layers_per_block + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", widths[max(i - 1, 0)] if j == 0 else widths[i], widths[i])
        if factor is not None:
            plans.append(_conv_plan(f"up_blocks.{i}.upsamplers.0.conv", (widths[i], t, h, w), widths[i], budget,
                                    itemsize, up=factor))
            ft, fs = factor
            t, h, w = (t if ft == 1 else 1 + ft * (t - 1)), h * fs, w * fs
    plans.append(_conv_plan("conv_out", (widths[-1], t, h, w), config.out_channels, budget, itemsize, norm=True))
    return tuple(plans)


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePlan:
    """What a decode will do. ``mode``: ``"untiled"``, ``"exact(untiled)"``, ``"exact"`` (lockstep, ``store`` =
    ``"device"``/``"host"``, ``layers`` = the tiles of each layer of one sample) or ``"fast"`` (``tiling``)."""

    mode: str
    budget_bytes: int
    weight_bytes: int
    store: str | None = None
    layers: tuple[LayerPlan, ...] = ()
    tiling: FastTiling | StreamTiling | None = None
    time_chunks: int = 1
    space_chunks: int = 1
    tiles: int = 0
    notes: tuple[str, ...] = ()


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

    @classmethod
    def of(cls, plan: DecodePlan) -> "DecodeInfo":
        return cls(mode=plan.mode, budget_bytes=plan.budget_bytes, weight_bytes=plan.weight_bytes,
                   max_time_chunks=plan.time_chunks, max_space_chunks=plan.space_chunks, tiles=plan.tiles,
                   notes=list(plan.notes))


def _lockstep_plan(config: VAEConfig, latent_shape: tuple[int, ...], store: str, tile_budget: int, itemsize: int,
                   base: dict) -> DecodePlan:
    layers = exact_layer_plans(config, latent_shape, tile_budget, itemsize)
    tiles = latent_shape[0] * sum(len(p.tiles) + len(p.kv_tiles) for p in layers)
    return DecodePlan(mode="exact", store=store, layers=layers, time_chunks=max(p.time_chunks for p in layers),
                      space_chunks=max(p.space_chunks for p in layers), tiles=tiles, notes=(f"store={store}",),
                      **base)


def _exact_plan(config: VAEConfig, latent_shape: tuple[int, ...], activations: int, itemsize: int,
                host_bytes: int, base: dict) -> DecodePlan:
    """Lockstep tiles with the activation store on the device when it fits with 15 % to spare and the tiles fit
    beside it (no host round trips), else on the host."""
    store = exact_store_bytes(config, latent_shape, itemsize)
    if store * STORE_DEVICE_MARGIN <= activations:
        try:
            return _lockstep_plan(config, latent_shape, "device", activations - store, itemsize, base)
        except MemoryError:
            pass  # some layer's smallest tile does not fit beside the store: keep the store on the host
    if store > STORE_HOST_FRACTION * host_bytes:
        raise MemoryError(
            f"exact VAE decode needs ~{store / 2**30:.1f} GiB of host memory for its activation store (it does not "
            f"fit the device budget of {base['budget_bytes'] / 2**30:.1f} GiB beside the tiles), but only ~{host_bytes / 2**30:.1f} "
            "GiB are available. Exact decoding never falls back to approximate tiles: free host memory, raise "
            "memory_budget, or choose mode='fast' (blended tiles, approximate)")
    return _lockstep_plan(config, latent_shape, "host", activations, itemsize, base)


def _fast_plan(config: VAEConfig, latent_shape: tuple[int, ...], activations: int, itemsize: int,
               tiling: FastTiling | StreamTiling | None, overlap_fraction: float, tile_penalty: float,
               base: dict) -> DecodePlan:
    b, _, t, h, w = latent_shape
    if isinstance(tiling, FastTiling):
        s, tc = config.spatial_compression, config.temporal_compression
        time_chunks = len(fast_time_starts(t, tiling, tc))
        space_chunks = len(fast_space_starts(h, w, tiling, s)) * len(fast_space_starts(w, h, tiling, s))
        tiles, overhead = time_chunks * space_chunks, fast_overhead(config, latent_shape, tiling)
    else:
        tiling = tiling or stream_tiling_for_budget(config, latent_shape, activations, itemsize,
                                                    overlap_fraction=overlap_fraction, tile_penalty=tile_penalty)
        th, tw = min(h, tiling.tile_height), min(w, tiling.tile_width)
        time_chunks = len(stream_chunks(t, tiling.chunk_frames))
        space_chunks = len(tile_starts(h, th, tiling.overlap)) * len(tile_starts(w, tw, tiling.overlap))
        tiles, overhead = b * space_chunks * time_chunks, stream_overhead(latent_shape, tiling)
    return DecodePlan(mode="fast", tiling=tiling, time_chunks=time_chunks, space_chunks=space_chunks, tiles=tiles,
                      notes=(f"tiling={tiling}", f"recompute_overhead={overhead:.2f}"), **base)


def plan_decode(config: VAEConfig, latent_shape: tuple[int, ...], budget: int, mode: str = "exact", *,
                dtype: torch.dtype, weight_bytes: int, host_bytes: int,
                tiling: FastTiling | StreamTiling | None = None,
                overlap_fraction: float = FAST_OVERLAP_FRACTION,
                tile_penalty: float = FAST_TILE_PENALTY) -> DecodePlan:
    """Plan the decode of latents of ``latent_shape`` ``[B, C, T, H, W]`` within ``budget`` device bytes
    (decoder weights of ``weight_bytes`` included), in ``dtype``; ``host_bytes``: available host memory.

    - ``"untiled"``: the plain forward pass, whatever the budget;
    - ``"exact"``: untiled when its estimated working set fits, else lockstep tiles with the activation store on
      the device (when it fits with 15 % to spare) or on the host. A budget it cannot meet (the store exceeds the
      host memory, or even the smallest tile of a layer does not fit) raises ``MemoryError``; it never decodes
      approximately instead;
    - ``"fast"``: the ``tiling`` given, or the cheapest ``StreamTiling`` that fits (``MemoryError`` if none).

    Pure: nothing is allocated. Raises ``ValueError`` for an unknown mode or a non-positive budget.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be 'exact', 'fast' or 'untiled', got {mode!r}")
    if budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {budget}")
    if len(latent_shape) != 5:
        raise ValueError(f"latent_shape must be [B, C, T, H, W], got {tuple(latent_shape)}")
    latent_shape = tuple(int(n) for n in latent_shape)
    itemsize = dtype.itemsize
    base = dict(budget_bytes=int(budget), weight_bytes=int(weight_bytes))
    activations = budget - weight_bytes
    if mode == "untiled":
        return DecodePlan(mode="untiled", **base)
    if activations <= 0:
        raise MemoryError(f"VAE decode budget {budget / 2**20:.1f} MiB does not even hold the decoder weights "
                          f"({weight_bytes / 2**20:.1f} MiB); raise memory_budget")
    if mode == "fast":
        return _fast_plan(config, latent_shape, activations, itemsize, tiling, overlap_fraction, tile_penalty,
                          base)
    if untiled_bytes(config, latent_shape, itemsize) <= activations:
        return DecodePlan(mode="exact(untiled)", **base)
    return _exact_plan(config, latent_shape, activations, itemsize, host_bytes, base)
