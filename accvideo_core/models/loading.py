"""Load a HunyuanVideo transformer from any common file: ``load_transformer(source, dtype=..., device=...)``.

Accepted: the original layout (``.pt``/``.pth``/``.bin`` read weights-only with ``module``/``ema``/``state_dict``
wrappers unwrapped, or ``.safetensors``), the key prefixes of ``key_maps.CHECKPOINT_PREFIXES`` (ComfyUI,
diffusion-pipe, DDP), the diffusers layout and ComfyUI's internal (Flux-style)
names (both converted), and fp8 (e4m3fn / e5m2) weights, which
stay fp8 in memory and are up-cast per call to the compute dtype (ComfyUI "fp8_scaled" ``scale_weight`` honoured).
The architecture is read from tensor shapes. A wrong or partial file raises ``CheckpointError`` naming the detected
model family, the first missing / unexpected keys and what was expected.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..utils.dtypes import FP8_DTYPES, dtype_name, names_for, parse_dtype
from ..utils.io import (CheckpointError, LazyCheckpoint, StateDict, read_metadata, read_state_dict,
                        save_safetensors_stream)
from .key_maps import (CHECKPOINT_PREFIXES, DIFFUSERS_MARKER, ORIGINAL_MARKER, comfy_internal_to_original,
                       diffusers_to_original, strip_prefix)
from .transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig

CONFIG_METADATA_KEY = "accvideo.transformer_config"
ORIGINAL_LAYOUT = "HunyuanVideo transformer (original layout)"
DIFFUSERS_LAYOUT = "HunyuanVideo transformer (diffusers layout)"
COMFY_LAYOUT = "HunyuanVideo transformer (ComfyUI internal names)"
_EXPECTED = ("an original-layout HunyuanVideo / AccVideo transformer (keys like 'double_blocks.0.img_attn_qkv.weight', "
             "optionally prefixed 'model.diffusion_model.') or a diffusers HunyuanVideoTransformer3DModel "
             "('transformer_blocks.0.attn.to_q.weight')")


BLOCK_PREFIXES = ("double_blocks.", "single_blocks.")  # the linears ``storage_dtype`` / ``fp8_base`` store in fp8


def dequantized(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """An fp8-stored weight in ``dtype``: up-cast, times ``scale_weight`` when the file carries one."""
    out = weight.to(dtype)
    return out if scale is None else out * scale.to(dtype)


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose weight is stored in fp8 and up-cast on every call: to autocast's dtype inside autocast
    (the dtype the matmul runs in; no fp32 copy of the weight), else to the input's dtype.

    ``scale_weight`` (a scalar buffer, ComfyUI's "fp8_scaled" files) multiplies the up-cast weight when present.
    """

    scale_weight: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight = dequantized(self.weight, getattr(self, "scale_weight", None), dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, weight, bias)


def _make_fp8(module: nn.Linear, scale: torch.Tensor | None) -> None:
    module.__class__ = FP8Linear
    module.register_buffer("scale_weight", scale)


# {linear layer name: (fp8 dtype name, shape of its scale_weight or None)}: JSON-able, so that rank 0 can send it
Fp8Layout = dict[str, tuple[str, "list[int] | None"]]


def fp8_layout(model: nn.Module) -> Fp8Layout:
    """Which linear layers of ``model`` keep their weights in fp8 (and with which scale shape)."""
    return {name: (dtype_name(m.weight.dtype), None if m.scale_weight is None else list(m.scale_weight.shape))
            for name, m in model.named_modules() if isinstance(m, FP8Linear)}


