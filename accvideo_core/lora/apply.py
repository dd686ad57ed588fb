"""Apply LoRAs to our transformer (or a plain state dict): merged at a strength, stacked, exactly removable.

- Float weights (fp32 / bf16 / fp16) are **merged**: ``W = base + sum_i strength_i * delta_i``, summed in fp32 and
  rounded once. The base of every touched weight is kept (on the CPU by default), so removing a LoRA recomputes
  from it: removing all of them restores the weights bit for bit, and any stack equals the same LoRAs merged
  from scratch. ``exact_restore=False`` keeps no copy and subtracts instead (not bit-exact; saves RAM).
- fp8 weights are **never merged** (rounding a small delta into fp8 would lose most of it): a forward hook on
  the module adds ``strength * (x @ delta_W^T + delta_b)`` at run time, low-rank factors as two thin matmuls.
- Every key is accounted for (see :func:`match`): nothing usable is an error, a partial match one warning line.

:func:`comfy_patches` turns a LoRA into ComfyUI ``ModelPatcher`` patches keyed by ComfyUI's internal parameter
names, so the LoRA loader node stays free of math.
"""
from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import comfy_names, names
from .formats import LoraFormatError, LoraState, ModulePatch, load_lora

log = logging.getLogger("accvideo_core.lora")

