"""Trainer configuration: one dataclass per section, loaded from JSON or TOML, overridable from the CLI.

Every choice the AccVideo paper leaves open is a field here; docs/training.md justifies each default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from accvideo_core.utils.dtypes import names_for


# every linear layer of the blocks (modulation included) and of the embedders of the modulation vector
LORA_TARGETS = ("double_blocks.*", "single_blocks.*", "time_in.*", "vector_in.*", "guidance_in.*")


@dataclass
class ModelConfig:
    teacher: str = ""                       # teacher checkpoint (any layout load_transformer reads)
    teacher_dtype: str = "auto"             # frozen teacher weights: auto = bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True     # student and (for the adversarial path) teacher
    offload_checkpoints: bool = False       # the checkpointed block inputs wait in (pinned) host memory, not on the GPU
    lora_rank: int = 0                      # 0 = full fine-tune; r > 0 = rank-r adapters on one frozen base (LoRA mode)
    lora_alpha: float = 0.0                 # adapter scale = alpha / rank; 0 = alpha equal to the rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # linear layers with adapters (fnmatch)
    lora_init: str = ""                     # start the adapters from a LoRA file (any format accvideo_core.lora reads)
    fp8_base: bool = False                  # LoRA mode: frozen base's block linears in scaled float8_e4m3fn


@dataclass
class DataConfig:
    root: str = ""                          # SynVid folder
    val_root: str = ""                      # held-out SynVid folder; empty = hold out the last val_samples of root
    val_samples: int = 4                    # held-out samples used for validation
    segments: int = 5                       # m: key timesteps are m+1 teacher steps 0, S/m, ..., S


@dataclass
class OptimConfig:
    steps: int = 1200                       # iterations (each consumes total_batch samples)
    total_batch: int = 32                   # samples per iteration over all ranks (by gradient accumulation)
    micro_batch: int = 1                    # samples per forward on one rank
    lr: float = 5e-6                        # student (AdamW); in LoRA mode the adapters' learning rate
    head_lr: float = 5e-6                   # discriminator heads (AdamW)
    head_betas: tuple[float, float] = (0.9, 0.999)  # the heads' AdamW betas (GANs often use beta1 0.5)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0                   # linear lr warm-up (iterations)
    grad_clip: float = 1.0                  # max global grad norm of the student (0 = off)
    segment_updates: str = "sequential"     # "sequential": one update per segment k as in Alg. 1; "joint": one per iteration
    segments_per_iteration: int = 0         # 0 = all m segments of every sample; s < m = the next s of the cycle m-1..0
    ema_decay: float = 0.0                  # 0 = no EMA of the student; else e.g. 0.999 (exported as student_ema)
    seed: int = 0


@dataclass
class LossConfig:
    traj_reduction: str = "mean"            # "mean" over latent elements (scale-free) or "sum" per sample
    adversarial: bool = True
    lambda_adv: float = 0.1
    gan_loss: str = "nonsaturating"         # or "hinge"
    adv_start_step: int = 0                 # iterations before the adversarial term is switched on
    feature_layers: Optional[list[int]] = None  # teacher layer per key timestep k = 0..m-1 (1-based); None = paper default
    head_width: int = 256
    head_blocks: int = 1                    # residual 3x3 conv blocks per head
    head_kernel: int = 3
    head_groups: int = 32                   # GroupNorm groups (batch-size independent)
    head_steps: int = 1                     # head updates per student update on the same teacher features (Alg. 1: 1)
    heads_only_steps: int = 0               # first iterations (of optim.steps) that train only the heads (Alg. 1: 0)
    queue_capacity: int = 64                # max entries per queue Q_k (oldest dropped); Q_0 keeps the last ones


@dataclass
class RuntimeConfig:
    device: str = "auto"                    # auto = cuda:LOCAL_RANK if available, else cpu
    precision: str = "auto"                 # auto = bf16 autocast on CUDA, fp32 on CPU; or "bf16" / "fp32"
    fsdp: str = "auto"                      # auto = FSDP2 when WORLD_SIZE > 1; "on" / "off"
    reshard_after_forward: bool = True
    unsharded_accumulation: bool = False    # True: reduce-scatter once per update (needs full-size fp32 grads)
    deterministic: bool = False             # torch.use_deterministic_algorithms
    checkpoint_format: str = "sharded"      # "sharded": torch.distributed.checkpoint, each rank its shards; "full"
    sequence_parallel: int = 1              # Ulysses SP degree: ranks per sample (divides ranks and heads)


@dataclass
class LogConfig:
    out_dir: str = "runs/accvideo"
    log_every: int = 1                      # progress line every N iterations (JSONL gets every iteration)
    progress_seconds: float = 60.0          # inside an iteration, a line at most this often (0 = never)
    val_every: int = 100                    # 0 = only at start and end
    ckpt_every: int = 100                   # 0 = only at the end (and on Ctrl-C)
    ckpt_minutes: float = 60.0              # also a checkpoint when this much time passed since the last (0 = off)
    keep_checkpoints: int = 2
    save_dtype: str = "bf16"                # dtype of the exported student safetensors
    export_merged: bool = True              # LoRA mode: also write the merged student.safetensors
    plot: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """The training configuration is invalid; the message says which field and how to fix it."""


_CHOICES = {
    ("optim", "segment_updates"): ("sequential", "joint"),
    ("loss", "traj_reduction"): ("mean", "sum"),
    ("loss", "gan_loss"): ("nonsaturating", "hinge"),
    ("runtime", "precision"): ("auto", "bf16", "fp32"),
    ("runtime", "fsdp"): ("auto", "on", "off"),
    ("runtime", "checkpoint_format"): ("sharded", "full"),
    ("model", "teacher_dtype"): ("auto", *names_for("bfloat16", "float16", "float32")),
    ("log", "save_dtype"): tuple(names_for("bfloat16", "float16", "float32")),
}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    text = str(typ)
    if value is None:
        if "Optional" in text or "None" in text:
            return None
        raise ConfigError(f"{where} must not be null")
    if typ in (int, "int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if typ in (float, "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if typ in (bool, "bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if typ in (str, "str"):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if "tuple" in text:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{where} must be a list of two numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if "list[str]" in text:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return list(value)
    if "list" in text:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            raise ConfigError(f"{where} must be a list of integers (or null), got {value!r}")
        return list(value)
    return value


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build and validate a config; unknown sections or keys are errors listing the known ones."""
    cfg = TrainConfig()
    sections = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; known sections: {sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{section}] must be a table/object")
        obj = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"unknown key {key!r} in [{section}]; known keys: {sorted(fields)}")
            setattr(obj, key, _coerce(value, fields[key].type, f"{section}.{key}"))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    for (section, key), options in _CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in options:
            raise ConfigError(f"{section}.{key} = {value!r}; expected one of {list(options)}")
    o, lo = cfg.optim, cfg.loss
    if o.steps < 1 or o.micro_batch < 1 or o.total_batch < 1:
        raise ConfigError("optim.steps, optim.total_batch and optim.micro_batch must be >= 1")
    if not 0.0 <= o.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay must be in [0, 1), got {o.ema_decay}")
    if cfg.data.segments < 1:
        raise ConfigError("data.segments must be >= 1")
    if not 0 <= o.segments_per_iteration <= cfg.data.segments:
        raise ConfigError(f"optim.segments_per_iteration must be 0 (all) or 1..{cfg.data.segments}, got "
                          f"{o.segments_per_iteration}")
    if lo.feature_layers is not None and len(lo.feature_layers) != cfg.data.segments:
        raise ConfigError(f"loss.feature_layers needs one layer per key timestep k = 0..{cfg.data.segments - 1} "
                          f"({cfg.data.segments} values), got {lo.feature_layers}")
    if lo.lambda_adv < 0:
        raise ConfigError("loss.lambda_adv must be >= 0")
    if not cfg.log.ckpt_minutes >= 0:
        raise ConfigError(f"log.ckpt_minutes must be >= 0 (0 = only every log.ckpt_every iterations), got "
                          f"{cfg.log.ckpt_minutes}")
    if lo.head_steps < 1:
        raise ConfigError(f"loss.head_steps must be >= 1 (1 = one head update per student update, Alg. 1), got "
                          f"{lo.head_steps}")
    if not 0 <= lo.heads_only_steps < o.steps:
        raise ConfigError(f"loss.heads_only_steps must be in 0..{o.steps - 1} (it counts within optim.steps = "
                          f"{o.steps}, which must leave student updates), got {lo.heads_only_steps}")
    if lo.heads_only_steps and (not (lo.adversarial and lo.lambda_adv > 0) or lo.adv_start_step):
        raise ConfigError("loss.heads_only_steps needs the adversarial term from the start (loss.adversarial = "
                          "true, loss.lambda_adv > 0, loss.adv_start_step = 0): those iterations train the heads")
    if cfg.runtime.sequence_parallel < 1:
        raise ConfigError(f"runtime.sequence_parallel must be >= 1, got {cfg.runtime.sequence_parallel}")
    mc = cfg.model
    if mc.lora_rank < 0 or mc.lora_alpha < 0:
        raise ConfigError("model.lora_rank and model.lora_alpha must be >= 0 (lora_rank 0 = full fine-tune)")
    if mc.offload_checkpoints and not mc.gradient_checkpointing:
        raise ConfigError("model.offload_checkpoints needs model.gradient_checkpointing = true (it moves the "
                          "checkpointed block inputs to host memory)")
    if mc.lora_rank == 0 and mc.fp8_base:
        raise ConfigError("model.fp8_base needs model.lora_rank > 0: only the LoRA mode trains on a frozen fp8 base "
                          "(a full fine-tune trains every weight in fp32)")
    if mc.lora_rank == 0 and mc.lora_init:
        raise ConfigError("model.lora_init needs model.lora_rank > 0 (the rank of the adapters it initialises)")
    if mc.lora_rank and not mc.lora_targets:
        raise ConfigError(f"model.lora_targets is empty; e.g. {list(LORA_TARGETS)}")


