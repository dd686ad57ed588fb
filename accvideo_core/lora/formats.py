"""Read HunyuanVideo LoRA files in every common format into one representation keyed by our module names.

Formats (detected per key, so mixed files work too):
- ComfyUI / diffusion-pipe: ``diffusion_model.`` or ``transformer.`` + original or ComfyUI-internal names,
  ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``, optional ``.alpha``;
- kohya / musubi-tuner / OneTrainer: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` (+ ``.alpha``);
- diffusers / PEFT: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``; parts of a fused original
  weight (q, k, v; the mlp rows of ``linear1``; the swapped halves of ``norm_out``) are placed into its rows;
  ``lora_alpha`` / ``r`` / ``alpha_pattern`` / ``use_rslora`` are read from diffusers' safetensors metadata;
- full differences: ``.diff`` (weight), ``.diff_b`` (bias), for any module in any of the namings above;
- LyCORIS LoHa (``.hada_w1_a`` ... ``.hada_w2_b``) and LoKr (``.lokr_w1`` or ``.lokr_w1_a/_b``, ``.lokr_w2`` or
  ``.lokr_w2_a/_b``), + ``.alpha``, in any of the namings above, with LyCORIS' and ComfyUI's scale rules
  (:class:`FactoredTerm`).

The result, :class:`LoraState`, maps each original module name (``double_blocks.0.img_attn_qkv``) to a
:class:`ModulePatch`: ``delta_W = scale * up @ down + diff + sum of factored terms`` and ``delta_b = diff_b``,
before the strength.
Every key of the file is accounted for: keys that could not be used are kept in ``LoraState.unused`` with the
reason, and reported in one line when the LoRA is applied.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import torch

from accvideo_core.models import key_maps
from accvideo_core.utils.io import read_metadata, read_state_dict

from . import names

# Key suffix -> role; longest first (".lora_A.default.weight" before ".lora_A.weight" ...).
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".dora_scale", "dora_scale"),
    *((f".{role}", role) for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                      "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2",
                                      "lokr_t2")),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
# File prefixes, dotted and underscored; tried in this order, and no prefix last: a checkpoint's own prefixes plus
# PEFT's and the SD-era "unet.".
_PREFIXES = (*key_maps.CHECKPOINT_PREFIXES, "base_model.model.", "unet.")
_UNDERSCORE_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")
_LYCORIS_MARKERS = (".oft_blocks", ".oft_diag", ".oft_R", ".boft_")
# down-factor suffix -> its up-factor suffix (both directions are looked up)
_FACTOR_PAIRS = {".lora_A.default.weight": ".lora_B.default.weight", ".lora_down.weight": ".lora_up.weight",
                 ".lora.down.weight": ".lora.up.weight", ".lora_A.weight": ".lora_B.weight"}
_FACTOR_PAIRS.update({up: down for down, up in list(_FACTOR_PAIRS.items())})
# Modules only Flux has (its plain-Linear patch / text embedders, original and diffusers names). Flux shares
# HunyuanVideo's block names and, at hidden 3072, every block shape, so these and its depth (19 double + 38 single
# blocks, HunyuanVideo has 20 + 40) are what tell a Flux LoRA apart.
_FLUX_ONLY = ("img_in", "txt_in", "x_embedder", "context_embedder")
_FLUX_DEPTH = (19, 38)
# Roles that make a module's change something this loader does not compute: the whole module is left out (its
# other keys too: applying its low-rank part alone would be a different change), with this reason.
_UNSUPPORTED = {"mid": "LoCon mid weights (Tucker conv factors) are not supported",
                "hada_t1": "LoHa Tucker conv factors (hada_t1 / hada_t2) are not supported",
                "hada_t2": "LoHa Tucker conv factors (hada_t1 / hada_t2) are not supported",
                "lokr_t2": "LoKr Tucker conv factors (lokr_t2) are not supported",
                "dora_scale": "DoRA is not supported (the magnitude vector rescales the whole weight; load this LoRA "
                              "with ComfyUI's native LoraLoaderModelOnly)"}
_LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class LoraFormatError(ValueError):
    """A LoRA file holds nothing this loader can apply to HunyuanVideo, or holds inconsistent tensors."""


@dataclass
class FactoredTerm:
    """A LyCORIS weight change that is not a low-rank product: LoHa or LoKr, as stored, with the file's alpha.

    - LoHa (``kind`` "loha"): ``delta_W = (w1_a @ w1_b) * (w2_a @ w2_b) * scale``, ``scale = alpha / rank(w1_b)``
      (1 without an alpha).
    - LoKr ("lokr"): ``delta_W = kron(w1, w2) * scale`` with ``w1 = w1`` or ``w1_a @ w1_b`` (same for ``w2``);
      ``scale = alpha / rank`` of the decomposed factor (``w2``'s when both are), 1 when neither factor is
      decomposed or there is no alpha.

    These are LyCORIS' and ComfyUI's rules (``comfy/weight_adapter/loha.py``, ``lokr.py``); conv factors are
    flattened to matrices (``w1_b`` / ``w2`` ``[r, in * kernel]``), which gives the same ``delta_W``.
    """

    kind: str
    factors: dict[str, torch.Tensor]
    alpha: float | None = None

    @property
    def label(self) -> str:
        return {"loha": "LoHa", "lokr": "LoKr"}[self.kind]

    @property
    def scale(self) -> float:
        f = self.factors
        if self.kind == "loha":
            rank = f["hada_w1_b"].shape[0]
        else:  # a factor stored whole is used whole (its _a / _b, if any, are ignored), as in ComfyUI
            rank = (f["lokr_w2_b"].shape[0] if "lokr_w2" not in f else
                    f["lokr_w1_b"].shape[0] if "lokr_w1" not in f else None)
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def _matrix(self, name: str, dtype: torch.dtype, device) -> torch.Tensor:
        """One factor matrix (``hada_w1``, ``lokr_w2`` ...): stored whole, else ``_a @ _b``."""
        def get(key: str) -> torch.Tensor:
            return self.factors[key].to(device=device, dtype=dtype).flatten(1)

        return get(name) if name in self.factors else get(f"{name}_a") @ get(f"{name}_b")

    def _dims(self, name: str) -> tuple[int, int]:
        """(rows, columns) of one factor matrix (``hada_w1``, ``lokr_w2`` ...), stored whole or as ``_a @ _b``."""
        f = self.factors
        if name in f:
            return f[name].shape[0], f[name].flatten(1).shape[1]
        return f[f"{name}_a"].shape[0], f[f"{name}_b"].flatten(1).shape[1]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, columns) of ``delta_W`` as a matrix."""
        if self.kind == "loha":
            return self._dims("hada_w1")
        (r1, c1), (r2, c2) = self._dims("lokr_w1"), self._dims("lokr_w2")
        return r1 * r2, c1 * c2

    def matrix(self, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """``delta_W`` as a ``[rows, columns]`` matrix (scale included)."""
        if self.kind == "loha":
            product = self._matrix("hada_w1", dtype, device) * self._matrix("hada_w2", dtype, device)
        else:
            product = torch.kron(self._matrix("lokr_w1", dtype, device), self._matrix("lokr_w2", dtype, device))
        return product * self.scale

    def _pair(self, name: str, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """One factor matrix as ``(a, b)`` with ``a @ b`` equal to it: as stored, or a whole matrix times an
        identity on its smaller side."""
        f = self.factors
        if name not in f:
            return (f[f"{name}_a"].to(device=device, dtype=dtype).flatten(1),
                    f[f"{name}_b"].to(device=device, dtype=dtype).flatten(1))
        whole = f[name].to(device=device, dtype=dtype).flatten(1)
        rows, cols = whole.shape
        eye = torch.eye(min(rows, cols), device=device, dtype=dtype)
        return (eye, whole) if rows <= cols else (whole, eye)

    def low_rank(self, *, dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up, down)`` with ``up @ down`` exactly ``delta_W`` (scale in ``up``), when that rank is cheaper than
        the dense matrix (``rank * (rows + cols) < rows * cols``), else None. LoHa: ``(A1 B1) * (A2 B2)`` is
        ``(A1 . A2)(B1 . B2)`` with the row-wise / column-wise Kronecker products (rank r1 r2); LoKr:
        ``kron(A1 B1, A2 B2) = kron(A1, A2) kron(B1, B2)``."""
        (a1, b1), (a2, b2) = (self._pair(n, dtype, device) for n in (
            ("hada_w1", "hada_w2") if self.kind == "loha" else ("lokr_w1", "lokr_w2")))
        rows, cols = self.matrix_shape
        rank = a1.shape[1] * a2.shape[1]
        if rank * (rows + cols) >= rows * cols:
            return None
        if self.kind == "loha":
            up = (a1[:, :, None] * a2[:, None, :]).reshape(rows, rank)
            down = (b1[:, None, :] * b2[None, :, :]).reshape(rank, cols)
        else:
            up, down = torch.kron(a1, a2), torch.kron(b1, b2)
        return up * self.scale, down

    def check(self, module: str) -> None:
        """Raise :class:`LoraFormatError` when the factors do not multiply (a broken file)."""
        f = self.factors
        for name in ("hada_w1", "hada_w2") if self.kind == "loha" else ("lokr_w1", "lokr_w2"):
            if name not in f and f[f"{name}_a"].shape[1] != f[f"{name}_b"].shape[0]:
                raise LoraFormatError(f"{module}: {name}_a has rank {f[f'{name}_a'].shape[1]} but {name}_b "
                                      f"{f[f'{name}_b'].shape[0]}")
        if self.kind == "loha" and self._dims("hada_w1") != self._dims("hada_w2"):
            raise LoraFormatError(f"{module}: the two LoHa products are {self._dims('hada_w1')} and "
                                  f"{self._dims('hada_w2')}; they must have the same shape")

    def comfy_weights(self) -> tuple:
        """The weights tuple of ComfyUI's ``LoHaAdapter`` / ``LoKrAdapter`` (the same alpha rule)."""
        f = self.factors
        if self.kind == "loha":
            return (f["hada_w1_a"], f["hada_w1_b"], self.alpha, f["hada_w2_a"], f["hada_w2_b"], None, None, None)
        return (f.get("lokr_w1"), f.get("lokr_w2"), self.alpha, f.get("lokr_w1_a"), f.get("lokr_w1_b"),
                f.get("lokr_w2_a"), f.get("lokr_w2_b"), None, None)


@dataclass
class ModulePatch:
    """The change a LoRA makes to one module: ``delta_W = scale * up @ down + diff + sum(factored)``,
    ``delta_b = diff_b``.

    ``up`` is ``[out, r(, 1, ...)]`` and ``down`` ``[r, in(, kernel...)]`` as stored (conv factors keep their
    kernel dims); both are flattened to matrices for the product. ``factored``: LoHa / LoKr terms.
    """

    module: str
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    scale: float = 1.0
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    factored: list[FactoredTerm] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    @property
    def changes_weight(self) -> bool:
        return self.up is not None or self.diff is not None or bool(self.factored)

    def add_low_rank(self, up: torch.Tensor, down: torch.Tensor, scale: float) -> None:
        """Add a low-rank term; several terms are concatenated along the rank (scales folded into ``up``)."""
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(f"{self.module}: lora_up has rank {up.shape[1]} but lora_down {down.shape[0]}")
        if self.up is None:
            self.up, self.down, self.scale = up, down, scale
            return
        if self.down.flatten(1).shape[1] != down.flatten(1).shape[1]:
            raise LoraFormatError(f"{self.module}: low-rank terms with different input sizes")
        self.up = torch.cat((self.up.flatten(1).float() * self.scale, up.flatten(1).float() * scale), dim=1)
        self.down = torch.cat((self.down.flatten(1).float(), down.flatten(1).float()), dim=0)
        self.scale = 1.0

    def add_diff(self, diff: torch.Tensor | None, diff_b: torch.Tensor | None) -> None:
        if diff is not None:
            self.diff = diff if self.diff is None else self.diff.float() + diff.float()
        if diff_b is not None:
            self.diff_b = diff_b if self.diff_b is None else self.diff_b.float() + diff_b.float()

    def check_shapes(self, weight: torch.Size | tuple[int, ...], bias: torch.Size | tuple[int, ...] | None) -> None:
        """Raise :class:`LoraFormatError` unless this patch fits a module with these weight / bias shapes."""
        self._check_weight(weight)
        if self.diff_b is not None:
            if bias is None:
                raise LoraFormatError(f"{self.module}: the LoRA has a diff_b but the model's module has no bias")
            if tuple(self.diff_b.shape) != tuple(bias):
                raise LoraFormatError(f"{self.module}: diff_b is {tuple(self.diff_b.shape)} but the bias is "
                                      f"{tuple(bias)}; the LoRA was made for a different model")

    def _check_weight(self, weight: torch.Size | tuple[int, ...]) -> None:
        if self.up is not None:
            rows, cols = self.up.shape[0], self.down.flatten(1).shape[1]
            if rows != weight[0] or rows * cols != math.prod(weight):
                raise LoraFormatError(
                    f"{self.module}: LoRA product is {rows}x{cols} but the weight is {tuple(weight)}; "
                    "the LoRA was made for a different model"
                )
        if self.diff is not None and tuple(self.diff.shape) != tuple(weight):
            raise LoraFormatError(
                f"{self.module}: diff is {tuple(self.diff.shape)} but the weight is {tuple(weight)}; "
                "the LoRA was made for a different model"
            )
        for term in self.factored:
            rows, cols = term.matrix_shape
            if rows != weight[0] or rows * cols != math.prod(weight):
                raise LoraFormatError(
                    f"{self.module}: the {term.label} change is {rows}x{cols} but the weight is "
                    f"{tuple(weight)}; the LoRA was made for a different model"
                )

    def weight_delta(self, shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor | None:
        """``scale * up @ down + diff + sum(factored)`` shaped like the weight, or None when the patch has no
        weight change."""
        dense = self._dense_part(shape, self.factored, dtype=dtype, device=device)
        if self.up is None:
            return dense
        up = self.up.to(device=device, dtype=dtype).flatten(1)
        down = self.down.to(device=device, dtype=dtype).flatten(1)
        delta = (up @ down).reshape(shape) * self.scale
        return delta if dense is None else delta + dense

    def low_rank_and_dense(self, shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None
                           ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """The weight change as one ``(up, down)`` pair (scale in ``up``; the low-rank term and every LoHa / LoKr
        term with a cheaper exact factorization, concatenated along the rank) plus a dense rest (``diff`` and
        the other terms), each None when empty. For matrices (``[out, in]`` weights)."""
        pairs = [(term, term.low_rank(dtype=dtype, device=device)) for term in self.factored]
        ups = [pair[0] for _, pair in pairs if pair is not None]
        downs = [pair[1] for _, pair in pairs if pair is not None]
        if self.up is not None:
            ups.insert(0, self.up.to(device=device, dtype=dtype).flatten(1) * self.scale)
            downs.insert(0, self.down.to(device=device, dtype=dtype).flatten(1))
        dense = self._dense_part(shape, [term for term, pair in pairs if pair is None], dtype=dtype, device=device)
        return ((torch.cat(ups, 1), torch.cat(downs, 0)) if ups else None), dense

    def _dense_part(self, shape: torch.Size | tuple[int, ...], terms: list[FactoredTerm], *, dtype: torch.dtype,
                    device: torch.device | str | None) -> torch.Tensor | None:
        """``diff`` plus the given LoHa / LoKr terms as weight-shaped matrices, or None when there is neither."""
        self._check_weight(shape)
        delta = None if self.diff is None else self.diff.to(device=device, dtype=dtype)
        for term in terms:
            part = term.matrix(dtype=dtype, device=device).reshape(shape)
            delta = part if delta is None else delta + part
        return delta

    def bias_delta(self, shape: torch.Size | tuple[int, ...], *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor | None:
        """``diff_b`` (bias change) or None."""
        if self.diff_b is None:
            return None
        if tuple(self.diff_b.shape) != tuple(shape):
            raise LoraFormatError(f"{self.module}: diff_b is {tuple(self.diff_b.shape)} but the bias is {tuple(shape)}")
        return self.diff_b.to(device=device, dtype=dtype)


@dataclass
class LoraState:
    """A LoRA normalised onto our (original HunyuanVideo) module names."""

    modules: dict[str, ModulePatch]
    format: str
    source: str
    total_keys: int
    unused: dict[str, str] = field(default_factory=dict)  # key -> why it cannot be used

    def example_keys(self, n: int = 3) -> list[str]:
        keys = [k for p in self.modules.values() for k in p.keys] or list(self.unused)
        return keys[:n]


@dataclass
class _Group:
    """The keys of one module name in the file (before mapping onto our modules)."""

    name: str
    target: names.Target
    naming: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key


def _suffix(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (body, suffix, role) when the suffix is known."""
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix, role
    return None


def _unprefixed(body: str) -> list[tuple[str, str]]:
    """(prefix, rest) for every file prefix ``body`` carries, and ("", body) last."""
    return [(p, body[len(p):]) for p in (*_PREFIXES, *_UNDERSCORE_PREFIXES) if body.startswith(p)] + [("", body)]


def _split_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (prefix, module name, role) when the suffix is known and the module resolves."""
    parsed = _suffix(key)
    if parsed is None:
        return None
    body, _, role = parsed
    for prefix, rest in _unprefixed(body):
        if names.resolve(rest) is not None:
            return prefix, rest, role
    return None


def _flux_evidence(unusable: list[str], modules: Mapping[str, "ModulePatch"]) -> str | None:
    """Why a LoRA is a Flux LoRA (Flux-only module keys, or exactly Flux's block depth); None when nothing says so."""
    flux_keys = [k for k in unusable if (parsed := _suffix(k))
                 and any(rest in _FLUX_ONLY for _, rest in _unprefixed(parsed[0]))]
    if flux_keys:
        return f"it changes modules only Flux has, e.g. {flux_keys[:3]}"
    depth = tuple({int(m.split(".")[1]) for m in modules if m.startswith(f"{block_list}.")}
                  for block_list in (names.DOUBLE_LIST, names.SINGLE_LIST))
    if depth == tuple(set(range(n)) for n in _FLUX_DEPTH):
        return (f"it covers exactly Flux's {_FLUX_DEPTH[0]} double + {_FLUX_DEPTH[1]} single blocks (HunyuanVideo has "
                "20 + 40)")
    return None


_LONE = " factor"  # ending of the reason given to a factor key whose partner is missing


def _partner(key: str) -> str | None:
    """The other factor's key of a low-rank factor key (``...lora_down.weight`` -> ``...lora_up.weight``)."""
    parsed = _suffix(key)
    return None if parsed is None or parsed[1] not in _FACTOR_PAIRS else parsed[0] + _FACTOR_PAIRS[parsed[1]]


def _lone_reason(key: str) -> str:
    """Why a key of an incomplete module is unusable."""
    role = _suffix(key)[2]
    if role in ("up", "down"):
        return f"{role} factor without its {'up' if role == 'down' else 'down'}{_LONE}"
    return f"{role} without the module's lora_up / lora_down factors"


def _format_label(prefixes: set[str], namings: set[str]) -> str:
    if prefixes & set(_UNDERSCORE_PREFIXES):
        return "kohya/musubi-tuner"
    if "diffusers" in namings:
        return "diffusers/PEFT"
    if "transformer." in prefixes:
        return "diffusion-pipe"
    if prefixes & {"diffusion_model.", "model.diffusion_model."}:
        return "ComfyUI"
    return "unprefixed"


def guess_format(keys: list[str]) -> str:
    """A label for files nothing could be read from (used in error messages): prefix style + factor names."""
    if any(k.startswith(_UNDERSCORE_PREFIXES) for k in keys):
        style = "kohya-style (lora_unet_ prefix)"
    elif any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        style = "ComfyUI-style (diffusion_model. prefix)"
    elif any(k.startswith("transformer.") for k in keys):
        style = "diffusers/diffusion-pipe-style (transformer. prefix)"
    else:
        style = "unknown prefix"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return f"{style}, lora_A/lora_B"
    if any(".lora_down." in k or ".lora_up." in k for k in keys):
        return f"{style}, lora_down/lora_up"
    return style


def _peft_config(metadata: Mapping[str, str] | None) -> dict:
    """diffusers' ``lora_adapter_metadata`` (JSON with ``transformer.`` keys), unprefixed; {} when absent."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    try:
        raw = json.loads(metadata["lora_adapter_metadata"])
    except json.JSONDecodeError:
        return {}
    return {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in raw.items()}


def _peft_scale(config: dict, file_name: str, rank: int) -> float | None:
    """PEFT scale for one module from the adapter config, None when the config has no alpha."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if file_name == pattern or file_name.endswith(f".{pattern}"):
            alpha = value
    if alpha is None:
        return None
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of a LoRA file (pickles: weights only, no metadata)."""
    return read_state_dict(path), read_metadata(path)


def load_lora(lora: str | os.PathLike | Mapping[str, torch.Tensor], *,
              metadata: Mapping[str, str] | None = None, source: str | None = None) -> LoraState:
    """Read a LoRA (file path or ``{key: tensor}``) into a :class:`LoraState`.

    Raises :class:`LoraFormatError` when no key can be used, naming the detected format and example keys.
    """
    if isinstance(lora, Mapping):
        tensors, source = dict(lora), source or "<state dict>"
    else:
        tensors, file_meta = read_lora_file(lora)
        metadata, source = metadata or file_meta, source or str(lora)
    peft = _peft_config(metadata)

    groups: dict[str, _Group] = {}
    unused: dict[str, str] = {}
    for key, tensor in tensors.items():
        parsed = _split_key(key)
        if parsed is None:
            if any(m in key for m in _LYCORIS_MARKERS):
                unused[key] = "LyCORIS OFT / BOFT is not supported"
            elif key.startswith(("lora_te", "text_encoder", "text_encoders.", "te_")):
                unused[key] = "text-encoder key (not part of the transformer)"
            else:
                unused[key] = "not a HunyuanVideo LoRA key"
            continue
        prefix, name, role = parsed
        group = groups.get(prefix + name)
        if group is None:
            group = groups[prefix + name] = _Group(name, names.resolve(name), names.naming_of(name))
            group.keys["prefix"] = prefix
        group.tensors[role] = tensor
        group.keys[role] = key

    modules: dict[str, ModulePatch] = {}
    prefixes: set[str] = set()
    namings: set[str] = set()
    kinds: set[str] = set()
    for group in groups.values():
        role_keys = {r: k for r, k in group.keys.items() if r != "prefix"}
        problems = _group_problems(group.tensors, role_keys)
        if problems:
            unused.update(problems)
            continue
        try:
            _add_group(group, modules, peft)
        except LoraFormatError as err:
            raise LoraFormatError(f"{source}: {err}") from None
        prefixes.add(group.keys["prefix"])
        namings.add(group.naming)
        kinds.update(term.label for term in modules[group.target.module].factored)
        modules[group.target.module].keys.extend(role_keys.values())

    _refuse_unusable(source, tensors, unused, modules)
    label = _format_label(prefixes, namings) + (f", LyCORIS {'/'.join(sorted(kinds))}" if kinds else "")
    return LoraState(modules, label, source, len(tensors), unused)


def _refuse_unusable(source: str, tensors: Mapping[str, torch.Tensor], unused: Mapping[str, str],
                     modules: Mapping[str, ModulePatch]) -> None:
    """Raise :class:`LoraFormatError` for a Flux LoRA, a LoRA whose factors are missing, or one with no usable key."""
    flux = _flux_evidence(list(unused), modules)
    if flux:
        raise LoraFormatError(
            f"{source}: this is a Flux LoRA, not a HunyuanVideo one: {flux}. Flux shares HunyuanVideo's block names "
            "and sizes, so its block keys would load without an error and change the model meaninglessly; use a "
            "LoRA trained on HunyuanVideo."
        )
    missing = [p for k, why in unused.items() if why.endswith(_LONE) and (p := _partner(k)) and p not in tensors]
    if not modules and missing:
        raise LoraFormatError(
            f"{source}: every low-rank module of this LoRA lacks one of its two factors: {len(missing)} factor keys "
            f"are missing, e.g. {missing[:3]} (each lora_down / lora_A needs its lora_up / lora_B and the reverse). The file is "
            "incomplete (interrupted download or a broken export): get it again or re-export it."
        )
    if not modules:
        keys = list(tensors)
        raise LoraFormatError(
            f"{source}: no key of this LoRA belongs to a HunyuanVideo transformer (detected format: "
            f"{guess_format(keys)}; {len(keys)} keys, e.g. {keys[:3]}). Expected keys such as "
            "'diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight', "
            "'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight' or "
            "'transformer.transformer_blocks.0.attn.to_q.lora_A.weight'; a LoRA for another model "
            "(Wan, Flux, SD) cannot be used with HunyuanVideo."
        )


def _group_problems(tensors: Mapping[str, torch.Tensor], role_keys: Mapping[str, str]) -> dict[str, str]:
    """Why the keys of one module's group cannot be used (key -> reason); empty when the group is complete."""
    for role, why in _UNSUPPORTED.items():
        if role in tensors:  # the whole module: its other terms alone would be a different change
            return {k: why for k in role_keys.values()}
    loha = [r for r in _LOHA_ROLES if r in tensors]
    if loha and len(loha) < len(_LOHA_ROLES):
        why = f"incomplete LoHa (has {', '.join(loha)}; needs {', '.join(_LOHA_ROLES)})"
        return {k: why for k in role_keys.values()}
    lokr = [r for r in _LOKR_ROLES if r in tensors]
    if lokr and not all(f"lokr_w{i}" in tensors or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(tensors) for i in (1, 2)):
        why = f"incomplete LoKr (has {', '.join(lokr)}; needs lokr_w1 or lokr_w1_a + lokr_w1_b, and the same for w2)"
        return {k: why for k in role_keys.values()}
    up, down = tensors.get("up"), tensors.get("down")
    if (up is None) != (down is None) or not (up is not None or loha or lokr or "diff" in tensors
                                              or "diff_b" in tensors):
        return {k: _lone_reason(k) for k in role_keys.values()}
    return {}


def _add_group(group: _Group, modules: dict[str, ModulePatch], peft: dict) -> None:
    """Fold one complete file group (see :func:`_group_problems`) into ``modules``."""
    t = group.tensors
    up, down = t.get("up"), t.get("down")
    target = group.target
    patch = modules.setdefault(target.module, ModulePatch(target.module))
    if up is not None:
        rank = int(down.shape[0])
        if "alpha" in t:
            scale = float(t["alpha"].item()) / rank
        else:
            peft_scale = _peft_scale(peft, group.name, rank) if peft else None
            scale = 1.0 if peft_scale is None else peft_scale
        if target.units is None:
            patch.add_low_rank(up, down, scale)
        else:
            patch.add_low_rank(_place(target, up.flatten(1).float() * scale, group.name), down, 1.0)
    diff = t.get("diff")
    diff_b = t.get("diff_b")
    if target.units is not None:
        diff = None if diff is None else _place(target, diff.float(), group.name)
        diff_b = None if diff_b is None else _place(target, diff_b.float(), group.name)
    patch.add_diff(diff, diff_b)
    for kind, roles in (("loha", _LOHA_ROLES), ("lokr", _LOKR_ROLES)):
        if any(r in t for r in roles):
            term = FactoredTerm(kind, {r: t[r] for r in roles if r in t},
                                float(t["alpha"].item()) if "alpha" in t else None)
            term.check(target.module)
            if target.units is None:
                patch.factored.append(term)
            else:  # a diffusers part of a fused weight: its rows, placed
                patch.add_diff(_place(target, term.matrix(), group.name), None)


def _place(target: names.Target, part: torch.Tensor, name: str) -> torch.Tensor:
    """Rows of one diffusers part placed into a zero tensor of the whole original module's rows."""
    n_units = len(target.units)
    if part.shape[0] % n_units:
        raise LoraFormatError(f"{name}: {part.shape[0]} rows do not split into {n_units} equal parts")
    per_unit = part.shape[0] // n_units
    full = part.new_zeros((per_unit * target.total_units, *part.shape[1:]))
    for dst, src in target.place_rows(per_unit):
        full[dst] = part[src]
    return full