_STACK_ATTR = "_accvideo_lora_stack"
LoraLike = LoraState | str | os.PathLike | Mapping[str, torch.Tensor]


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether tensors of this dtype are 8-bit floats (kept unmerged)."""
    return dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() == 1


def as_lora(lora: LoraLike) -> LoraState:
    return lora if isinstance(lora, LoraState) else load_lora(lora)


@dataclass
class MatchReport:
    """How the keys of one LoRA map onto one model."""

    state: LoraState
    patches: dict[str, ModulePatch]  # module -> patch, modules present in the model only
    absent: list[str]  # modules of the LoRA the model does not have

    def message(self) -> str | None:
        """One warning line for a partial match, None when every key is used."""
        skipped = [k for m in self.absent for k in self.state.modules[m].keys] + list(self.state.unused)
        if not skipped:
            return None
        reasons = sorted({r for r in self.state.unused.values()} | ({"module not in this model"} if self.absent else set()))
        return (
            f"LoRA {self.state.source} ({self.state.format}): {len(skipped)} of {self.state.total_keys} keys not "
            f"applied ({'; '.join(reasons)}), e.g. {skipped[:3]}"
        )


def match(state: LoraState, shapes: Mapping[str, torch.Size], *, warn: bool = True) -> MatchReport:
    """Match a LoRA against a model's parameter shapes (``{"double_blocks.0.img_attn_qkv.weight": shape}``).

    Zero matched keys raise :class:`LoraFormatError` with the format and three example keys; shape mismatches
    raise too (a LoRA for a differently sized model). Partial matches log one warning line (``warn``; callers
    that report the match themselves pass False).
    """
    patches, absent = {}, []
    for module, patch in state.modules.items():
        weight = shapes.get(f"{module}.weight")
        if weight is None:
            absent.append(module)
            continue
        try:
            patch.check_shapes(weight, shapes.get(f"{module}.bias"))
        except LoraFormatError as err:
            raise LoraFormatError(f"{state.source}: {err}") from None
        patches[module] = patch
    report = MatchReport(state, patches, absent)
    if not patches:
        raise LoraFormatError(
            f"{state.source}: none of the {state.total_keys} keys of this LoRA (format: {state.format}) matches a "
            f"module of this model, e.g. {state.example_keys()}; it was made for a model with other blocks"
        )
    line = report.message() if warn else None
    if line:
        log.warning(line)
    return report


def merge_into_state_dict(sd: Mapping[str, torch.Tensor], loras: Iterable[tuple[LoraLike, float]]
                          ) -> dict[str, torch.Tensor]:
    """A copy of ``sd`` (original key layout) with LoRAs merged at their strengths (fp8 weights included, rounded
    once; use this to bake a LoRA into a checkpoint). Untouched tensors are shared, not copied."""
    out = dict(sd)
    shapes = {k: v.shape for k, v in sd.items()}
    deltas: dict[str, torch.Tensor] = {}
    for lora, strength in loras:
        for module, patch in match(as_lora(lora), shapes).patches.items():
            for key, delta in _deltas(patch, shapes, module):
                deltas[key] = deltas.get(key, 0) + strength * delta
    for key, delta in deltas.items():
        out[key] = (sd[key].float() + delta).to(sd[key].dtype)
    return out


def _deltas(patch: ModulePatch, shapes: Mapping[str, torch.Size], module: str) -> list[tuple[str, torch.Tensor]]:
    """(parameter key, fp32 delta) pairs of one module patch."""
    out = []
    weight = patch.weight_delta(shapes[f"{module}.weight"])
    if weight is not None:
        out.append((f"{module}.weight", weight))
    bias = patch.bias_delta(shapes[f"{module}.bias"]) if patch.diff_b is not None else None
    if bias is not None:
        out.append((f"{module}.bias", bias))
    return out


@dataclass
class _Entry:
    name: str
    report: MatchReport
    strength: float
    cache: dict = field(default_factory=dict)  # (module, device, dtype) -> factors for the runtime path


class LoraStack:
    """LoRAs applied to one ``nn.Module`` whose parameter names are our (original) names.

    >>> stack = LoraStack(model)
    >>> stack.add("style.safetensors", 0.8); stack.add("accvideo_lora.safetensors", 1.0, name="acc")
    >>> stack.set_strength("acc", 0.5); stack.remove("acc"); stack.clear()   # clear() restores exactly
    """

    def __init__(self, model: nn.Module, *, exact_restore: bool = True, backup_device: str | torch.device = "cpu"):
        other = self._registered(model)
        if other is not None and other.entries:
            raise ValueError(
                f"this model already has LoRAs applied by another LoraStack ({other.names}); use that stack "
                "(LoraStack.for_model(model) returns it) or clear() it first"
            )
        model.__dict__[_STACK_ATTR] = weakref.ref(self)
        self.model = model
        self.exact_restore = exact_restore
        self.backup_device = backup_device
        self.entries: list[_Entry] = []
        self._params = dict(model.named_parameters())
        self._modules = dict(model.named_modules())
        self._base: dict[str, torch.Tensor] = {}  # param -> base weights (exact_restore)
        self._merged: dict[str, dict[str, float]] = {}  # param -> {entry: strength merged in} (no exact_restore)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}  # module -> runtime hook

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "LoraStack":
        """The stack already managing ``model``, or a new one."""
        return cls._registered(model) or cls(model, **kwargs)

    @staticmethod
    def _registered(model: nn.Module) -> "LoraStack | None":
        ref = model.__dict__.get(_STACK_ATTR)
        return None if ref is None else ref()

    # ----------------------------------------------------------------- public
    def add(self, lora: LoraLike, strength: float = 1.0, *, name: str | None = None) -> str:
        """Apply a LoRA at ``strength``; returns its name in the stack (for set_strength / remove)."""
        state = as_lora(lora)
        name = name or state.source
        if any(e.name == name for e in self.entries):
            raise ValueError(f"a LoRA named {name!r} is already applied; pass another name=")
        report = match(state, {k: p.shape for k, p in self._params.items()})
        for module in report.patches:
            self._check_runtime_ok(module)
        entry = _Entry(name, report, float(strength))
        self.entries.append(entry)
        self._refresh(report.patches)
        return name

    def set_strength(self, name: str, strength: float) -> None:
        entry = self._entry(name)
        entry.strength = float(strength)
        self._refresh(entry.report.patches)

    def remove(self, name: str) -> None:
        entry = self._entry(name)
        self.entries.remove(entry)
        self._refresh(entry.report.patches, removed=entry)

    def clear(self) -> None:
        """Remove every LoRA (weights back to their base values; bit-exact with ``exact_restore``)."""
        for entry in list(reversed(self.entries)):
            self.remove(entry.name)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    # ----------------------------------------------------------------- internals
    def _entry(self, name: str) -> _Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"no LoRA named {name!r} is applied (applied: {self.names})")

    def _runtime(self, module: str) -> bool:
        return is_fp8(self._params[f"{module}.weight"].dtype)

    def _check_runtime_ok(self, module: str) -> None:
        if not self._runtime(module):
            return
        if not isinstance(self._modules[module], (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise LoraFormatError(
                f"{module} holds fp8 weights but is not a linear or conv layer; a LoRA can only be applied to it "
                "merged: load the model with this module in bf16/fp32"
            )

    @torch.no_grad()
    def _refresh(self, modules: Iterable[str], removed: _Entry | None = None) -> None:
        for module in modules:
            if self._runtime(module):
                self._refresh_hook(module)
                continue
            for key in (f"{module}.weight", f"{module}.bias"):
                if key in self._params:
                    self._refresh_param(module, key, removed)

    def _refresh_param(self, module: str, key: str, removed: _Entry | None) -> None:
        param = self._params[key]
        active = [(e, e.report.patches[module]) for e in self.entries if module in e.report.patches]
        suffix = key.rsplit(".", 1)[1]

        def delta(patch: ModulePatch) -> torch.Tensor | None:
            if suffix == "weight":
                return patch.weight_delta(param.shape, device=param.device)
            return patch.bias_delta(param.shape, device=param.device)

        if self.exact_restore:
            if key not in self._base:
                if not active:
                    return
                self._base[key] = param.detach().to(self.backup_device, copy=True)
            total = self._base[key].to(param.device, torch.float32, copy=True)
            touched = False
            for entry, patch in active:
                d = delta(patch)
                if d is not None:
                    total += entry.strength * d
                    touched = True
            if not touched:  # nothing left on this parameter: restore the saved bits and drop the copy
                param.copy_(self._base.pop(key))
                return
            param.copy_(total.to(param.dtype))
            return
        # subtract/add mode: move from the strengths merged so far to the current ones
        merged = self._merged.setdefault(key, {})
        total = param.detach().float()
        changed = False
        wanted = {e.name: (e.strength, p) for e, p in active}
        for name, (strength, patch) in wanted.items():
            step = strength - merged.get(name, 0.0)
            d = delta(patch)
            if d is not None and step != 0.0:
                total += step * d
                merged[name] = strength
                changed = True
        if removed is not None and removed.name in merged:
            d = delta(removed.report.patches[module])
            total -= merged.pop(removed.name) * d
            changed = True
        if changed:
            param.copy_(total.to(param.dtype))

    def _refresh_hook(self, module: str) -> None:
        active = [e for e in self.entries if module in e.report.patches]
        if not active and module in self._hooks:
            self._hooks.pop(module).remove()
        elif active and module not in self._hooks:
            self._hooks[module] = self._modules[module].register_forward_hook(self._make_hook(module))

    def _make_hook(self, module: str):
        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            for entry in self.entries:
                patch = entry.report.patches.get(module)
                if patch is None or entry.strength == 0.0:
                    continue
                output = output + entry.strength * self._runtime_delta(entry, module, mod, patch, x)
            return output

        return hook

    def _runtime_delta(self, entry: _Entry, module: str, mod: nn.Module, patch: ModulePatch,
                       x: torch.Tensor) -> torch.Tensor:
        """``x @ delta_W^T + delta_b`` for one LoRA on one fp8 module, in the input's dtype."""
        key = (module, x.device, x.dtype)
        if key not in entry.cache:
            weight = self._params[f"{module}.weight"]
            low_rank = None
            full = None
            if weight.ndim == 2 and patch.changes_weight:   # LoRA, LoHa and LoKr as low-rank factors where exact
                low_rank, full = patch.low_rank_and_dense(weight.shape, device=x.device)
                low_rank = None if low_rank is None else (low_rank[0].to(x), low_rank[1].to(x))
                full = None if full is None else full.to(x.dtype)
            elif patch.changes_weight:  # conv weights: one dense delta
                full = patch.weight_delta(weight.shape, device=x.device).to(x.dtype)
            bias = None if patch.diff_b is None else patch.diff_b.to(x)
            entry.cache[key] = (low_rank, full, bias)
        low_rank, full, bias = entry.cache[key]
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if full is None:
                return bias.reshape([1, -1] + [1] * (x.ndim - 2))
            return mod._conv_forward(x, full, bias)
        out = F.linear(F.linear(x, low_rank[1]), low_rank[0]) if low_rank is not None else 0
        if full is not None:
            out = out + F.linear(x, full)
        if bias is not None:
            out = out + bias
        return out


