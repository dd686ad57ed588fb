"""Integration tier, API level: a real ComfyUI (COMFYUI_PATH) on loopback with the pack loaded.

The shipped API workflows are run with test models: the tiny random HunyuanVideo replaces the checkpoints, the
full-size random VAE the VAE, and the test node AccVideoTest_Conditioning replaces DualCLIPLoader +
CLIPTextEncode (the real text encoders are multi-GB downloads); sizes shrink to 64x48, 9 frames.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration import comfy_standin
from tests.integration.conftest import (RANDOM_VAE, TEXT_DIM, TINY_LORA, TINY_MODEL, TINY_TUNED, error_of,
                                        make_assets)

ROOT = Path(__file__).resolve().parents[2]
NATIVE = json.loads((ROOT / "tests/data/native_nodes.json").read_text())
W, H, FRAMES = 64, 48, 9
PROJECTED = ("default", "min", "max", "step", "control_after_generate", "forceInput", "tooltip", "multiline")


def api_twin(name: str) -> dict:
    return json.loads((ROOT / "workflows" / "api" / f"{name}_api.json").read_text())


def tiny(workflow: dict, *, width: int = W, height: int = H, length: int = FRAMES) -> dict:
    """The workflow with test models, test conditioning and a small video size."""
    wf = json.loads(json.dumps(workflow))
    for nid, node in list(wf.items()):
        ct, inputs = node["class_type"], node["inputs"]
        if ct == "UNETLoader":
            inputs["unet_name"] = TINY_MODEL
        elif ct == "VAELoader":
            inputs["vae_name"] = RANDOM_VAE
        elif ct in ("AccVideoLoraLoader", "LoraLoaderModelOnly"):
            inputs["lora_name"] = TINY_LORA
        elif ct == "EmptyHunyuanLatentVideo":
            inputs.update(width=width, height=height, length=length)
        elif ct == "DualCLIPLoader":
            del wf[nid]
        elif ct == "CLIPTextEncode":
            wf[nid] = {"class_type": "AccVideoTest_Conditioning",
                       "inputs": {"text": inputs["text"], "seed": 0, "tokens": 7, "dim": TEXT_DIM}}
    return wf


def add(wf: dict, class_type: str, **inputs) -> str:
    nid = str(max(int(k) for k in wf) + 1) if wf else "1"
    wf[nid] = {"class_type": class_type, "inputs": inputs}
    return nid


def saved(server, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(server.output / f"{name}.safetensors"))


def nodes_of(wf: dict, class_type: str) -> list[str]:
    return [k for k, v in wf.items() if v["class_type"] == class_type]


# ------------------------------------------------------------------------------------------------ registration
def test_object_info_lists_every_node_as_the_standin_describes_it(comfy_api):
    info = comfy_api.get("/object_info")
    for nid, schema in comfy_standin.schemas().items():
        assert nid in info, f"{nid} missing from /object_info"
        want, got = comfy_standin.object_info(schema), info[nid]
        assert got["input_order"] == want["input_order"], nid
        for section, names in want["input_order"].items():
            for name in names:
                w, g = want["input"][section][name] + [{}], got["input"][section][name] + [{}]
                assert g[0] == w[0], f"{nid}.{name}: type {g[0]} != {w[0]}"
                for key in PROJECTED:
                    assert g[1].get(key) == w[1].get(key), f"{nid}.{name}.{key}: {g[1].get(key)} != {w[1].get(key)}"
                if w[0] == "COMBO" and w[1]["options"]:
                    assert g[1]["options"] == w[1]["options"], f"{nid}.{name} options"
        for key in ("output", "output_is_list", "output_name", "output_node", "category", "display_name",
                    "description"):
            assert got[key] == want[key], f"{nid}.{key}"


def test_server_start_moves_to_a_new_port_when_its_port_is_taken(tmp_path, comfyui_path, monkeypatch):
    """The fixture's port pick races with other processes: a port taken before ComfyUI binds it costs a retry on a
    new port, not a failed session (the flake this guards against)."""
    import socket

    from tests.integration import conftest

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # bound, not listening: ComfyUI's bind fails, a probe is refused at once
        taken = blocker.getsockname()[1]
        picks = iter([taken])
        real = conftest.free_port
        monkeypatch.setattr(conftest, "free_port", lambda: next(picks, None) or real())
        server = conftest.start_server(comfyui_path, tmp_path / "retry", front_end=False)
        try:
            assert not server.url.endswith(f":{taken}") and server.get("/system_stats")["system"]
            assert str(tmp_path / "retry" / "output") in server.get("/system_stats")["system"]["argv"]
        finally:
            conftest.stop_server(server)


def test_pack_imports_without_failure(comfy_api):
    log = comfy_api.log.read_text()
    ours = [line for line in log.splitlines() if "custom_nodes/ComfyUI-AccVideo" in line]
    assert any("seconds:" in line and "IMPORT FAILED" not in line for line in ours), ours
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], ours


def test_native_snapshot_matches_this_comfyui(comfy_api):
    """The /object_info snapshot the CI tier checks the workflows against equals this ComfyUI's."""
    info = comfy_api.get("/object_info")
    files = set(NATIVE["file_list_inputs"])
    for name, snap in NATIVE["nodes"].items():
        live = json.loads(json.dumps(info[name]))
        for section in ("required", "optional"):
            for inp, spec in live["input"].get(section, {}).items():
                if inp in files:
                    spec[0] = []
        for key, value in snap.items():
            assert live[key] == value, f"{name}.{key} changed in this ComfyUI: refresh native_nodes.json"


