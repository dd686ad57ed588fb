"""``python -m bench.gpu``: the --smoke run on the CPU (every part, tiny sizes) with the packages a bare GPU machine
lacks blocked at import, the harness that kills a hung part and keeps its finished sub-steps, and the sub-step
bookkeeping. No timing is asserted."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("einops", "diffusers", "imageio_ffmpeg", "imageio", "PIL", "comfy", "peft", "transformers", "tqdm")

# Runs bench.gpu --smoke with BLOCKED unimportable (as on a machine with only torch, triton, safetensors, numpy),
# then lists the third-party top-level modules that were imported.
_BLOCKED_RUN = """
import importlib.abc, importlib.util, json, runpy, sys
BLOCKED = set(%r)

ASKED = set()

class Blocker(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # importing a blocked package fails as if it were not installed (its spec resolves, loading raises); every
    # attempt is recorded, also one that the importing code catches

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            ASKED.add(name.split(".")[0])
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (blocked: not on a bare GPU machine)")

    def exec_module(self, module):
        raise AssertionError("unreachable")

sys.meta_path.insert(0, Blocker())
sys.argv = ["bench.gpu", "--smoke", "--out", sys.argv[1]]
try:
    runpy.run_module("bench.gpu", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
top = {m.split(".")[0] for m in list(sys.modules)}
third_party = sorted(m for m in top if m not in sys.stdlib_module_names and not m.startswith("_"))
print("IMPORTED" + json.dumps({"code": code, "modules": third_party, "asked": sorted(ASKED)}))
""" % (BLOCKED,)


def _allowed_modules() -> set[str]:
    """Top-level modules of torch, triton, safetensors, numpy and everything they require (transitively), plus ours."""
    import importlib.metadata as md
    import re

    dists, todo = set(), ["torch", "triton", "safetensors", "numpy"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in dists:
            continue
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        dists.add(name)
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r]
    allowed = {"accvideo_core", "bench", "tests", "conftest", "cython_runtime"}  # the last: made by Cython
    for module, owners in md.packages_distributions().items():
        if any(o.lower().replace("_", "-") in dists for o in owners):
            allowed.add(module)
    return allowed


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("ACCVIDEO_KERNELS", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", _BLOCKED_RUN, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    imported = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("IMPORTED"))[len("IMPORTED"):])
    return {"report": json.loads(out.read_text()), "stdout": proc.stdout, "imported": imported}


def test_smoke_runs_every_part_without_the_missing_packages(smoke):
    assert smoke["imported"]["code"] == 0
    report = smoke["report"]
    assert report["meta"]["smoke"] is True and report["meta"]["device"] == "cpu"
    assert list(report["parts"]) == ["a", "b", "c", "d", "e"]
    for part, result in report["parts"].items():
        assert result["status"] == "ok", (part, result["status"])
        for name, step in result["steps"].items():
            assert "error" not in step, (part, name, step)
            if "skipped" in step:  # only the Triton comparisons, which need CUDA or the interpreter
                assert part == "a" and "Triton" in step["skipped"], (part, name, step)


def test_smoke_imports_only_torch_triton_safetensors_numpy(smoke):
    extra = set(smoke["imported"]["modules"]) - _allowed_modules()
    assert not extra, f"bench.gpu imported packages a bare GPU machine may lack: {sorted(extra)}"
    assert not set(smoke["imported"]["modules"]) & set(BLOCKED)
    # einops is imported only by sequence parallelism (docs/architecture.md#dependencies): no part even tries it
    assert "einops" not in smoke["imported"]["asked"], smoke["imported"]["asked"]


def test_smoke_fills_the_table_and_checks(smoke):
    report, stdout = smoke["report"], smoke["stdout"]
    figures = {k for r in report["parts"].values() for k in r["figures"]}
    for key in ("a_bf16", "c_544x960x93_block", "c_544x960x93_steps", "c_720x1280x129_steps", "c_fp8",
                "d_untiled", "d_exact_0.5", "d_exact_0.25", "d_fast", "e_step", "e_lora_fp8_offload"):
        assert key in figures, key
        assert f"| {report['parts'][key[0]]['figures'][key]} |" in stdout
    checks = report["validity"]["checks"]
    names = " ".join(c["name"] for c in checks)
    for needed in ("bf16 vs fp32", "block times", "VAE exact (0.5)", "VAE exact decode peak", "fp8 blocks"):
        assert needed in names, needed
    # the exact decodes equal the untiled one (fp32 in --smoke): a correctness check that must hold on any machine
    assert all(c["ok"] for c in checks if "VAE exact (" in c["name"] or "bf16 vs fp32" in c["name"]), checks
    c = report["parts"]["c"]["steps"]["544x960x93"]["backends"]["sdpa"]
    assert c["transformer_s_50_steps"] == pytest.approx(10 * c["transformer_s_5_steps"])
    e = report["parts"]["e"]["steps"]
    assert set(e["first_step"]["losses"]) == {"traj", "adv_g", "adv_d"}  # trajectory and adversarial terms
    assert e["lora_fp8_offload_step"]["fp8_weights"] > 0   # the LoRA step ran on an fp8 base


def test_smoke_on_the_triton_path_in_the_interpreter(tmp_path):
    """Parts c and e with the Triton kernels (in Triton's interpreter on CPU) instead of the reference: the wiring a
    GPU run uses - bf16 real-width blocks, kernels first used inside gradient-checkpointed training blocks - must
    run and pass every first-use self-check (a KernelMismatchWarning would name the kernel)."""
    pytest.importorskip("triton")
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "ACCVIDEO_KERNELS"}
    env.update(PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--smoke", "--parts", "ce", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "KernelMismatchWarning" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["parts"]) == ["c", "e"]
    for part, result in report["parts"].items():
        assert result["status"] == "ok", (part, result["status"])
        for name, step in result["steps"].items():
            assert "error" not in step and "skipped" not in step, (part, name, step)
    assert report["parts"]["e"]["steps"]["first_step"]["losses"], report["parts"]["e"]["steps"]


def test_a_hung_part_is_killed_and_keeps_its_finished_steps(tmp_path):
    from bench.gpu import spawn_part

    out = tmp_path / "part.json"
    hang = textwrap.dedent(f"""
        import json, time
        open({str(out)!r}, "w").write(json.dumps({{"steps": {{"first": {{"value": 1}}}}, "checks": [],
                                                   "figures": {{"x": "done"}}}}))
        time.sleep(120)
        """)
    result = spawn_part([sys.executable, "-c", hang], budget=1.0, out=out, grace=2.0)
    assert result["status"].startswith("timed out"), result
    assert result["steps"] == {"first": {"value": 1}} and result["figures"] == {"x": "done"}
    assert result["wall_seconds"] < 60

    crash = spawn_part([sys.executable, "-c", "raise SystemExit(3)"], budget=5.0, out=tmp_path / "none.json",
                       grace=5.0)
    assert crash["status"] == "failed: the subprocess exited with code 3" and crash["steps"] == {}


def test_a_part_runs_as_the_child_subprocess_a_gpu_run_uses(tmp_path):
    """On a GPU every part runs as ``python -m bench.gpu --child X`` (--smoke runs them in-process): that command
    line, its argument parsing and its result file, end to end on part a."""
    from bench.gpu import spawn_part

    out = tmp_path / "gpu_part_a.json"
    cmd = [sys.executable, "-m", "bench.gpu", "--child", "a", "--budget", "200", "--child-out", str(out), "--smoke"]
    result = spawn_part(cmd, budget=200.0, out=out)
    assert result["status"] == "ok", result
    assert "rel_error" in result["steps"]["transformer_bf16_vs_fp32"] and "a_bf16" in result["figures"], result


def test_sub_steps_record_errors_and_skips_and_go_on(tmp_path):
    import torch

    from bench.gpu import PartRun

    run = PartRun("x", budget=30.0, device="cpu", smoke=True, peaks={}, out=None)

    def boom():
        raise RuntimeError("kernel launch failed")
    assert run.step("broken", boom) is None
    assert run.step("too_long", lambda: {"v": 1}, need=1e6) is None
    assert run.step("fine", lambda: {"v": 2}) == {"v": 2, "seconds_total": pytest.approx(0, abs=5)}
    written = PartRun("w", budget=30.0, device="cpu", smoke=True, peaks={}, out=tmp_path / "w.json")
    written.step("odd", lambda: {"dtype": torch.bfloat16, "shape": torch.Size([2, 3])})  # not JSON: repr, no error
    assert json.loads((tmp_path / "w.json").read_text())["steps"]["odd"]["dtype"] == "torch.bfloat16"
    steps = run.result["steps"]
    assert "RuntimeError: kernel launch failed" in steps["broken"]["error"]
    assert "needs ~1000000 s" in steps["too_long"]["skipped"]
    samples, errors = run.interleaved({"ok": lambda: 1, "bad": boom}, rounds=3)
    assert list(samples) == ["ok"] and len(samples["ok"]) == 3 and "kernel launch failed" in errors["bad"]
    calls = []

    def fails_in_second_round():  # call 1 is the warm-up
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory")
    samples, errors = run.interleaved({"ok": lambda: 1, "flaky": fails_in_second_round}, rounds=3)
    assert len(samples["ok"]) == 3 and samples["flaky"] == [pytest.approx(0, abs=5)], samples
    assert errors == {"flaky": "round 2: RuntimeError: CUDA out of memory"}
    expired = PartRun("y", budget=0.0, device="cpu", smoke=True, peaks={}, out=None)
    assert expired.interleaved({"ok": lambda: 1}, rounds=3) == ({}, {"ok": "not run: out of time"})


def test_device_table_and_unknown_devices():
    from bench.devices import device_peaks

    assert device_peaks("NVIDIA H100 80GB HBM3")["bandwidth_gbs"] == 3350
    assert device_peaks("NVIDIA H100 PCIe")["bandwidth_gbs"] == 2000
    assert device_peaks("NVIDIA H200")["bf16_tflops"] == 989
    assert device_peaks("NVIDIA A100-SXM4-80GB")["bf16_tflops"] == 312
    assert device_peaks("NVIDIA GeForce RTX 4090")["match"] == "RTX 4090"
    assert device_peaks("NVIDIA L40S")["match"] == "L40S"
    assert device_peaks("Some Future GPU") == {"match": None, "bandwidth_gbs": None, "bf16_tflops": None}
    from bench.gpu import summary

    report = {"meta": {"name": "Tesla V100-SXM2-32GB", "peaks": device_peaks("Tesla V100-SXM2-32GB"),
                       "torch": "2.11", "triton": "3.6"}, "parts": {}, "validity": {"valid": True, "failed": []}}
    assert "900 GB/s, no bf16 peak" in summary(report)  # a known card without a bf16 figure still prints


def test_fp32_comparisons_run_without_tf32():
    """Part a compares fp32 paths at 1e-5: cuDNN's default TF32 convolutions must be off inside, restored after."""
    import torch

    from bench.gpu_parts import ieee_fp32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # CUDA builds' conv default
    try:
        with pytest.raises(RuntimeError, match="inside"), ieee_fp32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("inside")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_bf16_ulp_matches_torch():
    """Part d's exact-decode tolerance counts bf16 units in the last place."""
    import torch

    from bench.gpu_parts import bf16_ulp

    for value in (1.0, 3.4, 4.06, 0.75, 250.0, -2.5):
        x = torch.tensor(value).bfloat16()
        step = float(torch.nextafter(x.abs(), torch.tensor(float("inf")).bfloat16()) - x.abs())
        assert bf16_ulp(value) == step, (value, bf16_ulp(value), step)
