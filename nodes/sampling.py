"""AccVideo Sampler, AccVideo Schedule and AccVideo Trajectory Dump (thin over ``accvideo_core``)."""
from __future__ import annotations

import weakref

from comfy_api.v0_0_2 import io

from accvideo_core.sampling import ACCVIDEO_STUDENT, HUNYUAN_TEACHER
from accvideo_core.synvid.format import STORE_MODES

from . import _comfy

CATEGORY = "AccVideo/sampling"
GUIDANCE_SOURCES = ["widget", "conditioning"]
SCHEDULES = [f"accvideo ({ACCVIDEO_STUDENT.steps} steps)", f"teacher ({HUNYUAN_TEACHER.steps} steps)", "custom"]
STORE_LABELS = list(STORE_MODES.values())  # the combo shows the core's store modes by their published labels
DUMP_DTYPES = ["bfloat16", "float32"]


def _seed_input() -> io.Int.Input:
    return io.Int.Input("seed", default=1024, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                        tooltip="Noise seed. Noise is drawn on the CPU like native KSampler, so a seed gives the "
                                "same video on every device. The official AccVideo sample seed is 1024.")


def _guidance_inputs(default: float) -> list:
    return [
        io.Float.Input("guidance", default=default, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Embedded guidance scale given to the model (6.0 = AccVideo and HunyuanVideo). "
                               "There is no classifier-free guidance: one model call per step."),
        io.Combo.Input("guidance_source", options=GUIDANCE_SOURCES, default="widget",
                       tooltip="widget: use the guidance value above. conditioning: keep the guidance already in "
                               "the conditioning (FluxGuidance); ComfyUI uses 6.0 when it has none."),
    ]


def _resolve_guidance(guidance: float, guidance_source: str) -> float | None:
    """The widget's guidance (refused when NaN/Inf, which pass ComfyUI's range check) or None (conditioning)."""
    from accvideo_core.sampling import check_settings

    if guidance_source not in GUIDANCE_SOURCES:
        raise ValueError(f"guidance_source must be one of {GUIDANCE_SOURCES}, got {guidance_source!r}")
    if guidance_source == "conditioning":
        return None
    check_settings(guidance=guidance)
    return float(guidance)


class AccVideoSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoSampler",
            display_name="AccVideo Sampler",
            category=CATEGORY,
            description="Few-step flow-matching Euler sampler of AccVideo. The defaults (5 steps, shift 7, embedded "
                        "guidance 6) are the official AccVideo settings; with the same seed the result equals "
                        "native KSampler(euler, simple, 5 steps, cfg 1) after ModelSamplingSD3(7) and "
                        "FluxGuidance(6). Works with any native HunyuanVideo MODEL (UNETLoader, LoRA, fp8).",
            inputs=[
                io.Model.Input("model", tooltip="HunyuanVideo MODEL: the AccVideo checkpoint from UNETLoader, or "
                                                "the base model with an AccVideo LoRA."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning (DualCLIPLoader hunyuan_video + "
                                                          "CLIPTextEncode)."),
                io.Latent.Input("latent_image", tooltip="Video latent, e.g. EmptyHunyuanLatentVideo. Frames must be "
                                                        "4k+1 (93 official) and sizes multiples of 16 (544x960)."),
                _seed_input(),
                io.Int.Input("steps", default=ACCVIDEO_STUDENT.steps, min=1, max=200,
                             tooltip="Euler steps. AccVideo was distilled for 5."),
                io.Float.Input("shift", default=ACCVIDEO_STUDENT.shift, min=0.01, max=100.0, step=0.01,
                               tooltip="Sigma shift of the flow schedule (7.0 for AccVideo and HunyuanVideo)."),
                *_guidance_inputs(ACCVIDEO_STUDENT.guidance),
            ],
            outputs=[io.Latent.Output(tooltip="Denoised video latent (VAE space, like every ComfyUI LATENT).")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, shift, guidance, guidance_source) -> io.NodeOutput:
        from accvideo_core.sampling import flow_sigmas

        _comfy.check_video_latent(latent_image, cls.hidden.prompt, cls.hidden.unique_id, "latent_image")
        sigmas = flow_sigmas(steps, shift)  # refuses a NaN/Inf shift
        positive = _comfy.with_guidance(positive, _resolve_guidance(guidance, guidance_source))
        _comfy.check_fits(model, latent_image)
        out = _comfy.sample_with_comfy_model(model, positive, latent_image, seed, sigmas)
        return io.NodeOutput(out)


class AccVideoSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoSchedule",
            display_name="AccVideo Schedule",
            category=CATEGORY,
            description="Shifted flow-matching sigmas (1 -> 0) for native SamplerCustomAdvanced: the AccVideo 5-step "
                        "schedule, the 50-step HunyuanVideo teacher schedule (whose steps 0, 10, ..., 50 are the "
                        "AccVideo sigmas), or a custom step count.",
            inputs=[
                io.Combo.Input("schedule", options=SCHEDULES, default=SCHEDULES[0],
                               tooltip="accvideo: 5 steps; teacher: 50 steps; custom: the steps value below."),
                io.Int.Input("steps", default=ACCVIDEO_STUDENT.steps, min=1, max=1000,
                             tooltip="Step count, used only with 'custom'."),
                io.Float.Input("shift", default=ACCVIDEO_STUDENT.shift, min=0.01, max=100.0, step=0.01,
                               tooltip="Sigma shift (7.0 for AccVideo and HunyuanVideo)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="steps + 1 sigmas from 1 to 0.")],
        )

    @classmethod
    def execute(cls, schedule, steps, shift) -> io.NodeOutput:
        from accvideo_core.sampling import flow_sigmas

        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        n = {SCHEDULES[0]: ACCVIDEO_STUDENT.steps, SCHEDULES[1]: HUNYUAN_TEACHER.steps}.get(schedule, steps)
        return io.NodeOutput(flow_sigmas(n, shift))


_HASH_CACHE: dict[tuple, str] = {}  # model files by (path, size, mtime)
# loaded weights: per model object (weakly held: a freed model's entry goes with it, so a later model that gets
# the same id() is never given its hash), per patch set
_WEIGHTS_HASH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _source_model_hash(model, model_name: str) -> str:
    """sha256 of the model file when ``model_name`` names one in diffusion_models, else of the loaded weights."""
    import os

    import folder_paths

    from accvideo_core.synvid.format import file_sha256, state_dict_sha256

    path = folder_paths.get_full_path("diffusion_models", model_name) if model_name else None
    if path:
        st = os.stat(path)
        key = ("file", path, st.st_size, st.st_mtime_ns)
        if key not in _HASH_CACHE:
            _HASH_CACHE[key] = file_sha256(path)
        return _HASH_CACHE[key]
    try:
        per_patches = _WEIGHTS_HASH.setdefault(model.model, {})
    except TypeError:  # an object without weak references: hash it every time
        per_patches = {}
    patches = str(getattr(model, "patches_uuid", ""))
    if patches not in per_patches:
        per_patches[patches] = state_dict_sha256(model.model.diffusion_model.state_dict())
    return per_patches[patches]


def dataset_folder(prefix: str, input_name: str = "filename_prefix"):
    """(output folder, data-set folder ``output/prefix``); refuses a ``prefix`` that leaves the output folder."""
    from pathlib import Path

    import folder_paths

    out_dir = Path(folder_paths.get_output_directory()).resolve()
    prefix = (prefix or "").strip()
    if not prefix:
        raise ValueError(f"{input_name} is empty; give a folder name under the output folder, e.g. synvid/run1")
    root = (out_dir / prefix).resolve()
    if root == out_dir or out_dir not in root.parents:
        raise ValueError(f"{input_name} {prefix!r} leaves the output folder ({out_dir}); use a relative "
                         "folder name such as synvid/run1")
    return out_dir, root


class AccVideoTrajectoryDump(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoTrajectoryDump",
            display_name="AccVideo Trajectory Dump",
            category="AccVideo/synvid",
            description="The teacher sampler (50 steps, shift 7, guidance 6 by default) that also writes one SynVid "
                        "sample (the key latents or the whole trajectory in model space, the conditioning tensors, "
                        "prompt, seed, settings and model) atomically into a data-set folder under the output "
                        "folder. Returns the final LATENT. See docs/synvid.md for the format.",
            inputs=[
                io.Model.Input("model", tooltip="The teacher: native HunyuanVideo T2V MODEL (UNETLoader)."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning (stored in the sample)."),
                io.Latent.Input("latent_image", tooltip="Video latent (EmptyHunyuanLatentVideo 960x544, 93 frames "
                                                        "for the official SynVid)."),
                _seed_input(),
                io.Int.Input("steps", default=HUNYUAN_TEACHER.steps, min=5, max=1000, step=5,
                             tooltip="Teacher Euler steps; a multiple of 5 so the 6 key sigmas are teacher sigmas."),
                io.Float.Input("shift", default=HUNYUAN_TEACHER.shift, min=0.01, max=100.0, step=0.01,
                               tooltip="Sigma shift (7.0)."),
                *_guidance_inputs(HUNYUAN_TEACHER.guidance),
                io.Combo.Input("store", options=STORE_LABELS, default=STORE_LABELS[0],
                               tooltip="key latents: the 6 latents the method trains on (steps 0, 10, ..., 50); "
                                       "full trajectory: all steps + 1 latents."),
                io.String.Input("filename_prefix", default="synvid/accvideo",
                                tooltip="Data-set folder under ComfyUI's output folder; samples are added to it "
                                        "(samples/NNNNNN.safetensors + manifest.json)."),
                io.String.Input("model_name", default="hunyuan_video_t2v_720p_bf16.safetensors",
                                tooltip="Teacher name recorded in the sample; when it names a file in "
                                        "diffusion_models, the file's sha256 is recorded too (hashed once per "
                                        "server run: about a minute for the 26 GB bf16 teacher)."),
                io.Combo.Input("dtype", options=DUMP_DTYPES, default=DUMP_DTYPES[0],
                               tooltip="Storage precision of latents and text states (sigmas stay float32)."),
                io.String.Input("prompt", optional=True, force_input=True, multiline=True,
                                tooltip="The prompt text, stored in the sample (connect the string that feeds "
                                        "CLIPTextEncode). With it, a re-run of the same seed and prompt adds "
                                        "nothing to the data set."),
            ],
            outputs=[io.Latent.Output(tooltip="The teacher's final latent (VAE space).")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, latent_image, seed, steps, shift, guidance, guidance_source, store,
                filename_prefix, model_name, dtype, prompt=None) -> io.NodeOutput:
        from accvideo_core.latents import video_size_of_latent
        from accvideo_core.synvid.folder import SynVidWriter
        from accvideo_core.synvid.record import TeacherRun, trajectory_samples

        # everything that can be refused is refused here, before the teacher's steps and before any write
        _comfy.check_video_latent(latent_image, cls.hidden.prompt, cls.hidden.unique_id, "latent_image")
        if store not in STORE_LABELS or dtype not in DUMP_DTYPES:
            raise ValueError(f"store must be one of {STORE_LABELS} and dtype one of {DUMP_DTYPES}")
        out_dir, root = dataset_folder(filename_prefix)
        g = _resolve_guidance(guidance, guidance_source)
        positive = _comfy.with_guidance(positive, g)
        text_states, text_mask, pooled = _comfy.conditioning_tensors(positive)
        frames, height, width = video_size_of_latent(latent_image["samples"])
        mode = next(k for k, label in STORE_MODES.items() if label == store)
        run = TeacherRun(frames, height, width, steps=steps, shift=shift, guidance=_comfy.guidance_of(positive, g),
                         store=mode, source_model=model_name, source_model_hash=_source_model_hash(model, model_name))
        writer = SynVidWriter(root, dtype=dtype)  # refuses a prefix naming a file and an unreadable manifest
        writer.check(run.facts(text_states.shape[1], pooled.shape))  # shape, steps, teacher of the data set
        batch = latent_image["samples"].shape[0]
        _comfy.check_fits(model, latent_image, host_bytes=run.record_bytes(batch))
        text = prompt or ""
        present = [writer.entry(seed, text, b) for b in range(batch)]
        if all(present):  # a rerun (e.g. after a server died before its client saw the result): nothing to add
            stored = _comfy.stored_final_latent(latent_image, [root / e["file"] for e in present], run.steps)
            return io.NodeOutput(stored, ui={"text": [str((root / e["file"]).relative_to(out_dir).as_posix())
                                                      for e in present]})
        recorder = run.recorder()
        out = _comfy.sample_with_comfy_model(model, positive, latent_image, seed, run.sigmas(),
                                             on_start=recorder.start, on_step=recorder.on_step)
        extra = [{"batch_index": b, "batch_size": batch, "made_by": "ComfyUI"} for b in range(batch)]
        samples = trajectory_samples(run, recorder.stacked(), seeds=[seed] * batch, prompts=[text] * batch,
                                     text_states=text_states.expand(batch, -1, -1),
                                     text_mask=text_mask.expand(batch, -1), pooled=pooled.expand(batch, -1),
                                     extra=extra)
        written = [str(writer.write(sample).relative_to(out_dir).as_posix()) for sample in samples]
        return io.NodeOutput(out, ui={"text": written})
