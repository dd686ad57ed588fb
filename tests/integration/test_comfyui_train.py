"""Integration tier: AccVideo Train in a real ComfyUI (COMFYUI_PATH) through ``/prompt``.

The shipped ``accvideo_distill`` workflow (prompt list -> teacher trajectory dump -> AccVideo Train -> AccVideo
Sampler with the returned MODEL -> video) runs end to end on the tiny test model; the student's 5 steps on held-out
noise and a held-out prompt are compared with the teacher's 50 and 5 steps from the same noise. Then: the same
prompt again is served from ComfyUI's cache; an interrupt leaves a checkpoint that a re-queue resumes; progress
(bar and text with loss and ETA) reaches the websocket; bad inputs are refused clearly.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid

import pytest

from tests.integration.conftest import TINY_MODEL, error_of
from tests.integration.test_comfyui_api import add, api_twin, nodes_of, saved, tiny

HELD_OUT_SEED = 77            # not among the data set's seeds (prompt list first_seed 2048 + i)
N_PROMPTS = 12                # 8 train + 4 held out by the trainer's validation
TRAIN = dict(steps=8, lora_rank=8, learning_rate=3e-3, lambda_adv=0.1, training_seed=0)


def _distill(folder: str, name: str, *, prompts: int = N_PROMPTS, **train) -> tuple[dict, dict[str, str]]:
    """The shipped workflow on the tiny model with ``prompts`` prompts, writing into ``output/folder``."""
    wf = tiny(api_twin("accvideo_distill"))
    ids = {t: nodes_of(wf, t)[0] for t in ("AccVideoPromptList", "AccVideoTrajectoryDump", "AccVideoTrain",
                                            "AccVideoSampler", "UNETLoader", "EmptyHunyuanLatentVideo")}
    text = "\n".join(f"data-set prompt number {i}" for i in range(prompts))
    wf[ids["AccVideoPromptList"]]["inputs"]["prompts"] = text
    wf[ids["AccVideoTrajectoryDump"]]["inputs"].update(filename_prefix=folder, dtype="float32")
    wf[ids["AccVideoTrain"]]["inputs"].update(synvid_folder=folder, output_name=name, **{**TRAIN, **train})
    wf[ids["AccVideoSampler"]]["inputs"]["seed"] = HELD_OUT_SEED
    return wf, ids


def test_distill_workflow_student_beats_teacher_five_steps_on_held_out_noise(comfy_api):
    wf, ids = _distill("synvid/train_e2e", "train_e2e")
    cond = [k for k, v in wf.items() if v["class_type"] == "AccVideoTest_Conditioning"
            and not isinstance(v["inputs"]["text"], list)][0]  # the held-out prompt of the sampler
    common = dict(positive=[cond, 0], latent_image=[ids["EmptyHunyuanLatentVideo"], 0], seed=HELD_OUT_SEED,
                  shift=7.0, guidance=6.0, guidance_source="widget")
    teacher5 = add(wf, "AccVideoSampler", model=[ids["UNETLoader"], 0], steps=5, **common)
    teacher50 = add(wf, "AccVideoSampler", model=[ids["UNETLoader"], 0], steps=50, **common)
    for name, node in (("e2e_student5", ids["AccVideoSampler"]), ("e2e_teacher5", teacher5),
                       ("e2e_teacher50", teacher50)):
        add(wf, "AccVideoTest_SaveTensors", name=name, latent=[node, 0])
    entry = comfy_api.run(wf, timeout=1200)
    assert error_of(entry) is None, error_of(entry)
    lora = entry["outputs"][ids["AccVideoTrain"]]["text"][0].split(":")[0]
    assert lora == "train_e2e.safetensors" and (comfy_api.base / "models/loras" / lora).is_file()
    assert len(list((comfy_api.output / "synvid/train_e2e/samples").glob("*.safetensors"))) == N_PROMPTS
    s5, t5, t50 = (saved(comfy_api, n)["latent"] for n in ("e2e_student5", "e2e_teacher5", "e2e_teacher50"))
    student, teacher = (s5 - t50).pow(2).mean().item(), (t5 - t50).pow(2).mean().item()
    ratio = student / teacher
    print(f"held-out noise and prompt: MSE to teacher-50 of student-5 {student:.4g}, teacher-5 {teacher:.4g}, "
          f"ratio {ratio:.3f}; trainer's validation: {entry['outputs'][ids['AccVideoTrain']]['text'][0]}")
    assert ratio < 1.0

    # the same prompt again: ComfyUI's cache serves the trainer (nothing retrained, no second file)
    again = comfy_api.run(wf, timeout=600)
    cached = [data for event, data in again["status"]["messages"] if event == "execution_cached"][0]["nodes"]
    assert ids["AccVideoTrain"] in cached, cached
    assert sorted(p.name for p in (comfy_api.base / "models/loras").glob("train_e2e*")) == [lora]


def test_train_node_checkpoints_on_interrupt_and_resumes_on_requeue(comfy_api):
    pytest.importorskip("aiohttp")
    wf, ids = _distill("synvid/train_resume", "train_resume", prompts=6, steps=6, lambda_adv=0.0)
    train = ids["AccVideoTrain"]

    async def follow(prompt: dict, interrupt_at: int | None) -> tuple[list, list, list, str]:
        progress, texts, events, pid = [], [], [], ""
        async with contextlib.aclosing(comfy_api.messages(prompt)) as messages:
            async for prompt_id, data in messages:
                pid = prompt_id
                if isinstance(data, bytes):
                    kind, = struct.unpack(">I", data[:4])
                    if kind == 3:  # progress text: node id length, node id, text
                        n, = struct.unpack(">I", data[4:8])
                        if data[8:8 + n].decode() == train:
                            texts.append(data[8 + n:].decode())
                    continue
                events.append(data["type"])
                if data["type"] == "progress" and data["data"].get("node") == train:
                    progress.append((data["data"]["value"], data["data"]["max"]))
                    if interrupt_at is not None and data["data"]["value"] == interrupt_at:
                        comfy_api.post("/interrupt", {})
                if data["type"] in ("execution_success", "execution_interrupted", "execution_error") and \
                        data["data"].get("prompt_id") == prompt_id:
                    break
        return progress, texts, events, pid

    progress, texts, events, _ = asyncio.run(asyncio.wait_for(follow(wf, interrupt_at=2), 900))
    assert "execution_interrupted" in events, events
    assert progress[:2] == [(1, 6), (2, 6)] and len(progress) < 6, progress
    # after each iteration its progress line; inside one (at most every 2 s) that line and where the iteration is
    assert texts and all(("ETA" in t and "traj" in t) or t.startswith("iteration ") for t in texts), texts
    runs = list((comfy_api.output / "accvideo_runs").glob("train_resume_*"))
    assert len(runs) == 1
    latest = json.loads((runs[0] / "checkpoints/latest.json").read_text())
    assert 2 <= latest["step"] < 6
    assert not (comfy_api.base / "models/loras/train_resume.safetensors").exists()

    progress, texts, events, pid = asyncio.run(asyncio.wait_for(follow(wf, interrupt_at=None), 900))
    assert "execution_success" in events, events
    assert progress and progress[0][0] == latest["step"] + 1 and progress[-1] == (6, 6), progress
    text = comfy_api.history(pid, timeout=60)["outputs"][train]["text"][0]   # stored after execution_success
    assert f"resumed from step {latest['step']}" in text, text
    assert (comfy_api.base / "models/loras/train_resume.safetensors").is_file()


@pytest.mark.parametrize("change,message", [
    ({"synvid_folder": "../outside"}, "leaves the output folder"),
    ({"synvid_folder": "synvid/never_written"}, "SynVid folder not found"),
    ({"output_name": "../x"}, "plain file name"),
])
def test_train_node_refuses_bad_inputs_clearly(comfy_api, change, message):
    wf = {}
    model = add(wf, "UNETLoader", unet_name=TINY_MODEL, weight_dtype="default")
    add(wf, "AccVideoTrain", model=[model, 0], **{"synvid_folder": "synvid/x", "output_name": "bad", **TRAIN,
                                                   **change})
    status, answer = comfy_api.post("/prompt", {"prompt": wf, "client_id": uuid.uuid4().hex})
    if status != 200:  # refused at validation, before anything runs
        assert message in json.dumps(answer), answer
        return
    err = error_of(comfy_api.run(wf))
    assert err is not None and message in err, err


def test_train_node_trains_a_lora_on_fp8_weights_and_refuses_a_full_fine_tune_of_them(comfy_api):
    """UNETLoader weight_dtype fp8_e4m3fn (how a 24 GB card holds the 13B teacher): LoRA rank > 0 trains adapters
    on the frozen fp8 base and returns a student that samples differently from the fp8 teacher; rank 0 (a full
    fine-tune of fp8 weights) is refused, naming the LoRA mode and the bf16 file."""
    from accvideo_core.lora import load_lora

    wf, ids = _distill("synvid/train_fp8", "train_fp8", prompts=5, steps=2, offload_activations=True)
    wf[ids["UNETLoader"]]["inputs"]["weight_dtype"] = "fp8_e4m3fn"   # with offloading: the 24-48 GB setting
    for nid in [k for k, v in wf.items() if v["class_type"] in ("AccVideoVAEDecode", "AccVideoSaveVideo",
                                                                 "VAELoader")]:
        del wf[nid]
    wf[ids["AccVideoTrajectoryDump"]]["inputs"]["steps"] = 5
    add(wf, "AccVideoTest_SaveTensors", name="fp8_student", latent=[ids["AccVideoSampler"], 0])
    teacher = add(wf, "AccVideoSampler", **{**wf[ids["AccVideoSampler"]]["inputs"], "model": [ids["UNETLoader"], 0]})
    add(wf, "AccVideoTest_SaveTensors", name="fp8_teacher", latent=[teacher, 0])
    entry = comfy_api.run(wf, timeout=900)
    assert error_of(entry) is None, error_of(entry)
    name = entry["outputs"][ids["AccVideoTrain"]]["text"][0].split(":")[0]
    lora = load_lora(comfy_api.base / "models/loras" / name)
    assert name == "train_fp8.safetensors" and len(lora.modules) > 0 and not lora.unused
    student, teacher5 = (saved(comfy_api, n)["latent"] for n in ("fp8_student", "fp8_teacher"))
    assert (student - teacher5).abs().max() > 1e-4, "the returned MODEL is still the fp8 teacher"
    run = [r for r in (comfy_api.output / "accvideo_runs").glob("train_fp8_*") if (r / "config.json").is_file()]
    assert len(run) == 1 and json.loads((run[0] / "config.json").read_text())["model"]["offload_checkpoints"]

    wf[ids["AccVideoTrain"]]["inputs"].update(lora_rank=0, output_name="train_fp8_full")
    err = error_of(comfy_api.run(wf))
    assert err is not None and "fp8" in err and "Train a LoRA" in err and "bf16" in err, err


def test_full_fine_tune_saves_a_student_the_unet_loader_reads_as_the_returned_model(comfy_api):
    """lora_rank 0: the full student goes into diffusion_models; the returned MODEL (the teacher with the student's
    weights as patches) samples exactly like that file loaded by native UNETLoader."""
    wf, ids = _distill("synvid/train_full", "train_full", prompts=5, steps=1, lora_rank=0, learning_rate=1e-3)
    for nid in [k for k, v in wf.items() if v["class_type"] in ("AccVideoVAEDecode", "AccVideoSaveVideo",
                                                                 "VAELoader")]:
        del wf[nid]
    wf[ids["AccVideoTrajectoryDump"]]["inputs"]["steps"] = 10
    add(wf, "AccVideoTest_SaveTensors", name="full_returned", latent=[ids["AccVideoSampler"], 0])
    entry = comfy_api.run(wf, timeout=900)
    assert error_of(entry) is None, error_of(entry)
    name = entry["outputs"][ids["AccVideoTrain"]]["text"][0].split(":")[0]
    assert name == "train_full.safetensors" and (comfy_api.base / "models/diffusion_models" / name).is_file()
    check = {k: v for k, v in wf.items() if v["class_type"] in ("AccVideoTest_Conditioning", "EmptyHunyuanLatentVideo")
             and not isinstance(v["inputs"].get("text"), list)}
    loader = add(check, "UNETLoader", unet_name=name, weight_dtype="default")
    sampler = add(check, "AccVideoSampler", **{**wf[ids["AccVideoSampler"]]["inputs"], "model": [loader, 0]})
    add(check, "AccVideoTest_SaveTensors", name="full_loaded", latent=[sampler, 0])
    teacher = add(check, "UNETLoader", unet_name=TINY_MODEL, weight_dtype="default")
    base = add(check, "AccVideoSampler", **{**wf[ids["AccVideoSampler"]]["inputs"], "model": [teacher, 0]})
    add(check, "AccVideoTest_SaveTensors", name="full_teacher", latent=[base, 0])
    entry = comfy_api.run(check)
    assert error_of(entry) is None, error_of(entry)
    returned, loaded, teacher5 = (saved(comfy_api, n)["latent"] for n in ("full_returned", "full_loaded",
                                                                           "full_teacher"))
    assert (returned - teacher5).abs().max() > 1e-3, "the returned MODEL is still the teacher"
    diff = (returned - loaded).abs().max().item()
    print(f"full fine-tune: returned MODEL vs the saved student through UNETLoader: max abs diff {diff:.3g}")
    assert diff <= 1e-5
