"""HunyuanVideo LoRAs: every common file format, apply/merge/unmerge, extraction, ComfyUI patches.

- :func:`load_lora` reads ComfyUI / diffusion-pipe / kohya / musubi-tuner / diffusers-PEFT files (and ``diff`` /
  ``diff_b`` full differences) into a :class:`LoraState` keyed by our (original HunyuanVideo) module names.
- :class:`LoraStack` applies LoRAs to our transformer: merged for float weights (exactly removable), at run time
  for fp8 weights. :func:`merge_into_state_dict` bakes LoRAs into a state dict.
- :func:`extract` makes a LoRA from two checkpoints (CLI: ``python -m accvideo_core.lora extract``);
  :func:`merge_checkpoint` bakes LoRAs into a checkpoint file, streamed (CLI: ``... merge``).
- :func:`comfy_patches` gives ModelPatcher patches keyed by ComfyUI's internal parameter names.
"""
from __future__ import annotations

from .apply import ComfyPatch, LoraStack, MatchReport, comfy_patches, is_fp8, match, merge_into_state_dict
from .extract import ExtractResult, extract
from .formats import LoraFormatError, LoraState, ModulePatch, load_lora
from .merge import merge_checkpoint

__all__ = [
    "ComfyPatch", "ExtractResult", "LoraFormatError", "LoraStack", "LoraState", "MatchReport", "ModulePatch",
    "comfy_patches", "extract", "is_fp8", "load_lora", "match", "merge_checkpoint", "merge_into_state_dict",
]
