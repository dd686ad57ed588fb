"""One prepared GPU check: every CUDA path and real-size figure in one command, under a hard time limit.

    python -m bench.gpu                 # one CUDA GPU, <= ~8 minutes on an H100-class card
    python -m bench.gpu --smoke         # the same script on the CPU with tiny sizes, < 1 minute (run by the tests)
    python -m bench.gpu --parts cd      # only some parts

Needs only torch, Triton, safetensors and the core library (no diffusers, video or image packages, nothing
downloaded). Parts: (a) correctness on the device (Triton kernels vs the reference in fp32 / bf16 / fp16, forward and
backward; the tiny transformer and VAE on the Triton path vs the reference path; bf16 vs fp32), (b) kernel
bandwidth against the device peak, Triton vs eager vs torch.compile, (c) real-width transformer blocks at the token
counts of 544x960x93 and 720x1280x129 per attention backend, with the extrapolated 5- and 50-step seconds next to the
paper's A100 figures and fp8 weights against bf16, (d) full-size VAE decode at 544x960x93, (e) one training step of
a 2-block real-width model at 544p against ``train.estimate``, full and in the one-GPU LoRA setting (fp8 base,
offloaded checkpoints).

Each part runs in its own subprocess with a time budget (``PARTS``; all within ``--total`` seconds). Inside, every
sub-step first checks that its estimated time fits what is left; a part that fails or overruns is killed and
recorded with whatever it had finished, and the next part runs. Results are written after every sub-step to
``bench/out/gpu.json``; a markdown table is printed at the end; the exit code is 0 whenever results were written.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.validity import verdict  # noqa: E402

# part -> (what, budget in seconds on the GPU); the sum stays under the default total of 460 s.
PARTS: dict[str, tuple[str, float]] = {
    "a": ("correctness on the device", 45), "b": ("kernel bandwidth", 85), "c": ("transformer at real width", 140),
    "d": ("VAE decode 544x960x93", 110), "e": ("training step at 544p", 70)}
# seconds per part with --smoke: generous, so a loaded CI machine still runs every code path (about 5 s per part
# on an idle 2-core machine); budget skips themselves are tested on PartRun directly
SMOKE_BUDGET = 300.0
STARTUP_GRACE = 25.0  # seconds a part's subprocess may spend importing torch and initialising CUDA

# (figure key, part, what, reference) rows of the summary table; docs/benchmarks.md shows the same rows.
FIGURES: list[tuple[str, str, str, str]] = [
    ("a_kernels", "a", "Triton kernels vs reference (fp32/bf16/fp16, fwd + bwd)", "all match"),
    ("a_models", "a", "tiny transformer (output + grads) and VAE, Triton path vs reference, max diff / max(1, scale)",
     "<= 1e-5"),
    ("a_bf16", "a", "our transformer, bf16 vs fp32, relative error", "<= 5e-2"),
    ("b_rms_norm_rope", "b", "RMSNorm + RoPE fwd, 49216 x 24 x 128 bf16 (Triton)", "device peak"),
    ("b_layer_norm_modulate", "b", "LayerNorm + modulation fwd, 49216 x 3072", "device peak"),
    ("b_gated_residual", "b", "gated residual fwd, 49216 x 3072", "device peak"),
    ("b_group_norm_silu", "b", "GroupNorm + SiLU, 128 x 25 x 272 x 480", "device peak"),
    ("b_group_norm_stats", "b", "GroupNorm statistics of a time slice", "device peak"),
    ("c_544x960x93_block", "c", "544x960x93 (49216 tokens): ms per double / single block", "-"),
    ("c_544x960x93_steps", "c", "544x960x93: 5 / 50 steps of 20 + 40 blocks", "paper, A100, end to end: 91 s / 704 s"),
    ("c_720x1280x129_block", "c", "720x1280x129 (119056 tokens): ms per double / single block", "-"),
    ("c_720x1280x129_steps", "c", "720x1280x129: 5 / 50 steps of 20 + 40 blocks",
     "paper, A100, end to end: 380 s / 3234 s"),
    ("c_fp8", "c", "fp8 e4m3fn weights, per-layer scale, vs bf16 (544p blocks): time, weight bytes, output",
     "rel. diff <= 0.1"),
    ("d_untiled", "d", "VAE decode 544x960x93 bf16, untiled: time, peak", "-"),
    ("d_exact_0.5", "d", "exact, budget = weights + 1/2 untiled activations", "max abs <= 8 bf16 ulps at the largest value"),
    ("d_exact_0.25", "d", "exact, budget = weights + 1/4 untiled activations", "max abs <= 8 bf16 ulps at the largest value"),
    ("d_fast", "d", "fast (tiled), budget as above", "approximate"),
    ("e_step", "e", "training step, 1 + 1 blocks at 544p, checkpointed, traj + adv", "train.estimate"),
    ("e_lora_fp8_offload", "e", "the same in LoRA mode r16 on an fp8 base with offloaded checkpoints",
     "train.estimate --lora-rank 16 --fp8-base --offload"),
]


def _short_error(exc: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"

# What a code review without a GPU could not settle: the first GPU run should look at these (docs/benchmarks.md
# shows them under the table).
FIRST_RUN_WATCH: list[str] = [
    "With only minutes on the card, `python -m bench.gpu --smoke` first: every part at tiny sizes on the GPU in one "
    "process (about a minute, most of it compiling Triton kernels: the CUDA wiring and every self-check), then the "
    "full run.",
    "Triton (and torch.compile) build a small launcher with the system C compiler at first use: on an image "
    "without gcc/cc every Triton check fails with 'Failed to find C compiler' and the reference runs instead "
    "(install gcc or set CC, then run again).",
    "Triton compilation on a cold cache (~45 kernel variants in part a, more at the real sizes of b, c, e) eats "
    "into the budgets: part a records its kernel checks per dtype, so an overrun keeps what was checked. A second "
    "run (warm `~/.triton/cache`) shows the steady state.",
    "The first-use self-check of compiled kernels (approximate division, sqrt and exp in compiled Triton): fp32 "
    "must stay within 1e-4 of the output scale, bf16/fp16 within 2x the reference's own error + 2^-6 / 2^-9; a "
    "`KernelMismatchWarning` line or a failed 'Triton ... matches the reference' check names the kernel.",
    "Part d at 1/4 budget keeps its ~41 GB activation store in host RAM (pageable copies over PCIe): it runs last "
    "and may not fit the part's budget; it also convolves tiles of more than 2^31 elements (cuDNN's 64-bit path, "
    "cuDNN >= 9.3, else PyTorch falls back to a conv3d that cannot allocate its buffer).",
    "The untiled 544x960x93 decode (~102 GB estimated) runs only on cards with more memory (H200): full-size "
    "activations of 6.4e9 elements through replicate padding, cuDNN and the Triton GroupNorm; the exact decodes' "
    "peaks must stay within their budgets (+5 %).",
    "Part c's `sdpa:cudnn` backend at 119k tokens: a failure is recorded, but a sticky CUDA error would spoil the "
    "other backends' rounds of that size and the fp8 step.",
    "Part b's torch.compile column compiles on a cold Inductor cache inside the first case (tens of seconds); the "
    "later cases skip it when less than 60 s are left.",
    "Part e's first step: Triton kernels first used inside gradient-checkpointed blocks under bf16 autocast (fixed "
    "for the self-check's autograd; a CheckpointError there would be new), peak memory vs `train.estimate`.",
    "Part e's LoRA step (fp8 base, offloaded checkpoints; runs only if the part's budget has room for it): its "
    "activation peak should be a small fraction of the full step's (`lora_vs_full` in gpu.json) and its peak near "
    "`train.estimate --lora-rank 16 --fp8-base --offload` at this size; its seconds against the full step's show "
    "what the host copies cost (pinned, asynchronous on the compute stream).",
]


class PartRun:
    """What a part gets: its deadline, the device and its peaks, and ways to time, record and check."""

    def __init__(self, part: str, budget: float, device: str, smoke: bool, peaks: dict, out: Path | None):
        self.part, self.budget, self.device, self.smoke, self.peaks, self.out = part, budget, device, smoke, peaks, out
        self.started = time.monotonic()
        self.result: dict = {"steps": {}, "checks": [], "figures": {}}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def flush(self) -> None:
        """Write the result so far; a value JSON cannot hold (a tensor, a dtype) is written as its repr."""
        if self.out is not None:
            import json

            from accvideo_core.utils.io import write_json

            write_json(json.loads(json.dumps(self.result, default=repr)), self.out)

    def record(self, key: str, value) -> None:
        self.result["steps"][key] = value
        self.flush()

    def check(self, check: dict) -> None:
        self.result["checks"].append(check)

    def figure(self, key: str, text: str) -> None:
        self.result["figures"][key] = text

    def step(self, name: str, fn: Callable[[], dict | None], need: float = 0.0) -> dict | None:
        """Run one sub-step if about ``need`` seconds are left; record its result, its error or why it was skipped."""
        left = self.left()
        if left < need:
            self.record(name, {"skipped": f"needs ~{need:.0f} s, {left:.0f} s of the part's budget left"})
            return None
        print(f"[gpu] {self.part}: {name} ({left:.0f} s left)", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            out = fn()
        except Exception as exc:  # recorded; the part goes on with its next sub-step
            self.record(name, {"error": f"{type(exc).__name__}: {exc}"[:600],
                               "traceback": traceback.format_exc().splitlines()[-6:]})
            self.free()
            return None
        if isinstance(out, dict):
            out.setdefault("seconds_total", round(time.monotonic() - t0, 3))
        self.record(name, out)
        return out

    # ---- device helpers
    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def free(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.device == "cuda":
            import torch

            self.sync()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> int:
        import torch

        return torch.cuda.memory_allocated() if self.device == "cuda" else 0

    def peak_bytes(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated() if self.device == "cuda" else 0

    def timed(self, fn: Callable):
        """(seconds, result) of one call, synchronised."""
        self.sync()
        t0 = time.perf_counter()
        result = fn()
        self.sync()
        return time.perf_counter() - t0, result

    def interleaved(self, fns: dict[str, Callable], rounds: int, memory: dict | None = None,
                    margin: float = 3.0) -> tuple[dict[str, list[float]], dict[str, str]]:
        """Seconds per call of each function, taken round-robin (order reversed every other round) after one
        warm-up each; rounds stop early when fewer than ``margin`` seconds are left. ``memory`` (optional) gets
        each function's peak allocation growth during its warm-up. Returns (samples, errors)."""
        errors: dict[str, str] = {}
        live: dict[str, Callable] = {}
        for name, fn in fns.items():
            if self.left() < margin:
                errors[name] = "not run: out of time"
                continue
            try:
                self.reset_peak()
                base = self.allocated()
                self.timed(fn)
                if memory is not None:
                    memory[name] = self.peak_bytes() - base
                live[name] = fn
            except Exception as exc:  # e.g. an attention kernel this device or dtype lacks
                errors[name] = _short_error(exc)
                self.free()
        samples: dict[str, list[float]] = {name: [] for name in live}
        for r in range(rounds):
            order = list(live) if r % 2 == 0 else list(reversed(live))
            for name in order:
                if self.left() < margin:
                    break
                try:
                    samples[name].append(self.timed(live[name])[0])
                except Exception as exc:  # e.g. out of memory in a later round: drop this one, keep the others
                    errors[name] = f"round {r + 1}: {_short_error(exc)}"
                    del live[name]
                    self.free()
        return {k: v for k, v in samples.items() if v}, errors


