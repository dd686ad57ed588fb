"""Load a HunyuanVideo VAE from any common file: ``load_vae(source, dtype=..., device=...)``; ``save_vae`` writes one.

Accepted (all normalised to our module names, which are the original HunyuanVideo = diffusers names):
- the original ``pytorch_model.pt`` (read weights-only), possibly under a ``vae.`` prefix or inside a
  ``state_dict`` wrapper; ComfyUI's repackaged ``hunyuan_video_vae_bf16.safetensors`` uses the same names;
- a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline folder with a
  ``vae/`` subfolder): same names;
- ComfyUI's internal (LDM-style) names, as held in memory by ComfyUI's ``VAE.first_stage_model``, possibly under
  ``first_stage_model.`` (converted with the table in ``models/key_maps.py``);
- old diffusers attention names (``query``/``key``/``value``/``proj_attn``).

The architecture is read from tensor shapes. A config recorded with the weights (``save_vae``'s metadata, a
diffusers ``config.json``, a model's own config) supplies what shapes cannot show (GroupNorm groups, compression
ratios) and is validated against the shapes for everything else: a disagreement raises ``CheckpointError``.

Building from in-memory tensors never copies them (unless a dtype/device change is requested): the model is
created on the meta device and the given tensors are assigned as its parameters (attention weights stored as
``[C, C, 1, 1, 1]`` become ``[C, C]`` views of the same storage).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..utils.io import CheckpointError, StateDict, read_metadata, read_state_dict, save_safetensors
from .key_maps import (VAE_ATTENTION_WEIGHTS, vae_comfy_internal_to_original, vae_legacy_to_original,
                       vae_linear_weight)
from .vae_hunyuan_video import HunyuanVideoVAE, VAEConfig

CONFIG_METADATA_KEY = "accvideo.vae_config"
ORIGINAL_LAYOUT = "HunyuanVideo VAE (original / diffusers names)"
COMFY_LAYOUT = "HunyuanVideo VAE (ComfyUI internal names)"
LEGACY_LAYOUT = "HunyuanVideo VAE (old diffusers attention names)"
_ANCHOR = "decoder.conv_in.conv.weight"
_DIFFUSERS_CONFIG = {"in_channels": "in_channels", "out_channels": "out_channels",
                     "latent_channels": "latent_channels", "block_out_channels": "block_out_channels",
                     "layers_per_block": "layers_per_block", "norm_num_groups": "norm_num_groups",
                     "mid_block_add_attention": "mid_block_add_attention",
                     "temporal_compression_ratio": "temporal_compression",
                     "spatial_compression_ratio": "spatial_compression"}  # diffusers config.json -> VAEConfig


def strip_vae_prefix(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Drop a ``vae.`` / ``first_stage_model.`` / any other prefix in front of the VAE keys; keys outside the VAE
    (e.g. a transformer in the same file) are ignored."""
    anchors = [k for k in state_dict if k.endswith(_ANCHOR)]
    if not anchors:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"no HunyuanVideo VAE found: expected a key ending in {_ANCHOR!r} (causal 3D VAE decoder), got keys "
            f"like {sample}. Is this a transformer or text-encoder file? Pick the VAE file "
            "(e.g. hunyuan_video_vae_bf16.safetensors or HunyuanVideo's vae/pytorch_model.pt)")
    prefix = min(anchors, key=len)[: -len(_ANCHOR)]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``ORIGINAL_LAYOUT`` (= diffusers names), ``COMFY_LAYOUT`` or ``LEGACY_LAYOUT`` of a prefix-free state dict."""
    if any(k.startswith(("decoder.mid.block_1.", "decoder.up.")) for k in sd):
        return COMFY_LAYOUT
    if any(".attentions.0.query." in k or ".attentions.0.proj_attn." in k for k in sd):
        return LEGACY_LAYOUT
    return ORIGINAL_LAYOUT


def to_original_layout(state_dict: Mapping[str, torch.Tensor]) -> tuple[StateDict, str]:
    """Strip any prefix and convert to our names, without copying tensors. Returns (state dict, layout)."""
    sd = strip_vae_prefix(state_dict)
    layout = detect_layout(sd)
    if layout == COMFY_LAYOUT:
        sd = vae_comfy_internal_to_original(sd)
    elif layout == LEGACY_LAYOUT:
        sd = vae_legacy_to_original(sd)
    # attention projections stored as 1x1 convs in otherwise original files
    return {k: (vae_linear_weight(v) if k.endswith(VAE_ATTENTION_WEIGHTS) else v) for k, v in sd.items()}, layout


def _shape_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The ``VAEConfig`` fields the tensor shapes of an original-layout state dict show."""
    up = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    if not up or up != list(range(len(up))):
        raise CheckpointError(f"VAE decoder up blocks are missing or not numbered 0..n-1 (found {up})")
    widths_reversed = [sd[f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in up]
    resnets = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    has_encoder = "encoder.conv_in.conv.weight" in sd and "quant_conv.weight" in sd
    shapes: dict[str, Any] = dict(
        out_channels=sd["decoder.conv_out.conv.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.conv.weight"].shape[1],
        block_out_channels=tuple(reversed(widths_reversed)),
        layers_per_block=len(resnets) - 1,
        mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in sd,
        has_encoder=has_encoder,
    )
    if has_encoder:  # a decoder-only file does not show the video channels
        shapes["in_channels"] = sd["encoder.conv_in.conv.weight"].shape[1]
    return shapes


def config_from_state_dict(sd: Mapping[str, torch.Tensor], *, norm_num_groups: int | None = None,
                           stored: Mapping[str, Any] | None = None, name: str = "state dict") -> VAEConfig:
    """Read a ``VAEConfig`` from the tensor shapes of an original-layout state dict.

    ``stored``: a config recorded with the weights; it supplies the fields shapes do not show and must agree with
    them on the others. GroupNorm's group count comes from ``norm_num_groups``, ``stored``, or is taken as 32 (the
    released VAE) when every width is a multiple of 32.
    """
    shapes = _shape_config(sd)
    stored = {k: (tuple(v) if k == "block_out_channels" else v) for k, v in (stored or {}).items()}
    conflicts = [f"{k} {stored[k]!r} recorded, {v!r} in the weights" for k, v in shapes.items()
                 if k in stored and stored[k] != v]
    if conflicts:
        raise CheckpointError(f"{name}: the VAE config recorded with the weights disagrees with their shapes "
                              f"({'; '.join(conflicts)}): the file was edited or mislabelled; re-save it with "
                              "accvideo_core.models.vae_loading.save_vae")
    values = {**stored, **shapes}
    if norm_num_groups is not None:
        values["norm_num_groups"] = norm_num_groups
    if "norm_num_groups" not in values:
        if any(c % 32 for c in values["block_out_channels"]):
            raise CheckpointError(
                f"{name}: cannot tell the GroupNorm group count of this VAE (widths {values['block_out_channels']} "
                "are not multiples of 32, the released value): pass load_vae(..., norm_num_groups=G), or save it "
                "with accvideo_core.models.vae_loading.save_vae, which records the config")
        values["norm_num_groups"] = 32
    try:
        config = VAEConfig.from_dict(values)
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from err
    up = range(len(config.block_out_channels))
    with_up = [i for i in up if f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.weight" in sd]
    expected = [i for i, f in enumerate(config.up_factors()) if f is not None]
    if with_up != expected:
        raise CheckpointError(f"{name}: VAE up blocks {with_up} have upsamplers, but a {config.temporal_compression}x "
                              f"time / {config.spatial_compression}x space VAE with {len(up)} blocks has them at "
                              f"{expected}")
    return config


def _diffusers_folder(path: Path) -> tuple[Path, dict] | None:
    """(weights file, config.json dict) of a diffusers VAE folder (or a pipeline folder with ``vae/``)."""
    for folder in (path, path / "vae"):
        cfg = folder / "config.json"
        if cfg.is_file():
            for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                         "diffusion_pytorch_model.fp16.safetensors"):
                if (folder / name).is_file():
                    return folder / name, json.loads(cfg.read_text())
    return None


def _config_from_diffusers(cfg: dict) -> dict[str, Any]:
    if cfg.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"unsupported VAE act_fn {cfg['act_fn']!r}; HunyuanVideo's VAE uses silu")
    return {ours: cfg[theirs] for theirs, ours in _DIFFUSERS_CONFIG.items() if theirs in cfg}


