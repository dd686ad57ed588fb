"""Trainable low-rank adapters on a frozen model (the trainer's LoRA mode): one copy of the base is both models.

:func:`add_adapters` turns the targeted ``nn.Linear`` layers into :class:`LoraLinear`: the same ``weight`` /
``bias`` parameters (so the state dict keeps the original layout) plus ``lora_down`` ``[r, in]`` and ``lora_up``
``[out, r]`` (fp32 master weights), ``y = x W^T + b + (alpha / r) (x down^T) up^T``. ``lora_up`` starts at zero
(the adapted model starts as the base) and ``lora_down`` Kaiming-uniform, as PEFT initialises them.
``with adapters.disabled():`` runs the frozen base (the teacher, the discriminator's backbone).

Gradient checkpointing recomputes a block during the backward pass, possibly after the switch changed (the
adversarial loss has adapter-on and adapter-off passes in one graph): the model's ``checkpoint_context_fn`` is set
so that a recompute sees the switch as it was during that block's forward (``torch.utils.checkpoint``'s
``context_fn``).

FSDP2: the adapters are parameters of the blocks they adapt, so ``fully_shard(block)`` shards them together with
the block's frozen base (one all-gather per block); only they receive gradients, reduce-scattered per block.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .extract import _low_rank
from .formats import LoraFormatError, LoraState, ModulePatch

DOWN, UP = "lora_down", "lora_up"


class AdapterSwitch:
    """On/off state shared by all adapters of one model."""

    __slots__ = ("enabled",)

    def __init__(self) -> None:
        self.enabled = True


class LoraLinear(nn.Linear):
    """``nn.Linear`` with a low-rank adapter added to its output while the model's switch is on."""

    lora_down: nn.Parameter
    lora_up: nn.Parameter
    lora_scale: float
    lora_switch: AdapterSwitch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)   # the base layer's own forward (an fp8-stored base up-casts its weight there)
        if not self.lora_switch.enabled:
            return y
        low = F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return y + low * self.lora_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.lora_down.shape[0]}, lora_scale={self.lora_scale:g}"


_LORA_CLASSES: dict[type, type] = {nn.Linear: LoraLinear}


def lora_class(base: type) -> type:
    """The adapter class for a linear layer class: :class:`LoraLinear` over ``nn.Linear``, ``Lora<Base>`` over a
    subclass (e.g. the fp8-stored ``FP8Linear``), whose ``forward`` runs the base class's before the adapter."""
    if issubclass(base, LoraLinear):   # adapted before: new adapters replace the old ones
        return base
    if base not in _LORA_CLASSES:
        _LORA_CLASSES[base] = type(f"Lora{base.__name__}", (LoraLinear, base), {})
    return _LORA_CLASSES[base]


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict / parameter name is an adapter factor (``...lora_down`` / ``...lora_up``)."""
    return key.endswith((f".{DOWN}", f".{UP}"))


def target_names(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules matching any fnmatch pattern (``double_blocks.*``); a pattern that
    matches no linear layer is an error."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not patterns:
        raise ValueError("no LoRA targets given; e.g. ['double_blocks.*', 'single_blocks.*']")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            raise ValueError(f"LoRA target {pattern!r} matches no linear layer of this model; linear layers are "
                             f"named like {linears[:2] + linears[-2:]} (fnmatch patterns, e.g. 'double_blocks.*')")
    return [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


@dataclass
class LoraAdapters:
    """Handle on the adapters of one model."""

    model: nn.Module
    names: list[str]
    rank: int
    alpha: float
    targets: tuple[str, ...]
    switch: AdapterSwitch

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def parameters(self) -> list[nn.Parameter]:
        """The trainable factors (read from the model, so they are FSDP2's sharded parameters after sharding)."""
        return [p for n, p in self.model.named_parameters() if is_adapter_key(n)]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the frozen base (teacher): adapters off inside the block, restored after."""
        with self._forced(False):
            yield

    @contextlib.contextmanager
    def _forced(self, enabled: bool) -> Iterator[None]:
        before = self.switch.enabled
        self.switch.enabled = enabled
        try:
            yield
        finally:
            self.switch.enabled = before

    def checkpoint_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for ``torch.utils.checkpoint``: the recompute runs with the forward's switch state."""
        return contextlib.nullcontext(), self._forced(self.switch.enabled)

    @torch.no_grad()
    def reset(self, seed: int) -> None:
        """``lora_up`` = 0, ``lora_down`` Kaiming-uniform (a = sqrt(5), as ``nn.Linear`` and PEFT), drawn on the
        CPU from ``seed`` in name order (the same values on every machine)."""
        gen = torch.Generator().manual_seed(seed)
        for name in self.names:
            mod = self.model.get_submodule(name)
            down = torch.empty(mod.lora_down.shape)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=gen)
            mod.lora_down.copy_(down)
            mod.lora_up.zero_()

    @torch.no_grad()
    def load_lora(self, state: LoraState, seed: int) -> dict[str, list[str]]:
        """Start from an existing LoRA: every targeted module's change ``delta_W`` becomes the adapter.

        A low-rank patch of rank <= r without a full difference is copied exactly (the remaining rank directions
        keep ``lora_up`` = 0 and a random ``lora_down``, so they train); otherwise the best rank-r approximation
        of ``delta_W`` (SVD). Returns what could not be represented: ``{"untargeted": modules, "bias": modules}``.
        Raises :class:`LoraFormatError` when the LoRA does not fit this model (shapes) or touches no target.
        """
        self.reset(seed)
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters() if not is_adapter_key(n)}
        dropped: dict[str, list[str]] = {"untargeted": [], "bias": []}
        used = 0
        for module, patch in state.modules.items():
            weight = shapes.get(f"{module}.weight")
            if weight is None:
                raise LoraFormatError(f"{state.source}: module {module} is not part of this model; the LoRA was "
                                      "made for a different model")
            patch.check_shapes(weight, shapes.get(f"{module}.bias"))
            if module not in self.names:
                dropped["untargeted"].append(module)
                continue
            if patch.diff_b is not None:
                dropped["bias"].append(module)
            if not patch.changes_weight:
                continue
            self._set_from_patch(self.model.get_submodule(module), patch, weight)
            used += 1
        if not used:
            raise LoraFormatError(f"{state.source}: none of its {len(state.modules)} modules is a LoRA target "
                                  f"({list(self.targets)}), e.g. {list(state.modules)[:3]}")
        return dropped

    def _set_from_patch(self, mod: LoraLinear, patch: ModulePatch, shape: tuple[int, ...]) -> None:
        r = self.rank
        if patch.diff is None and not patch.factored and patch.rank <= r:
            k = patch.rank
            up = patch.up.flatten(1).float() * (patch.scale / self.scale)
            down = patch.down.flatten(1).float()
        else:
            up, down = _low_rank(patch.weight_delta(shape).float(), r, "auto")
            norms = down.norm(dim=1)  # sqrt of the singular values, descending
            k = int((norms > norms[0] * 1e-3).sum()) if float(norms[0]) > 0 else 0
            up, down = up[:, :k] / self.scale, down[:k]
        mod.lora_up.zero_()
        mod.lora_up[:, :k].copy_(up)
        mod.lora_down[:k].copy_(down)  # directions k..r keep their random init and a zero lora_up


