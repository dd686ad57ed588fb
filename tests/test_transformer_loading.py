"""Key layouts, checkpoint loading (original / prefixed / diffusers / fp8), error messages, attention dispatch."""
from __future__ import annotations

import pytest
import torch

from accvideo_core import load_transformer
from accvideo_core.models import attention as attn
from accvideo_core.models.key_maps import diffusers_to_original, original_to_diffusers
from accvideo_core.models.loading import FP8Linear, config_from_state_dict, detect_family, save_transformer
from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig
from accvideo_core.testing import (diffusers_transformer, randomize_, tiny_inputs, tiny_transformer,
                                   tiny_transformer_config)
from accvideo_core.utils.io import CheckpointError, save_safetensors, save_torch

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(seed=21)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_inputs(model.config, batch=2, valid=[7, 4], seed=22)


def _out(m, inputs):
    with torch.no_grad():
        return m(**inputs)


def test_state_dict_is_the_original_layout(model):
    keys = set(model.state_dict())
    for key in ("img_in.proj.weight", "time_in.mlp.0.weight", "time_in.mlp.2.bias", "guidance_in.mlp.2.weight",
                "vector_in.in_layer.weight", "vector_in.out_layer.bias", "txt_in.input_embedder.weight",
                "txt_in.t_embedder.mlp.0.weight", "txt_in.c_embedder.linear_2.bias",
                "txt_in.individual_token_refiner.blocks.1.norm1.weight",
                "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
                "txt_in.individual_token_refiner.blocks.0.self_attn_proj.bias",
                "txt_in.individual_token_refiner.blocks.0.mlp.fc2.weight",
                "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.weight",
                "double_blocks.1.img_mod.linear.weight", "double_blocks.0.txt_mod.linear.bias",
                "double_blocks.0.img_attn_qkv.weight", "double_blocks.0.img_attn_q_norm.weight",
                "double_blocks.0.txt_attn_k_norm.weight", "double_blocks.0.img_attn_proj.weight",
                "double_blocks.0.txt_mlp.fc1.bias", "single_blocks.1.linear1.weight", "single_blocks.0.linear2.bias",
                "single_blocks.0.q_norm.weight", "single_blocks.0.k_norm.weight",
                "single_blocks.0.modulation.linear.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.bias"):
        assert key in keys, key
    assert not [k for k in keys if "norm1." in k and "refiner" not in k]  # parameter-free LayerNorms have no keys


def test_diffusers_original_diffusers_round_trip_is_bit_exact():
    config = tiny_transformer_config(hidden_size=48, num_heads=3, rope_axes=(4, 6, 6))
    ref = randomize_(diffusers_transformer(config), seed=23)
    sd = ref.state_dict()
    back = original_to_diffusers(diffusers_to_original(sd))
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_final_layer_shift_scale_reorder_and_linear1_split(model):
    sd = model.state_dict()
    h = model.config.hidden_size
    conv = original_to_diffusers(sd)
    ada = sd["final_layer.adaLN_modulation.1.weight"]
    assert torch.equal(conv["norm_out.linear.weight"][:h], ada[h:])  # diffusers: scale first
    lin1 = sd["single_blocks.0.linear1.weight"]
    assert torch.equal(conv["single_transformer_blocks.0.attn.to_k.weight"], lin1[h:2 * h])
    assert torch.equal(conv["single_transformer_blocks.0.proj_mlp.weight"], lin1[3 * h:])


def test_config_is_read_from_shapes(model):
    assert config_from_state_dict(model.state_dict()) == model.config
    no_guidance = tiny_transformer(seed=0, guidance_embed=False, num_double_blocks=0, num_single_blocks=3)
    assert config_from_state_dict(no_guidance.state_dict()) == no_guidance.config


def test_pt_wrappers_prefixes_and_diffusers_layout_load_identically(model, inputs, tmp_path):
    ref = _out(model, inputs)
    sd = model.state_dict()
    save_torch({"module": sd}, tmp_path / "wrapped.pt")
    save_torch({"ema": sd}, tmp_path / "ema.pt")
    save_safetensors({"model.diffusion_model." + k: v for k, v in sd.items()}, tmp_path / "comfy.safetensors")
    save_safetensors(original_to_diffusers(sd), tmp_path / "diffusers.safetensors")
    for name in ("wrapped.pt", "ema.pt", "comfy.safetensors", "diffusers.safetensors"):
        loaded = load_transformer(tmp_path / name)
        assert loaded.config == model.config, name
        assert torch.equal(_out(loaded, inputs), ref), name
    assert torch.equal(_out(load_transformer({"diffusion_model." + k: v for k, v in sd.items()}), inputs), ref)


