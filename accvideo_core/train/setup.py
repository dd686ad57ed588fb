"""Everything the trainer builds before its first iteration: data, models, device mesh and sharding, optimizers.

- :func:`build_data`: the SynVid key timesteps, the per-rank training stream and the held-out records;
- :func:`build_models`: student (fp32 copy of the teacher), frozen teacher, optional EMA, heads, optimizers;
- :func:`place_models`: **the one place** where the device mesh is chosen and the models are sharded (FSDP2
  under torchrun) or moved to the device; extend it for other mesh layouts.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from accvideo_core.models.loading import apply_fp8_layout, fp8_layout, load_transformer
from accvideo_core.synvid.format import SynVidDataset, SynVidError, SynVidSample, key_steps_for, read_sample
from accvideo_core.train import distributed as D
from accvideo_core.train import lora_mode
from accvideo_core.train.batching import Record, SampleStream, sample_record
from accvideo_core.train.config import ConfigError, TrainConfig
from accvideo_core.train.heads import build_heads, default_feature_layers
from accvideo_core.utils.dtypes import FP8_DTYPES, parse_dtype

@dataclass
class Data:
    """Training stream of this rank, held-out records and the data set's key timesteps (sigma 1 first)."""

    stream: SampleStream
    val_records: list[Record]
    key_steps: list[int]
    key_sigmas: list[float]
    bad_samples: list[str] = field(default_factory=list)
    latent_grid: tuple[int, int, int] = (1, 1, 1)   # (T, H, W) of the first readable sample's latents
    text_tokens: int = 0                            # its text length (padding included)


@dataclass
class Models:
    """The trained and frozen modules with their optimizers, placed on the device (sharded under torchrun)."""

    student: nn.Module
    teacher: nn.Module
    ema: nn.Module | None
    heads: nn.ModuleList
    opt: torch.optim.Optimizer
    head_opt: torch.optim.Optimizer
    config: Any                 # the teacher's TransformerConfig
    feature_layers: list[int]   # teacher layer of the discriminator features per key timestep k
    adapters: Any = None        # LoRA mode: the LoraAdapters of the one model (student is teacher)
    base_fingerprint: str = ""  # LoRA mode: the base's fingerprint (rank 0)


def build_data(cfg: TrainConfig, info: D.DistInfo) -> Data:
    """Key timesteps from the manifest, key sigmas from the first readable sample, train/held-out split."""
    root = cfg.data.root
    if not root:
        raise ConfigError("data.root is empty: set it to a SynVid folder (python -m accvideo_core.synvid.dump)")
    steps = SynVidDataset(root).manifest.get("steps")
    if not isinstance(steps, int):
        raise SynVidError(f"{root}: manifest has no teacher 'steps'; rebuild it")
    key_steps = key_steps_for(steps, cfg.data.segments)
    train_ds = SynVidDataset(root, steps=key_steps)
    n = len(train_ds)
    if cfg.data.val_root:
        val_ds = SynVidDataset(cfg.data.val_root, steps=key_steps)
        val_idx, train_idx = list(range(min(len(val_ds), max(cfg.data.val_samples, 0)))), list(range(n))
    else:
        n_val = max(0, min(cfg.data.val_samples, n - info.dp))
        val_ds, val_idx, train_idx = train_ds, list(range(n - n_val, n)), list(range(n - n_val))
    first = _first_sample(train_ds, train_idx, key_steps)
    key_sigmas = [float(first.sigmas[j]) for j in key_steps]
    bad: list[str] = []

    def report_bad(index: int, err: SynVidError) -> None:
        bad.append(str(err))
        print(f"skipping corrupt SynVid sample (rank {info.rank}): {err}", file=sys.stderr, flush=True)

    def check_sigmas(sample) -> None:
        got = [float(sample.sigmas[j]) for j in key_steps]
        if any(abs(a - b) > 1e-6 for a, b in zip(got, key_sigmas)):
            raise SynVidError(f"key sigmas {got} differ from the data set's {key_sigmas}")

    stream = SampleStream(train_ds, train_idx, rank=info.dp_rank, world=info.dp, seed=cfg.optim.seed,
                          on_error=report_bad, check=check_sigmas)
    val_records = [sample_record(sample, -1 - i) for i, sample in val_ds.iter_valid(val_idx, on_error=report_bad)]
    return Data(stream, val_records, key_steps, key_sigmas, bad, tuple(first.latents.shape[-3:]),
                first.text_states.shape[0])


