"""Checkpoint reading and atomic file writing shared by every part of the project.

Rules enforced here, once:
- pickles are read with ``torch.load(..., weights_only=True)`` only (never unpickle untrusted code);
- every write goes to a temporary file in the target folder and is renamed into place, so an interrupted
  write never leaves a truncated file under the final name.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import torch

from .dtypes import SAFETENSORS_TAGS

StateDict = dict[str, torch.Tensor]
T = TypeVar("T")

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
            raise _unreadable_safetensors(path, err) from err
    return unwrap_state_dict(_load_pickle(path, device=device, mmap=True), source=str(path))


def _load_pickle(path: Path, *, device: str = "cpu", mmap: bool = True) -> object:
    """``torch.load`` weights-only (memory-mapped when the file is zip-format), every failure a CheckpointError."""
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}"
        )
    try:
        try:  # memory-map zip-format pickles so a 25 GB checkpoint is not read into RAM up front
            return torch.load(str(path), map_location=device, weights_only=True, mmap=mmap)
        except RuntimeError as err:
            if not mmap or "mmap" not in str(err):
                raise
            return torch.load(str(path), map_location=device, weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path} could not be read as a weights-only torch checkpoint ({type(err).__name__}: {_gist(err)}). "
            "Files that need arbitrary code to unpickle are refused; convert the file to .safetensors, "
            "or download it again if it is truncated"
        ) from err


def _gist(err: Exception) -> str:
    """One line of a (torch's multi-paragraph) error: its ``WeightsUnpickler error`` detail, else its first line.

    torch's own advice to retry with ``weights_only=False`` is left out on purpose."""
    text = " ".join(str(err).split())
    if "WeightsUnpickler error:" in text:
        return "refused by the weights-only unpickler: " + text.split("WeightsUnpickler error:")[1].split(
            " Check the documentation")[0].strip()
    return text.split(". ")[0]


def _unreadable_safetensors(path: Path, err: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable safetensors file ({err}); the file may be truncated or "
                           "corrupt: download it again")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file's header (``{}`` for pickles, which carry none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    with LazyCheckpoint(path) as ckpt:
        return ckpt.metadata


class LazyCheckpoint:
    """Per-tensor access to a checkpoint file without reading it whole (use as a context manager).

    ``.safetensors`` are read tensor by tensor (or row by row with :meth:`get_rows`) from the file; pickles are
    memory-mapped weights-only and unwrapped like :func:`read_state_dict`. Every read error is a
    :class:`CheckpointError` naming the file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        self._handle = None
        self._tensors: StateDict = {}
        self.metadata: dict[str, str] = {}
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._handle = safe_open(str(self.path), framework="pt").__enter__()
                self._keys = list(self._handle.keys())
                self.metadata = dict(self._handle.metadata() or {})
            except Exception as err:  # safetensors raises its own error types for corrupt headers
                self.close()
                raise _unreadable_safetensors(self.path, err) from err
        else:
            self._tensors = unwrap_state_dict(_load_pickle(self.path), source=str(self.path))
            self._keys = list(self._tensors)

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file (safetensors handle, mmapped pickle tensors)."""
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None
        self._tensors = {}

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def _read(self, key: str, what: Callable[[], T]) -> T:
        if key not in self._keys:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        if self._handle is None and not self._tensors:
            raise CheckpointError(f"{self.path}: read after close")
        try:
            return what()
        except Exception as err:
            if self._handle is None:
                raise
            raise _unreadable_safetensors(self.path, err) from err

    def get(self, key: str) -> torch.Tensor:
        """One tensor, as stored."""
        return self._read(key, lambda: self._handle.get_tensor(key) if self._handle else self._tensors[key])

    def get_rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        """``tensor[rows]`` reading only those rows of the first dimension."""
        def read() -> torch.Tensor:
            if self._handle is None:
                return self._tensors[key][list(rows)]
            view = self._handle.get_slice(key)
            return torch.stack([view[i] for i in rows])
        return self._read(key, read)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one tensor without reading its data."""
        from .dtypes import SAFETENSORS

        def read() -> tuple[tuple[int, ...], torch.dtype]:
            if self._handle is None:
                return tuple(self._tensors[key].shape), self._tensors[key].dtype
            view = self._handle.get_slice(key)
            return tuple(view.get_shape()), SAFETENSORS[view.get_dtype()]
        return self._read(key, read)


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
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on error removed.

    ``overwrite=False``: an existing ``path`` is never replaced, not even one created while the temporary file was
    written (the file is hard-linked into place, which fails atomically); raises ``FileExistsError`` then.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(errno.EEXIST, "exists; not overwritten", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        if overwrite:
            os.replace(tmp_path, path)
        else:
            _link_new(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _link_new(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` only if ``dst`` does not exist (atomic where hard links work)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists; not overwritten", str(dst)) from None
    except OSError:  # a filesystem without hard links: check, then rename (a narrow race remains)
        if dst.exists():
            raise FileExistsError(errno.EEXIST, "exists; not overwritten", str(dst)) from None
        os.replace(src, dst)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *, overwrite: bool = True) -> Path:
    """Atomically write tensors (made contiguous, on CPU) to a safetensors file (``overwrite``: see
    :func:`atomic_path`)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
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
    """``torch.load`` restricted to weights-only content (any object of tensors and plain containers, not
    unwrapped); an unreadable file is a :class:`CheckpointError` naming it."""
    return _load_pickle(Path(path), device=device, mmap=False)


def save_safetensors_stream(specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                            tensors: Iterable[torch.Tensor], path: str | os.PathLike,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write a safetensors file one tensor at a time: the header comes from ``specs`` (name, dtype,
    shape), then each tensor of ``tensors`` (same order) is written and dropped, so only one is ever held."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_TAGS[dtype], "shape": list(shape), "data_offsets": [offset,
                                                                                                  offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        count = 0
        for (name, dtype, shape), t in zip(specs, tensors):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            fh.write(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: {count} tensors for {len(specs)} header entries")
    return Path(path)


_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.distributed.checkpoint`` ``.metadata`` file allowing only its own plain classes."""

    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _dcp_reader(folder: Path):
    """A ``torch.distributed.checkpoint`` reader whose ``.metadata`` goes through the allow-list unpickler and may
    hold only tensor entries (DCP's own reader ``pickle.load``s it and unpickles non-tensor entries)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            try:
                with open(folder / ".metadata", "rb") as fh:
                    md = _DCPMetadataUnpickler(fh).load()
            except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as err:
                raise CheckpointError(f"{folder}: unreadable distributed-checkpoint metadata ({err})") from err
            if not isinstance(md, Metadata):
                raise CheckpointError(f"{folder}/.metadata holds a {type(md).__name__}, not checkpoint metadata")
            bad = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
            if bad:
                raise CheckpointError(f"{folder}: non-tensor entries {bad[:3]} (this project writes tensors only)")
            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(folder))


def read_distributed_checkpoint(state: dict, folder: str | os.PathLike) -> None:
    """Fill ``state`` (nested dicts of tensors / DTensors, in place, resharded to this run's layout) from a
    ``torch.distributed.checkpoint`` folder; reading it never runs pickled code."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder} is not a distributed checkpoint (no .metadata)")
    with _single_process_ok():
        dcp.load(state, storage_reader=_dcp_reader(folder))


def read_distributed_checkpoint_flat(folder: str | os.PathLike) -> StateDict:
    """Every tensor of a ``torch.distributed.checkpoint`` folder, full size on CPU, keyed by its flat name
    (``student.double_blocks.0...``); one process, any number of writing ranks."""
    folder = Path(folder)
    reader = _dcp_reader(folder)
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder} is not a distributed checkpoint (no .metadata)")
    md = reader.read_metadata()
    state = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    import torch.distributed.checkpoint as dcp

    with _single_process_ok():
        dcp.load(state, storage_reader=reader)
    return state


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is what we mean."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
