"""Per-GPU memory and compute estimate of an AccVideo training run, from the model config and video size.

``python -m accvideo_core.train.estimate [--frames 93 --height 544 --width 960 --gpus 8 --sp 1 --ema]``
``python -m accvideo_core.train.estimate --plan`` (the 544p / 720p table of docs/training.md)
``python -m accvideo_core.train.estimate --lora-rank 16 [--fp8-base] [--offload]`` (LoRA mode on 1 and 8 GPUs)
``python -m accvideo_core.train.estimate --config my_run.toml [--device-gb 24]`` (one run, and what would fit)

The formulas are those of docs/training.md ("13B: memory and days"): FSDP2 over all ``gpus`` ranks (the
sequence-parallel ranks shard the weights too), fp32 master weights, gradients and AdamW states, bf16 frozen
teacher, per-block gradient checkpointing, micro-batch 1 (unless given), O(N)-memory attention. ``sp`` = Ulysses sequence-parallel
degree as built (``models/sequence_parallel.py``): each rank holds 1/sp of the image tokens and all text tokens,
plus the all-to-all buffers of q/k/v; the discriminator's gathered features are full size on every rank.
Parameter counts and forward FLOPs come from the transformer built on the meta device (exact for the config).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from accvideo_core.latents import latent_shape
from accvideo_core.models.loading import BLOCK_PREFIXES
from accvideo_core.models.transformer_hunyuan_video import HunyuanVideoTransformer3D, TransformerConfig
from accvideo_core.lora.adapters import target_names
from accvideo_core.train.config import LORA_TARGETS, TrainConfig
from accvideo_core.train.heads import DiscriminatorHead

GB = 1e9
RECOMPUTE_FACTOR = 20  # one single block's recompute + backward working set, in hidden-state tensors (~6 GB at 544p)
OFFLOAD_ON_DEVICE = 2  # offloaded checkpoints: per forward graph the block input copied back and its output gradient
ALL_TO_ALL_BUFFERS = 6  # sp > 1: stacked q/k/v sent and received around one attention, in local hidden tensors
# One segment of one sample, in forward-equivalents: student trajectory (forward, recompute, backward = 2: 4),
# student fake step (4), teacher fake features with the input gradient (forward, recompute, backward ~2: 4),
# teacher real features (forward only: 1).
FORWARDS_PER_SEGMENT = 13
PAPER_ITERATIONS = 1200
SUSTAINED_TFLOPS = 125.0  # per GPU: 40 % of an A100's bf16 peak (312 TFLOP/s)


@dataclass
class Estimate:
    params: int
    tokens: int
    static: dict[str, float]
    activations: dict[str, float]

    forward_flops: float = 0.0  # one student forward of one sample
    host_gb: float = 0.0        # pinned host memory per GPU for offloaded checkpoints

    @property
    def peak(self) -> float:
        return sum(self.static.values()) + max(self.activations.values())

    def days(self, *, gpus: int, iterations: int = PAPER_ITERATIONS, batch: int = 32, segments: int = 5,
             tflops: float = SUSTAINED_TFLOPS) -> float:
        """Days for ``iterations`` of ``batch`` samples x ``segments`` trained segments at the counted FLOPs
        (communication not counted)."""
        total = iterations * batch * segments * FORWARDS_PER_SEGMENT * self.forward_flops
        return total / (gpus * tflops * 1e12) / 86400


def forward_flops(model: HunyuanVideoTransformer3D, image_tokens: int, text_tokens: int) -> float:
    """Multiply-add FLOPs (x2) of one forward of one sample: every Linear / the patch conv on the tokens it sees
    (image stream, text stream, both, or one conditioning vector), plus attention QK^T and AV over the joint
    sequence of every double and single block (the refiner's text-only attention too)."""
    both = image_tokens + text_tokens
    flops = 2.0 * model.img_in.proj.weight.numel() * image_tokens
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if "_mod" in name or "modulation" in name or name.startswith(("time_in", "vector_in", "guidance_in")) \
                or ".t_embedder" in name or ".c_embedder" in name:
            tokens = 1                                  # conditioning vectors
        elif name.startswith("txt_in") or ".txt_" in name:
            tokens = text_tokens
        elif ".img_" in name or name.startswith("final_layer"):
            tokens = image_tokens
        else:
            tokens = both                               # single-block linear1 / linear2
        flops += 2.0 * module.in_features * module.out_features * tokens
    c = model.config
    flops += 4.0 * both ** 2 * c.hidden_size * c.num_layers + 4.0 * text_tokens ** 2 * c.hidden_size * \
        c.num_refiner_blocks
    return flops


def estimate(config: TransformerConfig, *, frames: int = 0, height: int = 0, width: int = 0, gpus: int, sp: int = 1,
             text_tokens: int = 256, ema: bool = False, segments: int = 5, head_width: int = 256,
             lora_rank: int = 0, fp8_base: bool = False, offload: bool = False,
             latent: tuple[int, int, int] | None = None, micro_batch: int = 1) -> Estimate:
    """``lora_rank > 0``: the LoRA mode (one frozen bf16 base; fp32 adapters with gradients and AdamW states);
    ``fp8_base``: its block linears in fp8 (``model.fp8_base``); ``offload``: the checkpointed block inputs in host
    memory (``model.offload_checkpoints``), so a forward graph keeps no per-block tensor on the GPU. ``latent``:
    the latent grid (T, H, W) instead of the video size (e.g. read from a SynVid sample); ``micro_batch``: samples
    per forward (activations scale with it)."""
    if fp8_base and not lora_rank:
        raise ValueError("fp8_base is a LoRA-mode setting (lora_rank > 0)")
    if gpus % sp or config.num_heads % sp:
        raise ValueError(f"sp {sp} must divide the number of GPUs ({gpus}) and of attention heads "
                         f"({config.num_heads})")
    with torch.device("meta"):
        model = HunyuanVideoTransformer3D(config)
        head = DiscriminatorHead(config.hidden_size, head_width)
    p = sum(t.numel() for t in model.parameters())
    biggest_block = max(sum(t.numel() for t in b.parameters()) for b in list(model.double_blocks) +
                        list(model.single_blocks))
    heads = segments * sum(t.numel() for t in head.parameters())
    t, h, w = latent or latent_shape(frames, height, width)[2:]
    pt, ph, pw = config.patch_size
    image_tokens = (t // pt) * (h // ph) * (w // pw)
    tokens = image_tokens + text_tokens
    static = {
        "student fp32 weights": 4 * p / gpus, "student fp32 gradients": 4 * p / gpus,
        "AdamW states": 8 * p / gpus, "teacher bf16": 2 * p / gpus, "heads (replicated)": 16 * heads,
        "unsharded blocks in flight": 2 * 2 * biggest_block if gpus > 1 else 0,   # 1 GPU: no FSDP
    }
    if lora_rank:
        adapters = sum(lora_rank * sum(model.get_submodule(n).weight.shape)
                       for n in target_names(model, LORA_TARGETS))
        fp8 = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.startswith(BLOCK_PREFIXES)) if fp8_base else 0
        base = ({"base fp8 block linears + bf16 rest (frozen)": (fp8 + 2 * (p - fp8)) / gpus} if fp8_base else
                {"base bf16 (frozen, teacher = student)": 2 * p / gpus})
        static = {**base,
                  f"adapters r{lora_rank} fp32 weights+grads+AdamW": 16 * adapters / gpus,
                  "heads (replicated)": 16 * heads,
                  "unsharded blocks in flight": 2 * 2 * biggest_block if gpus > 1 else 0}
    if ema:
        static["EMA fp32"] = 4 * p / gpus
    # one bf16 [tokens, hidden] tensor of an SP rank: 1/sp of the image tokens (rounded up), every text token
    hidden = (-(-image_tokens // sp) + text_tokens) * config.hidden_size * 2 * micro_batch
    graph = config.num_layers * hidden                      # checkpointed block inputs of one forward graph
    host = 2 * graph if offload else 0                      # offloaded: both graphs' inputs in host memory
    graph = OFFLOAD_ON_DEVICE * hidden if offload else graph
    recompute = (RECOMPUTE_FACTOR + (ALL_TO_ALL_BUFFERS if sp > 1 else 0)) * hidden
    features = 2 * image_tokens * config.hidden_size * 2 * micro_batch   # gathered teacher features + gradient
    activations = {"trajectory phase": graph + recompute, "adversarial phase": 2 * graph + recompute + features}
    return Estimate(p, tokens, {k: v / GB for k, v in static.items()},
                    {k: v / GB for k, v in activations.items()}, forward_flops(model, image_tokens, text_tokens),
                    host / GB)


SETTING_NAMES = {"offload": "model.offload_checkpoints = true", "fp8_base": "model.fp8_base = true"}


def memory_advice(config: TransformerConfig, device_gb: float, names: dict[str, str] = SETTING_NAMES,
                  **run) -> tuple[float, str]:
    """(estimated peak GB per GPU, a sentence) for a run (``estimate``'s keyword arguments) on a device of
    ``device_gb``: when the peak exceeds it, the sentence names the settings that would fit (offloaded
    checkpoints; in LoRA mode an fp8 base; both; ``names`` spells them, e.g. as a host's inputs) or, when none
    does, what else to change."""
    e = estimate(config, **run)
    need = (f"by python -m accvideo_core.train.estimate this run needs about {e.peak:.1f} GB per GPU (static "
            f"{sum(e.static.values()):.1f} + activations {max(e.activations.values()):.1f})")
    if e.peak <= device_gb:
        return e.peak, f"{need}; the device has {device_gb:.1f} GB"
    options = [({"offload": True}, names["offload"])]
    if run.get("lora_rank"):
        options += [({"fp8_base": True}, names["fp8_base"]),
                    ({"offload": True, "fp8_base": True}, f"{names['offload']} and {names['fp8_base']}")]
    fits = []
    for change, name in options:
        if all(run.get(k) == v for k, v in change.items()):
            continue   # already set
        alt = estimate(config, **{**run, **change})
        if alt.peak <= device_gb:
            fits.append(f"{name} ({alt.peak:.1f} GB" + (f", {alt.host_gb:.0f} GB of host memory per GPU)"
                                                        if alt.host_gb else ")"))
    smaller = "a lower model.lora_rank" if run.get("lora_rank") else "a LoRA (model.lora_rank > 0)"
    fix = ("; it fits with " + ", or with ".join(fits)) if fits else (
        f"; neither {names['offload']} nor {names['fp8_base']} brings it under that: train on fewer frames or a "
        f"smaller size, {smaller}, or spread it over several GPUs (torchrun: FSDP2 shards the weights, "
        "runtime.sequence_parallel the activations)")
    return e.peak, f"{need}, more than the device's {device_gb:.1f} GB{fix}"


def run_settings(cfg: TrainConfig, *, latent: tuple[int, int, int], text_tokens: int, gpus: int, sp: int,
                 fp8_base: bool) -> dict:
    """``estimate``'s keyword arguments for a trainer config on ``gpus`` ranks (``sp`` per sample) and a data set
    of this latent grid and text length; ``fp8_base``: the frozen base holds fp8 weights."""
    return dict(latent=latent, text_tokens=text_tokens, gpus=gpus, sp=sp, ema=cfg.optim.ema_decay > 0,
                segments=cfg.data.segments, head_width=cfg.loss.head_width, lora_rank=cfg.model.lora_rank,
                fp8_base=fp8_base, offload=cfg.model.offload_checkpoints, micro_batch=cfg.optim.micro_batch)


def config_run(path: str, overrides: list[str], gpus: int) -> tuple[TransformerConfig, dict]:
    """(teacher config, ``estimate`` keyword arguments) of a trainer config file: the teacher's architecture and
    dtypes from its header, the latent grid and text length from the first sample of ``data.root``; no weight is
    loaded."""
    from accvideo_core.models.loading import header_tensors, read_config
    from accvideo_core.synvid.format import SynVidDataset, read_sample
    from accvideo_core.train.config import load_config
    from accvideo_core.utils.dtypes import FP8_DTYPES

    cfg = load_config(path, overrides)
    teacher = cfg.model.teacher
    fp8 = cfg.model.fp8_base or any(t.dtype in FP8_DTYPES for t in header_tensors(teacher).values())
    data = SynVidDataset(cfg.data.root)
    sample = read_sample(data.path(0), steps=[0], check_finite=False)
    return read_config(teacher), run_settings(cfg, latent=tuple(sample.latents.shape[-3:]),
                                              text_tokens=sample.text_states.shape[0], gpus=gpus,
                                              sp=cfg.runtime.sequence_parallel, fp8_base=fp8)


PLAN_VIDEOS = ((93, 544, 960), (129, 720, 1280))
PLAN_LAYOUTS = ((8, 1), (8, 2), (8, 4), (8, 8), (16, 8), (32, 8))  # (GPUs, SP degree)


def plan_rows(tflops: float = SUSTAINED_TFLOPS, iterations: int = PAPER_ITERATIONS) -> list[dict]:
    """Full fine-tune at 544p and 720p over the GPU / SP layouts of docs/training.md."""
    rows = []
    for frames, height, width in PLAN_VIDEOS:
        for gpus, sp in PLAN_LAYOUTS:
            e = estimate(TransformerConfig(), frames=frames, height=height, width=width, gpus=gpus, sp=sp)
            rows.append({"video": f"{width}x{height}x{frames}", "tokens": e.tokens, "gpus": gpus, "sp": sp,
                         "peak_gb": e.peak, "forward_pflop": e.forward_flops / 1e15,
                         "days_5_segments": e.days(gpus=gpus, iterations=iterations, tflops=tflops),
                         "days_1_segment": e.days(gpus=gpus, iterations=iterations, segments=1, tflops=tflops)})
    return rows


def _print_plan(rows: list[dict], tflops: float, iterations: int) -> None:
    print(f"| video (tokens) | GPUs | SP | GB per GPU | days, 5 segments / 1 segment per sample |  "
          f"({iterations} iterations of 32 samples, {tflops:g} TFLOP/s per GPU sustained)")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['video']} ({r['tokens']}) | {r['gpus']} | {r['sp']} | {r['peak_gb']:.1f} | "
              f"{r['days_5_segments']:.1f} / {r['days_1_segment']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m accvideo_core.train.estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=93)
    ap.add_argument("--height", type=int, default=544)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--gpus", type=int, default=None, help="GPUs (ranks): default 8, with --config 1")
    ap.add_argument("--config", help="a trainer config (.toml / .json): estimate that run (the teacher's "
                                     "architecture from its file header, the video size from its SynVid)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="with --config: override a field, as python -m accvideo_core.train does")
    ap.add_argument("--device-gb", type=float, default=0.0,
                    help="with --config: compare with a GPU of this many GB and say which settings would fit")
    ap.add_argument("--sp", type=int, default=1,
                    help="Ulysses sequence-parallel degree (must divide --gpus and the 24 heads)")
    ap.add_argument("--ema", action="store_true")
    ap.add_argument("--segments", type=int, default=5, help="segments trained per sample and iteration (1..5)")
    ap.add_argument("--iterations", type=int, default=PAPER_ITERATIONS)
    ap.add_argument("--tflops", type=float, default=SUSTAINED_TFLOPS, help="sustained bf16 TFLOP/s per GPU")
    ap.add_argument("--plan", action="store_true", help="the 544p / 720p table over GPU and SP layouts")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="LoRA mode: adapter rank (prints 544x960x93 and 720x1280x129 on 1 and 8 GPUs)")
    ap.add_argument("--fp8-base", action="store_true", help="LoRA mode: the base's block linears in fp8")
    ap.add_argument("--offload", action="store_true",
                    help="LoRA mode: the checkpointed block inputs in host memory (model.offload_checkpoints)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.config:
        return _config_estimate(args.config, args.set, args.gpus or 1, args.device_gb, args.json)
    args.gpus = args.gpus or 8
    if (args.fp8_base or args.offload) and not args.lora_rank:
        ap.error("--fp8-base and --offload are LoRA-mode options: give --lora-rank too")
    if args.lora_rank:
        return _lora_table(args.lora_rank, args.sp, args.json, fp8_base=args.fp8_base, offload=args.offload)
    if args.plan:
        rows = plan_rows(args.tflops, args.iterations)
        print(json.dumps(rows, indent=2)) if args.json else _print_plan(rows, args.tflops, args.iterations)
        return 0
    e = estimate(TransformerConfig(), frames=args.frames, height=args.height, width=args.width, gpus=args.gpus,
                 sp=args.sp, ema=args.ema)
    days = e.days(gpus=args.gpus, iterations=args.iterations, segments=args.segments, tflops=args.tflops)
    if args.json:
        print(json.dumps({"params": e.params, "tokens": e.tokens, "static_gb": e.static,
                          "activations_gb": e.activations, "peak_gb": e.peak, "forward_flops": e.forward_flops,
                          "days": days}, indent=2))
        return 0
    print(f"HunyuanVideo {e.params / 1e9:.3f} B params, {args.frames}x{args.height}x{args.width} -> {e.tokens} "
          f"tokens, {args.gpus} GPUs (FSDP2), SP degree {args.sp}")
    _print_memory(e)
    print(f"  one forward {e.forward_flops / 1e15:.2f} PFLOP; {args.iterations} iterations x 32 samples x "
          f"{args.segments} segments x {FORWARDS_PER_SEGMENT} forward-equivalents at {args.tflops:g} TFLOP/s per "
          f"GPU: {days:.1f} days (communication not counted)")
    return 0


def _print_memory(e: Estimate) -> None:
    for name, value in e.static.items():
        print(f"  {name:<44}{value:8.2f} GB")
    print(f"  {'static total':<44}{sum(e.static.values()):8.2f} GB")
    for name, value in e.activations.items():
        print(f"  {'activations, ' + name:<44}{value:8.2f} GB")
    if e.host_gb:
        print(f"  {'host memory (offloaded checkpoints)':<44}{e.host_gb:8.2f} GB")
    print(f"  {'peak per GPU':<44}{e.peak:8.2f} GB")


def _config_estimate(path: str, overrides: list[str], gpus: int, device_gb: float, as_json: bool) -> int:
    """``--config``: the memory of that run per GPU and, with ``--device-gb``, what would fit. Exit 2 (one
    ``error:`` line) when the config, teacher or SynVid cannot be read."""
    from accvideo_core.synvid.format import SynVidError
    from accvideo_core.train.config import ConfigError
    from accvideo_core.utils.io import CheckpointError

    try:
        config, run = config_run(path, overrides, gpus)
        e = estimate(config, **run)
    except (ConfigError, SynVidError, CheckpointError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    advice = memory_advice(config, device_gb, **run)[1] if device_gb else ""
    if as_json:
        print(json.dumps({"params": e.params, "tokens": e.tokens, "static_gb": e.static,
                          "activations_gb": e.activations, "host_gb": e.host_gb, "peak_gb": e.peak,
                          "settings": run, "advice": advice}, indent=2))
        return 0
    mode = f"LoRA rank {run['lora_rank']}" if run["lora_rank"] else "full fine-tune"
    print(f"{path}: {e.params / 1e9:.3f} B params, latent {tuple(run['latent'])} -> {e.tokens} tokens per sample, "
          f"micro-batch {run['micro_batch']}, {mode}{', fp8 base' if run['fp8_base'] else ''}"
          f"{', offloaded checkpoints' if run['offload'] else ''}, {gpus} GPU(s), SP degree {run['sp']}")
    _print_memory(e)
    if advice:
        print(advice)
    return 0


CARDS_GB = (24, 48, 80, 141)


def _lora_table(rank: int, sp: int, as_json: bool, *, fp8_base: bool = False, offload: bool = False) -> int:
    """LoRA mode at 544p and 720p, on 1 and 8 GPUs, with the verdict per card size and the days of the paper's
    iterations at the full mode's FLOP count (an upper bound: the frozen base's weight gradients are not
    computed, at most ~4 % of the count: the linears' share of a forward, twice per segment of 13)."""
    rows = []
    for frames, height, width in PLAN_VIDEOS:
        for gpus in (g for g in (1, 8) if g % sp == 0):   # SP splits a sample over GPUs: sp must divide them
            e = estimate(TransformerConfig(), frames=frames, height=height, width=width, gpus=gpus, sp=sp,
                         lora_rank=rank, fp8_base=fp8_base, offload=offload)
            rows.append({"video": f"{width}x{height}x{frames}", "gpus": gpus, "tokens": e.tokens,
                         "static_gb": sum(e.static.values()), "activations_gb": max(e.activations.values()),
                         "peak_gb": e.peak, "host_gb": e.host_gb, "fits": {str(c): e.peak <= c for c in CARDS_GB},
                         "detail": e.static, "days_5_segments": e.days(gpus=gpus),
                         "days_1_segment": e.days(gpus=gpus, segments=1)})
    if as_json:
        print(json.dumps({"lora_rank": rank, "sp": sp, "fp8_base": fp8_base, "offload": offload, "rows": rows},
                         indent=2))
        return 0
    base = "fp8 block linears" if fp8_base else "bf16"
    print(f"LoRA mode, rank {rank}: one frozen {base} base (teacher = student), fp32 adapters + AdamW, per-block "
          f"gradient checkpointing{' offloaded to host memory' if offload else ''}, micro-batch 1, SP degree {sp}; "
          "GB per GPU (10^9 bytes)")
    print(f"{'video':<16}{'GPUs':>5}{'static':>9}{'activ.':>9}{'peak':>9}{'host':>7}   " +
          "   ".join(f"{c:>3} GB card    " for c in CARDS_GB) + "days, 5 / 1 segments")
    for r in rows:
        verdict = "   ".join(f"{'fits' if r['peak_gb'] <= c else 'no':<4} ({c - r['peak_gb']:+6.1f})"
                             for c in CARDS_GB)
        print(f"{r['video']:<16}{r['gpus']:>5}{r['static_gb']:9.2f}{r['activations_gb']:9.2f}{r['peak_gb']:9.2f}"
              f"{r['host_gb']:7.1f}   {verdict}   {r['days_5_segments']:6.1f} / {r['days_1_segment']:.1f}")
    print("(spare GB in brackets; the CUDA context, NCCL buffers and allocator fragmentation take several GB of a "
          "nominal fit; host = pinned host memory per GPU for the offloaded checkpoints. Activations dominate: "
          "what does not fit needs --offload (model.offload_checkpoints), --fp8-base (model.fp8_base) or sequence "
          f"parallelism over several GPUs (--sp). Days: {PAPER_ITERATIONS} iterations of 32 samples at "
          f"{SUSTAINED_TFLOPS:g} TFLOP/s per GPU sustained, the full mode's FLOP count, an upper bound)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
