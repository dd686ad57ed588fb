"""ComfyUI-AccVideo: ComfyUI entry point of the node pack (V3 schema API, pinned ``comfy_api.v0_0_2``).

ComfyUI imports this file as a package and calls :func:`comfy_entrypoint`. Outside ComfyUI (CI, plain Python)
importing it defines nothing ComfyUI-specific and never fails; ``accvideo_core`` never imports ComfyUI.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)  # `accvideo_core` imports itself absolutely; appended so ComfyUI's own modules win

try:
    from comfy_api.v0_0_2 import ComfyExtension  # noqa: F401  (only present inside ComfyUI >= 0.3.64)
except ImportError:
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import AccVideoExtension, comfy_entrypoint  # noqa: F401

__all__ = ["comfy_entrypoint"] if ComfyExtension is not None else []
