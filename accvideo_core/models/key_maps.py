"""HunyuanVideo transformer key layouts: original (Tencent, our module names) <-> diffusers, <-> ComfyUI's internal
names, and the key prefixes checkpoints carry (the one table of each; LoRA code derives its names from here); the
VAE's original <-> ComfyUI internal names in the last section.

Both directions are generic in the hidden size: H is read from tensor shapes, never hard-coded (diffusers' own
converter assumes H = 3072 and cannot convert a small model). Conversions only slice and concatenate, so
diffusers -> original -> diffusers round-trips bit-exactly.

Layout facts (see ``docs/transformer.md``):
- fused ``*_qkv`` rows are ``[q, k, v]``, each H rows;
- ``single_blocks.N.linear1`` rows are ``[q, k, v, mlp]`` (H, H, H, mlp_ratio * H);
- ``final_layer.adaLN_modulation.1`` rows are ``[shift, scale]`` in the original and ``[scale, shift]`` in
  diffusers' ``norm_out.linear``.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

StateDict = dict[str, torch.Tensor]

# Plain renames (original prefix -> diffusers prefix); ".weight"/".bias" follow unchanged.
_RENAMES_GLOBAL: tuple[tuple[str, str], ...] = (
    ("img_in.proj", "x_embedder.proj"),
    ("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_RENAMES_REFINER: tuple[tuple[str, str], ...] = (
    ("norm1", "norm1"),
    ("norm2", "norm2"),
    ("self_attn_proj", "attn.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
    ("adaLN_modulation.1", "norm_out.linear"),
)
_RENAMES_DOUBLE: tuple[tuple[str, str], ...] = (
    ("img_mod.linear", "norm1.linear"),
    ("txt_mod.linear", "norm1_context.linear"),
    ("img_attn_q_norm", "attn.norm_q"),
    ("img_attn_k_norm", "attn.norm_k"),
    ("txt_attn_q_norm", "attn.norm_added_q"),
    ("txt_attn_k_norm", "attn.norm_added_k"),
    ("img_attn_proj", "attn.to_out.0"),
    ("txt_attn_proj", "attn.to_add_out"),
    ("img_mlp.fc1", "ff.net.0.proj"),
    ("img_mlp.fc2", "ff.net.2"),
    ("txt_mlp.fc1", "ff_context.net.0.proj"),
    ("txt_mlp.fc2", "ff_context.net.2"),
)
_RENAMES_SINGLE: tuple[tuple[str, str], ...] = (
    ("linear2", "proj_out"),
    ("q_norm", "attn.norm_q"),
    ("k_norm", "attn.norm_k"),
    ("modulation.linear", "norm.linear"),
)
# Fused original tensors split into several diffusers tensors (rows in this order).
_QKV = ("to_q", "to_k", "to_v")
_SPLIT_REFINER = {"self_attn_qkv": tuple(f"attn.{n}" for n in _QKV)}
_SPLIT_DOUBLE = {
    "img_attn_qkv": tuple(f"attn.{n}" for n in _QKV),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SPLIT_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}

_ORIG_REFINER = "txt_in.individual_token_refiner.blocks."
_DIFF_REFINER = "context_embedder.token_refiner.refiner_blocks."

# Keys that identify each layout (present in every checkpoint of that layout).
ORIGINAL_MARKER = "txt_in.individual_token_refiner.blocks.0.norm1.weight"
DIFFUSERS_MARKER = "context_embedder.token_refiner.refiner_blocks.0.norm1.weight"


def _split_rows(tensor: torch.Tensor, hidden: int, parts: int) -> list[torch.Tensor]:
    """Split fused rows into ``parts`` chunks; the first three are H rows each, a 4th takes the rest."""
    if parts == 3:
        if tensor.shape[0] != 3 * hidden:
            raise ValueError(f"fused qkv has {tensor.shape[0]} rows; expected 3 x hidden = {3 * hidden}")
        return list(tensor.split(hidden, dim=0))
    if tensor.shape[0] <= 3 * hidden:
        raise ValueError(f"single_blocks linear1 has {tensor.shape[0]} rows; expected 3 x {hidden} + mlp rows")
    return list(tensor.split([hidden, hidden, hidden, tensor.shape[0] - 3 * hidden], dim=0))


def hidden_size_of(sd: Mapping[str, torch.Tensor]) -> int:
    """Hidden size H of a transformer state dict in either layout, from tensor shapes."""
    for key in ("img_in.proj.weight", "x_embedder.proj.weight"):
        if key in sd:
            return int(sd[key].shape[0])
    raise KeyError("cannot find the patch embedding (img_in.proj.weight / x_embedder.proj.weight) to read H from")


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """[a, b] rows -> [b, a] rows (final layer shift/scale <-> scale/shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat((second, first), dim=0)


def _convert_block(rest: str, renames, splits, tensor, hidden, out: StateDict, out_prefix: str) -> bool:
    """Convert one original block-local key; returns False when unknown."""
    name, _, suffix = rest.rpartition(".")
    for orig, diff in renames:
        if name == orig:
            out[f"{out_prefix}{diff}.{suffix}"] = tensor
            return True
    if name in splits:
        targets = splits[name]
        for target, piece in zip(targets, _split_rows(tensor, hidden, len(targets))):
            out[f"{out_prefix}{target}.{suffix}"] = piece
        return True
    return False


def original_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert an original-layout state dict to diffusers' ``HunyuanVideoTransformer3DModel`` layout.

    Unknown keys raise ``KeyError`` naming them (a silent drop would hide a wrong file).
    """
    hidden = hidden_size_of(sd)
    out: StateDict = {}
    unknown = []
    for key, tensor in sd.items():
        if key.startswith("final_layer.adaLN_modulation.1."):
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = _swap_halves(tensor)
            continue
        name, _, suffix = key.rpartition(".")
        done = False
        for orig, diff in _RENAMES_GLOBAL:
            if name == orig:
                out[f"{diff}.{suffix}"] = tensor
                done = True
                break
        if not done:
            for orig_prefix, diff_prefix, renames, splits in (
                (_ORIG_REFINER, _DIFF_REFINER, _RENAMES_REFINER, _SPLIT_REFINER),
                ("double_blocks.", "transformer_blocks.", _RENAMES_DOUBLE, _SPLIT_DOUBLE),
                ("single_blocks.", "single_transformer_blocks.", _RENAMES_SINGLE, _SPLIT_SINGLE),
            ):
                if key.startswith(orig_prefix):
                    index, _, rest = key[len(orig_prefix):].partition(".")
                    done = _convert_block(rest, renames, splits, tensor, hidden, out, f"{diff_prefix}{index}.")
                    break
        if not done:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not part of the original HunyuanVideo layout, e.g. {unknown[:3]}")
    return out


def _invert(renames) -> dict[str, str]:
    return {diff: orig for orig, diff in renames}


def diffusers_to_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Convert a diffusers-layout state dict to the original HunyuanVideo layout (exact inverse of
    :func:`original_to_diffusers`). Missing parts of a split tensor or unknown keys raise ``KeyError``."""
    out: StateDict = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}  # fused original key -> {diffusers part: tensor}
    fused_parts: dict[str, tuple[str, ...]] = {}
    unknown = []
    global_inv = _invert(_RENAMES_GLOBAL)
    block_tables = (
        (_DIFF_REFINER, _ORIG_REFINER, _invert(_RENAMES_REFINER), _SPLIT_REFINER),
        ("transformer_blocks.", "double_blocks.", _invert(_RENAMES_DOUBLE), _SPLIT_DOUBLE),
        ("single_transformer_blocks.", "single_blocks.", _invert(_RENAMES_SINGLE), _SPLIT_SINGLE),
    )
    for key, tensor in sd.items():
        name, _, suffix = key.rpartition(".")
        if name == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap_halves(tensor)
            continue
        if name in global_inv:
            out[f"{global_inv[name]}.{suffix}"] = tensor
            continue
        done = False
        for diff_prefix, orig_prefix, inv, splits in block_tables:
            if not key.startswith(diff_prefix):
                continue
            index, _, rest = key[len(diff_prefix):].partition(".")
            local, _, suffix = rest.rpartition(".")
            if local in inv:
                out[f"{orig_prefix}{index}.{inv[local]}.{suffix}"] = tensor
                done = True
            else:
                for fused, parts in splits.items():
                    if local in parts:
                        fused_key = f"{orig_prefix}{index}.{fused}.{suffix}"
                        pending.setdefault(fused_key, {})[local] = tensor
                        fused_parts[fused_key] = parts
                        done = True
                        break
            break
        if not done:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not part of the diffusers HunyuanVideo layout, e.g. {unknown[:3]}")
    for fused_key, got in pending.items():
        parts = fused_parts[fused_key]
        missing = [p for p in parts if p not in got]
        if missing:
            raise KeyError(f"cannot rebuild {fused_key}: diffusers parts {missing} are missing")
        out[fused_key] = torch.cat([got[p] for p in parts], dim=0)
    return out


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> tuple[StateDict, str]:
    """Remove the first of ``prefixes`` that every key carries (e.g. ``model.diffusion_model.``).

    Returns the new dict and the prefix removed ("" when none applied).
    """
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}, prefix
    # Mixed files (e.g. a full ComfyUI checkpoint with VAE and text encoders): keep only the prefixed part.
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            return sub, prefix
    return dict(sd), ""


