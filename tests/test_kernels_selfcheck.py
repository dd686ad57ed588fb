"""Triton is trusted only after it is checked (``accvideo_core/kernels/selfcheck.py``): correct kernels pass their
first-use check, a deliberately wrong Triton kernel (forward, or backward only) is caught with one warning line
and the reference runs from then on, and a forced Triton backend makes the mismatch an error.

The kernels run in Triton's interpreter on CPU, in a subprocess (``TRITON_INTERPRET=1`` must be set before Triton
is imported): this file executed as a script swaps wrong kernels into ``triton_kernels`` and records what happens.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _calls(torch, kernels, dtype):
    """One call of every kernel through the dispatch."""
    g = torch.Generator().manual_seed(0)
    x4 = torch.randn(1, 3, 2, 8, generator=g).to(dtype)
    x3, s = torch.randn(1, 3, 16, generator=g).to(dtype), torch.randn(1, 16, generator=g).to(dtype)
    v = torch.randn(1, 4, 3, 5, generator=g).to(dtype)
    kernels.rms_norm_rope(x4, s[0, :8])
    kernels.layer_norm_modulate(x3, s, s)
    kernels.gated_residual(x3, x3, s)
    kernels.group_norm_silu(v, s[0, :4], s[0, :4], 2)
    kernels.group_norm_stats(v, 2)


def _gated(torch, kernels, reference, dtype=None):
    """kernels.gated_residual vs the reference: outputs and input gradients equal, warnings raised meanwhile."""
    import torch as _t

    dtype = dtype or _t.float32
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, generator=g).to(dtype) for shape in ((2, 5, 24), (2, 5, 24), (2, 24))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got_in = [t.clone().requires_grad_(True) for t in inputs]
        got = kernels.gated_residual(*got_in)
        got.sum().backward()
        kernels.gated_residual(*inputs)  # a second call: no second warning
    want_in = [t.clone().requires_grad_(True) for t in inputs]
    want = reference.gated_residual(*want_in)
    want.sum().backward()
    return {"warnings": [str(w.message) for w in caught], "categories": [w.category.__name__ for w in caught],
            "equal": bool(torch.equal(got, want)) and all(torch.equal(a.grad, b.grad) for a, b in zip(got_in, want_in))}


def _first_use_in_checkpoint(torch, kernels, reference, selfcheck) -> dict:
    """A kernel's first use, hence its self-check, inside a non-reentrant gradient checkpoint (as in the trainer's
    first step): forward and backward against the reference without a checkpoint."""
    from torch.utils.checkpoint import checkpoint

    selfcheck.reset()
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 6, 2, 16, generator=g), torch.rand(16, generator=g) + 0.5
    grads = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for name, fn in (("checkpointed", kernels.rms_norm_rope), ("plain", reference.rms_norm_rope)):
                xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
                loss = lambda a, b, fn=fn: fn(a, b).square().sum()  # noqa: E731
                (checkpoint(loss, xi, wi, use_reentrant=False) if name == "checkpointed" else loss(xi, wi)).backward()
                grads[name] = (xi.grad, wi.grad)
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    diff = max((a - b).abs().max().item() for a, b in zip(*grads.values())) if error is None else None
    return {"error": error, "grad_diff": diff, "warnings": [str(w.message) for w in caught],
            "verdicts": selfcheck.results()}


def _worker(out: str) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(ROOT))
    import torch
    import triton
    import triton.language as tl

    from accvideo_core import kernels
    from accvideo_core.kernels import reference, selfcheck
    from accvideo_core.kernels import triton_kernels as tk

    @triton.jit
    def wrong_gated_fwd(x_ptr, y_ptr, gate_ptr, out_ptr, seq_len, channels, sx_b, sx_l, sy_b, sy_l, s_gate,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """x - y * gate instead of x + y * gate."""
        b = tl.program_id(1).to(tl.int64)
        tokens = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (tokens < seq_len)[:, None] & (cols < channels)[None, :]
        x = tl.load(x_ptr + (b * sx_b + tokens * sx_l)[:, None] + cols[None, :], mask=mask, other=0.0)
        y = tl.load(y_ptr + (b * sy_b + tokens * sy_l)[:, None] + cols[None, :], mask=mask, other=0.0)
        gate = tl.load(gate_ptr + b * s_gate + cols, mask=cols < channels, other=0.0)
        out = x.to(tl.float32) - y.to(tl.float32) * gate.to(tl.float32)[None, :]
        tl.store(out_ptr + (b * seq_len + tokens)[:, None] * channels + cols[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def wrong_gated_bwd(grad_ptr, y_ptr, gate_ptr, dy_ptr, dgate_part_ptr, seq_len, channels, tokens_per_program,
                        sy_b, sy_l, s_gate, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """dy = grad (the gate factor forgotten) and d(gate) = 0."""
        pid_l = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(dgate_part_ptr + (b * tl.num_programs(0) + pid_l) * channels + cols,
                 tl.zeros((BLOCK_C,), dtype=tl.float32), mask=cols < channels)
        for start in range(0, tokens_per_program, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            tokens = pid_l * tokens_per_program + rows
            mask = ((tokens < seq_len) & (rows < tokens_per_program))[:, None] & (cols < channels)[None, :]
            off = (b * seq_len + tokens.to(tl.int64))[:, None] * channels + cols[None, :]
            tl.store(dy_ptr + off, tl.load(grad_ptr + off, mask=mask, other=0.0), mask=mask)

    report: dict = {}
    _calls(torch, kernels, torch.float32)
    _calls(torch, kernels, torch.bfloat16)
    report["correct"] = selfcheck.results()
    report["first_use_in_checkpoint"] = _first_use_in_checkpoint(torch, kernels, reference, selfcheck)

    right_fwd, right_bwd = tk._gated_residual_fwd, tk._gated_residual_bwd
    for case, (fwd, bwd) in {"wrong_forward": (wrong_gated_fwd, right_bwd),
                             "wrong_backward": (right_fwd, wrong_gated_bwd)}.items():
        selfcheck.reset()
        tk._gated_residual_fwd, tk._gated_residual_bwd = fwd, bwd
        res = _gated(torch, kernels, reference)
        res["verdicts"] = selfcheck.results()
        res["still_reference"] = kernels._impl("gated_residual", torch.zeros(1, 2, 3)) is reference.gated_residual
        res["others_triton"] = kernels._impl("layer_norm_modulate", torch.zeros(1, 2, 3)) is tk.layer_norm_modulate
        res["bf16"] = _gated(torch, kernels, reference, torch.bfloat16)  # its own check, also caught
        report[case] = res
    selfcheck.reset()
    tk._gated_residual_fwd = wrong_gated_fwd
    kernels.set_backend("triton")
    try:
        kernels.gated_residual(*(torch.randn(1, 2, 8) for _ in range(2)), torch.randn(1, 8))
        report["forced"] = "no error"
    except RuntimeError as exc:
        report["forced"] = str(exc)
    Path(out).write_text(json.dumps(report, indent=1))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: `pip install -r requirements-test.txt` to run the self-check tests")
    out = tmp_path_factory.mktemp("selfcheck") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("ACCVIDEO_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_first_use_inside_a_gradient_checkpoint(report):
    """The self-check's own backward must not run through the caller's checkpoint hooks (it used to fail the check
    and then break the caller's backward with a CheckpointError)."""
    res = report["first_use_in_checkpoint"]
    assert res["error"] is None and not res["warnings"], res
    assert [(v["kernel"], v["ok"]) for v in res["verdicts"]] == [("rms_norm_rope", True)], res
    assert res["grad_diff"] <= 1e-5, res


def test_correct_kernels_pass_their_check(report):
    verdicts = report["correct"]
    assert {(v["kernel"], v["dtype"]) for v in verdicts} == {
        (k, d) for k in ("rms_norm_rope", "layer_norm_modulate", "gated_residual", "group_norm_silu",
                         "group_norm_stats") for d in ("float32", "bfloat16")}
    assert all(v["ok"] and v["excess_error"] <= v["tolerance"] for v in verdicts), verdicts


@pytest.mark.parametrize("case", ["wrong_forward", "wrong_backward"])
def test_wrong_kernel_is_caught_once_and_replaced_by_the_reference(report, case):
    res = report[case]
    assert res["categories"] == ["KernelMismatchWarning"], res["warnings"]  # one warning for two calls
    assert "\n" not in res["warnings"][0] and "gated_residual" in res["warnings"][0]
    assert "using the reference" in res["warnings"][0]
    assert res["equal"], "after the mismatch the reference must run: output and gradients equal to it"
    (verdict,) = res["verdicts"][:1]
    assert verdict["kernel"] == "gated_residual" and not verdict["ok"]
    assert verdict["excess_error"] > verdict["tolerance"]
    assert res["still_reference"] and res["others_triton"]
    assert res["bf16"]["categories"] == ["KernelMismatchWarning"] and res["bf16"]["equal"]


def test_forced_triton_backend_makes_a_mismatch_an_error(report):
    assert "disagrees with the torch reference" in report["forced"]
    assert "forced" in report["forced"]


if __name__ == "__main__":
    _worker(sys.argv[1])
