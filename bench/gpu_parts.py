"""The five parts of ``python -m bench.gpu`` (see ``bench/gpu.py`` for the harness, budgets and the table).

Each ``part_X(run)`` measures through ``run.step(name, fn, need=seconds)``: a sub-step runs only when its time
estimate fits the part's remaining budget, and a failing sub-step records its error and the next one runs. Figures
for the summary table go through ``run.figure``; physical-possibility and correctness checks through
``run.check``. Only torch, Triton (through ``accvideo_core.kernels``), safetensors and the core library are used.
"""
from __future__ import annotations

import contextlib
import copy
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from accvideo_core.utils.dtypes import dtype_name
from bench.validity import check_at_least, check_at_most, check_noise, spread

# HunyuanVideo token grids (T', H', W' after the 1x2x2 patch) and the paper's Table 1 (one A100, end to end:
# text encoding + 50 or 5 diffusion steps + VAE decoding).
SIZES = {"544x960x93": ((24, 34, 60), (93, 544, 960), {"teacher50_s": 704, "accvideo5_s": 91}),
         "720x1280x129": ((33, 45, 80), (129, 720, 1280), {"teacher50_s": 3234, "accvideo5_s": 380})}
TEXT_TOKENS = 256
DOUBLE, SINGLE = 20, 40  # blocks of the released model
EXACT_BF16_ULPS = 8  # part d: exact decodes agree within this many bf16 ulps at the output's largest magnitude


