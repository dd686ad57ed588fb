"""Loading the HunyuanVideo VAE from every layout it ships in, with the config read from tensor shapes.

Layouts (all normalised to our module names, which are the original HunyuanVideo = diffusers names):
- **original** ``pytorch_model.pt`` (``decoder.up_blocks.0.resnets.0.norm1.weight``, ...), possibly under a
  ``vae.`` prefix or inside a ``state_dict`` wrapper; ComfyUI's repackaged ``hunyuan_video_vae_bf16.safetensors``
  uses the same names;
- **diffusers** folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or a pipeline folder with a
  ``vae/`` subfolder): same names, config from ``config.json``;
- **ComfyUI internal** (LDM-style) names, as held in memory by ComfyUI's ``VAE.first_stage_model``
  (``decoder.mid.block_1``, ``decoder.mid.attn_1.q`` with 1x1x1-conv weights, ``decoder.up.3.block.0`` for
  diffusers' ``up_blocks.0``, ``nin_shortcut``, ``norm_out``), possibly under ``first_stage_model.``;
- old diffusers attention names (``query``/``key``/``value``/``proj_attn``).

Building from an in-memory state dict never copies tensors (unless a dtype/device change is requested): the
model is created on the meta device and the given tensors are assigned as its parameters (attention weights
stored as ``[C, C, 1, 1, 1]`` become ``[C, C]`` views of the same storage).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..utils.io import CheckpointError, read_metadata, read_state_dict, save_safetensors
from .vae_hunyuan_video import HunyuanVideoVAE, VAEConfig

StateDict = dict[str, torch.Tensor]
CONFIG_METADATA_KEY = "accvideo.vae_config"
_ANCHOR = "decoder.conv_in.conv.weight"


# ----------------------------------------------------------------------------------------------------------------
# Key layouts
# ----------------------------------------------------------------------------------------------------------------
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


def detect_vae_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"original"`` (= diffusers names), ``"comfyui"`` (LDM-style internal names) or ``"legacy"`` (old
    diffusers attention names), for a prefix-free state dict."""
    if any(k.startswith("decoder.mid.block_1.") or k.startswith("decoder.up.") for k in state_dict):
        return "comfyui"
    if any(".attentions.0.query." in k or ".attentions.0.proj_attn." in k for k in state_dict):
        return "legacy"
    return "original"


_ATTN_LDM = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _as_linear(t: torch.Tensor) -> torch.Tensor:
    """``[C, C, 1, 1(, 1)]`` 1x1 conv weight -> ``[C, C]`` linear weight, as a view (no copy)."""
    return t.flatten(1) if t.dim() > 2 else t


