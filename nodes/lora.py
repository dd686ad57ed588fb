"""AccVideo LoRA Loader and AccVideo LoRA Extract (thin over ``accvideo_core.lora``)."""
from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from . import _comfy

CATEGORY = "AccVideo/lora"
EXTRACT_DTYPES = ["float16", "bfloat16", "float32"]
log = logging.getLogger("AccVideo")

_LORA_CACHE: dict[tuple, object] = {}


def _read_lora(path: str):
    """The normalised LoRA of a file, cached by path, size and modification time (like native LoraLoader)."""
    import os

    from accvideo_core.lora.formats import load_lora

    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _LORA_CACHE:
        _LORA_CACHE.clear()
        _LORA_CACHE[key] = load_lora(path)
    return _LORA_CACHE[key]


def _to_comfy(patch):
    """A core ``ComfyPatch`` as the object ModelPatcher.add_patches stores."""
    from comfy.weight_adapter import LoHaAdapter, LoKrAdapter, LoRAAdapter

    adapter = {"lora": LoRAAdapter, "loha": LoHaAdapter, "lokr": LoKrAdapter}.get(patch.kind)
    return (patch.kind, patch.weights) if adapter is None else adapter(set(), patch.weights)


def apply_lora(model, state, strength: float, lora_name: str):
    """A clone of ``model`` with the normalised LoRA ``state`` as ModelPatcher patches; keys that cannot be used
    are reported in one log line, a LoRA matching nothing is an error."""
    from accvideo_core.lora.apply import comfy_match_report, comfy_patches

    # matched against the model's shapes: a LoRA for another model size is an error, not a silent no-op
    shapes = {key: value.shape for key, value in model.model.state_dict().items()}
    patches = {key: _to_comfy(p) for key, p in comfy_patches(state, shapes, warn=False).items()}
    patched = model.clone()
    report = comfy_match_report(state, patched.add_patches(patches, strength))
    if not report.patches:
        raise ValueError(f"LoRA {lora_name} ({state.format}) matches no weight of this model (e.g. "
                         f"{state.example_keys()}); is it a HunyuanVideo LoRA, and is the MODEL HunyuanVideo?")
    line = report.message()
    if line:
        log.warning("AccVideo LoRA %s: %s", lora_name, line)
    return patched


class AccVideoLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoLoraLoader",
            display_name="AccVideo LoRA Loader",
            category=CATEGORY,
            description="Applies a HunyuanVideo LoRA to a MODEL as ModelPatcher patches on a clone (the input MODEL is "
                        "never changed). Reads every common format (ComfyUI/diffusion-pipe, kohya/musubi, "
                        "diffusers/PEFT with split q/k/v, diff/diff_b, LyCORIS LoHa/LoKr) through one normalisation; "
                        "keys that cannot be used are reported in the log instead of silently dropped.",
            inputs=[
                io.Model.Input("model", tooltip="HunyuanVideo MODEL (UNETLoader)."),
                io.Combo.Input("lora_name", options=_comfy.model_file_names("loras"),
                               tooltip="LoRA file in the loras folder (e.g. one made by AccVideo LoRA Extract)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the LoRA's change (1.0 = as trained or extracted)."),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone of the input MODEL.")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        import folder_paths

        if strength == 0:
            return io.NodeOutput(model)
        state = _read_lora(folder_paths.get_full_path_or_raise("loras", lora_name))
        return io.NodeOutput(apply_lora(model, state, strength, lora_name))


class AccVideoLoraExtract(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AccVideoLoraExtract",
            display_name="AccVideo LoRA Extract",
            category=CATEGORY,
            description="Extracts a LoRA (tuned - base, truncated SVD per layer, diffs for norms and biases) from two "
                        "HunyuanVideo checkpoints in diffusion_models, streaming one tensor pair at a time, and "
                        "writes it atomically into the loras folder (never over an existing file; identical models "
                        "are an error, not an empty LoRA). Keys load with native LoraLoaderModelOnly and with "
                        "AccVideo LoRA Loader.",
            inputs=[
                io.Combo.Input("base_model", options=_comfy.model_file_names("diffusion_models"),
                               tooltip="The base model (e.g. hunyuan_video_t2v_720p_bf16)."),
                io.Combo.Input("distilled_model", options=_comfy.model_file_names("diffusion_models"),
                               tooltip="The tuned model (e.g. the AccVideo 5-step checkpoint)."),
                io.Int.Input("rank", default=64, min=1, max=3072, tooltip="LoRA rank (higher = closer, larger)."),
                io.String.Input("filename", default="accvideo_hunyuan_video_lora.safetensors",
                                tooltip="File name in the loras folder (.safetensors). An existing file is never "
                                        "replaced: the LoRA is then written as name_00001.safetensors, ..."),
                io.Combo.Input("dtype", options=EXTRACT_DTYPES, default=EXTRACT_DTYPES[0],
                               tooltip="Storage precision of the LoRA tensors."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The written file's name in loras.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base_model, distilled_model, rank, filename, dtype) -> io.NodeOutput:
        import os

        import comfy.model_management
        import comfy.utils
        import folder_paths
        import torch

        from accvideo_core.lora.extract import extract

        name = os.path.basename(filename.strip())
        if not name or name != filename.strip() or not name.endswith(".safetensors"):
            raise ValueError(f"filename must be a plain file name ending in .safetensors, got {filename!r}")
        if dtype not in EXTRACT_DTYPES:
            raise ValueError(f"dtype must be one of {EXTRACT_DTYPES}, got {dtype!r}")
        folder = folder_paths.get_folder_paths("loras")[0]
        pbar = None

        def progress(done: int, total: int, key: str) -> None:
            nonlocal pbar
            comfy.model_management.throw_exception_if_processing_interrupted()
            if pbar is None:
                pbar = comfy.utils.ProgressBar(max(total, 1))
            pbar.update_absolute(done, max(total, 1))

        result = extract(folder_paths.get_full_path_or_raise("diffusion_models", base_model),
                         folder_paths.get_full_path_or_raise("diffusion_models", distilled_model), rank,
                         dtype=getattr(torch, dtype), progress=progress)
        name = save_numbered(lambda path: result.save(path, overwrite=False), folder, name)
        log.info("AccVideo LoRA Extract wrote %s: %s", result.path, result.summary())
        return io.NodeOutput(name, ui={"text": [f"{name}: {result.summary()}"]})


def save_numbered(write, folder: str, name: str) -> str:
    """``write(path)`` as ``folder/name``, or as ``stem_00001.ext``, ... when taken (like SaveImage, an existing
    file is never replaced, also not by a concurrent writer: ``write`` raises ``FileExistsError`` then); returns
    the name written."""
    import os

    stem, ext = os.path.splitext(name)
    for i in range(100_000):
        candidate = name if i == 0 else f"{stem}_{i:05d}{ext}"
        try:
            write(os.path.join(folder, candidate))
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{folder}: {stem}_00001{ext} ... {stem}_99999{ext} all exist; choose another filename")
