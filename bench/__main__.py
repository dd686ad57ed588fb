"""Run every benchmark in ``bench/`` and collect the results: ``python -m bench [--only NAME ...] [--skip NAME ...]``.

Each ``bench/bench_*.py`` runs as its own subprocess (fresh memory accounting, one crash does not stop the rest)
with the short settings below, and writes its JSON under ``bench/out/``. This command gathers them into
``bench/results.json`` and writes the markdown table ``docs/benchmarks.md`` (headline figures per benchmark:
ratios, speedups, overheads, errors, goals). A benchmark that fails or times out is recorded as such, never
dropped. Progress goes to stderr; Ctrl-C stops the running benchmark and writes what finished. With ``--only``, the
other benchmarks' last results in ``bench/results.json`` are kept.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))

from accvideo_core.utils.io import write_bytes, write_json  # noqa: E402

# name -> (script args for a short run, JSON file it writes, what it measures)
BENCHMARKS: dict[str, tuple[list[str], str, str]] = {
    "e2e": ([], "bench_e2e.json",
            "miniature pipeline: AccVideo-5 vs teacher-50 end to end; trajectory-dump overhead"),
    "transformer": (["--repeats", "3"], "bench_transformer.json", "our transformer vs diffusers, same weights"),
    "vae": (["--sizes", "3x8x8"], "bench_vae.json", "VAE decoding: untiled vs exact (chunked) vs fast (tiled)"),
    "kernels": (["--reps", "5"], "kernels_cuda.json|kernels_cpu.json", "fused kernels vs torch reference"),
    "train": (["--iters", "2"], "bench_train.json",
              "one training iteration: checkpointing on/off, LoRA vs full, sp 1 vs 2; export memory"),
    "lora": (["--ranks", "4,16,64"], "lora.json", "LoRA extraction error vs rank, SVD methods"),
}
HEADLINE = re.compile(r"(ratio|speedup|overhead|goal|psnr|max_abs|error|vs_untiled|seconds_per|_s_per_)", re.I)


def headline(data, prefix: str = "", limit: int = 14) -> list[tuple[str, object]]:
    """Scalar leaves of a benchmark's JSON whose key names a comparison (ratio, speedup, overhead, ...)."""
    found: list[tuple[str, object]] = []

    def walk(obj, path: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(obj, dict):
            label = next((str(obj[k]) for k in ("case", "kernel", "mode", "latent", "rank", "name") if k in obj
                          and isinstance(obj[k], (str, int))), None)
            for key, value in obj.items():
                sub = f"{path}.{key}" if path else key
                if isinstance(value, (dict, list)):
                    walk(value, sub)
                elif (HEADLINE.search(sub) and isinstance(value, (int, float, bool)) and not key.endswith("_times_s")
                      and not sub.startswith(("config", "meta"))):
                    found.append((f"{path}[{label}].{key}" if label and path else sub, value))
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, f"{path}[{i}]")

    walk(data, prefix)
    return found[:limit]


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def run_one(name: str, timeout: float) -> dict:
    args, outputs, what = BENCHMARKS[name]
    script = ROOT / "bench" / f"bench_{name}.py"
    cmd = [sys.executable, str(script), *args]
    started = time.time()
    record: dict = {"command": " ".join(["python", f"bench/bench_{name}.py", *args]), "what": what}
    candidates = [OUT / f for f in outputs.split("|")]
    before = {p: p.stat().st_mtime if p.is_file() else None for p in candidates}
    print(f"[bench] {name}: {record['command']}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        record["returncode"] = proc.returncode
        record["stdout_tail"] = proc.stdout.strip().splitlines()[-12:]
        if proc.returncode != 0:
            record["stderr_tail"] = proc.stderr.strip().splitlines()[-12:]
    except subprocess.TimeoutExpired:
        record["returncode"] = None
        record["error"] = f"timed out after {timeout:.0f} s"
    record["seconds"] = round(time.time() - started, 1)
    fresh = [p for p in candidates if p.is_file() and p.stat().st_mtime != before[p]]
    if fresh and record.get("returncode") == 0:  # never take a file a failed or killed run may have left
        record["json"] = str(fresh[0].relative_to(ROOT))
        record["result"] = json.loads(fresh[0].read_text())
    elif "error" not in record:
        record["error"] = f"no fresh output in {outputs} (exit code {record['returncode']})"
    status = "ok" if record.get("returncode") == 0 and "result" in record else "FAILED"
    validity = record.get("result", {}).get("validity") if status == "ok" else None
    if validity and not validity["valid"]:  # figures outside what is physically possible: not a result
        status = "INVALID: " + "; ".join(validity["failed"])
    record["status"] = status
    print(f"[bench] {name}: {status} in {record['seconds']} s", file=sys.stderr, flush=True)
    return record


def validity_line(validity: dict) -> str:
    """One markdown line: the physical-possibility checks of a run and whether it is valid."""
    if validity["valid"]:
        return "Checks (all passed): " + "; ".join(f"{c['name']}: {c['detail']}" for c in validity["checks"]) + "."
    return "**INVALID RUN, goals not judged**: " + "; ".join(validity["failed"]) + "."


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Benchmarks", "",
             f"Generated by `python -m bench` on {meta['platform']} (torch {meta['torch']}, {meta['cpus']} CPUs, "
             f"load average {meta['load_average']:.1f} at start). Each figure is a ratio or error measured side by "
             "side in one run; absolute times on a shared CPU are noisy. Compared variants run interleaved; every "
             "benchmark reports the spread of its timings and checks its figures against what is physically possible "
             "(`bench/validity.py`: e.g. a 5-step sampler at most 50/5 = 10x faster than the 50-step one, a dump not "
             "faster than plain sampling beyond the noise, GB/s and TFLOP/s at most the device's peak, exact decodes "
             "equal to untiled); a run failing a check is marked INVALID and its goals are not judged. Full data: "
             "`bench/results.json`; per-benchmark JSON: `bench/out/`.", ""]
    e2e = results.get("e2e", {}).get("result")
    if e2e:
        e, d = e2e["end_to_end"], e2e["dump_overhead"]
        lines += ["## Miniature end to end (AccVideo-5 vs teacher-50) and dump overhead", "",
                  f"{e2e['threads']} CPU thread(s) (chosen automatically unless `--threads` is given).", "",
                  "| measure | teacher-50 | AccVideo-5 | ratio | goal | met |", "|---|---|---|---|---|---|",
                  f"| seconds per video, text + sampling + VAE decode | {e['teacher50']['total_mean_s']:.3f} | "
                  f"{e['student5']['total_mean_s']:.3f} | {e['speedup_end_to_end']:.2f}x | >= 9.5x | "
                  f"{e.get('status', _fmt(e['goal_met']))} |",
                  f"| seconds per video, sampling only | {e['teacher50']['sampling_mean_s']:.3f} | "
                  f"{e['student5']['sampling_mean_s']:.3f} | {e['speedup_sampling']:.2f}x | (10x limit) | - |",
                  f"| text encoding + VAE decoding, in DiT calls | - | {e['fixed_cost_in_dit_calls']:.1f} | - | "
                  "<= 0.29 for 9.5x | - |",
                  f"| trajectory dump vs plain 50-step sampling, s/sample | {d['plain_s_per_sample']:.3f} (plain) | "
                  f"{d['dump_s_per_sample']:.3f} (dump) | {d['overhead']:+.1%} | <= 3% | "
                  f"{d.get('status', _fmt(d['goal_met']))} |", ""]
        if e2e.get("validity"):
            lines += [validity_line(e2e["validity"]), ""]
        floor = e2e.get("decoder_floor")
        if floor:
            lines += ["Decoder floor: one decode by the shipped decoder and by narrower decoders of the same "
                      "architecture, in DiT calls (with text), and the end-to-end speedup each would allow at this "
                      "transformer:", "", "| decoder widths | decode (ms) | text + decode, DiT calls | "
                      "end-to-end bound |", "|---|---|---|---|"]
            lines += [f"| {name} | {f['decode_s'] * 1e3:.1f} | {f['fixed_cost_in_dit_calls']:.2f} | "
                      f"{f['speedup_bound']:.2f}x |" for name, f in floor["decoders"].items()]
            lines += [""]
        ceiling = e2e.get("transformer_ceiling")
        if ceiling:
            lines += ["Transformer ceiling: the shipped transformer and wider ones of the same depth (random weights), "
                      "one call each against the shipped decoder, the end-to-end speedup each would allow, and the "
                      "cost of one training step (the demo's dump and distillation scale with it). The whole family "
                      "must fit in 25 MB (VAE 3.0 MB + text encoder 0.2 MB):", "",
                      "| transformer width | parameters | bf16 file (MB) | call (ms) | text + decode, calls | "
                      "end-to-end bound | training step vs shipped |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {name} | {t['parameters'] / 1e6:.1f} M | {t['bf16_megabytes']:.1f} | {t['call_s'] * 1e3:.1f} | "
                      f"{t['fixed_cost_in_dit_calls']:.2f} | {t['speedup_bound']:.2f}x | "
                      f"{t['train_step_vs_shipped']:.1f}x |" for name, t in ceiling["transformers"].items()]
            lines += [""]
    lines += ["## All benchmarks", "", "| benchmark | what | status | time (s) | headline figures |",
              "|---|---|---|---|---|"]
    for name, rec in results.items():
        figures = "; ".join(f"`{k}` {_fmt(v)}" for k, v in headline(rec.get("result", {}))) or \
            rec.get("error", "-")
        lines.append(f"| [{name}](../bench/bench_{name}.py) | {rec['what']} | {rec['status']} | {rec['seconds']} | "
                     f"{figures} |")
    lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in results.values()), ""]
    return "\n".join(lines + gpu_section())


