"""Distil from a transformer that is already in memory (the MODEL a ComfyUI graph loaded): the glue of the
``AccVideo Train`` node. Never imports ComfyUI; the node passes plain state dicts, paths and callbacks.

It runs the same :class:`~accvideo_core.train.loop.Trainer` as ``python -m accvideo_core.train`` (config, checkpoints,
metrics, validation, exports); only where the teacher comes from and how progress and stop requests travel differ:

- :func:`transformer_from_state_dict`: our transformer over the host's tensors (ComfyUI's internal key names
  converted through ``models/key_maps.py``), aliasing them without a copy where the dtype and device match;
- :func:`run_folder`: the run folder is keyed by everything that decides the result (config, teacher weights,
  data set), so a re-queue with the same inputs resumes the interrupted run or reuses the finished one;
- :func:`train_in_process`: resume / reuse / fresh start, and the :class:`HostedTrainer` hooks.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from accvideo_core.train.config import TrainConfig, config_from_dict
from accvideo_core.train.loop import Trainer
from accvideo_core.utils.io import write_json

RESULT_FILE = "run_result.json"   # written last by a finished run: what the run produced, for reuse


def shared_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor over ``t``'s memory (no copy). Unlike ``t`` itself it may be used by autograd when ``t`` was
    made under ``torch.inference_mode`` (as ComfyUI loads its models); the trainer never writes frozen weights."""
    if not torch.is_inference(t):
        return t.detach()
    with torch.inference_mode(False):
        out = torch.empty(0, dtype=t.dtype, device=t.device)
        return out.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def transformer_from_state_dict(sd: Mapping[str, torch.Tensor], *, device: torch.device | str,
                                rope_axes: tuple[int, int, int] | None = None) -> nn.Module:
    """Our ``HunyuanVideoTransformer3D`` over the tensors of ``sd`` (original, diffusers or ComfyUI-internal
    names). Tensors already in the bulk dtype and on ``device`` are shared, not copied; fp8 weights stay fp8
    (the LoRA mode trains on them; a full fine-tune refuses them)."""
    from accvideo_core.models.loading import load_transformer

    with torch.inference_mode(False):
        return load_transformer({k: shared_tensor(v) for k, v in sd.items()}, device=device, rope_axes=rope_axes)


def data_identity(root: str | Path) -> str:
    """What identifies a SynVid folder's content for the run key: its manifest's sample entries."""
    from accvideo_core.synvid.format import load_manifest

    return json.dumps(load_manifest(root)["samples"], sort_keys=True)


# config fields that never change what the node uses (the trained student): a run keyed without them is reused
# or resumed when only they changed
RESULT_NEUTRAL = (("log", "out_dir"), ("model", "offload_checkpoints"), ("log", "export_merged"))


