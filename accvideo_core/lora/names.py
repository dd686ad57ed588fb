"""Module names of the HunyuanVideo transformer in every naming a LoRA file may use.

Our module names are the original HunyuanVideo names (``double_blocks.0.img_attn_qkv``). A LoRA file may instead
name a module by ComfyUI's internal Flux-style name (``double_blocks.0.img_attn.qkv``), by a diffusers name
(``transformer_blocks.0.attn.to_q``, one part of a fused original weight), or by any of these with dots turned
into underscores (kohya / musubi-tuner / OneTrainer).

:func:`resolve` maps such a name onto a :class:`Target`: the original module plus, for diffusers names that
cover only some rows of a fused original weight, which rows. The diffusers side is not a second table: it is
derived from :mod:`accvideo_core.models.key_maps` by converting a probe state dict (see :func:`_diffusers_aliases`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from accvideo_core.models import key_maps

from . import comfy_names

# Block lists and the modules of one block, in original names, with their kind:
# "linear" / "conv" (low-rank + diff + diff_b), "layernorm" (weight + bias diffs), "rmsnorm" (weight diff only).
TOP_LEVEL: dict[str, str] = {
    "img_in.proj": "conv",
    "time_in.mlp.0": "linear",
    "time_in.mlp.2": "linear",
    "guidance_in.mlp.0": "linear",
    "guidance_in.mlp.2": "linear",
    "vector_in.in_layer": "linear",
    "vector_in.out_layer": "linear",
    "txt_in.input_embedder": "linear",
    "txt_in.t_embedder.mlp.0": "linear",
    "txt_in.t_embedder.mlp.2": "linear",
    "txt_in.c_embedder.linear_1": "linear",
    "txt_in.c_embedder.linear_2": "linear",
    "final_layer.linear": "linear",
    "final_layer.adaLN_modulation.1": "linear",
}
REFINER_LIST = "txt_in.individual_token_refiner.blocks"
DOUBLE_LIST = "double_blocks"
SINGLE_LIST = "single_blocks"
BLOCK_MODULES: dict[str, dict[str, str]] = {
    REFINER_LIST: {
        "norm1": "layernorm",
        "self_attn_qkv": "linear",
        "self_attn_proj": "linear",
        "norm2": "layernorm",
        "mlp.fc1": "linear",
        "mlp.fc2": "linear",
        "adaLN_modulation.1": "linear",
    },
    DOUBLE_LIST: {
        f"{stream}_{name}": kind
        for stream in ("img", "txt")
        for name, kind in (
            ("mod.linear", "linear"), ("attn_qkv", "linear"), ("attn_q_norm", "rmsnorm"),
            ("attn_k_norm", "rmsnorm"), ("attn_proj", "linear"), ("mlp.fc1", "linear"), ("mlp.fc2", "linear"),
        )
    },
    SINGLE_LIST: {
        "linear1": "linear",
        "linear2": "linear",
        "q_norm": "rmsnorm",
        "k_norm": "rmsnorm",
        "modulation.linear": "linear",
    },
}
_DIFFUSERS_LISTS = {
    REFINER_LIST: "context_embedder.token_refiner.refiner_blocks",
    DOUBLE_LIST: "transformer_blocks",
    SINGLE_LIST: "single_transformer_blocks",
}
_INDEX = "{i}"


@dataclass(frozen=True)
class Target:
    """Where a named LoRA module lands in our model.

    ``module`` is the original module name. ``units`` is None when the name covers the whole module; otherwise the
    module's rows are ``total_units`` equal units and this name covers ``units`` of them, in its own row order
    (``(0,)`` = q of a fused qkv, ``(3, 4, 5, 6)`` = the mlp rows of ``single_blocks.N.linear1``, ``(1, 0)`` =
    diffusers' ``norm_out.linear`` with the two halves swapped).
    """

    module: str
    units: tuple[int, ...] | None = None
    total_units: int = 1

    def place_rows(self, rows_per_unit: int) -> list[tuple[slice, slice]]:
        """(rows in the full module, rows in the part) pairs that copy a part named by this target into place."""
        assert self.units is not None
        return [
            (slice(u * rows_per_unit, (u + 1) * rows_per_unit), slice(k * rows_per_unit, (k + 1) * rows_per_unit))
            for k, u in enumerate(self.units)
        ]


def module_kind(module: str) -> str | None:
    """Kind of an original module name ("linear", "conv", "layernorm", "rmsnorm"), None when unknown."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    for block_list, modules in BLOCK_MODULES.items():
        m = re.fullmatch(re.escape(block_list) + r"\.(\d+)\.(.+)", module)
        if m:
            return modules.get(m.group(2))
    return None


def _templates() -> dict[str, str]:
    """Original module templates (block index as ``{i}``) -> kind."""
    out = dict(TOP_LEVEL)
    for block_list, modules in BLOCK_MODULES.items():
        out.update({f"{block_list}.{_INDEX}.{m}": kind for m, kind in modules.items()})
    return out


def _diffusers_aliases() -> dict[str, Target]:
    """diffusers module template -> Target, read off :func:`key_maps.original_to_diffusers`.

    A probe state dict with hidden size 1 is converted: every original row holds its own id, so the converted
    tensors show which original rows each diffusers tensor takes, in which order.
    """
    rows = {"linear1": 7, "qkv": 3, "final_layer.adaLN_modulation.1": 2}  # H = 1, mlp ratio 4
    probe: dict[str, torch.Tensor] = {}
    owner: dict[int, tuple[str, int, int]] = {}  # row id -> (original template, row, rows of that module)
    next_id = 0
    for template in _templates():
        name = template.replace(_INDEX, "0")
        n = 1
        for marker, count in rows.items():
            if name.endswith(marker):
                n = count
        ids = torch.arange(next_id, next_id + n, dtype=torch.float64)
        probe[f"{name}.weight"] = ids
        for r in range(n):
            owner[next_id + r] = (template, r, n)
        next_id += n
    converted = key_maps.original_to_diffusers(probe)
    out: dict[str, Target] = {}
    for key, tensor in converted.items():
        d_name = key.removesuffix(".weight")
        for block_list, d_list in _DIFFUSERS_LISTS.items():
            if d_name.startswith(f"{d_list}.0."):
                d_name = f"{d_list}.{_INDEX}." + d_name[len(d_list) + 3:]
        hits = [owner[int(v)] for v in tensor.tolist()]
        template, _, total = hits[0]
        if {h[0] for h in hits} != {template}:
            raise RuntimeError(f"key_maps maps diffusers {key} onto several original modules")
        units = tuple(h[1] for h in hits)
        out[d_name] = Target(template) if units == tuple(range(total)) else Target(template, units, total)
    return out


@functools.lru_cache(maxsize=1)
def _alias_tables() -> tuple[dict[str, Target], dict[str, Target]]:
    """(dotted alias template -> Target, underscored alias template -> Target)."""
    dotted: dict[str, Target] = {}
    for template in _templates():
        dotted[template] = Target(template)
        internal = comfy_names.to_comfy_module(template)
        dotted[internal] = Target(template)
        if internal.endswith(".scale"):  # q/k norms: ComfyUI names the parameter, not the module
            dotted[internal.removesuffix(".scale")] = Target(template)
    dotted.update(_diffusers_aliases())
    underscored = {name.replace(".", "_"): t for name, t in dotted.items()}
    return dotted, underscored


_BLOCK_DOTTED = re.compile(
    r"^(" + "|".join(re.escape(x) for x in (*BLOCK_MODULES, *_DIFFUSERS_LISTS.values())) + r")\.(\d+)\.(.+)$"
)
_BLOCK_UNDERSCORED = re.compile(
    r"^(" + "|".join(re.escape(x.replace(".", "_")) for x in (*BLOCK_MODULES, *_DIFFUSERS_LISTS.values()))
    + r")_(\d+)_(.+)$"
)


def resolve(name: str) -> Target | None:
    """Target of a module name in any supported naming (no file prefix, no suffix); None when unknown."""
    dotted, underscored = _alias_tables()
    for pattern, table, sep in ((_BLOCK_DOTTED, dotted, "."), (_BLOCK_UNDERSCORED, underscored, "_")):
        m = pattern.match(name)
        if m:
            target = table.get(f"{m.group(1)}{sep}{_INDEX}{sep}{m.group(3)}")
            if target is not None:
                index = m.group(2)
                return Target(target.module.replace(_INDEX, index), target.units, target.total_units)
    return dotted.get(name) or underscored.get(name)


def naming_of(name: str) -> str:
    """Which naming a module name uses: "original", "comfyui" or "diffusers" (dotted or underscored forms);
    "unknown" when it does not resolve. Names equal in several namings count as original."""
    target = resolve(name)
    if target is None:
        return "unknown"
    if target.units is None:
        comfy = comfy_names.to_comfy_module(target.module)
        for naming, forms in (("original", {target.module}), ("comfyui", {comfy, comfy.removesuffix(".scale")})):
            if name in forms or name in {f.replace(".", "_") for f in forms}:
                return naming
    return "diffusers"


def resolve_param(key: str, prefixes: tuple[str, ...] = ()) -> tuple[str, Target] | None:
    """Original parameter key and target of a checkpoint key in original, ComfyUI-internal (incl. the q/k norm
    ``...norm.query_norm.scale``) or diffusers naming, after removing the first of ``prefixes`` it carries."""
    bodies = [key[len(p):] for p in prefixes if key.startswith(p)] + [key]
    for body in bodies:
        module, _, param = body.rpartition(".")
        if param == "scale":  # ComfyUI's q/k norm parameter
            target, param = resolve(body), "weight"
        else:
            target = resolve(module) if param in ("weight", "bias") else None
        if target is not None:
            return f"{target.module}.{param}", target
    return None
