"""Dtype names, in one place: every CLI, config and file format of the project parses them here.

The canonical spelling is torch's own name (``"bfloat16"``, ``"float16"``, ``"float32"``, ``"float8_e4m3fn"``),
the one written into SynVid manifests and offered by the nodes; the short forms (``"bf16"``, ``"fp16"``,
``"fp32"``, ``"fp8"``...) are accepted everywhere a name is read.
"""
from __future__ import annotations

import torch

# canonical name -> dtype (float8 only when this torch build has it)
CANONICAL: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
}
# accepted alternative spellings -> canonical name
ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
           "fp64": "float64", "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
# dtype tags of the safetensors header -> dtype
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    **{tag: getattr(torch, name) for tag, name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, name)},
}
SAFETENSORS_TAGS: dict[torch.dtype, str] = {dtype: tag for tag, dtype in SAFETENSORS.items()}
FP8_DTYPES: tuple[torch.dtype, ...] = tuple(CANONICAL[n] for n in ("float8_e4m3fn", "float8_e5m2") if n in CANONICAL)


def names_for(*canonical: str) -> list[str]:
    """Every accepted spelling of the given canonical names (for CLI ``choices``), short forms first."""
    return [a for a, c in ALIASES.items() if c in canonical] + [c for c in canonical if c in CANONICAL]


def parse_dtype(name: str | torch.dtype, *, allowed: tuple[str, ...] | None = None) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` ... -> ``torch.bfloat16``.

    ``allowed``: canonical names the caller accepts (default: all). Raises ``ValueError`` listing them.
    """
    if isinstance(name, torch.dtype):
        canonical = dtype_name(name)
    else:
        key = str(name).strip().lower().removeprefix("torch.")
        canonical = ALIASES.get(key, key)
    ok = allowed if allowed is not None else tuple(CANONICAL)
    if canonical not in ok or canonical not in CANONICAL:
        raise ValueError(f"unknown or unsupported dtype {name!r}; expected one of {names_for(*ok)}")
    return CANONICAL[canonical]


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")