def run_key(cfg: TrainConfig, teacher_fingerprint: str, data: str) -> str:
    """16 hex digits over the config (without the fields of ``RESULT_NEUTRAL``: an interrupted run resumes after
    e.g. offloading was switched on), the teacher and the data set."""
    config = cfg.to_dict()
    for section, name in RESULT_NEUTRAL:
        config[section] = {k: v for k, v in config[section].items() if k != name}
    text = json.dumps({"config": config, "teacher": teacher_fingerprint, "data": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_folder(runs: str | Path, name: str, cfg: TrainConfig, teacher: nn.Module) -> Path:
    """``runs/<name>_<key>``: the key changes with any input that changes the result (see :func:`run_key`)."""
    from accvideo_core.train.lora_mode import fingerprint

    return Path(runs) / f"{name}_{run_key(cfg, fingerprint(teacher.state_dict()), data_identity(cfg.data.root))}"


def node_config(*, data_root: str | Path, steps: int, lora_rank: int, lr: float, lambda_adv: float, seed: int,
                device: str, samples: int, offload: bool = False) -> TrainConfig:
    """The trainer config of the node's inputs; every other field keeps the trainer's default (docs/training.md),
    except the batch (the paper's 32 samples per iteration, or all training samples of a smaller data set) and, in
    LoRA mode, no merged ``student.safetensors`` (the node uses the LoRA; a merged 13B file is 26 GB)."""
    val = 4
    train_samples = max(1, samples - min(val, samples - 1))
    return config_from_dict({
        "model": {"lora_rank": lora_rank, "offload_checkpoints": offload},
        "data": {"root": str(data_root), "val_samples": val},
        "optim": {"steps": steps, "lr": lr, "seed": seed, "total_batch": min(32, train_samples)},
        "loss": {"lambda_adv": lambda_adv, "adversarial": lambda_adv > 0},
        "runtime": {"device": device, "fsdp": "off"},
        "log": {"export_merged": lora_rank == 0},
    })


@dataclass
class TrainResult:
    """What a run produced: the exported files (``student_lora`` in LoRA mode, ``student``), the final
    validation, and whether it was trained now (``False``: reused from a finished run with the same key)."""

    folder: Path
    files: dict[str, str]
    val: dict[str, float]
    trained: bool
    resumed_from: int = 0   # the checkpoint step this run continued from (0: a fresh run)


class HostedTrainer(Trainer):
    """The trainer with a host's hooks: ``on_progress(step, total, line)`` after every iteration (``line``: the
    monitor's progress line with losses and ETA), ``on_note(line)`` inside iterations at most every
    ``NOTE_SECONDS`` (the last progress line and where the iteration is: a 13B iteration takes minutes to hours)
    and ``should_stop()``, polled wherever the trainer checks for Ctrl-C (before every micro-batch); when true the
    run writes a checkpoint and raises :class:`~accvideo_core.train.loop.Interrupted`, as on Ctrl-C."""

    NOTE_SECONDS = 2.0
    SETTING_NAMES = {"offload": "offload_activations on",
                     "fp8_base": "the teacher loaded in fp8 (UNETLoader weight_dtype fp8_e4m3fn)"}

    def __init__(self, cfg: TrainConfig, *, on_progress: Callable[[int, int, str], None],
                 should_stop: Callable[[], bool], on_note: Callable[[str], None] = lambda line: None,
                 **kwargs: Any):
        super().__init__(cfg, **kwargs)
        self.on_progress, self.should_stop, self.on_note = on_progress, should_stop, on_note
        self._last_line, self._last_host_note = "", time.monotonic()
        if self.memory_warning:   # shown in the node before the first iteration, not only in the console
            on_note(f"warning: {self.memory_warning}")

    def train_step(self, step: int) -> dict[str, float]:
        metrics = super().train_step(step)
        self._last_line = self.monitor.progress_line(step + 1, metrics)
        self.on_progress(step + 1, self.cfg.optim.steps, self._last_line)
        self._last_host_note = time.monotonic()
        return metrics

    def _heartbeat(self, step: int, k: int, micro: int) -> None:
        super()._heartbeat(step, k, micro)
        if time.monotonic() - self._last_host_note >= self.NOTE_SECONDS:
            self._last_host_note = time.monotonic()
            self.on_note(" | ".join(filter(None, (self._last_line, self._position(step, k, micro)))))

    def _stop_requested(self) -> bool:
        if self.should_stop():
            self.interrupted = True
        return super()._stop_requested()


def finished_result(folder: Path) -> TrainResult | None:
    """The result of a finished run in ``folder`` whose files are all still there, else ``None``."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    files = {k: str(folder / v) for k, v in saved["files"].items()}
    if not all(Path(f).is_file() for f in files.values()):
        return None
    return TrainResult(folder, files, saved["val"], trained=False)


def train_in_process(cfg: TrainConfig, teacher: nn.Module, folder: Path, *,
                     on_progress: Callable[[int, int, str], None] = lambda *a: None,
                     should_stop: Callable[[], bool] = lambda: False,
                     on_note: Callable[[str], None] = lambda line: None) -> TrainResult:
    """Train ``teacher`` into ``folder``: reuse a finished run there, resume its latest checkpoint, or start afresh
    (a folder without a checkpoint holds nothing worth keeping). Raises ``Interrupted`` after a checkpoint."""
    done = finished_result(folder)
    if done is not None:
        return done
    cfg.log.out_dir = str(folder)
    latest = folder / "checkpoints" / "latest.json"
    resume = "auto" if latest.is_file() else None
    resumed_from = int(json.loads(latest.read_text())["step"]) if resume else 0
    with torch.inference_mode(False):  # ComfyUI runs its nodes in inference mode
        trainer = HostedTrainer(cfg, teacher=teacher, resume=resume, overwrite=resume is None,
                                on_progress=on_progress, should_stop=should_stop, on_note=on_note)
        out = trainer.run()
    files = {k: Path(out[k]).name for k in ("student_lora", "student") if k in out}
    write_json({"files": files, "val": out["val"], "step": out["step"]}, folder / RESULT_FILE)
    return TrainResult(folder, {k: str(folder / v) for k, v in files.items()}, out["val"], trained=True,
                       resumed_from=resumed_from)


def comfy_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """An original-layout student file as ComfyUI's model state dict keys (``diffusion_model.<internal name>``,
    through ``models/key_maps.py``), e.g. for weight patches on the teacher's MODEL."""
    from accvideo_core.models.key_maps import original_to_comfy_key
    from accvideo_core.utils.io import read_state_dict

    return {f"diffusion_model.{original_to_comfy_key(k)}": v for k, v in read_state_dict(path).items()}
