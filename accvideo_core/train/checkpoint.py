"""Trainer checkpoints: folders, ``latest.json``, pruning, resume on any world size, and the streamed export.

A checkpoint holds everything an uninterrupted run would still have in memory: fp32 master weights, optimizer,
EMA, heads and their optimizer, the teacher's baseline MSE, and per rank the queues, data position and RNG states.

- ``runtime.checkpoint_format = "sharded"`` (default): ``torch.distributed.checkpoint``; every rank writes its
  own shards of the student, optimizer and EMA, nothing is gathered. ``"full"``: full state dicts gathered to
  rank 0 (original-layout safetensors + ``optimizer.pt``). Both resume on another number of ranks.
- A checkpoint is written into ``checkpoints/.step_NNNNNNN.partial/``; when every rank is done, rank 0 writes
  ``checkpoint.json`` (the commit marker) and renames the folder to ``step_NNNNNNN``, then points
  ``latest.json`` at it. An interrupt inside iteration N+1 writes ``step_NNNNNNN_updateG`` after its first G
  segment updates (the data position of the iteration's start, the queues and RNG as they were after update G);
  a resume makes the rest of that iteration. A killed write leaves only a ``.partial`` folder, never taken for a
  checkpoint and removed by the next run.
- Pruning (``log.keep_checkpoints``) counts only complete checkpoints of this run (its own and those of the
  runs it resumed, up to the step it resumed from) and never deletes what ``latest.json`` names.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from accvideo_core.train import distributed as D
from accvideo_core.train import lora_mode
from accvideo_core.train.config import ConfigError
from accvideo_core.utils.dtypes import parse_dtype
from accvideo_core.utils.io import (CheckpointError, load_torch, read_distributed_checkpoint,
                                    read_distributed_checkpoint_flat, read_state_dict, save_torch, write_json)

if TYPE_CHECKING:
    from accvideo_core.train.loop import InIteration, Trainer

CHECKPOINT_DIR = "checkpoints"
MARKER = "checkpoint.json"
SHARDED_DIR = "sharded"
# files a run writes into log.out_dir (what --overwrite removes; anything else there is left alone)
RUN_FILES = ("config.json", "metrics.jsonl", "loss_curves.png", "student.safetensors", "student_ema.safetensors",
             lora_mode.LORA_FILE)


@dataclass
class Lineage:
    """Which checkpoints belong to this run: ``run`` names this process's part; ``ancestry`` maps each earlier
    part it continues (by resuming) to the last step of that part it builds on."""

    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    ancestry: dict[str, int] = field(default_factory=dict)

    def owns(self, marker: dict[str, Any]) -> bool:
        return marker.get("run") == self.run or int(marker.get("step", -1)) <= self.ancestry.get(marker.get("run"),
                                                                                                 -1)


# ---------------------------------------------------------------------------------------------- out_dir
def prepare_out_dir(out: Path, info: D.DistInfo, *, resuming: bool, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` unless resuming or ``overwrite`` (then its run files go); remove temp
    files and half-written checkpoints that a killed process left. All ranks agree on the outcome."""
    error = ""
    if info.is_main:
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
        if entries and not resuming and not overwrite:
            error = (f"log.out_dir {out} already holds a run ({', '.join(entries[:5])}"
                     f"{', ...' if len(entries) > 5 else ''}): resume it with --resume auto, choose another "
                     "log.out_dir, or pass --overwrite to replace its run files")
        elif entries and not resuming:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        if not error:
            _remove_stale(out)
    error = D.broadcast_object(error, info)
    if error:
        raise ConfigError(error)


