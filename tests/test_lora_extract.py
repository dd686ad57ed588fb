"""LoRA extraction: exactness at full rank and on exactly-low-rank changes, streaming from files in every layout,
ComfyUI-loadable key names, the CLI, and (integration tier) native ComfyUI loading and applying the result."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accvideo_core.lora import extract, load_lora, merge_into_state_dict
from accvideo_core.lora.__main__ import main as cli_main
from accvideo_core.models import key_maps
from accvideo_core.models.loading import quantize_fp8
from accvideo_core.testing import tiny_transformer
from accvideo_core.utils.io import CheckpointError, save_safetensors, save_torch
from tests.integration.comfy_probe import run_probe

N_QK_NORMS = 2 * 4 + 2 * 2  # tiny model: 2 double blocks x 4 q/k norms + 2 single blocks x 2


def make_pair(seed: int = 0, *, change_rank: int = 3, noise: float = 0.0, **config):
    """(base, tuned) original-layout state dicts: every matrix changed by a rank-``change_rank`` term (+ noise),
    every bias and norm weight changed too."""
    base = {k: v.clone() for k, v in tiny_transformer(seed=seed, **config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 100)
    tuned = {}
    for key, w in base.items():
        if w.ndim >= 2:
            m = w.flatten(1)
            low = torch.randn(m.shape[0], change_rank, generator=gen) @ torch.randn(change_rank, m.shape[1], generator=gen)
            delta = 0.05 * low / change_rank ** 0.5 + noise * torch.randn(m.shape, generator=gen)
            tuned[key] = w + (delta * m.std()).reshape(w.shape)
        else:
            tuned[key] = w + 0.1 * torch.randn(w.shape, generator=gen)
    return base, tuned


def _max_rel(got: dict, want: dict, base: dict) -> float:
    return max(float((got[k] - want[k]).norm() / (want[k] - base[k]).norm()) for k in want)


def test_full_rank_reproduces_tuned_weights():
    base, tuned = make_pair(noise=0.02)
    result = extract(base, tuned, rank=10_000, dtype=torch.float32)
    assert all(layer.written in ("diff", "diff_b") for layer in result.layers)
    got = merge_into_state_dict(base, [(load_lora(result.tensors), 1.0)])
    for k in tuned:
        torch.testing.assert_close(got[k], tuned[k], rtol=0, atol=1e-6)


def test_low_rank_change_is_recovered_by_svd_at_that_rank():
    base, tuned = make_pair(change_rank=3)
    for svd in ("exact", "randomized"):
        result = extract(base, tuned, rank=3, dtype=torch.float32, svd=svd)
        assert sum(layer.written == "lora" for layer in result.layers) > 40
        got = merge_into_state_dict(base, [(load_lora(result.tensors), 1.0)])
        assert _max_rel(got, tuned, base) < 1e-4, svd
    # fp16 storage: the error is the fp16 rounding of the factors
    result = extract(base, tuned, rank=3)
    assert result.tensors["diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight"].dtype == torch.float16
    got = merge_into_state_dict(base, [(load_lora(result.tensors), 1.0)])
    assert _max_rel(got, tuned, base) < 3e-3


def test_truncation_error_matches_discarded_spectrum():
    base, tuned = make_pair(change_rank=8, noise=0.01)
    result = extract(base, tuned, rank=2, dtype=torch.float32, svd="exact")
    key = "double_blocks.1.img_mlp.fc1.weight"
    s = torch.linalg.svdvals((tuned[key] - base[key]).flatten(1))
    want = float(s[2:].norm() / s.norm())
    got = next(layer.rel_error for layer in result.layers if layer.key == key)
    assert abs(got - want) < 1e-4 and 0.05 < want < 0.99


def test_key_names_load_natively_in_comfyui_and_in_our_loader():
    base, tuned = make_pair()
    keys = set(extract(base, tuned, rank=2).tensors)
    # names native ComfyUI 0.3.64 accepts (see comfy_names / docs/lora.md): original where accepted, else internal
    assert "diffusion_model.time_in.in_layer.lora_up.weight" in keys
    assert "diffusion_model.guidance_in.out_layer.diff_b" in keys
    assert "diffusion_model.txt_in.t_embedder.in_layer.lora_down.weight" in keys
    assert "diffusion_model.txt_in.c_embedder.out_layer.alpha" in keys
    assert "diffusion_model.double_blocks.0.img_attn_qkv.lora_up.weight" in keys
    assert "diffusion_model.double_blocks.1.txt_mlp.fc2.lora_down.weight" in keys
    assert "diffusion_model.single_blocks.0.modulation.linear.diff_b" in keys
    assert "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff" in keys
    assert "diffusion_model.single_blocks.1.norm.key_norm.scale.diff" in keys
    assert "diffusion_model.txt_in.individual_token_refiner.blocks.0.norm1.diff_b" in keys
    assert not any("time_in.mlp" in k or "c_embedder.linear" in k or "_q_norm" in k for k in keys)
    state = load_lora(extract(base, tuned, rank=2).tensors)
    assert not state.unused and len(state.modules) == len({k.rsplit(".", 1)[0] for k in base})


@pytest.mark.parametrize("mode,count", [("original", N_QK_NORMS), ("skip", 0)])
def test_qk_norm_modes(mode, count):
    base, tuned = make_pair()
    result = extract(base, tuned, rank=2, qk_norms=mode, dtype=torch.float32)
    norm_keys = [k for k in result.tensors if "_norm.diff" in k or "q_norm.diff" in k or "k_norm.diff" in k]
    assert len(norm_keys) == count
    assert result.summary()["skipped_qk_norms"] == (N_QK_NORMS if mode == "skip" else 0)
    got = merge_into_state_dict(base, [(load_lora(result.tensors), 1.0)])
    key = "double_blocks.0.img_attn_q_norm.weight"
    assert torch.equal(got[key], base[key]) == (mode == "skip")


def test_streams_from_files_in_every_layout(tmp_path):
    base, tuned = make_pair(noise=0.01)
    want = extract(base, tuned, rank=3, dtype=torch.float32, svd="exact").tensors
    # base: ComfyUI-style prefixed safetensors; tuned: diffusers layout (split q/k/v, swapped norm_out) / pickle
    save_safetensors({f"model.diffusion_model.{k}": v for k, v in base.items()}, tmp_path / "base.safetensors")
    save_safetensors(key_maps.original_to_diffusers(tuned), tmp_path / "tuned_diffusers.safetensors")
    save_torch({"module": tuned}, tmp_path / "tuned.pt")
    for tuned_file in ("tuned_diffusers.safetensors", "tuned.pt"):
        got = extract(tmp_path / "base.safetensors", tmp_path / tuned_file, rank=3, dtype=torch.float32,
                      svd="exact", out=tmp_path / "lora.safetensors")
        assert set(got.tensors) == set(want)
        for k in want:
            torch.testing.assert_close(got.tensors[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
        assert set(load_file(tmp_path / "lora.safetensors")) == set(want)


def test_mismatched_checkpoints_are_refused():
    base, _ = make_pair()
    other = {k: v for k, v in tiny_transformer(seed=0, num_single_blocks=1).state_dict().items()}
    with pytest.raises(CheckpointError, match="not the same architecture"):
        extract(base, other, rank=2)
    with pytest.raises(CheckpointError, match="no HunyuanVideo transformer weights"):
        extract(base, {"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, rank=2)


def test_cli_extract_writes_file_and_shows_progress(tmp_path, capsys):
    base, tuned = make_pair()
    save_safetensors(base, tmp_path / "a.safetensors")
    save_safetensors(tuned, tmp_path / "b.safetensors")
    out = tmp_path / "out" / "lora.safetensors"
    code = cli_main(["extract", "--base", str(tmp_path / "a.safetensors"), "--tuned", str(tmp_path / "b.safetensors"),
                     "--rank", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and out.is_file()
    assert "[extract]" in captured.err and "100%" in captured.err
    summary = json.loads(captured.out)
    assert summary["low_rank_layers"] > 40 and summary["max_rel_error"] < 1e-2
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["accvideo_lora"])
    assert meta["rank"] == 3 and meta["qk_norms"] == "comfy"
    assert cli_main(["inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["unused_keys"] == 0


_COMFY_PROBE = r'''
model_path, out_dir, strength, *lora_paths = ARGS
model = comfy.sd.load_diffusion_model(model_path)
prefix = "diffusion_model."
reports = []
for i, lora_path in enumerate(lora_paths):
    messages.clear()
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, float(strength), 0)
    patched.patch_model(device_to=torch.device("cpu"))
    sd = {k[len(prefix):]: v.float().contiguous() for k, v in patched.model.state_dict().items()
          if k.startswith(prefix)}
    save_file(sd, f"{out_dir}/patched_{i}.safetensors")
    patched.unpatch_model()
    reports.append({"not_loaded": [m for m in messages if "not loaded" in m.lower()],
                    "patches": len(patched.patches)})
print("PROBE" + json.dumps(reports))
'''


def _third_party_loras(base: dict) -> dict[str, dict[str, torch.Tensor]]:
    """LoRA files in formats native ComfyUI reads for HunyuanVideo (diffusion-pipe, kohya with ComfyUI names)."""
    gen = torch.Generator().manual_seed(11)
    modules = ["double_blocks.0.img_attn_qkv", "double_blocks.0.txt_mlp.fc1", "double_blocks.0.img_mod.linear",
               "single_blocks.0.linear1", "single_blocks.0.modulation.linear", "final_layer.linear"]
    pipe, kohya = {}, {}
    for m in modules:
        w = base[f"{m}.weight"]
        up, down = torch.randn(w.shape[0], 4, generator=gen) * 0.1, torch.randn(4, w.shape[1], generator=gen) * 0.1
        pipe[f"transformer.{m}.lora_B.weight"], pipe[f"transformer.{m}.lora_A.weight"] = up, down
        internal = m.replace("img_attn_qkv", "img_attn.qkv").replace("mlp.fc1", "mlp.0").replace("mod.linear", "mod.lin")
        internal = internal.replace("modulation.linear", "modulation.lin").replace(".", "_")
        kohya[f"lora_unet_{internal}.lora_up.weight"], kohya[f"lora_unet_{internal}.lora_down.weight"] = up, down
        kohya[f"lora_unet_{internal}.alpha"] = torch.tensor(2.0)
    return {"diffusion-pipe": pipe, "kohya": kohya}


@pytest.mark.integration
def test_native_comfyui_loads_and_applies_every_key(tmp_path, comfyui_path):
    """Native ComfyUI (its own LoRA loader + ModelPatcher, as LoraLoaderModelOnly uses them) applies our extracted
    LoRA completely with patched weights equal to ours; and for third-party files in formats it reads natively,
    its patched weights equal ours too (an independent reader of those formats)."""
    comfy = str(comfyui_path)
    from accvideo_core.lora import comfy_names

    base, tuned = make_pair(comfy_compatible=True, noise=0.01)
    save_safetensors(base, tmp_path / "base.safetensors")
    extract(base, tuned, rank=4, out=tmp_path / "lora_0.safetensors", dtype=torch.float32)
    files = [tmp_path / "lora_0.safetensors"]
    for i, tensors in enumerate(_third_party_loras(base).values(), start=1):
        files.append(save_safetensors(tensors, tmp_path / f"lora_{i}.safetensors"))
    run = run_probe(_COMFY_PROBE, comfy, tmp_path / "base.safetensors", tmp_path, "0.8", *files, folder=tmp_path,
                    timeout=900)
    reports = json.loads(run.stdout.split("PROBE", 1)[1])
    for i, (path, report) in enumerate(zip(files, reports)):
        assert report["not_loaded"] == [], path.name
        patched = load_file(tmp_path / f"patched_{i}.safetensors")
        ours = merge_into_state_dict(base, [(path, 0.8)])
        assert report["patches"] == sum(not torch.equal(ours[k], base[k]) for k in base), path.name
        for key, value in ours.items():
            torch.testing.assert_close(patched[comfy_names.to_comfy_key(key)], value, rtol=1e-5, atol=1e-6,
                                       msg=f"{path.name} {key}")


def test_merge_checkpoint_streams_and_equals_in_memory_merge(tmp_path, capsys):
    from accvideo_core.lora import merge_checkpoint
    from accvideo_core.models.loading import load_transformer

    base, tuned = make_pair(noise=0.01)
    lora = extract(base, tuned, rank=3, out=tmp_path / "l.safetensors", dtype=torch.float32).path
    other = extract(base, make_pair(seed=5)[1], rank=2, dtype=torch.float32).tensors  # a second, unrelated LoRA
    bf16 = {k: v.bfloat16() for k, v in base.items()}
    # diffusers-layout bf16 base file: q/k/v fused and norm_out reordered on the fly, dtypes kept
    save_safetensors(key_maps.original_to_diffusers(bf16), tmp_path / "base_diffusers.safetensors")
    out = merge_checkpoint(tmp_path / "base_diffusers.safetensors", [(lora, 0.7), (other, -0.3)],
                           tmp_path / "merged.safetensors")
    got = load_file(out)
    want = merge_into_state_dict(bf16, [(lora, 0.7), (other, -0.3)])
    assert set(got) == set(want)
    # merge_into_state_dict sums the deltas before adding; the file adds them one by one: same up to rounding
    for k in want:
        assert got[k].dtype == torch.bfloat16
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-2, atol=1e-3, msg=k)
    load_transformer(out)  # loads strictly
    # fp8 output through the CLI: linear weights fp8 with a per-layer scale (ComfyUI's fp8_scaled form, with its
    # marker), the rest bf16, each rounded once from the fp32 merge
    code = cli_main(["merge", "--base", str(tmp_path / "base_diffusers.safetensors"), "--lora", f"{lora}:0.7",
                     "--out", str(tmp_path / "fp8.safetensors"), "--dtype", "fp8"])
    assert code == 0 and "[merge]" in capsys.readouterr().err
    fp8 = load_file(tmp_path / "fp8.safetensors")
    single = merge_into_state_dict({k: v.float() for k, v in bf16.items()}, [(lora, 0.7)])
    assert fp8["double_blocks.0.img_attn_qkv.weight"].dtype == torch.float8_e4m3fn
    assert fp8["double_blocks.0.img_attn_qkv.bias"].dtype == torch.bfloat16
    key = "double_blocks.0.img_attn_qkv.weight"
    quantized, scale = quantize_fp8(single[key], torch.float8_e4m3fn)
    assert torch.equal(fp8[key].view(torch.uint8), quantized.view(torch.uint8))
    assert torch.equal(fp8["double_blocks.0.img_attn_qkv.scale_weight"], scale) and "scaled_fp8" in fp8
    bias = "final_layer.adaLN_modulation.1.bias"
    assert torch.equal(fp8[bias], single[bias].bfloat16())
    loaded = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)   # read back de-scaled
    torch.testing.assert_close(loaded.state_dict()[key].float() * loaded.state_dict()[key[:-6] + "scale_weight"],
                               single[key].float(), rtol=2 ** -4, atol=2 ** -10 * float(scale))


def test_cli_merge_default_dtype_keeps_each_tensors_dtype(tmp_path, capsys):
    """Regression: ``merge`` without ``--dtype`` (default ``keep``) died with KeyError 'keep'."""
    base, tuned = make_pair()
    mixed = {k: (v.bfloat16() if v.ndim == 2 else v) for k, v in base.items()}  # bf16 matrices, fp32 the rest
    save_safetensors(mixed, tmp_path / "base.safetensors")
    lora = extract(base, tuned, rank=3, out=tmp_path / "l.safetensors", dtype=torch.float32).path
    code = cli_main(["merge", "--base", str(tmp_path / "base.safetensors"), "--lora", str(lora),
                     "--out", str(tmp_path / "merged.safetensors")])
    assert code == 0, capsys.readouterr().err
    got = load_file(tmp_path / "merged.safetensors")
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in mixed.items()}
    want = merge_into_state_dict(mixed, [(lora, 1.0)])
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert cli_main(["merge", "--base", str(tmp_path / "base.safetensors"), "--lora", str(lora),
                     "--out", str(tmp_path / "m16.safetensors"), "--dtype", "float16"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "m16.safetensors").values() if v.is_floating_point()} == \
        {torch.float16}


def test_extract_and_loader_read_the_same_checkpoint_prefixes_and_pickles(tmp_path):
    """Every prefix of key_maps.CHECKPOINT_PREFIXES and legacy (non-zip) pickles, which cannot be memory-mapped:
    load_transformer and extract's reader take them alike (extract refused legacy .pt files before)."""
    import contextlib

    from accvideo_core.lora.extract import WeightSource
    from accvideo_core.models.key_maps import CHECKPOINT_PREFIXES
    from accvideo_core.models.loading import load_transformer

    base, tuned = make_pair()
    for i, prefix in enumerate(CHECKPOINT_PREFIXES):
        path = tmp_path / f"tuned{i}.pt"
        torch.save({"state_dict": {prefix + k: v for k, v in tuned.items()}}, path,
                   _use_new_zipfile_serialization=i % 2 == 0)  # odd: the legacy format
        loaded = load_transformer(path).state_dict()
        with contextlib.ExitStack() as stack:
            source = WeightSource(path, stack)
            assert sorted(source.keys()) == sorted(tuned), prefix
            for k, v in tuned.items():
                assert torch.equal(loaded[k], v) and torch.equal(source.get(k, dtype=None), v), (prefix, k)
    want = extract(base, tuned, rank=3, dtype=torch.float32).tensors
    got = extract(base, tmp_path / "tuned1.pt", rank=3, dtype=torch.float32).tensors
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_extract_refuses_identical_models_and_never_overwrites_when_asked(tmp_path):
    """Regression (issue 17): identical models gave a 0-tensor LoRA reported as success, over an existing file."""
    base, tuned = make_pair()
    existing = save_safetensors({"keep": torch.ones(2)}, tmp_path / "old.safetensors")
    before = existing.read_bytes()
    with pytest.raises(CheckpointError, match="do not differ: the LoRA would be empty"):
        extract(base, {k: v.clone() for k, v in base.items()}, rank=2, out=tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()
    with pytest.raises(CheckpointError, match="except in 12 q/k norm scales left out"):
        only_norms = {k: v + 1 if k.endswith("_norm.weight") or ".q_norm." in k or ".k_norm." in k else v
                      for k, v in base.items()}
        extract(base, only_norms, rank=2, qk_norms="skip")
    with pytest.raises(FileExistsError, match="old.safetensors"):
        extract(base, tuned, rank=2, out=existing, overwrite=False)
    result = extract(base, tuned, rank=2)
    with pytest.raises(FileExistsError):
        result.save(existing, overwrite=False)
    assert existing.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]
    written = result.save(tmp_path / "new.safetensors", overwrite=False)
    meta = json.loads(__import__("safetensors").safe_open(str(written), "pt").metadata()["accvideo_lora"])
    assert meta["rank"] == 2 and meta["tensors"] == len(result.tensors) and meta["dtype"] == "float16"


