"""Benchmark VAE decoding side by side: untiled vs exact (lockstep chunks) vs fast (blended tiles).

For each size, every mode first runs one measured decode in its own fresh subprocess (so peak process memory is
that mode's own), on the same random non-degenerate weights and latents: peak process RSS (and the RSS of the
loaded model), peak device-side working set (CUDA: ``max_memory_allocated``; CPU: the live bytes of tensors
allocated during the decode, measured by ``WorkingSetMeter``; weights included), the chunking chosen, and max abs /
PSNR against the untiled output. Then one more subprocess times the modes back to back, alternating, without the
meter (best of ``--repeats`` rounds), so the time ratios come from one run under the same machine load.

Budgets: exact gets weights + ``--exact-fraction`` of the untiled run's measured activation peak, fast gets weights
+ ``--fast-fraction`` of it. Targets (issue 3): fast peak <= 1/4 of untiled at <= 1.3x its time; exact max abs
<= 1e-3 with the device working set within its budget.

    python bench/bench_vae.py                       # short default run (mid-width VAE, two sizes)
    python bench/bench_vae.py --big                 # adds the largest size that fits untiled in ~10 GB
    python bench/bench_vae.py --config full --sizes 5x16x16   # the released widths (slow on CPU)

    python bench/bench_vae.py --quality            # fast-mode error with the trained mini VAE on real latents

Writes ``bench/out/bench_vae.json`` (``--quality``: ``bench/out/bench_vae_quality.json``).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.mini.data import clip_spec, render_clip  # noqa: E402
from accvideo_core.models.vae_decode_plan import FastTiling  # noqa: E402
from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig  # noqa: E402
from accvideo_core.models.vae_loading import load_vae  # noqa: E402
from accvideo_core.testing import randomize_  # noqa: E402
from accvideo_core.utils.dtypes import dtype_name, names_for, parse_dtype  # noqa: E402
from accvideo_core.utils.io import write_json  # noqa: E402
from bench.gpu_parts import EXACT_BF16_ULPS, bf16_ulp  # noqa: E402
from bench.validity import check_at_most, check_noise, spread, verdict  # noqa: E402

CONFIGS = {
    "full": VAEConfig(),  # the released HunyuanVideo VAE widths (246.5 M parameters)
    "mid": VAEConfig(block_out_channels=(32, 64, 128, 128)),  # a quarter of the widths, same depth and groups
}
DEFAULT_SIZES = ["5x16x16", "9x24x32"]  # latent T x H x W -> 17x128x128 and 33x192x256 pixels
# Largest untiled decodes that fit ~10 GB of process memory here (fp32): 33x384x512 and 33x192x256 pixels.
BIG_SIZES = {"mid": "9x48x64", "full": "9x24x32"}


def build(config_name: str, dtype: torch.dtype, device: str, weights: str | None = None) -> HunyuanVideoVAE:
    if weights:  # a trained VAE: fast mode's blending error is only meaningful with real weights
        return load_vae(weights, dtype=dtype, device=device)
    vae = randomize_(HunyuanVideoVAE(CONFIGS[config_name]))  # unit-gain weights keep activations O(1)
    return vae.to(device, dtype).eval()


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _setup(args: argparse.Namespace) -> tuple[HunyuanVideoVAE, torch.Tensor]:
    vae = build(args.config, parse_dtype(args.dtype), args.device, args.weights)
    t, h, w = (int(v) for v in args.size.split("x"))
    z = torch.randn(1, vae.config.latent_channels, t, h, w, generator=torch.Generator().manual_seed(1))
    return vae, z


def memory_worker(args: argparse.Namespace) -> None:
    """One mode, one size, in this fresh process: one measured decode (peak RSS, device working set, output)."""
    vae, z = _setup(args)
    rss_model = rss_now_bytes()
    try:
        video = vae.decode(z, mode=args.mode, memory_budget=args.budget or "auto", measure=True)
    except MemoryError as err:  # the planner refused the budget: report it as this mode's result
        write_json({"error": str(err)}, args.json)
        return
    info = vae.last_decode_info
    torch.save(video.float().cpu(), args.out)
    write_json({"rss_peak_bytes": rss_peak_bytes(), "rss_model_bytes": rss_model,
                "device_peak_bytes": info.device_peak_bytes, "budget_bytes": info.budget_bytes,
                "weight_bytes": info.weight_bytes, "chosen": info.mode, "time_chunks": info.max_time_chunks,
                "space_chunks": info.max_space_chunks, "tiles": info.tiles, "notes": info.notes,
                "video_shape": list(video.shape)}, args.json)


def timing_worker(args: argparse.Namespace) -> None:
    """All modes of one size in one process, alternating, ``--repeats`` rounds: the best time of each mode."""
    vae, z = _setup(args)
    budgets = {m: int(b) for m, b in (item.split(":") for item in args.budgets.split(","))}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    samples: dict[str, list[float]] = {mode: [] for mode in budgets}
    for r in range(args.repeats):
        for mode, budget in (budgets.items() if r % 2 == 0 else reversed(budgets.items())):
            sync()
            started = time.perf_counter()
            vae.decode(z, mode=mode, memory_budget=budget or "auto")
            sync()
            samples[mode].append(time.perf_counter() - started)
    write_json(samples, args.json)


def _worker_cmd(args: argparse.Namespace, size: str, js: Path) -> list[str]:
    return [sys.executable, __file__, "--size", size, "--config", args.config, "--dtype", args.dtype,
            "--device", args.device, "--json", str(js)] + (["--weights", args.weights] if args.weights else [])


def run_memory(args: argparse.Namespace, size: str, mode: str, budget: int,
               tmp: Path) -> tuple[dict, torch.Tensor | None]:
    out, js = tmp / f"{mode}_{size}.pt", tmp / f"{mode}_{size}.json"
    cmd = _worker_cmd(args, size, js) + ["--worker", "memory", "--mode", mode, "--budget", str(budget),
                                         "--out", str(out)]
    subprocess.run(cmd, check=True)
    stats = json.loads(js.read_text())
    return stats, (None if "error" in stats else torch.load(out, weights_only=True))


def run_timing(args: argparse.Namespace, size: str, budgets: dict[str, int], tmp: Path) -> dict[str, float]:
    js = tmp / f"time_{size}.json"
    cmd = _worker_cmd(args, size, js) + ["--worker", "time", "--repeats", str(args.repeats),
                                         "--budgets", ",".join(f"{m}:{b}" for m, b in budgets.items())]
    subprocess.run(cmd, check=True)
    return json.loads(js.read_text())


def vae_checks(row: dict, budget: int, dtype: str) -> list[dict]:
    """Exact decodes equal the untiled one up to rounding; tiled modes stay within their device budget; timings
    that scatter more than the noise limit are not a result."""
    name = f"{row['latent']} {row['mode']}"
    checks = [check_noise(f"{name} seconds", row["spread"])] if row.get("spread", {}).get("n", 0) >= 3 else []
    if row["mode"] == "exact":   # as bench.gpu part d: a few bf16 ulps at the output's largest magnitude
        tolerance = 1e-3 if dtype == "float32" else EXACT_BF16_ULPS * bf16_ulp(row["reference_max"])
        checks.append(check_at_most(f"{name}: max abs vs untiled", row["max_abs"], tolerance, 0.0))
    if row["mode"] != "untiled":
        checks.append(check_at_most(f"{name}: device peak within the budget", row["device_peak_bytes"], budget, 0.0))
    return checks


def compare(video: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (video - reference).abs()
    mse = diff.pow(2).mean().item()
    return {"max_abs": diff.max().item(), "psnr_db": math.inf if mse == 0 else 10 * math.log10(4.0 / mse),
            "reference_max": reference.abs().max().item()}


def quality(args: argparse.Namespace) -> None:
    """Fast-mode error vs untiled with a trained VAE on real latents (encoded rendered clips): the official tiles
    (``FastTiling()``, 256 px / 64 frames, 0.25 overlap) and the streamed default at weights + ``--fast-fraction``
    of the estimated untiled activation peak, for several overlap fractions."""
    vae = load_vae(args.weights, dtype=parse_dtype(args.dtype), device=args.device)
    frames, height, width = (int(v) for v in args.quality_size.split("x"))
    fractions = (0.0625, 0.125, 0.25)
    rows = []
    print(f"quality: weights={args.weights} clip={frames}x{height}x{width} clips={args.quality_clips}")
    with torch.no_grad():
        for index in range(args.quality_clips):
            video = render_clip(clip_spec(index, split="heldout"), frames, height, width)[None].to(args.device)
            z = vae.encode(video)
            budget = vae.weight_bytes() + int(args.fast_fraction * vae.estimate_untiled_bytes(z.shape))
            reference = vae.decode(z, mode="untiled").float()
            runs = [("official", FastTiling(), None)] + [(f"stream@{f}", None, f) for f in fractions]
            for name, tiling, fraction in runs:
                if fraction is not None:
                    vae.FAST_OVERLAP_FRACTION = fraction
                decoded = vae.decode(z, mode="fast", tiling=tiling, memory_budget=budget).float()
                info = vae.last_decode_info
                row = {"clip": index, "setting": name, "latent": list(z.shape[2:]), **compare(decoded, reference),
                       "vs_input": compare(reference, video.float())["psnr_db"], "notes": info.notes,
                       "chunks_t": info.max_time_chunks, "chunks_s": info.max_space_chunks}
                rows.append(row)
                print(f"clip {index} {name:>14}: max abs {row['max_abs']:.3e}  PSNR {row['psnr_db']:.1f} dB  "
                      f"(untiled vs input {row['vs_input']:.1f} dB)  chunks t/s {info.max_time_chunks}/"
                      f"{info.max_space_chunks}  {info.notes[0]}", flush=True)
    output = Path(args.output).with_name("bench_vae_quality.json")
    write_json({"weights": args.weights, "clip": [frames, height, width], "fast_fraction": args.fast_fraction,
                "dtype": args.dtype, "device": args.device, "results": rows}, output)
    print(f"wrote {output}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    parser.add_argument("--sizes", nargs="+", default=None, help="latent sizes TxHxW (default: %s)" % DEFAULT_SIZES)
    parser.add_argument("--big", action="store_true", help="also run the largest size that fits untiled in ~10 GB")
    parser.add_argument("--weights", default=None, help="a trained VAE file/folder (load_vae) instead of --config "
                        "random weights; random weights make fast mode's blending error look worse than it is")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=names_for("float32", "bfloat16", "float16"), default="fp32")
    parser.add_argument("--exact-fraction", type=float, default=0.125)
    parser.add_argument("--fast-fraction", type=float, default=0.25)
    parser.add_argument("--output", default=str(ROOT / "bench" / "out" / "bench_vae.json"))
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (best of, with their spread); modes "
                        "alternate")
    parser.add_argument("--quality", action="store_true", help="only measure fast-mode error vs untiled with the "
                        "trained VAE of --weights on encoded clips (default: the mini VAE in assets/)")
    parser.add_argument("--quality-size", default="65x384x512", help="clip frames x height x width for --quality")
    parser.add_argument("--quality-clips", type=int, default=2)
    parser.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    parser.add_argument("--budgets", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser


def _bench_size(args: argparse.Namespace, size: str, tmp: Path) -> tuple[list[dict], list[dict]]:
    """Untiled, exact and fast decodes of one latent size: memory runs, alternating timing rounds, rows, checks."""
    results, checks = [], []
    base, reference = run_memory(args, size, "untiled", 0, tmp)
    weights = base["weight_bytes"]
    activations = base["device_peak_bytes"] - weights
    budgets = {"untiled": 0, "exact": weights + int(args.exact_fraction * activations),
               "fast": weights + int(args.fast_fraction * activations)}
    rows = {"untiled": (base, reference)}
    for mode in ("exact", "fast"):
        rows[mode] = run_memory(args, size, mode, budgets[mode], tmp)
    samples = run_timing(args, size, {m: b for m, b in budgets.items() if rows[m][1] is not None}, tmp)
    for mode, (stats, _) in rows.items():
        stats["seconds"] = min(samples[mode]) if mode in samples else None  # best of the rounds
        if mode in samples:
            stats["spread"] = spread(samples[mode])
    for mode, (stats, video) in rows.items():
        if video is None:
            results.append({"latent": size, "mode": mode, "budget_bytes": budgets[mode], **stats})
            print(f"{size:>10} {'':>14} {mode:>8} refused: {stats['error']}", flush=True)
            continue
        row = {"latent": size, "mode": mode, **stats, **compare(video, reference),
               "time_vs_untiled": stats["seconds"] / base["seconds"],
               "device_peak_vs_untiled": stats["device_peak_bytes"] / base["device_peak_bytes"],
               "within_budget": mode == "untiled" or stats["device_peak_bytes"] <= budgets[mode]}
        results.append(row)
        checks += vae_checks(row, budgets[mode], args.dtype)
        print(f"{size:>10} {'x'.join(map(str, stats['video_shape'][2:])):>14} {mode:>8} "
              f"{stats['seconds']:8.2f} {row['time_vs_untiled']:9.2f} {stats['rss_peak_bytes'] / 2**20:8.0f} "
              f"{stats['device_peak_bytes'] / 2**20:8.1f} "
              f"{(budgets[mode] / 2**20) if budgets[mode] else float('nan'):8.1f} "
              f"{row['device_peak_vs_untiled']:11.3f} {stats['time_chunks']:>4}/{stats['space_chunks']:<5} "
              f"{row['max_abs']:9.2e} {row['psnr_db']:6.1f}", flush=True)
    return results, checks


def main() -> None:
    args = _parser().parse_args()
    args.dtype = dtype_name(parse_dtype(args.dtype))  # canonical in the output and the checks
    if args.quality:
        args.weights = args.weights or str(ROOT / "assets" / "mini" / "vae.safetensors")
        quality(args)
        return
    if args.worker:
        (memory_worker if args.worker == "memory" else timing_worker)(args)
        return

    sizes = list(args.sizes or DEFAULT_SIZES) + ([BIG_SIZES[args.config]] if args.big else [])
    results = []
    header = (f"{'latent':>10} {'video':>14} {'mode':>8} {'time s':>8} {'x untiled':>9} {'RSS MiB':>8} "
              f"{'dev MiB':>8} {'budget':>8} {'dev/untiled':>11} {'chunks t/s':>10} {'max abs':>9} {'PSNR':>6}")
    print(f"config={args.config} weights={args.weights or 'random'} dtype={args.dtype} device={args.device} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    print(header)
    checks: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for size in sizes:
            size_results, size_checks = _bench_size(args, size, Path(tmpdir))
            results += size_results
            checks += size_checks
    write_json({"config": args.config, "weights": args.weights or "random",
                "block_out_channels": list(CONFIGS[args.config].block_out_channels),
                "dtype": args.dtype, "device": args.device, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": platform.platform(),
                "exact_fraction": args.exact_fraction, "fast_fraction": args.fast_fraction, "results": results,
                "validity": verdict(checks)}, args.output)
    for failed in verdict(checks)["failed"]:
        print(f"INVALID RUN: {failed}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