def _gb(n_bytes: float) -> float:
    return round(n_bytes / 1e9, 3)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().to(b.device) - b.float()).abs().max())


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 inside the block (restored after). cuDNN convolutions default
    to TF32 on Ampere and newer: a 1e-7 difference of a conv's input (Triton path vs reference) can flip a TF32
    rounding (2**-11 relative) and fail an fp32 comparison at 1e-5 for reasons that have nothing to do with the
    kernels compared."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def bf16_ulp(value: float) -> float:
    """The spacing of bf16 numbers at ``|value|`` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(value), 2.0 ** -126))) - 7)


def _triton_module(run):
    """The Triton kernels module when they can run here (CUDA, or the interpreter on CPU), else None."""
    from accvideo_core import kernels

    if run.device == "cpu" and not kernels._interpret_requested():
        return None
    return kernels._load_triton()


# ------------------------------------------------------------------------------------------- a: correctness

def _kernel_checks(run, tk) -> dict:
    """Part a: every Triton kernel against the torch reference per dtype, forward and backward."""
    from accvideo_core.kernels import selfcheck

    names = ("rms_norm_rope", "layer_norm_modulate", "gated_residual", "group_norm_silu", "group_norm_stats")
    if tk is None:
        return {"skipped": "no Triton path here (needs CUDA, or TRITON_INTERPRET=1 on CPU)"}
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name in names:
            v = selfcheck.compare(name, tk, run.device, dtype, tokens=5 if run.smoke else 256)
            out[f"{name} {v.dtype}"] = {"ok": v.ok, "excess_error": v.excess_error, "tolerance": v.tolerance,
                                        "detail": v.detail}
            run.check({"name": f"Triton {name} {v.dtype} fwd/bwd matches the reference", "ok": v.ok,
                       "value": v.excess_error, "bound": v.tolerance, "detail": v.detail})
        run.record("triton_kernels", {**out, "partial": True})  # kept if the part is killed while compiling
    run.figure("a_kernels", f"{sum(r['ok'] for r in out.values())} of {len(out)} match")
    return out


def _tiny_models(run, tk) -> dict:
    """Part a: the tiny transformer (output + gradients) and VAE on the Triton path against the reference path."""
    from accvideo_core import kernels

    if tk is None:
        return {"skipped": "no Triton path here: both paths would be the reference"}
    from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig
    from accvideo_core.testing import randomize_, tiny_inputs, tiny_transformer

    model = tiny_transformer(seed=3).to(run.device)
    inputs = {k: v.to(run.device) for k, v in tiny_inputs(model.config, frames=2, height=4, width=6, text_len=5,
                                                           valid=[3], seed=4).items()}
    vae = randomize_(HunyuanVideoVAE(VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                                               norm_num_groups=4, has_encoder=False)), seed=6).eval()
    vae = vae.to(run.device)
    z = torch.randn(1, 16, 2, 2, 4, generator=torch.Generator().manual_seed(7)).to(run.device)
    runs, previous = {}, kernels.get_backend()
    # "triton", not "auto": a kernel failing its first-use self-check raises instead of silently becoming the
    # reference (which would compare the reference with itself here)
    with ieee_fp32():
        try:
            for backend in ("torch", "triton"):
                kernels.set_backend(backend)
                model.zero_grad(set_to_none=True)
                velocity = model(**inputs, guidance=6.0)
                weights = torch.linspace(-1, 1, velocity.numel(), device=run.device).view_as(velocity)
                (velocity * weights).sum().backward()
                with torch.no_grad():
                    video = vae.decode(z, mode="untiled")
                grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                runs[backend] = (velocity.detach(), grads, video)
        finally:
            kernels.set_backend(previous)
    (v_ref, g_ref, vid_ref), (v_tri, g_tri, vid_tri) = runs["torch"], runs["triton"]
    out = {"transformer_out": _max_abs(v_tri, v_ref) / max(1.0, float(v_ref.abs().max())),
           "transformer_grads": max(_max_abs(g_tri[n], g_ref[n]) / max(1.0, float(g_ref[n].abs().max()))
                                    for n in g_ref),
           "vae_decode": _max_abs(vid_tri, vid_ref) / max(1.0, float(vid_ref.abs().max())),
           "first_use_checks": kernels.selfcheck_results()}
    for key in ("transformer_out", "transformer_grads", "vae_decode"):
        run.check(check_at_most(f"tiny {key}, Triton path vs reference path (fp32, relative to max(1, scale))",
                                out[key], 1e-5, 0.0))
    run.figure("a_models", f"{max(out[k] for k in ('transformer_out', 'transformer_grads', 'vae_decode')):.1e}")
    return out


def _bf16_vs_fp32(run) -> dict:
    """Part a: our transformer in bf16 against fp32."""
    from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D
    from accvideo_core.testing import randomize_, tiny_inputs, tiny_transformer_config

    config = tiny_transformer_config() if run.smoke else tiny_transformer_config(
        hidden_size=1024, num_heads=8, text_dim=4096, pooled_dim=768)
    fp32 = randomize_(HunyuanVideoTransformer3D(config), seed=0).eval().to(run.device)
    low = copy.deepcopy(fp32).to(torch.bfloat16)
    size = (2, 4, 6) if run.smoke else (8, 32, 32)
    inputs = {k: v.to(run.device) for k, v in tiny_inputs(config, frames=size[0], height=size[1], width=size[2],
                                                           text_len=16, seed=1).items()}
    with torch.no_grad(), ieee_fp32():  # the fp32 reference without TF32 convolutions
        ref, got = fp32(**inputs), low(**inputs)
    rel = _rel_diff(got, ref)
    run.check(check_at_most("our transformer bf16 vs fp32, relative error", rel, 0.05, 0.0))
    run.figure("a_bf16", f"{rel:.2e}")
    return {"config": config.to_dict(), "latent": list(inputs["latents"].shape), "rel_error": rel}


def part_a(run) -> None:
    tk = _triton_module(run)
    run.step("triton_kernels", lambda: _kernel_checks(run, tk), need=5)
    run.step("tiny_models_triton_vs_reference", lambda: _tiny_models(run, tk), need=5)
    run.step("transformer_bf16_vs_fp32", lambda: _bf16_vs_fp32(run), need=5)


# ------------------------------------------------------------------------------------------------ b: kernels

def part_b(run) -> None:
    from accvideo_core.kernels import reference
    from bench.bench_kernels import forward_backward, make_cases

    tk = _triton_module(run)
    smoke = run.smoke
    dtype = torch.float32 if smoke else torch.bfloat16
    tokens, hidden, head_dim = (96, 64, 16) if smoke else (48960, 3072, 128)
    vae_shape = (1, 32, 3, 8, 8) if smoke else (1, 128, 25, 272, 480)
    peak = run.peaks["bandwidth_gbs"]
    out: dict = {"dtype": dtype_name(dtype), "tokens": tokens, "hidden": hidden, "vae_shape": list(vae_shape),
                 "peak_gbs": peak}
    run.record("config", out)
    for case in make_cases(tokens, TEXT_TOKENS, hidden, head_dim, vae_shape, dtype, run.device):
        def one(case=case) -> dict:
            args, _ = case.make()
            impls = {"torch": getattr(reference, case.name)}
            if tk is not None:
                impls["triton"] = getattr(tk, case.name)
            if not smoke and run.left() > 60:  # compilation takes seconds to tens of seconds per graph
                impls["compile"] = torch.compile(getattr(reference, case.name), dynamic=False)
            row: dict = {"bytes_fwd": case.bytes_fwd, "bytes_bwd": case.bytes_bwd}
            passes = {"fwd": {k: (lambda fn=fn: fn(*args)) for k, fn in impls.items()}}
            if case.grad:  # building a fwd+bwd runner calls the function once (compiles): errors are recorded
                passes["fwd+bwd"] = {}
                for k, fn in impls.items():
                    try:
                        passes["fwd+bwd"][k] = forward_backward(fn, args, case.grad)
                    except Exception as exc:
                        row[f"errors fwd+bwd {k}"] = f"{type(exc).__name__}: {exc}"[:300]
            for pass_name, fns in passes.items():
                moved = case.bytes_fwd + (case.bytes_bwd if pass_name == "fwd+bwd" else 0)
                samples, errors = run.interleaved(fns, rounds=3 if smoke else 10)
                for impl, times in samples.items():
                    s = spread(times)
                    gbs = moved / s["median"] / 1e9
                    row[f"{impl} {pass_name}"] = {"ms": s["median"] * 1e3, "spread": s, "gbs": gbs,
                                                  "pct_of_peak": 100 * gbs / peak if peak else None}
                    run.check(check_noise(f"{case.name} {impl} {pass_name} times", s))
                    if peak and impl in ("triton", "compile"):  # fused kernels: their bytes are a lower bound
                        run.check(check_at_most(f"{case.name} {impl} {pass_name} GB/s <= device peak", gbs, peak,
                                                s["rel_stderr"] * 3))
                if errors:
                    row[f"errors {pass_name}"] = errors
            triton_fwd = row.get("triton fwd")
            if triton_fwd:
                pct = f" ({triton_fwd['pct_of_peak']:.0f} % of peak)" if peak else " (peak unknown)"
                others = [f"{label} {row[f'{impl} fwd']['ms'] / triton_fwd['ms']:.2f}x"
                          for impl, label in (("torch", "eager"), ("compile", "compile")) if f"{impl} fwd" in row]
                run.figure(f"b_{case.name}", f"{triton_fwd['gbs']:.0f} GB/s{pct}" +
                           (f"; time vs Triton: {', '.join(others)}" if others else ""))
            return row
        run.step(case.name, one, need=3 if smoke else 15)


# -------------------------------------------------------------------------------------------- c: transformer

def _block_flops(tokens: int, hidden: int) -> float:
    """FLOPs of one double or single block over ``tokens`` (image + text): the linear layers hold 12 hidden^2
    weights per token in both block types (qkv 3, out 1, MLP 8), attention is QK^T and PV over all tokens."""
    return 24.0 * hidden ** 2 * tokens + 4.0 * tokens ** 2 * hidden


def _to_fp8(block: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``block`` whose Linear weights are stored in float8_e4m3fn with a per-layer scale and up-cast per
    call: the form our fp8 files, ``load_transformer(storage_dtype=...)`` and the trainer's ``model.fp8_base`` use
    (``FP8Linear``, ``apply_fp8_layout``)."""
    from accvideo_core.models.loading import apply_fp8_layout

    block = copy.deepcopy(block)
    apply_fp8_layout(block, {name: ("float8_e4m3fn", []) for name, module in block.named_modules()
                             if type(module) is torch.nn.Linear})
    return block


