"""Core SynVid dumper: our transformer + the teacher's Euler sampler with trajectory recording.

``python -m accvideo_core.synvid.dump --teacher CKPT --embeddings EMB.safetensors --out DIR [--num N] ...``

For users with precomputed text embeddings (and for tests / the miniature demo). ``EMB.safetensors`` holds
``text_states [N, L, D]``, ``text_mask [N, L]`` (1 = valid), ``pooled [N, P]`` and optionally the metadata key
``prompts`` (a JSON list of N strings). Sample ``i`` uses prompt ``i mod N`` and seed ``seed + i``; its noise is
``torch.randn(latent_shape, generator=manual_seed(seed + i))`` on CPU, as ComfyUI makes seeded noise. Re-running
the command on the same folder continues it (samples already listed are skipped); Ctrl-C stops cleanly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from accvideo_core.latents import latent_shape
from accvideo_core.sampling import flow_sigmas, sample_flow
from accvideo_core.synvid.format import (
    SynVidError, SynVidSample, SynVidWriter, file_sha256, key_steps_for, state_dict_sha256,
)
from accvideo_core.utils.io import LazyCheckpoint


def load_embeddings(path: str | Path) -> dict:
    """Read a precomputed-embeddings file (see the module docstring) with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise SynVidError(f"embeddings file not found: {path}")
    try:
        with LazyCheckpoint(path) as fh:
            meta = fh.metadata
            missing = [k for k in ("text_states", "text_mask", "pooled") if k not in fh.keys()]
            if missing:
                raise SynVidError(f"{path}: missing tensors {missing}; expected text_states [N, L, D], "
                                  "text_mask [N, L] and pooled [N, P]")
            emb = {k: fh.get(k) for k in ("text_states", "text_mask", "pooled")}
    except SynVidError:
        raise
    except Exception as err:
        raise SynVidError(f"{path}: unreadable safetensors file ({err})") from err
    n = emb["text_states"].shape[0]
    if emb["text_states"].ndim != 3 or emb["text_mask"].shape != emb["text_states"].shape[:2] or \
            emb["pooled"].ndim != 2 or emb["pooled"].shape[0] != n:
        raise SynVidError(f"{path}: shapes text_states {tuple(emb['text_states'].shape)}, text_mask "
                          f"{tuple(emb['text_mask'].shape)}, pooled {tuple(emb['pooled'].shape)} do not fit "
                          "[N, L, D], [N, L], [N, P]")
    prompts = json.loads(meta["prompts"]) if "prompts" in meta else [f"prompt {i}" for i in range(n)]
    if len(prompts) != n:
        raise SynVidError(f"{path}: metadata 'prompts' has {len(prompts)} entries for {n} embeddings")
    emb["prompts"] = prompts
    return emb


