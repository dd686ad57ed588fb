"""Benchmark the fused kernels: Triton vs the torch reference vs ``torch.compile`` of the reference.

On CUDA (with Triton) every kernel is timed forward and forward+backward at HunyuanVideo sizes, with the bytes it
must move, the achieved bandwidth and that bandwidth as a share of the device's peak. Without CUDA it says so in
one line and compares the torch reference with ``torch.compile`` of it on the CPU instead (smaller sizes).
Prints a table and writes JSON to ``bench/out/kernels_<device>.json``.

    python bench/bench_kernels.py [--tokens N] [--reps N] [--dtype bf16|fp16|fp32] [--peak-gbs GB/s] [--no-compile]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.kernels import reference  # noqa: E402
from accvideo_core.utils.dtypes import dtype_name, names_for, parse_dtype  # noqa: E402
from accvideo_core.utils.io import write_json  # noqa: E402
from bench.devices import device_peaks  # noqa: E402
from bench.validity import check_at_most, check_noise, spread, verdict  # noqa: E402

@dataclass
class Case:
    name: str
    make: Callable[[], tuple]  # -> (args, kwargs) for the kernel
    bytes_fwd: int  # bytes the fused forward must read + write
    bytes_bwd: int  # bytes the fused backward must read + write (0: no fused backward)
    grad: tuple[int, ...]  # indices of args that need gradients in training


def peak_bandwidth_gbs(override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given with --peak-gbs"
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "memory clock x bus width (double data rate)"
    known = device_peaks(props.name)
    if known["bandwidth_gbs"]:
        return known["bandwidth_gbs"], f"table entry {known['match']!r} (bench/devices.py)"
    return None, "unknown (pass --peak-gbs)"


def make_cases(tokens: int, text_tokens: int, hidden: int, head_dim: int, vae_shape: tuple[int, ...],
               dtype: torch.dtype, device: str) -> list[Case]:
    es = torch.finfo(dtype).bits // 8
    heads = hidden // head_dim
    seq = tokens + text_tokens
    n = seq * hidden
    gen = torch.Generator(device=device).manual_seed(0)  # drawn on the device: real sizes take seconds on a CPU

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype=dt)

    def rope_args():
        q = rand(1, seq, heads, head_dim)
        angles = torch.rand(tokens, head_dim // 2, generator=gen, device=device) * 6
        cos = angles.cos().repeat_interleave(2, -1)
        sin = angles.sin().repeat_interleave(2, -1)
        return (q, rand(head_dim, scale=0.2) + 1, cos, sin), {}

    def ln_args():
        return (rand(1, seq, hidden), rand(1, hidden, scale=0.5), rand(1, hidden, scale=0.5)), {}

    def gated_args():
        return (rand(1, seq, hidden), rand(1, seq, hidden), rand(1, hidden, scale=0.5)), {}

    def gn_args():
        c = vae_shape[1]
        return (rand(*vae_shape), rand(c, scale=0.2) + 1, rand(c, scale=0.1), 32), {}

    def gn_stats_args():  # statistics of a time slice, as the VAE's exact chunked decode accumulates them
        return (rand(*vae_shape)[:, :, 1:], 32), {}

    vae_numel = 1
    for s in vae_shape:
        vae_numel *= s
    angle_bytes = 2 * tokens * head_dim * 4
    return [
        Case("rms_norm_rope", rope_args, 2 * n * es + angle_bytes, 3 * n * es + angle_bytes, (0, 1)),
        Case("layer_norm_modulate", ln_args, 2 * n * es + 2 * hidden * es, 3 * n * es, (0, 1, 2)),
        Case("gated_residual", gated_args, 3 * n * es + hidden * es, 3 * n * es, (0, 1, 2)),
        # GroupNorm computes its own statistics: one read for them, one read + one write to apply.
        Case("group_norm_silu", gn_args, 3 * vae_numel * es, 0, ()),
        Case("group_norm_stats", gn_stats_args, vae_numel // vae_shape[2] * (vae_shape[2] - 1) * es, 0, ()),
    ]


def time_interleaved(fns: dict[str, Callable[[], object]], reps: int, device: str) -> dict[str, list[float]]:
    """Milliseconds per call of each function, taken round-robin (order reversed every other round) so load changes
    hit all alike (CUDA events on GPU). Each function has been warmed up by the caller."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return samples


