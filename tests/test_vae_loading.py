"""load_vae: every layout (original .pt with prefix/wrapper, ComfyUI internal names, diffusers folder, our
safetensors with config metadata), config from shapes, no-copy wrapping of in-memory weights, clear errors."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from accvideo_core import load_vae
from accvideo_core.models.key_maps import vae_comfy_internal_to_original, vae_original_to_comfy_internal
from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig
from accvideo_core.models.vae_loading import CONFIG_METADATA_KEY, config_from_state_dict, save_vae
from accvideo_core.utils.io import CheckpointError, save_safetensors, save_torch

TINY = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope="module")
def tiny() -> HunyuanVideoVAE:
    vae = HunyuanVideoVAE(TINY).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return vae


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(4))


def _same_decode(a: HunyuanVideoVAE, b: HunyuanVideoVAE, z: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a.decode(z, mode="untiled"), b.decode(z, mode="untiled"))


def test_original_pt_with_vae_prefix_and_state_dict_wrapper(tiny, latents, tmp_path):
    path = save_torch({"state_dict": {f"vae.{k}": v for k, v in tiny.state_dict().items()}}, tmp_path / "vae.pt")
    loaded = load_vae(path, norm_num_groups=4)
    assert loaded.config == TINY
    assert _same_decode(tiny, loaded, latents)


def test_safetensors_with_config_metadata_needs_no_hints(tiny, latents, tmp_path):
    loaded = load_vae(save_vae(tiny, tmp_path / "tiny_vae.safetensors"))
    assert loaded.config == TINY
    assert _same_decode(tiny, loaded, latents)


def test_recorded_config_is_validated_against_the_shapes(tiny, latents, tmp_path):
    """The config save_vae records supplies what shapes cannot show; a recorded field that contradicts the weights
    (an edited or mislabelled file) is an error naming it, not a silent override."""
    weights = tiny.state_dict()
    hidden_only = save_safetensors(weights, tmp_path / "groups.safetensors",
                                   metadata={CONFIG_METADATA_KEY: json.dumps({"norm_num_groups": 4})})
    assert load_vae(hidden_only).config == TINY
    for field, wrong in (("layers_per_block", 2), ("block_out_channels", [8, 16, 16, 32]), ("has_encoder", False)):
        recorded = {**TINY.to_dict(), field: wrong}
        path = save_safetensors(weights, tmp_path / f"{field}.safetensors",
                                metadata={CONFIG_METADATA_KEY: json.dumps(recorded)})
        with pytest.raises(CheckpointError, match=f"disagrees with their shapes.*{field}"):
            load_vae(path)
    unknown = save_safetensors(weights, tmp_path / "unknown.safetensors",
                               metadata={CONFIG_METADATA_KEY: json.dumps({**TINY.to_dict(), "ch_mult": [1, 2]})})
    with pytest.raises(CheckpointError, match="unknown VAEConfig fields"):
        load_vae(unknown)


def test_comfyui_repackaged_file_layout(tiny, latents, tmp_path):
    # ComfyUI's repackaged hunyuan_video_vae_bf16.safetensors carries the original names.
    path = save_safetensors({k: v.to(torch.bfloat16) for k, v in tiny.state_dict().items()},
                            tmp_path / "hunyuan_video_vae_bf16.safetensors")
    loaded = load_vae(path, norm_num_groups=4)
    assert loaded.dtype == torch.bfloat16
    assert load_vae(path, norm_num_groups=4, dtype=torch.float32).dtype == torch.float32


def test_diffusers_folder(latents, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.AutoencoderKLHunyuanVideo(latent_channels=16, block_out_channels=(8, 16, 16, 16),
                                              layers_per_block=1, norm_num_groups=4).eval()
    ref.save_pretrained(tmp_path / "pipe" / "vae")
    loaded = load_vae(tmp_path / "pipe")  # config.json supplies norm_num_groups
    assert loaded.config == TINY
    with torch.no_grad():
        assert torch.equal(loaded.post_quant_conv.weight, ref.post_quant_conv.weight)
    config_json = tmp_path / "pipe" / "vae" / "config.json"
    config_json.write_text(json.dumps({**json.loads(config_json.read_text()), "latent_channels": 4}))
    with pytest.raises(CheckpointError, match="latent_channels 4 recorded, 16 in the weights"):
        load_vae(tmp_path / "pipe")


def test_comfyui_internal_names_wrap_without_copy(tiny, latents):
    internal = {f"first_stage_model.{k}": v for k, v in vae_original_to_comfy_internal(tiny.state_dict()).items()}
    assert internal["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1, 1)
    loaded = load_vae(internal, norm_num_groups=4, device=None)
    pointers = {v.data_ptr() for v in internal.values()}
    assert all(p.data_ptr() in pointers for p in loaded.parameters())
    assert _same_decode(tiny, loaded, latents)
    # also from a module that holds the weights (ComfyUI's VAE.first_stage_model)
    holder = type("ComfyVAE", (), {})()
    holder.first_stage_model = tiny
    assert load_vae(holder, device=None).decoder.conv_in.conv.weight is not None


def test_comfyui_internal_names_of_the_released_vae():
    """Our names mapped to ComfyUI's: the module tree of comfy.ldm.modules.diffusionmodules.model with
    conv3d=True, ch 128, ch_mult [1, 2, 4, 4], 2 res blocks (248 tensors)."""
    with torch.device("meta"):
        vae = HunyuanVideoVAE(VAEConfig())
    internal = vae_original_to_comfy_internal(vae.state_dict())
    assert len(internal) == 248
    expected = {
        "decoder.conv_in.conv.weight": (512, 16, 3, 3, 3),
        "decoder.mid.block_1.norm1.weight": (512,),
        "decoder.mid.attn_1.norm.weight": (512,),
        "decoder.mid.attn_1.q.weight": (512, 512, 1, 1, 1),
        "decoder.mid.attn_1.proj_out.bias": (512,),
        "decoder.mid.block_2.conv2.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.3.block.2.conv1.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.3.upsample.conv.conv.weight": (512, 512, 3, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.conv.weight": (256, 512, 1, 1, 1),
        "decoder.up.0.block.0.nin_shortcut.conv.weight": (128, 256, 1, 1, 1),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.conv.weight": (3, 128, 3, 3, 3),
        "encoder.down.0.downsample.conv.conv.weight": (128, 128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.conv.weight": (256, 128, 1, 1, 1),
        "encoder.mid.attn_1.k.weight": (512, 512, 1, 1, 1),
        "encoder.norm_out.bias": (512,),
        "encoder.conv_out.conv.weight": (32, 512, 3, 3, 3),
        "quant_conv.weight": (32, 32, 1, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1, 1),
    }
    assert {k: tuple(internal[k].shape) for k in expected} == expected
    assert "decoder.up.0.upsample.conv.conv.weight" not in internal  # the last up level has no upsampler
    back = vae_comfy_internal_to_original(internal)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae.state_dict().items()}
    assert config_from_state_dict(back) == VAEConfig()


def test_decoder_only_checkpoint(tiny, latents):
    decoder_only = {k: v for k, v in tiny.state_dict().items()
                    if not (k.startswith("encoder.") or k.startswith("quant_conv."))}
    loaded = load_vae(decoder_only, norm_num_groups=4)
    assert not loaded.config.has_encoder
    assert _same_decode(tiny, loaded, latents)
    with pytest.raises(RuntimeError, match="decoder-only"):
        loaded.encode(torch.zeros(1, 3, 1, 16, 16))


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no HunyuanVideo VAE"):
        load_vae({"double_blocks.0.img_attn_qkv.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        load_vae(tiny.state_dict())  # widths not multiples of 32 and no config recorded
    broken = dict(tiny.state_dict())
    del broken["decoder.up_blocks.1.resnets.0.conv2.conv.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        load_vae(broken, norm_num_groups=4)
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="diffusers"):
        load_vae(tmp_path / "empty_dir")


@pytest.mark.integration
def test_wraps_comfyui_autoencoder_without_copy(comfyui_path):
    """Build ComfyUI's own HunyuanVideo VAE module (released widths, random weights), wrap it, decode a single
    latent frame both ways (ComfyUI omits the frame-causal mask, which only matters for > 1 latent frame)."""
    sys.path.insert(0, str(comfyui_path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                "conv3d": True, "time_compress": 4}
    comfy_vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=16).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in comfy_vae.named_parameters():
            if "norm" in name:
                p.copy_((1 + 0.2 * torch.randn(p.shape, generator=gen)) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.endswith("bias") else
                                                               (1.0 / p[0].numel()) ** 0.5))
    holder = type("VAE", (), {"first_stage_model": comfy_vae})()
    ours = load_vae(holder, device=None)
    assert ours.config == VAEConfig()
    storages = {p.untyped_storage().data_ptr() for p in comfy_vae.parameters()}
    assert all(p.untyped_storage().data_ptr() in storages for p in ours.parameters())
    z = torch.randn(1, 16, 1, 2, 2, generator=gen)
    with torch.no_grad():
        expected = comfy_vae.decode(z)
        got = ours.decode(z, mode="untiled")
    assert (got - expected).abs().max().item() <= 1e-4
