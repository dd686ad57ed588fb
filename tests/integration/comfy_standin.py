"""A tiny stand-in for ComfyUI's ``comfy_api.v0_0_2`` (io, ui, ComfyExtension) and ``folder_paths``.

It lets CI import ``nodes/`` without ComfyUI and read every node's schema: each ``io.<Type>.Input(...)`` call is
recorded with its type and keyword arguments, and :func:`object_info` renders the schemas the way ComfyUI's
``/object_info`` does for the fields that matter to saved workflows (input order and sections, types, widget
options, defaults, outputs). The integration tier checks this rendering against a real ComfyUI, so the stand-in
cannot drift unnoticed. Nothing here executes a node.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
# V3 keyword -> /object_info key (None: not shown there)
_KEY_NAMES = {"display_name": "display_name", "tooltip": "tooltip", "default": "default", "min": "min", "max": "max",
              "step": "step", "round": "round", "control_after_generate": "control_after_generate",
              "force_input": "forceInput", "multiline": "multiline", "lazy": "lazy", "socketless": "socketless",
              "placeholder": "placeholder", "dynamic_prompts": "dynamicPrompts", "options": "options"}


class _Input:
    def __init__(self, io_type: str, id: str, **kwargs: Any):
        self.io_type, self.id, self.kwargs = io_type, id, kwargs

    @property
    def optional(self) -> bool:
        return bool(self.kwargs.get("optional"))

    @property
    def is_widget(self) -> bool:
        return self.io_type in WIDGET_TYPES and not self.kwargs.get("force_input")


class _Output:
    def __init__(self, io_type: str, id: str | None = None, **kwargs: Any):
        self.io_type, self.id, self.kwargs = io_type, id, kwargs


def _comfy_type(io_type: str) -> type:
    def make_input(*args: Any, **kwargs: Any) -> _Input:
        return _Input(io_type, *args, **kwargs)

    def make_output(*args: Any, **kwargs: Any) -> _Output:
        return _Output(io_type, *args, **kwargs)

    return type(io_type, (), {"Input": staticmethod(make_input), "Output": staticmethod(make_output),
                              "io_type": io_type})


class _Schema:
    def __init__(self, node_id: str, **kwargs: Any):
        self.node_id = node_id
        self.kwargs = kwargs
        self.inputs: list[_Input] = list(kwargs.get("inputs") or [])
        self.outputs: list[_Output] = list(kwargs.get("outputs") or [])


class _ComfyNode:
    hidden = None

    @classmethod
    def define_schema(cls) -> _Schema:  # pragma: no cover - overridden
        raise NotImplementedError


class _NodeOutput:
    def __init__(self, *args: Any, ui: Any = None, **kwargs: Any):
        self.args, self.ui = args, ui


class _Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class _FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class _ComfyExtension:
    async def on_load(self) -> None:
        return None


_TYPES = {"Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO",
          "Model": "MODEL", "Conditioning": "CONDITIONING", "Latent": "LATENT", "Sigmas": "SIGMAS", "Vae": "VAE",
          "Clip": "CLIP", "Image": "IMAGE", "Noise": "NOISE", "Guider": "GUIDER", "Sampler": "SAMPLER",
          "Mask": "MASK", "Video": "VIDEO"}


def _modules() -> dict[str, types.ModuleType]:
    io = types.ModuleType("comfy_api.v0_0_2.io")
    for name, io_type in _TYPES.items():
        setattr(io, name, _comfy_type(io_type))
    io.Schema, io.ComfyNode, io.NodeOutput, io.Hidden, io.FolderType = (_Schema, _ComfyNode, _NodeOutput, _Hidden,
                                                                       _FolderType)
    ui = types.ModuleType("comfy_api.v0_0_2.ui")
    ui.PreviewVideo = lambda values, **kw: {"images": list(values), "animated": (True,)}
    ui.SavedResult = lambda filename, subfolder, type: {"filename": filename, "subfolder": subfolder,
                                                        "type": getattr(type, "value", type)}
    v002 = types.ModuleType("comfy_api.v0_0_2")
    v002.io, v002.ui, v002.ComfyExtension = io, ui, _ComfyExtension
    pkg = types.ModuleType("comfy_api")
    pkg.v0_0_2 = v002
    pkg.__path__ = []
    v002.__path__ = []
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_filename_list = lambda folder: []
    return {"comfy_api": pkg, "comfy_api.v0_0_2": v002, "comfy_api.v0_0_2.io": io, "comfy_api.v0_0_2.ui": ui,
            "folder_paths": folder_paths}


@contextlib.contextmanager
def standin() -> Iterator[types.ModuleType]:
    """Import the repository's ``nodes`` package against the stand-in; yields the package, then restores
    ``sys.modules`` (the stand-in never leaks into other tests)."""
    fakes = _modules()
    saved = {name: sys.modules.get(name) for name in list(fakes) + [m for m in sys.modules if m == "nodes"
                                                                      or m.startswith("nodes.")]}
    for name in saved:
        sys.modules.pop(name, None)
    sys.modules.update(fakes)
    added_path = str(ROOT) not in sys.path
    if added_path:
        sys.path.insert(0, str(ROOT))
    try:
        yield importlib.import_module("nodes")
    finally:
        for name in [m for m in sys.modules if m == "nodes" or m.startswith("nodes.")] + list(fakes):
            sys.modules.pop(name, None)
        sys.modules.update({k: v for k, v in saved.items() if v is not None})
        if added_path:
            sys.path.remove(str(ROOT))


def schemas() -> dict[str, _Schema]:
    """``{node_id: schema}`` of every node the pack registers, read through the stand-in."""
    with standin() as pkg:
        return {s.node_id: s for s in (cls.define_schema() for cls in pkg.NODES)}


def _input_info(inp: _Input) -> list:
    info = {_KEY_NAMES[k]: v for k, v in inp.kwargs.items() if k in _KEY_NAMES and v is not None}
    if inp.io_type == "COMBO":
        info["multiselect"] = False
    if inp.io_type == "STRING":
        info.setdefault("multiline", False)
    return [inp.io_type, info]


def object_info(schema: _Schema) -> dict:
    """The ``/object_info`` entry ComfyUI 0.3.64 serves for a V3 schema (fields relevant to workflows)."""
    required = {i.id: _input_info(i) for i in schema.inputs if not i.optional}
    optional = {i.id: _input_info(i) for i in schema.inputs if i.optional}
    inputs: dict = {"required": required}
    order: dict = {"required": list(required)}
    if optional:
        inputs["optional"], order["optional"] = optional, list(optional)
    kw = schema.kwargs
    hidden = list(kw.get("hidden") or [])
    if kw.get("is_output_node"):  # ComfyUI adds these to every output node
        hidden += [h for h in (_Hidden.prompt, _Hidden.extra_pnginfo) if h not in hidden]
    if hidden:
        inputs["hidden"] = {h.name: [h.value] for h in hidden}
        order["hidden"] = [h.name for h in hidden]
    return {
        "input": inputs, "input_order": order,
        "output": [o.io_type for o in schema.outputs],
        "output_is_list": [bool(o.kwargs.get("is_output_list")) for o in schema.outputs],
        "output_name": [o.kwargs.get("display_name") or o.io_type for o in schema.outputs],
        "name": schema.node_id, "display_name": kw.get("display_name"), "description": kw.get("description", ""),
        "category": kw.get("category"), "output_node": bool(kw.get("is_output_node")),
    }
