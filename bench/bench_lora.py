"""Benchmark LoRA extraction: reconstruction and forward-output error against rank, SVD methods, storage dtype,
and the peak memory of streaming extraction against the size of the two checkpoints.

Test pair: a random HunyuanVideo transformer (hidden 256 = 2 heads of 128, 2 double + 2 single blocks by default)
and a "tuned" copy whose every matrix W changed by a known rank-``--change-rank`` term with decaying singular
values plus i.i.d. noise holding ``--noise`` of the change's energy; biases and norm weights change too.

Reported per rank:
- weight error: ``||D - up @ down||_F / ||D||_F`` over all low-rank layers (energy-weighted and worst layer),
  measured from the written file (fp16 unless --dtype), and the theoretical optimum (discarded singular values);
- forward error: ``||f_lora(x) - f_tuned(x)|| / ||f_tuned(x) - f_base(x)||`` - the share of the fine-tune's effect
  on the velocity output that the LoRA misses (0 = perfect, 1 = as if no LoRA).
Also: exact vs randomized SVD time and error side by side, and (``--memory``) the peak RSS of the CLI extracting
from two safetensors files of a larger model, against the two files' sizes.

    python bench/bench_lora.py [--ranks 1,2,4,...] [--change-rank 16] [--noise 0.1] [--dtype fp16] [--memory]
Writes ``bench/out/lora.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from accvideo_core.lora import extract, merge_into_state_dict  # noqa: E402
from accvideo_core.testing import tiny_inputs, tiny_transformer  # noqa: E402
from accvideo_core.utils.dtypes import dtype_name, names_for, parse_dtype  # noqa: E402
from accvideo_core.utils.io import save_safetensors, write_json  # noqa: E402
from bench.validity import check_at_least, check_at_most, check_noise, ratio_noise, spread, verdict  # noqa: E402



def make_pair(config: dict, change_rank: int, noise: float, seed: int = 0):
    """(base model, tuned state dict): per matrix a rank-k change with singular values 1, 1/2, ... 1/k (scaled to
    5% of the weight's norm) plus noise with ``noise`` of the change's energy."""
    model = tiny_transformer(seed=seed, **config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    tuned = {}
    for key, w in base.items():
        if w.ndim < 2:
            tuned[key] = w + 0.02 * torch.randn(w.shape, generator=gen)
            continue
        m = w.flatten(1)
        k = min(change_rank, *m.shape)
        u, _ = torch.linalg.qr(torch.randn(m.shape[0], k, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(m.shape[1], k, generator=gen))
        low = (u * (1.0 / torch.arange(1, k + 1))) @ v.T
        rand = torch.randn(m.shape, generator=gen)
        low = low / low.norm()
        change = (1 - noise) ** 0.5 * low + noise ** 0.5 * rand / rand.norm()
        tuned[key] = w + (0.05 * m.norm() * change).reshape(w.shape)
    return model, base, tuned


def weight_errors(base: dict, tuned: dict, lora_path: Path) -> tuple[float, float]:
    """(energy-weighted, worst) relative error of the matrices after applying the file to base."""
    got = merge_into_state_dict(base, [(lora_path, 1.0)])
    num = den = 0.0
    worst = 0.0
    for key, w in base.items():
        if w.ndim < 2:
            continue
        d = (tuned[key] - w).double()
        e = (got[key].double() - tuned[key].double()).norm() ** 2
        num, den = num + float(e), den + float(d.norm() ** 2)
        worst = max(worst, float(e ** 0.5 / d.norm()))
    return (num / den) ** 0.5, worst


def spectra(base: dict, tuned: dict) -> list[tuple[torch.Size, torch.Tensor]]:
    """(matrix shape, singular values) of every matrix change (for the optimum at each rank)."""
    out = []
    for k, w in base.items():
        if w.ndim >= 2:
            d = (tuned[k] - w).flatten(1).double()
            out.append((d.shape, torch.linalg.svdvals(d)))
    return out


def optimum(spectra_list: list[tuple[torch.Size, torch.Tensor]], rank: int) -> float:
    """Best possible energy-weighted error at ``rank`` (Eckart-Young: the discarded singular values; 0 for the
    matrices the extractor stores exactly because rank x (rows + cols) >= rows x cols)."""
    num = sum(float((s[rank:] ** 2).sum()) for (r, c), s in spectra_list if rank * (r + c) < r * c)
    den = sum(float((s ** 2).sum()) for _, s in spectra_list)
    return (num / den) ** 0.5


def forward_error(model, base: dict, tuned: dict, lora_path: Path, inputs: dict, ref: tuple) -> float:
    out_base, out_tuned = ref
    model.load_state_dict(merge_into_state_dict(base, [(lora_path, 1.0)]))
    with torch.no_grad():
        out = model(**inputs, guidance=6.0)
    model.load_state_dict(base)
    return float((out - out_tuned).norm() / (out_tuned - out_base).norm())


def peak_rss_of_cli(config: dict, workdir: Path) -> dict:
    """Peak RSS of ``python -m accvideo_core.lora extract`` on two files of a larger model vs their sizes."""
    model = tiny_transformer(seed=0, **config)
    base_path, tuned_path = workdir / "big_base.safetensors", workdir / "big_tuned.safetensors"
    sd = model.state_dict()
    save_safetensors({k: v.bfloat16() for k, v in sd.items()}, base_path)
    gen = torch.Generator().manual_seed(3)
    save_safetensors({k: (v + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16() for k, v in sd.items()},
                     tuned_path)
    del model, sd
    # VmHWM: peak RSS of this process image (unlike ru_maxrss it does not inherit the parent's peak across exec);
    # it counts the mmapped file pages safetensors reads through. RssAnon (sampled every 10 ms) is the memory
    # the process itself holds: the figure that must stay far below the two files' size.
    probe = (
        "import re, runpy, sys, threading, time, torch\n"
        "def status(field):\n"
        " return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "peak = [status('RssAnon')]\n"
        "def sample():\n"
        " while True:\n  peak[0] = max(peak[0], status('RssAnon')); time.sleep(0.01)\n"
        "before = (status('VmHWM'), status('RssAnon'))\n"
        "threading.Thread(target=sample, daemon=True).start()\n"
        "sys.argv = ['x', 'extract', '--base', sys.argv[1], '--tuned', sys.argv[2], '--rank', '32', '--svd', "
        "'randomized', '--out', sys.argv[3]]\n"
        "code = 0\n"
        "try:\n runpy.run_module('accvideo_core.lora', run_name='__main__')\n"
        "except SystemExit as e:\n code = e.code\n"
        "print('RSS', before[0], status('VmHWM'), before[1], peak[0], code)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", probe, str(base_path), str(tuned_path), str(workdir / "big_lora.safetensors")],
                         capture_output=True, text=True, env=env, check=True)
    seconds = time.perf_counter() - start
    hwm0, hwm1, anon0, anon1, code = (int(v) for v in run.stdout.rsplit("RSS", 1)[1].split())
    return {"file_mb_each": base_path.stat().st_size / 2 ** 20, "vmhwm_mb_after_imports": hwm0 / 1024,
            "vmhwm_mb": hwm1 / 1024, "rss_anon_mb_after_imports": anon0 / 1024, "rss_anon_peak_mb": anon1 / 1024,
            "extra_anon_peak_mb": (anon1 - anon0) / 1024, "seconds": seconds, "exit_code": code}


def big_matrix_svd(rank: int, size: tuple[int, int]) -> dict:
    """Exact vs randomized SVD on one HunyuanVideo-sized matrix change (rank-64 change + 10% noise energy)."""
    gen = torch.Generator().manual_seed(9)
    rows, cols = size
    u, _ = torch.linalg.qr(torch.randn(rows, 64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, 64, generator=gen))
    low = (u / torch.arange(1, 65)) @ v.T
    noise = torch.randn(rows, cols, generator=gen)
    d = 0.9 ** 0.5 * low / low.norm() + 0.1 ** 0.5 * noise / noise.norm()
    from accvideo_core.lora.extract import _low_rank

    out = {"size": list(size), "rank": rank}
    for method in ("exact", "randomized"):
        start = time.perf_counter()
        up, down = _low_rank(d, rank, method)
        out[method] = {"seconds": time.perf_counter() - start, "rel_error": float((d - up @ down).norm() / d.norm())}
    out["randomized_speedup"] = out["exact"]["seconds"] / out["randomized"]["seconds"]
    return out


def lora_checks(results: dict, spectra_list) -> list[dict]:
    """What must hold whatever the machine: no rank-r factorisation beats the truncated SVD (Eckart-Young), the
    error does not grow with the rank, randomized SVD is not more accurate than exact, and the timings are not
    noise."""
    ranks = results["ranks"]
    checks = [check_at_least(f"rank {r['rank']}: weight error >= Eckart-Young optimum", r["weight_rel_error"],
                             r["optimum"], 1e-6) for r in ranks]
    checks += [check_at_most(f"rank {b['rank']}: weight error <= that of rank {a['rank']}", b["weight_rel_error"],
                             a["weight_rel_error"], 1e-3) for a, b in zip(ranks, ranks[1:]) if b["rank"] > a["rank"]]
    svd = results["svd_rank32_fp32"]
    checks.append(check_at_least("randomized SVD error >= exact SVD error", svd["randomized"]["weight_rel_error"],
                                 svd["exact"]["weight_rel_error"], 1e-6))
    checks += [check_noise(f"{m} SVD extraction seconds", svd[m]["spread"]) for m in ("exact", "randomized")]
    svd["speedup_noise"] = ratio_noise(svd["exact"]["spread"], svd["randomized"]["spread"])
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--change-rank", type=int, default=16)
    parser.add_argument("--noise", type=float, default=0.1, help="share of the change's energy that is noise")
    parser.add_argument("--dtype", choices=names_for("float16", "bfloat16", "float32"), default="fp16")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS of the CLI on a larger pair")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "lora.json"), help="JSON output path")
    parser.add_argument("--big-svd", action="store_true", help="also time exact vs randomized SVD at 3072x3072")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 default: small SVDs are fastest single-threaded)")
    args = parser.parse_args()
    args.dtype = dtype_name(parse_dtype(args.dtype))  # canonical in the output
    torch.set_num_threads(args.threads)

    config = dict(comfy_compatible=True, hidden_size=args.hidden, num_heads=args.hidden // 128, num_double_blocks=2,
                  num_single_blocks=2, text_dim=64)
    model, base, tuned = make_pair(config, args.change_rank, args.noise)
    inputs = tiny_inputs(model.config, frames=2, height=8, width=8, text_len=12)
    with torch.no_grad():
        model.load_state_dict(tuned)
        out_tuned = model(**inputs, guidance=6.0)
        model.load_state_dict(base)
        out_base = model(**inputs, guidance=6.0)
    spectra_list = spectra(base, tuned)
    results = {"config": {"hidden": args.hidden, "double": 2, "single": 2, "change_rank": args.change_rank,
                          "noise": args.noise, "dtype": args.dtype, "torch_threads": torch.get_num_threads()},
               "ranks": []}
    print(f"test pair: hidden {args.hidden}, change rank {args.change_rank}, noise {args.noise:.0%} of the change "
          f"energy, stored {args.dtype}")
    print(f"{'rank':>5} {'weight err':>11} {'optimum':>9} {'worst layer':>12} {'forward err':>12} {'MB':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rank in [int(r) for r in args.ranks.split(",")]:
            path = tmp / f"r{rank}.safetensors"
            extract(base, tuned, rank, out=path, dtype=parse_dtype(args.dtype), svd="exact")
            werr, worst = weight_errors(base, tuned, path)
            ferr = forward_error(model, base, tuned, path, inputs, (out_base, out_tuned))
            row = {"rank": rank, "weight_rel_error": werr, "optimum": optimum(spectra_list, rank),
                   "worst_layer_rel_error": worst, "forward_rel_error": ferr, "file_mb": path.stat().st_size / 2 ** 20}
            results["ranks"].append(row)
            print(f"{rank:>5} {werr:>11.4f} {row['optimum']:>9.4f} {worst:>12.4f} {ferr:>12.4f} {row['file_mb']:>7.2f}")

        # exact vs randomized SVD, side by side at the default-style rank 32: 3 rounds, order alternating
        times: dict[str, list[float]] = {"exact": [], "randomized": []}
        for r in range(3):
            for method in (("exact", "randomized") if r % 2 == 0 else ("randomized", "exact")):
                start = time.perf_counter()
                extract(base, tuned, 32, out=tmp / f"{method}.safetensors", dtype=torch.float32, svd=method)
                times[method].append(time.perf_counter() - start)
        svd_rows = {m: {"seconds": spread(t)["median"], "spread": spread(t),
                        "weight_rel_error": weight_errors(base, tuned, tmp / f"{m}.safetensors")[0]}
                    for m, t in times.items()}
        svd_rows["randomized_speedup"] = svd_rows["exact"]["seconds"] / svd_rows["randomized"]["seconds"]
        results["svd_rank32_fp32"] = svd_rows
        print(f"rank 32, fp32: exact SVD {svd_rows['exact']['seconds']:.2f} s err {svd_rows['exact']['weight_rel_error']:.5f}"
              f" | randomized {svd_rows['randomized']['seconds']:.2f} s err {svd_rows['randomized']['weight_rel_error']:.5f}"
              f" | speedup x{svd_rows['randomized_speedup']:.2f}")
        if args.big_svd:
            big_svd = big_matrix_svd(64, (3072, 3072))
            results["svd_3072x3072_rank64"] = big_svd
            print(f"3072x3072, rank 64: exact {big_svd['exact']['seconds']:.2f} s err {big_svd['exact']['rel_error']:.5f}"
                  f" | randomized {big_svd['randomized']['seconds']:.2f} s err {big_svd['randomized']['rel_error']:.5f}"
                  f" | speedup x{big_svd['randomized_speedup']:.1f}")
        if args.memory:
            big = dict(comfy_compatible=True, hidden_size=1024, num_heads=8, num_double_blocks=2, num_single_blocks=6,
                       text_dim=256)
            mem = peak_rss_of_cli(big, tmp)
            results["memory"] = mem
            print(f"CLI on two {mem['file_mb_each']:.0f} MB bf16 files: anonymous memory peak "
                  f"{mem['extra_anon_peak_mb']:.0f} MB above the imports (VmHWM incl. mmapped file pages "
                  f"{mem['vmhwm_mb']:.0f} MB), {mem['seconds']:.1f} s")
    results["validity"] = verdict(lora_checks(results, spectra_list))
    for failed in results["validity"]["failed"]:
        print(f"INVALID RUN: {failed}")
    out = write_json(results, args.out)
    print(f"wrote {out}")
    print(json.dumps(results["ranks"][-1]))


if __name__ == "__main__":
    main()