def _attention_backends(run) -> dict:
    """name -> context manager factory: our dispatcher's optional packages and SDPA's own kernels."""
    import contextlib

    from accvideo_core.models import attention

    def ours(name):
        @contextlib.contextmanager
        def ctx():
            previous = attention.get_attention_backend()
            attention.set_attention_backend(name)
            try:
                yield
            finally:
                attention.set_attention_backend(previous)
        return ctx

    backends = {"sdpa": contextlib.nullcontext}
    if run.device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, kind in (("sdpa:flash", "FLASH_ATTENTION"), ("sdpa:efficient", "EFFICIENT_ATTENTION"),
                            ("sdpa:cudnn", "CUDNN_ATTENTION")):
            if hasattr(SDPBackend, kind):
                backends[label] = (lambda kind=kind: sdpa_kernel([getattr(SDPBackend, kind)]))
        for name in ("flash", "sage"):
            if attention.is_available(name):
                backends[name] = ours(name)
    return backends


@dataclass
class _Blocks:
    """Part c's setting: real-width double and single blocks (random weights) and the attention backends."""

    run: object
    hidden: int
    heads: int
    text: int
    dtype: torch.dtype
    blocks: dict
    backends: dict
    peak_tflops: float | None

    def inputs(self, grid: tuple[int, int, int]) -> tuple:
        from accvideo_core.models.transformer_hunyuan_video import default_rope_axes, rope_cos_sin

        device = self.run.device
        gen = torch.Generator(device).manual_seed(1)  # drawn on the device: 720p inputs take seconds on a CPU
        n = grid[0] * grid[1] * grid[2]
        img = (torch.randn(1, n, self.hidden, generator=gen, device=device) * 0.5).to(self.dtype)
        txt = (torch.randn(1, self.text, self.hidden, generator=gen, device=device) * 0.5).to(self.dtype)
        vec = torch.randn(1, self.hidden, generator=gen, device=device).to(self.dtype)
        cos, sin = rope_cos_sin(grid, default_rope_axes(self.hidden // self.heads), 256.0, device)
        return img, txt, torch.cat((img, txt), 1), vec, cos, sin


def _block_calls(model_blocks: dict, args: tuple, ctx) -> dict:
    """``double0``, ``double1``, ``single0``, ``single1``: one forward of each block under the backend ``ctx``."""
    img, txt, joint, vec, cos, sin = args

    def double(i):
        with ctx():
            return model_blocks["double"][i](img, txt, vec, cos, sin, None)[0]

    def single(i):
        with ctx():
            return model_blocks["single"][i](joint, vec, cos, sin, None)
    return {f"double{i}": (lambda i=i: double(i)) for i in range(2)} | \
        {f"single{i}": (lambda i=i: single(i)) for i in range(2)}


def _time_blocks(b: _Blocks, label: str, grid: tuple[int, int, int], paper) -> dict:
    """Part c at one video size: ms per block per backend, TFLOP/s, the extrapolated 5/50-step seconds."""
    run = b.run
    args = b.inputs(grid)
    tokens = grid[0] * grid[1] * grid[2] + b.text
    flops = _block_flops(tokens, b.hidden)
    fns, memory = {}, {}
    for name, ctx in b.backends.items():
        fns.update({f"{name}|{k}": fn for k, fn in _block_calls(b.blocks, args, ctx).items()})
    with torch.no_grad():
        samples, errors = run.interleaved(fns, rounds=2, memory=memory)
    out: dict = {"tokens": tokens, "flops_per_block": flops, "errors": errors, "backends": {}}
    for name in b.backends:
        per = {kind: sum((samples.get(f"{name}|{kind}{i}", []) for i in range(2)), []) for kind in
               ("double", "single")}
        if not all(per.values()):
            continue
        s = {kind: spread(v) for kind, v in per.items()}
        call_s = DOUBLE * s["double"]["median"] + SINGLE * s["single"]["median"]
        tflops = {kind: flops / s[kind]["median"] / 1e12 for kind in s}
        out["backends"][name] = {
            "ms_per_double_block": s["double"]["median"] * 1e3, "ms_per_single_block": s["single"]["median"]
            * 1e3, "spread": s, "tflops": tflops,
            "pct_of_bf16_peak": {k: 100 * v / b.peak_tflops for k, v in tflops.items()} if b.peak_tflops else None,
            "peak_activation_gb": max(_gb(memory.get(f"{name}|{k}", 0)) for k in ("double0", "single0")),
            "transformer_s_per_call": call_s, "transformer_s_5_steps": 5 * call_s,
            "transformer_s_50_steps": 50 * call_s}
        for kind in s:
            run.check(check_noise(f"{label} {name} {kind} block times", s[kind]))
            if b.peak_tflops:
                run.check(check_at_most(f"{label} {name} {kind} TFLOP/s <= bf16 peak", tflops[kind],
                                        b.peak_tflops, 3 * s[kind]["rel_stderr"]))
    if out["backends"]:
        best = min(out["backends"], key=lambda k: out["backends"][k]["transformer_s_per_call"])
        r = out["backends"][best]
        out["best"] = best
        pct = (f", {max(r['pct_of_bf16_peak'].values()):.0f} % of bf16 peak" if r["pct_of_bf16_peak"]
               else ", peak unknown")
        run.figure(f"c_{label}_block", f"{r['ms_per_double_block']:.1f} / {r['ms_per_single_block']:.1f} ms "
                   f"({best}{pct}); {r['peak_activation_gb']:.1f} GB activations")
        run.figure(f"c_{label}_steps", f"{r['transformer_s_5_steps']:.1f} s / {r['transformer_s_50_steps']:.1f}"
                   f" s (transformer only)")
        if paper:
            out["paper_a100_end_to_end"] = paper
    return out


def _fp8_vs_bf16(b: _Blocks, label: str, grid: tuple[int, int, int]) -> dict:
    """Part c's fp8 row: the same blocks from e4m3fn weights against bf16 (time, weight bytes, output)."""
    run = b.run
    args = b.inputs(grid)
    low = {k: [_to_fp8(m) for m in v] for k, v in b.blocks.items()}
    fns = {f"bf16|{k}": fn for k, fn in _block_calls(b.blocks, args, b.backends["sdpa"]).items()}
    fns |= {f"fp8|{k}": fn for k, fn in _block_calls(low, args, b.backends["sdpa"]).items()}
    with torch.no_grad():
        samples, errors = run.interleaved(fns, rounds=2)
        diffs = {k: _rel_diff(fns[f"fp8|{k}"](), fns[f"bf16|{k}"]()) for k in ("double0", "single0")}
    times = {w: {kind: spread(sum((samples[f"{w}|{kind}{i}"] for i in range(2)), []))["median"]
                 for kind in ("double", "single")} for w in ("bf16", "fp8")}
    weight_bytes = {w: sum(p.numel() * p.element_size() for m in ms["double"] + ms["single"]
                           for p in m.parameters()) for w, ms in (("bf16", b.blocks), ("fp8", low))}
    ratio = {kind: times["fp8"][kind] / times["bf16"][kind] for kind in times["bf16"]}
    run.figure("c_fp8", f"time x{ratio['double']:.2f} / x{ratio['single']:.2f}, weights "
               f"{weight_bytes['fp8'] / weight_bytes['bf16']:.2f}x, output rel. diff "
               f"{max(diffs.values()):.1e}")
    run.check(check_at_most("fp8 blocks vs bf16, relative output difference", max(diffs.values()), 0.1, 0.0))
    return {"size": label, "seconds_per_block": times, "time_ratio_fp8_vs_bf16": ratio,
            "weight_gb": {k: _gb(v) for k, v in weight_bytes.items()}, "rel_output_diff": diffs,
            "errors": errors, "backend": "sdpa"}


def part_c(run) -> None:
    from accvideo_core.models.transformer_hunyuan_video import DoubleStreamBlock, SingleStreamBlock

    hidden, heads = (64, 2) if run.smoke else (3072, 24)
    dtype = torch.bfloat16
    # --smoke keeps the labels (and table rows) with tiny token grids
    sizes = {k: (g, video, None) for (k, (_, video, _)), g in zip(SIZES.items(), ((2, 4, 4), (3, 4, 6)))} \
        if run.smoke else SIZES
    torch.manual_seed(0)
    with torch.device(run.device):
        blocks = {"double": [DoubleStreamBlock(hidden, heads, 4 * hidden) for _ in range(2)],
                  "single": [SingleStreamBlock(hidden, heads, 4 * hidden) for _ in range(2)]}
    blocks = {k: [m.to(dtype).eval().requires_grad_(False) for m in v] for k, v in blocks.items()}
    b = _Blocks(run, hidden, heads, 8 if run.smoke else TEXT_TOKENS, dtype, blocks, _attention_backends(run),
                run.peaks["bf16_tflops"])
    run.record("config", {"hidden": hidden, "heads": heads, "dtype": dtype_name(dtype),
                          "blocks": "2 double + 2 single", "backends": list(b.backends),
                          "peak_bf16_tflops": b.peak_tflops})
    for label, (grid, _, paper) in sizes.items():
        run.step(label, lambda label=label, grid=grid, paper=paper: _time_blocks(b, label, grid, paper),
                 need=5 if run.smoke else 25)
    first, (first_grid, _, _) = next(iter(sizes.items()))
    run.step("fp8_weights", lambda: _fp8_vs_bf16(b, first, first_grid), need=5 if run.smoke else 20)


# -------------------------------------------------------------------------------------------------- d: VAE

def part_d(run) -> None:
    from accvideo_core.models.vae_hunyuan_video import HunyuanVideoVAE, VAEConfig
    from accvideo_core.testing import randomize_

    config = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                       has_encoder=False) if run.smoke else VAEConfig(has_encoder=False)
    dtype = torch.float32 if run.smoke else torch.bfloat16  # bf16 convolutions are slow on a CPU
    # max abs of an exact decode vs the untiled one (or the other exact one): fp32 rounding in --smoke; in bf16
    # EXACT_BF16_ULPS units in the last place at the reference's largest magnitude (measured on the CPU at full
    # width, 17 frames: 4-4.5; the differences are bf16 roundings flipped by other accumulation orders, grown
    # over ~30 layers)
    def tolerance(reference_max: float) -> float:
        return 1e-3 if run.smoke else EXACT_BF16_ULPS * bf16_ulp(reference_max)

    vae = randomize_(HunyuanVideoVAE(config)).to(run.device, dtype).eval()
    latent = (1, 16, 2, 2, 4) if run.smoke else (1, 16, 24, 68, 120)  # 544 x 960 x 93
    z = torch.randn(*latent, generator=torch.Generator().manual_seed(1)).to(run.device, dtype)
    weights = vae.weight_bytes()
    run.record("config", {"block_out_channels": list(config.block_out_channels), "latent": list(latent),
                          "dtype": dtype_name(dtype), "weight_gb": _gb(weights),
                          "exact_tolerance": "1e-3" if run.smoke else f"{EXACT_BF16_ULPS} bf16 ulps at the largest value"})
    done: dict = {}

    def decode(mode: str, budget: int | str, key: str) -> dict:
        run.reset_peak()
        before = run.allocated()  # weights, latent and the videos kept for comparison
        with ieee_fp32() if dtype == torch.float32 else contextlib.nullcontext():  # --smoke on a GPU: 1e-3
            seconds, video = run.timed(lambda: vae.decode(z, mode=mode, memory_budget=budget))
        # the decode's own device peak, weights included (what a budget bounds); max_memory_allocated - before
        peak = run.peak_bytes() - before + weights
        out = {"mode": mode, "budget_gb": _gb(budget) if isinstance(budget, int) else budget, "seconds": seconds,
               "peak_gb": _gb(peak), "chosen": vae.last_decode_info.mode,
               "video": list(video.shape)}
        reference = done.get("untiled") or next(iter(done.values()), None)
        if reference is not None:
            ref_max = float(reference[1].abs().max())
            out["max_abs_vs"] = {"against": reference[0], "value": _max_abs(video, reference[1]),
                                 "reference_max_abs": ref_max, "tolerance": tolerance(ref_max)}
        done[key] = (key, video)
        return out

    free = torch.cuda.mem_get_info()[0] if run.device == "cuda" else 1 << 40
    untiled_bytes = vae.estimate_untiled_bytes(z.shape) + weights
    results: dict = {}
    if untiled_bytes <= 0.85 * free:
        results["untiled"] = run.step("untiled", lambda: decode("untiled", "auto", "untiled"), need=5)
    else:
        run.record("untiled", {"skipped": f"needs ~{_gb(untiled_bytes)} GB, {_gb(free)} GB free"})
    base = (results.get("untiled") or {}).get("peak_gb")
    activation = (base * 1e9 - weights) if base else untiled_bytes - weights
    first = (results.get("untiled") or {}).get("seconds", 0.0)

    def exact(fraction: float, need: float) -> None:
        budget, key = int(weights + fraction * activation), f"exact_{fraction:g}"
        results[key] = r = run.step(key, lambda: decode("exact", budget, key), need=need)
        if r:
            run.check(check_at_most(f"VAE exact decode peak within its budget ({fraction:g})", r["peak_gb"],
                                    r["budget_gb"], 0.05))
            if "max_abs_vs" in r:
                run.check(check_at_most(f"VAE exact ({fraction:g}) vs {r['max_abs_vs']['against']}, max abs",
                                        r["max_abs_vs"]["value"], r["max_abs_vs"]["tolerance"], 0.0))

    exact(0.5, need=2 * first)
    budget = "auto" if run.smoke else int(weights + 0.25 * activation)  # tiny tiles would take minutes on a CPU
    results["fast"] = run.step("fast", lambda: decode("fast", budget, "fast"), need=first)
    # last: at 544x960x93 on an 80 GB card its activation store (~41 GB) is on the host, the slowest decode;
    # it needs at least the time of the decode at twice the budget
    exact(0.25, need=max(2 * first, (results.get("exact_0.5") or {}).get("seconds", 0.0)))
    for key, r in results.items():
        if r:
            diff = f", max abs {r['max_abs_vs']['value']:.2g}" if "max_abs_vs" in r else ""
            run.figure(f"d_{key}", f"{r['seconds']:.1f} s, {r['peak_gb']:.1f} GB{diff}")


# --------------------------------------------------------------------------------------------- e: training

def _write_synvid(root: Path, frames: int, height: int, width: int, text: tuple[int, int], pooled: int) -> None:
    """Two SynVid samples of random key latents (the cost of a training step does not depend on their values)."""
    from accvideo_core.latents import latent_shape
    from accvideo_core.sampling import flow_sigmas
    from accvideo_core.synvid.folder import SynVidWriter
    from accvideo_core.synvid.format import SynVidSample, key_steps_for

    keys = key_steps_for(50, 5)
    gen = torch.Generator().manual_seed(0)
    with SynVidWriter(root, dtype="bfloat16") as writer:
        for i in range(2):
            writer.write(SynVidSample(
                latents=torch.randn(len(keys), *latent_shape(frames, height, width)[1:], generator=gen),
                stored_steps=keys, sigmas=flow_sigmas(50, 7.0), text_states=torch.randn(*text, generator=gen),
                text_mask=torch.ones(text[0], dtype=torch.bool), pooled=torch.randn(pooled, generator=gen),
                guidance=6.0, prompt=f"bench {i}", seed=i, shift=7.0, height=height, width=width, frames=frames,
                source_model="random", source_model_hash="random", key_steps=keys))


def _lora_fp8_offload_steps(run, config, cfg, model: dict) -> dict:
    """Part e: two LoRA-mode training steps of a fresh model with ``model`` settings (fp8 base, offloaded
    checkpoints); the second one measured as part e measures the full mode's."""
    from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D
    from accvideo_core.train.config import config_from_dict
    from accvideo_core.train.loop import Trainer

    data = cfg.to_dict()
    data["model"].update(model)
    data["log"]["out_dir"] += "_lora"
    with torch.device(run.device):
        teacher = HunyuanVideoTransformer3D(config)
    trainer = Trainer(config_from_dict(data), teacher=teacher)
    del teacher
    fp8 = sum(p.numel() for p in trainer.student.parameters() if p.dtype == torch.float8_e4m3fn)
    trainer.train_step(0)
    run.reset_peak()
    before = run.allocated()
    seconds, _ = run.timed(lambda: trainer.train_step(1))
    peak = run.peak_bytes()
    del trainer
    run.free()
    return {"seconds": seconds, "peak_gb": _gb(peak), "static_before_gb": _gb(before),
            "activation_peak_gb": _gb(peak - before), "fp8_weight_gb": _gb(fp8), "fp8_weights": fp8}


def part_e(run) -> None:
    from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig
    from accvideo_core.testing import tiny_transformer_config
    from accvideo_core.train.config import config_from_dict
    from accvideo_core.train.estimate import FORWARDS_PER_SEGMENT, RECOMPUTE_FACTOR, SUSTAINED_TFLOPS, estimate
    from accvideo_core.train.loop import Trainer

    config = tiny_transformer_config(num_double_blocks=1, num_single_blocks=1) if run.smoke else \
        TransformerConfig(num_double_blocks=1, num_single_blocks=1)
    frames, height, width = (5, 16, 32) if run.smoke else SIZES["544x960x93"][1]
    text = (8, config.text_dim) if run.smoke else (TEXT_TOKENS, config.text_dim)
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    _write_synvid(root / "data", frames, height, width, text, config.pooled_dim)
    with torch.device(run.device):
        teacher = HunyuanVideoTransformer3D(config)
    cfg = config_from_dict({
        "model": {"gradient_checkpointing": True}, "data": {"root": str(root / "data"), "val_samples": 0},
        "optim": {"steps": 10, "total_batch": 1, "micro_batch": 1, "segments_per_iteration": 1},
        "loss": {"adversarial": True, "adv_start_step": 0},
        "runtime": {"device": run.device, "fsdp": "off"},
        "log": {"out_dir": str(root / "run"), "plot": False, "progress_seconds": 0}})
    trainer = Trainer(cfg, teacher=teacher)
    del teacher
    est = estimate(config, frames=frames, height=height, width=width, gpus=1, text_tokens=text[0],
                   head_width=cfg.loss.head_width)
    hidden_gb = est.tokens * config.hidden_size * 2 / 1e9
    step_flops = FORWARDS_PER_SEGMENT * est.forward_flops  # one segment of one sample, as the estimate counts it
    steps: dict = {}

    def one(i: int) -> dict:
        run.reset_peak()
        before = run.allocated()
        seconds, metrics = run.timed(lambda: trainer.train_step(i))
        peak = run.peak_bytes()
        return {"seconds": seconds, "peak_gb": _gb(peak), "static_before_gb": _gb(before),
                "activation_peak_gb": _gb(peak - before), "segment": trainer.segments_for(i),
                "losses": {k: v for k, v in metrics.items() if k in ("traj", "adv_g", "adv_d")}}
    steps["first"] = run.step("first_step", lambda: one(0), need=10)  # allocates the AdamW states
    steps["second"] = run.step("second_step", lambda: one(1), need=(steps["first"] or {}).get("seconds", 10))
    del trainer
    run.free()
    lora = {"lora_rank": 16, "fp8_base": True, "offload_checkpoints": True}   # the one-24-GB-card setting
    steps["lora"] = run.step("lora_fp8_offload_step", lambda: _lora_fp8_offload_steps(run, config, cfg, lora),
                             need=2 * (steps["second"] or steps["first"] or {}).get("seconds", 10))
    tmp.cleanup()
    layers = config.num_layers
    run.record("estimate", {"static_gb": round(sum(est.static.values()), 3), "activations_gb": est.activations,
                            "peak_gb": round(est.peak, 3), "per_block_checkpoint_gb": round(hidden_gb, 3),
                            "per_block_recompute_gb": round(RECOMPUTE_FACTOR * hidden_gb, 3), "tokens": est.tokens,
                            "step_flops": step_flops, "step_seconds_at_sustained_tflops":
                            step_flops / (SUSTAINED_TFLOPS * 1e12), "sustained_tflops": SUSTAINED_TFLOPS})
    last = steps["second"] or steps["first"]
    if last:
        per_block_s = last["seconds"] / layers
        run.record("per_block", {"seconds": per_block_s, "activation_gb": last["activation_peak_gb"] / layers,
                                 "blocks": layers, "note": "one step = one segment: trajectory + adversarial terms "
                                 "(student forward twice, teacher features with grad, heads), checkpointed"})
        run.figure("e_step", f"{last['seconds']:.2f} s ({per_block_s:.2f} s/block; estimate at {SUSTAINED_TFLOPS:.0f} "
                   f"TFLOP/s: {step_flops / SUSTAINED_TFLOPS / 1e12:.2f} s); peak {last['peak_gb']:.1f} GB vs estimate "
                   f"{est.peak:.1f} GB; activations {last['activation_peak_gb']:.1f} GB vs "
                   f"{max(est.activations.values()):.1f} GB")
        run.check(check_at_least("training step peak >= its static memory", last["peak_gb"],
                                 last["static_before_gb"], 0.0))
        achieved = step_flops / last["seconds"] / 1e12
        run.record("achieved", {"tflops": achieved, "vs_estimate_sustained": achieved / SUSTAINED_TFLOPS})
        if run.peaks["bf16_tflops"]:
            run.check(check_at_most("training step TFLOP/s (estimate's FLOP count) <= bf16 peak", achieved,
                                    run.peaks["bf16_tflops"], 0.05))
    if steps["lora"]:
        lo = steps["lora"]
        est = estimate(config, frames=frames, height=height, width=width, gpus=1, text_tokens=text[0],
                       head_width=cfg.loss.head_width, lora_rank=lora["lora_rank"], fp8_base=True, offload=True)
        run.record("lora_estimate", {"static_gb": round(sum(est.static.values()), 3), "peak_gb": round(est.peak, 3),
                                     "activations_gb": est.activations, "host_gb": round(est.host_gb, 3)})
        run.figure("e_lora_fp8_offload", f"{lo['seconds']:.2f} s; peak {lo['peak_gb']:.1f} GB vs estimate "
                   f"{est.peak:.1f} GB; fp8 base weights {lo['fp8_weight_gb']:.2f} GB; activations "
                   f"{lo['activation_peak_gb']:.1f} GB vs {max(est.activations.values()):.1f} GB")
        if last and last["activation_peak_gb"] > 0:   # measured on CUDA only
            run.record("lora_vs_full", {"peak": lo["peak_gb"] / last["peak_gb"],
                                        "activations": lo["activation_peak_gb"] / last["activation_peak_gb"]})
