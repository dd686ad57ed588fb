"""The trainer's LoRA mode (``model.lora_rank > 0``): adapters on one frozen base, its checks and its exports.

The base is loaded once and frozen; with the adapters off it is the teacher (validation baseline) and the
discriminator's backbone, with them on it is the student. Only the adapters (fp32) and the heads train.
Exports: ``student_lora.safetensors`` (ComfyUI key names, see :func:`accvideo_core.lora.extract.low_rank_tensors`;
native ``LoraLoaderModelOnly`` and our loader read it) and the merged ``student.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from accvideo_core.lora.adapters import (DOWN, UP, LoraAdapters, adapter_factors, add_adapters, is_adapter_key,
                                         merged_weight)
from accvideo_core.lora.extract import low_rank_tensors
from accvideo_core.lora.formats import LoraFormatError, load_lora
from accvideo_core.models.loading import (Fp8Layout, apply_fp8_layout, block_linears_layout, cast_keeping_fp8,
                                          dequantized, fp8_layout)
from accvideo_core.train import distributed as D
from accvideo_core.train.config import ConfigError, TrainConfig
from accvideo_core.utils.dtypes import FP8_DTYPES, parse_dtype
from accvideo_core.utils.io import CheckpointError, load_torch, read_state_dict, save_safetensors, save_torch

if TYPE_CHECKING:
    from accvideo_core.train.loop import Trainer

LORA_FILE = "student_lora.safetensors"
ADAPTERS_FILE = "adapters.safetensors"   # checkpoint: fp32 master factors under the model's parameter names
LORA_METADATA_KEY = "accvideo_lora"
FINGERPRINT_VALUES = 4096  # values sampled per tensor for the base fingerprint


def enabled(cfg: TrainConfig) -> bool:
    return cfg.model.lora_rank > 0


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def prepare(model: nn.Module, full_sd: dict[str, torch.Tensor] | None, cfg: TrainConfig, *,
            dtype: torch.dtype) -> tuple[LoraAdapters, dict[str, torch.Tensor] | None, str]:
    """Freeze the base in ``dtype``, add the adapters, apply ``model.lora_init``; every check before training.

    ``full_sd``: rank 0's weights for a meta-device model under torchrun; the adapters are then initialised on a
    CPU model sharing those tensors and returned inside the state dict that is broadcast into the shards.
    Returns (adapters, state dict to broadcast or None, base fingerprint or "" on ranks that hold no weights).
    """
    check_config(cfg)
    meta = next(model.parameters()).is_meta
    if not meta:   # a meta model got its layout from rank 0 (setup._teacher)
        apply_fp8_layout(model, base_layout(model, cfg))
    cast_keeping_fp8(model, dtype).eval()
    adapters = build(model, cfg)
    model.enable_gradient_checkpointing(cfg.model.gradient_checkpointing,
                                        offload=cfg.model.offload_checkpoints)
    if full_sd is not None:
        with torch.device("meta"):
            source = type(model)(model.config)
        apply_fp8_layout(source, fp8_layout(model))   # the same keys (scale_weight buffers)
        source.load_state_dict(full_sd, assign=True)
        source_adapters = build(source, cfg)
        if cfg.model.lora_init:
            init_from_file(source_adapters, cfg, _warn)
        full_sd = source.state_dict()
        return adapters, full_sd, fingerprint(full_sd)
    if meta:
        return adapters, None, ""
    if cfg.model.lora_init:
        init_from_file(adapters, cfg, _warn)
    return adapters, None, fingerprint(model.state_dict())


def check_config(cfg: TrainConfig) -> None:
    """LoRA-mode choices that need no model: refused before anything is loaded."""
    if cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay > 0 is not supported with model.lora_rank > 0 (an EMA of the adapters "
                          "is not implemented); set optim.ema_decay = 0")


def base_layout(model: nn.Module, cfg: TrainConfig) -> Fp8Layout:
    """Which linears of the frozen base keep fp8 weights: those of an fp8 checkpoint / MODEL, and with
    ``model.fp8_base`` every block linear (rounded once from the bf16 / fp32 weights)."""
    return block_linears_layout(model) if cfg.model.fp8_base else fp8_layout(model)


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


def gather_adapters(model: nn.Module, info: D.DistInfo) -> dict[str, torch.Tensor]:
    """The adapters' fp32 factors (all ranks take part; full on rank 0, ``{}`` elsewhere under FSDP2)."""
    if not info.fsdp:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if is_adapter_key(n)}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def save_lora_export(tr: Trainer, folder: Path) -> dict[str, torch.Tensor]:
    """All ranks: gather the adapters; rank 0 writes ``folder/student_lora.safetensors`` (``log.save_dtype``)."""
    state = gather_adapters(tr.student, tr.info)
    if tr.info.is_main:
        save_lora(state, folder / LORA_FILE, tr.adapters, dtype=parse_dtype(tr.cfg.log.save_dtype),
                  base_fingerprint=tr.base_fingerprint, cfg=tr.cfg, step=tr.step)
    return state