def _remove_stale(out: Path) -> None:
    """Temp files of interrupted atomic writes, ``.partial`` checkpoint folders, and ``step_*`` folders that an
    older version left half-written (neither a commit marker nor ``trainer.pt``)."""
    root = out / CHECKPOINT_DIR
    for folder in (out, root):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
    if root.is_dir():
        for p in root.glob(".step_*.partial"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob("step_*"):
            if p.is_dir() and not (p / MARKER).is_file() and not (p / "trainer.pt").is_file():
                shutil.rmtree(p, ignore_errors=True)


def resolve_resume(out: Path, resume: str) -> Path:
    """The checkpoint folder of ``--resume auto`` (``latest.json`` of ``out``) or ``--resume DIR``."""
    if resume == "auto":
        latest = out / CHECKPOINT_DIR / "latest.json"
        if not latest.is_file():
            raise FileNotFoundError(f"--resume auto: no {latest}; nothing to resume (start without --resume)")
        path = out / CHECKPOINT_DIR / json.loads(latest.read_text())["path"]
    else:
        path = Path(resume)
    if not ((path / MARKER).is_file() or (path / "trainer.pt").is_file()):
        raise FileNotFoundError(f"{path} is not a complete checkpoint folder (no {MARKER}); resume another one "
                                f"with --resume DIR (complete ones: {_complete_names(path.parent)})")
    return path


def _complete_names(folder: Path) -> str:
    names = sorted(p.name for p in folder.glob("step_*") if (p / MARKER).is_file())
    return ", ".join(names) or "none"


def _marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- save
def save_checkpoint(tr: Trainer) -> Path:
    """Write a checkpoint of ``tr`` (all ranks take part), commit it, point ``latest.json`` at it, prune."""
    info, cfg = tr.info, tr.cfg
    root = tr.out / CHECKPOINT_DIR
    inside = tr.in_iteration if tr.in_iteration is not None and tr.in_iteration.updates_done else None
    name = f"step_{tr.step:07d}" + (f"_update{inside.updates_done}" if inside else "")
    in_iteration = _in_iteration_state(tr, inside) if inside else None  # a collective: before rank 0 writes
    partial = root / f".{name}.partial"
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    D.barrier(info)
    if cfg.runtime.checkpoint_format == "sharded":
        _save_sharded(tr, partial)
    else:
        _save_full(tr, partial)
    save_torch(_rank_state(tr), partial / f"rank{info.rank:05d}.pt")
    if info.is_main:
        save_torch({"step": tr.step, "world": info.world, "sp": info.sp, "teacher_baseline": tr.teacher_baseline,
                    "heads": tr.heads.state_dict(), "heads_optimizer": tr.head_opt.state_dict(),
                    "lora_rank": tr.cfg.model.lora_rank, "base_fingerprint": tr.base_fingerprint,
                    "in_iteration": in_iteration, "validation_pending": tr.validation_pending},
                   partial / "trainer.pt")
    D.barrier(info)
    if info.is_main:
        write_json({"step": tr.step, "updates_done": inside.updates_done if inside else 0, "world": info.world,
                    "format": cfg.runtime.checkpoint_format, "run": tr.lineage.run, "ancestry": tr.lineage.ancestry,
                    "config": cfg.to_dict()}, partial / MARKER)
        final = root / name
        if final.exists():  # another run's (e.g. one resumed from an earlier step): never overwritten
            final = root / f"{name}_{tr.lineage.run}"
        os.replace(partial, final)
        write_json({"step": tr.step, "path": final.name}, root / "latest.json")
        prune(root, cfg.log.keep_checkpoints, tr.lineage)
        tr.monitor.note(f"checkpoint: {final}")
        name = final.name
    return root / D.broadcast_object(name, info)


def _in_iteration_state(tr: Trainer, inside: InIteration) -> dict[str, Any]:
    """What a resume needs to finish an interrupted iteration: its segment updates done, and the metric sums of
    those updates averaged over ranks (every rank counts the same terms, so the mean of the sums is exact)."""
    names = sorted(inside.sums)
    values = torch.tensor([inside.sums[n] for n in names], dtype=torch.float64, device=tr.device)
    D.all_reduce_mean_([values], tr.info)
    return {"updates_done": inside.updates_done, "groups": inside.groups, "sums": dict(zip(names, values.tolist())),
            "counts": dict(inside.counts), "norms": list(inside.norms)}


def _save_full(tr: Trainer, folder: Path) -> None:
    info = tr.info
    if tr.adapters is not None:
        lora_mode.save_full_checkpoint(tr, folder)
        return
    student_sd = D.full_model_state(tr.student, info)
    opt_sd = D.full_optimizer_state(tr.student, tr.opt, info)
    ema_sd = D.full_model_state(tr.ema, info) if tr.ema is not None else None
    if info.is_main:
        save_dtype, meta = parse_dtype(tr.cfg.log.save_dtype), _export_metadata(tr)
        export_student(tr.student, folder / "student.safetensors", save_dtype, info, metadata=meta, state=student_sd)
        if save_dtype != torch.float32:
            export_student(tr.student, folder / "student_fp32.safetensors", torch.float32, info, metadata=meta,
                           state=student_sd)
        if ema_sd is not None:
            export_student(tr.ema, folder / "student_ema.safetensors", torch.float32, info, metadata=meta,
                           state=ema_sd)
        save_torch(opt_sd, folder / "optimizer.pt")


def _sharded_state(tr: Trainer) -> dict[str, Any]:
    """Student, optimizer (tensors only; its hyper-parameters come from the config) and EMA, each rank's shards."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from torch.distributed.checkpoint.state_dict import StateDictOptions

    lora = StateDictOptions(ignore_frozen_params=tr.adapters is not None)  # LoRA mode: the adapters, not the base
    state = {"student": get_model_state_dict(tr.student, options=lora),
             "optimizer": get_optimizer_state_dict(tr.student, tr.opt)["state"]}
    if tr.ema is not None:
        state["ema"] = get_model_state_dict(tr.ema)
    return state


def _save_sharded(tr: Trainer, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # without a process group DCP warns that it assumes one process: it is one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.save(_sharded_state(tr), checkpoint_id=str(folder / SHARDED_DIR))
    if tr.adapters is not None:
        lora_mode.save_lora_export(tr, folder)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generator states (torch, Python, and the CUDA device's)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _rank_state(tr: Trainer) -> dict[str, Any]:
    """Queues, data position and RNG of this rank. Inside an iteration (:class:`~accvideo_core.train.loop.
    InIteration`) the data position is the iteration's start, so that a resume draws the same micro-batches."""
    stream = tr.in_iteration.stream if tr.in_iteration is not None else tr.stream.state_dict()
    return {"world": tr.info.world, "queues": tr.queues.state_dict(), "stream": stream,
            "rng": rng_state(tr.device)}


def prune(root: Path, keep: int, lineage: Lineage) -> None:
    """Delete all but the newest ``keep`` complete checkpoints of this run, never the one ``latest.json`` names."""
    if keep <= 0:
        return
    latest = json.loads((root / "latest.json").read_text())["path"]
    mine = sorted((int(mk["step"]), p.name) for p in root.glob("step_*")
                  if (mk := _marker(p)) is not None and lineage.owns(mk))
    for _, name in mine[:-keep]:
        if name != latest:
            shutil.rmtree(root / name)


# ---------------------------------------------------------------------------------------------- export
def export_student(model: nn.Module, path: Path, dtype: torch.dtype, info: D.DistInfo, *,
                   metadata: dict[str, str], state: dict[str, torch.Tensor] | None = None) -> None:
    """Original-layout safetensors (``load_transformer`` and ComfyUI's UNETLoader read it).

    Written one tensor at a time: from ``state`` (a gathered full state dict, rank 0) or, without it, gathering
    each sharded tensor just before it is written, so rank 0 never holds more than one tensor of the model
    beyond its own shards. Every rank calls this; only rank 0 writes.
    """
    from accvideo_core.models.loading import save_transformer

    def materialize(name: str, value: torch.Tensor) -> torch.Tensor:
        if state is not None:
            return state[name]
        return D.full_tensor(value)

    if not info.is_main:
        if state is None:
            for name, value in model.state_dict().items():
                materialize(name, value)
        return
    save_transformer(model, path, dtype=dtype, materialize=materialize, metadata=metadata)


def _export_metadata(tr: Trainer) -> dict[str, str]:
    return {"accvideo_step": str(tr.step), "accvideo_key_sigmas": json.dumps(tr.key_sigmas)}


def export_final(tr: Trainer) -> Path:
    """``out_dir/student.safetensors`` (``log.save_dtype``) and, with an EMA, ``student_ema.safetensors``."""
    dtype, meta = parse_dtype(tr.cfg.log.save_dtype), _export_metadata(tr)
    export_student(tr.student, tr.out / "student.safetensors", dtype, tr.info, metadata=meta)
    if tr.ema is not None:
        export_student(tr.ema, tr.out / "student_ema.safetensors", dtype, tr.info, metadata=meta)
    return tr.out / "student.safetensors"


# ---------------------------------------------------------------------------------------------- load
def load_checkpoint(tr: Trainer, ckdir: Path) -> None:
    """Restore every piece of state :func:`save_checkpoint` wrote into the built trainer ``tr``, on any number
    of ranks and sequence-parallel degrees (the per-rank queues and data positions are redistributed as an
    uninterrupted run on the new layout would hold them)."""
    marker = _marker(ckdir) or {}
    state = load_torch(ckdir / "trainer.pt")
    lora_mode.check_resume(tr, ckdir, state)
    if marker.get("format", "full") == "sharded":
        _load_sharded(tr, ckdir)
    else:
        _load_full(tr, ckdir)
    tr.heads.load_state_dict(state["heads"])
    tr.head_opt.load_state_dict(state["heads_optimizer"])
    tr.step = int(state["step"])
    tr.resume_in_iteration = state.get("in_iteration")
    tr.validation_pending = bool(state.get("validation_pending", False))
    tr.teacher_baseline = state.get("teacher_baseline", state.get("teacher5"))
    if marker:
        tr.lineage.ancestry = {**marker.get("ancestry", {}), marker["run"]: int(marker["step"])}
    _load_rank_states(tr, ckdir, int(state["world"]), int(state.get("sp", 1)))


def _load_rank_states(tr: Trainer, ckdir: Path, world: int, sp: int) -> None:
    """Queues, data position and RNG of this rank. On the layout that wrote them (ranks and sequence-parallel
    degree) each rank takes its own; on another one, the state of every data-parallel group of the old run (its
    ranks hold the same samples; the group's first rank file is read) is redistributed over this run's groups as
    an uninterrupted run on this layout would hold it, and rank r takes the RNG state of old group
    ``dp_rank mod old dp``."""
    info = tr.info
    if (world, sp) == (info.world, info.sp):
        saved = load_torch(ckdir / f"rank{info.rank:05d}.pt")
        tr.queues.load_state_dict(saved["queues"], tr.device)
        tr.stream.load_state_dict(saved["stream"])
    else:
        groups = [load_torch(ckdir / f"rank{d * sp:05d}.pt") for d in range(world // sp)]
        tr.queues.load_resharded([g["queues"] for g in groups], info.dp_rank, info.dp, tr.device)
        tr.stream.load_resharded([g["stream"] for g in groups])
        saved = groups[info.dp_rank % len(groups)]
    set_rng_state(saved["rng"], tr.device)


def _load_full(tr: Trainer, ckdir: Path) -> None:
    info = tr.info
    if tr.adapters is not None:
        lora_mode.load_full_checkpoint(tr, ckdir)
        return
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


def _load_sharded(tr: Trainer, ckdir: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(tr)  # this run's layout; read_distributed_checkpoint reshards into it
    if tr.ema is None:
        state.pop("ema", None)
    try:
        read_distributed_checkpoint(state, ckdir / SHARDED_DIR)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"{ckdir}: does not match this run's model ({err}); optim.ema_decay > 0 needs a "
                              "checkpoint with EMA weights") from err
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    groups = get_optimizer_state_dict(tr.student, tr.opt)["param_groups"]
    options = StateDictOptions(strict=tr.adapters is None)  # LoRA mode: only the adapters were saved
    set_model_state_dict(tr.student, state["student"], options=options)
    set_optimizer_state_dict(tr.student, tr.opt, {"state": state["optimizer"], "param_groups": groups})
    if tr.ema is not None:
        set_model_state_dict(tr.ema, state["ema"])


def checkpoint_tensors(ckdir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (either format) as one flat CPU dict in one process: ``student.*``,
    ``optimizer.<param>.<state>``, ``ema.*``, ``heads.*`` (to compare runs or inspect a checkpoint)."""
    marker = _marker(ckdir) or {}
    if marker.get("format") == "sharded":
        out = read_distributed_checkpoint_flat(ckdir / SHARDED_DIR)
    else:
        fp32 = ckdir / "student_fp32.safetensors"
        weights = next(p for p in (ckdir / lora_mode.ADAPTERS_FILE, fp32, ckdir / "student.safetensors")
                       if p.is_file())
        out = {f"student.{k}": v for k, v in read_state_dict(weights).items()}
        if (ckdir / "student_ema.safetensors").is_file():
            out.update({f"ema.{k}": v for k, v in read_state_dict(ckdir / "student_ema.safetensors").items()})
        opt = load_torch(ckdir / "optimizer.pt")
        out.update({f"optimizer.{n}.{s}": t for n, d in opt["state"].items() for s, t in d.items()})
    heads = load_torch(ckdir / "trainer.pt")["heads"]
    out.update({f"heads.{k}": v for k, v in heads.items()})
    return out
