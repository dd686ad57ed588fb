"""Benchmark our HunyuanVideo transformer forward against diffusers' on the same weights, side by side.

Mid-size config (hidden 512 = 4 heads of 128, 2 double + 2 single blocks, 2 refiner blocks, text dim 4096, pooled
768), latent [1, 16, 8, 32, 32] -> 2048 image tokens, 64 text tokens. Two text cases: all 64 tokens valid (the
like-for-like comparison) and 40 of 64 valid (padding: the original drops padded tokens, diffusers masks them).
Timings alternate between the two models (median of --repeats; wall and process CPU time). Peak memory: CUDA max_memory_allocated on GPU;
on CPU the peak RSS growth of one forward, measured in a fresh subprocess per model. Prints a table and writes
``bench/out/bench_transformer.json``.

    python bench/bench_transformer.py [--repeats 5] [--device cpu|cuda] [--dtype fp32|bf16] [--frames 8 --size 32]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.models.key_maps import original_to_diffusers  # noqa: E402
from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig  # noqa: E402
from accvideo_core.testing import diffusers_transformer, randomize_, tiny_inputs  # noqa: E402
from accvideo_core.utils.dtypes import dtype_name, names_for, parse_dtype  # noqa: E402
from accvideo_core.utils.io import write_json  # noqa: E402
from bench.memory import peak_rss_growth, reset_peak_rss  # noqa: E402
from bench.validity import check_at_most, check_noise, spread, verdict  # noqa: E402

CONFIG = TransformerConfig(hidden_size=512, num_heads=4, num_double_blocks=2, num_single_blocks=2,
                           num_refiner_blocks=2, text_dim=4096, pooled_dim=768)
TEXT_LEN = 64
CASES = {"all_text_valid": TEXT_LEN, "text_40_of_64_valid": 40}


def build(dtype: torch.dtype, device: str):
    diffusers_logging.set_verbosity_error()  # silence the "keep in float32" notice on .to(bf16)
    ours = randomize_(HunyuanVideoTransformer3D(CONFIG), seed=0).eval()
    theirs = diffusers_transformer(CONFIG)
    theirs.load_state_dict(original_to_diffusers(ours.state_dict()), strict=True)
    return ours.to(device, dtype), theirs.to(device, dtype)


def make_inputs(valid: int, frames: int, size: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tiny inputs on ``device``; the activations (latents, text states, pooled) in the models' ``dtype``, the
    timestep kept in fp32 as samplers pass it (in bf16 788.37 would round to 788) and the mask as it is."""
    inp = tiny_inputs(CONFIG, batch=1, frames=frames, height=size, width=size, text_len=TEXT_LEN, valid=[valid],
                      seed=1)
    return {k: v.to(device, dtype) if v.is_floating_point() and k != "timestep" else v.to(device)
            for k, v in inp.items()}


def runner(which: str, model, inp: dict[str, torch.Tensor]):
    guidance = torch.tensor([6.0], device=inp["latents"].device)
    if which == "ours":
        return lambda: model(**inp, guidance=guidance)
    return lambda: model(inp["latents"], inp["timestep"], inp["text_states"], inp["text_mask"], inp["pooled"],
                         guidance=guidance * 1000, return_dict=False)[0]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(fns: dict[str, callable], repeats: int, device: str) -> tuple[dict, dict]:
    """Alternate the implementations (after one warm-up each) so background load hits both alike.

    Returns (wall seconds, process CPU seconds) per implementation; on a shared machine the CPU time is the
    steadier measure, the wall time the one a user feels.
    """
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for r in range(repeats):
            for name, fn in (fns.items() if r % 2 == 0 else reversed(fns.items())):
                sync(device)
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                sync(device)
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            print(f"\r  repeat {r + 1}/{repeats}", end="", flush=True)
    print()
    return wall, cpu


def memory_child(which: str, valid: int, dtype: str, frames: int, size: int) -> None:
    """Subprocess entry: print the peak RSS growth (bytes) of one forward of one model.

    The high-water mark is reset after the models are built (``bench.memory``), so only the forward pass counts.
    """
    model = build(parse_dtype(dtype), "cpu")[0 if which == "ours" else 1]
    inp = make_inputs(valid, frames, size, "cpu", parse_dtype(dtype))
    fn = runner(which, model, inp)
    base = reset_peak_rss()
    with torch.inference_mode():
        fn()
    print(json.dumps({"peak_growth_bytes": peak_rss_growth(base)}))


