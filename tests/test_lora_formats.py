"""LoRA file formats: each format written by hand, read by our loader, merged, and compared with
``W + strength * (alpha / rank) * B @ A`` computed directly in the test (independent row/name tables)."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from accvideo_core.lora import LoraFormatError, LoraStack, comfy_patches, load_lora, merge_into_state_dict
from accvideo_core.lora import comfy_names
from accvideo_core.testing import tiny_transformer

H = 32  # hidden size of the tiny model
STRENGTH = 0.7

# original module -> ComfyUI internal name, written out by hand from ComfyUI 0.3.64's conversion
COMFY_INTERNAL = {
    "img_in.proj": "img_in.proj",
    "time_in.mlp.0": "time_in.in_layer",
    "guidance_in.mlp.2": "guidance_in.out_layer",
    "txt_in.t_embedder.mlp.0": "txt_in.t_embedder.in_layer",
    "txt_in.c_embedder.linear_1": "txt_in.c_embedder.in_layer",
    "txt_in.individual_token_refiner.blocks.1.self_attn_qkv": "txt_in.individual_token_refiner.blocks.1.self_attn.qkv",
    "txt_in.individual_token_refiner.blocks.0.mlp.fc2": "txt_in.individual_token_refiner.blocks.0.mlp.2",
    "double_blocks.0.img_attn_qkv": "double_blocks.0.img_attn.qkv",
    "double_blocks.1.img_mlp.fc1": "double_blocks.1.img_mlp.0",
    "double_blocks.1.txt_mod.linear": "double_blocks.1.txt_mod.lin",
    "double_blocks.0.txt_attn_proj": "double_blocks.0.txt_attn.proj",
    "single_blocks.1.linear1": "single_blocks.1.linear1",
    "single_blocks.0.modulation.linear": "single_blocks.0.modulation.lin",
    "final_layer.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
}


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny_transformer(seed=1).state_dict().items()}


def _factors(sd, rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module -> (up, down, alpha) for every module of COMFY_INTERNAL (conv factors keep kernel dims)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, module in enumerate(COMFY_INTERNAL):
        w = sd[f"{module}.weight"]
        up = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=gen) * 0.1
        down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.1
        out[module] = (up, down, float(rank + i))  # alpha differs per module
    return out


def _expected(sd, factors, strength, *, use_alpha=True) -> dict[str, torch.Tensor]:
    out = dict(sd)
    for module, (up, down, alpha) in factors.items():
        w = sd[f"{module}.weight"]
        scale = alpha / down.shape[0] if use_alpha else 1.0
        out[f"{module}.weight"] = w + strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    return out


def _write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _assert_matches(got, want):
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def _formats(factors):
    """format name -> (tensors, uses alpha)"""
    comfy_orig, comfy_internal, pipe, kohya = {}, {}, {}, {}
    for module, (up, down, alpha) in factors.items():
        a = torch.tensor(alpha)
        p = f"diffusion_model.{module}"
        comfy_orig.update({f"{p}.lora_up.weight": up, f"{p}.lora_down.weight": down, f"{p}.alpha": a})
        p = f"diffusion_model.{COMFY_INTERNAL[module]}"
        comfy_internal.update({f"{p}.lora_B.weight": up, f"{p}.lora_A.weight": down, f"{p}.alpha": a})
        p = f"transformer.{module}"
        pipe.update({f"{p}.lora_B.weight": up, f"{p}.lora_A.weight": down})
        p = "lora_unet_" + module.replace(".", "_")
        kohya.update({f"{p}.lora_up.weight": up, f"{p}.lora_down.weight": down, f"{p}.alpha": a})
    return {"ComfyUI-original": (comfy_orig, True, "ComfyUI"), "ComfyUI-internal": (comfy_internal, True, "ComfyUI"),
            "diffusion-pipe": (pipe, False, "diffusion-pipe"), "kohya": (kohya, True, "kohya/musubi-tuner")}


@pytest.mark.parametrize("fmt", ["ComfyUI-original", "ComfyUI-internal", "diffusion-pipe", "kohya"])
def test_format_merges_like_hand_formula(fmt, base_sd, tmp_path):
    factors = _factors(base_sd, rank=3, seed=2)
    tensors, use_alpha, label = _formats(factors)[fmt]
    state = load_lora(_write(tmp_path / "lora.safetensors", tensors))
    assert state.format == label
    assert not state.unused and set(state.modules) == set(factors)
    got = merge_into_state_dict(base_sd, [(state, STRENGTH)])
    want = _expected(base_sd, factors, STRENGTH, use_alpha=use_alpha)
    _assert_matches(got, want)
    changed = [k for k in base_sd if not torch.equal(got[k], base_sd[k])]
    assert sorted(changed) == sorted(f"{m}.weight" for m in factors)


def test_comfy_internal_names_match_comfyui_table():
    for module, internal in COMFY_INTERNAL.items():
        assert comfy_names.to_comfy_module(module) == internal
    assert comfy_names.to_comfy_key("double_blocks.3.img_attn_q_norm.weight") == \
        "double_blocks.3.img_attn.norm.query_norm.scale"
    assert comfy_names.to_comfy_key("single_blocks.2.k_norm.weight") == "single_blocks.2.norm.key_norm.scale"
    # names native ComfyUI's HunyuanVideo LoRA key map accepts / misses
    assert comfy_names.lora_name_for_comfy("time_in.mlp.0") == "time_in.in_layer"
    assert comfy_names.lora_name_for_comfy("txt_in.c_embedder.linear_2") == "txt_in.c_embedder.out_layer"
    assert comfy_names.lora_name_for_comfy("double_blocks.0.img_mlp.fc1") == "double_blocks.0.img_mlp.fc1"
    assert comfy_names.lora_name_for_comfy("single_blocks.0.q_norm") == "single_blocks.0.norm.query_norm.scale"


def test_diff_and_diff_b(base_sd, tmp_path):
    gen = torch.Generator().manual_seed(3)
    mods = {  # module -> file name used (mixing original and internal names)
        "double_blocks.0.img_attn_q_norm": "double_blocks.0.img_attn_q_norm",
        "single_blocks.1.k_norm": "single_blocks.1.norm.key_norm.scale",
        "txt_in.individual_token_refiner.blocks.0.norm1": "txt_in.individual_token_refiner.blocks.0.norm1",
        "time_in.mlp.2": "time_in.out_layer",
        "double_blocks.1.img_mod.linear": "double_blocks.1.img_mod.lin",
    }
    tensors, want = {}, dict(base_sd)
    for module, name in mods.items():
        w = base_sd[f"{module}.weight"]
        d = torch.randn(w.shape, generator=gen)
        tensors[f"diffusion_model.{name}.diff"] = d
        want[f"{module}.weight"] = w + STRENGTH * d
        if f"{module}.bias" in base_sd:
            b = base_sd[f"{module}.bias"]
            db = torch.randn(b.shape, generator=gen)
            tensors[f"diffusion_model.{name}.diff_b"] = db
            want[f"{module}.bias"] = b + STRENGTH * db
    got = merge_into_state_dict(base_sd, [(_write(tmp_path / "d.safetensors", tensors), STRENGTH)])
    _assert_matches(got, want)
    assert sum(not torch.equal(got[k], base_sd[k]) for k in base_sd) == 5 + 3  # 5 weights + 3 biases


def test_diffusers_split_parts_placed_into_fused_rows(base_sd, tmp_path):
    """q/k/v onto img_attn_qkv, q/k/v/proj_mlp onto linear1, norm_out's [scale, shift] onto [shift, scale]."""
    gen = torch.Generator().manual_seed(4)
    r, alpha = 2, 4.0
    # diffusers module -> (original module, row slice in the original weight, source row order)
    parts = {
        "transformer_blocks.0.attn.to_q": ("double_blocks.0.img_attn_qkv", slice(0, H)),
        "transformer_blocks.0.attn.to_v": ("double_blocks.0.img_attn_qkv", slice(2 * H, 3 * H)),
        "transformer_blocks.1.attn.add_k_proj": ("double_blocks.1.txt_attn_qkv", slice(H, 2 * H)),
        "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", slice(H, 2 * H)),
        "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", slice(3 * H, 7 * H)),
        "context_embedder.token_refiner.refiner_blocks.1.attn.to_v":
            ("txt_in.individual_token_refiner.blocks.1.self_attn_qkv", slice(2 * H, 3 * H)),
        "single_transformer_blocks.1.proj_out": ("single_blocks.1.linear2", slice(0, H)),
    }
    tensors = {}
    want = {k: v.clone() for k, v in base_sd.items()}
    for d_name, (module, rows) in parts.items():
        w = base_sd[f"{module}.weight"]
        up = torch.randn(rows.stop - rows.start, r, generator=gen)
        down = torch.randn(r, w.shape[1], generator=gen)
        tensors[f"transformer.{d_name}.lora_B.weight"] = up
        tensors[f"transformer.{d_name}.lora_A.weight"] = down
        tensors[f"transformer.{d_name}.alpha"] = torch.tensor(alpha)
        want[f"{module}.weight"][rows] += STRENGTH * alpha / r * (up @ down)
    # norm_out.linear rows are [scale, shift]; the original final layer's are [shift, scale]
    up = torch.randn(2 * H, r, generator=gen)
    down = torch.randn(r, H, generator=gen)
    tensors["transformer.norm_out.linear.lora_B.weight"] = up
    tensors["transformer.norm_out.linear.lora_A.weight"] = down
    tensors["transformer.norm_out.linear.alpha"] = torch.tensor(alpha)
    delta = STRENGTH * alpha / r * (up @ down)
    want["final_layer.adaLN_modulation.1.weight"][:H] += delta[H:]
    want["final_layer.adaLN_modulation.1.weight"][H:] += delta[:H]
    db = torch.randn(2 * H, generator=gen)
    tensors["transformer.norm_out.linear.diff_b"] = db
    want["final_layer.adaLN_modulation.1.bias"] = base_sd["final_layer.adaLN_modulation.1.bias"] + STRENGTH * torch.cat(
        (db[H:], db[:H]))
    state = load_lora(_write(tmp_path / "p.safetensors", tensors))
    assert state.format == "diffusers/PEFT" and not state.unused
    got = merge_into_state_dict(base_sd, [(state, STRENGTH)])
    _assert_matches(got, want)