def _read_config_metadata(path: Path) -> dict:
    try:
        meta = read_metadata(path)
    except CheckpointError:  # unreadable files get their clear error from read_state_dict
        return {}
    return json.loads(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else {}


def _read_source(source: Any) -> tuple[StateDict, dict, str]:
    """-> (state dict, config recorded with it or {}, name for messages)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            folder = _diffusers_folder(path)
            if folder is None:
                raise CheckpointError(f"{path} is a folder without a diffusers VAE (config.json + "
                                      "diffusion_pytorch_model.safetensors, or a vae/ subfolder); pass the file itself")
            weights, cfg = folder
            return read_state_dict(weights), _config_from_diffusers(cfg), str(weights)
        return read_state_dict(path), _read_config_metadata(path), str(path)
    if hasattr(source, "first_stage_model"):  # ComfyUI's VAE wrapper (duck-typed: no ComfyUI import)
        source = source.first_stage_model
    stored = source.config.to_dict() if isinstance(source, HunyuanVideoVAE) else {}
    if isinstance(source, nn.Module):
        return source.state_dict(), stored, type(source).__name__
    if not isinstance(source, Mapping):
        raise TypeError(f"load_vae expects a path, a state dict, an nn.Module or a ComfyUI VAE, got "
                        f"{type(source).__name__}")
    return dict(source), stored, "state dict"


def _build(sd: StateDict, config: VAEConfig, *, dtype: torch.dtype | None, device: torch.device | str | None,
           name: str) -> HunyuanVideoVAE:
    """A VAE whose parameters *are* the given tensors (no copy unless ``dtype``/``device`` ask for one)."""
    if not config.has_encoder:
        sd = {k: v for k, v in sd.items() if not (k.startswith("encoder.") or k.startswith("quant_conv."))}
    with torch.device("meta"):
        vae = HunyuanVideoVAE(config)
    expected = {k: v.shape for k, v in vae.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(s)}" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(s)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{name}: VAE weights do not fit a HunyuanVideo causal 3D VAE of config "
            f"{config}: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}, wrong shapes {wrong[:4]}")
    if dtype is not None or device is not None:
        sd = {k: v.to(device=device if device is not None else v.device, dtype=dtype or v.dtype)
              for k, v in sd.items()}
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) > 1:
        target = dtype or max(dtypes, key=lambda d: d.itemsize)
        sd = {k: v.to(target) for k, v in sd.items()}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval()


def load_vae(source: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = "cpu",
             norm_num_groups: int | None = None) -> HunyuanVideoVAE:
    """Build a :class:`HunyuanVideoVAE` (eval mode) from a checkpoint, a state dict or a model holding one.

    source: a checkpoint file (``.pt``/``.pth``/``.bin`` read weights-only, or ``.safetensors``), a diffusers
    folder (or pipeline folder with ``vae/``), an in-memory state dict in any supported layout, an ``nn.Module``
    holding one, or an object with ``first_stage_model`` (ComfyUI's ``VAE``). In-memory tensors are used as
    they are, without copies, when ``dtype`` is ``None`` and ``device`` is ``None`` or already theirs.
    dtype: parameter dtype (``None`` keeps the stored one). device: where the parameters go (``None`` = stay).
    norm_num_groups: GroupNorm groups for small VAEs whose files carry no config (the released VAE uses 32).
    """
    raw, stored, name = _read_source(source)
    if not isinstance(source, (str, os.PathLike)):  # in memory: no copy to the device the tensors are already on
        first = next(iter(raw.values()), None)
        if first is not None and device is not None and torch.device(device) == first.device:
            device = None
    sd, layout = to_original_layout(raw)
    config = config_from_state_dict(sd, norm_num_groups=norm_num_groups, stored=stored, name=name)
    return _build(sd, config, dtype=dtype, device=device, name=f"{name} ({layout})")


def save_vae(vae: HunyuanVideoVAE, path: str | os.PathLike) -> Path:
    """Atomically write ``vae`` as an original-layout safetensors file with its config in the metadata (validated
    against the shapes when loaded)."""
    return save_safetensors(vae.state_dict(), path,
                            metadata={CONFIG_METADATA_KEY: json.dumps(vae.config.to_dict())})