def comfy_match_report(lora: LoraLike, applied: Iterable[str], *,
                       prefix: str = comfy_names.COMFY_PREFIX) -> MatchReport:
    """The :class:`MatchReport` of a LoRA whose :func:`comfy_patches` went through ComfyUI's ``add_patches``:
    ``applied`` are the keys it returned; modules none of whose parameters were applied count as absent."""
    state = as_lora(lora)
    applied = set(applied)
    absent = [module for module in state.modules
              if not any(f"{prefix}{comfy_names.to_comfy_key(f'{module}.{part}')}" in applied
                         for part in ("weight", "bias"))]
    return MatchReport(state, {m: p for m, p in state.modules.items() if m not in absent}, absent)


class ComfyPatch(NamedTuple):
    """One ModelPatcher patch. ``kind`` "lora": ``weights`` = ``(up, down, alpha, None, None, None)`` as ComfyUI's
    ``LoRAAdapter`` takes it (``alpha / rank`` = scale); "loha" / "lokr": the weights tuple of ComfyUI's
    ``LoHaAdapter`` / ``LoKrAdapter`` (:meth:`FactoredTerm.comfy_weights`); "diff": ``weights`` = ``(delta,)`` as
    in ``("diff", weights)``."""

    kind: str
    weights: tuple


