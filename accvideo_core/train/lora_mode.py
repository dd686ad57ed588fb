"""The trainer's LoRA mode (``model.lora_rank > 0``): adapters on one frozen base, its checks and its exports.

The base is loaded once and frozen; with the adapters off it is the teacher (validation baseline) and the
discriminator's backbone, with them on it is the student. Only the adapters (fp32) and the heads train.
Exports: ``student_lora.safetensors`` (ComfyUI key names, see :func:`accvideo_core.lora.extract.low_rank_tensors`;
native ``LoraLoaderModelOnly`` and our loader read it) and the merged ``student.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from accvideo_core.lora.adapters import LoraAdapters, adapter_factors, add_adapters, is_adapter_key
from accvideo_core.lora.extract import low_rank_tensors
from accvideo_core.lora.formats import LoraFormatError, load_lora
from accvideo_core.train.config import ConfigError, TrainConfig
from accvideo_core.utils.io import CheckpointError, save_safetensors

LORA_FILE = "student_lora.safetensors"
LORA_METADATA_KEY = "accvideo_lora"
FINGERPRINT_VALUES = 4096  # values sampled per tensor for the base fingerprint


def lora_mode(cfg: TrainConfig) -> bool:
    return cfg.model.lora_rank > 0


def check_config(cfg: TrainConfig) -> None:
    """LoRA-mode choices that need no model: refused before anything is loaded."""
    if cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay > 0 is not supported with model.lora_rank > 0 (an EMA of the adapters "
                          "is not implemented); set optim.ema_decay = 0")


def refuse_fp8(model: nn.Module, source: str) -> None:
    if any(p.dtype.itemsize == 1 for p in model.parameters()):
        raise ConfigError(f"model.lora_rank > 0 needs a bf16 or fp32 base, but {source or 'the teacher'} holds fp8 "
                          "weights (the frozen base is also the teacher whose outputs the student learns; fp8 "
                          "rounding would be learnt too). Use the bf16 checkpoint, e.g. "
                          "hunyuan_video_t2v_720p_bf16.safetensors")


def build(model: nn.Module, cfg: TrainConfig) -> LoraAdapters:
    """Freeze ``model`` and add the configured adapters (errors name the config field)."""
    m = cfg.model
    try:
        return add_adapters(model, rank=m.lora_rank, alpha=m.lora_alpha or None, targets=m.lora_targets,
                            seed=cfg.optim.seed)
    except ValueError as err:
        raise ConfigError(f"model.lora_rank / model.lora_targets: {err}") from None


def init_from_file(adapters: LoraAdapters, cfg: TrainConfig, note: Callable[[str], None]) -> None:
    """``model.lora_init``: start the adapters from a LoRA file; errors before training when it does not fit."""
    path = cfg.model.lora_init
    if not Path(path).is_file():
        raise ConfigError(f"model.lora_init: {path} not found; give an existing LoRA file or leave it empty")
    try:
        state = load_lora(path)
        dropped = adapters.load_lora(state, cfg.optim.seed)
    except (LoraFormatError, CheckpointError) as err:
        raise ConfigError(f"model.lora_init = {path} does not fit this base: {err}. Use a LoRA made for this "
                          "model (a student_lora.safetensors of an earlier run, or one extracted with "
                          "'python -m accvideo_core.lora extract'), or leave model.lora_init empty") from None
    lost = {k: v for k, v in dropped.items() if v}
    if lost or state.unused:
        parts = [f"{len(v)} {k} module(s), e.g. {v[:2]}" for k, v in lost.items()]
        parts += [f"{len(state.unused)} unreadable key(s)"] if state.unused else []
        note(f"model.lora_init: the adapters cannot represent {'; '.join(parts)}; those changes are not used "
             "(widen model.lora_targets to include modules)")


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (first 32 hex digits) over the base's keys, shapes and up to 4096 evenly strided values (as fp32)
    of every tensor: tells bases apart (a fine-tune changes every tensor) without hashing 25 GB."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if not is_adapter_key(k)):
        flat = state[key].detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES]
        h.update(f"{key}:{tuple(state[key].shape)};".encode())
        h.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:32]


def lora_file_tensors(state: Mapping[str, torch.Tensor], alpha: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Adapter factors of a (full or adapters-only) state dict -> LoRA file tensors in ComfyUI key names."""
    out: dict[str, torch.Tensor] = {}
    for module, (up, down) in sorted(adapter_factors(state).items()):
        out.update(low_rank_tensors(module, up.to(dtype), down.to(dtype), alpha))
    return out


def save_lora(state: Mapping[str, torch.Tensor], path: Path, adapters: LoraAdapters, *, dtype: torch.dtype,
              base_fingerprint: str, cfg: TrainConfig, step: int) -> Path:
    """Write the student LoRA with its metadata: rank, alpha, targets, base fingerprint, training config."""
    info: dict[str, Any] = {
        "rank": adapters.rank, "alpha": adapters.alpha, "targets": list(adapters.targets),
        "modules": len(adapters.names), "base": Path(cfg.model.teacher).name if cfg.model.teacher else "<in memory>",
        "base_fingerprint": base_fingerprint, "step": step, "dtype": str(dtype).removeprefix("torch."),
        "train_config": cfg.to_dict(),
    }
    meta = {"format": "pt", "ss_network_dim": str(adapters.rank), "ss_network_alpha": f"{adapters.alpha:g}",
            LORA_METADATA_KEY: json.dumps(info)}
    return save_safetensors(lora_file_tensors(state, adapters.alpha, dtype), path, meta)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' fp32 factors of a plain (unsharded) model, on the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if is_adapter_key(n)}