def test_template_browser_lists_exactly_the_example_workflows(comfy_api):
    templates = comfy_api.get("/workflow_templates")
    names = sorted(p.stem for p in (ROOT / "workflows" / "ui").glob("*.json"))
    assert sorted(templates.get("ComfyUI-AccVideo", [])) == names  # no duplicates, no API twins
    for name in names:
        served = json.loads(comfy_api.get_bytes(f"/api/workflow_templates/ComfyUI-AccVideo/{name}.json"))
        assert served == json.loads((ROOT / "workflows" / "ui" / f"{name}.json").read_text())


# ---------------------------------------------------------------------------------------------------- sampling
def test_sampler_equals_native_ksampler(comfy_api):
    wf = tiny(api_twin("accvideo_t2v"))
    model, = nodes_of(wf, "UNETLoader")
    cond, = nodes_of(wf, "AccVideoTest_Conditioning")
    latent, = nodes_of(wf, "EmptyHunyuanLatentVideo")
    ours, = nodes_of(wf, "AccVideoSampler")
    for nid in nodes_of(wf, "AccVideoVAEDecode") + nodes_of(wf, "AccVideoSaveVideo") + nodes_of(wf, "VAELoader"):
        del wf[nid]
    wf[ours]["inputs"]["seed"] = 77
    shifted = add(wf, "ModelSamplingSD3", model=[model, 0], shift=7.0)
    guided = add(wf, "FluxGuidance", conditioning=[cond, 0], guidance=6.0)
    native = add(wf, "KSampler", model=[shifted, 0], seed=77, steps=5, cfg=1.0, sampler_name="euler",
                 scheduler="simple", positive=[guided, 0], negative=[cond, 0], latent_image=[latent, 0], denoise=1.0)
    add(wf, "AccVideoTest_SaveTensors", name="sampler_ours", latent=[ours, 0])
    add(wf, "AccVideoTest_SaveTensors", name="sampler_native", latent=[native, 0])
    entry = comfy_api.run(wf)
    assert error_of(entry) is None, error_of(entry)
    a, b = saved(comfy_api, "sampler_ours")["latent"], saved(comfy_api, "sampler_native")["latent"]
    assert a.shape == (1, 16, 3, H // 8, W // 8) and a.std() > 0.1
    diff = (a - b).abs().max().item()
    print(f"AccVideo Sampler vs native KSampler(euler, simple, 5, cfg 1): max abs diff {diff:.3g}")
    assert diff <= 1e-4


def test_our_fp8_scaled_files_sample_in_comfyui_like_their_de_scaled_values(comfy_api):
    """`loading convert --fp8` and `lora merge --dtype fp8` write every Linear weight in fp8 with a per-layer
    scale_weight and the scaled_fp8 marker: native UNETLoader reads them and samples close to the fp32 file of
    their de-scaled values. Not equal: ComfyUI also stores the model's other weights (norms, biases, the patch
    conv) in fp8 for such a file, its own choice (measured 0.7 % apart; a file with only the block Linears
    scaled, which ComfyUI reads with the others cast unscaled, was 3.3 % apart, and a reader ignoring the scales
    would see weights up to 448 / max|W| times too large). The exact check of the weights is
    tests/test_transformer_loading.py::test_native_comfyui_reads_our_fp8_scaled_weights."""
    from accvideo_core.lora.merge import FP8, merge_checkpoint
    from accvideo_core.models.loading import load_transformer, save_transformer
    from accvideo_core.testing import dequantized_state
    from accvideo_core.utils.io import read_state_dict

    models = comfy_api.base / "models/diffusion_models"
    converted = save_transformer(load_transformer(models / TINY_MODEL, dtype=torch.float32,
                                                  storage_dtype=torch.float8_e4m3fn), models / "fp8_converted.safetensors")
    merged = merge_checkpoint(models / TINY_MODEL, [(comfy_api.base / "models/loras" / TINY_LORA, 0.5)],
                              models / "fp8_merged.safetensors", dtype=FP8)
    for path in (converted, merged):
        state = read_state_dict(path)
        assert "scaled_fp8" in state and any(k.endswith(".scale_weight") for k in state), path.name
        plain = load_transformer(dequantized_state({k: v for k, v in state.items() if k != "scaled_fp8"}))
        save_transformer(plain, models / f"{path.stem}_values.safetensors", dtype=torch.float32)
    wf = tiny(api_twin("accvideo_t2v"))
    model, = nodes_of(wf, "UNETLoader")
    ours, = nodes_of(wf, "AccVideoSampler")
    for nid in nodes_of(wf, "AccVideoVAEDecode") + nodes_of(wf, "AccVideoSaveVideo") + nodes_of(wf, "VAELoader"):
        del wf[nid]
    wf[ours]["inputs"]["seed"] = 77
    for name in ("fp8_converted", "fp8_converted_values", "fp8_merged", "fp8_merged_values"):
        loader = add(wf, "UNETLoader", unet_name=f"{name}.safetensors", weight_dtype="default")
        sampled = add(wf, "AccVideoSampler", **{**wf[ours]["inputs"], "model": [loader, 0]})
        add(wf, "AccVideoTest_SaveTensors", name=name, latent=[sampled, 0])
    add(wf, "AccVideoTest_SaveTensors", name="fp8_reference", latent=[ours, 0])
    entry = comfy_api.run(wf)
    assert error_of(entry) is None, error_of(entry)
    reference = saved(comfy_api, "fp8_reference")["latent"]
    for name in ("fp8_converted", "fp8_merged"):
        fp8, values = saved(comfy_api, name)["latent"], saved(comfy_api, f"{name}_values")["latent"]
        rel = ((fp8 - values).norm() / values.norm()).item()
        print(f"{name}: ComfyUI on the fp8_scaled file vs on its de-scaled values: relative difference {rel:.2e}; "
              f"vs the bf16/fp32 original {((fp8 - reference).norm() / reference.norm()).item():.2e}")
        assert rel <= 0.02, name


def test_sampler_reports_progress_with_latent_previews(comfy_api):
    pytest.importorskip("aiohttp")
    wf = tiny(api_twin("accvideo_t2v"))
    for nid in nodes_of(wf, "AccVideoVAEDecode") + nodes_of(wf, "AccVideoSaveVideo") + nodes_of(wf, "VAELoader"):
        del wf[nid]
    ours, = nodes_of(wf, "AccVideoSampler")
    wf[ours]["inputs"].update(seed=5, steps=6)
    add(wf, "AccVideoTest_SaveTensors", name="progress_run", latent=[ours, 0])

    async def follow() -> tuple[list, int]:
        progress, previews = [], 0
        async with contextlib.aclosing(comfy_api.messages(wf)) as messages:
            async for prompt_id, data in messages:
                if isinstance(data, bytes):
                    previews += 1
                    continue
                if data["type"] == "progress" and data["data"].get("node") == ours:
                    progress.append((data["data"]["value"], data["data"]["max"]))
                if data["type"] == "executing" and data["data"]["node"] is None and \
                        data["data"].get("prompt_id") == prompt_id:
                    break
                if data["type"] == "execution_error":
                    raise AssertionError(data)
        return progress, previews

    progress, previews = asyncio.run(asyncio.wait_for(follow(), 300))
    assert progress == [(i, 6) for i in range(1, 7)]
    assert previews >= 6, "no latent preview images were sent"


def test_sampler_is_interruptible(comfy_api):
    wf = tiny(api_twin("accvideo_t2v"), width=256, height=256, length=33)
    for nid in nodes_of(wf, "AccVideoVAEDecode") + nodes_of(wf, "AccVideoSaveVideo") + nodes_of(wf, "VAELoader"):
        del wf[nid]
    ours, = nodes_of(wf, "AccVideoSampler")
    wf[ours]["inputs"].update(seed=9, steps=200)
    add(wf, "AccVideoTest_SaveTensors", name="interrupted", latent=[ours, 0])
    timer = threading.Timer(6.0, lambda: comfy_api.post("/interrupt", {}))
    timer.start()
    started = time.monotonic()
    entry = comfy_api.run(wf, timeout=600)
    timer.cancel()
    events = [e for e, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in events, events
    assert time.monotonic() - started < 120
    assert not (comfy_api.output / "interrupted.safetensors").exists()


@pytest.mark.parametrize("length,width,message", [(10, 64, r"4k\+1"), (9, 40, "multiple of 16")])
def test_sampler_rejects_bad_sizes_clearly(comfy_api, length, width, message):
    import re

    wf = tiny(api_twin("accvideo_t2v"), width=width, length=length)
    entry = comfy_api.run(wf)
    err = error_of(entry)
    assert err is not None and re.search(message, err), err
    assert "EmptyHunyuanLatentVideo" in err or "try" in err


# -------------------------------------------------------------------------------------------------------- LoRA
def _lycoris_lora(server, kind: str) -> str:
    """A LyCORIS LoHa (kohya ``lora_unet_`` names) or LoKr (``diffusion_model.`` dotted names) of random factors
    for the tiny model, written into the loras folder; returns its name. (Native ComfyUI does not read SimpleTuner's
    ``lycoris_`` names for HunyuanVideo; ours does, tested in tests/test_lora_lycoris.py.)"""
    from accvideo_core.lora.comfy_names import to_comfy_key
    from safetensors.torch import save_file

    shapes = {k: v.shape for k, v in load_file(str(make_assets()[TINY_MODEL])).items()}
    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for module in ("double_blocks.0.img_attn_qkv", "double_blocks.0.txt_mlp.fc1", "single_blocks.0.linear1",
                   "single_blocks.0.linear2", "img_in.proj"):
        rows, cols = shapes[f"{module}.weight"][0], shapes[f"{module}.weight"][1:].numel()
        internal = to_comfy_key(f"{module}.weight").removesuffix(".weight")
        if kind == "loha":
            name, factors = "lora_unet_" + internal.replace(".", "_"), {
                "hada_w1_a": (rows, 2), "hada_w1_b": (2, cols), "hada_w2_a": (rows, 3), "hada_w2_b": (3, cols)}
        else:  # w1 whole (4 x 4), w2 = w2_a @ w2_b: ComfyUI's scale alpha / rank(w2)
            name, factors = f"diffusion_model.{internal}", {
                "lokr_w1": (4, 4), "lokr_w2_a": (rows // 4, 2), "lokr_w2_b": (2, cols // 4)}
        tensors.update({f"{name}.{role}": torch.randn(shape, generator=gen) * 0.3 for role, shape in factors.items()})
        tensors[f"{name}.alpha"] = torch.tensor(5.0)
    file_name = f"accvideo_test_{kind}.safetensors"
    save_file(tensors, str(server.base / "models/loras" / file_name))
    return file_name


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_lora_loader_equals_native_lora_loader(comfy_api, kind):
    lora_name = TINY_LORA if kind == "lora" else _lycoris_lora(comfy_api, kind)
    wf = {}
    base = add(wf, "UNETLoader", unet_name=TINY_MODEL, weight_dtype="default")
    cond = add(wf, "AccVideoTest_Conditioning", text="a lora test", seed=1, tokens=7, dim=TEXT_DIM)
    latent = add(wf, "EmptyHunyuanLatentVideo", width=W, height=H, length=FRAMES, batch_size=1)
    ours = add(wf, "AccVideoLoraLoader", model=[base, 0], lora_name=lora_name, strength=0.8)
    native = add(wf, "LoraLoaderModelOnly", model=[base, 0], lora_name=lora_name, strength_model=0.8)
    for name, model in (("lora_ours", ours), ("lora_native", native), ("lora_none", base)):
        s = add(wf, "AccVideoSampler", model=[model, 0], positive=[cond, 0], latent_image=[latent, 0], seed=3,
                steps=5, shift=7.0, guidance=6.0, guidance_source="widget")
        add(wf, "AccVideoTest_SaveTensors", name=name, latent=[s, 0])
    entry = comfy_api.run(wf)
    assert error_of(entry) is None, error_of(entry)
    a, b, c = (saved(comfy_api, n)["latent"] for n in ("lora_ours", "lora_native", "lora_none"))
    assert (a - c).abs().max() > 1e-2, "the LoRA changed nothing"
    diff = (a - b).abs().max().item()
    print(f"AccVideo LoRA Loader vs native LoraLoaderModelOnly ({kind}): max abs diff {diff:.3g}")
    assert diff <= 1e-4
    log = comfy_api.log.read_text()
    assert "lora key not loaded" not in log and f"AccVideo LoRA {lora_name}" not in log


def test_lora_loader_reports_keys_it_cannot_use(comfy_api):
    from safetensors.torch import save_file

    lora = load_file(str(make_assets()[TINY_LORA]))
    down = next(v for k, v in lora.items() if k.endswith("img_attn_qkv.lora_down.weight")).clone()
    up = next(v for k, v in lora.items() if k.endswith("img_attn_qkv.lora_up.weight")).clone()
    lora["diffusion_model.double_blocks.7.img_attn_qkv.lora_down.weight"] = down  # block absent from the model
    lora["diffusion_model.double_blocks.7.img_attn_qkv.lora_up.weight"] = up
    lora["some_other_model.layer.lora_down.weight"] = down.clone()  # not a HunyuanVideo key
    save_file(lora, str(comfy_api.base / "models/loras/accvideo_test_partial.safetensors"))
    wf = {}
    base = add(wf, "UNETLoader", unet_name=TINY_MODEL, weight_dtype="default")
    cond = add(wf, "AccVideoTest_Conditioning", text="partial", seed=1, tokens=7, dim=TEXT_DIM)
    latent = add(wf, "EmptyHunyuanLatentVideo", width=W, height=H, length=1, batch_size=1)
    patched = add(wf, "AccVideoLoraLoader", model=[base, 0], lora_name="accvideo_test_partial.safetensors",
                  strength=1.0)
    s = add(wf, "AccVideoSampler", model=[patched, 0], positive=[cond, 0], latent_image=[latent, 0], seed=3, steps=1,
            shift=7.0, guidance=6.0, guidance_source="widget")
    add(wf, "AccVideoTest_SaveTensors", name="lora_partial", latent=[s, 0])
    entry = comfy_api.run(wf)
    assert error_of(entry) is None, error_of(entry)
    lines = [line for line in comfy_api.log.read_text().splitlines()
             if "AccVideo LoRA accvideo_test_partial.safetensors" in line]
    assert len(lines) == 1 and f"3 of {len(lora)} keys not applied" in lines[0], lines
    assert "double_blocks.7" in lines[0] and "some_other_model" in lines[0]


def test_lora_extract_node_writes_a_loadable_lora(comfy_api):
    from accvideo_core.lora.extract import extract
    from accvideo_core.lora.formats import load_lora

    wf = {}
    add(wf, "AccVideoLoraExtract", base_model=TINY_MODEL, distilled_model=TINY_TUNED, rank=4,
        filename="accvideo_test_extracted.safetensors", dtype="float32")
    entry = comfy_api.run(wf)
    assert error_of(entry) is None, error_of(entry)
    path = comfy_api.base / "models/loras/accvideo_test_extracted.safetensors"
    assert path.is_file()
    state = load_lora(path)
    assert state.modules and not state.unused
    assets = make_assets()
    reference = extract(assets[TINY_MODEL], assets[TINY_TUNED], 4, dtype=torch.float32).tensors
    written = load_file(str(path))
    assert set(written) == set(reference)
    for k in reference:
        torch.testing.assert_close(written[k], reference[k])
    bad = {}
    add(bad, "AccVideoLoraExtract", base_model=TINY_MODEL, distilled_model=TINY_TUNED, rank=4,
        filename="../escape.safetensors", dtype="float32")
    assert "plain file name" in (error_of(comfy_api.run(bad)) or "")


# --------------------------------------------------------------------------------------------------------- VAE
def _decode_prompt(latent_frames: int, seed: int) -> dict:
    wf = {}
    vae = add(wf, "VAELoader", vae_name=RANDOM_VAE)
    lat = add(wf, "AccVideoTest_RandomLatent", seed=seed, latent_frames=latent_frames, height=H // 8, width=W // 8)
    ours = add(wf, "AccVideoVAEDecode", vae=[vae, 0], samples=[lat, 0], memory_budget="auto", mode="exact")
    native = add(wf, "VAEDecode", samples=[lat, 0], vae=[vae, 0])
    add(wf, "AccVideoTest_SaveTensors", name=f"vae_{latent_frames}", images=[ours, 0], latent=[lat, 0])
    add(wf, "AccVideoTest_SaveTensors", name=f"vae_native_{latent_frames}", images=[native, 0])
    return wf


def test_vae_decode_equals_native_on_one_latent_frame(comfy_api):
    entry = comfy_api.run(_decode_prompt(1, seed=11))
    assert error_of(entry) is None, error_of(entry)
    ours, native = saved(comfy_api, "vae_1")["images"], saved(comfy_api, "vae_native_1")["images"]
    assert ours.shape == native.shape == (1, H, W, 3)
    assert 0.05 < ours.mean() < 0.95 and ((ours > 0) & (ours < 1)).float().mean() > 0.5, "output mostly clamped"
    diff = (ours - native).abs().max().item()
    print(f"AccVideo VAE Decode vs native VAEDecode, 1 latent frame: max abs diff {diff:.3g}")
    assert diff <= 1e-3


def test_vae_decode_follows_the_official_vae_on_longer_videos(comfy_api):
    from accvideo_core.models.vae_loading import load_vae
    from accvideo_core.video import video_to_frames

    entry = comfy_api.run(_decode_prompt(3, seed=12))
    assert error_of(entry) is None, error_of(entry)
    got = saved(comfy_api, "vae_3")
    ours, latent = got["images"], got["latent"]
    native = saved(comfy_api, "vae_native_3")["images"]
    core = load_vae(make_assets()[RANDOM_VAE], dtype=torch.float32)
    with torch.no_grad():
        reference = video_to_frames(core.decode(latent, mode="untiled"))
    assert ours.shape == reference.shape == (FRAMES, H, W, 3)
    diff = (ours - reference).abs().max().item()
    native_diff = (native - reference).abs().max().item()
    print(f"3 latent frames: AccVideo VAE Decode vs core (official) decoder {diff:.3g}; "
          f"native VAEDecode vs core {native_diff:.3g}")
    assert diff <= 1e-3
    # measured fact for ComfyUI 0.3.64: native mid-block attention has no frame-causal mask
    assert native_diff > 1e-3


# ------------------------------------------------------------------------------------------ workflows end to end
def _video_outputs(entry: dict) -> list[dict]:
    return [v for out in entry["outputs"].values() for v in out.get("images", []) if v["filename"].endswith(".mp4")]


def test_t2v_workflow_saves_an_mp4_with_prompt_and_workflow(comfy_api, tmp_path):
    from accvideo_core.video import read_mp4_metadata
    from tests.helpers import count_frames

    wf = tiny(api_twin("accvideo_t2v"))
    ui = json.loads((ROOT / "workflows/ui/accvideo_t2v.json").read_text())
    entry = comfy_api.run(wf, workflow=ui)
    assert error_of(entry) is None, error_of(entry)
    videos = _video_outputs(entry)
    assert len(videos) == 1 and videos[0]["type"] == "output"
    v = videos[0]
    data = comfy_api.get_bytes(f"/view?filename={v['filename']}&subfolder={v['subfolder']}&type=output")
    path = tmp_path / "t2v.mp4"
    path.write_bytes(data)
    assert count_frames(path) == FRAMES
    meta = read_mp4_metadata(path)
    assert json.loads(meta["prompt"]) == wf
    assert json.loads(meta["workflow"]) == ui


@pytest.mark.parametrize("name,videos", [("accvideo_lora", 1), ("accvideo_trained_lora", 1),
                                         ("accvideo_teacher_vs_student", 3)])
def test_other_workflows_run(comfy_api, name, videos):
    entry = comfy_api.run(tiny(api_twin(name)))
    assert error_of(entry) is None, error_of(entry)
    assert len(_video_outputs(entry)) == videos


# ----------------------------------------------------------------------------------------------------- SynVid
def test_dump_workflow_writes_a_sample_whose_last_latent_is_the_output(comfy_api):
    from accvideo_core.latents import to_model_space
    from accvideo_core.sampling import flow_sigmas
    from accvideo_core.synvid.format import read_sample

    wf = tiny(api_twin("accvideo_synvid_dump"))
    dump, = nodes_of(wf, "AccVideoTrajectoryDump")
    text, = nodes_of(wf, "PrimitiveStringMultiline")
    wf[dump]["inputs"].update(dtype="float32", filename_prefix="synvid/api_test", seed=4242)
    add(wf, "AccVideoTest_SaveTensors", name="dump_latent", latent=[dump, 0])
    entry = comfy_api.run(wf)
    assert error_of(entry) is None, error_of(entry)
    files = entry["outputs"][dump]["text"]
    assert len(files) == 1
    sample = read_sample(comfy_api.output / files[0])
    assert sample.stored_steps == [0, 10, 20, 30, 40, 50] and sample.key_steps == [0, 10, 20, 30, 40, 50]
    assert sample.prompt == wf[text]["inputs"]["value"] and sample.seed == 4242
    assert (sample.frames, sample.height, sample.width) == (FRAMES, H, W) and sample.guidance == 6.0
    torch.testing.assert_close(sample.sigmas, flow_sigmas(50, 7.0))
    assert sample.text_states.shape == (7, TEXT_DIM) and sample.pooled.shape == (768,)
    assert sample.source_model == wf[dump]["inputs"]["model_name"] and sample.source_model_hash.startswith("sha256:")
    latent = saved(comfy_api, "dump_latent")["latent"]
    diff = (sample.latents[-1] - to_model_space(latent[0])).abs().max().item()
    assert diff <= 1e-5, diff
    noise = torch.randn(latent.shape, generator=torch.manual_seed(4242))
    torch.testing.assert_close(sample.latents[0], noise[0])  # step 0 = the seeded initial noise
    assert _video_outputs(entry), "the dump workflow also saves the teacher's video"


def test_dump_rejects_prefix_leaving_output(comfy_api):
    wf = tiny(api_twin("accvideo_synvid_dump"))
    dump, = nodes_of(wf, "AccVideoTrajectoryDump")
    wf[dump]["inputs"]["filename_prefix"] = "../outside_synvid"
    err = error_of(comfy_api.run(wf))
    assert err is not None and "leaves the output folder" in err
    assert not (comfy_api.output.parent / "outside_synvid").exists()


def test_non_finite_values_are_refused_before_sampling(comfy_api):
    """NaN passes ComfyUI's min/max check (every comparison is false): the nodes refuse it before any step."""
    wf = tiny(api_twin("accvideo_synvid_dump"))
    dump, = nodes_of(wf, "AccVideoTrajectoryDump")
    wf[dump]["inputs"].update(filename_prefix="synvid/nan_test", guidance=float("nan"))
    err = error_of(comfy_api.run(wf))
    assert err is not None and "guidance must be a finite number" in err, err
    assert not (comfy_api.output / "synvid/nan_test").exists()
    wf = tiny(api_twin("accvideo_t2v"))
    sampler, = nodes_of(wf, "AccVideoSampler")
    wf[sampler]["inputs"]["shift"] = float("nan")  # inf is refused by ComfyUI's own max check before any node runs
    err = error_of(comfy_api.run(wf))
    assert err is not None and "shift must be a finite number" in err, err


def test_headless_builder_against_real_server(comfy_api, tmp_path):
    from accvideo_core.synvid import build
    from accvideo_core.synvid.format import SynVidDataset

    wf = tiny(api_twin("accvideo_synvid_dump"))
    dump, = nodes_of(wf, "AccVideoTrajectoryDump")
    wf[dump]["inputs"].update(filename_prefix="synvid/builder_test", steps=10)
    for nid in nodes_of(wf, "AccVideoVAEDecode") + nodes_of(wf, "AccVideoSaveVideo") + nodes_of(wf, "VAELoader"):
        del wf[nid]
    wf_path = tmp_path / "dump_api.json"
    wf_path.write_text(json.dumps(wf))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\nthis one should FAIL_ON_PURPOSE\na whale under the sea\n")
    args = ["--server", comfy_api.url, "--workflow", str(wf_path), "--prompts", str(prompts), "--poll", "0.2"]
    assert build.main(args) == 1  # one prompt failed, the batch went on
    records = build.read_state(prompts.with_suffix(".build.jsonl"))
    assert sorted((r["line"], r["status"]) for r in records.values()) == [(1, "done"), (2, "error"), (3, "done")]
    assert any("test conditioning asked to fail" in r.get("error", "") for r in records.values())
    ds = SynVidDataset(comfy_api.output / "synvid/builder_test")
    assert sorted(ds.load(i).prompt for i in range(len(ds))) == ["a red fox in the snow", "a whale under the sea"]
    assert sorted(ds.load(i).seed for i in range(len(ds))) == [1024, 1026]
    assert build.main(args) == 1  # resume: nothing done twice, the failing line is retried
    assert len(SynVidDataset(comfy_api.output / "synvid/builder_test")) == 2
