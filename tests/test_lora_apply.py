"""Applying LoRAs: stacking, strengths, exact removal, bf16 merging, the fp8 runtime path, and the forward output
of our transformer with a diffusers-format LoRA against diffusers + PEFT running the same LoRA."""
from __future__ import annotations

import pytest
import torch

from accvideo_core.lora import LoraStack, load_lora, merge_into_state_dict
from accvideo_core.models.loading import FP8_DTYPES, load_transformer
from accvideo_core.testing import dequantized_state, tiny_inputs, tiny_transformer

H = 32


def _random_lora(sd, modules, rank, seed, *, diff_b=()):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        w = sd[f"{m}.weight"]
        out[f"diffusion_model.{m}.lora_up.weight"] = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)),
                                                                 generator=gen) * 0.2
        out[f"diffusion_model.{m}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=gen) * 0.2
        out[f"diffusion_model.{m}.alpha"] = torch.tensor(rank / 2)
    for m in diff_b:
        out[f"diffusion_model.{m}.diff_b"] = torch.randn(sd[f"{m}.bias"].shape, generator=gen) * 0.1
    return load_lora(out)


MODULES_A = ["img_in.proj", "double_blocks.0.img_attn_qkv", "single_blocks.1.linear1", "time_in.mlp.0",
             "final_layer.linear"]
MODULES_B = ["double_blocks.0.img_attn_qkv", "double_blocks.1.txt_mlp.fc2", "single_blocks.0.linear2"]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_strengths_and_exact_restore(dtype):
    model = tiny_transformer(seed=3).to(dtype)
    base = _state(model)
    lora_a = _random_lora(base, MODULES_A, 4, 1, diff_b=["double_blocks.0.img_mod.linear"])
    lora_b = _random_lora(base, MODULES_B, 2, 2)
    stack = LoraStack(model)
    stack.add(lora_a, 0.8, name="a")
    stack.add(lora_b, -0.5, name="b")
    # both merged: each touched weight = round(base + 0.8 dA + (-0.5) dB), summed in fp32, rounded once
    key = "double_blocks.0.img_attn_qkv.weight"
    da = lora_a.modules["double_blocks.0.img_attn_qkv"].weight_delta(base[key].shape)
    db = lora_b.modules["double_blocks.0.img_attn_qkv"].weight_delta(base[key].shape)
    want = ((base[key].float() + 0.8 * da) + -0.5 * db).to(dtype)
    assert torch.equal(model.state_dict()[key], want)
    stack.set_strength("a", 0.3)
    stack.remove("b")
    # only "a" at 0.3 left: equals merging "a" alone at 0.3 from scratch, bit for bit
    alone = merge_into_state_dict(base, [(lora_a, 0.3)])
    now = model.state_dict()
    assert all(torch.equal(now[k], alone[k]) for k in base)
    assert not torch.equal(now["double_blocks.0.img_mod.linear.bias"], base["double_blocks.0.img_mod.linear.bias"])
    stack.clear()
    now = model.state_dict()
    assert all(torch.equal(now[k], base[k]) for k in base), "clear() must restore the weights bit for bit"
    assert not stack._base, "no weight copies may be kept once every LoRA is removed"


def test_subtract_mode_is_close_but_keeps_no_copy():
    model = tiny_transformer(seed=3)
    base = _state(model)
    stack = LoraStack(model, exact_restore=False)
    stack.add(_random_lora(base, MODULES_A, 4, 1), 1.0, name="a")
    stack.set_strength("a", 0.5)
    assert not stack._base
    stack.remove("a")
    now = model.state_dict()
    for k in base:
        torch.testing.assert_close(now[k], base[k], rtol=0, atol=1e-5)


def test_fp8_weights_stay_unmerged_and_lora_runs_at_runtime():
    if not FP8_DTYPES:
        pytest.skip("this torch build has no float8 dtypes")
    ref = tiny_transformer(seed=4)
    fp8 = load_transformer(ref.state_dict(), dtype=torch.float32, storage_dtype=torch.float8_e4m3fn)
    fp8_state = _state(fp8)
    assert fp8_state["double_blocks.0.img_attn_qkv.weight"].dtype == torch.float8_e4m3fn
    modules = ["double_blocks.0.img_attn_qkv", "double_blocks.1.img_mlp.fc1", "single_blocks.0.linear1",
               "time_in.mlp.0"]  # the first three are fp8, time_in stays fp32 (merged)
    lora = _random_lora(fp8_state, modules, 4, 5, diff_b=["single_blocks.1.linear2"])
    inputs = tiny_inputs(fp8.config)
    with torch.no_grad():
        before = fp8(**inputs, guidance=6.0)
    stack = LoraStack(fp8)
    stack.add(lora, 0.6)
    after_state = fp8.state_dict()
    for k, v in fp8_state.items():
        if v.dtype == torch.float8_e4m3fn:
            assert torch.equal(after_state[k].view(torch.uint8), v.view(torch.uint8)), f"{k} was modified"
    assert not torch.equal(after_state["time_in.mlp.0.weight"], fp8_state["time_in.mlp.0.weight"])
    # reference: the up-cast fp8 weights in fp32 with the LoRA merged exactly
    upcast = dequantized_state(fp8_state)   # fp8 weights x their per-layer scales
    merged = tiny_transformer(seed=4)
    merged.load_state_dict(merge_into_state_dict(upcast, [(lora, 0.6)]))
    with torch.no_grad():
        got = fp8(**inputs, guidance=6.0)
        want = merged(**inputs, guidance=6.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - before).abs().max() > 1e-2
    stack.clear()
    with torch.no_grad():
        assert torch.equal(fp8(**inputs, guidance=6.0), before)


def test_forward_with_diffusers_lora_equals_diffusers_peft(tmp_path):
    """Oracle: diffusers' HunyuanVideoTransformer3DModel with a PEFT adapter (saved by diffusers' own
    save_lora_weights) vs our transformer with the same file applied by LoraStack."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import HunyuanVideoLoraLoaderMixin
    from peft import LoraConfig, get_peft_model_state_dict

    from accvideo_core.testing import diffusers_forward, diffusers_twin

    ours = tiny_transformer(seed=6)
    theirs = diffusers_twin(ours)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "proj_mlp", "proj_out", "norm_out.linear", "linear_1", "linear_2", "ff.net.0.proj", "ff.net.2",
               "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear", "norm.linear",
               "proj_in", "x_embedder.proj"]
    config = dict(r=4, lora_alpha=8, target_modules=targets, alpha_pattern={"proj_mlp": 2, "to_k": 1})
    theirs.add_adapter(LoraConfig(init_lora_weights=False, **config))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    HunyuanVideoLoraLoaderMixin.save_lora_weights(
        str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(theirs),
        transformer_lora_adapter_metadata=config)
    path = tmp_path / "pytorch_lora_weights.safetensors"

    inputs = tiny_inputs(ours.config, batch=2, valid=[7, 7])
    with torch.no_grad():
        before = ours(**inputs, guidance=6.0)
        want = diffusers_forward(theirs, inputs, 6.0)
    state = load_lora(path)
    assert state.format == "diffusers/PEFT" and not state.unused
    assert len(state.modules) == 50  # every linear of the tiny model but the q/k norms
    LoraStack(ours).add(state)
    with torch.no_grad():
        got = ours(**inputs, guidance=6.0)
    assert (want - before).abs().max() > 0.1, "the LoRA must change the output for this test to mean anything"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)


def test_one_stack_per_model():
    model = tiny_transformer(seed=3)
    stack = LoraStack.for_model(model)
    stack.add(_random_lora(_state(model), MODULES_B, 2, 2), 1.0, name="b")
    assert LoraStack.for_model(model) is stack
    with pytest.raises(ValueError, match="another LoraStack"):
        LoraStack(model)
    stack.clear()
    LoraStack(model)  # allowed once the first stack holds nothing


def test_comfy_match_report_counts_modules_comfyui_did_not_take():
    from accvideo_core.lora.apply import comfy_match_report, comfy_patches

    model = tiny_transformer(hidden_size=H, num_heads=2)
    lora = _random_lora(_state(model), MODULES_A, 4, 0)
    keys = list(comfy_patches(lora))
    taken = [k for k in keys if "single_blocks.1." not in k and ".time_in." not in k]
    report = comfy_match_report(lora, taken)
    assert sorted(report.absent) == ["single_blocks.1.linear1", "time_in.mlp.0"]
    assert set(report.patches) == set(MODULES_A) - set(report.absent)
    line = report.message()
    assert f"6 of {lora.total_keys} keys not applied" in line and "module not in this model" in line
    assert comfy_match_report(lora, keys).message() is None