def _first_sample(ds: SynVidDataset, indices: list[int], key_steps: list[int]) -> SynVidSample:
    """The first readable training sample (one latent read): the data set's key sigmas and sizes."""
    for i in indices:
        try:
            return read_sample(ds.path(i), steps=key_steps[:1], check_finite=False)
        except SynVidError:
            continue
    raise SynVidError(f"{ds.root}: no readable training sample")


def build_models(cfg: TrainConfig, info: D.DistInfo, teacher: nn.Module | None, *, bf16: bool) -> Models:
    """Student (fp32 copy of the teacher, every parameter trains), frozen teacher, optional EMA, heads, AdamW.
    LoRA mode: one frozen base with adapters is both student and teacher (``lora_mode.prepare``)."""
    tdtype = (parse_dtype(cfg.model.teacher_dtype) if cfg.model.teacher_dtype != "auto" else
              torch.bfloat16 if info.device.type == "cuda" else torch.float32)
    lora = lora_mode.enabled(cfg)
    teacher, full_sd = _teacher(cfg, info, teacher, dtype=tdtype if lora else torch.float32)
    meta = next(teacher.parameters()).is_meta
    adapters, fingerprint = None, ""
    if lora:
        adapters, full_sd, fingerprint = lora_mode.prepare(teacher, full_sd, cfg, dtype=tdtype)
        student, ema = teacher, None
    else:
        if not meta:
            _check_not_fp8(teacher)
        student = copy.deepcopy(teacher).float().train().requires_grad_(True)
        teacher = teacher.to(dtype=tdtype).eval().requires_grad_(False)
        student.enable_gradient_checkpointing(cfg.model.gradient_checkpointing,
                                              offload=cfg.model.offload_checkpoints)
        teacher.enable_gradient_checkpointing(cfg.model.gradient_checkpointing,
                                              offload=cfg.model.offload_checkpoints)
        ema = copy.deepcopy(student).requires_grad_(False).eval() if cfg.optim.ema_decay > 0 else None
    place_models(cfg, info, student=student, teacher=teacher, ema=ema, full_sd=full_sd if meta else None,
                 bf16=bf16)
    nl, m = teacher.config.num_layers, cfg.data.segments
    feature_layers = list(cfg.loss.feature_layers or default_feature_layers(nl, m))
    if any(not 1 <= layer <= nl for layer in feature_layers):
        raise ConfigError(f"loss.feature_layers {feature_layers} must be in 1..{nl} for this teacher")
    lo, o = cfg.loss, cfg.optim
    heads = build_heads(m, teacher.config.hidden_size, width=lo.head_width, blocks=lo.head_blocks,
                        kernel=lo.head_kernel, groups=lo.head_groups).to(info.device)
    D.broadcast_module_(heads, info)
    trained = adapters.parameters() if adapters is not None else student.parameters()  # read after sharding
    opt = torch.optim.AdamW(trained, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    head_opt = torch.optim.AdamW(heads.parameters(), lr=o.head_lr, betas=o.head_betas, eps=o.eps,
                                 weight_decay=o.weight_decay)
    return Models(student, teacher, ema, heads, opt, head_opt, teacher.config, feature_layers, adapters, fingerprint)


def _teacher(cfg: TrainConfig, info: D.DistInfo, teacher: nn.Module | None,
             dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The teacher module, and (under torchrun) rank 0's full state dict (``dtype``) for a meta-device teacher.

    Under torchrun only rank 0 reads the file; every rank builds the model on the meta device and
    :func:`place_models` broadcasts the weights, so a node holds one full copy in CPU memory, not one per rank.
    """
    if teacher is not None:
        return teacher, None
    if not cfg.model.teacher:
        raise ConfigError("model.teacher is empty: set it to the teacher checkpoint (.safetensors/.pt)")
    if not (info.fsdp and info.world > 1):
        return load_transformer(cfg.model.teacher, dtype=dtype), None
    from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig

    full_sd: dict[str, torch.Tensor] | None = None
    shared: list[Any] = [None, None]
    if info.is_main:
        loaded = load_transformer(cfg.model.teacher, dtype=dtype)
        if lora_mode.enabled(cfg):
            layout = lora_mode.base_layout(loaded, cfg)
        else:
            _check_not_fp8(loaded)
            layout = {}
        apply_fp8_layout(loaded, layout)   # quantized as one process would (scales included)
        # sent in `dtype`, exactly (gloo has no fp8 type); every rank's shards take them back in fp8
        full_sd = {k: v.to(dtype) if v.dtype in FP8_DTYPES else v for k, v in loaded.state_dict().items()}
        shared = [loaded.config.to_dict(), layout]
        del loaded
    torch.distributed.broadcast_object_list(shared, src=0)
    with torch.device("meta"):
        model = HunyuanVideoTransformer3D(TransformerConfig.from_dict(shared[0]))
    apply_fp8_layout(model, shared[1])   # every rank's shards hold the fp8 weights (copied in by place_models)
    return model, full_sd


def place_models(cfg: TrainConfig, info: D.DistInfo, *, student: nn.Module, teacher: nn.Module,
                 ema: nn.Module | None, full_sd: dict[str, torch.Tensor] | None, bf16: bool) -> None:
    """Device mesh and sharding: FSDP2 over all ranks (per block, then the root) or a plain move to the device.

    ``full_sd``: rank 0's weights for models built on the meta device (broadcast into every rank's shards).
    The student computes in bf16 on CUDA (fp32 master weights); the teacher and EMA keep their dtype. In LoRA
    mode ``teacher is student``: the one model is sharded once (adapters with their block's frozen base).
    """
    models = [m for m in dict.fromkeys((student, teacher, ema)) if m is not None]
    if not info.fsdp:
        for model in models:
            model.to(info.device)
        return
    for model in models:   # sequence parallelism inside each group of info.sp ranks (no-op for sp = 1)
        try:
            model.enable_sequence_parallel(info.sp_group)
        except ValueError as err:
            raise ConfigError(f"runtime.sequence_parallel: {err}") from err
    mesh = D.device_mesh(info.device)   # FSDP2 shards over all ranks, the SP ranks of a sample too
    D.shard_transformer(student, mesh=mesh, param_dtype=torch.bfloat16 if bf16 else None,
                        reshard_after_forward=cfg.runtime.reshard_after_forward,
                        extra_methods=("image_features",) if teacher is student else ())
    D.sum_gradients_over_sp(student, info)
    if teacher is not student:
        D.shard_transformer(teacher, mesh=mesh, param_dtype=None, reshard_after_forward=True,
                            extra_methods=("image_features",))
    if ema is not None:
        D.shard_transformer(ema, mesh=mesh, param_dtype=None, reshard_after_forward=True)
    if next(student.parameters()).is_meta:
        for model in models:
            model.to_empty(device=info.device)
            D.load_full_model_state(model, dict(full_sd or {}), info)  # the loader mutates its dict


def _check_not_fp8(model: nn.Module) -> None:
    if fp8_layout(model):
        raise ConfigError("the teacher holds fp8 weights, which a full fine-tune cannot train (the student trains "
                          "every weight in fp32 and would start from the fp8-rounded ones). Train a LoRA instead "
                          "(model.lora_rank > 0: adapters on the frozen fp8 base, see model.fp8_base), or distil "
                          "from the bf16 checkpoint, e.g. hunyuan_video_t2v_720p_bf16.safetensors")
