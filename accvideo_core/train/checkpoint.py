"""Trainer checkpoints: ``out_dir/checkpoints/step_NNNNNNN/`` folders, ``latest.json``, pruning, resume.

A checkpoint holds everything an uninterrupted run would still have in memory: fp32 master weights, optimizer,
EMA, heads and their optimizer, the teacher's baseline MSE, and per rank the queues, data position and RNG states.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from accvideo_core.train import distributed as D
from accvideo_core.train.config import ConfigError
from accvideo_core.train.setup import DTYPES
from accvideo_core.utils.io import load_torch, read_state_dict, save_torch, write_json

if TYPE_CHECKING:
    from accvideo_core.train.loop import Trainer

CHECKPOINT_DIR = "checkpoints"


def save_checkpoint(tr: Trainer) -> Path:
    """Write ``checkpoints/step_NNNNNNN/`` (all ranks take part) and point ``latest.json`` at it."""
    info, cfg = tr.info, tr.cfg
    ckdir = tr.out / CHECKPOINT_DIR / f"step_{tr.step:07d}"
    student_sd = D.full_model_state(tr.student, info)
    opt_sd = D.full_optimizer_state(tr.student, tr.opt, info)
    ema_sd = D.full_model_state(tr.ema, info) if tr.ema is not None else None
    save_torch({"world": info.world, "queues": tr.queues.state_dict(), "stream": tr.stream.state_dict(),
                "rng": _rng_state(tr.device)}, ckdir / f"rank{info.rank:05d}.pt")
    if info.is_main:
        save_dtype = DTYPES[cfg.log.save_dtype]
        export_student(tr, student_sd, ckdir / "student.safetensors", save_dtype)
        if save_dtype != torch.float32:
            export_student(tr, student_sd, ckdir / "student_fp32.safetensors", torch.float32)
        if ema_sd is not None:
            export_student(tr, ema_sd, ckdir / "student_ema.safetensors", torch.float32)
        save_torch(opt_sd, ckdir / "optimizer.pt")
        save_torch({"step": tr.step, "world": info.world, "teacher5": tr.teacher_baseline,
                    "heads": tr.heads.state_dict(), "heads_optimizer": tr.head_opt.state_dict(),
                    "config": json.dumps(cfg.to_dict())}, ckdir / "trainer.pt")
    if info.world > 1:
        torch.distributed.barrier()
    if info.is_main:
        write_json({"step": tr.step, "path": ckdir.name}, tr.out / CHECKPOINT_DIR / "latest.json")
        _prune(tr.out / CHECKPOINT_DIR, cfg.log.keep_checkpoints)
        tr.monitor.note(f"checkpoint: {ckdir}")
    return ckdir


def export_student(tr: Trainer, state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    """Original-layout safetensors (``load_transformer`` and ComfyUI's UNETLoader read it) with step and sigmas."""
    from accvideo_core.models.loading import save_transformer

    save_transformer(tr.student, path, tensors=state, dtype=dtype,
                     metadata={"accvideo_step": str(tr.step), "accvideo_key_sigmas": json.dumps(tr.key_sigmas)})


def _rng_state(device: torch.device) -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def _prune(folder: Path, keep: int) -> None:
    if keep <= 0:
        return
    dirs = sorted(p for p in folder.glob("step_*") if p.is_dir())
    for old in dirs[:-keep]:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()


def resolve_resume(out: Path, resume: str) -> Path:
    """The checkpoint folder of ``--resume auto`` (``latest.json`` of ``out``) or ``--resume DIR``."""
    if resume == "auto":
        latest = out / CHECKPOINT_DIR / "latest.json"
        if not latest.is_file():
            raise FileNotFoundError(f"--resume auto: no {latest}; nothing to resume (start without --resume)")
        return out / CHECKPOINT_DIR / json.loads(latest.read_text())["path"]
    path = Path(resume)
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer.pt)")
    return path


def load_checkpoint(tr: Trainer, ckdir: Path) -> None:
    """Restore every piece of state :func:`save_checkpoint` wrote into the built trainer ``tr``."""
    info = tr.info
    state = load_torch(ckdir / "trainer.pt")
    if state["world"] != info.world:
        raise ConfigError(f"{ckdir} was written by {state['world']} ranks; resume it with the same "
                          f"--nproc_per_node (queues and data positions are per rank)")
    master = ckdir / ("student_fp32.safetensors" if (ckdir / "student_fp32.safetensors").is_file()
                      else "student.safetensors")
    D.load_full_model_state(tr.student, read_state_dict(master) if info.is_main else {}, info)
    opt_state = load_torch(ckdir / "optimizer.pt") if info.is_main else {}
    D.load_full_optimizer_state(tr.student, tr.opt, opt_state, info)
    if tr.ema is not None:
        ema_path = ckdir / "student_ema.safetensors"
        if not ema_path.is_file():
            raise ConfigError(f"{ckdir} has no EMA weights but optim.ema_decay > 0")
        D.load_full_model_state(tr.ema, read_state_dict(ema_path) if info.is_main else {}, info)
    tr.heads.load_state_dict(state["heads"])
    tr.head_opt.load_state_dict(state["heads_optimizer"])
    tr.step, tr.teacher_baseline = int(state["step"]), state["teacher5"]
    mine = load_torch(ckdir / f"rank{info.rank:05d}.pt")
    tr.queues.load_state_dict(mine["queues"], tr.device)
    tr.stream.load_state_dict(mine["stream"])
    torch.set_rng_state(mine["rng"]["torch"])
    random.setstate(mine["rng"]["python"])
    if "cuda" in mine["rng"] and tr.device.type == "cuda":
        torch.cuda.set_rng_state(mine["rng"]["cuda"], tr.device)