def gpu_section() -> list[str]:
    """The GPU check's section: how to run it, and its table (filled from ``bench/out/gpu.json`` of a CUDA run)."""
    from bench.gpu import FIRST_RUN_WATCH, PARTS, table

    path = OUT / "gpu.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    if report and (report["meta"].get("smoke") or report["meta"]["device"] != "cuda"):
        report = None  # a --smoke run on the CPU is a harness check, not GPU figures
    budgets = ", ".join(f"({k}) {what} {budget:.0f} s" for k, (what, budget) in PARTS.items())
    lines = ["## One CUDA GPU: `python -m bench.gpu`", "",
             "Everything only a GPU can show, in one command: `python -m bench.gpu` on one CUDA GPU with only torch "
             "(>= 2.11), Triton (>= 3.6), safetensors and numpy installed (no diffusers, video or image packages, no "
             "downloads; random weights). It takes at most about 8 minutes on an H100/H200-class card: each part runs "
             f"in its own subprocess with a time budget ({budgets}; 460 s in all, `--total`), every sub-step first "
             "checks that its estimated time still fits, and a part that fails or overruns is killed and recorded "
             "with what it finished while the next part runs; the exit code is 0 whenever results were written. "
             "Output: a markdown table on stdout, all figures in `bench/out/gpu.json` (written after every sub-step), "
             "with the spread of every timing and the checks against what is physically possible (bandwidth and "
             "TFLOP/s at most the device's peak from `bench/devices.py`, else 'unknown'; exact VAE decodes equal to "
             "the untiled one and within their budgets; ...). `--parts cd` runs some parts only; `--smoke` runs the "
             "same script on the CPU with tiny sizes in under a minute (a test in the suite, so it cannot rot). "
             "After a GPU run, `python -m bench --markdown-only` rewrites this page with its figures.", ""]
    if report:
        meta = report["meta"]
        lines += [f"Measured on {meta['name']} ({meta.get('memory_gb')} GB), torch {meta['torch']}, Triton "
                  f"{meta['triton']}, {meta['started']}; "
                  + ("all checks passed." if report["validity"]["valid"] else
                     "**INVALID RUN**: " + "; ".join(report["validity"]["failed"])), ""]
    else:
        lines += ["No GPU run yet: the table below is empty until one is made.", ""]
    return lines + [table(report), "", "First GPU run, what to look at (what review without a GPU could not settle):",
                    ""] + [f"- {item}" for item in FIRST_RUN_WATCH] + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    p.add_argument("--skip", nargs="*", choices=sorted(BENCHMARKS), default=[], help="leave these out")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    p.add_argument("--results", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--markdown", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--markdown-only", action="store_true",
                   help="run nothing: rewrite the markdown from --results and bench/out/gpu.json")
    args = p.parse_args(argv)
    if args.markdown_only:
        saved = json.loads(Path(args.results).read_text())
        write_bytes(markdown(saved["benchmarks"], saved["meta"]).encode(), args.markdown)
        print(f"wrote {args.markdown}")
        return 0
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    meta = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    import torch

    meta["torch"] = torch.__version__
    results: dict = {}
    try:
        for name in names:
            results[name] = run_one(name, args.timeout)
    except KeyboardInterrupt:
        print("[bench] interrupted: writing the finished benchmarks", file=sys.stderr)
    previous = Path(args.results)
    if args.only and previous.is_file():  # a partial run updates its benchmarks and keeps the others' last results
        kept = json.loads(previous.read_text()).get("benchmarks", {})
        results = {**{k: v for k, v in kept.items() if k not in results}, **results}
    write_json({"meta": meta, "benchmarks": results}, args.results)
    write_bytes(markdown(results, meta).encode(), args.markdown)
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    print(f"wrote {args.results} and {args.markdown}; {len(results) - len(failed)} ok, failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
