"""Writes the workflows of the pack: each graph once, as ComfyUI UI format 0.4 (drag-and-drop) and its API twin.

    python -m workflows.generate          # rewrite workflows/ui/*.json, workflows/api/*_api.json and
                                          # example_workflows/*.json
    python -m workflows.generate --check  # exit 1 when a file on disk differs from what this script writes

Widget order comes from the node definitions: ours read through the test stand-in of ComfyUI's API
(``tests/integration/comfy_standin.py``), native ones from the ``/object_info`` snapshot of the ComfyUI version we
test against (``tests/data/native_nodes.json``). ``example_workflows/`` (ComfyUI's template browser)
gets generated copies of the UI files: the browser's static file handler refuses symlinks.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
UI_DIR = WORKFLOWS / "ui"  # not workflows/*.json: ComfyUI also lists a pack's workflows/*.json as templates
API_DIR = WORKFLOWS / "api"
EXAMPLES = ROOT / "example_workflows"
NATIVE_INFO = ROOT / "tests" / "data" / "native_nodes.json"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
FRONTEND_ONLY = ("Note", "MarkdownNote")  # virtual nodes: saved in the UI file, absent from the API prompt

HF_HY = "https://huggingface.co/Comfy-Org/HunyuanVideo_repackaged/resolve/main/split_files"
MODELS = {
    "accvideo": {"name": "accvideo_t2v_5_steps.pt", "directory": "diffusion_models",
                 "url": "https://huggingface.co/aejion/AccVideo/resolve/main/accvideo-t2v-5-steps/"
                        "diffusion_pytorch_model.pt"},
    "teacher": {"name": "hunyuan_video_t2v_720p_bf16.safetensors", "directory": "diffusion_models",
                "url": f"{HF_HY}/diffusion_models/hunyuan_video_t2v_720p_bf16.safetensors"},
    "clip_l": {"name": "clip_l.safetensors", "directory": "text_encoders",
               "url": f"{HF_HY}/text_encoders/clip_l.safetensors"},
    "llava": {"name": "llava_llama3_fp8_scaled.safetensors", "directory": "text_encoders",
              "url": f"{HF_HY}/text_encoders/llava_llama3_fp8_scaled.safetensors"},
    "vae": {"name": "hunyuan_video_vae_bf16.safetensors", "directory": "vae",
            "url": f"{HF_HY}/vae/hunyuan_video_vae_bf16.safetensors"},
}
LORA_NAME = "accvideo_hunyuan_video_lora.safetensors"
TRAINED_LORA_NAME = "accvideo_student_lora.safetensors"  # the trainer's LoRA mode: out_dir/student_lora.safetensors
STYLE_LORA_NAME = "your_hunyuan_video_style_lora.safetensors"
PROMPT = ("A cat walks on the grass, realistic style, warm afternoon light, the camera slowly follows it at low "
          "height.")
WIDTH, HEIGHT, FRAMES, FPS, SEED = 960, 544, 93, 24.0, 1024


def node_definitions() -> dict[str, dict]:
    """``/object_info``-style definitions of every node the workflows may use (ours and native ones)."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.integration import comfy_standin
    finally:
        sys.path.remove(str(ROOT))
    defs = json.loads(NATIVE_INFO.read_text())["nodes"]
    defs.update({nid: comfy_standin.object_info(s) for nid, s in comfy_standin.schemas().items()})
    return defs


def widget_names(definition: dict) -> list[tuple[str, bool]]:
    """(widget name, has a control_after_generate value) in saved-workflow order."""
    out = []
    for section in ("required", "optional"):
        for name in definition["input_order"].get(section, []):
            spec = definition["input"][section][name]
            typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, bool(opts.get("control_after_generate"))))
    return out


@dataclass
class Node:
    id: int
    type: str
    widgets: dict[str, Any]
    links: dict[str, tuple["Node", int]] = field(default_factory=dict)
    title: str | None = None
    pos: tuple[int, int] = (0, 0)
    models: list[dict] = field(default_factory=list)
    text: str | None = None  # for Note nodes


