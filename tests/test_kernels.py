"""Kernel dispatch: backend selection, the force switch, lazy/cached Triton import, running without Triton.

Each scenario runs in a fresh interpreter, because what is under test is process state (environment variables
read at import, whether ``triton`` was ever imported, the cached import result).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from accvideo_core import kernels
from accvideo_core.kernels import reference

ROOT = Path(__file__).resolve().parents[1]

_CALL_ALL = """
import torch
from accvideo_core import kernels
from accvideo_core.kernels import reference
torch.manual_seed(0)
x4 = torch.randn(1, 3, 2, 4)
x3, s = torch.randn(1, 3, 4), torch.randn(1, 4)
cos = sin = torch.ones(2, 4)
v = torch.randn(1, 4, 3)
pairs = [(kernels.rms_norm_rope(x4, s[0], cos, sin), reference.rms_norm_rope(x4, s[0], cos, sin)),
         (kernels.layer_norm_modulate(x3, s, s), reference.layer_norm_modulate(x3, s, s)),
         (kernels.gated_residual(x3, x3, s), reference.gated_residual(x3, x3, s)),
         (kernels.group_norm_silu(v, s[0], s[0], 2), reference.group_norm_silu(v, s[0], s[0], 2)),
         (kernels.group_norm_stats(v, 2)[1], reference.group_norm_stats(v, 2)[1])]
same_as_reference = all(torch.equal(a, b) for a, b in pairs)
"""


def _run(code: str, **env_overrides: str | None) -> dict:
    """Run ``code`` in a fresh interpreter; it must leave a JSON-able dict in ``result``."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCVIDEO_KERNELS", "TRITON_INTERPRET")}
    env.update({k: v for k, v in env_overrides.items() if v is not None})
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    script = textwrap.dedent(code) + "\nimport json, sys\nprint('RESULT' + json.dumps(result))\n"
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def test_cpu_uses_reference_and_never_imports_triton():
    result = _run(_CALL_ALL + """
import sys
imported = "triton" in sys.modules
try:
    kernels.set_backend("triton")
    kernels.gated_residual(x3, x3, s)
    forced = "no error"
except RuntimeError as exc:
    forced = str(exc)
result = {"same": same_as_reference, "triton_imported": imported, "tried": kernels._triton is not None,
          "forced": forced}
""")
    assert result["same"]
    assert not result["triton_imported"], "a CPU call imported triton without TRITON_INTERPRET"
    assert not result["tried"]
    assert "TRITON_INTERPRET is unset" in result["forced"] and "ACCVIDEO_KERNELS=auto" in result["forced"]


def test_package_runs_without_triton_and_caches_the_failed_import():
    # sys.modules["triton"] = None makes `import triton` raise ImportError, as on a machine without it.
    result = _run("""
import sys, builtins
sys.modules["triton"] = None
attempts = []
real_import = builtins.__import__
def counting_import(name, *args, **kwargs):
    if name.split(".")[0] == "triton":
        attempts.append(name)
    return real_import(name, *args, **kwargs)
builtins.__import__ = counting_import
""" + _CALL_ALL + """
kernels.rms_norm_rope(x4, s[0]); kernels.gated_residual(x3, x3, s)
builtins.__import__ = real_import
try:
    kernels.set_backend("triton")
    kernels.layer_norm_modulate(x3, s, s)
    forced = "no error"
except RuntimeError as exc:
    forced = str(exc)
result = {"same": same_as_reference, "attempts": len(attempts), "available": kernels.triton_available(),
          "forced": forced}
""", TRITON_INTERPRET="1")
    assert result["same"]
    assert result["attempts"] == 1, f"triton import tried {result['attempts']} times; expected once, then cached"
    assert result["available"] is False
    assert "Triton missing" in result["forced"]


def test_force_reference_switch_beats_the_interpreter():
    result = _run(_CALL_ALL + """
import sys
result = {"same": same_as_reference, "backend": kernels.get_backend(), "triton_imported": "triton" in sys.modules}
""", ACCVIDEO_KERNELS="torch", TRITON_INTERPRET="1")
    assert result == {"same": True, "backend": "torch", "triton_imported": False}


