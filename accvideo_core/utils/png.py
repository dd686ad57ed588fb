"""The project's one PNG writer: 8-bit RGB, no dependencies beyond numpy and zlib, written atomically.

Used by the drawing canvas (``utils/canvas.py``: the trainer's loss curves and the toy experiment's figure) and any
other raster the project draws. Reading PNGs back is the tests' business (they use Pillow, an independent decoder).
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .io import write_bytes

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 array as a PNG (8-bit RGB, filter 0 on every row, zlib level 9)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        got = f"{rgb.dtype} {tuple(rgb.shape)}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"expected an [H, W, 3] uint8 array, got {got}")
    h, w, _ = rgb.shape
    if h < 1 or w < 1:
        raise ValueError(f"a PNG needs at least one pixel, got {w} x {h}")
    rows = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rgb.reshape(h, w * 3)], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit depth, colour type 2 (RGB), no interlace
    return (_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b""))


def write_png(rgb: np.ndarray, path: str | os.PathLike) -> Path:
    """Atomically write ``rgb`` (``[H, W, 3]`` uint8) as a PNG file; returns the path."""
    return write_bytes(encode_png(rgb), path)