class Graph:
    def __init__(self, name: str, title: str):
        self.name, self.title = name, title
        self.nodes: list[Node] = []

    def add(self, type: str, pos: tuple[int, int], widgets: dict | None = None, title: str | None = None,
            models: list[str] | None = None, **links: tuple[Node, int] | Node) -> Node:
        node = Node(len(self.nodes) + 1, type, dict(widgets or {}), title=title, pos=pos,
                    models=[MODELS[m] for m in models or []])
        node.links = {k: (v, 0) if isinstance(v, Node) else v for k, v in links.items()}
        self.nodes.append(node)
        return node

    def note(self, pos: tuple[int, int], text: str) -> Node:
        node = self.add("MarkdownNote", pos)
        node.text = text
        return node

    # ------------------------------------------------------------------ API format
    def api(self, defs: dict) -> dict:
        prompt = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            d = defs[n.type]
            inputs: dict[str, Any] = {}
            for section in ("required", "optional"):
                for name in d["input_order"].get(section, []):
                    if name in n.links:
                        src, slot = n.links[name]
                        inputs[name] = [str(src.id), slot]
                    elif name in n.widgets:
                        inputs[name] = n.widgets[name]
            unknown = set(n.widgets) | set(n.links)
            unknown -= {name for s in d["input_order"].values() for name in s}
            if unknown:
                raise ValueError(f"{self.name}: node {n.id} ({n.type}) has no inputs {sorted(unknown)}")
            missing = [w for w, _ in widget_names(d) if w not in n.widgets and w not in n.links]
            if missing:
                raise ValueError(f"{self.name}: node {n.id} ({n.type}) lacks widget values {missing}")
            prompt[str(n.id)] = {"class_type": n.type, "inputs": inputs,
                                 "_meta": {"title": n.title or d.get("display_name") or n.type}}
        return prompt

    # ------------------------------------------------------------------ UI format 0.4
    def ui(self, defs: dict) -> dict:
        links, node_out_links = [], {}
        in_slots: dict[int, list[dict]] = {}
        for n in self.nodes:
            if n.type in FRONTEND_ONLY:
                continue
            d = defs[n.type]
            slots = []
            for section in ("required", "optional"):
                for name in d["input_order"].get(section, []):
                    typ, opts = d["input"][section][name][0], (d["input"][section][name] + [{}])[1]
                    is_widget = (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")
                    if name in n.links:
                        src, slot = n.links[name]
                        link_id = len(links) + 1
                        out_type = defs[src.type]["output"][slot]
                        links.append([link_id, src.id, slot, n.id, len(slots), out_type])
                        node_out_links.setdefault((src.id, slot), []).append(link_id)
                        entry = {"name": name, "type": out_type if isinstance(typ, list) else typ, "link": link_id}
                        if is_widget:
                            entry["widget"] = {"name": name}
                        slots.append(entry)
                    elif not is_widget:
                        if section == "required":
                            raise ValueError(f"{self.name}: node {n.id} ({n.type}) input {name} is not connected")
            in_slots[n.id] = slots
        order = self._topological_order()
        nodes = []
        for n in self.nodes:
            entry: dict[str, Any] = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": [340, 120],
                                     "flags": {}, "order": order[n.id], "mode": 0}
            if n.type in FRONTEND_ONLY:
                entry.update(size=[420, 220], inputs=[], outputs=[], properties={}, widgets_values=[n.text],
                             color="#432", bgcolor="#653")
            else:
                d = defs[n.type]
                values = []
                for name, control in widget_names(d):
                    values.append(n.widgets[name] if name in n.widgets else None)
                    if control:
                        values.append("fixed")
                entry["inputs"] = in_slots[n.id]
                entry["outputs"] = [{"name": d["output_name"][i], "type": t,
                                     "links": node_out_links.get((n.id, i), []), **({"slot_index": i}
                                                                                  if (n.id, i) in node_out_links
                                                                                  else {})}
                                    for i, t in enumerate(d["output"])]
                entry["properties"] = {"Node name for S&R": n.type, **({"models": n.models} if n.models else {})}
                entry["widgets_values"] = values
            if n.title:
                entry["title"] = n.title
            nodes.append(entry)
        models = []
        for n in self.nodes:
            for m in n.models:
                if m not in models:
                    models.append(m)
        workflow_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-accvideo/workflows/{self.name}"))
        return {"id": workflow_id, "revision": 0, "last_node_id": len(self.nodes),
                "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.7, "offset": [60, 350]}, "accvideo_workflow": self.title},
                "models": models, "version": 0.4}

    def _topological_order(self) -> dict[int, int]:
        done: dict[int, int] = {}

        def visit(n: Node) -> None:
            if n.id in done:
                return
            for src, _ in n.links.values():
                visit(src)
            done[n.id] = len(done)

        for n in self.nodes:
            visit(n)
        return done


