"""Native ComfyUI in a subprocess (CPU, no server), for the unit files' integration tests: one way to start it,
catch its log lines and run a loaded diffusion model.

A probe is ``PRELUDE`` + the test's own lines, run by :func:`run_probe` with ``COMFYUI_PYTHON`` (default: this
Python) in the checkout. The prelude leaves ``ARGS`` (the arguments after the checkout), ``messages`` (ComfyUI's log
lines, e.g. "lora key not loaded: ...") and ``velocity(patcher, inputs_path, out_path)`` (the diffusion model's
prediction on a saved input batch, written as ``{"velocity": ...}``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PRELUDE = r'''
import json, logging, sys
comfy_path, *ARGS = sys.argv[1:]
sys.path.insert(0, comfy_path)
from comfy.cli_args import args
args.cpu = True
import torch
messages = []
class Grab(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger().addHandler(Grab())
logging.getLogger().setLevel(logging.INFO)
import comfy.sd, comfy.utils
from safetensors.torch import load_file, save_file

def velocity(patcher, inputs_path, out_path):
    dm = patcher.model.diffusion_model.float()
    x = load_file(inputs_path)
    with torch.no_grad():
        v = dm(x["latents"], x["timestep"], x["text_states"], y=x["pooled"], guidance=x["guidance"])
    save_file({"velocity": v.float().contiguous()}, out_path)
'''


def run_probe(body: str, comfy: str | Path, *args: str | Path, folder: Path,
              timeout: int = 600) -> subprocess.CompletedProcess:
    """Write ``PRELUDE + body`` to ``folder/probe.py`` and run it in the checkout ``comfy`` with ``args``; fails the
    test with ComfyUI's stderr when the probe fails."""
    script = folder / "probe.py"
    script.write_text(PRELUDE + body)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(script), str(comfy), *map(str, args)], cwd=str(comfy), capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return run
