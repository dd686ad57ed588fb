"""LyCORIS LoHa and LoKr LoRAs: read in every naming, merged, run unmerged on fp8 weights, and turned into ComfyUI
patches. Oracles: PEFT's own LoHa / LoKr layers (merged weights, and a diffusers transformer's forward), and the
LyCORIS formulas written out here with torch.kron on the unflattened conv factors."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

from accvideo_core.lora import LoraFormatError, LoraStack, comfy_patches, load_lora, merge_into_state_dict
from accvideo_core.models.loading import FP8_DTYPES, load_transformer
from accvideo_core.testing import dequantized_state, tiny_inputs, tiny_transformer

TARGETS = ["img_attn_qkv", "txt_mlp.fc2", "linear1", "img_mod.linear"]


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _peft_lycoris(kind: str, model, seed: int):
    """``model`` with PEFT LoHa (r 4, alpha 6) or LoKr (r 2, alpha 3, both factors decomposed) adapters of random
    values on TARGETS; returns (peft model, its adapter state dict, alpha)."""
    peft = pytest.importorskip("peft")
    if kind == "loha":
        config, alpha = peft.LoHaConfig(r=4, alpha=6, target_modules=TARGETS, init_weights=False), 6.0
    else:
        config, alpha = peft.LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=TARGETS,
                                        init_weights=False), 3.0
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return wrapped, peft.get_peft_model_state_dict(wrapped), alpha


def _as_kohya(peft_sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """PEFT's keys in LyCORIS' kohya naming (``lycoris_double_blocks_0_img_attn_qkv.hada_w1_a``) with alphas."""
    out = {}
    for key, value in peft_sd.items():
        module, role = key.removeprefix("base_model.model.").rsplit(".", 1)
        name = "lycoris_" + module.replace(".", "_")
        out[f"{name}.{role}"] = value
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_merges_like_peft(kind, tmp_path):
    base = tiny_transformer(seed=1)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped, peft_sd, alpha = _peft_lycoris(kind, copy.deepcopy(base), seed=2)
    want = wrapped.merge_and_unload().state_dict()
    for naming, tensors in (("kohya", _as_kohya(peft_sd, alpha)),
                            ("peft", {**peft_sd, **{k.rsplit(".", 1)[0] + ".alpha": torch.tensor(alpha)
                                                    for k in peft_sd}})):
        state = load_lora(_write(tmp_path / f"{kind}_{naming}.safetensors", tensors))
        assert not state.unused and len(state.modules) == 8, (naming, state.unused)
        assert ("LyCORIS LoHa" if kind == "loha" else "LyCORIS LoKr") in state.format
        got = merge_into_state_dict(base_sd, [(state, 1.0)])
        changed = [k for k in base_sd if not torch.equal(want[k], base_sd[k])]
        assert len(changed) == 8, "PEFT's merge must change the 8 target weights for this test to mean anything"
        for key in base_sd:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{naming}: {key}")


def test_diffusers_named_loha_on_split_qkv_equals_peft_forward(tmp_path):
    """PEFT LoHa on diffusers' transformer (to_q / to_k / to_v are separate there): our transformer with the
    same file (each part's change placed into the rows of the fused qkv weight) gives the same output."""
    peft = pytest.importorskip("peft")
    from accvideo_core.testing import diffusers_forward, diffusers_twin

    ours = tiny_transformer(seed=6)
    theirs = diffusers_twin(ours)
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "proj_mlp", "ff.net.2"]
    peft.inject_adapter_in_model(peft.LoHaConfig(r=3, alpha=5, target_modules=targets, init_weights=False), theirs)
    gen = torch.Generator().manual_seed(8)
    tensors = {}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "hada_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                module, role, _adapter = name.rsplit(".", 2)
                tensors[f"transformer.{module}.{role}"] = p.detach().clone()
                tensors[f"transformer.{module}.alpha"] = torch.tensor(5.0)
    inputs = tiny_inputs(ours.config, batch=2, valid=[7, 7])
    with torch.no_grad():
        before = ours(**inputs, guidance=6.0)
        want = diffusers_forward(theirs, inputs, 6.0)
    state = load_lora(_write(tmp_path / "loha_diffusers.safetensors", tensors))
    assert not state.unused
    LoraStack(ours).add(state)
    with torch.no_grad():
        got = ours(**inputs, guidance=6.0)
    assert (want - before).abs().max() > 0.1, "the LoHa must change the output for this test to mean anything"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def _kron_conv(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """LyCORIS' LoKr for a conv weight, as it writes it: w1 gets the kernel dims, then torch.kron."""
    return torch.kron(w1.reshape(*w1.shape, *([1] * (w2.ndim - 2))), w2)


def test_hand_formulas_conv_full_factors_and_comfyui_names(tmp_path):
    base_sd = {k: v.clone() for k, v in tiny_transformer(seed=1).state_dict().items()}
    gen = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    conv = base_sd["img_in.proj.weight"]  # [32, 16, 1, 2, 2]
    lokr_conv = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 4, 1, 2, 2)}  # neither decomposed: alpha ignored
    loha_conv = {"hada_w1_a": rand(32, 2), "hada_w1_b": rand(2, 64), "hada_w2_a": rand(32, 3),
                 "hada_w2_b": rand(3, 64)}  # a second term on the same conv, no alpha: scale 1
    loha = {"hada_w1_a": rand(96, 2), "hada_w1_b": rand(2, 32), "hada_w2_a": rand(96, 2), "hada_w2_b": rand(2, 32)}
    lokr_w1_split = {"lokr_w1_a": rand(8, 2), "lokr_w1_b": rand(2, 4), "lokr_w2": rand(12, 8)}  # qkv [96, 32]
    tensors = {}
    for prefix, factors, alpha in (("diffusion_model.img_in.proj", lokr_conv, 5.0),
                                   ("lora_unet_img_in_proj", loha_conv, None),
                                   ("lora_unet_single_blocks_1_modulation_lin", loha, 8.0),
                                   ("diffusion_model.double_blocks.1.img_attn.qkv", lokr_w1_split, 3.0)):
        tensors.update({f"{prefix}.{role}": value for role, value in factors.items()})
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    got = merge_into_state_dict(base_sd, [(_write(tmp_path / "x.safetensors", tensors), 0.5)])

    want_conv = conv + 0.5 * (_kron_conv(lokr_conv["lokr_w1"], lokr_conv["lokr_w2"])
                              + ((loha_conv["hada_w1_a"] @ loha_conv["hada_w1_b"])
                                 * (loha_conv["hada_w2_a"] @ loha_conv["hada_w2_b"])).reshape(conv.shape))
    torch.testing.assert_close(got["img_in.proj.weight"], want_conv, rtol=1e-5, atol=1e-6)
    key = "single_blocks.1.modulation.linear.weight"
    torch.testing.assert_close(got[key], base_sd[key] + 0.5 * (8.0 / 2) * (loha["hada_w1_a"] @ loha["hada_w1_b"])
                               * (loha["hada_w2_a"] @ loha["hada_w2_b"]), rtol=1e-5, atol=1e-6)
    key = "double_blocks.1.img_attn_qkv.weight"
    w1 = lokr_w1_split["lokr_w1_a"] @ lokr_w1_split["lokr_w1_b"]
    torch.testing.assert_close(got[key], base_sd[key] + 0.5 * (3.0 / 2) * torch.kron(w1, lokr_w1_split["lokr_w2"]),
                               rtol=1e-5, atol=1e-6)