def add_adapters(model: nn.Module, *, rank: int, targets: tuple[str, ...] | list[str], alpha: float | None = None,
                 seed: int = 0) -> LoraAdapters:
    """Freeze ``model`` and add rank-``rank`` adapters (fp32) to the linear layers matching ``targets``.

    ``alpha`` defaults to ``rank`` (scale 1). Works on the meta device too (values then come from a state dict).
    Sets ``model.checkpoint_context_fn`` when the model has that attribute (HunyuanVideoTransformer3D).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    names = target_names(model, tuple(targets))
    too_small = [(n, tuple(model.get_submodule(n).weight.shape)) for n in names
                 if rank > min(model.get_submodule(n).weight.shape)]
    if too_small:
        name, shape = min(too_small, key=lambda item: min(item[1]))
        raise ValueError(f"LoRA rank {rank} exceeds the smaller dimension of {len(too_small)} target layer(s), "
                         f"e.g. {name} {shape[0]}x{shape[1]}: use a rank <= {min(shape)} or leave such layers out "
                         "of the targets")
    model.requires_grad_(False)
    switch = AdapterSwitch()
    for name in names:
        mod = model.get_submodule(name)
        out_f, in_f = mod.weight.shape
        mod.__class__ = lora_class(type(mod))
        dev = mod.weight.device
        mod.register_parameter(DOWN, nn.Parameter(torch.zeros(rank, in_f, device=dev)))
        mod.register_parameter(UP, nn.Parameter(torch.zeros(out_f, rank, device=dev)))
        mod.lora_scale = alpha / rank
        mod.lora_switch = switch
    adapters = LoraAdapters(model, names, rank, alpha, tuple(targets), switch)
    if hasattr(model, "checkpoint_context_fn"):
        model.checkpoint_context_fn = adapters.checkpoint_context
    if not any(p.is_meta for p in adapters.parameters()):
        adapters.reset(seed)
    return adapters


def merged_weight(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + scale * up @ down`` computed in fp32 and rounded once to W's dtype."""
    return torch.addmm(weight.float(), up.float(), down.float(), alpha=scale).to(weight.dtype)


def merge_adapters(state: Mapping[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A full state dict of an adapted model -> the merged model in original layout (:func:`merged_weight`), all
    tensors at once: public (docs/lora.md) for baking trained adapters in; the trainer's own export streams
    :func:`merged_weight` per tensor instead, and the tests use this as the whole-dict merge."""
    out = {k: v for k, v in state.items() if not is_adapter_key(k)}
    for module, (up, down) in adapter_factors(state).items():
        out[f"{module}.weight"] = merged_weight(out[f"{module}.weight"], up, down, scale)
    return out


def adapter_factors(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (up, down)}`` from a state dict holding adapter factors."""
    return {key[: -len(DOWN) - 1]: (state[key[: -len(DOWN) - 1] + f".{UP}"], state[key])
            for key in state if key.endswith(f".{DOWN}")}