def test_bad_backend_names_are_clear_errors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ACCVIDEO_KERNELS="cuda", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", "import accvideo_core.kernels"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "ACCVIDEO_KERNELS='cuda'" in proc.stderr and "'torch'" in proc.stderr
    with pytest.raises(ValueError, match="expected one of"):
        kernels.set_backend("fast")


def test_set_backend_torch_is_the_reference_in_process():
    previous = kernels.get_backend()
    try:
        kernels.set_backend("torch")
        assert kernels._impl("layer_norm_modulate", torch.zeros(1)) is reference.layer_norm_modulate
    finally:
        kernels.set_backend(previous)


def test_torch_compile_traces_the_reference():
    """Under torch.compile the dispatch hands Dynamo the reference (no opaque launch); forced 'triton' on CPU would
    raise if it were asked for the Triton path there."""
    previous = kernels.get_backend()
    x, y, gate = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(2, 5)
    try:
        kernels.set_backend("triton")
        with pytest.raises(RuntimeError, match="forced"):
            kernels.gated_residual(x, y, gate)
        compiled = torch.compile(lambda a, b, g: kernels.gated_residual(a, b, g), backend="eager", fullgraph=True)
        assert torch.equal(compiled(x, y, gate), reference.gated_residual(x, y, gate))
    finally:
        kernels.set_backend(previous)
        torch._dynamo.reset()


def test_launch_grids_fit_cuda_limits_at_real_sizes():
    """Every Triton launch (forward and backward) at HunyuanVideo's 720x1280x129 sizes - transformer tokens and an
    untiled VAE activation of 128 channels at full resolution - stays within CUDA's grid limits (axis 0 < 2**31,
    axes 1 and 2 <= 65535). Meta tensors and an intercepted launch: nothing is allocated or run, no GPU needed;
    the interpreter ignores these limits, a GPU launch fails with 'invalid argument'."""
    pytest.importorskip("triton")
    result = _run("""
import torch
from triton.runtime.jit import JITFunction
from accvideo_core.kernels import triton_kernels as tk

launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((self.fn.__name__, list(grid)))
bf16, f32 = dict(device="meta", dtype=torch.bfloat16), dict(device="meta")
tokens, text, heads, head_dim, hidden = 33 * 45 * 80, 256, 24, 128, 3072
q = torch.empty(1, tokens + text, 3, heads, head_dim, **bf16)[:, :, 0].requires_grad_()
w, cos = torch.empty(head_dim, **bf16).requires_grad_(), torch.empty(tokens, head_dim, **f32)
x = torch.empty(1, tokens + text, hidden, **bf16).requires_grad_()
mod = torch.empty(1, hidden, **bf16).requires_grad_()
for fn, inputs in ((lambda: tk.rms_norm_rope(q, w, cos, cos), (q, w)),
                   (lambda: tk.layer_norm_modulate(x, mod, mod), (x, mod)),
                   (lambda: tk.gated_residual(x, x, mod), (x, mod))):
    out = fn()
    torch.autograd.grad(out, inputs, torch.empty_like(out))
video = torch.empty(1, 128, 129, 720, 1280, **bf16)
g = torch.empty(128, **bf16)
tk.group_norm_silu(video, g, g, 32)
tk.group_norm_silu(video, g, g, 32, mean=torch.empty(1, 32, **f32), rstd=torch.empty(1, 32, **f32))
tk.group_norm_stats(video[:, :, 1:5], 32)
result = launches
""")
    assert {name for name, _ in result} == {"_rms_norm_rope_fwd", "_rms_norm_rope_bwd", "_layer_norm_modulate_fwd",
                                            "_layer_norm_modulate_bwd", "_gated_residual_fwd", "_gated_residual_bwd",
                                            "_group_norm_partial_stats", "_group_norm_silu_apply"}
    for name, grid in result:
        assert 1 <= len(grid) <= 3 and min(grid) >= 1, (name, grid)
        assert grid[0] < 2 ** 31 and all(n <= 65535 for n in grid[1:]), (name, grid)
