"""HunyuanVideo causal 3D VAE: differential tests against diffusers' AutoencoderKLHunyuanVideo (same random
weights), exact chunked decoding vs untiled, fast tiled decoding vs diffusers' tiled decode, error paths."""
from __future__ import annotations

import pytest
import torch

from accvideo_core import load_vae
from accvideo_core.testing import randomize_
from accvideo_core.models import vae_hunyuan_video
from accvideo_core.models.vae_decode_fast import CausalStream, ramp_weights
from accvideo_core.models.vae_decode_plan import FastTiling, StreamTiling, tile_starts
from accvideo_core.models.vae_hunyuan_video import (CausalConv3d, HunyuanVideoVAE, NonFiniteDecodeError, VAEConfig,
                                                    frame_causal_attention, norm_silu)

diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)  # module fixtures run before the per-test seeding: make the default init deterministic
    ref = diffusers.AutoencoderKLHunyuanVideo(latent_channels=16, **TINY).eval()
    randomize_(ref)  # non-degenerate: norm weights away from 1, non-zero biases
    # diffusers decodes more than 4 latent frames in overlapping temporal tiles by default: compare untiled.
    ref.use_framewise_decoding = ref.use_framewise_encoding = False
    ours = load_vae(ref.state_dict(), norm_num_groups=4)
    return ref, ours


def test_config_and_parameter_count_of_released_vae():
    with torch.device("meta"):
        vae = HunyuanVideoVAE(VAEConfig())
    assert sum(p.numel() for p in vae.parameters()) == 246_478_803
    assert VAEConfig().up_factors() == [(1, 2), (2, 2), (2, 2), None]


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 16, 3, 4, 6)
    expected = ref.decode(z).sample
    got = ours.decode(z, mode="untiled")
    assert got.shape == (2, 3, 9, 32, 48)
    assert (got - expected).abs().max().item() <= 1e-4
    # the default (exact) mode runs untiled when it fits and is bit-identical to it
    default = ours.decode(z)
    assert ours.last_decode_info.mode == "exact(untiled)"
    assert torch.equal(default, got)


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ref, ours = pair
    video = torch.rand(1, 3, 9, 32, 40) * 2 - 1
    expected = ref.encode(video).latent_dist
    got = ours.encode(video)
    assert got.shape == (1, 16, 3, 4, 5)
    assert (got - expected.mean).abs().max().item() <= 1e-4
    sampled = ours.encode(video, sample=True, generator=torch.Generator().manual_seed(1))
    spread = (sampled - got).std().item()
    assert 0.5 * expected.std.mean().item() < spread < 2 * expected.std.mean().item()


@torch.no_grad()
def test_causal_building_blocks():
    """Convs never look at future frames; the attention of frame t sees exactly frames <= t."""
    conv = CausalConv3d(4, 5, 3)
    x = torch.randn(1, 4, 5, 6, 6)
    x2 = x.clone()
    x2[:, :, 3] += 1.0
    assert torch.equal(conv(x)[:, :, :3], conv(x2)[:, :, :3])
    assert not torch.equal(conv(x)[:, :, 3], conv(x2)[:, :, 3])

    frames, hw, c = 3, 4, 8
    q, k, v = (torch.randn(2, frames * hw, c) for _ in range(3))
    frame = torch.arange(frames).repeat_interleave(hw)
    allowed = frame[None, :] <= frame[:, None]
    scores = (q @ k.transpose(1, 2)) / c ** 0.5
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    assert torch.allclose(frame_causal_attention(q, k, v, hw), expected, atol=1e-6)


@torch.no_grad()
def test_exact_chunked_decode_equals_untiled_within_budget(pair):
    _, ours = pair
    z = torch.randn(1, 16, 3, 4, 6)
    untiled = ours.decode(z, mode="untiled")
    budget = ours.weight_bytes() + 400_000
    progress = []
    exact = ours.decode(z, mode="exact", memory_budget=budget, measure=True,
                        progress=lambda done, total: progress.append((done, total)))
    info = ours.last_decode_info
    assert info.mode == "exact" and "store=host" in info.notes
    assert info.max_time_chunks > 1 and info.max_space_chunks > 1, info
    assert info.device_peak_bytes <= budget, info
    assert (exact - untiled).abs().max().item() <= 1e-3
    assert progress[-1][0] == progress[-1][1] and len(progress) == progress[-1][1]