def test_cli_errors_are_one_line_naming_the_file_and_exit_2(tmp_path, capsys):
    """Regression (issue 17): bad files gave tracebacks with rc 1 instead of one clear line and rc 2."""
    import pickle

    base, tuned = make_pair()
    good = save_safetensors(base, tmp_path / "base.safetensors")
    save_safetensors(tuned, tmp_path / "tuned.safetensors")
    lora = extract(base, tuned, rank=2, out=tmp_path / "lora.safetensors").path
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(print))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    save_safetensors({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(2, 8)}, tmp_path / "wan.safetensors")
    out = str(tmp_path / "out.safetensors")
    cases = {
        "evil.pt": ["extract", "--base", str(tmp_path / "evil.pt"), "--tuned", str(good), "--rank", "2", "--out", out],
        "cut.safetensors": ["merge", "--base", str(tmp_path / "cut.safetensors"), "--lora", str(lora), "--out", out],
        "missing.safetensors": ["inspect", str(tmp_path / "missing.safetensors")],
        "wan.safetensors": ["merge", "--base", str(good), "--lora", str(tmp_path / "wan.safetensors"), "--out", out],
        "base.safetensors": ["extract", "--base", str(good), "--tuned", str(good), "--rank", "2", "--out", out],
    }
    for name, argv in cases.items():
        assert cli_main(argv) == 2, name
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[extract]")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], (name, err)
    assert not Path(out).exists()
    # the same through the interpreter: no traceback, rc 2
    run = subprocess.run([sys.executable, "-m", "accvideo_core.lora", "inspect", str(tmp_path / "evil.pt")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2 and "Traceback" not in run.stderr and "evil.pt" in run.stderr, run.stderr


def test_fp8_scaled_checkpoints_are_read_de_scaled_like_the_loader(tmp_path):
    """ComfyUI "fp8_scaled" files: extract and merge apply scale_weight as load_transformer does (it was ignored)."""
    from accvideo_core.lora import merge_checkpoint
    from accvideo_core.models.loading import load_transformer

    base, tuned = make_pair()
    scaled, dequant = {}, dict(tuned)
    for k, v in tuned.items():
        if k.startswith("double_blocks.") and k.endswith(".weight") and v.ndim == 2:
            scale = v.abs().max() / 448
            scaled[k] = (v / scale).to(torch.float8_e4m3fn)
            scaled[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
            dequant[k] = scaled[k].float() * scale
        else:
            scaled[k] = v
    scaled["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = save_safetensors({f"model.diffusion_model.{k}": v for k, v in scaled.items()}, tmp_path / "fp8s.safetensors")
    loaded = load_transformer(path, dtype=torch.float32).state_dict()
    key = "double_blocks.0.img_attn_qkv.weight"
    assert torch.equal(loaded[key].float() * loaded[key.removesuffix("weight") + "scale_weight"], dequant[key])
    got = extract(base, path, rank=3, dtype=torch.float32).tensors
    want = extract(base, dequant, rank=3, dtype=torch.float32).tensors
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    lora = extract(base, tuned, rank=2, dtype=torch.float32).tensors
    merged = load_file(merge_checkpoint(path, [(lora, 0.5)], tmp_path / "merged.safetensors"))
    assert merged[key].dtype == torch.bfloat16 and not any(k.endswith("scale_weight") for k in merged)
    expect = merge_into_state_dict(dequant, [(load_lora(lora), 0.5)])[key]
    torch.testing.assert_close(merged[key].float(), expect.float(), rtol=1e-2, atol=1e-3)