def test_read_config_takes_the_architecture_from_the_header(model, tmp_path):
    """``read_config``: the config ``load_transformer`` reads, from a safetensors header alone (original, ComfyUI
    prefix, diffusers layout, fp8_scaled), and from a whole read for other formats."""
    from accvideo_core.models.loading import read_config

    sd = model.state_dict()
    fp8 = {k: v.to(FP8) if v.dim() == 2 else v for k, v in sd.items()}
    fp8["single_blocks.0.linear1.scale_weight"] = torch.tensor(0.5)
    files = {"original.safetensors": sd, "comfy.safetensors": {"model.diffusion_model." + k: v for k, v in sd.items()},
             "diffusers.safetensors": original_to_diffusers(sd), "fp8.safetensors": fp8}
    for name, tensors in files.items():
        save_safetensors(tensors, tmp_path / name)
        assert read_config(tmp_path / name) == model.config, name
    save_torch({"module": sd}, tmp_path / "wrapped.pt")
    assert read_config(tmp_path / "wrapped.pt") == model.config
    save_safetensors({"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3, 3)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="vae.safetensors: .*not a HunyuanVideo transformer: detected a VAE"):
        read_config(tmp_path / "vae.safetensors")


def _comfy_internal_names(key: str) -> str:
    """ComfyUI's own renaming of original HunyuanVideo keys on load (comfy/supported_models.py, v0.3.x)."""
    key = key.replace("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer.").replace(
        "txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer.")
    key = key.replace("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer.").replace(
        "txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer.")
    key = key.replace("_mod.linear.", "_mod.lin.").replace("_attn_qkv.", "_attn.qkv.")
    key = key.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.2.")
    key = key.replace("_attn_q_norm.weight", "_attn.norm.query_norm.scale").replace(
        "_attn_k_norm.weight", "_attn.norm.key_norm.scale")
    key = key.replace(".q_norm.weight", ".norm.query_norm.scale").replace(".k_norm.weight", ".norm.key_norm.scale")
    key = key.replace("_attn_proj.", "_attn.proj.")
    key = key.replace(".modulation.linear.", ".modulation.lin.")
    return key.replace("_in.mlp.2.", "_in.out_layer.").replace("_in.mlp.0.", "_in.in_layer.")


def test_comfyui_internal_names_load(model, inputs):
    internal = {"model.model." + _comfy_internal_names(k): v for k, v in model.state_dict().items()}
    assert "model.model.double_blocks.0.img_attn.norm.query_norm.scale" in internal
    assert "model.model.time_in.in_layer.weight" in internal
    loaded = load_transformer(internal)
    assert loaded.config == model.config and torch.equal(_out(loaded, inputs), _out(model, inputs))


def test_saved_file_keeps_its_rope_axes(tmp_path):
    model = tiny_transformer(seed=24, rope_axes=(2, 6, 8))
    path = save_transformer(model, tmp_path / "m.safetensors")
    assert load_transformer(path).config.rope_axes == (2, 6, 8)
    assert load_transformer(model.state_dict(), rope_axes=(2, 6, 8)).config == model.config


def test_fp8_weights_stay_fp8_and_compute_in_the_compute_dtype(model, inputs, tmp_path):
    sd = model.state_dict()
    sd8 = {k: v.to(FP8) if v.dim() == 2 else v for k, v in sd.items()}
    save_safetensors(sd8, tmp_path / "fp8.safetensors")
    loaded = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    qkv = loaded.double_blocks[0].img_attn_qkv
    assert isinstance(qkv, FP8Linear) and qkv.weight.dtype == FP8 and qkv.bias.dtype == torch.float32
    assert loaded.dtype == torch.float32
    dequantized = load_transformer({k: v.float() for k, v in sd8.items()})
    torch.testing.assert_close(_out(loaded, inputs), _out(dequantized, inputs), atol=1e-5, rtol=1e-5)
    assert load_transformer(tmp_path / "fp8.safetensors").dtype == torch.bfloat16  # default compute dtype

    scaled = dict(sd8)
    scale = torch.tensor(0.5)
    w = sd["single_blocks.0.linear1.weight"]
    scaled["single_blocks.0.linear1.weight"] = (w / scale).to(FP8)
    scaled["single_blocks.0.linear1.scale_weight"] = scale
    scaled["scaled_fp8"] = torch.zeros(0, dtype=FP8)
    loaded = load_transformer({"model.diffusion_model." + k: v for k, v in scaled.items()}, dtype=torch.float32)
    expected = dict(sd8, **{"single_blocks.0.linear1.weight": (w / scale).to(FP8).float() * scale})
    torch.testing.assert_close(_out(loaded, inputs),
                               _out(load_transformer({k: v.float() for k, v in expected.items()}), inputs),
                               atol=1e-5, rtol=1e-5)
    saved = save_transformer(loaded, tmp_path / "scaled.safetensors")  # keeps fp8 + scale, adds ComfyUI's marker
    from safetensors.torch import load_file
    on_disk = load_file(str(saved))
    assert "scaled_fp8" in on_disk and on_disk["single_blocks.0.linear1.weight"].dtype == FP8
    assert torch.equal(_out(load_transformer(saved, dtype=torch.float32), inputs), _out(loaded, inputs))


def test_fp8_linear_under_autocast_up_casts_to_the_autocast_dtype(monkeypatch):
    """Inside autocast (the trainer on CUDA) the fp8 weight goes straight to bf16, the dtype the matmul runs in:
    the same output as a bf16 layer of the same values, and no fp32 copy of the weight on the way."""
    from accvideo_core.models import loading

    layer = torch.nn.Linear(16, 8)
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(FP8), requires_grad=False)
    layer.__class__ = FP8Linear
    layer.register_buffer("scale_weight", None)
    plain = torch.nn.Linear(16, 8).to(torch.bfloat16)
    plain.load_state_dict({"weight": layer.weight.to(torch.bfloat16), "bias": layer.bias.to(torch.bfloat16)})
    x = torch.randn(3, 16)
    seen = []
    up_cast = loading.dequantized
    monkeypatch.setattr(loading, "dequantized", lambda w, s, dtype: seen.append(dtype) or up_cast(w, s, dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = layer(x), plain(x)
    assert seen == [torch.bfloat16] and got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert layer(x).dtype == torch.float32 and seen[-1] == torch.float32   # outside autocast: the input's dtype


def test_fp8_base_layout_scales_each_layer(model):
    """``block_linears_layout`` + ``apply_fp8_layout`` (the trainer's ``model.fp8_base``): every block linear in
    e4m3fn with a per-layer scale that maps its largest magnitude to 448; on weights of real-model size (std 0.01)
    that halves the rounding error of the unscaled cast, and a zero layer keeps scale 1."""
    from accvideo_core.models.loading import apply_fp8_layout, block_linears_layout, dequantized, quantize_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, generator=g) * 0.01
    q, scale = quantize_fp8(w, FP8)
    assert float(dequantized(q, None, torch.float32).abs().max()) == 448.0
    scaled = (dequantized(q, scale, torch.float32) - w).norm() / w.norm()
    unscaled = (w.to(FP8).float() - w).norm() / w.norm()
    assert scaled < 0.03 and unscaled > 1.8 * scaled   # measured: 0.0265 vs 0.0565
    assert float(quantize_fp8(torch.zeros(4, 4), FP8)[1]) == 1.0
    m = tiny_transformer(seed=2)
    before = {n: l.weight.detach().clone() for n, l in m.named_modules() if isinstance(l, torch.nn.Linear)}
    apply_fp8_layout(m, block_linears_layout(m))
    for name, layer in m.named_modules():
        if name.startswith(("double_blocks.", "single_blocks.")) and name in before:
            assert isinstance(layer, FP8Linear) and layer.weight.dtype == FP8 and layer.scale_weight.shape == ()
            # to nearest: half a mantissa step (2^-4 relative), or half the smallest subnormal step (2^-10 x scale)
            torch.testing.assert_close(dequantized(layer.weight, layer.scale_weight, torch.float32), before[name],
                                       rtol=2 ** -4, atol=2 ** -10 * float(layer.scale_weight))
        elif name in before:
            assert torch.equal(layer.weight, before[name])   # embedders, final layer: untouched


def test_storage_dtype_fp8_quantizes_block_linears(model, inputs):
    loaded = load_transformer(model.state_dict(), dtype=torch.float32, storage_dtype=FP8)
    assert loaded.single_blocks[1].linear2.weight.dtype == FP8
    assert loaded.txt_in.input_embedder.weight.dtype == torch.float32  # small embedders stay in compute dtype
    out = _out(loaded, inputs)
    ref = _out(model, inputs)
    assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 0.2


def test_wrong_and_partial_files_name_the_problem(model, tmp_path):
    sd = model.state_dict()
    partial = {k: v for k, v in sd.items() if k != "double_blocks.1.txt_mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"original layout.*missing keys, first: \['double_blocks.1.txt_mlp"):
        load_transformer(partial)
    with pytest.raises(CheckpointError, match=r"unexpected keys, first: \['extra.weight'\]"):
        load_transformer({**sd, "extra.weight": torch.zeros(2)})
    bad_shape = dict(sd, **{"double_blocks.0.img_attn_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_transformer(bad_shape)
    with pytest.raises(CheckpointError, match="detected a VAE.*expected an original-layout"):
        load_transformer({"decoder.conv_in.conv.weight": torch.zeros(4, 16, 3, 3, 3)})
    with pytest.raises(CheckpointError, match="detected a LoRA"):
        load_transformer({"diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(CheckpointError, match="Wan 2.x"):
        load_transformer({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    diff = original_to_diffusers(sd)
    del diff["transformer_blocks.0.attn.to_k.weight"]
    with pytest.raises(CheckpointError, match="diffusers layout.*to_k"):
        load_transformer(diff)
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="unknown checkpoint type"):
        load_transformer(tmp_path / "x.gguf")


def test_released_architecture_must_be_complete():
    """A 13B-width file (hidden 3072) with blocks cut off is partial, not a smaller model (meta tensors: no RAM)."""
    with torch.device("meta"):
        full = HunyuanVideoTransformer3D(TransformerConfig()).state_dict()
    assert detect_family(full).startswith("HunyuanVideo transformer (original")
    assert config_from_state_dict(full) == TransformerConfig()
    cut = {k: v for k, v in full.items() if not k.startswith(("double_blocks.1", "single_blocks.3"))}
    with pytest.raises(CheckpointError, match="20 double \\+ 40 single blocks, but the file has 10 \\+ 30"):
        load_transformer(cut)


def test_attention_dispatcher():
    q, k, v = (torch.randn(2, 5, 3, 8) for _ in range(3))
    ref = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / 8 ** 0.5, -1)
    expected = torch.einsum("bhlm,bmhd->blhd", ref, v).reshape(2, 5, 24)
    torch.testing.assert_close(attn.attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    masked = attn.attention(q, k, v, key_mask)
    torch.testing.assert_close(masked[:1], attn.attention(q[:1], k[:1, :3], v[:1, :3]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attn.set_attention_backend("xformers2")
    for name in ("flash", "sage"):
        if not attn.is_available(name):
            with pytest.raises(ImportError, match="pip install"):
                attn.set_attention_backend(name)
    previous = attn.get_attention_backend()
    attn.set_attention_backend("auto")  # on CPU tensors 'auto' runs SDPA
    try:
        torch.testing.assert_close(attn.attention(q, k, v), expected, atol=1e-5, rtol=1e-5)
    finally:
        attn.set_attention_backend(previous)


def test_attention_backend_choice(monkeypatch):
    q = torch.randn(1, 4, 2, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert attn._pick("flash", q, None) == "sdpa"  # CPU fp32: the CUDA kernels cannot run, SDPA does
    monkeypatch.setattr(attn, "_kernel_can_run", lambda q: True)
    monkeypatch.setattr(attn, "is_available", lambda name: name == "sage")
    assert attn._pick("auto", q, None) == "sage"  # flash missing -> sage
    assert attn._pick("auto", q, mask) == "sdpa"  # sage has no masks
    monkeypatch.setattr(attn, "is_available", lambda name: True)
    assert attn._pick("flash", q, None) == "flash"
    assert attn._pick("auto", q, mask) == "flash_varlen"
    assert attn._pick("flash", q, mask[:, None].expand(1, 4, 4)) == "sdpa"  # per-query masks: SDPA
    monkeypatch.setattr(attn, "is_available", lambda name: False)
    assert attn._pick("auto", q, None) == "sdpa"


def test_flash_varlen_packing(monkeypatch):
    """The varlen path packs each row's valid tokens into one sequence (checked with a torch stand-in kernel)."""
    import sys
    import types

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        outs = []
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            outs.append(attn.attention(q[None, start:end], k[None, start:end], v[None, start:end],
                                       backend="sdpa").view(end - start, *q.shape[1:]))
        return torch.cat(outs)

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = varlen
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(attn, "_kernel_can_run", lambda q: True)
    monkeypatch.setattr(attn, "is_available", lambda name: True)
    q, k, v = (torch.randn(2, 6, 3, 8) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn.attention(q, k, v, mask, backend="flash").view(2, 6, 3, 8)
    torch.testing.assert_close(out[0, :4].reshape(4, 24), attn.attention(q[:1, :4], k[:1, :4], v[:1, :4],
                                                                       backend="sdpa")[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[1].reshape(6, 24), attn.attention(q[1:], k[1:], v[1:], backend="sdpa")[0],
                               atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0, 4:], torch.zeros_like(out[0, 4:]))


def test_cli_info_and_convert(model, inputs, tmp_path, capsys):
    from accvideo_core.models.loading import main

    src = save_safetensors({"model.diffusion_model." + k: v for k, v in original_to_diffusers(model.state_dict()).items()},
                           tmp_path / "diffusers.safetensors")
    main(["info", str(src)])
    printed = capsys.readouterr().out
    assert "diffusers layout" in printed and '"num_single_blocks": 2' in printed
    main(["convert", str(src), str(tmp_path / "orig.safetensors"), "--fp8"])
    converted = load_transformer(tmp_path / "orig.safetensors", dtype=torch.float32)
    # every Linear in fp8 with its own scale (the file is read the same way by ComfyUI), the rest in fp32
    assert converted.single_blocks[0].linear1.weight.dtype == FP8 and converted.single_blocks[0].linear1.scale_weight
    assert converted.txt_in.input_embedder.weight.dtype == FP8 and converted.img_in.proj.weight.dtype == torch.float32
    expected = load_transformer(model.state_dict(), dtype=torch.float32, storage_dtype=FP8)
    expected = load_transformer(save_transformer(expected, tmp_path / "expected.safetensors"), dtype=torch.float32)
    assert torch.equal(_out(converted, inputs), _out(expected, inputs))
    out, ref = _out(converted, inputs), _out(model, inputs)
    assert (out - ref).norm() / ref.norm() < 0.1


def test_stored_config_is_validated_against_the_tensors(tmp_path):
    """A config written into a checkpoint is checked on load: a stale or broken one is refused, naming the field."""
    import json

    from accvideo_core.models.loading import CONFIG_METADATA_KEY

    model = tiny_transformer(seed=25, rope_axes=(2, 6, 8))
    sd = model.state_dict()
    good = model.config.to_dict()
    for field, value in (("num_double_blocks", 3), ("text_dim", 99), ("guidance_embed", not good["guidance_embed"]),
                         ("mlp_ratio", 2.0)):
        path = save_safetensors(sd, tmp_path / f"{field}.safetensors",
                                metadata={CONFIG_METADATA_KEY: json.dumps({**good, field: value})})
        with pytest.raises(CheckpointError, match=f"disagrees with its tensors: {field} "):
            load_transformer(path)
    for text in ("{not json", "[1, 2]", json.dumps({**good, "depth": 3}), json.dumps({**good, "rope_axes": [2, 2, 2]})):
        path = save_safetensors(sd, tmp_path / "broken.safetensors", metadata={CONFIG_METADATA_KEY: text})
        with pytest.raises(CheckpointError, match="is not a valid transformer config"):
            load_transformer(path)
    # a file written by save_transformer loads; an explicit rope_axes overrides the stored one
    path = save_transformer(model, tmp_path / "ok.safetensors")
    assert load_transformer(path).config == model.config
    assert load_transformer(path, rope_axes=(4, 4, 8)).config.rope_axes == (4, 4, 8)


def test_comfy_internal_names_have_one_table_both_ways():
    from accvideo_core.lora import comfy_names
    from accvideo_core.models import key_maps

    # ComfyUI 0.3.64's names for a few keys, written out by hand (the spec the table must reproduce)
    spec = {
        "double_blocks.0.img_attn_qkv.weight": "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.1.txt_mod.linear.bias": "double_blocks.1.txt_mod.lin.bias",
        "double_blocks.0.img_mlp.fc2.weight": "double_blocks.0.img_mlp.2.weight",
        "double_blocks.0.txt_attn_k_norm.weight": "double_blocks.0.txt_attn.norm.key_norm.scale",
        "single_blocks.1.q_norm.weight": "single_blocks.1.norm.query_norm.scale",
        "single_blocks.0.modulation.linear.weight": "single_blocks.0.modulation.lin.weight",
        "time_in.mlp.0.weight": "time_in.in_layer.weight",
        "guidance_in.mlp.2.bias": "guidance_in.out_layer.bias",
        "txt_in.t_embedder.mlp.0.weight": "txt_in.t_embedder.in_layer.weight",
        "txt_in.c_embedder.linear_2.weight": "txt_in.c_embedder.out_layer.weight",
        "txt_in.individual_token_refiner.blocks.1.mlp.fc1.weight": "txt_in.individual_token_refiner.blocks.1.mlp.0.weight",
        "vector_in.in_layer.weight": "vector_in.in_layer.weight",
        "img_in.proj.weight": "img_in.proj.weight",
    }
    for original, internal in spec.items():
        assert key_maps.original_to_comfy_key(original) == comfy_names.to_comfy_key(original) == internal
        assert key_maps.comfy_to_original_key(internal) == original
    sd = tiny_transformer(seed=2).state_dict()
    internal = {key_maps.original_to_comfy_key(k): v for k, v in sd.items()}
    assert len(internal) == len(sd) and key_maps.comfy_internal_to_original(internal).keys() == sd.keys()


_SCALED_PROBE = r'''
model = comfy.sd.load_diffusion_model(ARGS[0])
dm = model.model.diffusion_model
out = {name: (m.weight.float() * m.scale_weight.float()).contiguous() for name, m in dm.named_modules()
       if isinstance(m, torch.nn.Linear) and getattr(m, "scale_weight", None) is not None}
save_file(out, ARGS[1])
print("PROBE" + json.dumps({"linears": sum(isinstance(m, torch.nn.Linear) for m in dm.modules()),
                            "scaled": len(out)}))
'''


@pytest.mark.integration
def test_native_comfyui_reads_our_fp8_scaled_weights(tmp_path, comfyui_path):
    """A file of ``convert --fp8`` (``load_transformer(storage_dtype=fp8)`` + ``save_transformer``): native ComfyUI
    finds a scale for every Linear and its effective weights (fp8 x scale) equal ours exactly."""
    import json

    from accvideo_core.lora import comfy_names
    from accvideo_core.testing import dequantized_state
    from accvideo_core.utils.io import read_state_dict
    from safetensors.torch import load_file
    from tests.integration.comfy_probe import run_probe

    model = tiny_transformer(seed=3, comfy_compatible=True)
    path = save_transformer(load_transformer(model.state_dict(), dtype=torch.float32, storage_dtype=FP8),
                            tmp_path / "fp8_scaled.safetensors")
    ours = dequantized_state({k: v for k, v in read_state_dict(path).items() if k != "scaled_fp8"})
    run = run_probe(_SCALED_PROBE, str(comfyui_path), str(path), str(tmp_path / "effective.safetensors"),
                    folder=tmp_path, timeout=600)
    report = json.loads(run.stdout.split("PROBE", 1)[1])
    theirs = load_file(tmp_path / "effective.safetensors")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert report["scaled"] == report["linears"] == len(theirs)
    assert len(theirs) == len(linears)   # every Linear scaled, embedders and final layer included
    for name in linears:
        comfy = comfy_names.to_comfy_key(f"{name}.weight").removesuffix(".weight")
        assert torch.equal(theirs[comfy], ours[f"{name}.weight"]), name
