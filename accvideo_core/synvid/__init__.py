"""SynVid: the teacher's denoising trajectories on disk (format, reader, core dumper).

``format`` defines the files; ``dump`` makes them with our transformer; ``build`` (ComfyUI client) makes them
with ComfyUI's models. See docs/synvid.md. Names are resolved lazily, so ``python -m accvideo_core.synvid.format``
runs without a double import.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FORMAT_VERSION", "SynVidDataset", "SynVidError", "SynVidSample", "SynVidWriter", "key_steps_for",
           "read_sample", "rebuild_manifest", "verify", "write_sample"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'accvideo_core.synvid' has no attribute {name!r}")
    return getattr(importlib.import_module("accvideo_core.synvid.format"), name)