def forward_backward(fn: Callable, args: tuple, grad_idx: tuple[int, ...]) -> Callable[[], object]:
    leaves = tuple(a.detach().requires_grad_(i in grad_idx) if torch.is_tensor(a) else a for i, a in enumerate(args))
    wanted = [leaves[i] for i in grad_idx]

    grad_out = torch.ones_like(fn(*leaves))

    def run():
        return torch.autograd.grad(fn(*leaves), wanted, grad_out)
    return run


def _implementations(args: argparse.Namespace, cuda: bool) -> tuple[dict[str, Callable[[str], Callable]], list[str]]:
    """The timed implementations (name -> kernel name -> function) and notes on what is missing."""
    impls: dict[str, Callable[[str], Callable]] = {"torch": lambda name: getattr(reference, name)}
    notes = []
    if args.triton_interpret:
        notes.append("Triton column run in Triton's CPU interpreter: checks the harness, its timings mean nothing")
    if cuda or args.triton_interpret:
        try:
            from accvideo_core.kernels import triton_kernels
            impls = {"triton": lambda name: getattr(triton_kernels, name), **impls}
        except ImportError as exc:
            notes.append(f"Triton unavailable ({exc}): timing the reference and torch.compile only")
    if not args.no_compile:
        compiled: dict[str, Callable] = {}
        impls["compile"] = lambda name: compiled.setdefault(name, torch.compile(getattr(reference, name)))
    return impls, notes


