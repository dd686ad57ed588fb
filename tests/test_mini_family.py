"""The shipped miniature HunyuanVideo family: files, sizes, loaders, and cheap checks that its teacher follows the
prompt on held-out prompts it never saw in training and that its guidance embedding is trained."""
from __future__ import annotations

import pytest
import torch

from accvideo_core.latents import to_model_space
from accvideo_core.mini import TinyTextEncoder, TinyTextEncoderConfig
from accvideo_core.demo import heldout_prompts
from accvideo_core.mini.data import BACKGROUND_COLORS, SHAPE_COLORS, parse_caption
from accvideo_core.mini.family import ASSETS, FILES, load_family, reference_video, shape_region_colour
from accvideo_core.mini.train_teacher import MINI_TRANSFORMER
from accvideo_core.mini.train_vae import MINI_VAE


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


def test_vae_reconstructs_better_than_the_clip_mean_and_latents_are_near_unit_variance(family):
    """The tiny VAE is weak (docs/demo.md: ~17 dB); this pins that it beats the best constant-colour-per-clip
    guess and that model-space latents have the documented scale."""
    caption = "a yellow circle moving down on a blue background"
    video = reference_video(caption)[None]
    with torch.no_grad():
        z = family.vae.encode(video)
        recon = family.vae.decode(z, mode="untiled").clamp(-1, 1)
    mse = float(((recon - video) / 2).square().mean())
    flat = float(((video.mean(dim=(2, 3, 4), keepdim=True) - video) / 2).square().mean())
    assert mse < flat, (mse, flat)
    captions = [f"a white square moving up on a {bg} background" for bg in ("black", "blue", "green", "red")]
    with torch.no_grad():
        zs = family.vae.encode(torch.stack([reference_video(c) for c in captions]))
    assert 0.5 < float(to_model_space(zs).std()) < 2.5  # across clips (train_vae.json: 1.64 on held-out clips)


def _encode_render(family, caption: str) -> torch.Tensor:
    with torch.no_grad():
        return to_model_space(family.vae.encode(reference_video(caption)[None]))


@pytest.mark.parametrize("index", [0, 4])
def test_teacher_follows_the_prompted_background(family, index):
    """50 teacher steps at guidance 6 on a held-out prompt: the sample (model space) is closer to the encoded
    render of its own caption than to the average of the same caption with each other background. (What the
    shipped family does NOT yet do reliably - the shape's colour and motion - is documented in docs/demo.md.)"""
    caption = heldout_prompts(6)[index]
    spec = parse_caption(caption)
    latent = family.sample(family.teacher, family.encode([caption]), family.noise([11]), 50)
    own = float((latent - _encode_render(family, caption)).square().mean())
    others = [float((latent - _encode_render(family, caption.replace(f"on a {spec.background} background",
                                                                    f"on a {bg} background"))).square().mean())
              for bg in BACKGROUND_COLORS if bg != spec.background and bg != spec.color]
    assert own < 0.5 * sum(others) / len(others), (own, others)


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