# ---------------------------------------------------------------------------------------------- the workflows
def _text_encoding(g: Graph, x: int, y: int, text: Node | None = None) -> Node:
    clip = g.add("DualCLIPLoader", (x, y), {"clip_name1": MODELS["clip_l"]["name"],
                                            "clip_name2": MODELS["llava"]["name"], "type": "hunyuan_video",
                                            "device": "default"}, models=["clip_l", "llava"])
    widgets = {} if text is not None else {"text": PROMPT}
    links = {"clip": clip, **({"text": text} if text is not None else {})}
    if text is not None:
        widgets["text"] = PROMPT  # the front end keeps the value of a widget fed by a link
    return g.add("CLIPTextEncode", (x + 380, y), widgets, title="Prompt", **links)


def _empty_latent(g: Graph, x: int, y: int) -> Node:
    return g.add("EmptyHunyuanLatentVideo", (x, y), {"width": WIDTH, "height": HEIGHT, "length": FRAMES,
                                                     "batch_size": 1})


def _decode_and_save(g: Graph, latent: Node, vae: Node, x: int, y: int, prefix: str, title: str | None = None):
    images = g.add("AccVideoVAEDecode", (x, y), {"memory_budget": "auto", "mode": "exact"}, vae=vae,
                   samples=latent)
    return g.add("AccVideoSaveVideo", (x + 380, y), {"fps": FPS, "filename_prefix": prefix, "crf": 19},
                 title=title, images=images)


def _sampler_widgets() -> dict:
    return {"seed": SEED, "steps": 5, "shift": 7.0, "guidance": 6.0, "guidance_source": "widget"}


def t2v() -> Graph:
    g = Graph("accvideo_t2v", "AccVideo text-to-video 960x544x93 (full checkpoint, 5 steps)")
    g.note((0, -300), "## AccVideo text-to-video\nThe distilled 5-step HunyuanVideo (AccVideo) from its full "
                      "checkpoint. Official settings: 960x544, 93 frames, 5 steps, shift 7, embedded guidance 6, "
                      "seed 1024, 24 fps. Frames must be 4k+1 and sizes multiples of 16.\n\nModels: the AccVideo "
                      "checkpoint in `diffusion_models`, clip_l + llava_llama3_fp8_scaled in `text_encoders`, "
                      "hunyuan_video_vae_bf16 in `vae`. The front end offers the downloads (the AccVideo checkpoint is a .pt: it offers its URL to copy).")
    model = g.add("UNETLoader", (0, 0), {"unet_name": MODELS["accvideo"]["name"], "weight_dtype": "default"},
                  models=["accvideo"])
    cond = _text_encoding(g, 0, 160)
    latent = _empty_latent(g, 0, 420)
    sampled = g.add("AccVideoSampler", (800, 0), _sampler_widgets(), model=model, positive=cond,
                    latent_image=latent)
    vae = g.add("VAELoader", (800, 420), {"vae_name": MODELS["vae"]["name"]}, models=["vae"])
    _decode_and_save(g, sampled, vae, 1200, 0, "AccVideo/t2v")
    return g


def lora() -> Graph:
    g = Graph("accvideo_lora", "Base HunyuanVideo + AccVideo LoRA (5 steps)")
    g.note((0, -300), "## Base HunyuanVideo + AccVideo LoRA\nNo public AccVideo LoRA exists for HunyuanVideo: make "
                      f"`{LORA_NAME}` once with **AccVideo LoRA Extract** (base = hunyuan_video_t2v_720p_bf16, "
                      "distilled = the AccVideo checkpoint) or `python -m accvideo_core.lora extract`. Other "
                      "HunyuanVideo LoRAs can be stacked after it with more loaders.")
    base = g.add("UNETLoader", (0, 0), {"unet_name": MODELS["teacher"]["name"], "weight_dtype": "default"},
                 models=["teacher"])
    patched = g.add("AccVideoLoraLoader", (380, 0), {"lora_name": LORA_NAME, "strength": 1.0}, model=base)
    _sample_five_steps(g, patched, 160, "AccVideo/lora")
    return g