def block_linears_layout(model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8Layout:
    """The layout that stores every block linear weight in ``dtype`` with a per-layer scale (ComfyUI's
    "fp8_scaled" form), the others as they are."""
    layout = {n: (dtype_name(dtype), []) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.startswith(BLOCK_PREFIXES)}
    return {**layout, **fp8_layout(model)}   # layers already in fp8 stay as they are


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight / scale)`` rounded to ``dtype`` (to nearest) and the fp32 scalar ``scale`` that maps the weight's
    largest magnitude to the format's largest: the format's full range serves the layer, so small weights are not
    lost to its subnormals (real-size weights of std 0.01: 2.7 % error instead of 5.7 % unscaled)."""
    amax = float(weight.detach().abs().amax()) if weight.numel() else 0.0
    scale = torch.tensor(amax / torch.finfo(dtype).max if amax > 0 else 1.0, dtype=torch.float32)
    return (weight.detach().float() / scale).to(dtype), scale.to(weight.device)


def apply_fp8_layout(model: nn.Module, layout: Fp8Layout) -> None:
    """Make the named linear layers :class:`FP8Linear` with their weights in the layout's dtype (scaled by
    :func:`quantize_fp8` when the layout has a scale shape, else rounded as they are); layers already stored so
    are left alone. On the meta device only dtypes and the scale buffers' shapes change (the values come from a
    state dict later)."""
    for name, (dtype, scale_shape) in layout.items():
        module = model.get_submodule(name)
        target = parse_dtype(dtype, allowed=tuple(dtype_name(d) for d in FP8_DTYPES))
        if module.weight.dtype == target:
            continue
        if module.weight.is_meta:
            weight = module.weight.detach().to(target)
            scale = None if scale_shape is None else torch.empty(scale_shape, device="meta")
        elif scale_shape is None:
            weight, scale = module.weight.detach().to(target), None
        else:
            weight, scale = quantize_fp8(module.weight, target)
            scale = scale.reshape(scale_shape)
        module.weight = nn.Parameter(weight, requires_grad=False)
        _make_fp8(module, scale)


def cast_keeping_fp8(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` except fp8 weights and their ``scale_weight`` (kept in fp8 / fp32)."""
    fp8 = {id(m.weight) for m in model.modules() if isinstance(m, FP8Linear)}
    scales = {id(m.scale_weight) for m in model.modules() if isinstance(m, FP8Linear) and m.scale_weight is not None}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and id(p) not in fp8 and p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and id(b) not in scales:
                module._buffers[name] = b.to(dtype)
    return model