@torch.no_grad()
def test_exact_decode_with_the_store_on_the_device(pair):
    """A budget that holds the activation store but not an untiled decode: store on the device, tiles in the rest."""
    _, ours = pair
    z = torch.randn(1, 16, 3, 4, 6)
    untiled = ours.decode(z, mode="untiled")
    activations = int(1.3 * ours.estimate_exact_host_bytes(z.shape))
    assert activations < ours.estimate_untiled_bytes(z.shape)
    budget = ours.weight_bytes() + activations
    exact = ours.decode(z, memory_budget=budget, measure=True)
    info = ours.last_decode_info
    assert info.mode == "exact" and "store=device" in info.notes
    assert info.max_time_chunks > 1 or info.max_space_chunks > 1, info
    assert info.device_peak_bytes <= budget, info
    assert (exact - untiled).abs().max().item() <= 1e-3


@torch.no_grad()
def test_exact_decode_can_be_interrupted(pair):
    _, ours = pair

    def stop(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ours.decode(torch.randn(1, 16, 2, 2, 2), mode="exact", memory_budget=ours.weight_bytes() + 200_000,
                    progress=stop)


@torch.no_grad()
def test_exact_budget_too_small_is_a_clear_error(pair):
    _, ours = pair
    with pytest.raises(MemoryError, match="decoder weights"):
        ours.decode(torch.randn(1, 16, 2, 2, 2), memory_budget=1000)


@torch.no_grad()
def test_exact_without_host_memory_for_its_store_is_an_error_not_fast(pair, monkeypatch):
    """exact never quietly becomes fast: when the store fits neither the device budget nor the host, it raises."""
    _, ours = pair
    z = torch.randn(1, 16, 3, 4, 6)
    budget = ours.weight_bytes() + 400_000  # the store does not fit here: it would go to the host
    monkeypatch.setattr(vae_hunyuan_video, "available_host_memory", lambda: 1000)
    ours.last_decode_info = None
    with pytest.raises(MemoryError, match=r"never falls back.*mode='fast'"):
        ours.decode(z, memory_budget=budget)
    assert ours.last_decode_info is None
    monkeypatch.undo()
    ours.decode(z, memory_budget=budget)
    assert ours.last_decode_info.mode == "exact" and "store=host" in ours.last_decode_info.notes


@torch.no_grad()
def test_fast_decode_matches_diffusers_tiled(pair):
    ref, ours = pair
    z = torch.randn(1, 16, 3, 5, 5)
    tiling = FastTiling(tile_size=32, tile_stride=24, tile_frames=8, tile_stride_frames=4)
    ref.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24,
                      tile_sample_stride_width=24, tile_sample_min_num_frames=8, tile_sample_stride_num_frames=4)
    ref.use_framewise_decoding = True
    try:
        expected = ref.decode(z).sample
    finally:
        ref.disable_tiling()
        ref.use_framewise_decoding = False
    got = ours.decode(z, mode="fast", tiling=tiling)
    info = ours.last_decode_info
    assert info.max_time_chunks > 1 and info.max_space_chunks > 1
    assert got.shape == expected.shape == (1, 3, 9, 40, 40)
    assert (got - expected).abs().max().item() <= 1e-4


@torch.no_grad()
def test_fast_decode_picks_a_streamed_tiling_within_budget(pair):
    _, ours = pair
    z = torch.randn(1, 16, 5, 16, 16)
    budget = ours.weight_bytes() + ours.estimate_untiled_bytes(z.shape) // 4
    video = ours.decode(z, mode="fast", memory_budget=budget, measure=True)
    info = ours.last_decode_info
    assert video.shape == (1, 3, 17, 128, 128)
    assert info.max_time_chunks > 1 and info.notes[0].startswith("tiling=StreamTiling")
    assert info.device_peak_bytes <= budget
    assert torch.isfinite(video).all()


