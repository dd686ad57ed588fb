"""Benchmark one AccVideo training iteration (tiny teacher), variants side by side in one run: with and without
gradient checkpointing; the LoRA mode vs the full fine-tune; sequence parallelism sp = 1 (one process) vs sp = 2
(torchrun, 2 ranks) on a longer sequence; and the final export's memory.

Each variant runs in fresh subprocesses on a SynVid folder (made once by the core dumper): build the trainer, one
warm-up iteration, then ``--iters`` timed iterations. The checkpointing and LoRA comparisons run ``--rounds`` /
``--lora-rounds`` subprocesses per variant in rotating order and report the spread (``bench/validity.py``); a
checkpointed iteration faster than a plain one beyond the noise, or a LoRA state saving larger than the arrays
the LoRA mode does not hold, marks the run invalid. Peak memory per rank: CUDA ``max_memory_allocated`` growth
over the timed iterations on GPU; on CPU the peak RSS growth (VmHWM reset via ``/proc/self/clear_refs`` after
warm-up, ``malloc_trim`` first), i.e. the activations of an iteration; "state" is what building the trainer and the
warm-up iteration added (models, gradients, optimizer states). Prints tables and writes
``bench/out/bench_train.json``.

    python bench/bench_train.py [--parts checkpointing,export,sp,lora] [--iters 3] [--rounds 2] [--frames 9]
        [--height 64] [--width 96] [--batch 2] [--sp-frames 17 --sp-height 256 --sp-width 384]
        [--lora-rank 8 --lora-hidden 256 --lora-rounds 2]

The export part measures the trainer's final export (``train.checkpoint.export_student``) of a wider tiny-family
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
from bench.memory import peak_rss_growth, reset_peak_rss  # noqa: E402
from bench.validity import check_at_least, check_at_most, check_noise, ratio_noise, spread, verdict  # noqa: E402


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
    import gc

    from accvideo_core.train.config import config_from_dict
    from accvideo_core.train.loop import Trainer

    data = Path(args.data)
    micro = 1 if args.sp else args.batch   # the SP comparison: one sample per forward in both variants
    cfg = config_from_dict({
        "model": {"teacher": str(data / "teacher.safetensors"), "gradient_checkpointing": bool(args.checkpointing),
                  "lora_rank": args.child_lora_rank},
        "data": {"root": str(data / "data"), "val_samples": 1},
        "optim": {"steps": 1000, "total_batch": args.batch, "micro_batch": micro, "lr": 1e-4,
                  "segments_per_iteration": 1 if args.sp else 0},
        "loss": {"head_width": 32, "head_groups": 8},
        "runtime": {"device": args.device, "sequence_parallel": max(args.sp, 1)},
        "log": {"out_dir": str(data / f"run_{int(args.checkpointing)}_sp{args.sp}_r{args.child_lora_rank}"),
                "plot": False},
    })
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else reset_peak_rss()
    tr = Trainer(cfg, overwrite=True)   # each round in the same folder
    tr.train_step(0)  # warm-up
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    times = []
    for i in range(args.iters):
        t0 = time.perf_counter()
        tr.train_step(i + 1)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else peak_rss_growth(base)
    result = {"step_seconds": statistics.median(times), "all_step_seconds": times, "peak_growth_bytes": peak,
              "state_bytes": base - before,
              "trained_student_parameters": sum(p.numel() for g in tr.opt.param_groups for p in g["params"])}
    if args.sp:   # under torchrun: one file per rank (stdout of the ranks interleaves)
        write_json(result, data / f"{tr.info.world}x{args.sp}_rank{tr.info.rank}.json")
        tr.close()
    else:
        print(json.dumps(result))


SP_MODEL = {"hidden_size": 128, "num_heads": 4}
PARTS = ("checkpointing", "export", "sp", "lora")
RSS_SLACK = 4 * 2 ** 20  # bytes: allocator arenas and module objects in an RSS difference
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


def interleaved(variants: dict[str, list[str]], data: Path, args, rounds: int) -> dict[str, list[dict]]:
    """``rounds`` fresh child processes per variant (extra child arguments), the variants' order rotating from
    round to round so that load changes of the shared machine hit all alike. Returns each variant's results."""
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            cmd = [sys.executable, __file__, "--child", "--data", str(data), "--iters", str(args.iters),
                   "--batch", str(args.batch), "--device", args.device, *variants[name]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            if proc.returncode:
                raise RuntimeError(f"benchmark child ({name}) failed:\n{proc.stderr[-3000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


def _summary(rs: list[dict]) -> dict:
    """Step times of all rounds with their spread; peak growth: the largest of the rounds; state: the median."""
    steps = [t for run in rs for t in run["all_step_seconds"]]
    states = [run["state_bytes"] for run in rs]
    return {"step_seconds": spread(steps)["median"], "all_step_seconds": steps, "spread": spread(steps),
            "peak_growth_bytes": max(run["peak_growth_bytes"] for run in rs),
            "all_peak_growth_bytes": [run["peak_growth_bytes"] for run in rs],
            "state_bytes": statistics.median(states), "all_state_bytes": states, "state_spread": spread(states),
            "trained_student_parameters": rs[0]["trained_student_parameters"]}


def lora_compare(args) -> dict:
    """LoRA mode (``model.lora_rank``) vs the full fine-tune on a wider tiny teacher (hidden ``--lora-hidden``),
    both with gradient checkpointing, in interleaved rounds of fresh processes: step time, peak growth over an
    iteration, and the state (what building the trainer and one warm-up iteration add: models, gradients,
    optimizer states). Checked: the LoRA mode cannot save more state than the full mode's arrays it does not hold
    (on CPU, fp32: the separate teacher, the student's gradients and AdamW states: 16 bytes per parameter, less
    16 per adapter parameter)."""
    model = {"hidden_size": args.lora_hidden}
    variants = {"full": ["--checkpointing", "1"],
                f"lora_rank_{args.lora_rank}": ["--checkpointing", "1", "--child-lora-rank", str(args.lora_rank)]}
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp), args, args.frames, args.height, args.width, **model)
        runs = interleaved(variants, Path(tmp), args, args.lora_rounds)
    full, lora = (_summary(runs[name]) for name in variants)
    # the two variants of a round ran next to each other: their ratio sees the same load
    paired = [statistics.median(b["all_step_seconds"]) / statistics.median(a["all_step_seconds"])
              for a, b in zip(*(runs[name] for name in variants))]
    from accvideo_core.testing import tiny_transformer

    params = sum(p.numel() for p in tiny_transformer(seed=0, **model).parameters())
    adapters = lora["trained_student_parameters"]
    bound = 16 * (params - adapters) if args.device == "cpu" else float("nan")
    saving = full["state_bytes"] - lora["state_bytes"]
    time_ratio = lora["step_seconds"] / full["step_seconds"]
    checks = [check_noise(f"{name} step seconds", r["spread"]) for name, r in (("full", full), ("lora", lora))]
    if args.device == "cpu":
        # the states' own scatter, and never less than the allocator's granularity plus the second model's
        # Python objects (a few MiB that no formula over the tensors counts)
        noise = max(ratio_noise(full["state_spread"], lora["state_spread"]) * full["state_bytes"], RSS_SLACK)
        checks.append(check_at_most("state saving <= the arrays the LoRA mode does not hold", saving, bound,
                                    noise / bound))
    return {"model": f"tiny_transformer(hidden_size={args.lora_hidden}), 2 double + 2 single blocks",
            "parameters": params, "lora_rank": args.lora_rank, "gradient_checkpointing": True,
            "rounds": args.lora_rounds, "results": {"full": full, f"lora_rank_{args.lora_rank}": lora},
            "time_ratio_lora_vs_full": time_ratio, "time_ratio_per_round": paired,
            "time_ratio_per_round_spread": spread(paired),
            "peak_ratio_lora_vs_full": lora["peak_growth_bytes"] / full["peak_growth_bytes"],
            "state_ratio_lora_vs_full": lora["state_bytes"] / full["state_bytes"],
            "state_saving_bytes": saving, "state_saving_bound_bytes": bound, "checks": checks}