def _sample_five_steps(g: Graph, model: Node, y: int, prefix: str) -> None:
    """Prompt, empty latent, AccVideo Sampler (5 steps), VAE decode and save: the tail of the LoRA graphs."""
    cond = _text_encoding(g, 0, y)
    latent = _empty_latent(g, 0, y + 260)
    sampled = g.add("AccVideoSampler", (800, 0), _sampler_widgets(), model=model, positive=cond,
                    latent_image=latent)
    vae = g.add("VAELoader", (800, 420), {"vae_name": MODELS["vae"]["name"]}, models=["vae"])
    _decode_and_save(g, sampled, vae, 1200, 0, prefix)


def trained_lora() -> Graph:
    g = Graph("accvideo_trained_lora", "Base HunyuanVideo + trained AccVideo LoRA + a second LoRA (5 steps)")
    g.note((0, -300), "## Trained AccVideo LoRA, stacked\nThe speed-up LoRA the trainer's LoRA mode writes "
                      "(`python -m accvideo_core.train --set model.lora_rank=64 ...` -> `out_dir/student_lora"
                      f".safetensors`, copied to `loras/{TRAINED_LORA_NAME}`) on the base model, loaded by native "
                      "**LoraLoaderModelOnly** at strength 1, then any other HunyuanVideo LoRA (style, character) "
                      "with **AccVideo LoRA Loader**. 5 steps, shift 7, embedded guidance 6, no CFG.")
    base = g.add("UNETLoader", (0, 0), {"unet_name": MODELS["teacher"]["name"], "weight_dtype": "default"},
                 models=["teacher"])
    fast = g.add("LoraLoaderModelOnly", (380, 0), {"lora_name": TRAINED_LORA_NAME, "strength_model": 1.0},
                 title="AccVideo LoRA (trained)", model=base)
    styled = g.add("AccVideoLoraLoader", (380, 160), {"lora_name": STYLE_LORA_NAME, "strength": 0.8},
                   title="Second LoRA", model=fast)
    _sample_five_steps(g, styled, 320, "AccVideo/trained_lora")
    return g


def synvid_dump() -> Graph:
    g = Graph("accvideo_synvid_dump", "SynVid: teacher trajectory dump (50 steps) for AccVideo distillation")
    g.note((0, -300), "## SynVid trajectory dump\nThe HunyuanVideo teacher (50 steps, shift 7, guidance 6) writes "
                      "one SynVid sample per run into `output/synvid/accvideo` (key latents at steps 0, 10, ..., "
                      "50, the text conditioning, prompt, seed, settings). At scale, drive the API twin headless "
                      "with `python -m accvideo_core.synvid.build --server http://127.0.0.1:8188 --workflow "
                      "workflows/api/accvideo_synvid_dump_api.json --prompts prompts.txt`.")
    teacher = g.add("UNETLoader", (0, 0), {"unet_name": MODELS["teacher"]["name"], "weight_dtype": "default"},
                    models=["teacher"])
    text = g.add("PrimitiveStringMultiline", (0, 160), {"value": PROMPT}, title="Prompt text")
    cond = _text_encoding(g, 0, 380, text=text)
    latent = _empty_latent(g, 0, 640)
    dumped = g.add("AccVideoTrajectoryDump", (800, 0),
                   {"seed": SEED, "steps": 50, "shift": 7.0, "guidance": 6.0, "guidance_source": "widget",
                    "store": "key latents", "filename_prefix": "synvid/accvideo",
                    "model_name": MODELS["teacher"]["name"], "dtype": "bfloat16"},
                   model=teacher, positive=cond, latent_image=latent, prompt=text)
    vae = g.add("VAELoader", (800, 640), {"vae_name": MODELS["vae"]["name"]}, models=["vae"])
    _decode_and_save(g, dumped, vae, 1200, 0, "synvid/accvideo_videos/video")
    return g