def test_comfy_patches_hand_lycoris_to_comfyui_unless_terms_mix():
    gen = torch.Generator().manual_seed(4)
    loha = {f"lycoris_double_blocks_0_img_attn_qkv.{r}": torch.randn(96 if r.endswith("_a") else 2,
                                                                     2 if r.endswith("_a") else 32, generator=gen)
            for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
    loha["lycoris_double_blocks_0_img_attn_qkv.alpha"] = torch.tensor(4.0)
    mixed = {"diffusion_model.single_blocks.0.linear2.lokr_w1": torch.randn(4, 4, generator=gen),
             "diffusion_model.single_blocks.0.linear2.lokr_w2": torch.randn(8, 40, generator=gen),
             "diffusion_model.single_blocks.0.linear2.diff": torch.randn(32, 160, generator=gen)}
    state = load_lora({**loha, **mixed})
    patches = comfy_patches(state)
    qkv = patches["diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    assert qkv.kind == "loha" and qkv.weights[2] == 4.0  # ComfyUI's LoHaAdapter: (w1_a, w1_b, alpha, w2_a, ...)
    assert qkv.weights[0] is loha["lycoris_double_blocks_0_img_attn_qkv.hada_w1_a"]
    lin2 = patches["diffusion_model.single_blocks.0.linear2.weight"]
    assert lin2.kind == "diff"  # a LoKr and a full difference on one weight: ComfyUI gets their sum
    want = torch.kron(mixed["diffusion_model.single_blocks.0.linear2.lokr_w1"],
                      mixed["diffusion_model.single_blocks.0.linear2.lokr_w2"]) + \
        mixed["diffusion_model.single_blocks.0.linear2.diff"]
    torch.testing.assert_close(lin2.weights[0], want)


def test_loha_and_lokr_factor_exactly_into_a_cheaper_low_rank_pair():
    """``FactoredTerm.low_rank``: LoHa through the row-/column-wise Kronecker products (rank r1 r2), LoKr through
    kron(A1 B1, A2 B2) = kron(A1, A2) kron(B1, B2) (a whole factor times an identity); None when the rank would cost
    more than the dense matrix."""
    from accvideo_core.lora.formats import FactoredTerm

    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    cases = [
        FactoredTerm("loha", {"hada_w1_a": r(96, 2), "hada_w1_b": r(2, 64), "hada_w2_a": r(96, 3),
                              "hada_w2_b": r(3, 64)}, alpha=4.0),                                # rank 6
        FactoredTerm("lokr", {"lokr_w1": r(4, 2), "lokr_w2_a": r(24, 2), "lokr_w2_b": r(2, 32)}, alpha=1.0),  # 2 x 2
        FactoredTerm("lokr", {"lokr_w1_a": r(8, 1), "lokr_w1_b": r(1, 4), "lokr_w2_a": r(12, 2),
                              "lokr_w2_b": r(2, 16)}, alpha=3.0),                               # 1 x 2
    ]
    for term in cases:
        up, down = term.low_rank(dtype=torch.float64)
        assert up.shape[1] < min(term.matrix_shape)
        torch.testing.assert_close(up @ down, term.matrix(dtype=torch.float64), rtol=1e-12, atol=1e-12)
    dense = FactoredTerm("lokr", {"lokr_w1": r(8, 4), "lokr_w2": r(16, 8)})   # rank 4 x 8: cheaper as a matrix
    assert dense.low_rank() is None


def test_loha_runs_unmerged_on_fp8_weights():
    if not FP8_DTYPES:
        pytest.skip("this torch build has no float8 dtypes")
    ref = tiny_transformer(seed=4)
    fp8 = load_transformer(ref.state_dict(), dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    fp8_state = {k: v.clone() for k, v in fp8.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    for module, (rows, cols) in (("double_blocks.0.img_attn_qkv", (96, 32)), ("single_blocks.0.linear1", (224, 32))):
        tensors.update({f"diffusion_model.{module}.hada_w1_a": torch.randn(rows, 2, generator=gen) * 0.3,
                        f"diffusion_model.{module}.hada_w1_b": torch.randn(2, cols, generator=gen) * 0.3,
                        f"diffusion_model.{module}.hada_w2_a": torch.randn(rows, 2, generator=gen) * 0.3,
                        f"diffusion_model.{module}.hada_w2_b": torch.randn(2, cols, generator=gen) * 0.3})
    tensors["diffusion_model.double_blocks.1.img_mlp.fc1.lokr_w1"] = torch.randn(8, 4, generator=gen) * 0.3
    tensors["diffusion_model.double_blocks.1.img_mlp.fc1.lokr_w2"] = torch.randn(16, 8, generator=gen) * 0.3
    lora = load_lora(tensors)
    inputs = tiny_inputs(fp8.config)
    stack = LoraStack(fp8)
    stack.add(lora, 0.7)
    assert all(torch.equal(fp8.state_dict()[k].view(torch.uint8), v.view(torch.uint8))
               for k, v in fp8_state.items() if v.dtype == torch.float8_e4m3fn), "an fp8 weight was modified"
    merged = tiny_transformer(seed=4)
    upcast = dequantized_state(fp8_state)   # fp8 weights x their per-layer scales
    merged.load_state_dict(merge_into_state_dict(upcast, [(lora, 0.7)]))
    with torch.no_grad():
        torch.testing.assert_close(fp8(**inputs, guidance=6.0), merged(**inputs, guidance=6.0), rtol=1e-4, atol=1e-5)
    # the LoHa layers run as low-rank factors (rank 2 x 2, no dense delta kept); the LoKr of two whole factors as
    # its dense matrix (rank 4 x 8 would cost more)
    cache = {key[0]: value for key, value in stack.entries[0].cache.items()}   # (low_rank, dense, bias)
    qkv, fc1 = cache["double_blocks.0.img_attn_qkv"], cache["double_blocks.1.img_mlp.fc1"]
    assert qkv[0][0].shape == (96, 4) and qkv[1] is None
    assert fc1[0] is None and fc1[1].shape == (128, 32)


def test_unusable_lycoris_modules_are_left_out_whole_and_said_why(caplog):
    gen = torch.Generator().manual_seed(6)
    ok = {"diffusion_model.double_blocks.0.img_attn_proj.lora_up.weight": torch.randn(32, 2, generator=gen),
          "diffusion_model.double_blocks.0.img_attn_proj.lora_down.weight": torch.randn(2, 32, generator=gen)}
    bad = {
        # DoRA: the low-rank part alone would be a different change, so the module is left out whole
        "diffusion_model.double_blocks.0.txt_attn_proj.lora_up.weight": torch.randn(32, 2, generator=gen),
        "diffusion_model.double_blocks.0.txt_attn_proj.lora_down.weight": torch.randn(2, 32, generator=gen),
        "diffusion_model.double_blocks.0.txt_attn_proj.dora_scale": torch.randn(32, 1, generator=gen),
        "diffusion_model.double_blocks.1.img_attn_proj.hada_w1_a": torch.randn(32, 2, generator=gen),  # no w2
        "diffusion_model.double_blocks.1.img_attn_proj.hada_w1_b": torch.randn(2, 32, generator=gen),
        "diffusion_model.double_blocks.1.txt_attn_proj.lokr_w1": torch.randn(4, 4, generator=gen),  # no w2
        "diffusion_model.img_in.proj.lokr_w1": torch.randn(4, 2, generator=gen),  # Tucker
        "diffusion_model.img_in.proj.lokr_w2_a": torch.randn(2, 8, generator=gen),
        "diffusion_model.img_in.proj.lokr_w2_b": torch.randn(2, 2, generator=gen),
        "diffusion_model.img_in.proj.lokr_t2": torch.randn(2, 2, 1, 2, generator=gen),
        "diffusion_model.double_blocks.0.img_attn_qkv.oft_blocks": torch.randn(4, 8, 8, generator=gen),
    }
    state = load_lora({**ok, **bad})
    assert list(state.modules) == ["double_blocks.0.img_attn_proj"]
    assert set(state.unused) == set(bad)
    why = state.unused
    assert "DoRA" in why["diffusion_model.double_blocks.0.txt_attn_proj.lora_up.weight"]
    assert "incomplete LoHa" in why["diffusion_model.double_blocks.1.img_attn_proj.hada_w1_a"]
    assert "incomplete LoKr" in why["diffusion_model.double_blocks.1.txt_attn_proj.lokr_w1"]
    assert "Tucker" in why["diffusion_model.img_in.proj.lokr_w1"]
    assert "OFT" in why["diffusion_model.double_blocks.0.img_attn_qkv.oft_blocks"]
    with caplog.at_level(logging.WARNING, logger="accvideo_core.lora"):
        LoraStack(tiny_transformer(seed=1)).add(state)
    lines = [r.getMessage() for r in caplog.records if r.name == "accvideo_core.lora"]
    assert len(lines) == 1 and f"{len(bad)} of {len(ok) + len(bad)} keys not applied" in lines[0], lines


@pytest.mark.parametrize("tensors, message", [
    ({"diffusion_model.double_blocks.0.img_attn_qkv.lokr_w1": torch.ones(4, 4),  # kron 64x32, weight 96x32
      "diffusion_model.double_blocks.0.img_attn_qkv.lokr_w2": torch.ones(16, 8)},
     r"double_blocks\.0\.img_attn_qkv: the LoKr change is 64x32 but the weight is \(96, 32\); the LoRA was made "
     r"for a different model"),
    ({"diffusion_model.double_blocks.0.img_attn_qkv.hada_w1_a": torch.ones(96, 2),
      "diffusion_model.double_blocks.0.img_attn_qkv.hada_w1_b": torch.ones(3, 32),
      "diffusion_model.double_blocks.0.img_attn_qkv.hada_w2_a": torch.ones(96, 2),
      "diffusion_model.double_blocks.0.img_attn_qkv.hada_w2_b": torch.ones(2, 32)},
     r"hada_w1_a has rank 2 but hada_w1_b 3"),
])
def test_broken_or_mismatched_lycoris_is_an_error(tensors, message):
    with pytest.raises(LoraFormatError, match=message):
        LoraStack(tiny_transformer(seed=1)).add(load_lora(tensors))
