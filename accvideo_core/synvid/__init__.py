"""SynVid: the teacher's denoising trajectories on disk (format, reader, core dumper).

``format`` defines the files; ``dump`` makes them with our transformer; ``build`` (ComfyUI client) makes them
with ComfyUI's models. See docs/synvid.md.
"""
from accvideo_core.synvid.format import (
    FORMAT_VERSION, SynVidDataset, SynVidError, SynVidSample, SynVidWriter, key_steps_for, read_sample,
    rebuild_manifest, verify, write_sample,
)

__all__ = ["FORMAT_VERSION", "SynVidDataset", "SynVidError", "SynVidSample", "SynVidWriter", "key_steps_for",
           "read_sample", "rebuild_manifest", "verify", "write_sample"]
