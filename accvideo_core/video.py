"""H.264 mp4 writing through imageio-ffmpeg's bundled ffmpeg, with metadata tags in the container."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from accvideo_core.utils.io import atomic_path


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``[T, H, W, 3]`` floats in [0, 1] (ComfyUI IMAGE) -> uint8 array, rounded and clamped."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3] with values in [0, 1], got shape {tuple(frames.shape)}")
    return (frames.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def write_mp4(frames: torch.Tensor, path: str | os.PathLike, *, fps: float = 24.0, crf: int = 19,
              metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically write ``[T, H, W, 3]`` frames in [0, 1] as an H.264 (yuv420p) mp4 with ``metadata`` tags.

    yuv420p needs even sizes: imageio-ffmpeg resizes odd widths or heights up by one pixel (with a warning).
    """
    import imageio_ffmpeg

    data = frames_to_uint8(frames)
    t, h, w, _ = data.shape
    if t < 1:
        raise ValueError("cannot write a video without frames")
    extra = []
    for key, value in (metadata or {}).items():
        extra += ["-metadata", f"{key}={value}"]
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (w, h), fps=float(fps), codec="libx264", pix_fmt_out="yuv420p", quality=None,
            output_params=["-crf", str(int(crf)), "-f", "mp4", "-movflags", "+faststart+use_metadata_tags", *extra],
            macro_block_size=2, ffmpeg_log_level="error")
        writer.send(None)
        for frame in data:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path


def read_mp4_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Container-level metadata tags of a video file (via ffmpeg's ffmetadata muxer)."""
    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                         capture_output=True, check=True).stdout.decode("utf-8", "replace")
    meta: dict[str, str] = {}
    key = None
    for line in out.splitlines():
        if line.startswith(";") or not line:
            continue
        if key is not None and meta[key].endswith("\\"):
            meta[key] = meta[key][:-1] + "\n" + line
            continue
        if "=" in line:
            key, value = line.split("=", 1)
            meta[key] = value
    return {k: _unescape(v) for k, v in meta.items()}


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def count_frames(path: str | os.PathLike) -> int:
    """Number of decoded video frames of a file."""
    import imageio_ffmpeg

    n, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(n)


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoded video ``[B, 3, F, H, W]`` in [-1, 1] -> ComfyUI IMAGE frames ``[B * F, H, W, 3]`` in [0, 1], float32
    (the same mapping as ComfyUI's native VAE decode: ``clamp((x + 1) / 2, 0, 1)``)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a decoded video [B, 3, F, H, W], got shape {tuple(video.shape)}")
    frames = torch.clamp((video.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, video.shape[3], video.shape[4], 3)
