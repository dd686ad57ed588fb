"""SynVid: the teacher's denoising trajectories on disk.

``format``: one sample file (write, read, validate) and the reader of a data set. ``folder``: the writer of a
data-set folder (safe with several writers), its repair and verification. ``record``: a sampled trajectory ->
samples. ``dump``: the core dumper (our transformer); ``build``: the ComfyUI client. See docs/synvid.md. Names
are resolved lazily, so ``python -m accvideo_core.synvid.format`` runs without a double import.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "format": ("FORMAT_VERSION", "STORE_MODES", "SynVidDataset", "SynVidError", "SynVidSample", "key_steps_for",
               "read_sample", "write_sample"),
    "folder": ("SynVidWriter", "rebuild_manifest", "verify"),
}
__all__ = sorted(name for names in _HOMES.values() for name in names)


def __getattr__(name: str) -> Any:
    home = next((module for module, names in _HOMES.items() if name in names), None)
    if home is None:
        raise AttributeError(f"module 'accvideo_core.synvid' has no attribute {name!r}")
    return getattr(importlib.import_module(f"accvideo_core.synvid.{home}"), name)
