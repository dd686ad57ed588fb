"""AccVideo Train and AccVideo Prompt List: the distillation trainer of ``python -m accvideo_core.train`` inside a
graph (thin over ``accvideo_core.train.from_model``; no training math here)."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from . import _comfy

CATEGORY = "AccVideo/train"
RUNS_FOLDER = "accvideo_runs"   # under the output folder: one run folder per distinct set of inputs
SAVED_FILE = "comfyui_saved.json"  # in a run folder: the name its result was saved under (reused, never rewritten)
log = logging.getLogger("AccVideo")


def synvid_folders() -> list[str]:
    """SynVid folders (a ``manifest.json`` inside) under the output folder, up to 3 levels deep; empty outside
    ComfyUI."""
    from pathlib import Path

    import folder_paths

    get = getattr(folder_paths, "get_output_directory", None)
    out = Path(get()) if get else None
    if out is None or not out.is_dir():
        return []
    found = {p.parent.relative_to(out).as_posix() for depth in ("*/", "*/*/", "*/*/*/")
             for p in out.glob(f"{depth}manifest.json")}
    return sorted(f for f in found if not f.startswith(RUNS_FOLDER))


class AccVideoPromptList(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoPromptList",
            display_name="AccVideo Prompt List",
            category="AccVideo/synvid",
            description="One prompt per non-empty line, as a list: the nodes it feeds (CLIPTextEncode, AccVideo "
                        "Trajectory Dump) run once per prompt, so one queued workflow dumps N trajectories.",
            inputs=[
                io.String.Input("prompts", multiline=True, default="a cat walks on the grass\n"
                                                                   "a red car drives along a coastal road",
                                tooltip="One prompt per line (empty lines are skipped)."),
                io.Int.Input("first_seed", default=1024, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the first prompt; line i gets first_seed + i (distinct noise per "
                                     "prompt). Not named seed: the front end would add a randomize control."),
            ],
            outputs=[io.String.Output(display_name="prompt", is_output_list=True, tooltip="The prompts."),
                     io.Int.Output(display_name="seed", is_output_list=True,
                                   tooltip="first_seed + i per prompt.")],
        )

    @classmethod
    def execute(cls, prompts, first_seed) -> io.NodeOutput:
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError("prompts is empty; write one prompt per line")
        return io.NodeOutput(lines, [first_seed + i for i in range(len(lines))])


class AccVideoTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoTrain",
            display_name="AccVideo Train",
            category=CATEGORY,
            description="AccVideo distillation of the teacher MODEL on a SynVid folder with the trainer of "
                        "`python -m accvideo_core.train` (same config fields, checkpoints, metrics, validation; "
                        "one process, one device). LoRA rank > 0 trains a LoRA on the frozen teacher and saves it "
                        "into loras; 0 fine-tunes every weight and saves the student into diffusion_models. "
                        "Interrupting writes a checkpoint; queueing the same inputs again resumes it. The run "
                        "folder is output/accvideo_runs/<output_name>_<key of the inputs>. Multi-GPU or 13B at "
                        "720p: use torchrun (docs/comfyui.md).",
            inputs=[
                io.Model.Input("model", tooltip="The teacher as ComfyUI loaded it (UNETLoader; LoRA patches "
                                                "included). fp8 weights (weight_dtype fp8_e4m3fn, half the "
                                                "memory) train a LoRA on the frozen fp8 base; a full fine-tune "
                                                "needs bf16 or fp32."),
                io.Combo.Input("synvid_folder", options=synvid_folders(),
                               tooltip="SynVid data-set folder under the output folder (the Trajectory Dump's "
                                       "filename_prefix). The last 4 samples are held out for validation."),
                io.Int.Input("steps", default=1200, min=1, max=100000,
                             tooltip="Iterations (paper: 1200), each over min(32, training samples) samples."),
                io.Int.Input("lora_rank", default=64, min=0, max=3072,
                             tooltip="LoRA rank of the student; 0 = full fine-tune (memory: docs/comfyui.md)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-8, max=1.0, step=1e-6, round=1e-8,
                               tooltip="AdamW rate of the LoRA (about 1e-4 at 13B) or of the full student "
                                       "(paper: 5e-6)."),
                io.Float.Input("lambda_adv", default=0.1, min=0.0, max=10.0, step=0.01,
                               tooltip="Weight of the adversarial loss (paper: 0.1); 0 = trajectory loss only."),
                io.Int.Input("training_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Data order, adapter initialisation and the queues' noise (optim.seed)."),
                io.String.Input("output_name", default="accvideo_student",
                                tooltip="File name (without extension) in loras (or diffusion_models for rank 0); "
                                        "an existing file is never replaced: name_00001, ... instead."),
                io.Boolean.Input("offload_activations", default=False, optional=True,
                                 tooltip="Keep each block's checkpointed input in RAM (pinned) instead of VRAM until "
                                         "the backward pass (same result). With an fp8 MODEL (UNETLoader "
                                         "weight_dtype fp8_e4m3fn) and LoRA rank 16 the paper's 544x960x93 then "
                                         "fits a 48 GB card; costs RAM (about 36 GB at 544p) and a copy each way "
                                         "per block."),
                io.Latent.Input("trajectories", optional=True,
                                tooltip="Connect the Trajectory Dump's output: training then starts after the "
                                        "dump has written its samples."),
            ],
            outputs=[io.Model.Output(tooltip="The teacher with the trained student applied (a patched clone)."),
                     io.String.Output(display_name="file_name", tooltip="The saved file's name.")],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, synvid_folder) -> bool | str:
        """The folder may not exist yet at queue time (the dump in the same prompt writes it); only a path leaving
        the output folder is refused here."""
        from .sampling import dataset_folder

        for folder in synvid_folder if isinstance(synvid_folder, list) else [synvid_folder]:
            try:
                dataset_folder(folder, "synvid_folder")
            except ValueError as err:
                return str(err)
        return True

    @classmethod
    def execute(cls, model, synvid_folder, steps, lora_rank, learning_rate, lambda_adv, training_seed,
                output_name, offload_activations=None, trajectories=None) -> io.NodeOutput:
        import os
        from pathlib import Path

        from accvideo_core.synvid.format import SynVidDataset, SynVidError
        from accvideo_core.train.config import ConfigError
        from accvideo_core.train.from_model import node_config, run_folder

        from .sampling import dataset_folder

        model, folder, rank, name = model[0], synvid_folder[0], lora_rank[0], output_name[0].strip()
        if not name or os.path.basename(name) != name:
            raise ValueError(f"output_name must be a plain file name, got {output_name[0]!r}")
        name = name.removesuffix(".safetensors")
        out_dir, root = dataset_folder(folder, "synvid_folder")
        try:
            samples = len(SynVidDataset(root))
            teacher = _comfy.teacher_transformer(model)
            cfg = node_config(data_root=root, steps=steps[0], lora_rank=rank, lr=learning_rate[0],
                              lambda_adv=lambda_adv[0], seed=training_seed[0],
                              device=str(model.load_device), samples=samples,
                              offload=bool(offload_activations and offload_activations[0]))
            run = run_folder(out_dir / RUNS_FOLDER, name, cfg, teacher)
            result = _train(cfg, teacher, run, cls.hidden.unique_id)
        except (ConfigError, SynVidError) as err:
            raise ValueError(str(err)) from None
        del teacher
        saved = _save(result, name, lora=rank > 0)
        if rank > 0:
            from accvideo_core.lora.formats import load_lora

            from .lora import apply_lora

            patched = apply_lora(model, load_lora(result.files["student_lora"]), 1.0, saved)
        else:
            patched = _comfy.with_weights(model, result.files["student"])
        val = result.val
        text = (f"{saved}: held-out {cfg.data.segments}-step MSE to the teacher's 50-step result "
                f"{val['student_mse']:.4g} (teacher's own {cfg.data.segments} steps {val['teacher_mse']:.4g}, ratio "
                f"{val['ratio']:.3f}); run folder {Path(result.folder).relative_to(out_dir).as_posix()}"
                + ("" if result.trained else " (finished run reused, not retrained)")
                + (f" (resumed from step {result.resumed_from})" if result.resumed_from else ""))
        log.info("AccVideo Train: %s", text)
        return io.NodeOutput(patched, saved, ui={"text": [text]})


def _train(cfg, teacher, run, node_id):
    """Run (or resume, or reuse) the training in ``run`` with ComfyUI's progress bar, text and interrupt."""
    import comfy.model_management as mm
    import comfy.utils

    from accvideo_core.train.from_model import train_in_process
    from accvideo_core.train.loop import Interrupted

    pbar = comfy.utils.ProgressBar(cfg.optim.steps)

    def progress(step: int, total: int, line: str) -> None:
        try:
            pbar.update_absolute(step, total)
        except mm.InterruptProcessingException:  # ComfyUI's progress hook consumed an interrupt request: keep it
            mm.interrupt_current_processing(True)  # for should_stop, so the trainer writes its checkpoint first
        _comfy.progress_text(line, node_id)

    try:
        return train_in_process(cfg, teacher, run, on_progress=progress, should_stop=mm.processing_interrupted,
                                on_note=lambda line: _comfy.progress_text(line, node_id))
    except Interrupted as err:
        log.info("AccVideo Train: %s (queue the same inputs again to resume)", err)
        mm.throw_exception_if_processing_interrupted()  # clears ComfyUI's flag and raises its interrupt
        raise mm.InterruptProcessingException() from err
    finally:
        mm.soft_empty_cache()


def _save(result, name: str, *, lora: bool) -> str:
    """Copy the run's LoRA into loras (or the full student into diffusion_models), never over an existing file;
    a run already saved (e.g. reused after a restart) keeps its saved name while that file is still there."""
    import json
    import os
    import shutil
    from pathlib import Path

    import folder_paths

    from accvideo_core.utils.io import atomic_path, write_json

    kind, source = ("loras", result.files["student_lora"]) if lora else ("diffusion_models", result.files["student"])
    folder = folder_paths.get_folder_paths(kind)[0]
    record = Path(result.folder) / SAVED_FILE
    if record.is_file():
        saved = json.loads(record.read_text())
        path = Path(folder) / saved["name"]
        if saved.get("kind") == kind and path.is_file() and path.stat().st_size == os.path.getsize(source):
            return saved["name"]

    def write(path: str) -> None:
        with atomic_path(path, overwrite=False) as tmp:
            shutil.copyfile(source, tmp)

    from .lora import save_numbered

    written = save_numbered(write, folder, f"{name}.safetensors")
    write_json({"name": written, "kind": kind}, record)
    return written
