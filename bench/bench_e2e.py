"""End-to-end AccVideo-5 vs teacher-50 on the miniature pipeline, and the trajectory-dump overhead, side by side.

1. **End to end** (the paper's Table 1 measure: text encoding + diffusion + VAE decoding), per video, on the
   shipped miniature family (17 frames x 64 x 64, latent 5 x 8 x 8): teacher-50 and the 5-step student are run
   interleaved (prompt by prompt) so both see the same machine load. The student has the teacher's architecture,
   so its cost is the teacher's at 5 steps; pass ``--student`` (e.g. the demo's
   ``outputs/demo/train_adv/student.safetensors``) to time those weights, otherwise the teacher's weights run at 5
   steps. Goal: >= 9.5x (the diffusion part alone gives at most 10x).
2. **Trajectory-dump overhead**: a ``dump_synvid`` run (the core dumper: 50 teacher steps, recording the 6 key
   latents and writing one SynVid file per sample) against a plain 50-step ``sample_flow`` run over the same
   noise and prompts, ``--rounds`` pairs of runs of ``--dump-samples`` samples, alternating order. Goal: <= 3 %.
3. **Decoder floor**: the time of one decode (same latent, same video size) by the shipped decoder and by
   ever narrower decoders of the same architecture (random weights: the cost does not depend on them), in
   transformer calls, and the end-to-end speedup each would allow, ``(50 D + O) / (5 D + O)``. It shows how far
   a cheaper VAE alone could move the figure.
4. **Transformer ceiling**: the other lever: wider transformers of the shipped depth (random weights, head dim
   kept), one call at the demo's size timed interleaved with the shipped decoder. For each width: parameters and
   bf16 file size (the family must fit in 25 MB), text + decode in its calls and the end-to-end speedup it would
   allow, and the cost of one training step (forward + backward, batch 8) relative to the shipped width: the demo's
   dump and distillation time scale with it.

    python bench/bench_e2e.py [--prompts 4] [--repeats 3] [--dump-samples 16] [--rounds 6] [--threads N]

Prints a summary and writes ``bench/out/bench_e2e.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.demo import auto_threads, heldout_prompts  # noqa: E402
from accvideo_core.mini.family import load_family  # noqa: E402
from accvideo_core.models.loading import load_transformer  # noqa: E402
from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D  # noqa: E402
from accvideo_core.models.vae_hunyuan_video import DecoderCausal3D  # noqa: E402
from accvideo_core.sampling import flow_sigmas, sample_flow  # noqa: E402
from accvideo_core.synvid.dump import dump_synvid  # noqa: E402
from accvideo_core.utils.io import write_json  # noqa: E402
from bench.validity import (check_at_least, check_at_most, check_noise, goal_status, ratio_noise, spread,  # noqa: E402
                            verdict)


def end_to_end(family, student, prompts: list[str], repeats: int) -> dict:
    """Per-video seconds (text, sampling, decode, total) of teacher-50 and student-5, interleaved."""
    runs = {"teacher50": (family.teacher, 50), "student5": (student, 5)}
    times = {k: {"text": [], "sampling": [], "decode": [], "total": []} for k in runs}
    family.generate(prompts[:1], [0], 5, model=student)  # warm-up (allocator, first-call costs)
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            order = list(runs) if (r + i) % 2 == 0 else list(reversed(runs))
            for name in order:
                model, steps = runs[name]
                _, t = family.generate([prompt], [100 * r + i], steps, model=model)
                for k, v in t.items():
                    times[name][k].append(v)
                times[name]["total"].append(sum(t.values()))
    out = {}
    for name, t in times.items():
        out[name] = {"steps": runs[name][1],
                     **{f"{k}_s": statistics.median(v) for k, v in t.items()},
                     **{f"{k}_mean_s": statistics.fmean(v) for k, v in t.items()}}
    t50, s5 = out["teacher50"], out["student5"]
    dit_call = t50["sampling_mean_s"] / 50
    out["speedup_end_to_end"] = t50["total_mean_s"] / s5["total_mean_s"]
    out["speedup_end_to_end_median"] = t50["total_s"] / s5["total_s"]
    out["speedup_sampling"] = t50["sampling_mean_s"] / s5["sampling_mean_s"]
    out["fixed_cost_in_dit_calls"] = (s5["text_mean_s"] + s5["decode_mean_s"]) / dit_call
    out["spread"] = {name: {k: spread(times[name][k]) for k in ("sampling", "total")} for name in runs}
    sp = out["spread"]
    call_ratio = runs["teacher50"][1] / runs["student5"][1]
    out["checks"] = [
        check_at_most(f"sampling speedup <= model-call ratio {call_ratio:g}", out["speedup_sampling"], call_ratio,
                      ratio_noise(sp["teacher50"]["sampling"], sp["student5"]["sampling"])),
        check_at_most("end-to-end speedup <= sampling speedup (text + decode only add)", out["speedup_end_to_end"],
                      out["speedup_sampling"], ratio_noise(sp["teacher50"]["total"], sp["student5"]["total"])),
        *(check_noise(f"{name} seconds per video", sp[name]["total"]) for name in runs)]
    out["goal"] = ">= 9.5x"
    out["goal_met"] = out["speedup_end_to_end"] >= 9.5
    return out


def dump_overhead(family, prompts: list[str], samples: int, rounds: int) -> dict:
    """Seconds per sample of plain 50-step sampling vs the core dumper, each run the way a user runs it.

    One *dump run* is one ``dump_synvid`` call that samples ``samples`` trajectories and writes them (6 key
    latents each, bf16 safetensors, atomic writes with fsync, manifest) into a fresh folder; one *plain run*
    samples the same ``samples`` (prompt, seed) pairs with ``sample_flow`` and keeps nothing. ``rounds`` pairs of
    runs alternate A-B / B-A so slow drifts in machine load hit both alike. The overhead is the ratio of the
    total times minus 1 (and, as a check, the median of the per-round ratios). The model hash a real run computes
    once per file is passed in (it costs one read of the checkpoint per run, not per sample).
    """
    text = family.encode(prompts)
    sigmas = flow_sigmas(50, 7.0)
    model = family.teacher
    emb = {"text_states": text.states, "text_mask": text.mask, "pooled": text.pooled, "prompts": list(prompts)}

    def plain_run() -> float:
        t0 = time.perf_counter()
        for i in range(samples):
            j = i % len(prompts)
            noise = family.noise([1000 + i])  # the dumper makes the same seeded noise
            sample_flow(model, noise, sigmas, text_states=text.states[j:j + 1], text_mask=text.mask[j:j + 1],
                        pooled=text.pooled[j:j + 1], guidance=6.0)
        return time.perf_counter() - t0

    def dump_run(folder: Path) -> float:
        t0 = time.perf_counter()
        dump_synvid(model, emb, folder, num=samples, seed=1000, frames=17, height=64, width=64, steps=50,
                    store="key", dtype="bfloat16", source_model="teacher.safetensors", source_model_hash="bench",
                    progress=lambda _msg: None)
        return time.perf_counter() - t0

    plain, dumped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        plain_run()  # warm-up (allocator, first-call costs)
        for r in range(rounds):
            if r % 2 == 0:
                plain.append(plain_run())
                dumped.append(dump_run(Path(tmp) / f"synvid_{r}"))
            else:
                dumped.append(dump_run(Path(tmp) / f"synvid_{r}"))
                plain.append(plain_run())
    overhead = sum(dumped) / sum(plain) - 1.0
    per_round = statistics.median(d / p - 1.0 for d, p in zip(dumped, plain))
    n = samples * rounds
    sp = {"plain": spread(plain), "dump": spread(dumped)}
    checks = [check_at_least("dump overhead >= 0 (writing more cannot be faster)", overhead, 0.0,
                             ratio_noise(sp["plain"], sp["dump"])),
              *(check_noise(f"{name} run seconds", s) for name, s in sp.items())]
    return {"plain_s_per_sample": sum(plain) / n, "dump_s_per_sample": sum(dumped) / n, "overhead": overhead,
            "overhead_median_of_rounds": per_round, "rounds": rounds, "samples_per_run": samples,
            "plain_run_s": plain, "dump_run_s": dumped, "spread": sp, "checks": checks,
            "what": "one dump_synvid run (6 key latents per sample, bf16 safetensors, fsync'd atomic writes, "
                    "manifest) vs one plain sample_flow run over the same samples, runs alternated A-B/B-A",
            "goal": "<= 3%", "goal_met": overhead <= 0.03}


DECODER_WIDTHS = ((4, 8, 16, 32), (4, 4, 8, 16), (2, 4, 8, 16))


@torch.no_grad()
def decoder_floor(family, e2e: dict, repeats: int = 10) -> dict:
    """Decode time of the shipped decoder and of narrower ones of the same architecture, in transformer calls
    (one teacher call timed in the same interleaved loop)."""
    config = family.vae.config
    latent = family.noise([0])  # [1, 16, 5, 8, 8]
    text = family.encode([heldout_prompts(1)[0]])
    timestep = torch.tensor([500.0])
    shipped = f"shipped {config.block_out_channels}"
    jobs = {"transformer call": lambda: family.teacher(latent, timestep, text.states, text.mask, text.pooled, 6.0),
            shipped: lambda: family.vae.decoder(latent)}
    params = {shipped: sum(p.numel() for p in family.vae.decoder.parameters())}
    for widths in DECODER_WIDTHS:
        narrow = DecoderCausal3D(dataclasses.replace(config, block_out_channels=widths,
                                                     norm_num_groups=min(config.norm_num_groups, *widths))).eval()
        jobs[str(widths)] = lambda decoder=narrow: decoder(latent)
        params[str(widths)] = sum(p.numel() for p in narrow.parameters())
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():
        job()  # warm-up
    for _ in range(repeats):
        for name, job in jobs.items():  # interleaved: all see the same load
            t0 = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - t0)
    dit_call = statistics.median(times.pop("transformer call"))
    text_s = e2e["student5"]["text_mean_s"]
    out = {}
    for name, t in times.items():
        fixed = (text_s + statistics.median(t)) / dit_call
        out[name] = {"decode_s": statistics.median(t), "fixed_cost_in_dit_calls": fixed,
                     "speedup_bound": (50 + fixed) / (5 + fixed), "parameters": params[name], "spread": spread(t)}
    return {"decoders": out, "dit_call_s": dit_call,
            "what": "decoder-only time of one 5 x 8 x 8 latent -> 17 x 64 x 64 decode and of one teacher call "
                    "(medians of interleaved repeats); text time from the end-to-end runs; in DiT calls; speedup "
                    "bound (50 D + O) / (5 D + O)"}


TRANSFORMER_WIDTHS = (256, 384, 512)


def transformer_ceiling(family, e2e: dict, repeats: int = 6, batch: int = 8) -> dict:
    """Wider transformers than the shipped one (random weights, same depth and head dim): call time against the
    shipped decoder, the end-to-end bound each allows, file size, and training-step cost relative to shipped."""
    config = family.teacher.config
    head_dim = config.head_dim
    latent = family.noise([0])
    text = family.encode([heldout_prompts(1)[0]])
    timestep = torch.tensor([500.0])
    models = {f"shipped {config.hidden_size}": family.teacher}
    for width in TRANSFORMER_WIDTHS:
        wide = dataclasses.replace(config, hidden_size=width, num_heads=width // head_dim)
        models[str(width)] = HunyuanVideoTransformer3D(wide).eval()
    train_latent = latent.expand(batch, -1, -1, -1, -1).contiguous()
    train_text = [t.expand(batch, *t.shape[1:]).contiguous() for t in (text.states, text.mask, text.pooled)]

    def train_step(model) -> None:
        model.requires_grad_(True)
        velocity = model(train_latent, timestep.expand(batch), *train_text, 6.0)
        velocity.square().mean().backward()
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)

    def decode() -> None:
        family.vae.decoder(latent)

    calls: dict[str, list[float]] = {name: [] for name in models}
    steps: dict[str, list[float]] = {name: [] for name in models}
    decodes: list[float] = []
    with torch.no_grad():
        decode()
        for model in models.values():
            model(latent, timestep, text.states, text.mask, text.pooled, 6.0)
    for r in range(repeats):
        with torch.no_grad():
            t0 = time.perf_counter()
            decode()
            decodes.append(time.perf_counter() - t0)
            for name, model in models.items():
                t0 = time.perf_counter()
                model(latent, timestep, text.states, text.mask, text.pooled, 6.0)
                calls[name].append(time.perf_counter() - t0)
        if r < 2:  # training steps are slow: two each (the first is a warm-up), last one kept
            for name, model in models.items():
                t0 = time.perf_counter()
                train_step(model)
                steps[name].append(time.perf_counter() - t0)
    fixed_s = e2e["student5"]["text_mean_s"] + statistics.median(decodes)
    shipped_step = steps[next(iter(models))][-1]
    out = {}
    for name, model in models.items():
        call = statistics.median(calls[name])
        n = sum(p.numel() for p in model.parameters())
        out[name] = {"parameters": n, "bf16_megabytes": 2 * n / 1e6, "call_s": call,
                     "fixed_cost_in_dit_calls": fixed_s / call, "speedup_bound": (50 * call + fixed_s) / (5 * call + fixed_s),
                     "train_step_s": steps[name][-1], "train_step_vs_shipped": steps[name][-1] / shipped_step,
                     "call_spread": spread(calls[name])}
    return {"transformers": out, "decode_s": statistics.median(decodes), "train_batch": batch,
            "what": "one call of each width at 5 x 8 x 8 latents (interleaved with the shipped decoder); text + decode "
                    "in its calls; bound (50 D + O) / (5 D + O); one forward + backward of batch 8 vs the shipped width"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dump-samples", type=int, default=16, help="samples per dump / plain run")
    p.add_argument("--rounds", type=int, default=6, help="pairs of (plain run, dump run), alternating order")
    p.add_argument("--student", help="distilled student checkpoint (default: the teacher's weights at 5 steps)")
    p.add_argument("--threads", type=int, default=0, help="0 = auto (1 when the machine is already loaded)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "bench_e2e.json"))
    args = p.parse_args(argv)
    threads = args.threads or auto_threads()
    torch.set_num_threads(threads)
    family = load_family()
    student = load_transformer(args.student, dtype=torch.float32).eval() if args.student else family.teacher
    prompts = heldout_prompts(args.prompts)
    t0 = time.perf_counter()
    e2e = end_to_end(family, student, prompts, args.repeats)
    overhead = dump_overhead(family, prompts, args.dump_samples, args.rounds)
    floor = decoder_floor(family, e2e)
    ceiling = transformer_ceiling(family, e2e)
    validity = verdict(e2e["checks"] + overhead["checks"])
    e2e["status"] = goal_status(e2e["goal_met"], validity["valid"])
    overhead["status"] = goal_status(overhead["goal_met"], validity["valid"])
    report = {"benchmark": "e2e_miniature", "threads": threads, "torch": torch.__version__,
              "platform": platform.platform(), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
              "student": args.student or "teacher weights at 5 steps (same architecture and cost)",
              "video": "17 frames x 64 x 64 (latent 5 x 8 x 8)", "end_to_end": e2e, "dump_overhead": overhead,
              "decoder_floor": floor, "transformer_ceiling": ceiling, "validity": validity,
              "seconds": time.perf_counter() - t0}
    path = write_json(report, args.out)
    t50, s5 = e2e["teacher50"], e2e["student5"]
    print(f"teacher-50: {t50['total_mean_s']:.3f} s/video (text {t50['text_mean_s'] * 1e3:.2f} ms, sampling "
          f"{t50['sampling_mean_s']:.3f} s, decode {t50['decode_mean_s']:.3f} s)")
    print(f"student-5 : {s5['total_mean_s']:.3f} s/video (text {s5['text_mean_s'] * 1e3:.2f} ms, sampling "
          f"{s5['sampling_mean_s']:.3f} s, decode {s5['decode_mean_s']:.3f} s)")
    print(f"end-to-end speedup {e2e['speedup_end_to_end']:.2f}x (goal >= 9.5x: {e2e['status']}), sampling "
          f"{e2e['speedup_sampling']:.2f}x; text + decode = {e2e['fixed_cost_in_dit_calls']:.1f} DiT calls")
    print(f"dump overhead {overhead['overhead']:+.1%} (goal <= 3%: {overhead['status']}; median of rounds "
          f"{overhead['overhead_median_of_rounds']:+.1%}): "
          f"plain {overhead['plain_s_per_sample']:.3f} s, "
          f"dump {overhead['dump_s_per_sample']:.3f} s per sample")
    for name, d in floor["decoders"].items():
        print(f"decoder {name}: {d['decode_s'] * 1e3:.1f} ms = {d['fixed_cost_in_dit_calls']:.2f} DiT calls with "
              f"text -> end-to-end at most {d['speedup_bound']:.2f}x")
    for name, d in ceiling["transformers"].items():
        print(f"transformer {name}: {d['parameters'] / 1e6:.1f} M params ({d['bf16_megabytes']:.1f} MB bf16), call "
              f"{d['call_s'] * 1e3:.1f} ms, text + decode = {d['fixed_cost_in_dit_calls']:.2f} calls -> end-to-end at "
              f"most {d['speedup_bound']:.2f}x; training step x{d['train_step_vs_shipped']:.1f}")
    for failed in validity["failed"]:
        print(f"INVALID RUN: {failed}")
    print(f"wrote {path}")
    print(json.dumps({"speedup_end_to_end": e2e["speedup_end_to_end"], "dump_overhead": overhead["overhead"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