def dump_synvid(model: torch.nn.Module, embeddings: Mapping, out: str | Path, *, num: int, seed: int = 0,
                frames: int = 93, height: int = 544, width: int = 960, steps: int = 50, shift: float = 7.0,
                guidance: float = 6.0, segments: int = 5, store: str = "key", dtype: str = "bfloat16",
                batch_size: int = 1, source_model: str = "", source_model_hash: str | None = None,
                autocast_bf16: bool | None = None,
                progress: Callable[[str], None] | None = None) -> SynVidWriter:
    """Sample ``num`` teacher trajectories with ``model`` and write them as SynVid samples into ``out``."""
    if store not in ("key", "all"):
        raise SynVidError(f"store must be 'key' (the {segments + 1} key latents) or 'all', got {store!r}")
    shape = latent_shape(frames, height, width)[1:]
    sigmas = flow_sigmas(steps, shift)
    keys = key_steps_for(steps, segments)
    stored = keys if store == "key" else list(range(steps + 1))
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" if autocast_bf16 is None else autocast_bf16
    if source_model_hash is None:
        source_model_hash = state_dict_sha256(model.state_dict())
    n_prompts = len(embeddings["prompts"])
    writer = SynVidWriter(out, dtype=dtype, info={"created_by": "accvideo_core.synvid.dump"})
    todo = [i for i in range(num) if not writer.has(seed + i, embeddings["prompts"][i % n_prompts])]
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if len(todo) < num:
        say(f"{out}: {num - len(todo)} of {num} samples already present, continuing")
    t0 = time.perf_counter()
    try:
        for done, start in enumerate(range(0, len(todo), batch_size)):
            idx = todo[start:start + batch_size]
            rows = [i % n_prompts for i in idx]
            noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in idx])
            recorded: dict[int, torch.Tensor] = {0: noise.clone()} if 0 in stored else {}

            def record(info: dict) -> None:
                step = info["i"] + 1
                if step in stored:
                    recorded[step] = info["x"].detach().to("cpu", torch.float32)

            cond = {k: embeddings[k][rows].to(device) for k in ("text_states", "text_mask", "pooled")}
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                sample_flow(model, noise.to(device), sigmas, guidance=guidance, callback=record, **cond)
            traj = torch.stack([recorded[s] for s in stored], dim=1)      # [B, S, C, T, H, W]
            for b, i in enumerate(idx):
                writer.write(SynVidSample(
                    latents=traj[b], stored_steps=stored, sigmas=sigmas, text_states=cond["text_states"][b].cpu(),
                    text_mask=cond["text_mask"][b].cpu().bool(), pooled=cond["pooled"][b].cpu(), guidance=guidance,
                    prompt=embeddings["prompts"][rows[b]], seed=seed + i, shift=shift, height=height, width=width,
                    frames=frames, source_model=source_model, source_model_hash=source_model_hash, key_steps=keys))
            n_done = min(start + batch_size, len(todo))
            rate = n_done / (time.perf_counter() - t0)
            eta = (len(todo) - n_done) / rate if rate > 0 else 0.0
            say(f"synvid dump {n_done}/{len(todo)} | {rate:.3g} samples/s | ETA {eta:.0f}s")
    finally:
        writer.close()
    return writer


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.synvid.dump", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="teacher transformer checkpoint (any layout load_transformer reads)")
    p.add_argument("--embeddings", required=True, help="safetensors with text_states, text_mask, pooled (+ prompts)")
    p.add_argument("--out", required=True, help="SynVid folder (created or continued)")
    p.add_argument("--num", "--num-samples", type=int,
                   help="number of samples (default: one per prompt); under torchrun write --num-samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--height", type=int, default=544)
    p.add_argument("--width", type=int, default=960)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--shift", type=float, default=7.0)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--segments", type=int, default=5, help="student steps m (key latents at every steps/m)")
    p.add_argument("--store", choices=("key", "all"), default="key", help="the 6 key latents or all 51")
    p.add_argument("--dtype", default="bfloat16", help="storage dtype: bfloat16, float16 or float32")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto = cuda if available else cpu")
    p.add_argument("--model-hash", help="source model hash to record (default: sha256 of the file)")
    args = p.parse_args(argv)

    from accvideo_core.models.loading import load_transformer
    from accvideo_core.models.sequence_parallel import lead_sequence_parallel
    from accvideo_core.train.distributed import init_distributed, shutdown

    info = init_distributed(args.device)  # under torchrun all ranks form one sequence-parallel group
    device = str(info.device)
    try:
        emb = load_embeddings(args.embeddings)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = load_transformer(args.teacher, dtype=dtype, device=device)
        with lead_sequence_parallel(model) as model:  # rank 0 dumps; the other ranks run its model calls
            if model is not None:
                digest = args.model_hash or file_sha256(args.teacher)
                dump_synvid(model, emb, args.out, num=args.num or len(emb["prompts"]), seed=args.seed,
                            frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                            shift=args.shift, guidance=args.guidance, segments=args.segments, store=args.store,
                            dtype=args.dtype, batch_size=args.batch_size, source_model=Path(args.teacher).name,
                            source_model_hash=digest)
    except KeyboardInterrupt:
        print("interrupted: the samples written so far are listed in the manifest; run again to continue",
              file=sys.stderr)
        return 130
    except (SynVidError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        shutdown(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