def teacher_vs_student() -> Graph:
    g = Graph("accvideo_teacher_vs_student", "HunyuanVideo teacher (50 steps) vs AccVideo (5 steps), same seed")
    g.note((0, -300), "## Teacher 50 steps vs AccVideo 5 steps\nSame prompt, size and seed. The teacher runs on "
                      "native SamplerCustomAdvanced with the **AccVideo Schedule** (teacher, 50 steps); the student "
                      "on **AccVideo Sampler** (5 steps). Both use embedded guidance 6 and no CFG.")
    teacher = g.add("UNETLoader", (0, 0), {"unet_name": MODELS["teacher"]["name"], "weight_dtype": "default"},
                    title="Teacher (HunyuanVideo)", models=["teacher"])
    student = g.add("UNETLoader", (0, 140), {"unet_name": MODELS["accvideo"]["name"], "weight_dtype": "default"},
                    title="Student (AccVideo)", models=["accvideo"])
    cond = _text_encoding(g, 0, 300)
    latent = _empty_latent(g, 0, 560)
    guided = g.add("FluxGuidance", (800, 300), {"guidance": 6.0}, conditioning=cond)
    guider = g.add("BasicGuider", (1200, 300), model=teacher, conditioning=guided)
    noise = g.add("RandomNoise", (800, 440), {"noise_seed": SEED})
    sampler = g.add("KSamplerSelect", (800, 560), {"sampler_name": "euler"})
    sigmas = g.add("AccVideoSchedule", (800, 680), {"schedule": "teacher (50 steps)", "steps": 50, "shift": 7.0})
    teacher_out = g.add("SamplerCustomAdvanced", (1200, 440), noise=noise, guider=guider, sampler=sampler,
                        sigmas=sigmas, latent_image=latent)
    student_out = g.add("AccVideoSampler", (800, 0), _sampler_widgets(), model=student, positive=cond,
                        latent_image=latent)
    vae = g.add("VAELoader", (1200, 700), {"vae_name": MODELS["vae"]["name"]}, models=["vae"])
    teacher_video = _decode_and_save(g, teacher_out, vae, 1600, 300, "AccVideo/compare_teacher50",
                                     title="Teacher, 50 steps")
    student_video = _decode_and_save(g, student_out, vae, 1600, 0, "AccVideo/compare_accvideo5",
                                     title="AccVideo, 5 steps")
    both = g.add("ImageStitch", (2000, 600), {"direction": "right", "match_image_size": True, "spacing_width": 16,
                                              "spacing_color": "white"}, title="Teacher | AccVideo",
                 image1=teacher_video.links["images"][0], image2=student_video.links["images"][0])
    g.add("AccVideoSaveVideo", (2400, 600), {"fps": FPS, "filename_prefix": "AccVideo/compare_side_by_side",
                                             "crf": 19}, title="Side by side", images=both)
    return g


DISTILL_PROMPTS = "\n".join((
    "a cat walks on the grass, warm afternoon light", "a red car drives along a coastal road at sunset",
    "waves roll onto a sandy beach, aerial view", "a woman in a yellow coat walks through a rainy street",
    "a hot air balloon rises over green hills", "a dog runs through fresh snow in a forest",
    "city traffic at night, long exposure lights", "a chef chops vegetables in a bright kitchen",
    "a sailboat crosses a calm lake at dawn", "fireworks burst over a river in the city",
    "a horse gallops across a dusty field", "clouds move quickly over a mountain peak"))
DISTILL_FOLDER = "synvid/accvideo_distill"