def comfyui_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """ComfyUI's internal (LDM-style) VAE names -> original/diffusers names, without copying tensors."""
    levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up\.(\d+)\.", k))}
    n_up = max(levels) + 1 if levels else 0
    out: StateDict = {}
    for key, value in state_dict.items():
        new = key
        new = re.sub(r"^(encoder|decoder)\.mid\.block_(\d+)\.",
                     lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.", new)
        m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_LDM[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm":
                value = _as_linear(value)
        new = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", new)
        new = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
                     lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.resnets.{m.group(2)}.", new)
        new = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
                     lambda m: f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.", new)
        new = new.replace(".nin_shortcut.", ".conv_shortcut.")
        new = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", new)
        out[new] = value
    return out


def original_to_comfyui(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Original/diffusers names -> ComfyUI's internal names (attention weights as ``[C, C, 1, 1, 1]`` views);
    the inverse of ``comfyui_to_original``."""
    levels = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(levels) + 1 if levels else 0
    inverse_attn = {v: k for k, v in _ATTN_LDM.items()}
    out: StateDict = {}
    for key, value in state_dict.items():
        new = key
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.",
                     lambda m: f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.", new)
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                     r"(weight|bias)$", new)
        if m:
            new = f"{m.group(1)}.mid.attn_1.{inverse_attn[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and m.group(3) == "weight":
                value = value.reshape(*value.shape, 1, 1, 1)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        out[new] = value
    return out


def legacy_to_original(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Old diffusers attention names (``query``/``key``/``value``/``proj_attn``) -> current names."""
    out: StateDict = {}
    for key, value in state_dict.items():
        m = re.match(r"^(.*\.attentions\.0\.)(query|key|value|proj_attn)\.(weight|bias)$", key)
        if m:
            key = f"{m.group(1)}{_ATTN_LEGACY[m.group(2)]}.{m.group(3)}"
        out[key] = _as_linear(value) if m and m.group(3) == "weight" else value
    return out


def to_original_layout(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any supported layout (with any prefix) -> our module names, without copying tensors."""
    sd = strip_vae_prefix(state_dict)
    layout = detect_vae_layout(sd)
    if layout == "comfyui":
        sd = comfyui_to_original(sd)
    elif layout == "legacy":
        sd = legacy_to_original(sd)
    # Attention projections stored as 1x1 convs in otherwise original files.
    return {k: (_as_linear(v) if ".attentions.0.to_" in k and k.endswith(".weight") else v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------------
# Config from shapes
# ----------------------------------------------------------------------------------------------------------------
def config_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, norm_num_groups: int | None = None,
                           overrides: Mapping[str, Any] | None = None) -> VAEConfig:
    """Read a ``VAEConfig`` from the tensor shapes of an original-layout state dict.

    GroupNorm's group count is not visible in any shape: it comes from ``norm_num_groups``, ``overrides``, or
    is taken as 32 (the released VAE) when every width is a multiple of 32.
    """
    sd = state_dict
    up = sorted({int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    if not up or up != list(range(len(up))):
        raise CheckpointError(f"VAE decoder up blocks are missing or not numbered 0..n-1 (found {up})")
    widths_reversed = [sd[f"decoder.up_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0] for i in up]
    resnets = {int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    has_encoder = "encoder.conv_in.conv.weight" in sd and "quant_conv.weight" in sd
    values: dict[str, Any] = dict(
        in_channels=sd["encoder.conv_in.conv.weight"].shape[1] if has_encoder else 3,
        out_channels=sd["decoder.conv_out.conv.weight"].shape[0],
        latent_channels=sd["decoder.conv_in.conv.weight"].shape[1],
        block_out_channels=tuple(reversed(widths_reversed)),
        layers_per_block=len(resnets) - 1,
        mid_block_add_attention="decoder.mid_block.attentions.0.to_q.weight" in sd,
        has_encoder=has_encoder,
    )
    if overrides:
        values.update(overrides)
    if norm_num_groups is not None:
        values["norm_num_groups"] = norm_num_groups
    if "norm_num_groups" not in values:
        if any(c % 32 for c in values["block_out_channels"]):
            raise CheckpointError(
                f"cannot tell the GroupNorm group count of this VAE (widths {values['block_out_channels']} are not "
                "multiples of 32, the released value): pass load_vae(..., norm_num_groups=G), or save it with "
                "accvideo_core.models.vae_loading.save_vae, which records the config")
        values["norm_num_groups"] = 32
    config = VAEConfig(**values)
    with_up = [i for i in up if f"decoder.up_blocks.{i}.upsamplers.0.conv.conv.weight" in sd]
    expected = [i for i, f in enumerate(config.up_factors()) if f is not None]
    if with_up != expected:
        raise CheckpointError(f"VAE up blocks {with_up} have upsamplers, but a {config.temporal_compression}x time / "
                              f"{config.spatial_compression}x space VAE with {len(up)} blocks has them at {expected}")
    return config


# ----------------------------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------------------------
def vae_from_state_dict(state_dict: Mapping[str, torch.Tensor], *, config: VAEConfig | None = None,
                        norm_num_groups: int | None = None, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> HunyuanVideoVAE:
    """Build a VAE whose parameters *are* the given tensors (no copy unless ``dtype``/``device`` differ)."""
    sd = to_original_layout(state_dict)
    config = config or config_from_state_dict(sd, norm_num_groups=norm_num_groups)
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
            "VAE weights do not fit a HunyuanVideo causal 3D VAE of config "
            f"{config}: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, unexpected "
            f"{unexpected[:6]}{'...' if len(unexpected) > 6 else ''}, wrong shapes {wrong[:4]}")
    if dtype is not None or device is not None:
        sd = {k: v.to(device=device if device is not None else v.device, dtype=dtype or v.dtype)
              for k, v in sd.items()}
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) > 1:
        target = dtype or max(dtypes, key=lambda d: torch.empty((), dtype=d).element_size())
        sd = {k: v.to(target) for k, v in sd.items()}
    vae.load_state_dict(sd, strict=True, assign=True)
    return vae.eval()


def _read_config_metadata(path: Path) -> dict | None:
    try:
        meta = read_metadata(path)
    except CheckpointError:  # unreadable files get their clear error from read_state_dict
        return None
    return json.loads(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else None


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
    mapping = {"in_channels": "in_channels", "out_channels": "out_channels", "latent_channels": "latent_channels",
               "block_out_channels": "block_out_channels", "layers_per_block": "layers_per_block",
               "norm_num_groups": "norm_num_groups", "mid_block_add_attention": "mid_block_add_attention",
               "temporal_compression_ratio": "temporal_compression",
               "spatial_compression_ratio": "spatial_compression"}
    if cfg.get("act_fn", "silu") != "silu":
        raise CheckpointError(f"unsupported VAE act_fn {cfg['act_fn']!r}; HunyuanVideo's VAE uses silu")
    return {ours: (tuple(cfg[theirs]) if ours == "block_out_channels" else cfg[theirs])
            for theirs, ours in mapping.items() if theirs in cfg}


def load_vae(source: Any, *, dtype: torch.dtype | None = None, device: torch.device | str | None = "cpu",
             norm_num_groups: int | None = None) -> HunyuanVideoVAE:
    """Load the HunyuanVideo VAE.

    source: a checkpoint file (``.pt``/``.pth``/``.bin`` read weights-only, or ``.safetensors``), a diffusers
    folder (or pipeline folder with ``vae/``), an in-memory state dict in any supported layout, an ``nn.Module``
    holding one, or an object with ``first_stage_model`` (ComfyUI's ``VAE``). In-memory tensors are used as
    they are, without copies, when ``dtype`` is ``None`` and ``device`` is ``None`` or already theirs.
    dtype: parameter dtype (``None`` keeps the stored one). device: where the parameters go (``None`` = stay).
    norm_num_groups: GroupNorm groups for small VAEs whose files carry no config (the released VAE uses 32).
    """
    overrides: dict[str, Any] | None = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        folder = _diffusers_folder(path) if path.is_dir() else None
        if path.is_dir() and folder is None:
            raise CheckpointError(f"{path} is a folder without a diffusers VAE (config.json + "
                                  "diffusion_pytorch_model.safetensors, or a vae/ subfolder); pass the file itself")
        if folder is not None:
            path, diffusers_cfg = folder
            overrides = _config_from_diffusers(diffusers_cfg)
        else:
            overrides = _read_config_metadata(path)
        state_dict = read_state_dict(path)
        dev = device
    else:
        if hasattr(source, "first_stage_model"):  # ComfyUI's VAE wrapper (duck-typed: no ComfyUI import)
            source = source.first_stage_model
        if isinstance(source, HunyuanVideoVAE):
            overrides = source.config.to_dict()
        if isinstance(source, nn.Module):
            source = source.state_dict()
        if not isinstance(source, Mapping):
            raise TypeError(f"load_vae expects a path, a state dict, an nn.Module or a ComfyUI VAE, got "
                            f"{type(source).__name__}")
        state_dict = dict(source)
        first = next(iter(state_dict.values()), None)
        dev = device if first is None or device is None or torch.device(device) != first.device else None
    sd = to_original_layout(state_dict)
    config = config_from_state_dict(sd, norm_num_groups=norm_num_groups, overrides=overrides)
    return vae_from_state_dict(sd, config=config, dtype=dtype, device=dev)


def save_vae(vae: HunyuanVideoVAE, path: str | os.PathLike) -> Path:
    """Atomically save a VAE as original-layout safetensors with its config in the metadata."""
    return save_safetensors(vae.state_dict(), path,
                            metadata={CONFIG_METADATA_KEY: json.dumps(vae.config.to_dict())})