def export_child(args) -> None:
    """Subprocess: peak RSS growth of the streamed and the gathered export (bf16 file) of one model."""
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
            base = reset_peak_rss()
            t0 = time.perf_counter()
            state = D.full_model_state(model, info) if name == "gathered" else None
            export_student(model, Path(tmp) / f"{name}.safetensors", torch.bfloat16, info, metadata={}, state=state)
            out[name] = {"peak_growth_bytes": peak_rss_growth(base),
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
    p.add_argument("--child-lora-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, default=8, help="adapter rank of the LoRA-vs-full comparison")
    p.add_argument("--lora-hidden", type=int, default=256, help="teacher width of the LoRA-vs-full comparison")
    p.add_argument("--lora-rounds", type=int, default=2, help="fresh subprocesses per variant there")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args()
    if args.child:
        child(args)
        return 0
    if args.export_child:
        export_child(args)
        return 0
    parts = [x for x in args.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts: choose from {','.join(PARTS)}")
    report = {"benchmark": "accvideo train iteration (traj + adversarial, 5 segments, sequential updates)",
              "device": args.device, "torch": torch.__version__, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "iters": args.iters, "batch": args.batch,
              "load_average_at_start": os.getloadavg(),  # 1/5/15 min: how busy the (shared) machine was
              "latent": [16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8],
              "memory_method": "cuda max_memory_allocated growth" if args.device.startswith("cuda")
              else "peak RSS growth over the timed iterations (fresh subprocess per variant)"}
    checks = []
    for part in parts:
        result = report[part] = {"checkpointing": checkpointing_compare, "export": export_compare,
                                 "sp": sp_compare, "lora": lora_compare}[part](args)
        checks += result.pop("checks", [])
        PRINTERS[part](result, args)
    report["load_average_at_end"] = os.getloadavg()
    report["validity"] = verdict(checks)
    for failed in report["validity"]["failed"]:
        print(f"INVALID RUN: {failed}")
    write_json(report, args.out)
    print(f"wrote {args.out}")
    return 0


def checkpointing_compare(args) -> dict:
    """With and without gradient checkpointing (hidden 32), interleaved rounds of fresh processes."""
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp), args, args.frames, args.height, args.width)
        runs = interleaved({"no_checkpointing": ["--checkpointing", "0"], "checkpointing": ["--checkpointing", "1"]},
                           Path(tmp), args, args.rounds)
    results = {name: _summary(rs) for name, rs in runs.items()}
    off, on = results["no_checkpointing"], results["checkpointing"]
    time_ratio = on["step_seconds"] / off["step_seconds"]
    # recomputing the blocks in the backward pass adds work: checkpointing cannot be faster beyond the noise
    checks = [check_at_least("checkpointing time ratio >= 1 (recompute adds work)", time_ratio, 1.0,
                             ratio_noise(on["spread"], off["spread"]) * time_ratio),
              *(check_noise(f"{name} step seconds", r["spread"]) for name, r in results.items())]
    return {"model": "accvideo_core.testing.tiny_transformer (hidden 32, 2+2 blocks)", "rounds": args.rounds,
            "results": results, "time_ratio_checkpointing_vs_not": time_ratio,
            "memory_ratio_checkpointing_vs_not": (on["peak_growth_bytes"] / off["peak_growth_bytes"]
                                                  if off["peak_growth_bytes"] > 0 else None), "checks": checks}


def export_compare(args) -> dict:
    """The final export's rank-0 memory, one process and 2 ranks (torchrun, FSDP2-sharded)."""
    export = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for ranks, launch in ((1, [sys.executable]), (2, torchrun)):
        proc = subprocess.run(launch + [__file__, "--export-child", "--export-hidden", str(args.export_hidden)],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if proc.returncode:
            raise RuntimeError(f"export benchmark child failed:\n{proc.stderr[-3000:]}")
        export[f"{ranks}_rank"] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"model": f"tiny_transformer(hidden_size={args.export_hidden}, 2 double + 4 single blocks)",
            "file_dtype": "bf16", "memory_method": "rank 0's peak RSS growth while exporting (fresh process per "
            "rank count; 2 ranks: torchrun, gloo, FSDP2-sharded model)", **export}


MIB = 2 ** 20


def print_checkpointing(r: dict, args) -> None:
    print(f"{'variant':<20}{'s/iter':>10}{'peak MiB':>12}")
    for name, v in r["results"].items():
        print(f"{name:<20}{v['step_seconds']:>10.3f}{v['peak_growth_bytes'] / MIB:>12.1f}")
    mr = r["memory_ratio_checkpointing_vs_not"]
    print(f"checkpointing / none: time x{r['time_ratio_checkpointing_vs_not']:.2f}, memory "
          + (f"x{mr:.2f}" if mr is not None else "n/a"))


def print_export(r: dict, args) -> None:
    for name, e in r.items():
        if isinstance(e, dict):
            print(f"export (hidden {args.export_hidden}, {name}): model {e['model_bytes_fp32'] / MIB:.1f} MiB "
                  f"fp32, largest block {e['largest_block_bytes_fp32'] / MIB:.1f} MiB; rank 0 peak RSS growth "
                  f"streamed {e['streamed']['peak_growth_bytes'] / MIB:.1f} MiB, gathered "
                  f"{e['gathered']['peak_growth_bytes'] / MIB:.1f} MiB")


def print_sp(sp: dict, args) -> None:
    print(f"sequence parallelism, {sp['image_tokens']} image tokens, checkpointing, micro-batch 1 (per rank):")
    print(f"{'variant':<30}{'s/iter':>10}{'peak MiB':>12}{'activations MiB':>17}")
    for name, ranks in sp["per_rank"].items():
        for r, res in enumerate(ranks):
            print(f"{name + ', rank ' + str(r):<30}{res['step_seconds']:>10.3f}"
                  f"{res['peak_growth_bytes'] / MIB:>12.1f}{sp['activation_bytes'][name] / MIB:>17.1f}")
    print(f"sp 2 / dp 2 (worst rank): activations x{sp['activation_ratio_sp2_vs_dp2']:.2f}, peak "
          f"x{sp['peak_ratio_sp2_vs_dp2']:.2f}, time x{sp['time_ratio_sp2_vs_dp2']:.2f}; sp 2 / one process: "
          f"activations x{sp['activation_ratio_sp2_vs_one_process']:.2f}, time "
          f"x{sp['time_ratio_sp2_vs_one_process']:.2f}")


def print_lora(r: dict, args) -> None:
    print(f"LoRA rank {r['lora_rank']} vs full fine-tune, {r['model']} ({r['parameters']:,} parameters), "
          f"checkpointing, {r['rounds']} interleaved rounds:")
    print(f"{'variant':<14}{'s/iter (median)':>16}{'spread':>9}{'peak MiB':>10}{'state MiB':>11}{'trained':>11}")
    for name, v in r["results"].items():
        print(f"{name:<14}{v['step_seconds']:>16.3f}{v['spread']['rel_std']:>8.0%} "
              f"{v['peak_growth_bytes'] / MIB:>10.1f}{v['state_bytes'] / MIB:>11.1f}"
              f"{v['trained_student_parameters']:>11,}")
    rounds = ", ".join(f"{x:.2f}" for x in r["time_ratio_per_round"])
    print(f"LoRA / full: time x{r['time_ratio_lora_vs_full']:.2f} (per round {rounds}), peak growth "
          f"x{r['peak_ratio_lora_vs_full']:.2f}, state x{r['state_ratio_lora_vs_full']:.2f} (saving {r['state_saving_bytes'] / MIB:.1f} MiB, at most "
          f"{r['state_saving_bound_bytes'] / MIB:.1f} MiB)")


PRINTERS = {"checkpointing": print_checkpointing, "export": print_export, "sp": print_sp, "lora": print_lora}


if __name__ == "__main__":
    raise SystemExit(main())
