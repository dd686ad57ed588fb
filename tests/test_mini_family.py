"""The shipped miniature HunyuanVideo family: files, sizes, loaders, and cheap checks that its teacher follows the
prompt on held-out prompts it never saw in training and that its guidance embedding is trained."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from accvideo_core.latents import to_model_space
from accvideo_core.mini import TinyTextEncoder, TinyTextEncoderConfig
from accvideo_core.demo import heldout_prompts
from accvideo_core.mini.data import (BACKGROUND_COLORS, SHAPE_COLORS, SHAPES, MiniVideoConfig, MiniVideoDataset,
                                     parse_caption)
from accvideo_core.mini.family import (ASSETS, FILES, PromptChecks, load_family, prompt_checks, reference_video,
                                       shape_region_colour)
from accvideo_core.mini.train_teacher import MINI_TRANSFORMER, encoder_sha256
from accvideo_core.mini.train_vae import MINI_VAE, evaluate_vae
from accvideo_core.mini.validate import attribute_usage, main as validate_main
from accvideo_core.models.loading import save_transformer
from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D

# of 12 teacher-50 videos of held-out prompts at the miniature's guidance 4: measured colour 9, motion 12, shape 7 on
# the shipped teacher (at guidance 6: 5 / 12 / 6); colour and motion 1 and 1 on an untrained teacher of the same
# architecture, shape chance about 3 (docs/demo.md)
COLOUR_MIN, MOTION_MIN, SHAPE_MIN = 7, 10, 5


@pytest.fixture(scope="module")
def family():
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    return load_family()


def test_shipped_files_are_small_safetensors():
    sizes = {name: (ASSETS / f).stat().st_size for name, f in FILES.items()}
    assert all(f.endswith(".safetensors") for f in FILES.values())
    assert sum(sizes.values()) <= 25 * 2**20, sizes


def test_family_has_the_documented_architectures(family):
    assert family.teacher.config.to_dict() == MINI_TRANSFORMER.to_dict()
    assert family.teacher.config.guidance_embed and "guidance_in.mlp.0.weight" in family.teacher.state_dict()
    assert family.vae.config.block_out_channels == MINI_VAE.block_out_channels
    assert family.text_encoder.config == TinyTextEncoderConfig()
    fresh = TinyTextEncoder(TinyTextEncoderConfig())  # the file holds exactly the seeded default encoder
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, family.text_encoder.state_dict()[k])


def test_vae_reconstructs_shapes_and_latents_are_near_unit_variance(family):
    """Held-out clips (8 x 17 frames, attribute combinations never trained on): whole-clip and shape-pixel PSNR
    (``train_vae.json`` records the shipped figures), and model-space latents at the documented scale."""
    result = evaluate_vae(family.vae)
    assert result["heldout_psnr_db"] >= 21.0, result  # a constant colour per clip scores ~18.8 dB
    assert result["heldout_shape_psnr_db"] >= 15.0, result  # backgrounds-only VAEs score ~7 dB here
    captions = [f"a white square moving up on a {bg} background" for bg in ("black", "blue", "green", "red")]
    with torch.no_grad():
        zs = family.vae.encode(torch.stack([reference_video(c) for c in captions]))
    assert 0.5 < float(to_model_space(zs).std()) < 2.5


def test_vae_draws_the_prompted_shapes(family):
    """Encode-decodes of 48 held-out clips with large shapes (the family's geometry) pass the colour, motion and
    shape probes (measured 46 / 47 / 46; the decoder before its jittered-latent runs: 47 / 46 / 47)."""
    ds = MiniVideoDataset(48, split="heldout", config=MiniVideoConfig(seed=1, geometry="large"))
    videos = torch.stack([ds[i]["video"] for i in range(len(ds))])
    with torch.no_grad():
        recon = family.vae.decode(family.vae.encode(videos), mode="untiled").clamp(-1, 1)
    checks = [prompt_checks(r, ds.spec(i).caption()) for i, r in enumerate(recon)]
    assert sum(c.colour for c in checks) >= 42 and sum(c.motion for c in checks) >= 42
    assert sum(c.shape for c in checks) >= 40


def test_teacher_was_trained_on_the_shipped_encoder(family):
    """The teacher's latents come from the shipped VAE's encoder (the decoder-only run left it bit-identical)."""
    record = json.loads((ASSETS / "train_teacher.json").read_text())
    assert record["runs"][-1]["result"]["vae_encoder_sha256"] == encoder_sha256(family.vae)


def test_teacher_follows_the_prompt_on_heldout_prompts(family):
    """The issue's bar, "shapes and motion that follow the prompt", on the decoded teacher-50 videos of held-out
    prompts: the colour of the pixels least like the prompted background is the prompted shape colour, their
    centroid moves the prompted way, and the prompted shape fits them best (the probes ``accvideo_core.demo``
    reports as "colour ok" / "motion ok" / "shape ok")."""
    prompts = heldout_prompts(6) * 2
    videos, _ = family.generate(prompts, [7] * 6 + [8] * 6, 50)
    checks = [prompt_checks(video, prompt) for video, prompt in zip(videos, prompts)]
    counts = {probe: sum(getattr(c, probe) for c in checks) for probe in PromptChecks._fields}
    assert counts["colour"] >= COLOUR_MIN and counts["motion"] >= MOTION_MIN and counts["shape"] >= SHAPE_MIN, counts


def _encode_render(family, caption: str) -> torch.Tensor:
    with torch.no_grad():
        return to_model_space(family.vae.encode(reference_video(caption)[None]))


def test_teacher_follows_the_prompted_background(family):
    """50 teacher steps at the miniature's guidance (4) on each of the 6 held-out prompts: the sample (model space)
    is nearer to the encoded render of its own caption than to the same caption with any other background in at
    least 4 of 6 (measured 6, as at guidance 6; picking among the 4-5 backgrounds by chance gets ~1)."""
    nearest = 0
    for caption in heldout_prompts(6):
        spec = parse_caption(caption)
        latent = family.sample(family.teacher, family.encode([caption]), family.noise([11]), 50)
        own = float((latent - _encode_render(family, caption)).square().mean())
        others = [float((latent - _encode_render(family, caption.replace(f"on a {spec.background} background",
                                                                        f"on a {bg} background"))).square().mean())
                  for bg in BACKGROUND_COLORS if bg != spec.background and bg != spec.color]
        nearest += own < min(others)
    assert nearest >= 4, nearest


def test_guidance_embedding_changes_the_velocity(family):
    """The guidance embedding was trained (stage 2): the velocity depends on the guidance scale."""
    text = family.encode(["a red square moving down on a black background"])
    x = family.noise([3])
    t = torch.tensor([800.0])
    with torch.no_grad():
        v1 = family.teacher(x, t, text.states, text.mask, text.pooled, 1.0)
        v6 = family.teacher(x, t, text.states, text.mask, text.pooled, 6.0)
    assert float((v6 - v1).abs().mean()) > 0.05 * float(v1.abs().mean())


def test_colour_check_can_fail(family):
    """The colour probe is not vacuous: on the renderer's own clip it names the rendered colour, and a clip of
    another colour is named differently."""
    for colour in ("red", "blue"):
        caption = f"a {colour} square moving up on a gray background"
        assert shape_region_colour(reference_video(caption), caption, frame=8)[0] == colour
    assert len(SHAPE_COLORS) > 2


@pytest.mark.parametrize("geometry_name", ["small", "large"])
def test_shape_check_names_rendered_shapes_and_can_fail(geometry_name):
    """The shape probe picks the rendered shape on each of 48 held-out renderer clips (random sizes, places and
    colours; all four shapes), and fails each clip when its caption names another shape."""
    ds = MiniVideoDataset(48, split="heldout", config=MiniVideoConfig(seed=3, geometry=geometry_name))
    assert {ds.spec(i).shape for i in range(len(ds))} == set(SHAPES)
    for i in range(len(ds)):
        item, shape = ds[i], ds.spec(i).shape
        assert prompt_checks(item["video"], item["caption"]).shape, item["caption"]
        for other in SHAPES:
            if other != shape:
                assert not prompt_checks(item["video"], item["caption"].replace(shape, other)).shape, (i, other)


def test_validate_cli_separates_a_trained_from_an_untrained_teacher(tmp_path, capsys):
    """``python -m accvideo_core.mini.validate`` (how teacher runs are chosen, on seeds the demo and tests do not
    use) scores the shipped teacher above an untrained one of the same architecture on 8 held-out prompts."""
    untrained = tmp_path / "untrained.safetensors"
    torch.manual_seed(0)
    save_transformer(HunyuanVideoTransformer3D(MINI_TRANSFORMER), untrained)
    assert validate_main([str(ASSETS / FILES["teacher"]), str(untrained), "--prompts", "8", "--threads", "1"]) == 0
    shipped, random_init = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert shipped["videos"] == random_init["videos"] == 8
    assert shipped["motion_ok"] >= random_init["motion_ok"] + 4, (shipped, random_init)  # measured 8 vs 1 (guidance 4)
    assert shipped["both_ok"] >= random_init["both_ok"] + 2, (shipped, random_init)  # measured 7 vs 1


def test_attribute_usage_shows_what_the_teacher_conditions_on(family):
    """``attribute_usage`` (``validate --usage``): swapping the background, shape colour, direction or shape of the
    captions raises the shipped teacher's flow loss on encoded held-out clips (measured +1.47 / +0.41 / +0.51 / +0.066
    at sigma 0.8, 16 clips), while an untrained teacher of the same architecture barely notices any swap
    (|change| < 0.001)."""
    trained = attribute_usage(family, clips=16, sigmas=(0.8,))["sigma_0.8"]
    torch.manual_seed(0)
    untrained_family = dataclasses.replace(family, teacher=HunyuanVideoTransformer3D(MINI_TRANSFORMER).eval())
    untrained = attribute_usage(untrained_family, clips=16, sigmas=(0.8,))["sigma_0.8"]
    for field, least in (("background", 0.2), ("color", 0.1), ("direction", 0.1), ("shape", 0.03)):
        assert trained[f"{field}_swapped_increase"] > least, trained
        assert abs(untrained[f"{field}_swapped_increase"]) < 0.01, untrained


def test_validate_cli_scores_each_guidance(capsys):
    """``--guidance`` scores one teacher at several embedded guidance values, a JSON line each."""
    assert validate_main([str(ASSETS / FILES["teacher"]), "--prompts", "2", "--guidance", "1", "6"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["guidance"] for line in lines] == [1.0, 6.0] and all(line["videos"] == 2 for line in lines)