def test_peft_metadata_alpha(base_sd, tmp_path):
    """diffusers files carry lora_alpha / alpha_pattern in safetensors metadata instead of .alpha keys."""
    import json

    gen = torch.Generator().manual_seed(5)
    r = 4
    up, down = torch.randn(H, r, generator=gen), torch.randn(r, H, generator=gen)
    up2, down2 = torch.randn(H, r, generator=gen), torch.randn(r, H, generator=gen)
    tensors = {"transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": up,
               "transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": down,
               "transformer.transformer_blocks.0.attn.to_add_out.lora_B.weight": up2,
               "transformer.transformer_blocks.0.attn.to_add_out.lora_A.weight": down2}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": r, "transformer.lora_alpha": 8,
                                                 "transformer.alpha_pattern": {"to_add_out": 2}})}
    got = merge_into_state_dict(base_sd, [(_write(tmp_path / "m.safetensors", tensors, meta), 1.0)])
    torch.testing.assert_close(got["double_blocks.0.img_attn_proj.weight"],
                               base_sd["double_blocks.0.img_attn_proj.weight"] + 8 / r * up @ down)
    torch.testing.assert_close(got["double_blocks.0.txt_attn_proj.weight"],
                               base_sd["double_blocks.0.txt_attn_proj.weight"] + 2 / r * up2 @ down2)