# Key prefixes a transformer checkpoint may put before the original / diffusers / ComfyUI names (ComfyUI full
# checkpoints, ComfyUI's model state dict, DDP's module., diffusers / diffusion-pipe), tried in this order. Readers of
# LoRA files add the LoRA-only ones (see accvideo_core.lora.formats).
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "model.model.", "diffusion_model.", "module.", "transformer.")

# ComfyUI's internal (Flux-style) names for the same tensors, as its HunyuanVideo model renames the original keys
# on load (checked against ComfyUI 0.3.64 ``comfy/supported_models.py``): (original piece, internal piece) of a
# parameter key. Both directions replace in one pass, longest piece first, so no rename feeds another.
ORIGINAL_TO_COMFY: tuple[tuple[str, str], ...] = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."),
    ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."),
    ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("time_in.mlp.0.", "time_in.in_layer."),
    ("time_in.mlp.2.", "time_in.out_layer."),
    ("guidance_in.mlp.0.", "guidance_in.in_layer."),
    ("guidance_in.mlp.2.", "guidance_in.out_layer."),
    ("_mod.linear.", "_mod.lin."),
    (".modulation.linear.", ".modulation.lin."),
    ("_attn_qkv.", "_attn.qkv."),
    ("_attn_proj.", "_attn.proj."),
    ("mlp.fc1.", "mlp.0."),
    ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"),
    ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
    (".q_norm.weight", ".norm.query_norm.scale"),
    (".k_norm.weight", ".norm.key_norm.scale"),
)


