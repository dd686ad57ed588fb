"""Memory probing for the VAE decoders: free device / host memory and the peak working set of a decode.

``WorkingSetMeter`` is the CPU stand-in for CUDA's ``max_memory_allocated``: it counts the live bytes of tensors
allocated while it is active. ``available_host_memory`` reads ``/proc/meminfo`` (the only place it is read).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

FALLBACK_HOST_BYTES = 8 << 30  # assumed available RAM where /proc/meminfo cannot be read


class WorkingSetMeter(TorchDispatchMode):
    """Measures the peak bytes of tensors *allocated* while active (the device-side working set on CPU).

    Every op output whose storage is not shared with an input counts as a new allocation until its storage is
    freed. Writes into pre-existing buffers (``copy_`` into the host store) and views add nothing. On CUDA
    prefer ``torch.cuda.max_memory_allocated``; this meter is the CPU stand-in.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.device = torch.device(device) if device is not None else None
        self.live: dict[int, tuple[object, int]] = {}
        self.current = 0
        self.peak = 0
        self.ignore = False

    @contextlib.contextmanager
    def ignoring(self) -> Iterator[None]:
        """Allocations inside this block (host-side store buffers) are not counted."""
        previous, self.ignore = self.ignore, True
        try:
            yield
        finally:
            self.ignore = previous

    def _prune(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        if self.ignore:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        self._prune()
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (self.device is not None and t.device != self.device):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs or ptr in self.live or storage.nbytes() == 0:
                continue
            self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def ignoring(meter: WorkingSetMeter | None) -> contextlib.AbstractContextManager:
    """``meter.ignoring()``, or a no-op without a meter."""
    return meter.ignoring() if meter is not None else contextlib.nullcontext()


class PeakTracker:
    """Peak device bytes of a decode: CUDA allocator statistics on CUDA, ``WorkingSetMeter`` elsewhere."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device, self.enabled = device, enabled
        self.meter: WorkingSetMeter | None = None
        self.base = 0
        self.peak: int | None = None

    def __enter__(self) -> "PeakTracker":
        if not self.enabled:
            return self
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.meter = WorkingSetMeter(self.device)
            self.meter.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        if self.meter is not None:
            self.meter.__exit__(*exc)
            self.peak = self.meter.peak
        else:
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base


def free_device_memory(device: torch.device) -> int:
    """Free memory of ``device`` in bytes (available RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()


def available_host_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (``FALLBACK_HOST_BYTES`` where it cannot be read)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return FALLBACK_HOST_BYTES
