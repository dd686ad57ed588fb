"""The procedural mini data set and the tiny text encoder of the miniature HunyuanVideo family."""
from __future__ import annotations

import pytest
import torch

from accvideo_core.mini import (CAPTION_TEMPLATE, MiniVideoConfig, MiniVideoDataset, TinyTextEncoder,
                                TinyTextEncoderConfig, attribute_combos, clip_spec, parse_caption, render_clip)
from accvideo_core.mini.data import (BACKGROUND_COLORS, DIRECTIONS, GEOMETRIES, SHAPE_COLORS, SHAPES, ClipSpec,
                                     Geometry)
from accvideo_core.utils.io import CheckpointError, save_safetensors


def shape_mask(video: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """[F, H, W] True where a pixel is (mostly) the shape's colour rather than the background's."""
    fg = torch.tensor(SHAPE_COLORS[spec.color]) * 2 - 1
    bg = torch.tensor(BACKGROUND_COLORS[spec.background]) * 2 - 1
    d_fg = (video - fg[:, None, None, None]).norm(dim=0)
    d_bg = (video - bg[:, None, None, None]).norm(dim=0)
    return d_fg < d_bg


def coverage(video: torch.Tensor, spec: ClipSpec) -> torch.Tensor:
    """[F, H, W] the anti-aliased fraction of each pixel covered by the shape (0 = background, 1 = shape)."""
    fg = (torch.tensor(SHAPE_COLORS[spec.color]) * 2 - 1)[:, None, None, None]
    bg = (torch.tensor(BACKGROUND_COLORS[spec.background]) * 2 - 1)[:, None, None, None]
    return ((video - bg) * (fg - bg)).sum(0) / ((fg - bg) ** 2).sum()


def centroid(mask: torch.Tensor) -> torch.Tensor:
    """[F, 2] (x, y) centre of mass of each frame's mask."""
    f, h, w = mask.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    m = mask.float()
    n = m.sum((1, 2))
    assert (n > 0).all(), "the shape must be visible in every frame"
    return torch.stack([(m * xs).sum((1, 2)) / n, (m * ys).sum((1, 2)) / n], dim=1)


def test_clips_are_deterministic_and_in_range():
    ds = MiniVideoDataset(6, config=MiniVideoConfig(seed=3))
    a, b = ds[4], MiniVideoDataset(6, config=MiniVideoConfig(seed=3))[4]
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    assert a["video"].shape == (3, 17, 64, 64) and a["video"].dtype == torch.float32
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    other_seed = MiniVideoDataset(6, config=MiniVideoConfig(seed=4))
    assert any(not torch.equal(ds[i]["video"], other_seed[i]["video"]) for i in range(6))
    assert len({ds[i]["caption"] for i in range(6)}) > 1


@pytest.mark.parametrize("direction", sorted(DIRECTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_video_shows_the_caption(shape, direction):
    """The colours are the captioned ones, the shape moves the captioned way and stays inside the frame."""
    spec = parse_caption(f"a red {shape} moving {direction} on a blue background")
    assert spec.caption() == f"a red {shape} moving {direction} on a blue background"
    video = render_clip(spec, 9, 48, 64)
    mask = shape_mask(video, spec)
    c = centroid(mask)
    motion = c[-1] - c[0]
    dx, dy = DIRECTIONS[direction]
    along = motion[0] * dx + motion[1] * dy
    expected = spec.travel * (64 if dx else 48)  # the travel is the shape's displacement over the clip
    assert abs(along - expected) < 0.05 * expected and along > 8, f"{direction}: moved {motion.tolist()}"
    assert (motion[1] if dx else motion[0]).abs() < 1.0
    assert not mask[:, 0].any() and not mask[:, -1].any() and not mask[:, :, 0].any() and not mask[:, :, -1].any()
    area = coverage(video, spec).sum((1, 2))
    assert area.std() / area.mean() < 0.02  # rigid shape: same area in every frame


def test_shapes_are_distinguishable():
    """Same geometry, different shapes: different pixel footprints with the expected area ordering."""
    areas = {}
    for shape in SHAPES:
        spec = ClipSpec(shape, "white", "black", "right", 0.2, (0.5, 0.5), 0.0)
        areas[shape] = coverage(render_clip(spec, 1, 64, 64), spec).sum().item()
    side = 0.2 * 64
    assert abs(areas["circle"] - torch.pi * side ** 2) / areas["circle"] < 0.02
    assert abs(areas["square"] - (2 * 0.85 * side) ** 2) / areas["square"] < 0.02
    assert abs(areas["diamond"] - 2 * (1.15 * side) ** 2) / areas["diamond"] < 0.02
    assert abs(areas["triangle"] - 3 * 3 ** 0.5 / 4 * (1.25 * side) ** 2) / areas["triangle"] < 0.02
    assert areas["triangle"] < areas["diamond"] < areas["square"]


@pytest.mark.parametrize("geometry_name", sorted(GEOMETRIES))
def test_random_specs_stay_in_frame_and_respect_contrast(geometry_name):
    ranges = GEOMETRIES[geometry_name]
    for index in range(40):
        spec = clip_spec(index, seed=1, geometry_name=geometry_name)
        assert ranges.radius[0] <= spec.radius <= ranges.radius[1]
        assert ranges.travel[0] <= spec.travel <= ranges.travel[1]
        for t in (0.0, 1.0):
            dx, dy = DIRECTIONS[spec.direction]
            x = spec.start[0] + dx * spec.travel * t
            y = spec.start[1] + dy * spec.travel * t
            assert spec.radius <= x <= 1 - spec.radius and spec.radius <= y <= 1 - spec.radius
        assert spec.color != spec.background


def test_geometries_are_named_and_checked():
    """Same (seed, split, index): same attributes in every geometry, only the sizes differ; bad ranges and names
    raise with what is expected."""
    small, large = (clip_spec(7, seed=2, geometry_name=g) for g in ("small", "large"))
    assert small.combo() == large.combo() and small.radius < large.radius
    assert MiniVideoDataset(3, config=MiniVideoConfig(geometry="small")).spec(2) == clip_spec(2, geometry_name="small")
    with pytest.raises(ValueError, match="stays inside the frame"):
        Geometry(radius=(0.3, 0.4), travel=(0.2, 0.3), reference=(0.3, 0.2))
    with pytest.raises(ValueError, match="expected one of"):
        MiniVideoConfig(geometry="huge")


def test_heldout_split_is_disjoint_and_covers_every_attribute():
    train, held = set(attribute_combos("train")), set(attribute_combos("heldout"))
    assert train and held and not train & held
    assert train | held == set(attribute_combos())
    for pos, values in enumerate((SHAPES, SHAPE_COLORS, DIRECTIONS, BACKGROUND_COLORS)):
        assert {c[pos] for c in train} == set(values)
    held_ds = MiniVideoDataset(30, split="heldout")
    assert all(held_ds.spec(i).combo() in held for i in range(30))
    with pytest.raises(ValueError, match="split must be one of"):
        MiniVideoDataset(3, split="test")


def test_bad_sizes_and_captions_are_explained():
    with pytest.raises(ValueError, match="4k\\+1"):
        MiniVideoConfig(frames=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        render_clip(clip_spec(0), 17, 60, 64)
    with pytest.raises(ValueError, match="template"):
        parse_caption("a red hexagon moving left on a blue background")
    with pytest.raises(IndexError):
        MiniVideoDataset(3)[3]


def test_text_encoder_shapes_mask_and_padding():
    enc = TinyTextEncoder(TinyTextEncoderConfig(text_dim=32, pooled_dim=24, max_length=12))
    prompts = ["a red square moving left on a blue background", "a green circle"]
    out = enc.encode(prompts)
    assert out.states.shape == (2, 12, 32) and out.mask.shape == (2, 12) and out.pooled.shape == (2, 24)
    assert out.mask.tolist()[0] == [1] * 10 + [0] * 2 and out.mask.sum(1).tolist() == [10, 4]
    assert torch.all(out.states[out.mask == 0] == 0)  # padding carries no signal
    assert torch.isfinite(out.pooled).all() and out.pooled.abs().max() > 0.1
    # padding length does not change valid states or the pooled vector
    long = TinyTextEncoder(TinyTextEncoderConfig(text_dim=32, pooled_dim=24, max_length=20)).encode(prompts)
    assert torch.equal(long.states[:, :12], out.states) and torch.allclose(long.pooled, out.pooled)


def test_text_encoder_separates_prompts_and_word_order():
    enc = TinyTextEncoder()
    a = enc.encode(["a red square moving left on a blue background", "a blue square moving left on a red background",
                    "a red square moving right on a blue background"])
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert (a.states[i] - a.states[j]).abs().max() > 0.5
        assert (a.pooled[i] - a.pooled[j]).norm() > 0.05 * a.pooled[i].norm()
    # every training caption tokenises without unknown words
    for combo in attribute_combos():
        shape, color, direction, background = combo
        ids, _ = enc.tokenize([CAPTION_TEMPLATE.format(shape=shape, color=color, direction=direction,
                                                       background=background)])
        assert 2 not in ids.tolist()[0]  # <unk>


def test_text_encoder_is_seeded_and_round_trips(tmp_path):
    cfg = TinyTextEncoderConfig(text_dim=16, pooled_dim=8, seed=5)
    enc = TinyTextEncoder(cfg)
    again = TinyTextEncoder(cfg)
    for (k, v), (k2, v2) in zip(enc.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not torch.equal(TinyTextEncoder(TinyTextEncoderConfig(text_dim=16, pooled_dim=8, seed=6)
                                           ).token_embedding, enc.token_embedding)
    assert not any(p.requires_grad for p in enc.parameters())

    enc.save(tmp_path / "te.safetensors")
    loaded = TinyTextEncoder.load(tmp_path / "te.safetensors")
    assert loaded.config == cfg
    prompt = ["an orange triangle moving up on a gray background"]
    x, y = enc.encode(prompt), loaded.encode(prompt)
    assert torch.equal(x.states, y.states) and torch.equal(x.pooled, y.pooled) and torch.equal(x.mask, y.mask)

    save_safetensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="not a mini text encoder"):
        TinyTextEncoder.load(tmp_path / "other.safetensors")


def test_text_encoder_rejects_unknown_and_long_prompts():
    enc = TinyTextEncoder()
    with pytest.raises(ValueError, match="outside the mini vocabulary: \\['hexagon'\\]"):
        enc.encode("a red hexagon")
    lenient = enc.encode("a red hexagon", strict=False)
    assert lenient.mask.sum().item() == 4
    with pytest.raises(ValueError, match="at most 15 fit"):
        enc.encode(" ".join(["red"] * 16))