def _bench_case(case, impls: dict, args: argparse.Namespace, device: str, peak: float | None) -> tuple[dict, list]:
    """One kernel: every implementation's forward (and forward + backward) timed round-robin, the bandwidth and
    speedups derived, and the checks of those figures."""
    call_args, _ = case.make()
    row = {"kernel": case.name, "bytes_fwd": case.bytes_fwd, "bytes_bwd": case.bytes_bwd, "ms": {}}
    checks = []
    passes = [("fwd", lambda fn: (lambda: fn(*call_args)))]
    if case.grad and not args.forward_only:
        passes.append(("fwd+bwd", lambda fn: forward_backward(fn, call_args, case.grad)))
    for pass_name, wrap in passes:
        runs = {}
        for impl_name, get in impls.items():
            t0 = time.perf_counter()
            try:
                run = wrap(get(case.name))
                run()  # warm-up; compiles torch.compile / Triton kernels
            except Exception as exc:  # e.g. torch.compile without a working backend: report, keep going
                row.setdefault("errors", {})[f"{impl_name} {pass_name}"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            if device == "cuda":
                torch.cuda.synchronize()
            runs[f"{impl_name} {pass_name}"] = run
            if impl_name == "compile":
                row.setdefault("compile_first_call_s", {})[pass_name] = round(time.perf_counter() - t0, 2)
        for key, times in time_interleaved(runs, args.reps, device).items():
            s = spread(times)
            row["ms"][key] = round(s["median"], 4)
            row.setdefault("ms_min", {})[key] = round(s["min"], 4)
            row.setdefault("spread", {})[key] = s
            checks.append(check_noise(f"{case.name} {key} ms", s))
    for key, ms in row["ms"].items():
        moved = case.bytes_fwd if key.endswith(" fwd") else case.bytes_fwd + case.bytes_bwd
        row.setdefault("gbs", {})[key] = round(moved / ms / 1e6, 1)  # fused-kernel bytes / time
    if peak:
        row["pct_of_peak"] = {k: round(100 * v / peak, 1) for k, v in row.get("gbs", {}).items()}
        # a fused kernel must move at least the bytes counted for it: it cannot beat the device's bandwidth
        checks += [check_at_most(f"{case.name} {k}: GB/s <= device peak", v, peak,
                                 3 * row["spread"][k]["rel_stderr"])
                   for k, v in row.get("gbs", {}).items() if not k.startswith("torch")]
    ms = row["ms"]
    for pass_name, _ in passes:
        base = ms.get(f"torch {pass_name}")
        for other in ("triton", "compile"):
            if base and f"{other} {pass_name}" in ms:
                row.setdefault("speedup_vs_torch", {})[f"{other} {pass_name}"] = round(
                    base / ms[f"{other} {pass_name}"], 2)
        if f"triton {pass_name}" in ms and f"compile {pass_name}" in ms:
            row.setdefault("speedup_triton_vs_compile", {})[pass_name] = round(
                ms[f"compile {pass_name}"] / ms[f"triton {pass_name}"], 2)
    return row, checks


def bench(args: argparse.Namespace) -> dict:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    impls, notes = _implementations(args, cuda)
    if not cuda:
        print("No CUDA device: Triton kernels are not timed; comparing the torch reference with torch.compile "
              "on the CPU.")
    for note in notes:
        print(f"note: {note}")
    dtype = parse_dtype(args.dtype or ("bf16" if cuda else "fp32"))
    tokens = args.tokens or (48960 if cuda else 2048)  # 544x960, 93 frames -> 24 x 34 x 60 image tokens
    vae_shape = tuple(args.vae_shape or ((1, 128, 25, 272, 480) if cuda else (1, 128, 3, 48, 64)))
    cases = make_cases(tokens, 256, args.hidden, 128, vae_shape, dtype, device)
    peak, peak_source = peak_bandwidth_gbs(args.peak_gbs) if cuda else (None, "not measured on CPU")
    rows, checks = [], []
    for case in cases:
        if args.only and case.name not in args.only:
            continue
        row, case_checks = _bench_case(case, impls, args, device, peak)
        rows.append(row)
        checks += case_checks
        print_row(row)
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                             f"{torch.get_num_threads()} threads)",
        "cuda": cuda, "torch": torch.__version__, "dtype": dtype_name(dtype),
        "shapes": {"tokens": tokens, "text_tokens": 256, "hidden": args.hidden, "head_dim": 128,
                   "vae": list(vae_shape)},
        "peak_gbs": peak, "peak_source": peak_source, "reps": args.reps, "notes": notes, "results": rows,
        "validity": verdict(checks),
    }


def print_row(row: dict) -> None:
    timings = "  ".join(f"{k}: {v:.3f} ms" for k, v in row["ms"].items())
    print(f"{row['kernel']:<20} {timings}")
    for key in ("gbs", "pct_of_peak", "speedup_vs_torch", "speedup_triton_vs_compile", "compile_first_call_s",
                "errors"):
        if key in row:
            print(f"{'':<20} {key}: " + "  ".join(f"{k}={v}" for k, v in row[key].items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=0, help="image tokens (default 48960 on CUDA, 2048 on CPU)")
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--vae-shape", type=int, nargs=5, metavar=("B", "C", "T", "H", "W"),
                        help="GroupNorm input (default 1 128 25 272 480 on CUDA, 1 128 3 48 64 on CPU)")
    parser.add_argument("--dtype", choices=names_for("bfloat16", "float16", "float32"), default=None,
                        help="default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=None, help="device peak bandwidth if not detected")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves compile time)")
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--only", nargs="*", help="kernel names to run")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--triton-interpret", action="store_true",
                        help="without CUDA, also run the Triton kernels in Triton's interpreter (harness check only)")
    args = parser.parse_args(argv)
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton
    result = bench(args)
    for failed in result["validity"]["failed"]:
        print(f"INVALID RUN: {failed}")
    path = write_json(result, Path(args.out) / f"kernels_{'cuda' if result['cuda'] else 'cpu'}.json")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
