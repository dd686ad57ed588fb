"""plan_decode: the pure VAE decode planner (no tensors, no allocation). Modes, budgets, impossible budgets, exact
never becoming fast, every layer's tiles covering its output, and the released-VAE figures docs/vae.md quotes."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from accvideo_core.models.vae_decode_plan import (FastTiling, StreamTiling, exact_layer_plans, exact_store_bytes,
                                                  fast_overhead, plan_decode, stream_bytes, stream_overhead, untiled_bytes)
from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig

RELEASED = VAEConfig()
GiB = 2**30
WEIGHTS = 200 << 20  # about the released decoder in bf16
LATENT_544 = (1, 16, 24, 68, 120)  # 544x960, 93 frames
LATENT_720 = (1, 16, 33, 90, 160)  # 720x1280, 129 frames


def plan(shape=LATENT_544, budget=24 * GiB, mode="exact", *, host=256 * GiB, config=RELEASED, **kw):
    return plan_decode(config, shape, budget, mode, dtype=torch.bfloat16, weight_bytes=WEIGHTS, host_bytes=host,
                       **kw)


class _NoOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        raise AssertionError(f"plan_decode ran a tensor op: {func}")


def test_planning_runs_no_tensor_op():
    with _NoOps():
        for mode, budget in (("exact", 24 * GiB), ("exact", 80 * GiB), ("fast", 24 * GiB), ("untiled", 1)):
            plan(budget=budget, mode=mode)
        assert plan(budget=50 * GiB, mode="exact", host=20 * GiB).store == "device"


def test_modes_follow_the_budget():
    untiled = untiled_bytes(RELEASED, LATENT_544, 2)
    assert plan(mode="untiled", budget=1).mode == "untiled"  # the plain forward pass ignores the budget
    assert plan(budget=WEIGHTS + untiled).mode == "exact(untiled)"
    store = exact_store_bytes(RELEASED, LATENT_544, 2)
    on_device = plan(budget=WEIGHTS + int(1.2 * store))
    assert (on_device.mode, on_device.store, on_device.notes) == ("exact", "device", ("store=device",))
    on_host = plan(budget=WEIGHTS + store)
    assert (on_host.mode, on_host.store) == ("exact", "host")
    tighter = plan(budget=WEIGHTS + store // 8)
    assert tighter.store == "host" and tighter.tiles > on_host.tiles and tighter.space_chunks >= on_host.space_chunks
    fast = plan(mode="fast", budget=WEIGHTS + untiled // 4)
    assert fast.mode == "fast" and isinstance(fast.tiling, StreamTiling)
    assert stream_bytes(RELEASED, LATENT_544, fast.tiling, 2) <= untiled // 4
    official = plan(mode="fast", tiling=FastTiling())
    assert official.tiling == FastTiling() and official.notes[1] == "recompute_overhead=1.89"


def _spans_partition(spans: set[tuple[int, int]], n: int) -> bool:
    """The ranges tile [0, n) without gaps or overlaps."""
    ordered = sorted(spans)
    return ordered[0][0] == 0 and ordered[-1][1] == n and all(a[1] == b[0] for a, b in zip(ordered, ordered[1:]))


def test_exact_tiles_cover_every_layer_output_exactly_once():
    """Each layer's tiles are the product of partitions of its output's time, height and width (the attention's:
    of time and height, whole rows)."""
    for budget in (WEIGHTS + 4 * GiB, WEIGHTS + (256 << 20)):
        p = plan(LATENT_720, budget, host=512 * GiB)
        assert p.store == "host" and len(p.layers) == 1 + 2 * 2 + 1 + 4 * 2 * 3 + 3 + 1
        shape = LATENT_720[2:]
        for layer in p.layers:
            if layer.name.endswith("upsamplers.0.conv"):
                t, h, w = shape
                shape = (1 + 2 * (t - 1) if layer.name.startswith(("up_blocks.1", "up_blocks.2")) else t, 2 * h, 2 * w)
            spans = [{tile[d] for tile in layer.tiles} for d in range(3)]
            covers = (*shape[:2], 1) if layer.kv_tiles else shape  # attention tiles are whole rows of tokens
            assert all(_spans_partition(s, n) for s, n in zip(spans, covers)), layer.name
            assert len(layer.tiles) == len(set(layer.tiles)) == len(spans[0]) * len(spans[1]) * len(spans[2])
        assert p.layers[-1].name == "conv_out" and shape == (129, 720, 1280)
        assert p.space_chunks > 1 and p.time_chunks > 1


def test_impossible_budgets_are_clear_errors():
    with pytest.raises(MemoryError, match="decoder weights"):
        plan(budget=WEIGHTS // 2)
    with pytest.raises(MemoryError, match="smallest tile"):
        plan((1, 16, 3, 4, 6), WEIGHTS + 1000)
    with pytest.raises(MemoryError, match="fast VAE decode"):
        plan(mode="fast", budget=WEIGHTS + 1000)
    with pytest.raises(ValueError, match="mode"):
        plan(mode="tiled")
    with pytest.raises(ValueError, match="positive"):
        plan(budget=0)


def test_exact_never_becomes_fast():
    """A store larger than the host memory is an error naming the fix, at every budget that needs the store."""
    store = exact_store_bytes(RELEASED, LATENT_720, 2)
    untiled = untiled_bytes(RELEASED, LATENT_720, 2)
    for budget in (WEIGHTS + store // 8, WEIGHTS + store, WEIGHTS + int(1.1 * store)):
        with pytest.raises(MemoryError, match=r"never falls back.*mode='fast'"):
            plan(LATENT_720, budget, host=store // 2)
    for budget in (WEIGHTS + store // 8, WEIGHTS + store, WEIGHTS + int(1.2 * store), WEIGHTS + untiled):
        for host in (2 * store, 4 * store):
            assert plan(LATENT_720, budget, host=host).mode in ("exact", "exact(untiled)")
    # a store that fits the device does not need the host
    assert plan(LATENT_720, WEIGHTS + int(1.2 * store), host=0).store == "device"


def test_device_store_gives_way_when_the_tiles_do_not_fit_beside_it():
    """The tiles get what the device store leaves; when some layer's smallest tile does not fit there, the store
    goes to the host (still exact) instead of failing halfway through the decode."""
    config = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    shape = (1, 16, 2, 2, 2)
    store = exact_store_bytes(config, shape, 4)
    activations = int(1.16 * store)
    assert untiled_bytes(config, shape, 4) > activations
    with pytest.raises(MemoryError, match="smallest tile"):
        exact_layer_plans(config, shape, activations - store, 4)
    p = plan_decode(config, shape, WEIGHTS + activations, "exact", dtype=torch.float32, weight_bytes=WEIGHTS,
                    host_bytes=GiB)
    assert p.store == "host" and p.layers == exact_layer_plans(config, shape, activations, 4)


def test_released_vae_figures_quoted_in_the_docs():
    """docs/vae.md: store ~23 / 38 / 93 GiB and untiled ~59 / 95 / 231 GiB at 480p/544p/720p in bf16; fast at 1/4
    of untiled streams whole frames (3- and 6-frame chunks at 544p and 720p, no recomputation); the official tiles
    recompute 1.89x / 2.15x."""
    shapes = ((1, 16, 19, 60, 106), LATENT_544, LATENT_720)
    assert [round(exact_store_bytes(RELEASED, s, 2) / GiB) for s in shapes] == [23, 38, 93]
    assert [round(untiled_bytes(RELEASED, s, 2) / GiB) for s in shapes] == [59, 95, 231]
    for shape, chunk in ((LATENT_544, 3), (LATENT_720, 6)):
        tiling = plan(shape, WEIGHTS + untiled_bytes(RELEASED, shape, 2) // 4, "fast").tiling
        assert (tiling.tile_height, tiling.tile_width, tiling.chunk_frames) == (*shape[3:], chunk)
        assert stream_overhead(shape, tiling) == 1.0
    assert [round(fast_overhead(RELEASED, s, FastTiling()), 2) for s in (LATENT_544, LATENT_720)] == [1.89, 2.15]


def test_model_plan_matches_what_decode_does():
    config = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
    vae = HunyuanVideoVAE(config).eval()
    z = torch.randn(1, 16, 3, 4, 6)
    budget = vae.weight_bytes() + 400_000
    expected = vae.plan_decode(z.shape, memory_budget=budget)
    with torch.no_grad():
        vae.decode(z, memory_budget=budget)
    info = vae.last_decode_info
    assert (info.mode, info.tiles, info.max_time_chunks, info.max_space_chunks, info.notes) == (
        expected.mode, expected.tiles, expected.time_chunks, expected.space_chunks, list(expected.notes))
