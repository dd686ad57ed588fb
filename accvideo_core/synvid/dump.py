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

from accvideo_core.sampling import ACCVIDEO_STUDENT, HUNYUAN_TEACHER, sample_flow, seeded_noise
from accvideo_core.synvid.folder import SynVidWriter
from accvideo_core.synvid.format import STORE_MODES, SynVidError, file_sha256, sample_identity, state_dict_sha256
from accvideo_core.synvid.record import TeacherRun, trajectory_samples
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
                frames: int = 93, height: int = 544, width: int = 960, steps: int = HUNYUAN_TEACHER.steps,
                shift: float = HUNYUAN_TEACHER.shift, guidance: float = HUNYUAN_TEACHER.guidance,
                segments: int = ACCVIDEO_STUDENT.steps, store: str = "key", dtype: str = "bfloat16",
                batch_size: int = 1, source_model: str = "", source_model_hash: str | None = None,
                autocast_bf16: bool | None = None,
                progress: Callable[[str], None] | None = None) -> SynVidWriter:
    """Sample ``num`` teacher trajectories with ``model`` and write them as SynVid samples into ``out``.

    The folder is checked (and its stale temporary files removed) before any sampling; samples already in it
    (same seed and prompt, written by any writer) are skipped, so a rerun continues it.
    """
    if source_model_hash is None:
        source_model_hash = state_dict_sha256(model.state_dict())
    run = TeacherRun(frames, height, width, steps=steps, shift=shift, guidance=guidance, segments=segments,
                     store=store, source_model=source_model, source_model_hash=source_model_hash)
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    writer = SynVidWriter(out, dtype=dtype, info={"created_by": "accvideo_core.synvid.dump"}, report=say)
    writer.check(run.facts(embeddings["text_states"].shape[-1], embeddings["pooled"].shape[1:]))
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" if autocast_bf16 is None else autocast_bf16
    n_prompts = len(embeddings["prompts"])
    done = writer.done()
    todo = [i for i in range(num) if sample_identity(seed + i, embeddings["prompts"][i % n_prompts]) not in done]
    if len(todo) < num:
        say(f"{out}: {num - len(todo)} of {num} samples already present, continuing")
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        rows = [i % n_prompts for i in idx]
        noise = seeded_noise(run.latent_shape, [seed + i for i in idx])
        recorder = run.recorder()
        recorder.start(noise)
        cond = {k: embeddings[k][rows].to(device) for k in ("text_states", "text_mask", "pooled")}
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            sample_flow(model, noise.to(device), run.sigmas(), guidance=run.guidance, callback=recorder.on_step,
                        check_finite=True, **cond)
        for sample in trajectory_samples(run, recorder.stacked(), seeds=[seed + i for i in idx],
                                         prompts=[embeddings["prompts"][r] for r in rows], **cond):
            writer.write(sample)
        n_done = min(start + batch_size, len(todo))
        rate = n_done / (time.perf_counter() - t0)
        eta = (len(todo) - n_done) / rate if rate > 0 else 0.0
        say(f"synvid dump {n_done}/{len(todo)} | {rate:.3g} samples/s | ETA {eta:.0f}s")
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
    p.add_argument("--steps", type=int, default=HUNYUAN_TEACHER.steps)
    p.add_argument("--shift", type=float, default=HUNYUAN_TEACHER.shift)
    p.add_argument("--guidance", type=float, default=HUNYUAN_TEACHER.guidance)
    p.add_argument("--segments", type=int, default=ACCVIDEO_STUDENT.steps,
                   help="student steps m (key latents at every steps/m)")
    p.add_argument("--store", choices=list(STORE_MODES), default="key",
                   help="; ".join(f"{k}: the {v}" for k, v in STORE_MODES.items()))
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
    source = args.embeddings  # the file the current step reads, named in every error line
    try:
        emb = load_embeddings(args.embeddings)
        source = args.teacher
        model = load_transformer(args.teacher, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32,
                                 device=device)
        with lead_sequence_parallel(model) as model:  # rank 0 dumps; the other ranks run its model calls
            if model is not None:
                digest = args.model_hash or file_sha256(args.teacher)
                source = args.out
                dump_synvid(model, emb, args.out, num=args.num or len(emb["prompts"]), seed=args.seed,
                            frames=args.frames, height=args.height, width=args.width, steps=args.steps,
                            shift=args.shift, guidance=args.guidance, segments=args.segments, store=args.store,
                            dtype=args.dtype, batch_size=args.batch_size, source_model=Path(args.teacher).name,
                            source_model_hash=digest)
    except KeyboardInterrupt:
        print("interrupted: the samples written so far are listed in the manifest; run again to continue",
              file=sys.stderr)
        return 130
    except (SynVidError, ValueError, OSError, FloatingPointError) as err:  # CheckpointError is a ValueError
        print(f"error: {_one_line(err, source)}", file=sys.stderr)
        return 2
    finally:
        shutdown(info)
    return 0


def _one_line(err: BaseException, source: str) -> str:
    """An error as one line that names ``source`` (the file being read or written) if the message does not."""
    msg = " ".join(str(err).split()) or type(err).__name__
    return msg if Path(source).name in msg else f"{source}: {msg}"


if __name__ == "__main__":
    raise SystemExit(main())