def test_partial_match_is_one_warning_line(base_sd, tmp_path, caplog):
    factors = _factors(base_sd, rank=2, seed=6)
    tensors, _, _ = _formats(factors)["ComfyUI-original"]
    tensors = dict(tensors)
    tensors["diffusion_model.double_blocks.9.img_attn_qkv.lora_up.weight"] = torch.randn(3 * H, 2)  # absent block
    tensors["diffusion_model.double_blocks.9.img_attn_qkv.lora_down.weight"] = torch.randn(2, H)
    tensors["diffusion_model.blocks.0.self_attn.q.lora_up.weight"] = torch.randn(4, 2)  # not HunyuanVideo
    tensors["diffusion_model.double_blocks.0.img_mlp.fc2.lora_up.weight"] = torch.randn(H, 2)  # no partner
    tensors["diffusion_model.double_blocks.0.img_mlp.fc1.dora_scale"] = torch.randn(4 * H, 1)  # unsupported
    tensors["lora_unet_double_blocks_0_img_mlp_fc2.hada_w1_a"] = torch.randn(4, 2)  # LyCORIS LoHa
    tensors["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.randn(4, 2)  # text encoder
    model = tiny_transformer(seed=1)
    with caplog.at_level(logging.WARNING, logger="accvideo_core.lora"):
        LoraStack(model).add(_write(tmp_path / "x.safetensors", tensors))
    lines = [r.getMessage() for r in caplog.records if r.name == "accvideo_core.lora"]
    assert len(lines) == 1, lines
    assert "7 of " in lines[0] and "module not in this model" in lines[0] and "DoRA" in lines[0]
    assert "LoHa" in lines[0] and "text-encoder" in lines[0]
    assert "ComfyUI" in lines[0]


def test_zero_match_is_an_error_naming_format_and_keys(tmp_path):
    wan = {f"diffusion_model.blocks.{i}.self_attn.q.lora_A.weight": torch.randn(2, 8) for i in range(4)}
    with pytest.raises(LoraFormatError) as err:
        load_lora(_write(tmp_path / "wan.safetensors", wan))
    msg = str(err.value)
    assert "ComfyUI-style" in msg and "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in msg
    assert msg.count("self_attn.q.lora_A") >= 3


def test_lora_for_other_blocks_only_is_an_error(base_sd, tmp_path):
    tensors = {"diffusion_model.double_blocks.30.img_attn_qkv.lora_up.weight": torch.randn(3 * H, 2),
               "diffusion_model.double_blocks.30.img_attn_qkv.lora_down.weight": torch.randn(2, H)}
    with pytest.raises(LoraFormatError, match=r"\(format: ComfyUI\).*double_blocks\.30"):
        merge_into_state_dict(base_sd, [(_write(tmp_path / "o.safetensors", tensors), 1.0)])


def test_wrong_hidden_size_is_an_error(base_sd, tmp_path):
    tensors = {"diffusion_model.double_blocks.0.img_attn_proj.lora_up.weight": torch.randn(3072, 2),
               "diffusion_model.double_blocks.0.img_attn_proj.lora_down.weight": torch.randn(2, 3072)}
    with pytest.raises(LoraFormatError, match="different model"):
        merge_into_state_dict(base_sd, [(_write(tmp_path / "big.safetensors", tensors), 1.0)])


def test_comfy_patches_keyed_by_internal_names(base_sd):
    factors = _factors(base_sd, rank=3, seed=7)
    tensors, _, _ = _formats(factors)["kohya"]
    tensors = dict(tensors)
    tensors["diffusion_model.single_blocks.0.q_norm.diff"] = torch.randn(H // 2)
    patches = comfy_patches(tensors)
    want = {f"diffusion_model.{COMFY_INTERNAL[m]}.weight" for m in factors}
    want.add("diffusion_model.single_blocks.0.norm.query_norm.scale")
    assert set(patches) == want
    assert patches["diffusion_model.single_blocks.0.norm.query_norm.scale"].kind == "diff"
    # ComfyUI's LoRAAdapter computes (alpha / rank) * up @ down: the patch must reproduce the hand formula
    up, down, alpha = factors["time_in.mlp.0"]
    kind, weights = patches["diffusion_model.time_in.in_layer.weight"]
    assert kind == "lora"
    torch.testing.assert_close(weights[2] / weights[1].shape[0] * weights[0] @ weights[1],
                               alpha / down.shape[0] * up @ down)


def test_comfy_patches_matched_against_comfy_model_shapes(base_sd, caplog):
    """The node passes the ComfyUI model's own state dict (internal names): the LoRA is accounted against it."""
    comfy_shapes = {f"diffusion_model.{comfy_names.to_comfy_key(k)}": v.shape for k, v in base_sd.items()}
    factors = _factors(base_sd, rank=2, seed=8)
    tensors = dict(_formats(factors)["ComfyUI-original"][0])
    tensors["diffusion_model.double_blocks.5.img_attn_qkv.lora_up.weight"] = torch.randn(3 * H, 2)
    tensors["diffusion_model.double_blocks.5.img_attn_qkv.lora_down.weight"] = torch.randn(2, H)
    with caplog.at_level(logging.WARNING, logger="accvideo_core.lora"):
        patches = comfy_patches(tensors, comfy_shapes)
    assert set(patches) == {f"diffusion_model.{COMFY_INTERNAL[m]}.weight" for m in factors}
    assert len([r for r in caplog.records if r.name == "accvideo_core.lora"]) == 1
    with pytest.raises(LoraFormatError):
        comfy_patches({k: v for k, v in tensors.items() if ".5." in k}, comfy_shapes)


def test_module_catalogue_is_the_transformer_layout():
    """The module catalogue of lora.names (used to resolve every naming) lists exactly the transformer's weighted
    modules."""
    from accvideo_core.lora import names

    model_modules = [k.removesuffix(".weight") for k in tiny_transformer(seed=1).state_dict() if k.endswith(".weight")]
    catalogue = list(names.TOP_LEVEL) + [f"{block_list}.{i}.{m}" for block_list, modules in names.BLOCK_MODULES.items()
                                         for i in range(2) for m in modules]  # tiny model: 2 blocks of each list
    assert sorted(catalogue) == sorted(model_modules)
    for module in model_modules:
        assert names.resolve(module).module == module
        assert names.resolve(module.replace(".", "_")).module == module
        assert names.resolve(comfy_names.to_comfy_module(module)).module == module


def test_missing_up_factors_are_named(base_sd, tmp_path):
    """Regression (issue 17): a LoRA whose lora_up tensors are missing got 'no key belongs to HunyuanVideo'."""
    downs = {f"diffusion_model.{m}.lora_down.weight": down for m, (_, down, _) in _factors(base_sd, 2, 0).items()}
    downs["diffusion_model.double_blocks.0.img_attn_qkv.alpha"] = torch.tensor(2.0)
    with pytest.raises(LoraFormatError, match="lacks one of its two factors") as err:
        load_lora(_write(tmp_path / "no_up.safetensors", downs))
    assert "'diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight'" in str(err.value)
    kohya_ups = {"lora_unet_double_blocks_0_img_attn_qkv.lora_B.weight": torch.randn(3 * H, 2)}
    with pytest.raises(LoraFormatError, match="'lora_unet_double_blocks_0_img_attn_qkv.lora_A.weight'"):
        load_lora(kohya_ups)
    # some modules complete, one without its up factor: loads, and the warning says what is missing
    state = load_lora({**downs, "diffusion_model.double_blocks.1.img_mlp.fc1.lora_up.weight": torch.randn(4 * H, 2),
                       "diffusion_model.double_blocks.1.img_mlp.fc1.lora_down.weight": torch.randn(2, H)})
    assert set(state.modules) == {"double_blocks.1.img_mlp.fc1"}
    assert state.unused["diffusion_model.double_blocks.0.img_attn_qkv.lora_down.weight"] == \
        "down factor without its up factor"


def test_flux_lora_is_refused_although_its_block_names_fit(tmp_path):
    """Flux names its blocks like ComfyUI's HunyuanVideo and has the same block shapes at hidden 3072: a Flux LoRA
    is told apart by its Flux-only modules or by Flux's depth (19 + 38 blocks)."""
    def pair(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.lora_A.weight": torch.zeros(1, 4), f"{name}.lora_B.weight": torch.zeros(4, 1)}

    flux_blocks = {**{k: v for i in range(19) for k, v in pair(f"diffusion_model.double_blocks.{i}.img_attn.qkv").items()},
                   **{k: v for i in range(38) for k, v in pair(f"diffusion_model.single_blocks.{i}.linear1").items()}}
    with pytest.raises(LoraFormatError, match="Flux LoRA.*exactly Flux's 19 double \\+ 38 single blocks"):
        load_lora(flux_blocks)
    for only in ("diffusion_model.img_in", "transformer.x_embedder", "lora_unet_txt_in"):
        with pytest.raises(LoraFormatError, match=f"Flux LoRA.*only Flux has.*{only}"):
            load_lora({**pair("diffusion_model.double_blocks.0.img_attn.qkv"), **pair(only)})
    # a HunyuanVideo LoRA with all 20 + 40 blocks is not mistaken for one
    hunyuan = {**flux_blocks, **pair("diffusion_model.double_blocks.19.img_attn.qkv"),
               **pair("diffusion_model.single_blocks.38.linear1"), **pair("diffusion_model.single_blocks.39.linear1")}
    assert len(load_lora(hunyuan).modules) == 60
