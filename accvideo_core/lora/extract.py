"""Extract a LoRA from two HunyuanVideo checkpoints (e.g. the AccVideo 5-step model minus the base model).

Per parameter, streamed one tensor pair at a time from the two files (never two whole models in memory):
- linear / conv weights: truncated SVD of ``tuned - base`` -> ``lora_up`` = U sqrt(S), ``lora_down`` = sqrt(S) V^T,
  ``alpha`` = rank; when the rank is so high that the factors would be larger than the matrix, the exact
  difference is written as ``.diff`` instead;
- norm weights: ``.diff``; biases: ``.diff_b``; unchanged tensors: nothing.

Keys are written as ``diffusion_model.<name>`` with the original name where ComfyUI's native LoRA loader accepts
it and ComfyUI's internal name otherwise (``time_in``, ``guidance_in``, ``txt_in.t_embedder``,
``txt_in.c_embedder``), so native ``LoraLoaderModelOnly`` and our loader both load every key.

q/k RMSNorm scales (``qk_norms``): "comfy" (default) writes them as ``diffusion_model.<...>.norm.query_norm.scale.diff``,
which ComfyUI 0.3.64 loads and applies when it loads the model fully (measured, see docs/lora.md); "original"
writes ``diffusion_model.<...>.img_attn_q_norm.diff`` (our loader only; native ComfyUI reports "lora key not
loaded"); "skip" leaves them out and reports their size.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch

from accvideo_core.models import key_maps
from accvideo_core.utils.dtypes import dtype_name
from accvideo_core.utils.io import CheckpointError, LazyCheckpoint, save_safetensors

from . import comfy_names, names

QK_NORM_MODES = ("comfy", "original", "skip")
Progress = Callable[[int, int, str], None]


@dataclass
class LayerResult:
    key: str  # original parameter key
    written: str  # "lora" | "diff" | "diff_b" | "skipped" | "unchanged"
    rank: int = 0
    rel_error: float = 0.0  # ||D - up @ down||_F / ||D||_F (0 for exact diffs)
    rel_change: float = 0.0  # ||D||_F / ||base||_F


@dataclass
class ExtractResult:
    tensors: dict[str, torch.Tensor]
    layers: list[LayerResult] = field(default_factory=list)
    path: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)  # what :meth:`save` writes besides the summary

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
        """Write the LoRA atomically (``overwrite=False``: ``FileExistsError`` instead of replacing a file)."""
        info = json.loads(self.metadata.get("accvideo_lora", "{}"))
        meta = {**self.metadata, "accvideo_lora": json.dumps({**info, **self.summary()})}
        self.path = save_safetensors(self.tensors, path, metadata=meta, overwrite=overwrite)
        return self.path

    def summary(self) -> dict:
        low_rank = [l for l in self.layers if l.written == "lora"]
        skipped = [l for l in self.layers if l.written == "skipped"]
        return {
            "tensors": len(self.tensors),
            "low_rank_layers": len(low_rank),
            "diff_layers": sum(l.written in ("diff", "diff_b") for l in self.layers),
            "unchanged": sum(l.written == "unchanged" for l in self.layers),
            "mean_rel_error": sum(l.rel_error for l in low_rank) / max(len(low_rank), 1),
            "max_rel_error": max((l.rel_error for l in low_rank), default=0.0),
            "skipped_qk_norms": len(skipped),
            "skipped_max_rel_change": max((l.rel_change for l in skipped), default=0.0),
        }


class WeightSource:
    """Lazy, per-tensor access to a transformer checkpoint in original, ComfyUI or diffusers layout, by original
    parameter keys. Safetensors are read tensor by tensor; pickles are memory-mapped (weights only). ComfyUI
    "fp8_scaled" weights are read de-scaled (``fp8 * scale_weight``, as ``load_transformer`` does), in bf16."""

    def __init__(self, source: str | os.PathLike | Mapping[str, torch.Tensor], stack: contextlib.ExitStack):
        self.name = "<state dict>" if isinstance(source, Mapping) else Path(source).name
        if isinstance(source, Mapping):
            get, keys = source.__getitem__, list(source)
            meta = None
        else:
            reader = stack.enter_context(LazyCheckpoint(source))
            get, keys, meta = reader.get, reader.keys(), reader.shape_dtype
        self._get = get
        self._meta = meta or (lambda k: (tuple(get(k).shape), get(k).dtype))
        # original key -> [(file key, target)] (several parts for diffusers' split q/k/v)
        self.parts: dict[str, list[tuple[str, names.Target]]] = {}
        self.scales: dict[str, str] = {}  # original weight key -> file key of its fp8 scale
        for key in keys:
            scaled = key.endswith(".scale_weight")
            resolved = names.resolve_param(key.removesuffix(".scale_weight") + ".weight" if scaled else key,
                                           key_maps.CHECKPOINT_PREFIXES)
            if resolved is not None and scaled:
                self.scales[resolved[0]] = key
            elif resolved is not None:
                original_key, target = resolved
                self.parts.setdefault(original_key, []).append((key, target))
        if not self.parts:
            raise CheckpointError(
                f"{self.name}: no HunyuanVideo transformer weights found (e.g. {keys[:3]}); expected a transformer "
                "checkpoint in original, ComfyUI or diffusers layout"
            )

    def keys(self) -> list[str]:
        return list(self.parts)

    def get(self, key: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One parameter in original layout, as ``dtype`` (None: as stored)."""
        parts = self.parts[key]
        if key in self.scales:
            scale = self._get(self.scales[key]).float()
            return (self._get(parts[0][0]).float() * scale).to(dtype or torch.bfloat16)
        if len(parts) == 1 and parts[0][1].units is None:
            tensor = self._get(parts[0][0])
            return tensor if dtype is None else tensor.to(dtype)
        tensors = [(self._get(k) if dtype is None else self._get(k).to(dtype), t) for k, t in parts]
        per_unit = tensors[0][0].shape[0] // len(tensors[0][1].units)
        total = tensors[0][1].total_units
        if sum(len(t.units) for _, t in tensors) != total:
            raise CheckpointError(f"{self.name}: parts of {key} are missing ({[k for k, _ in parts]})")
        full = tensors[0][0].new_empty((per_unit * total, *tensors[0][0].shape[1:]))
        for tensor, target in tensors:
            for dst, src in target.place_rows(per_unit):
                full[dst] = tensor[src]
        return full

    def meta(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, stored dtype) of one parameter in original layout, without reading it."""
        parts = self.parts[key]
        shape, dtype = self._meta(parts[0][0])
        dtype = torch.bfloat16 if key in self.scales else dtype
        target = parts[0][1]
        if target.units is None:
            return shape, dtype
        return (shape[0] // len(target.units) * target.total_units, *shape[1:]), dtype


def _low_rank(diff: torch.Tensor, rank: int, svd: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in]) with up @ down ~ diff (best rank-r approximation)."""
    m = min(diff.shape)
    if svd == "exact" or (svd == "auto" and (m <= 1024 or rank * 4 > m)):
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, v = torch.svd_lowrank(diff, q=min(rank + 16, m), niter=6)
        u, s, vh = u[:, :rank], s[:rank], v[:, :rank].T
    root = s.sqrt()
    return u * root, root[:, None] * vh


