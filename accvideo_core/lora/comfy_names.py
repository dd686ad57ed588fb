"""ComfyUI's internal names for the HunyuanVideo transformer, and which LoRA names its native loader accepts.

ComfyUI (checked against v0.3.64 `comfy/supported_models.py` and `comfy/lora.py`) renames the original
HunyuanVideo keys to Flux-style names when it loads a checkpoint (``img_attn_qkv`` -> ``img_attn.qkv``,
``mlp.fc1`` -> ``mlp.0``, ``time_in.mlp.0`` -> ``time_in.in_layer``, q/k norm ``weight`` -> ``norm.query_norm.scale``,
...). Its LoRA key map then accepts, for every ``.weight`` parameter, ``diffusion_model.<internal name>`` and
``diffusion_model.`` / ``transformer.`` + a partial back-conversion of the internal name; other parameters (the
q/k norm ``scale``) only under their full internal key (``diffusion_model.<...>.norm.query_norm.scale.diff``).
The back-conversion misses ``time_in``, ``guidance_in``, ``txt_in.t_embedder`` and ``txt_in.c_embedder``, and
q/k norm diffs under original names, so such keys are skipped ("lora key not loaded").
"""
from __future__ import annotations

from accvideo_core.models import key_maps

# ComfyUI's HunyuanVideo LoRA key map back-converts only these renames of key_maps.ORIGINAL_TO_COMFY (internal ->
# original); the others (embedders, q/k norms) stay internal-only.
_NATIVE_BACK = ("_mod.linear.", ".modulation.linear.", "_attn_qkv.", "_attn_proj.", "mlp.fc1.", "mlp.fc2.")
_LORA_BACK: tuple[tuple[str, str], ...] = tuple(
    (internal, original) for original, internal in key_maps.ORIGINAL_TO_COMFY if original in _NATIVE_BACK)

COMFY_PREFIX = "diffusion_model."


def _replace_all(key: str, table: tuple[tuple[str, str], ...]) -> str:
    for old, new in table:
        key = key.replace(old, new)
    return key


def to_comfy_key(key: str) -> str:
    """Original parameter key (``double_blocks.0.img_attn_qkv.weight``) -> ComfyUI internal key (the table is
    :data:`accvideo_core.models.key_maps.ORIGINAL_TO_COMFY`)."""
    return key_maps.original_to_comfy_key(key)


def to_comfy_module(module: str) -> str:
    """Original module name -> ComfyUI internal module name (q/k norms: the ``...norm.query_norm.scale`` path)."""
    key = to_comfy_key(f"{module}.weight")
    return key.removesuffix(".weight")


def native_lora_names(module: str) -> set[str]:
    """Module names (without ``diffusion_model.``) that native ComfyUI maps onto this original module; for the
    q/k norms this is the parameter path ``...norm.query_norm.scale`` (keys ``<that>.diff``)."""
    internal_key = to_comfy_key(f"{module}.weight")
    if not internal_key.endswith(".weight"):
        return {internal_key}
    internal = internal_key.removesuffix(".weight")
    back = _replace_all(f"{COMFY_PREFIX}{internal_key}", _LORA_BACK)
    return {internal, back[len(COMFY_PREFIX):].removesuffix(".weight")}


def lora_name_for_comfy(module: str) -> str:
    """The name to write a module's LoRA keys under so native ComfyUI loads them: the original name when the
    native loader accepts it, else ComfyUI's internal name (for q/k norms the ``...scale`` parameter path)."""
    accepted = native_lora_names(module)
    return module if module in accepted else to_comfy_module(module)