def detect_family(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the model family a state dict belongs to (used for loading and for error messages)."""
    keys = list(sd)
    has = lambda pattern: any(re.search(pattern, k) for k in keys)  # noqa: E731
    if has(r"lora_(A|B|up|down)\b|\.lora\.|\.alpha$"):
        return "a LoRA (load it with the LoRA tools, not as a model)"
    if has(r"^double_blocks\.\d+\.img_attn\.qkv\.") and has(r"^txt_in\.individual_token_refiner\."):
        return COMFY_LAYOUT
    if ORIGINAL_MARKER in sd or has(r"^double_blocks\.\d+\.img_attn_qkv\.") or has(r"^single_blocks\.\d+\.linear1\."):
        return ORIGINAL_LAYOUT
    if DIFFUSERS_MARKER in sd or has(r"^transformer_blocks\.\d+\.attn\.add_q_proj\.") and has(r"^context_embedder\."):
        return DIFFUSERS_LAYOUT
    if has(r"^double_blocks\.\d+\.img_attn\.qkv\."):
        return "Flux-style DiT (Flux / HunyuanImage)"
    if has(r"^blocks\.\d+\.self_attn\.") or has(r"^blocks\.\d+\.cross_attn\."):
        return "Wan 2.x transformer"
    if has(r"^decoder\.conv_in\.") or has(r"^encoder\.down_blocks\."):
        return "a VAE"
    if has(r"input_blocks\.\d+\.") or has(r"down_blocks\.\d+\.resnets\."):
        return "a Stable Diffusion UNet"
    if has(r"(^|\.)text_model\.|^model\.layers\.\d+\.|^encoder\.block\.\d+\."):
        return "a text encoder"
    return "unknown"


def _block_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def config_from_state_dict(sd: Mapping[str, torch.Tensor], *, rope_axes: tuple[int, int, int] | None = None,
                           rope_theta: float = 256.0) -> TransformerConfig:
    """Read the architecture of an original-layout state dict from its tensor shapes."""
    def shape(key: str) -> torch.Size:
        if key not in sd:
            raise CheckpointError(f"cannot read the architecture: key {key!r} is missing; expected {_EXPECTED}")
        return sd[key].shape

    hidden, in_channels, *patch = shape("img_in.proj.weight")
    if "double_blocks.0.img_attn_q_norm.weight" in sd:
        head_dim = shape("double_blocks.0.img_attn_q_norm.weight")[0]
    else:
        head_dim = shape("single_blocks.0.q_norm.weight")[0]
    if "double_blocks.0.img_mlp.fc1.weight" in sd:
        mlp_hidden = shape("double_blocks.0.img_mlp.fc1.weight")[0]
    else:
        mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * hidden
    return TransformerConfig(
        in_channels=in_channels,
        out_channels=shape("final_layer.linear.weight")[0] // math.prod(patch),
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        num_double_blocks=_block_count(sd, "double_blocks."),
        num_single_blocks=_block_count(sd, "single_blocks."),
        num_refiner_blocks=_block_count(sd, "txt_in.individual_token_refiner.blocks."),
        mlp_ratio=mlp_hidden / hidden,
        patch_size=tuple(patch),
        text_dim=shape("txt_in.input_embedder.weight")[1],
        pooled_dim=shape("vector_in.in_layer.weight")[1],
        guidance_embed=any(k.startswith("guidance_in.") for k in sd),
        rope_axes=rope_axes,
        rope_theta=rope_theta,
    )


def to_original_layout(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, str]:
    """Strip known prefixes and convert to the original layout. Returns (state dict, detected family)."""
    sd, _ = strip_prefix(sd, CHECKPOINT_PREFIXES)
    family = detect_family(sd)
    if family == DIFFUSERS_LAYOUT:
        try:
            sd = diffusers_to_original(sd)
        except KeyError as err:
            raise CheckpointError(f"detected {family}, but it cannot be converted: {err.args[0]}; "
                                  f"expected {_EXPECTED}") from err
    elif family == COMFY_LAYOUT:
        sd = comfy_internal_to_original(sd)
    elif family != ORIGINAL_LAYOUT:
        first = ", ".join(list(sd)[:3])
        raise CheckpointError(f"this file is not a HunyuanVideo transformer: detected {family} (first keys: "
                              f"{first}); expected {_EXPECTED}")
    return sd, family


# Widths of released HunyuanVideo transformers -> (double, single) block counts. A file of such a width with fewer
# blocks is a partial download or a pruned model, never a loadable release.
RELEASED_DEPTHS = {3072: (20, 40)}


def _check_released_depth(config: TransformerConfig, name: str) -> None:
    depth = RELEASED_DEPTHS.get(config.hidden_size)
    got = (config.num_double_blocks, config.num_single_blocks)
    if depth is not None and got != depth:
        raise CheckpointError(
            f"{name}: detected {ORIGINAL_LAYOUT} of hidden size {config.hidden_size}, which is released with "
            f"{depth[0]} double + {depth[1]} single blocks, but the file has {got[0]} + {got[1]}: it is partial "
            "(interrupted download or a shard of a split checkpoint); download the complete file"
        )


def _read_source(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> tuple[StateDict, dict, str]:
    """-> (state dict, stored config dict or {}, name for messages)."""
    if isinstance(source, Mapping):
        return dict(source), {}, "state dict"
    path = Path(source)
    sd = read_state_dict(path)
    return sd, _stored_config(read_metadata(path), str(path)), str(path)


def header_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as meta tensors: names, shapes and dtypes from a safetensors header (nothing read)
    or a memory-mapped weights-only pickle."""
    with LazyCheckpoint(path) as ckpt:
        specs = {k: ckpt.shape_dtype(k) for k in ckpt.keys()}
    return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in specs.items()}


