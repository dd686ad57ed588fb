"""Small helpers shared by several test files (not part of the shipped core)."""
from __future__ import annotations

import os


def count_frames(path: str | os.PathLike) -> int:
    """Number of decoded video frames of a file (imageio-ffmpeg decodes it)."""
    import imageio_ffmpeg

    n, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    return int(n)