def _one_pass(pairs: tuple[tuple[str, str], ...]) -> Callable[[str], str]:
    table = dict(pairs)
    pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
    return lambda key: pattern.sub(lambda m: table[m.group()], key)


_TO_COMFY = _one_pass(ORIGINAL_TO_COMFY)
_FROM_COMFY = _one_pass(tuple((internal, original) for original, internal in ORIGINAL_TO_COMFY))


def original_to_comfy_key(key: str) -> str:
    """Original parameter key (``double_blocks.0.img_attn_qkv.weight``) -> ComfyUI's internal key
    (``double_blocks.0.img_attn.qkv.weight``; q/k norm weights -> ``...norm.query_norm.scale``)."""
    return _TO_COMFY(key)


def comfy_to_original_key(key: str) -> str:
    """ComfyUI internal parameter key -> original key (inverse of :func:`original_to_comfy_key`)."""
    return _FROM_COMFY(key)


def comfy_internal_to_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """ComfyUI-internal HunyuanVideo names (``double_blocks.0.img_attn.qkv.weight``, ``img_mod.lin``,
    ``img_attn.norm.query_norm.scale``, ``time_in.in_layer``, ...) -> original names. Tensors are unchanged."""
    return {comfy_to_original_key(key): tensor for key, tensor in sd.items()}


# ================================================================================================================
# HunyuanVideo VAE: original names (= diffusers', our module names) <-> ComfyUI's internal (LDM-style) names
# ================================================================================================================
# Key fragments, original -> ComfyUI internal, applied in this order. "{s}" is encoder/decoder, "{i}"/"{j}" block
# and resnet indices; "{u}" is ComfyUI's level of decoder up block i, counted from the other end (n_up - 1 - i).
# Fragments starting with "." match anywhere in a key, the others at its start. Checked against ComfyUI's own
# module tree for the released widths (248 tensors, docs/vae.md).
VAE_COMFY_RENAMES: tuple[tuple[str, str], ...] = (
    ("{s}.mid_block.resnets.0.", "{s}.mid.block_1."),
    ("{s}.mid_block.resnets.1.", "{s}.mid.block_2."),
    ("{s}.mid_block.attentions.0.group_norm.", "{s}.mid.attn_1.norm."),
    ("{s}.mid_block.attentions.0.to_q.", "{s}.mid.attn_1.q."),
    ("{s}.mid_block.attentions.0.to_k.", "{s}.mid.attn_1.k."),
    ("{s}.mid_block.attentions.0.to_v.", "{s}.mid.attn_1.v."),
    ("{s}.mid_block.attentions.0.to_out.0.", "{s}.mid.attn_1.proj_out."),
    ("encoder.down_blocks.{i}.resnets.{j}.", "encoder.down.{i}.block.{j}."),
    ("encoder.down_blocks.{i}.downsamplers.0.", "encoder.down.{i}.downsample."),
    ("decoder.up_blocks.{i}.resnets.{j}.", "decoder.up.{u}.block.{j}."),
    ("decoder.up_blocks.{i}.upsamplers.0.", "decoder.up.{u}.upsample."),
    (".conv_shortcut.", ".nin_shortcut."),
    ("{s}.conv_norm_out.", "{s}.norm_out."),
)
# ComfyUI holds the attention projections as 1x1x1 convolutions: weights [C, C, 1, 1, 1] instead of [C, C].
VAE_COMFY_CONV_PROJECTIONS = ("mid.attn_1.q.weight", "mid.attn_1.k.weight", "mid.attn_1.v.weight",
                              "mid.attn_1.proj_out.weight")