def save_full_checkpoint(tr: Trainer, folder: Path) -> None:
    """``runtime.checkpoint_format = "full"``: the fp32 adapters (``adapters.safetensors``, the model's parameter
    names), the LoRA export and the adapters' optimizer state; no copy of the frozen base."""
    state = save_lora_export(tr, folder)
    opt_state = D.full_optimizer_state(tr.student, tr.opt, tr.info)
    if tr.info.is_main:
        save_safetensors(state, folder / ADAPTERS_FILE)
        save_torch(opt_state, folder / "optimizer.pt")


def check_resume(tr: Trainer, ckdir: Path, state: dict[str, Any]) -> None:
    """Refuse resuming across modes, ranks or bases before anything is loaded."""
    saved_rank = int(state.get("lora_rank", 0))
    rank = tr.cfg.model.lora_rank
    if saved_rank != rank:
        raise ConfigError(f"{ckdir} was written with model.lora_rank = {saved_rank} (0 = full fine-tune); resume "
                          f"it with the run's own model.lora_rank, not {rank}")
    saved = state.get("base_fingerprint", "")
    if rank and saved and tr.base_fingerprint and saved != tr.base_fingerprint:
        raise ConfigError(f"{ckdir} was trained on another base (fingerprint {saved}, model.teacher gives "
                          f"{tr.base_fingerprint}); resume with the base it was trained on (the same teacher file "
                          "and model.fp8_base setting: an fp8-rounded base is another base)")


def load_full_checkpoint(tr: Trainer, ckdir: Path) -> None:
    """All ranks: restore the adapters and their optimizer from a ``full``-format LoRA checkpoint."""
    info = tr.info
    state = read_state_dict(ckdir / ADAPTERS_FILE) if info.is_main else {}
    if info.is_main:
        want = {n: tuple(p.shape) for n, p in tr.student.named_parameters() if is_adapter_key(n)}
        if {k: tuple(v.shape) for k, v in state.items()} != want:
            raise ConfigError(f"{ckdir}: its adapters do not match model.lora_targets of this run; resume with "
                              "the run's own config")
    if info.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(tr.student, state, options=StateDictOptions(full_state_dict=True, strict=False,
                                                                         broadcast_from_rank0=True))
    else:
        tr.student.load_state_dict(state, strict=False)
    D.load_full_optimizer_state(tr.student, tr.opt, load_torch(ckdir / "optimizer.pt") if info.is_main else {},
                                info)


def export_final(tr: Trainer) -> dict[str, str]:
    """All ranks: ``out_dir/student_lora.safetensors`` and, unless ``log.export_merged`` is false, the merged
    ``out_dir/student.safetensors`` (original layout), streamed one tensor at a time like the full mode's."""
    from accvideo_core.models.loading import save_transformer
    from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D

    save_lora_export(tr, tr.out)
    files = {"student_lora": str(tr.out / LORA_FILE)}
    if not tr.cfg.log.export_merged:
        return files
    sd = tr.student.state_dict()
    full = D.full_tensor

    def materialize(name: str, _: torch.Tensor) -> torch.Tensor:
        module = name.removesuffix(".weight")
        weight = full(sd[name])
        if weight.dtype in FP8_DTYPES:   # an fp8 base: de-scaled in fp32, written in log.save_dtype
            scale = sd.get(f"{module}.scale_weight")
            weight = dequantized(weight, None if scale is None else full(scale), torch.float32)
        if f"{module}.{DOWN}" not in sd:
            return weight
        return merged_weight(weight, full(sd[f"{module}.{UP}"]), full(sd[f"{module}.{DOWN}"]), tr.adapters.scale)

    with torch.device("meta"):
        plain = HunyuanVideoTransformer3D(tr.student.config)  # the layout without adapter keys
    if tr.info.is_main:
        meta = {"accvideo_step": str(tr.step), "accvideo_key_sigmas": json.dumps(tr.key_sigmas)}
        save_transformer(plain, tr.out / "student.safetensors", dtype=parse_dtype(tr.cfg.log.save_dtype),
                         metadata=meta, materialize=materialize)
    else:
        for name, value in plain.state_dict().items():   # the same gathers in the same order as rank 0
            materialize(name, value)
    files["student"] = str(tr.out / "student.safetensors")
    return files