def extract(base: str | os.PathLike | Mapping[str, torch.Tensor], tuned: str | os.PathLike | Mapping[str, torch.Tensor],
            rank: int, *, out: str | os.PathLike | None = None, dtype: torch.dtype = torch.float16,
            qk_norms: str = "comfy", svd: str = "auto", device: str | torch.device = "cpu",
            progress: Progress | None = None, overwrite: bool = True) -> ExtractResult:
    """LoRA of ``tuned - base`` at ``rank`` (see the module doc); written atomically to ``out`` when given
    (``overwrite=False``: an existing ``out`` is refused before any work and never replaced).

    Raises :class:`CheckpointError` when the models do not differ (the LoRA would be empty).

    ``svd``: "exact" (full SVD), "randomized" (``torch.svd_lowrank``, 6 power iterations) or "auto" (exact for
    matrices up to 1024 on the short side or ranks above a quarter of it).
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if qk_norms not in QK_NORM_MODES:
        raise ValueError(f"qk_norms must be one of {QK_NORM_MODES}, got {qk_norms!r}")
    if svd not in ("auto", "exact", "randomized"):
        raise ValueError(f"svd must be 'auto', 'exact' or 'randomized', got {svd!r}")
    if out is not None and not overwrite and Path(out).exists():
        raise FileExistsError(errno.EEXIST, "exists; not overwritten (choose another name)", str(out))
    result = ExtractResult({})
    with contextlib.ExitStack() as stack:
        base_src, tuned_src = WeightSource(base, stack), WeightSource(tuned, stack)
        missing = sorted(set(base_src.keys()) ^ set(tuned_src.keys()))
        if missing:
            raise CheckpointError(
                f"{base_src.name} and {tuned_src.name} are not the same architecture: {len(missing)} parameters are "
                f"in only one of them, e.g. {missing[:3]}"
            )
        keys = base_src.keys()
        for i, key in enumerate(keys):
            if progress is not None:
                progress(i, len(keys), key)
            base_t, tuned_t = base_src.get(key).to(device), tuned_src.get(key).to(device)
            if base_t.shape != tuned_t.shape:
                raise CheckpointError(f"{key}: shapes differ ({tuple(base_t.shape)} vs {tuple(tuned_t.shape)})")
            base_norm = float(base_t.norm())
            diff = tuned_t - base_t
            del base_t, tuned_t  # only the difference stays alive during the SVD
            layer, tensors = _extract_one(key, diff, base_norm, rank, svd, qk_norms)
            result.layers.append(layer)
            result.tensors.update({k: v.to("cpu", dtype) if v.ndim else v for k, v in tensors.items()})
            del diff, tensors
        if progress is not None:
            progress(len(keys), len(keys), "")
    if not result.tensors:
        skipped = result.summary()["skipped_qk_norms"]
        raise CheckpointError(
            f"{base_src.name} and {tuned_src.name} do not differ"
            + (f" except in {skipped} q/k norm scales left out by qk_norms='skip'" if skipped else "")
            + ": the LoRA would be empty and change nothing; pick the fine-tuned model as 'tuned'"
        )
    result.metadata = {"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
                       "accvideo_lora": json.dumps({"rank": rank, "base": base_src.name, "tuned": tuned_src.name,
                                                    "dtype": dtype_name(dtype), "svd": svd, "qk_norms": qk_norms})}
    if out is not None:
        result.save(out, overwrite=overwrite)
    return result


def _extract_one(key: str, diff: torch.Tensor, base_norm: float, rank: int, svd: str, qk_norms: str
                 ) -> tuple[LayerResult, dict[str, torch.Tensor]]:
    """The LoRA tensors (fp32) of one parameter's difference, and what was written."""
    module, _, param = key.rpartition(".")
    norm = float(diff.norm())
    rel_change = norm / max(base_norm, 1e-30)
    if norm == 0.0:
        return LayerResult(key, "unchanged"), {}
    name = comfy_names.lora_name_for_comfy(module)
    if names.module_kind(module) == "rmsnorm" and qk_norms != "comfy":
        if qk_norms == "skip":
            return LayerResult(key, "skipped", rel_change=rel_change), {}
        name = module
    prefix = f"{comfy_names.COMFY_PREFIX}{name}"
    if param == "bias":
        return LayerResult(key, "diff_b", rel_change=rel_change), {f"{prefix}.diff_b": diff}
    if diff.ndim < 2:
        return LayerResult(key, "diff", rel_change=rel_change), {f"{prefix}.diff": diff}
    matrix = diff.flatten(1)
    rows, cols = matrix.shape
    r = min(rank, rows, cols)
    if r * (rows + cols) >= rows * cols:
        return LayerResult(key, "diff", rank=min(rows, cols), rel_change=rel_change), {f"{prefix}.diff": diff}
    up, down = _low_rank(matrix, r, svd)
    rel_error = float(torch.addmm(matrix, up, down, alpha=-1).norm()) / norm
    extra = (1,) * (diff.ndim - 2)
    tensors = low_rank_tensors(module, up.reshape(rows, r, *extra).contiguous(),
                               down.reshape(r, *diff.shape[1:]).contiguous(), float(r))
    return LayerResult(key, "lora", rank=r, rel_error=rel_error, rel_change=rel_change), tensors


def low_rank_tensors(module: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """The file keys of one module's factor pair, named so native ComfyUI and our loader both load them."""
    prefix = f"{comfy_names.COMFY_PREFIX}{comfy_names.lora_name_for_comfy(module)}"
    return {f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
            f"{prefix}.alpha": torch.tensor(float(alpha))}


def progress_printer(stream=None, *, every: float = 0.5, label: str = "extract") -> Progress:
    """A progress callback printing one updating line: count, percentage, ETA and the current tensor."""
    import sys

    stream = stream or sys.stderr
    start = time.monotonic()
    last = [0.0]

    def show(i: int, total: int, key: str) -> None:
        now = time.monotonic()
        if i < total and now - last[0] < every and i:
            return
        last[0] = now
        elapsed = now - start
        eta = elapsed / i * (total - i) if i else math.nan
        eta_text = "?" if math.isnan(eta) else f"{eta:5.0f}s"
        end = "\n" if i >= total else ""
        stream.write(f"\r[{label}] {i}/{total} ({100 * i / max(total, 1):3.0f}%) eta {eta_text} {key[:60]:<60}{end}")
        stream.flush()

    return show

