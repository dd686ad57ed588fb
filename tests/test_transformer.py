"""HunyuanVideo transformer: differential tests against diffusers, text padding, early exit, checkpointing, bf16."""
from __future__ import annotations

import math

import pytest
import torch

from accvideo_core.models.loading import config_from_state_dict
from accvideo_core.models.transformer_hunyuan_video import (HunyuanVideoTransformer3D, TransformerConfig,
                                                            default_rope_axes, rope_cos_sin, timestep_embedding)
from accvideo_core.testing import (diffusers_forward, diffusers_twin, randomize_, tiny_inputs, tiny_transformer,
                                   tiny_transformer_config)

pytest.importorskip("diffusers")


@pytest.mark.parametrize("case", [
    # batch of two prompts with different padding, non-square latent, per-sample guidance
    dict(overrides={}, batch=2, valid=[5, 2], frames=3, height=4, width=6, guidance=[6.0, 3.5]),
    # no guidance embedding, one padded prompt, other rope split, odd latent grid
    dict(overrides=dict(guidance_embed=False, num_heads=4, hidden_size=64, rope_axes=(4, 4, 8)), batch=1,
         valid=[4], frames=2, height=6, width=2, guidance=None),
    # no padding at all, single frame
    dict(overrides=dict(num_double_blocks=1, num_single_blocks=3), batch=2, valid=None, frames=1, height=2,
         width=4, guidance=6.0),
])
def test_matches_diffusers(case):
    model = tiny_transformer(seed=1, **case["overrides"])
    ref = diffusers_twin(model)
    inp = tiny_inputs(model.config, batch=case["batch"], valid=case["valid"], frames=case["frames"],
                      height=case["height"], width=case["width"], seed=2)
    with torch.no_grad():
        ours = model(**inp, guidance=case["guidance"])
        theirs = diffusers_forward(ref, inp, case["guidance"])
    assert ours.shape == inp["latents"].shape
    assert theirs.abs().max() > 0.5  # a meaningful signal, not a near-zero output
    assert (ours - theirs).abs().max() <= 1e-4


def test_comfy_compatible_config_matches_diffusers():
    """Head dim 128 with the released RoPE split (16, 56, 56) and vec 768: the shapes native ComfyUI builds."""
    config = tiny_transformer_config(comfy_compatible=True)
    assert (config.head_dim, config.rope_axes, config.pooled_dim, config.num_refiner_blocks) == (128, (16, 56, 56),
                                                                                                  768, 2)
    model = randomize_(HunyuanVideoTransformer3D(config), seed=3).eval()
    assert config_from_state_dict(model.state_dict()) == config  # what a loader reading shapes rebuilds
    ref = diffusers_twin(model)
    inp = tiny_inputs(config, batch=1, valid=[5], frames=2, height=4, width=4, text_len=8, seed=4)
    with torch.no_grad():
        diff = (model(**inp, guidance=6.0) - diffusers_forward(ref, inp, 6.0)).abs().max()
    assert diff <= 1e-4


def test_image_tokens_ignore_appended_padding():
    model = tiny_transformer(seed=5)
    inp = tiny_inputs(model.config, batch=1, text_len=5, seed=6)
    padded = dict(inp)
    padded["text_states"] = torch.cat((inp["text_states"], 50 * torch.randn(1, 4, model.config.text_dim)), dim=1)
    padded["text_mask"] = torch.cat((inp["text_mask"], torch.zeros(1, 4, dtype=torch.long)), dim=1)
    with torch.no_grad():
        plain = model(**inp)
        with_padding = model(**padded)
        features = model.image_features(**inp, layer=3)
        features_padded = model.image_features(**padded, layer=3)
    torch.testing.assert_close(with_padding, plain, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(**{**inp, "text_mask": None}), plain)  # no mask = every token valid
    torch.testing.assert_close(features_padded, features, atol=1e-5, rtol=1e-5)


def test_mixed_padding_batch_equals_separate_calls():
    """A batch of differently padded prompts (the key-mask path) equals one call per prompt (the gather path)."""
    model = tiny_transformer(seed=7)
    inp = tiny_inputs(model.config, batch=3, valid=[6, 2, 4], text_len=6, seed=8)
    with torch.no_grad():
        batched = model(**inp, guidance=torch.tensor([6.0, 1.0, 4.0]))
        for i, g in enumerate((6.0, 1.0, 4.0)):
            single = model(**{k: v[i:i + 1] for k, v in inp.items()}, guidance=g)
            torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)