def read_config(path: str | os.PathLike) -> TransformerConfig:
    """The architecture of a checkpoint file, as :func:`load_transformer` reads it, from its tensors' shapes
    (:func:`header_tensors`: no weight is loaded)."""
    raw = {k: v for k, v in header_tensors(path).items()
           if not k.endswith((".scale_weight", ".scale_input", "scaled_fp8"))}
    stored = _stored_config(read_metadata(path), str(path))
    axes = stored.get("rope_axes")
    try:
        sd, _ = to_original_layout(raw)
        return config_from_state_dict(sd, rope_axes=tuple(axes) if axes else None,
                                      rope_theta=float(stored.get("rope_theta", 256.0)))
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err


def _stored_config(meta: Mapping[str, str], name: str) -> dict:
    """The config :func:`save_transformer` wrote into the metadata ({} when none), checked to be a valid config."""
    if CONFIG_METADATA_KEY not in meta:
        return {}
    try:
        stored = json.loads(meta[CONFIG_METADATA_KEY])
        if not isinstance(stored, dict):
            raise ValueError(f"a JSON {type(stored).__name__}, not an object")
        TransformerConfig.from_dict(stored)
    except (ValueError, TypeError) as err:
        raise CheckpointError(
            f"{name}: its {CONFIG_METADATA_KEY!r} metadata is not a valid transformer config ({err}); the file was "
            "damaged or written by another tool: re-save it with save_transformer or convert it"
        ) from err
    return stored


def _check_stored_config(stored: Mapping, config: TransformerConfig, name: str, *, skip: tuple[str, ...]) -> None:
    """A stored config must describe the tensors it was saved with (a stale one means the file was edited)."""
    derived = config.to_dict()

    def same(a: object, b: object) -> bool:
        if isinstance(a, float) or isinstance(b, float):
            return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=1e-9)
        return list(a) == list(b) if isinstance(a, (list, tuple)) else a == b

    differ = [f"{k} {stored[k]!r} (tensors: {derived[k]!r})" for k in stored
              if k not in skip and not same(stored[k], derived[k])]
    if differ:
        raise CheckpointError(
            f"{name}: the config in its metadata ({CONFIG_METADATA_KEY!r}) disagrees with its tensors: "
            f"{'; '.join(differ)}. The tensors were changed after saving or the metadata was copied from another "
            "model: re-save it with save_transformer (or convert it), which writes the config of its tensors"
        )


def _default_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The file's own float dtype (most common by element count), bf16 when the bulk is fp8."""
    counts: dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return torch.bfloat16 if dtype in FP8_DTYPES else dtype