def comfy_patches(lora: LoraLike, shapes: Mapping[str, torch.Size] | None = None, *,
                  prefix: str = comfy_names.COMFY_PREFIX, warn: bool = True) -> dict[str, ComfyPatch]:
    """A LoRA as ComfyUI patches keyed by ComfyUI internal parameter names
    (``diffusion_model.double_blocks.0.img_attn.qkv.weight``); strength is ModelPatcher's ``add_patches`` one.

    ``shapes``: the ComfyUI model's ``{key: shape}`` (``model.model.state_dict()``, internal names, any prefix).
    When given, the LoRA is matched against it like :func:`match` (error when nothing fits or a shape differs, one
    warning line for a partial match unless ``warn`` is False) and only patches for parameters the model has are
    returned.
    """
    state = as_lora(lora)
    modules = state.modules
    original: dict[str, torch.Size] = {}
    if shapes is not None:
        for key, shape in shapes.items():
            resolved = names.resolve_param(key, (f"model.{prefix}", prefix))
            if resolved is not None:
                original[resolved[0]] = shape
        modules = match(state, original, warn=warn).patches
    out: dict[str, ComfyPatch] = {}
    for module, patch in modules.items():
        weight_key = prefix + comfy_names.to_comfy_key(f"{module}.weight")
        terms = (patch.up is not None) + (patch.diff is not None) + len(patch.factored)
        if terms == 1 and patch.factored:  # ComfyUI computes LoHa / LoKr itself, the same way
            term = patch.factored[0]
            out[weight_key] = ComfyPatch(term.kind, term.comfy_weights())
        elif patch.diff is not None or patch.factored:  # several kinds of change on one weight: their sum
            shape = original.get(f"{module}.weight") or _stored_shape(patch)
            out[weight_key] = ComfyPatch("diff", (patch.weight_delta(shape),))
        elif patch.up is not None:
            out[weight_key] = ComfyPatch("lora", (patch.up, patch.down, patch.scale * patch.rank, None, None, None))
        if patch.diff_b is not None:
            out[prefix + comfy_names.to_comfy_key(f"{module}.bias")] = ComfyPatch("diff", (patch.diff_b,))
    return out


def _stored_shape(patch: ModulePatch) -> tuple[int, ...]:
    """A module's weight shape as far as the LoRA tells it (without the model): the diff's, the low-rank factors'
    (conv factors keep their kernel dims), else the matrix of the first LoHa / LoKr term."""
    if patch.diff is not None:
        return tuple(patch.diff.shape)
    if patch.up is not None:
        return (patch.up.shape[0], *patch.down.shape[1:])
    return patch.factored[0].matrix_shape