def test_image_features_stop_early_and_match_the_forward_pass():
    model = tiny_transformer(seed=9)
    c = model.config
    inp = tiny_inputs(c, batch=2, valid=[7, 3], seed=10)
    blocks = list(model.double_blocks) + list(model.single_blocks)
    captured: dict[int, torch.Tensor] = {}
    calls: list[int] = []
    n_img = math.prod(s // p for s, p in zip(inp["latents"].shape[2:], c.patch_size))
    hooks = []
    for i, block in enumerate(blocks, start=1):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)))
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i: captured.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[:, :n_img])))
    with torch.no_grad():
        model(**inp)
        for layer in (1, c.num_double_blocks, c.num_double_blocks + 1, c.num_layers):
            calls.clear()
            feats = model.image_features(**inp, layer=layer)
            assert calls == list(range(1, layer + 1))  # nothing past `layer` runs
            grid = feats.shape[2:]
            assert feats.shape == (2, c.hidden_size, *grid)
            torch.testing.assert_close(feats.flatten(2).transpose(1, 2), captured[layer], atol=1e-6, rtol=1e-6)
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="layer must be in 1..4"):
        model.image_features(**inp, layer=c.num_layers + 1)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_transformer(seed=11).train()
    inp = tiny_inputs(model.config, batch=2, valid=[7, 4], seed=12)

    def grads():
        model.zero_grad()
        model(**inp).square().mean().backward()
        feats = model.image_features(**inp, layer=3)
        feats.mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert set(plain) == set(checkpointed) and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_frozen_teacher_features_pass_gradients_to_the_input():
    """The discriminator backpropagates through the frozen teacher into the student's latents."""
    model = tiny_transformer(seed=16).requires_grad_(False)
    inp = tiny_inputs(model.config, batch=1, valid=[5], seed=17)

    def input_grad():
        latents = inp["latents"].clone().requires_grad_(True)
        model.image_features(**{**inp, "latents": latents}, layer=3).square().mean().backward()
        return latents.grad

    plain = input_grad()
    model.enable_gradient_checkpointing()
    assert plain.abs().max() > 0
    torch.testing.assert_close(input_grad(), plain, atol=1e-6, rtol=1e-5)


def test_bf16_forward_on_cpu_close_to_fp32():
    model = tiny_transformer(seed=13)
    inp = tiny_inputs(model.config, batch=2, valid=[7, 5], seed=14)
    with torch.no_grad():
        ref = model(**inp)
        out = model.to(torch.bfloat16)(**inp)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_timestep_embedding_is_cos_sin_with_period_10000():
    t = torch.tensor([0.0, 965.5172, 6000.0])
    emb = timestep_embedding(t)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[:, :128], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(emb[:, 128:], torch.sin(t[:, None] * freqs))


def test_rope_tables_are_fp32_interleaved_per_axis():
    cos, sin = rope_cos_sin((2, 3, 4), (4, 6, 6), 256.0)
    assert cos.dtype == torch.float32 and cos.shape == (24, 16)
    torch.testing.assert_close(cos[:, 0::2], cos[:, 1::2], rtol=0, atol=0)  # pairs share a frequency
    # token (t=1, h=2, w=3): the T axis sees position 1 at frequency 1 (first channel pair)
    token = 1 * 12 + 2 * 4 + 3
    assert torch.isclose(cos[token, 0], torch.cos(torch.tensor(1.0)))
    assert torch.isclose(cos[token, 4], torch.cos(torch.tensor(2.0)))  # H axis, first pair
    assert torch.isclose(cos[token, 10], torch.cos(torch.tensor(3.0)))  # W axis, first pair


def test_config_validation_and_defaults():
    assert TransformerConfig().rope_axes == (16, 56, 56) and TransformerConfig().num_layers == 60
    assert default_rope_axes(16) == (4, 6, 6)
    with pytest.raises(ValueError, match="sum"):
        TransformerConfig(hidden_size=64, num_heads=2, rope_axes=(16, 56, 56))
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(hidden_size=100, num_heads=3)
    c = tiny_transformer_config(num_single_blocks=5)
    assert TransformerConfig.from_dict(c.to_dict()) == c


def test_bad_inputs_are_clear_errors():
    model = tiny_transformer(seed=15)
    inp = tiny_inputs(model.config, batch=1)
    with pytest.raises(ValueError, match=r"latents must be \[B, 16"):
        model(**{**inp, "latents": inp["latents"][:, :4]})
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(**{**inp, "latents": inp["latents"][..., :3]})
    with pytest.raises(ValueError, match="no valid token"):
        model(**{**inp, "text_mask": torch.zeros_like(inp["text_mask"])})
    with pytest.raises(ValueError, match="pooled must be"):
        model(**{**inp, "pooled": inp["pooled"][:, :5]})