def _device_meta(device: str) -> dict:
    import torch

    from bench.devices import device_peaks

    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception as exc:  # reported, and the Triton columns say why they are missing
        meta["triton"] = f"unavailable ({type(exc).__name__})"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta.update(name=props.name, memory_gb=round(props.total_memory / 1e9, 1),
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
        meta["peaks"] = device_peaks(props.name)
    else:
        meta.update(name=f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)")
        meta["peaks"] = {"match": None, "bandwidth_gbs": None, "bf16_tflops": None}
    return meta


def run_part(part: str, budget: float, smoke: bool, meta: dict, out: Path | None) -> dict:
    """Run one part in this process (the child side, or ``--in-process``)."""
    from bench import gpu_parts

    run = PartRun(part, budget, meta["device"], smoke, meta["peaks"], out)
    try:
        getattr(gpu_parts, f"part_{part}")(run)
        run.result["status"] = "ok"
    except Exception as exc:  # setup of the part failed: recorded, the next part runs
        run.result["status"] = f"failed: {type(exc).__name__}: {exc}"[:600]
        run.result["traceback"] = traceback.format_exc().splitlines()[-8:]
    run.result["seconds"] = round(time.monotonic() - run.started, 1)
    run.flush()
    return run.result


def spawn_part(cmd: list[str], budget: float, out: Path, grace: float = STARTUP_GRACE) -> dict:
    """Run one part's subprocess ``cmd``, kill it ``grace`` seconds after its budget, and read what it wrote to
    ``out`` (after every sub-step), so a part that hangs or crashes still gives its finished sub-steps."""
    import json

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr)
    status = None
    try:
        code = proc.wait(timeout=budget + grace)
        if code != 0:
            status = f"failed: the subprocess exited with code {code}"
    except subprocess.TimeoutExpired:
        proc.kill()
        status = f"timed out: killed after {budget + grace:.0f} s (budget {budget:.0f} s + start-up)"
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # stuck in the driver: report it and go on instead of waiting forever
            status += "; the process did not exit within 60 s of the kill"
    try:
        result = json.loads(out.read_text()) if out.is_file() else {}
    except ValueError:  # cannot happen with atomic writes; kept readable if it does
        result = {}
    result = {"steps": {}, "checks": [], "figures": {}, **result}
    if status:
        result["status"] = status
    result.setdefault("status", "failed: no status written")
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def table(report: dict | None) -> str:
    """The markdown summary table (empty figures when ``report`` is None or a part did not produce them)."""
    parts = (report or {}).get("parts", {})
    lines = ["| part | figure | this GPU | reference |", "|---|---|---|---|"]
    for key, part, what, ref in FIGURES:
        value = parts.get(part, {}).get("figures", {}).get(key, "")
        lines.append(f"| {part} | {what} | {value} | {ref} |")
    return "\n".join(lines)