@torch.no_grad()
def test_streamed_decode_carries_causal_state_exactly(pair):
    """With whole-volume GroupNorm statistics, streaming through time (conv caches, attention keys/values,
    first-frame upsampling only in the first chunk) reproduces the untiled decode: the only approximation of
    streamed fast mode is its running statistics."""
    _, ours = pair
    z = torch.randn(1, 16, 6, 4, 5)
    expected = ours.decode(z, mode="untiled")
    whole = CausalStream(ours)
    assert (whole(z) - expected).abs().max().item() <= 1e-4  # one chunk: running statistics are whole-volume
    frozen = {key: (mean.float(), torch.rsqrt(m2 / n + 1e-6).float()) for key, (n, mean, m2) in whole.stats.items()}
    stream = CausalStream(ours)
    stream.norm = lambda norm, x, silu=True: norm_silu(norm, x, silu, *frozen[id(norm)])
    parts = [stream(z[:, :, a:b]) for a, b in ((0, 2), (2, 3), (3, 6))]
    assert [p.shape[2] for p in parts] == [5, 4, 12]
    assert (torch.cat(parts, dim=2) - expected).abs().max().item() <= 1e-4
    # the default (running statistics) is approximate but the same video
    streamed_default = ours.decode(z, mode="fast", tiling=StreamTiling(4, 5, 2, 0))
    assert ours.last_decode_info.max_time_chunks == 3
    assert (streamed_default - expected).abs().max().item() < 2.0


def test_tile_starts_and_blend_weights_sum_to_one():
    starts = tile_starts(20, 8, 2)
    assert starts == [0, 6, 12] and tile_starts(5, 8, 2) == [0]
    weights = ramp_weights(20, starts, 8, 8, "cpu", torch.float32)
    total = torch.zeros(160)
    for a, w in zip(starts, weights):
        total[a * 8:a * 8 + w.numel()] += w
    assert torch.allclose(total, torch.ones(160), atol=1e-6)
    assert (total > 0).all() and all((w > 0).all() for w in weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_half_precision_overflow_raises_instead_of_black_frames(pair, dtype):
    _, ours = pair
    vae = load_vae(ours.state_dict(), norm_num_groups=4, dtype=dtype)
    vae.decoder.conv_out.conv.weight.fill_(torch.finfo(dtype).max)  # the sums overflow to inf in this dtype
    with pytest.raises(NonFiniteDecodeError, match=str(dtype)) as err:
        vae.decode(torch.randn(1, 16, 1, 2, 2), mode="untiled")
    assert "float32" in str(err.value)


@torch.no_grad()
def test_exact_decode_stops_at_the_first_non_finite_layer(pair):
    _, ours = pair
    vae = load_vae(ours.state_dict(), norm_num_groups=4, dtype=torch.float16)
    vae.decoder.conv_in.conv.weight.fill_(torch.finfo(torch.float16).max)
    calls = []
    with pytest.raises(NonFiniteDecodeError, match="float16"):
        vae.decode(torch.randn(1, 16, 2, 2, 2), memory_budget=vae.weight_bytes() + 100_000,
                   progress=lambda done, total: calls.append((done, total)))
    assert vae.last_decode_info is None or vae.last_decode_info.mode == "exact"
    assert 0 < len(calls) < calls[0][1] // 2  # aborted early, not after decoding everything


def test_bad_latents_are_clear_errors(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"\[B, 16, T, H, W\]"):
        ours.decode(torch.randn(1, 16, 4, 4))
    with pytest.raises(NonFiniteDecodeError, match="NaN"):
        ours.decode(torch.full((1, 16, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="mode"):
        ours.decode(torch.randn(1, 16, 1, 2, 2), mode="tiled")
    with pytest.raises(ValueError, match="4k\\+1"):
        ours.encode(torch.randn(1, 3, 8, 16, 16))
