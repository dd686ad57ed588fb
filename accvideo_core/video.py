"""H.264 mp4 writing through imageio-ffmpeg's bundled ffmpeg, with metadata tags in the container."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import warnings
from fractions import Fraction
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
              metadata: Mapping[str, str] | None = None, exclusive: bool = False) -> Path:
    """Atomically write ``[T, H, W, 3]`` frames in [0, 1] as an H.264 (yuv420p) mp4 with ``metadata`` tags.

    The tags go to ffmpeg in an ffmetadata file, never on its command line: a workflow of any size fits (the
    kernel limits one argument to 128 KiB) and the prompt is not visible to other users in ``ps``. yuv420p needs
    even sizes: odd widths or heights are scaled up by one pixel (with a warning). ``exclusive``: raise
    ``FileExistsError`` rather than replace an existing file.
    """
    import imageio_ffmpeg

    data = frames_to_uint8(frames)
    t, h, w, _ = data.shape
    if t < 1:
        raise ValueError("cannot write a video without frames")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(Fraction(fps).limit_denominator()), "-i", "-"]
    out_w, out_h = w + w % 2, h + h % 2
    if (out_w, out_h) != (w, h):
        warnings.warn(f"yuv420p needs even sizes: scaling {w}x{h} frames to {out_w}x{out_h}", stacklevel=2)
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="accvideo_mp4_") as meta_dir, \
            atomic_path(path, overwrite=not exclusive) as tmp:
        meta_file = Path(meta_dir) / "metadata.txt"
        meta_file.write_text(ffmetadata(metadata or {}), encoding="utf-8")
        cmd += ["-f", "ffmetadata", "-i", str(meta_file), "-map", "0:v:0", "-map_metadata", "1",
                "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-crf", str(int(crf)),
                *(["-vf", f"scale={out_w}:{out_h}"] if (out_w, out_h) != (w, h) else []),
                "-movflags", "+faststart+use_metadata_tags", "-f", "mp4", str(tmp)]
        proc = subprocess.run(cmd, input=np.ascontiguousarray(data).tobytes(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
            raise RuntimeError(f"ffmpeg could not write {path} (exit code {proc.returncode}): {err}")
    return path


def ffmetadata(tags: Mapping[str, str]) -> str:
    """``tags`` as an ffmpeg metadata file (``;FFMETADATA1`` + ``key=value`` lines, special characters escaped)."""
    lines = [";FFMETADATA1"]
    for key, value in tags.items():
        lines.append(f"{_escape(str(key))}={_escape(str(value))}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    """ffmetadata escaping: ``=``, ``;``, ``#``, backslash and newline are preceded by a backslash."""
    return re.sub(r"([=;#\\\n])", r"\\\1", text)


def read_mp4_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Container-level metadata tags of a video file (via ffmpeg's ffmetadata muxer): how a user reads back the
    ``prompt`` / ``workflow`` tags the Save Video node writes (docs/comfyui.md); the tests check those tags with it."""
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


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """Decoded video ``[B, 3, F, H, W]`` in [-1, 1] -> ComfyUI IMAGE frames ``[B * F, H, W, 3]`` in [0, 1], float32
    (the same mapping as ComfyUI's native VAE decode: ``clamp((x + 1) / 2, 0, 1)``)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a decoded video [B, 3, F, H, W], got shape {tuple(video.shape)}")
    frames = torch.clamp((video.float() + 1.0) / 2.0, min=0.0, max=1.0)
    return frames.permute(0, 2, 3, 4, 1).reshape(-1, video.shape[3], video.shape[4], 3)
