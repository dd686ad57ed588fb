"""Checkpoint reading and atomic file writing shared by every part of the project.

Rules enforced here, once:
- pickles are read with ``torch.load(..., weights_only=True)`` only (never unpickle untrusted code);
- every write goes to a temporary file in the target folder and is renamed into place, so an interrupted
  write never leaves a truncated file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

StateDict = dict[str, torch.Tensor]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("module", "ema", "state_dict", "model")
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(ValueError):
    """A checkpoint file could not be read or does not hold what the caller expected."""


def read_state_dict(path: str | os.PathLike, *, device: str = "cpu") -> StateDict:
    """Read a ``.safetensors`` file or a torch pickle (weights only) into a flat ``{name: tensor}`` dict.

    Common wrappers (``module``, ``ema``, ``state_dict``, ``model``) around the tensors are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=device)
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({err}); the file may be truncated or corrupt: "
                "download it again"
            ) from err
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}"
        )
    try:
        try:  # memory-map zip-format pickles so a 25 GB checkpoint is not read into RAM up front
            obj = torch.load(str(path), map_location=device, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(str(path), map_location=device, weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} could not be read as a weights-only torch checkpoint ({type(err).__name__}: {err}). "
            "Files that need arbitrary code to unpickle are refused; convert the file to .safetensors, "
            "or download it again if it is truncated"
        ) from err
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj: object, *, source: str = "state dict") -> StateDict:
    """Unwrap ``{"module": sd}``-style containers until a flat dict of tensors remains."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError(f"{source} holds no tensors (type {type(obj).__name__}); expected a state dict")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write tensors (made contiguous, on CPU) to a safetensors file."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


def write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Atomically write bytes."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(obj: object, path: str | os.PathLike) -> Path:
    """Atomically write pretty JSON."""
    return write_bytes((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), path)


def save_torch(obj: object, path: str | os.PathLike) -> Path:
    """Atomically ``torch.save`` an object made of tensors and plain containers (readable weights-only)."""
    with atomic_path(path) as tmp:
        torch.save(obj, str(tmp))
    return Path(path)


def load_torch(path: str | os.PathLike, *, device: str = "cpu") -> object:
    """``torch.load`` restricted to weights-only content."""
    return torch.load(str(path), map_location=device, weights_only=True)