def distill() -> Graph:
    g = Graph("accvideo_distill", "AccVideo in one workflow: teacher trajectories -> distillation -> 5-step student")
    g.note((0, -340), "## Dump, distil, sample: AccVideo in one workflow\nThe 50-step teacher dumps one SynVid "
                      f"trajectory per line of **AccVideo Prompt List** into `output/{DISTILL_FOLDER}`; **AccVideo "
                      "Train** distils it (the trainer of `python -m accvideo_core.train`, LoRA rank 64; the last 4 "
                      "samples are held out for validation) and saves the LoRA into `loras`; the **AccVideo "
                      "Sampler** then runs the returned student in 5 steps on a prompt and seed that are not in "
                      "the data set. Interrupt = checkpoint; queue again to resume. The paper used 38,400 "
                      "trajectories and 8 GPUs: build large data sets headless (`python -m "
                      "accvideo_core.synvid.build`) and train 13B at 720p with torchrun (docs/comfyui.md).")
    teacher = g.add("UNETLoader", (0, 0), {"unet_name": MODELS["teacher"]["name"], "weight_dtype": "default"},
                    title="Teacher (HunyuanVideo)", models=["teacher"])
    prompts = g.add("AccVideoPromptList", (0, 140), {"prompts": DISTILL_PROMPTS, "first_seed": 2048})
    clip = g.add("DualCLIPLoader", (0, 420), {"clip_name1": MODELS["clip_l"]["name"],
                                              "clip_name2": MODELS["llava"]["name"], "type": "hunyuan_video",
                                              "device": "default"}, models=["clip_l", "llava"])
    cond = g.add("CLIPTextEncode", (380, 140), {"text": PROMPT}, title="Data-set prompts", clip=clip,
                 text=(prompts, 0))
    latent = _empty_latent(g, 0, 600)
    dumped = g.add("AccVideoTrajectoryDump", (800, 0),
                   {"seed": SEED, "steps": 50, "shift": 7.0, "guidance": 6.0, "guidance_source": "widget",
                    "store": "key latents", "filename_prefix": DISTILL_FOLDER,
                    "model_name": MODELS["teacher"]["name"], "dtype": "bfloat16"},
                   model=teacher, positive=cond, latent_image=latent, prompt=(prompts, 0), seed=(prompts, 1))
    trained = g.add("AccVideoTrain", (1200, 0), {"synvid_folder": DISTILL_FOLDER, "steps": 1200, "lora_rank": 64,
                                                 "learning_rate": 1e-4, "lambda_adv": 0.1, "training_seed": 0,
                                                 "output_name": "accvideo_student", "offload_activations": False},
                    model=teacher, trajectories=dumped)
    held_out = g.add("CLIPTextEncode", (380, 420), {"text": PROMPT}, title="Prompt (not in the data set)",
                     clip=clip)
    sampled = g.add("AccVideoSampler", (1600, 0), _sampler_widgets(), title="Student, 5 steps",
                    model=(trained, 0), positive=held_out, latent_image=latent)
    vae = g.add("VAELoader", (1600, 420), {"vae_name": MODELS["vae"]["name"]}, models=["vae"])
    _decode_and_save(g, sampled, vae, 2000, 0, "AccVideo/distilled_student")
    return g


GRAPHS = (t2v, lora, trained_lora, synvid_dump, teacher_vs_student, distill)


def render() -> dict[Path, str]:
    """``{path: file text}`` of every workflow file."""
    defs = node_definitions()
    files = {}
    for make in GRAPHS:
        g = make()
        files[UI_DIR / f"{g.name}.json"] = json.dumps(g.ui(defs), indent=1) + "\n"
        # ComfyUI's template browser serves example_workflows/ with aiohttp's static handler, which refuses
        # symlinks leaving the folder: these are generated copies, checked identical by the CI tier
        files[EXAMPLES / f"{g.name}.json"] = files[UI_DIR / f"{g.name}.json"]
        files[API_DIR / f"{g.name}_api.json"] = json.dumps(g.api(defs), indent=1) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workflows.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on any difference")
    args = parser.parse_args(argv)
    stale = []
    files = render()
    for path, text in files.items():
        if path.is_symlink() or not path.is_file() or path.read_text() != text:
            stale.append(path)
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.is_symlink():
                    path.unlink()
                path.write_text(text)
    for extra in sorted(set(UI_DIR.glob("*.json")) | set(API_DIR.glob("*.json")) | set(EXAMPLES.glob("*.json"))):
        if extra not in files:
            stale.append(extra)
            if not args.check:
                extra.unlink()
    for path in stale:
        print(("stale: " if args.check else "updated: ") + str(path.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    raise SystemExit(main())
