"""Benchmark one AccVideo training iteration (tiny teacher): with and without gradient checkpointing, and
sequence parallelism sp = 1 (one process) vs sp = 2 (torchrun, 2 ranks) on a longer sequence.

Each variant runs in fresh subprocesses on a SynVid folder (made once by the core dumper): build the trainer, one
warm-up iteration, then ``--iters`` timed iterations (median over all). The checkpointing comparison runs
``--rounds`` subprocesses per variant, alternating, and reports the spread; a checkpointed iteration faster than a
plain one beyond the noise marks the run invalid. Peak memory per rank: CUDA
``max_memory_allocated`` growth over the timed iterations on GPU; on CPU the peak RSS growth (VmHWM reset via
``/proc/self/clear_refs`` after warm-up, ``malloc_trim`` first), i.e. the activations of an iteration. Prints
tables and writes ``bench/out/bench_train.json`` with the ratios measured side by side.

    python bench/bench_train.py [--iters 3] [--rounds 2] [--frames 9] [--height 64] [--width 96] [--batch 2]
                                [--sp-frames 17 --sp-height 256 --sp-width 384]

It also measures the trainer's final export (``train.checkpoint.export_student``) of a wider tiny-family
transformer (hidden ``--export-hidden``), in one process and under ``torchrun --nproc_per_node 2`` (FSDP2-sharded):
rank 0's peak RSS growth while writing the bf16 original-layout file, streamed tensor by tensor vs from a gathered
full state dict (``checkpoint_format = "full"``), next to the model's and its largest block's size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.utils.io import write_json  # noqa: E402
from bench.validity import check_at_least, check_noise, ratio_noise, spread, verdict  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_data(root: Path, args, frames: int, height: int, width: int, **model: int) -> None:
    from accvideo_core.models.loading import save_transformer
    from accvideo_core.synvid.dump import dump_synvid
    from accvideo_core.testing import tiny_transformer

    g = torch.Generator().manual_seed(0)
    emb = {"text_states": torch.randn(2, 16, 40, generator=g), "text_mask": torch.ones(2, 16, dtype=torch.long),
           "pooled": torch.randn(2, 24, generator=g), "prompts": ["a", "b"]}
    save_transformer(tiny_transformer(seed=0, **model), root / "teacher.safetensors")
    dump_synvid(tiny_transformer(seed=0, **model), emb, root / "data", num=args.batch * 2 + 1, frames=frames,
                height=height, width=width, steps=10, dtype="float32", progress=lambda m: None)


def child(args) -> None:
    """Subprocess: time ``args.iters`` iterations and measure peak memory for one checkpointing setting."""
    import ctypes
    import gc

    from accvideo_core.train.config import config_from_dict
    from accvideo_core.train.loop import Trainer

    data = Path(args.data)
    micro = 1 if args.sp else args.batch   # the SP comparison: one sample per forward in both variants
    cfg = config_from_dict({
        "model": {"teacher": str(data / "teacher.safetensors"), "gradient_checkpointing": bool(args.checkpointing)},
        "data": {"root": str(data / "data"), "val_samples": 1},
        "optim": {"steps": 1000, "total_batch": args.batch, "micro_batch": micro, "lr": 1e-4,
                  "segments_per_iteration": 1 if args.sp else 0},
        "loss": {"head_width": 32, "head_groups": 8},
        "runtime": {"device": args.device, "sequence_parallel": max(args.sp, 1)},
        "log": {"out_dir": str(data / f"run_{int(args.checkpointing)}_sp{args.sp}"), "plot": False},
    })
    tr = Trainer(cfg)
    cuda = tr.device.type == "cuda"
    tr.train_step(0)  # warm-up
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        base = _status_kib("VmRSS") * 1024
    times = []
    for i in range(args.iters):
        t0 = time.perf_counter()
        tr.train_step(i + 1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") * 1024) - base
    result = {"step_seconds": statistics.median(times), "all_step_seconds": times, "peak_growth_bytes": peak}
    if args.sp:   # under torchrun: one file per rank (stdout of the ranks interleaves)
        write_json(result, data / f"{tr.info.world}x{args.sp}_rank{tr.info.rank}.json")
        tr.close()
    else:
        print(json.dumps(result))


SP_MODEL = {"hidden_size": 128, "num_heads": 4}
MMAP_THRESHOLD = 65536


SP_VARIANTS = {"1 process": (1, 1), "2 ranks, dp 2, sp 1": (2, 1), "2 ranks, dp 1, sp 2": (2, 2)}  # (ranks, sp)
SHORT_VIDEO = (5, 32, 48)  # 12 image tokens: the per-rank memory an iteration needs besides the activations


def _sp_run(name: str, data: Path, args) -> list[dict]:
    ranks, sp = SP_VARIANTS[name]
    launch = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(ranks)]
    cmd = launch + [__file__, "--child", "--data", str(data), "--checkpointing", "1", "--sp", str(sp),
                    "--iters", str(args.iters), "--batch", str(args.batch), "--device", args.device]
    # fixed mmap threshold: glibc's dynamic one keeps freed large blocks in the heap, so the RSS peak would depend
    # on the allocation order rather than on the live activations
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"benchmark child ({name}) failed:\n{proc.stderr[-3000:]}")
    return [json.loads((data / f"{ranks}x{sp}_rank{r}.json").read_text()) for r in range(ranks)]


def sp_compare(args) -> dict:
    """Sequence parallelism on the longer sequence with a wider teacher (hidden 128, 4 heads), one segment per
    iteration, micro-batch 1: one process; 2 ranks data-parallel (FSDP2, sp 1); 2 ranks as one SP group (FSDP2,
    sp 2); the last two differ only by SP. Per-rank peak RSS growth and step time; activation memory = the peak
    growth minus that of the same layout on a 12-token video (FSDP2's unsharded blocks and gradients, gloo
    buffers and the optimizer step are the same at any length)."""
    from accvideo_core.latents import latent_shape

    results, short = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        long_dir, short_dir = Path(tmp) / "long", Path(tmp) / "short"
        make_data(long_dir, args, args.sp_frames, args.sp_height, args.sp_width, **SP_MODEL)
        make_data(short_dir, args, *SHORT_VIDEO, **SP_MODEL)
        for name in SP_VARIANTS:
            results[name] = _sp_run(name, long_dir, args)
            short[name] = _sp_run(name, short_dir, args)
    _, _, t, h, w = latent_shape(args.sp_frames, args.sp_height, args.sp_width)
    peak = {name: max(r["peak_growth_bytes"] for r in ranks) for name, ranks in results.items()}
    act = {name: peak[name] - max(r["peak_growth_bytes"] for r in short[name]) for name in SP_VARIANTS}
    step = {name: max(r["step_seconds"] for r in ranks) for name, ranks in results.items()}
    one, dp2, sp2 = SP_VARIANTS
    return {"latent": [16, t, h, w], "image_tokens": t * (h // 2) * (w // 2), "model": SP_MODEL,
            "memory_method": f"peak RSS growth per rank, MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}; activations = "
                             f"minus the same layout's peak growth on a {SHORT_VIDEO} video",
            "gradient_checkpointing": True, "micro_batch": 1, "segments_per_iteration": 1, "per_rank": results,
            "per_rank_short_video": short, "activation_bytes": act,
            "activation_ratio_sp2_vs_dp2": act[sp2] / act[dp2], "activation_ratio_sp2_vs_one_process":
            act[sp2] / act[one], "peak_ratio_sp2_vs_dp2": peak[sp2] / peak[dp2],
            "time_ratio_sp2_vs_dp2": step[sp2] / step[dp2], "time_ratio_sp2_vs_one_process": step[sp2] / step[one]}


def export_child(args) -> None:
    """Subprocess: peak RSS growth of the streamed and the gathered export (bf16 file) of one model."""
    import ctypes

    from accvideo_core.testing import tiny_transformer
    from accvideo_core.train import distributed as D
    from accvideo_core.train.checkpoint import export_student

    h = args.export_hidden
    model = tiny_transformer(seed=0, hidden_size=h, num_heads=h // 128, num_double_blocks=2, num_single_blocks=4)
    blocks = list(model.double_blocks) + list(model.single_blocks)
    sizes = {"model_bytes_fp32": sum(p.numel() * 4 for p in model.parameters()),
             "largest_block_bytes_fp32": max(sum(p.numel() * 4 for p in b.parameters()) for b in blocks),
             "largest_tensor_bytes_fp32": max(p.numel() * 4 for p in model.parameters())}
    info = D.init_distributed("cpu", "auto")  # under torchrun: FSDP2-sharded like the trainer's student
    if info.fsdp:
        D.shard_transformer(model, mesh=D.device_mesh(info.device), param_dtype=None, reshard_after_forward=True)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_student(model, Path(tmp) / "warm.safetensors", torch.bfloat16, info, metadata={})  # imports
        for name in ("streamed", "gathered"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            base = _status_kib("VmRSS") * 1024
            t0 = time.perf_counter()
            state = D.full_model_state(model, info) if name == "gathered" else None
            export_student(model, Path(tmp) / f"{name}.safetensors", torch.bfloat16, info, metadata={}, state=state)
            out[name] = {"peak_growth_bytes": _status_kib("VmHWM") * 1024 - base,
                         "seconds": time.perf_counter() - t0}
            del state
    if info.is_main:
        print(json.dumps({**sizes, "ranks": info.world, **out}))
    D.shutdown(info)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--batch", type=int, default=2, help="samples per iteration (one micro-batch)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sp-frames", type=int, default=17, help="video size of the sequence-parallel comparison")
    p.add_argument("--sp-height", type=int, default=256)
    p.add_argument("--sp-width", type=int, default=384)
    p.add_argument("--rounds", type=int, default=2, help="fresh subprocesses per variant, alternating order")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench_train.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--export-hidden", type=int, default=512, help="hidden size of the model of the export bench")
    p.add_argument("--export-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sp", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    if args.export_child:
        export_child(args)
        return 0
    runs: dict[str, list[dict]] = {"no_checkpointing": [], "checkpointing": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp), args, args.frames, args.height, args.width)
        for r in range(args.rounds):  # variants alternate (A-B, B-A, ...) so load changes hit both alike
            for ckpt in ((0, 1) if r % 2 == 0 else (1, 0)):
                cmd = [sys.executable, __file__, "--child", "--data", tmp, "--checkpointing", str(ckpt),
                       "--iters", str(args.iters), "--batch", str(args.batch), "--device", args.device]
                env = dict(os.environ, PYTHONPATH=str(ROOT))
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
                runs["checkpointing" if ckpt else "no_checkpointing"].append(
                    json.loads(proc.stdout.strip().splitlines()[-1]))
        export = {}
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        for ranks, launch in ((1, [sys.executable]), (2, torchrun)):
            proc = subprocess.run(launch + [__file__, "--export-child", "--export-hidden", str(args.export_hidden)],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if proc.returncode:
                raise RuntimeError(f"export benchmark child failed:\n{proc.stderr[-3000:]}")
            export[f"{ranks}_rank"] = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {}
    for name, rs in runs.items():
        steps = [t for run in rs for t in run["all_step_seconds"]]
        results[name] = {"step_seconds": spread(steps)["median"], "all_step_seconds": steps, "spread": spread(steps),
                         "peak_growth_bytes": max(run["peak_growth_bytes"] for run in rs)}
    off, on = results["no_checkpointing"], results["checkpointing"]
    report = {
        "benchmark": "accvideo train iteration (traj + adversarial, 5 segments, sequential updates)",
        "device": args.device, "torch": torch.__version__, "machine": platform.machine(),
        "threads": torch.get_num_threads(), "model": "accvideo_core.testing.tiny_transformer (hidden 32, 2+2 blocks)",
        "latent": [16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8], "batch": args.batch,
        "iters": args.iters, "rounds": args.rounds,
        "memory_method": "cuda max_memory_allocated growth" if args.device.startswith("cuda")
        else "peak RSS growth over the timed iterations (fresh subprocess per variant)",
        "results": results,
        "time_ratio_checkpointing_vs_not": on["step_seconds"] / off["step_seconds"],
        "memory_ratio_checkpointing_vs_not": (on["peak_growth_bytes"] / off["peak_growth_bytes"]
                                              if off["peak_growth_bytes"] > 0 else None),
        "export": {"model": f"tiny_transformer(hidden_size={args.export_hidden}, 2 double + 4 single blocks)",
                   "file_dtype": "bf16", "memory_method": "rank 0's peak RSS growth while exporting (fresh process "
                   "per rank count; 2 ranks: torchrun, gloo, FSDP2-sharded model)",
                   **export},
    }
    time_ratio = report["time_ratio_checkpointing_vs_not"]
    report["validity"] = verdict([
        # recomputing the blocks in the backward pass adds work: checkpointing cannot be faster beyond the noise
        check_at_least("checkpointing time ratio >= 1 (recompute adds work)", time_ratio, 1.0,
                       ratio_noise(on["spread"], off["spread"]) * time_ratio),
        *(check_noise(f"{name} step seconds", r["spread"]) for name, r in results.items())])
    for failed in report["validity"]["failed"]:
        print(f"INVALID RUN: {failed}")
    print(f"{'variant':<20}{'s/iter':>10}{'peak MiB':>12}")
    for name, r in results.items():
        print(f"{name:<20}{r['step_seconds']:>10.3f}{r['peak_growth_bytes'] / 2**20:>12.1f}")
    mr = report["memory_ratio_checkpointing_vs_not"]
    print(f"checkpointing / none: time x{report['time_ratio_checkpointing_vs_not']:.2f}, memory "
          f"x{mr:.2f}" if mr is not None else "memory ratio n/a")
    mib = 2 ** 20
    for name, e in export.items():
        print(f"export (hidden {args.export_hidden}, {name}): model {e['model_bytes_fp32'] / mib:.1f} MiB fp32, "
              f"largest block {e['largest_block_bytes_fp32'] / mib:.1f} MiB; rank 0 peak RSS growth streamed "
              f"{e['streamed']['peak_growth_bytes'] / mib:.1f} MiB, gathered "
              f"{e['gathered']['peak_growth_bytes'] / mib:.1f} MiB")
    sp = report["sequence_parallel"] = sp_compare(args)
    print(f"sequence parallelism, {sp['image_tokens']} image tokens, checkpointing, micro-batch 1 (per rank):")
    print(f"{'variant':<30}{'s/iter':>10}{'peak MiB':>12}{'activations MiB':>17}")
    for name, ranks in sp["per_rank"].items():
        for r, res in enumerate(ranks):
            peak_mib = res["peak_growth_bytes"] / 2**20
            print(f"{name + ', rank ' + str(r):<30}{res['step_seconds']:>10.3f}{peak_mib:>12.1f}"
                  f"{sp['activation_bytes'][name] / 2**20:>17.1f}")
    print(f"sp 2 / dp 2 (worst rank): activations x{sp['activation_ratio_sp2_vs_dp2']:.2f}, peak "
          f"x{sp['peak_ratio_sp2_vs_dp2']:.2f}, time x{sp['time_ratio_sp2_vs_dp2']:.2f}; sp 2 / one process: "
          f"activations x{sp['activation_ratio_sp2_vs_one_process']:.2f}, time "
          f"x{sp['time_ratio_sp2_vs_one_process']:.2f}")
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
