"""Every Triton kernel, run in Triton's interpreter on CPU, against the torch reference (outputs and gradients),
and compiled ahead of time to a CUDA binary (no GPU needed) to catch what the interpreter cannot.

``TRITON_INTERPRET=1`` must be set before Triton is imported and makes the dispatch route CPU tensors to Triton,
so the kernels run in a subprocess (this file executed as a script: ``python tests/test_kernels_triton.py OUT``)
that records max abs differences per case; the tests below assert on them. Nothing leaks into other tests. The
compile check runs alongside in a second subprocess (``... --compile ARCH OUT``) without the interpreter.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FP32_TOL = 1e-5

# (case id, kernel, parameters). Odd sizes on purpose: head dims / channel counts that are not powers of two,
# partial RoPE, non-contiguous views like the ones the transformer produces, multi-chunk GroupNorm statistics.
CASES: list[tuple[str, str, dict]] = [
    ("rope_partial", "rms_norm_rope", dict(shape=(2, 7, 3, 8), n_rope=5)),
    ("rope_full_odd_pairs", "rms_norm_rope", dict(shape=(1, 5, 2, 6), n_rope=5)),
    ("rope_none", "rms_norm_rope", dict(shape=(2, 9, 3, 10), n_rope=None)),
    ("rope_head128_qkv_view", "rms_norm_rope", dict(shape=(1, 11, 2, 128), n_rope=7, qkv_view=True)),
    ("rms_norm_3d_no_rope", "rms_norm_rope", dict(shape=(2, 7, 12), n_rope=None)),
    ("rope_row_loop", "rms_norm_rope", dict(shape=(2, 90, 4, 64), n_rope=50, partial_rows=1)),
    ("rope_bf16", "rms_norm_rope", dict(shape=(2, 7, 3, 16), n_rope=4, dtype="bfloat16")),
    ("rope_fp16", "rms_norm_rope", dict(shape=(1, 6, 2, 32), n_rope=4, dtype="float16")),
    ("ln_mod_37", "layer_norm_modulate", dict(shape=(2, 5, 37))),
    ("ln_mod_130_chunked_mod", "layer_norm_modulate", dict(shape=(3, 4, 130), chunked=True)),
    ("ln_mod_offset_input", "layer_norm_modulate", dict(shape=(1, 6, 48), offset=30.0)),
    ("ln_mod_token_loop", "layer_norm_modulate", dict(shape=(2, 37, 20), partial_rows=2)),
    ("ln_mod_bf16", "layer_norm_modulate", dict(shape=(2, 5, 96), dtype="bfloat16")),
    ("ln_mod_fp16", "layer_norm_modulate", dict(shape=(2, 3, 80), dtype="float16")),
    ("ln_mod_bf16_x_fp32_mod", "layer_norm_modulate", dict(shape=(2, 5, 96), dtype="bfloat16", low_only=(0,))),
    ("gated_37", "gated_residual", dict(shape=(2, 5, 37))),
    ("gated_1500_chunked_gate", "gated_residual", dict(shape=(1, 9, 1500), chunked=True)),
    ("gated_token_loop", "gated_residual", dict(shape=(2, 70, 20), partial_rows=2)),
    ("gated_bf16", "gated_residual", dict(shape=(2, 5, 96), dtype="bfloat16")),
    ("gated_fp32_residual_bf16_y", "gated_residual", dict(shape=(2, 5, 96), dtype="bfloat16", low_only=(1,))),
    ("gn_silu_5d", "group_norm_silu", dict(shape=(2, 8, 3, 5, 7), groups=4)),
    ("gn_plain_4d_no_affine", "group_norm_silu", dict(shape=(2, 6, 5, 3), groups=3, silu=False, affine=False)),
    ("gn_multichunk_offset", "group_norm_silu", dict(shape=(1, 4, 2, 50, 51), groups=2, offset=5.0)),
    ("gn_given_stats_tiles", "group_norm_silu", dict(shape=(2, 8, 4, 5, 6), groups=4, tiled=True)),
    ("gn_stats_time_slice", "group_norm_stats", dict(shape=(2, 8, 5, 6, 7), groups=4, offset=3.0)),
    ("gn_stats_multichunk_bf16", "group_norm_stats", dict(shape=(1, 4, 3, 40, 50), groups=2, offset=2.0,
                                                         dtype="bfloat16")),
    ("gn_bf16", "group_norm_silu", dict(shape=(1, 8, 3, 9, 10), groups=4, dtype="bfloat16")),
]


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _run_case(kernel: str, p: dict) -> dict:
    """Worker side: run one case through the dispatch (forced to Triton) and through the reference."""
    import torch

    from accvideo_core import kernels
    from accvideo_core.kernels import reference as ref

    dtype = getattr(torch, p.get("dtype", "float32"))
    low = dtype != torch.float32
    offset = p.get("offset", 0.0)

    def grads(out, inputs, grad_out):
        return torch.autograd.grad(out, inputs, grad_out)

    if kernel == "rms_norm_rope":
        d = p["shape"][-1]
        if p.get("qkv_view"):  # q as the transformer gets it: a strided view into the fused qkv projection
            b, l, h, d = p["shape"]
            x = torch.randn(b, l, 3, h, d)[:, :, 0]
        else:
            x = torch.randn(*p["shape"])
        weight = torch.rand(d) + 0.5
        cos = sin = None
        if p["n_rope"] is not None:
            angles = torch.randn(p["n_rope"], d // 2) * 3
            cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
        args = lambda xx, ww: (xx, ww, cos, sin, 1e-6)  # noqa: E731
        inputs = [x, weight]
        call = (kernels.rms_norm_rope, ref.rms_norm_rope)
    elif kernel == "layer_norm_modulate":
        b, l, c = p["shape"]
        x = torch.randn(b, l, c) * 2 + offset
        if p.get("chunked"):  # shift/scale as chunks of the block's modulation vector [B, 6C]
            mod = torch.randn(b, 6 * c) * 0.5
            shift, scale = mod[:, :c], mod[:, c:2 * c]
        else:
            shift, scale = torch.randn(b, c), torch.randn(b, c) * 0.5
        args = lambda xx, ss, cc: (xx, ss, cc, 1e-6)  # noqa: E731
        inputs = [x, shift, scale]
        call = (kernels.layer_norm_modulate, ref.layer_norm_modulate)
    elif kernel == "gated_residual":
        b, l, c = p["shape"]
        x, y = torch.randn(b, l, c), torch.randn(b, l, c)
        gate = torch.randn(b, 3 * c)[:, c:2 * c] if p.get("chunked") else torch.randn(b, c)
        args = lambda xx, yy, gg: (xx, yy, gg)  # noqa: E731
        inputs = [x, y, gate]
        call = (kernels.gated_residual, ref.gated_residual)
    elif kernel == "group_norm_silu":
        shape, groups = p["shape"], p["groups"]
        x = torch.randn(*shape) * 1.5 + offset
        affine = p.get("affine", True)
        weight = torch.randn(shape[1]) * 0.5 + 1.2 if affine else None
        bias = torch.randn(shape[1]) * 0.3 if affine else None
        silu = p.get("silu", True)
        if p.get("tiled"):  # whole-volume statistics, applied tile by tile along time
            s1, q1, n1 = ref.group_norm_stats(x[:, :, :1], groups)
            s2, q2, n2 = ref.group_norm_stats(x[:, :, 1:], groups)
            mean, rstd = ref.stats_to_mean_rstd(s1 + s2, q1 + q2, n1 + n2, 1e-6)

            def tiled(fn, xx, ww, bb):
                return torch.cat([fn(xx[:, :, sl], ww, bb, groups, 1e-6, silu, mean, rstd)
                                  for sl in (slice(0, 1), slice(1, None))], dim=2)
            call = (lambda *a: tiled(kernels.group_norm_silu, *a), lambda *a: tiled(ref.group_norm_silu, *a))
            args = lambda xx, ww, bb: (xx, ww, bb)  # noqa: E731
        else:
            call = (kernels.group_norm_silu, ref.group_norm_silu)
            args = lambda xx, ww, bb: (xx, ww, bb, groups, 1e-6, silu)  # noqa: E731
        inputs = [x, weight, bias]
    elif kernel == "group_norm_stats":  # on a time slice (strided view) of a video, as the VAE accumulates them
        shape, groups = p["shape"], p["groups"]
        video = (torch.randn(*shape) * 1.5 + offset).to(dtype)
        tile = video[:, :, 1:4]
        got, want = kernels.group_norm_stats(tile, groups), ref.group_norm_stats(tile, groups)
        m_got = ref.stats_to_mean_rstd(*got, 1e-6)
        m_want = ref.stats_to_mean_rstd(*want, 1e-6)
        return {"dtype_ok": got[0].dtype == want[0].dtype == torch.float64 and got[2] == want[2],
                "out": max(_diff(m_got[0], m_want[0]), _diff(m_got[1], m_want[1])),
                "sums_rel": max(_diff(got[0], want[0]) / want[2], _diff(got[1], want[1]) / want[1].abs().max().item()),
                "no_grad": True}
    else:
        raise ValueError(kernel)

    result: dict = {}
    if low:
        # Compare accuracy against the fp32 reference: the kernel must be as accurate as the reference in low
        # precision (it rounds where the reference rounds, but otherwise computes in fp32).
        low_idx = p.get("low_only", range(len(inputs)))  # mixed precision: only these inputs in low precision
        low_in = [None if t is None else (t.to(dtype) if i in low_idx else t.clone()).requires_grad_(True)
                  for i, t in enumerate(inputs)]
        exact_in = [t.detach().float().requires_grad_(True) if t is not None else None for t in low_in]
        exact = call[1](*args(*exact_in))
        got = call[0](*args(*low_in))
        want = call[1](*args(*low_in))
        result.update(dtype_ok=got.dtype == want.dtype, err_kernel=_diff(got, exact), err_reference=_diff(want, exact),
                      out=_diff(got, want), scale=exact.abs().max().item())
        grad_out = torch.randn_like(exact)
        g_exact = grads(exact, [t for t in exact_in if t is not None], grad_out)
        g_got = grads(got, [t for t in low_in if t is not None], grad_out.to(dtype))
        g_want = grads(want, [t for t in low_in if t is not None], grad_out.to(dtype))
        result["grads_low"] = [dict(err_kernel=_diff(a, e), err_reference=_diff(b, e), scale=e.abs().max().item())
                               for a, b, e in zip(g_got, g_want, g_exact)]
        return result

    grad_inputs = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    got = call[0](*args(*grad_inputs))
    want = call[1](*args(*grad_inputs))
    result["out"] = _diff(got, want)
    result["dtype_ok"] = got.dtype == want.dtype and got.shape == want.shape
    grad_out = torch.randn_like(want)
    wanted = [t for t in grad_inputs if t is not None]
    for i, (g_got, g_want) in enumerate(zip(grads(got, wanted, grad_out), grads(want, wanted, grad_out))):
        result[f"grad{i}"] = _diff(g_got, g_want)
        result[f"grad{i}_scale"] = g_want.abs().max().item()
    return result


def _model_cases() -> dict:
    """Whole models through the kernel API, Triton vs the reference: the tiny transformer (forward + every
    parameter gradient) and the tiny VAE decoder. (Supplied GroupNorm statistics are covered kernel-level.)"""
    import torch

    from accvideo_core import kernels

    out: dict = {}
    try:
        from accvideo_core.testing import randomize_, tiny_inputs, tiny_transformer
        from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig
    except ImportError as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}

    model = tiny_transformer(seed=3)
    inputs = tiny_inputs(model.config, frames=2, height=4, width=6, text_len=5, valid=[3], seed=4)
    grad_out = None
    runs = {}
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)
        model.zero_grad(set_to_none=True)
        velocity = model(**inputs, guidance=6.0)
        grad_out = torch.randn_like(velocity, generator=torch.Generator().manual_seed(5)) if grad_out is None \
            else grad_out
        (velocity * grad_out).sum().backward()
        runs[backend] = (velocity.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    (v_ref, g_ref), (v_tri, g_tri) = runs["torch"], runs["triton"]
    out["transformer"] = {
        "out": _diff(v_tri, v_ref), "scale": v_ref.abs().max().item(), "n_grads": len(g_ref),
        "same_grad_names": sorted(g_ref) == sorted(g_tri),
        "grad": max(_diff(g_tri[n], g_ref[n]) / max(1.0, g_ref[n].abs().max().item()) for n in g_ref),
    }

    vae = randomize_(HunyuanVideoVAE(VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                               norm_num_groups=4, has_encoder=False)), seed=6).eval()
    z = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(7))
    videos = {}
    with torch.no_grad():  # untiled: the interpreter is too slow for the many small tiles of a chunked decode
        for backend in ("torch", "triton"):
            kernels.set_backend(backend)
            videos[backend] = vae.decode(z, mode="untiled")
    kernels.set_backend("triton")
    out["vae_decode"] = {"out": _diff(videos["triton"], videos["torch"]), "scale": videos["torch"].abs().max().item()}
    return out


def _worker(out_path: str, device: str = "cpu") -> None:
    """Run every case on the Triton path: in the interpreter on CPU, or compiled on ``device="cuda"``."""
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.set_default_device(device)

    from accvideo_core import kernels
    from accvideo_core.kernels import triton_kernels

    kernels.set_backend("triton")  # any fallback to the reference raises instead of passing silently
    import triton

    report = {"triton_version": triton.__version__, "interpret": triton_kernels.INTERPRET, "cases": {}}
    default_partial_rows = triton_kernels._MAX_PARTIAL_ROWS
    for case_id, kernel, params in CASES:
        torch.manual_seed(zlib.crc32(case_id.encode()))
        chosen = kernels._impl(kernel, torch.zeros(1))
        assert chosen is getattr(triton_kernels, kernel), f"dispatch did not choose Triton for {kernel}"
        # a tiny cap on the backward partial-sum rows makes small inputs take several token-loop iterations
        triton_kernels._MAX_PARTIAL_ROWS = params.get("partial_rows", default_partial_rows)
        try:
            report["cases"][case_id] = _run_case(kernel, params)
        except Exception as exc:  # recorded so the failing case names itself in the parent's test
            report["cases"][case_id] = {"error": f"{type(exc).__name__}: {exc}"}
    triton_kernels._MAX_PARTIAL_ROWS = default_partial_rows
    torch.set_default_device("cpu")
    if device == "cpu":
        try:
            report["models"] = _model_cases()
        except Exception as exc:
            report["models"] = {"error": f"{type(exc).__name__}: {exc}"}
    errors = {}
    x = torch.randn(2, 3, 4, 8)
    for name, fn in [("rope_weight", lambda: kernels.rms_norm_rope(x, torch.ones(4))),
                     ("rope_cos_too_long", lambda: kernels.rms_norm_rope(x, torch.ones(8), torch.ones(4, 8),
                                                                         torch.ones(4, 8))),
                     ("ln_shift", lambda: kernels.layer_norm_modulate(x[0], torch.ones(3), torch.ones(2, 8))),
                     ("gated_gate", lambda: kernels.gated_residual(x[0], x[0], torch.ones(2, 3, 8))),
                     ("gn_groups", lambda: kernels.group_norm_silu(x, None, None, 4))]:
        try:
            fn()
            errors[name] = "no error"
        except ValueError as exc:
            errors[name] = str(exc)
    report["errors"] = errors
    Path(out_path).write_text(json.dumps(report, indent=1))


def _compile_worker(out_path: str, archs: list[int]) -> None:
    """Compile every kernel launch the wrappers make (bf16, HunyuanVideo-like block sizes, forward and backward) to
    a CUDA binary for each ``sm_<arch>`` ahead of time: no GPU needed, catches what the interpreter cannot (codegen,
    types, constexpr handling). Launches are intercepted and compiled instead of run."""
    os.environ.pop("TRITON_INTERPRET", None)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from accvideo_core.kernels import triton_kernels as tk

    type_names = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

    def ptxas_usage(kernel, arch: int) -> dict:
        """Registers and spill bytes per thread, as Triton's bundled ptxas reports them for this PTX."""
        ptx = Path(out_path).with_suffix(".ptx")
        ptx.write_text(kernel.asm["ptx"])
        target = re.search(r"\.target (sm_\w+)", kernel.asm["ptx"]).group(1)  # sm_90a on Hopper
        info = subprocess.run([str(ptxas), f"-arch={target}", "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                              capture_output=True, text=True).stderr
        registers = re.search(r"Used (\d+) registers", info)
        spills = re.search(r"(\d+) bytes spill stores", info)
        return {"registers": int(registers.group(1)) if registers else None,
                "spill_bytes": int(spills.group(1)) if spills else None}

    compiled: dict[str, dict] = {}

    def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(self.arg_names, args)) | kwargs
        signature, constexprs = {}, {}
        for param in self.params:
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif torch.is_tensor(value):
                signature[param.name] = type_names[value.dtype]
            elif isinstance(value, float):
                signature[param.name] = "fp32"
            else:
                signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        for arch in archs:
            key = f"{arch}{self.fn.__name__}{sorted(constexprs.items())}{sorted(signature.items())}"
            if key not in compiled:
                kernel = triton.compile(ASTSource(self, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                        options=options)
                compiled[key] = {"arch": arch, "kernel": self.fn.__name__, "cubin_bytes": len(kernel.asm["cubin"]),
                                 "constexprs": {k: str(v) for k, v in constexprs.items()},
                                 **ptxas_usage(kernel, arch)}

    JITFunction.run = compile_instead_of_launch
    bf16 = dict(dtype=torch.bfloat16)
    q = torch.randn(1, 6, 3, 2, 128, **bf16)[:, :, 0].requires_grad_()
    w = torch.randn(128, **bf16).requires_grad_()
    cos = sin = torch.ones(4, 128)
    (tk.rms_norm_rope(q, w, cos, sin).float().sum() + tk.rms_norm_rope(q, w).float().sum()).backward()
    x = torch.randn(1, 4, 3072, **bf16).requires_grad_()
    mod = torch.randn(1, 3072, **bf16).requires_grad_()
    tk.layer_norm_modulate(x, mod, mod).float().sum().backward()
    tk.gated_residual(x, x, mod).float().sum().backward()
    v = torch.randn(1, 8, 2, 32, 32, **bf16)
    gw = torch.ones(8, **bf16)
    tk.group_norm_silu(v, gw, gw, 2)
    tk.group_norm_silu(v, gw, gw, 2, mean=torch.zeros(1, 2), rstd=torch.ones(1, 2))
    tk.group_norm_stats(v[:, :, 1:], 2)
    defined = sorted(name for name, obj in vars(tk).items()  # launched kernels (pointer args), not jit helpers
                     if isinstance(obj, JITFunction) and obj.arg_names[0].endswith("_ptr"))
    Path(out_path).write_text(json.dumps({"archs": archs, "triton_version": triton.__version__, "defined": defined,
                                          "compiled": list(compiled.values())}, indent=1))


# ----------------------------------------------------------------------------------------------- pytest side

COMPILE_ARCHS = (80, 90)  # sm_80 (A100) and sm_90a (H100/H200, the cards the GPU check targets)


@pytest.fixture(scope="module")
def worker_reports(tmp_path_factory):
    """Run the interpreter worker and the ahead-of-time CUDA compile worker side by side (one core each)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed: `pip install -r requirements-test.txt` to run the Triton kernels "
                    "in the interpreter (the torch reference is still tested elsewhere)")
    out_dir = tmp_path_factory.mktemp("triton")
    base_env = {k: v for k, v in os.environ.items() if k not in ("ACCVIDEO_KERNELS", "TRITON_INTERPRET")}
    jobs = {
        "interpret": ([str(out_dir / "interpret.json")], {**base_env, "TRITON_INTERPRET": "1"}),
        "compile": (["--compile", ",".join(map(str, COMPILE_ARCHS)), str(out_dir / "compile.json")],
                    {**base_env, "TRITON_CACHE_DIR": str(out_dir / "cache")}),
    }
    procs = {name: subprocess.Popen([sys.executable, __file__, *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, (argv, env) in jobs.items()}
    reports = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        reports[name] = (proc.returncode, stdout + stderr, Path(jobs[name][0][-1]))
    return reports


def _report(worker_reports, name):
    code, output, path = worker_reports[name]
    assert code == 0, f"{name} worker failed:\n{output}"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def interpreter_report(worker_reports):
    return _report(worker_reports, "interpret")


def test_every_kernel_compiles_for_cuda(worker_reports):
    report = _report(worker_reports, "compile")
    assert len(report["defined"]) == 8, report["defined"]
    for arch in COMPILE_ARCHS:
        compiled = [c for c in report["compiled"] if c["arch"] == arch]
        assert {c["kernel"] for c in compiled} == set(report["defined"]), (arch, report)
        assert all(c["cubin_bytes"] > 0 for c in compiled)
        # register spills would cost memory traffic in kernels whose point is saving it
        assert all(c["spill_bytes"] == 0 for c in compiled), compiled
        # both RoPE variants (image tokens, text tokens) and both GroupNorm variants (own / supplied statistics)
        assert len(compiled) == 11, [(c["kernel"], c["constexprs"]) for c in compiled]


def test_worker_ran_in_interpreter(interpreter_report):
    assert interpreter_report["interpret"] is True
    assert set(interpreter_report["cases"]) == {c[0] for c in CASES}


@pytest.mark.parametrize("case_id", [c[0] for c in CASES])
def test_kernel_matches_reference(interpreter_report, case_id):
    _check_case(interpreter_report["cases"][case_id])


def _check_case(res: dict) -> None:
    assert "error" not in res, res.get("error")
    assert res["dtype_ok"], "output dtype/shape differs from the reference"
    if "err_kernel" in res:  # bf16/fp16: no less accurate than the reference (+ half a bf16 ulp of slack)
        assert res["err_kernel"] <= res["err_reference"] + res["scale"] * 2.0 ** -9, res
        assert res["out"] <= res["scale"] * 2.0 ** -6, res  # and within ~2 bf16 ulps of the reference itself
        assert res["grads_low"], "no gradient was checked"
        for i, g in enumerate(res["grads_low"]):
            assert g["err_kernel"] <= g["err_reference"] + g["scale"] * 2.0 ** -8, (i, g)
        return
    assert res["out"] <= FP32_TOL, res  # for bf16 inputs to group_norm_stats: fp32/fp64 statistics of them
    if res.get("no_grad"):  # statistics only: relative error of the fp64 sums, too
        assert res["sums_rel"] <= 1e-6, res
        return
    grad_keys = [k for k in res if k.startswith("grad") and not k.endswith("_scale")]
    assert grad_keys, "no gradient was checked"
    for key in grad_keys:
        # fp32 gradients: 1e-5 absolute, relaxed only for reductions whose magnitude exceeds 1 (weight/shift
        # sums over many rows), where 1e-5 relative is the meaningful bound
        assert res[key] <= FP32_TOL * max(1.0, res[f"{key}_scale"]), (key, res)


def test_compiled_kernels_on_cuda(tmp_path):
    """The same cases with the compiled kernels on a GPU (runs only where CUDA and Triton are present)."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        pytest.skip("no CUDA device (or no Triton): compiled kernels are covered here by the sm_80 / sm_90a "
                    "compile test")
    out = tmp_path / "cuda.json"
    env = {k: v for k, v in os.environ.items() if k not in ("ACCVIDEO_KERNELS", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, __file__, "--cuda", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["cases"]) == {c[0] for c in CASES}
    failures = {}
    for case_id, res in report["cases"].items():
        try:
            _check_case(res)
        except AssertionError as exc:
            failures[case_id] = str(exc)
    assert not failures, failures


@pytest.mark.parametrize("model", ["transformer", "vae_decode"])
def test_models_through_triton_kernels_match_reference(interpreter_report, model):
    models = interpreter_report["models"]
    if "unavailable" in models:
        pytest.skip(f"model code not importable: {models['unavailable']}")
    assert "error" not in models, models["error"]
    res = models[model]
    # whole-model fp32 differences accumulate over many kernels, matmuls and attention: 1e-5 of the output scale
    assert res["out"] <= 1e-5 * max(1.0, res["scale"]), res
    if model == "transformer":
        assert res["same_grad_names"] and res["n_grads"] > 50, res
        assert res["grad"] <= 1e-5, res


def test_shape_errors_are_clear(interpreter_report):
    errors = interpreter_report["errors"]
    assert "weight [D]" in errors["rope_weight"]
    assert "L_rope <= 3" in errors["rope_cos_too_long"]
    assert "shift and scale [B, C]" in errors["ln_shift"]
    assert "gate [B, C]" in errors["gated_gate"]
    assert "divisible by num_groups=4" in errors["gn_groups"]


if __name__ == "__main__":
    if sys.argv[1] == "--compile":
        _compile_worker(sys.argv[3], [int(a) for a in sys.argv[2].split(",")])
    elif sys.argv[1] == "--cuda":
        _worker(sys.argv[2], device="cuda")
    else:
        _worker(sys.argv[1])