def peak_memory(which: str, valid: int, args, model=None, inp=None) -> int:
    if args.device == "cuda":
        fn = runner(which, model, inp)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, __file__, "--memory-child", which, "--valid", str(valid), "--dtype", args.dtype,
           "--frames", str(args.frames), "--size", str(args.size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["peak_growth_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=names_for("float32", "bfloat16", "float16"), default="fp32")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench_transformer.json"))
    parser.add_argument("--memory-child", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--valid", type=int, default=TEXT_LEN, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = dtype_name(parse_dtype(args.dtype))  # canonical in the output
    if args.memory_child:
        memory_child(args.memory_child, args.valid, args.dtype, args.frames, args.size)
        return

    dtype = parse_dtype(args.dtype)
    ours, theirs = build(dtype, args.device)
    n_img = args.frames * (args.size // 2) ** 2
    print(f"HunyuanVideo transformer forward, ours vs diffusers: hidden {CONFIG.hidden_size}, "
          f"{CONFIG.num_heads} heads x {CONFIG.head_dim}, {CONFIG.num_double_blocks}+{CONFIG.num_single_blocks} "
          f"blocks, {n_img} image + {TEXT_LEN} text tokens, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    results = []
    for case, valid in CASES.items():
        inp = make_inputs(valid, args.frames, args.size, args.device, dtype)
        with torch.inference_mode():
            diff = (runner("ours", ours, inp)().float() - runner("diffusers", theirs, inp)().float()).abs().max()
        print(f"{case}: timing ({args.repeats} alternating repeats)")
        times, cpu_times = time_pair({"ours": runner("ours", ours, inp), "diffusers": runner("diffusers", theirs, inp)},
                          args.repeats, args.device)
        print(f"{case}: peak memory")
        mem = {w: peak_memory(w, valid, args, ours if w == "ours" else theirs, inp) for w in ("ours", "diffusers")}
        med = {k: statistics.median(v) for k, v in times.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
        row = {
            "case": case, "text_valid": valid, "image_tokens": n_img, "text_tokens": TEXT_LEN,
            "ours_s": med["ours"], "diffusers_s": med["diffusers"], "time_ratio": med["ours"] / med["diffusers"],
            "ours_cpu_s": med_cpu["ours"], "diffusers_cpu_s": med_cpu["diffusers"],
            "cpu_time_ratio": med_cpu["ours"] / med_cpu["diffusers"],
            "min_time_ratio": min(times["ours"]) / min(times["diffusers"]),
            "ours_times_s": times["ours"], "diffusers_times_s": times["diffusers"],
            "ours_cpu_times_s": cpu_times["ours"], "diffusers_cpu_times_s": cpu_times["diffusers"],
            "ours_peak_bytes": mem["ours"], "diffusers_peak_bytes": mem["diffusers"],
            "memory_ratio": mem["ours"] / mem["diffusers"] if mem["diffusers"] else None,
            "max_abs_output_diff": float(diff),
            "spread": {k: spread(v) for k, v in times.items()},
        }
        row["checks"] = [
            # same weights, same function: the outputs may differ only by float rounding
            check_at_most(f"{case}: max abs output difference ours vs diffusers", float(diff),
                          1e-4 if dtype == torch.float32 else 5e-2, 0.0),
            *(check_noise(f"{case}: {name} wall seconds", s) for name, s in row["spread"].items())]
        results.append(row)
    print("\nwall = median wall seconds, ratio = ours / diffusers (median wall, min wall, median process CPU time)")
    print(f"{'case':<22}{'ours s':>9}{'diff. s':>9}{'ratio':>7}{'min r.':>8}{'cpu r.':>8}{'ours MiB':>10}"
          f"{'diff. MiB':>10}{'ratio':>7}{'max|diff|':>11}")
    for r in results:
        mr = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "n/a"
        print(f"{r['case']:<22}{r['ours_s']:>9.3f}{r['diffusers_s']:>9.3f}{r['time_ratio']:>7.2f}"
              f"{r['min_time_ratio']:>8.2f}{r['cpu_time_ratio']:>8.2f}"
              f"{r['ours_peak_bytes'] / 2**20:>10.1f}{r['diffusers_peak_bytes'] / 2**20:>10.1f}{mr:>7}"
              f"{r['max_abs_output_diff']:>11.2e}")
    report = {
        "benchmark": "transformer_forward", "device": args.device, "dtype": args.dtype, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
        "config": CONFIG.to_dict(), "memory_method": "cuda max_memory_allocated growth" if args.device == "cuda"
        else "peak RSS growth of one forward in a fresh subprocess per model",
        "results": results, "validity": verdict(c for r in results for c in r["checks"]),
    }
    for failed in report["validity"]["failed"]:
        print(f"INVALID RUN: {failed}")
    print(f"wrote {write_json(report, args.out)}")


if __name__ == "__main__":
    main()