def summary(report: dict) -> str:
    meta = report["meta"]
    peaks = meta["peaks"]
    tflops = f"{peaks['bf16_tflops']:.0f} bf16 TFLOP/s" if peaks.get("bf16_tflops") else "no bf16 peak"
    peak_text = (f"peaks {peaks['bandwidth_gbs']:.0f} GB/s, {tflops} (table entry {peaks['match']!r})"
                 if peaks["match"] else "peaks unknown (not in bench/devices.py)")
    lines = [f"GPU check on {meta['name']} ({peak_text}), torch {meta['torch']}, Triton {meta['triton']}"
             f"{', SMOKE (tiny sizes)' if meta.get('smoke') else ''}:", "", table(report), ""]
    for part, r in report["parts"].items():
        lines.append(f"- part {part} ({PARTS[part][0]}): {r['status']}, {r.get('wall_seconds', r.get('seconds'))} s")
    v = report["validity"]
    lines.append("- checks: all passed" if v["valid"] else "- INVALID RUN, failed checks: " + "; ".join(v["failed"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, runs on the CPU in under a minute")
    p.add_argument("--parts", default="".join(PARTS), help="which parts, e.g. 'ac' (default: all)")
    p.add_argument("--total", type=float, default=460.0, help="seconds for all parts together")
    p.add_argument("--in-process", action="store_true",
                   help="run the parts in this process (default with --smoke; no kill of a hung part)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "gpu.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    from accvideo_core.utils.io import write_json

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("python -m bench.gpu needs a CUDA device (none found); `--smoke` runs it on the CPU with tiny sizes")
        return 2
    meta = _device_meta("cuda" if cuda else "cpu")
    meta["smoke"] = args.smoke
    if args.child:
        run_part(args.child, args.budget, args.smoke, meta, Path(args.child_out))
        return 0
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {''.join(PARTS)}")
    in_process = args.in_process or args.smoke
    started = time.monotonic()
    report: dict = {"meta": meta, "parts": {}}
    out = Path(args.out)
    for part in (k for k in PARTS if k in args.parts):
        total = len(PARTS) * SMOKE_BUDGET if args.smoke else args.total
        left = total - (time.monotonic() - started) - (0 if in_process else STARTUP_GRACE)
        budget = min(SMOKE_BUDGET if args.smoke else PARTS[part][1], left)
        if budget < 5:
            report["parts"][part] = {"status": f"skipped: {left:.0f} s of the total left", "figures": {},
                                     "checks": [], "steps": {}}
            continue
        print(f"[gpu] part {part}: {PARTS[part][0]} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
        if in_process:
            report["parts"][part] = run_part(part, budget, args.smoke, meta, None)
        else:
            part_out = out.with_name(f"gpu_part_{part}.json")
            part_out.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "bench.gpu", "--child", part, "--budget", f"{budget:.1f}", "--child-out",
                   str(part_out)] + (["--smoke"] if args.smoke else [])
            report["parts"][part] = spawn_part(cmd, budget, part_out)
        report["validity"] = verdict(c for r in report["parts"].values() for c in r.get("checks", []))
        write_json(report, out)
    report["validity"] = verdict(c for r in report["parts"].values() for c in r.get("checks", []))
    report["seconds"] = round(time.monotonic() - started, 1)
    write_json(report, out)
    print(summary(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