def load_transformer(source: str | os.PathLike | Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", storage_dtype: torch.dtype | None = None,
                     rope_axes: tuple[int, int, int] | None = None) -> HunyuanVideoTransformer3D:
    """Build a :class:`HunyuanVideoTransformer3D` from a checkpoint path or a state dict (eval mode).

    dtype: compute dtype (default: the file's float dtype; bf16 for fp8 files). storage_dtype: pass
    ``torch.float8_e4m3fn`` to store the block Linear weights of a bf16/fp32 file in fp8 with a per-layer scale
    (:func:`quantize_fp8`; half the memory of bf16);
    fp8 weights in the file are always kept in fp8. rope_axes: needed only for head dims other than 128 whose
    file carries no config metadata (files written by :func:`save_transformer` do).
    """
    raw, stored, name = _read_source(source)
    raw = {k: v for k, v in raw.items() if not k.endswith((".scale_input", "scaled_fp8"))}
    scales = {k[: -len(".scale_weight")]: v for k, v in raw.items() if k.endswith(".scale_weight")}
    raw = {k: v for k, v in raw.items() if not k.endswith(".scale_weight")}
    sd, family = to_original_layout(raw)
    del raw  # only `sd` references the tensors from here on; they are released one by one below
    scales, _ = strip_prefix(scales, CHECKPOINT_PREFIXES) if scales else ({}, "")

    axes = rope_axes or stored.get("rope_axes")
    try:
        config = config_from_state_dict(sd, rope_axes=tuple(axes) if axes else None,
                                        rope_theta=float(stored.get("rope_theta", 256.0)))
    except CheckpointError as err:
        raise CheckpointError(f"{name}: detected {family}, but it is incomplete: {err}") from err
    _check_stored_config(stored, config, name, skip=("rope_axes",) if rope_axes else ())
    _check_released_depth(config, name)
    with torch.device("meta"):
        model = HunyuanVideoTransformer3D(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong_shape = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                   if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = [f"{name}: detected {family}, but it does not match the architecture read from its shapes "
                 f"({config.num_double_blocks} double + {config.num_single_blocks} single blocks, hidden "
                 f"{config.hidden_size})"]
        if missing:
            parts.append(f"{len(missing)} missing keys, first: {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:3]}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} shape mismatches, first: {wrong_shape[:2]}")
        parts.append(f"expected {_EXPECTED}; the file may be partial (interrupted download) or another model")
        raise CheckpointError("; ".join(parts))

    compute = dtype or _default_dtype(sd)
    if compute in FP8_DTYPES:
        raise ValueError("dtype is the compute dtype (bf16/fp16/fp32); use storage_dtype=torch.float8_e4m3fn "
                         "to keep weights in fp8")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors: StateDict = {}
    for key in list(sd):
        value = sd.pop(key)  # frees each source tensor once converted (peak ~ one copy, not two)
        module_name, _, leaf = key.rpartition(".")
        keep_fp8 = leaf == "weight" and module_name in linears and (
            value.dtype in FP8_DTYPES or (storage_dtype in FP8_DTYPES and module_name.startswith(BLOCK_PREFIXES)))
        if keep_fp8 and value.dtype in FP8_DTYPES:
            tensors[key] = value.to(device)
        elif keep_fp8:   # quantized with a per-layer scale (as model.fp8_base; ComfyUI's fp8_scaled form)
            quantized, scales[module_name] = quantize_fp8(value, storage_dtype)
            tensors[key] = quantized.to(device)
        else:
            tensors[key] = value.to(device=device, dtype=compute if value.is_floating_point() else value.dtype)
        if keep_fp8 or module_name in scales:
            scale = scales.get(module_name)
            if scale is not None:
                scale = tensors[f"{module_name}.scale_weight"] = scale.to(device, torch.float32)
            _make_fp8(model.get_submodule(module_name), scale)
    model.load_state_dict(tensors, assign=True, strict=True)
    for p in model.parameters():
        if p.dtype in FP8_DTYPES:
            p.requires_grad_(False)
    return model.eval()


def save_transformer(model: HunyuanVideoTransformer3D, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None,
                     materialize: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Atomically write ``model`` as an original-layout safetensors file with its config in the metadata.

    fp8 weights are written as fp8; when some carry a ``scale_weight`` the ``scaled_fp8`` marker key that ComfyUI
    uses to recognise scaled fp8 files is added, and every other Linear weight is written quantized with its own
    scale (:func:`quantize_fp8`): ComfyUI reads a marked file with every Linear in fp8 (scale 1 where a layer has
    none), so both readers see the same weights. ``dtype``: cast floating-point weights; ``metadata``: extra
    entries next to the config. The file is written one tensor at a time; ``materialize(name, value)`` turns a
    ``state_dict()`` value into the full CPU tensor just before it is written (e.g. gathering a sharded
    parameter), so a sharded model is never held in full.
    """
    meta = {**(metadata or {}), CONFIG_METADATA_KEY: json.dumps(model.config.to_dict())}
    tensors = model.state_dict()

    def cast(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.dtype.is_floating_point else t.dtype

    scaled = dtype is None and any(k.endswith(".scale_weight") for k in tensors)
    quantize = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)
                and not isinstance(m, FP8Linear)} if scaled else set()
    specs = []
    for name, t in tensors.items():
        if name in quantize:
            specs += [(name, FP8_DTYPES[0], tuple(t.shape)), (f"{name[:-len('weight')]}scale_weight", torch.float32, ())]
        else:
            specs.append((name, cast(t), tuple(t.shape)))
    if scaled:
        specs.append(("scaled_fp8", FP8_DTYPES[0], (0,)))

    def stream() -> Iterator[torch.Tensor]:
        for name, t in tensors.items():
            full = (materialize(name, t) if materialize is not None else t).detach()
            if name in quantize:
                yield from (part.to("cpu") for part in quantize_fp8(full, FP8_DTYPES[0]))
            else:
                yield full.to("cpu", cast(t))
        if scaled:
            yield torch.empty(0, dtype=FP8_DTYPES[0])

    return save_safetensors_stream(specs, stream(), path, metadata=meta)


_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


def main(argv: list[str] | None = None) -> int:
    """``python -m accvideo_core.models.loading info FILE`` / ``convert FILE OUT.safetensors [--dtype] [--fp8]``.

    Exit codes: 0 done, 2 unreadable or wrong input (one ``error:`` line naming the file)."""
    parser = argparse.ArgumentParser(prog="python -m accvideo_core.models.loading",
                                     description="Inspect or convert HunyuanVideo / AccVideo transformer checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="detected layout, architecture and dtypes of a checkpoint")
    info.add_argument("path")
    convert = sub.add_parser("convert", help="write an original-layout safetensors file (ComfyUI's UNETLoader reads "
                                             "it) from any supported layout")
    convert.add_argument("path")
    convert.add_argument("out")
    convert.add_argument("--dtype", choices=names_for(*_COMPUTE_DTYPES), help="weight dtype (default: keep the file's)")
    convert.add_argument("--fp8", action="store_true", help="store the block Linear weights as float8_e4m3fn with "
                         "a per-layer scale (ComfyUI's fp8_scaled form)")
    args = parser.parse_args(argv)
    try:
        (_info if args.command == "info" else _convert)(args)
    except (ValueError, OSError) as err:  # CheckpointError is a ValueError and names its file
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        return 2
    return 0


def _info(args: argparse.Namespace) -> None:
    print(f"reading {args.path} ...", flush=True)
    raw, stored, name = _read_source(args.path)
    family = detect_family(strip_prefix(raw, CHECKPOINT_PREFIXES)[0])
    print(f"{name}: {family}")
    counts: dict[str, int] = {}
    for t in raw.values():
        counts[dtype_name(t.dtype)] = counts.get(dtype_name(t.dtype), 0) + t.numel()
    print(f"tensors: {len(raw)}, parameters: {sum(counts.values()) / 1e9:.3f} B, by dtype: {counts}")
    sd, _ = to_original_layout({k: v for k, v in raw.items() if not k.endswith((".scale_weight", ".scale_input",
                                                                                  "scaled_fp8"))})
    axes = stored.get("rope_axes")
    print(json.dumps(config_from_state_dict(sd, rope_axes=tuple(axes) if axes else None).to_dict(), indent=2))


def _convert(args: argparse.Namespace) -> None:
    print(f"reading and converting {args.path} ...", flush=True)
    model = load_transformer(args.path, dtype=parse_dtype(args.dtype) if args.dtype else None,
                             storage_dtype=FP8_DTYPES[0] if args.fp8 else None)
    print(f"writing {args.out} ...", flush=True)
    print(f"wrote {save_transformer(model, args.out)} ({model.config.num_double_blocks} double + "
          f"{model.config.num_single_blocks} single blocks, hidden {model.config.hidden_size})")


if __name__ == "__main__":
    raise SystemExit(main())