def check_batching(cfg: TrainConfig, world_size: int) -> int:
    """Number of micro-batches per rank per update; errors when total_batch does not split evenly.
    ``world_size``: the data-parallel ranks (ranks / runtime.sequence_parallel)."""
    per_step = cfg.optim.micro_batch * world_size
    if cfg.optim.total_batch % per_step:
        raise ConfigError(f"optim.total_batch ({cfg.optim.total_batch}) must be a multiple of micro_batch x ranks "
                          f"({cfg.optim.micro_batch} x {world_size} = {per_step})")
    return cfg.optim.total_batch // per_step


def field_help() -> dict[tuple[str, str], str]:
    """(section, key) -> help: the comment after each field in this file (the one place for the text)."""
    import inspect
    import re

    helps: dict[tuple[str, str], str] = {}
    for section in dataclasses.fields(TrainConfig):
        try:
            source = inspect.getsource(section.default_factory)
        except (OSError, TypeError):  # no source shipped: no help texts
            continue
        for line in source.splitlines():
            found = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
            if found:
                helps[(section.name, found.group(1))] = found.group(2).strip()
    return helps


def _toml_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml_value(v) or "" for v in value) + "]"


def to_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML with each field's help as a comment (``--print-config``; loadable again)."""
    helps = field_help()
    lines: list[str] = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = _toml_value(value)
            entry = f"{key} = {text}" if text is not None else f"# {key} = (unset)"
            comment = helps.get((section, key))
            lines.append(f"{entry:<39} # {comment}" if comment else entry)
        lines.append("")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    if "." not in dotted:
        raise ConfigError(f"override {dotted!r} must be SECTION.KEY=VALUE, e.g. optim.steps=100")
    section, key = dotted.split(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # plain strings need no quotes
    data.setdefault(section, {})[key] = value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a ``.json`` or ``.toml`` config and apply ``SECTION.KEY=VALUE`` overrides (values parsed as JSON)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError as err:  # Python 3.10
                raise ConfigError(f"{path}: TOML configs need Python 3.11+; use a .json config") from err
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: config must be .json or .toml")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must be SECTION.KEY=VALUE")
        k, v = item.split("=", 1)
        _set_dotted(data, k.strip(), v.strip())
    return config_from_dict(data)