# Old diffusers attention names -> current ones (inside ``*.attentions.0.``).
VAE_LEGACY_ATTENTION: tuple[tuple[str, str], ...] = (
    ("query", "to_q"), ("key", "to_k"), ("value", "to_v"), ("proj_attn", "to_out.0"))
VAE_ATTENTION_WEIGHTS = tuple(f".attentions.0.{name}.weight" for name in ("to_q", "to_k", "to_v", "to_out.0"))
_VAE_FIELDS = {"s": r"(?P<s>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "u": r"(?P<u>\d+)"}


def vae_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[C, C, 1, 1(, 1)]`` 1x1 conv weight -> ``[C, C]`` linear weight, as a view (no copy)."""
    return weight.flatten(1) if weight.dim() > 2 else weight


def _vae_pattern(fragment: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", fragment)  # literal, field, literal, ...
    regex = "".join(_VAE_FIELDS[p] if k % 2 else re.escape(p) for k, p in enumerate(parts))
    return re.compile(regex if fragment.startswith(".") else "^" + regex)


def _vae_rename(sd: Mapping[str, torch.Tensor], to_comfy: bool) -> StateDict:
    """Apply ``VAE_COMFY_RENAMES`` in one direction; the up-level index runs the other way in ComfyUI."""
    rows = [(_vae_pattern(a), b) if to_comfy else (_vae_pattern(b), a) for a, b in VAE_COMFY_RENAMES]
    level = re.compile(r"^decoder\.up_blocks\.(\d+)\." if to_comfy else r"^decoder\.up\.(\d+)\.")
    n_up = 1 + max((int(m.group(1)) for k in sd if (m := level.match(k))), default=-1)
    out: StateDict = {}
    for key, value in sd.items():
        for pattern, target in rows:
            m = pattern.search(key)
            if m:
                fields = m.groupdict()
                if "i" in fields:
                    fields["u"] = str(n_up - 1 - int(fields["i"]))
                elif "u" in fields:
                    fields["i"] = str(n_up - 1 - int(fields["u"]))
                key = key[:m.start()] + target.format(**fields) + key[m.end():]
        if to_comfy and key.endswith(VAE_COMFY_CONV_PROJECTIONS):
            value = value.reshape(*value.shape, 1, 1, 1)
        elif not to_comfy and key.endswith(VAE_ATTENTION_WEIGHTS):
            value = vae_linear_weight(value)
        out[key] = value
    return out



def vae_comfy_internal_to_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """ComfyUI's internal VAE names -> original names, without copying tensors (attention weights as views)."""
    return _vae_rename(sd, to_comfy=False)


def vae_original_to_comfy_internal(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Original VAE names -> ComfyUI's internal names (attention weights as ``[C, C, 1, 1, 1]`` views); the inverse
    of ``vae_comfy_internal_to_original``, kept beside it because both directions read the one table (the tests
    use it to build ComfyUI-internal VAE files and to check the round trip)."""
    return _vae_rename(sd, to_comfy=True)


def vae_legacy_to_original(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Old diffusers attention names (``query``/``key``/``value``/``proj_attn``) -> current names."""
    legacy = dict(VAE_LEGACY_ATTENTION)
    pattern = re.compile(r"^(.*\.attentions\.0\.)(" + "|".join(legacy) + r")\.(weight|bias)$")
    out: StateDict = {}
    for key, value in sd.items():
        m = pattern.match(key)
        if m:
            key = f"{m.group(1)}{legacy[m.group(2)]}.{m.group(3)}"
        out[key] = vae_linear_weight(value) if key.endswith(VAE_ATTENTION_WEIGHTS) else value
    return out
