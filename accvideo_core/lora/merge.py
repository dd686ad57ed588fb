"""Bake LoRAs into a transformer checkpoint, streamed tensor by tensor (a 13B model fits in little RAM).

The output is an original-layout safetensors file (what ComfyUI's UNETLoader and our loader read) written by
``utils.io.save_safetensors_stream``: the header is computed from the shapes up front, then each tensor is read from the base
file, merged (``base + sum_i strength_i * delta_i`` in fp32, rounded once) and appended. The file appears
atomically under its final name only when complete.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch

from accvideo_core.models.loading import quantize_fp8
from accvideo_core.utils.dtypes import FP8_DTYPES
from accvideo_core.utils.io import save_safetensors_stream

from .apply import LoraLike, as_lora, match
from .extract import Progress, WeightSource

FP8 = "fp8"  # linear weights in float8_e4m3fn with a per-layer scale (ComfyUI's fp8_scaled form), the rest bf16


def _output_dtype(key: str, shape: tuple[int, ...], stored: torch.dtype, dtype: torch.dtype | str | None
                  ) -> torch.dtype:
    if dtype is None or not stored.is_floating_point:
        return stored
    if dtype == FP8:
        return torch.float8_e4m3fn if key.endswith(".weight") and len(shape) == 2 else torch.bfloat16
    return dtype


def merge_checkpoint(base: str | os.PathLike | Mapping[str, torch.Tensor], loras: Iterable[tuple[LoraLike, float]],
                     out: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                     progress: Progress | None = None) -> Path:
    """Write ``base`` with the LoRAs merged at their strengths to ``out`` (safetensors, original layout).

    ``base``: original, ComfyUI or diffusers layout, safetensors or weights-only pickle (keys that are not part of
    the transformer are left out). ``dtype``: None keeps each tensor's dtype; a float dtype converts every float
    tensor; ``"fp8"`` stores 2-D linear weights as float8_e4m3fn with a per-layer ``scale_weight``
    (``models.loading.quantize_fp8``) and ComfyUI's ``scaled_fp8`` marker, the rest as bf16.
    Every LoRA is accounted for like :func:`accvideo_core.lora.match` (error when nothing fits, one warning line
    for a partial match).
    """
    if dtype == FP8 and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError("this torch build has no float8_e4m3fn")
    states = [(as_lora(lora), float(strength)) for lora, strength in loras]
    with contextlib.ExitStack() as stack:
        source = WeightSource(base, stack)
        keys = source.keys()
        metas = {k: source.meta(k) for k in keys}
        shapes = {k: torch.Size(shape) for k, (shape, _) in metas.items()}
        reports = [(match(state, shapes).patches, strength) for state, strength in states]
        out_dtypes = {k: _output_dtype(k, shape, stored, dtype) for k, (shape, stored) in metas.items()}

        sources = ", ".join(state.source for state, _ in states)

        def merged() -> Iterator[torch.Tensor]:
            for i, key in enumerate(keys):
                if progress is not None:
                    progress(i, len(keys), key)
                tensor = source.get(key, dtype=None)
                module, _, param = key.rpartition(".")
                total = None
                for patches, strength in reports:
                    patch = patches.get(module)
                    if patch is None:
                        continue
                    delta = patch.weight_delta(tensor.shape) if param == "weight" else patch.bias_delta(tensor.shape)
                    if delta is not None:
                        total = tensor.float() + strength * delta if total is None else total + strength * delta
                value = tensor if total is None else total
                if out_dtypes[key] in FP8_DTYPES:
                    yield from quantize_fp8(value, out_dtypes[key])   # the weight, then its scale
                else:
                    yield value.to(out_dtypes[key])
            if scaled:
                yield torch.empty(0, dtype=torch.float8_e4m3fn)   # ComfyUI's marker of a scaled fp8 file
            if progress is not None:
                progress(len(keys), len(keys), "")

        specs = []
        for k in keys:
            specs.append((k, out_dtypes[k], metas[k][0]))
            if out_dtypes[k] in FP8_DTYPES:
                specs.append((k.removesuffix("weight") + "scale_weight", torch.float32, ()))
        scaled = len(specs) > len(keys)
        if scaled:
            specs.append(("scaled_fp8", torch.float8_e4m3fn, (0,)))
        save_safetensors_stream(specs, merged(), out, metadata={"format": "pt", "accvideo_merged_loras": sources})
    return Path(out)
