"""The miniature end-to-end AccVideo run (``make demo`` = ``python -m accvideo_core.demo``), CPU, minutes.

On the shipped miniature HunyuanVideo family (``assets/mini/``) it chains the project's real entry points:

1. text-encode training prompts;
2. ``dump_synvid`` (what ``python -m accvideo_core.synvid.dump`` runs): the teacher's trajectories at the teacher
   recipe (``sampling.HUNYUAN_TEACHER``: 50 steps, shift 7; embedded guidance ``--guidance``, default the miniature's
   ``family.GUIDANCE`` = 4, where HunyuanVideo uses 6) -> a mini SynVid;
3. the trainer (``Trainer``, what ``python -m accvideo_core.train`` runs) twice with the same budget: trajectory
   loss only, and trajectory + adversarial (the paper's Fig. 7 ablation order) -> two students;
4. held-out prompts (attribute combinations the teacher never saw in training) with the teacher at both recipes
   and the students at the student recipe (``sampling.ACCVIDEO_STUDENT``: 5 steps), timed end to end (text
   encoding + sampling + VAE decoding) per video;
5. ``report.json``, ``report.md``, a side-by-side ``side_by_side.mp4`` and ``side_by_side.gif``.

The library is called directly, as the tests call it; the side-by-side GIF needs Pillow (``make demo`` installs
it with ``requirements-test.txt``; ComfyUI ships it), checked before any work starts.

Everything goes under ``--out`` (default ``outputs/demo/``, git-ignored). Re-running continues: the SynVid dump
skips present samples and a finished training run with the same config is reused (``--fresh`` starts over).
Ctrl-C stops cleanly at any stage (exit code 130).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .mini.data import SHAPE_COLORS, ClipSpec, attribute_combos, clip_spec
from .mini.family import GUIDANCE, VIDEO, MiniFamily, load_family, prompt_checks, reference_video
from .sampling import ACCVIDEO_STUDENT, HUNYUAN_TEACHER, FlowPreset
from .synvid.format import SynVidError, file_sha256
from .train.config import ConfigError, config_from_dict
from .train.probe import probe
from .utils.io import write_bytes, write_json

TEACHER, STUDENT = HUNYUAN_TEACHER, ACCVIDEO_STUDENT  # the two sampling recipes every model here runs at
# the evaluated models: key -> (label, recipe); "teacher" (the full recipe) is the reference of every error
MODELS = {
    "teacher": (f"teacher {TEACHER.steps} steps", TEACHER),
    "teacher_few_steps": (f"teacher {STUDENT.steps} steps", STUDENT),
    "student_trajectory": (f"student {STUDENT.steps} (traj only)", STUDENT),
    "student_accvideo": (f"AccVideo student {STUDENT.steps}", STUDENT),
}
# the models whose fakes the discriminator probe trains fresh heads on: key -> label
PROBED = {"teacher_few_steps": f"teacher-{STUDENT.steps}'s chain", "student_accvideo": "AccVideo student's chain"}


@dataclass
class DemoConfig:
    """Sizes of the run. Defaults fit in ~10 minutes on an idle 2-core CPU."""

    synvid_samples: int = 112     # teacher trajectories (one per training prompt, seed 1000 + i)
    val_samples: int = 16         # of them held out of training: validation and the discriminator's accuracy
    train_steps: int = 60         # trainer iterations per run (both ablation arms)
    batch: int = 8                # trainer total batch
    lr: float = 3e-5              # student (AdamW); the paper's 5e-6 is for the 13B model; docs/demo.md: why 3e-5
    head_lr: float = 3e-4         # discriminator heads (AdamW, beta1 0.5); docs/demo.md: why not the student's
    head_steps: int = 4           # head updates per student update (loss.head_steps; Alg. 1 has 1)
    heads_only_steps: int = 40    # AccVideo run: iterations training only the heads, before its train_steps (Alg. 1: 0)
    segment_updates: str = "sequential"  # optim.segment_updates: one student update per segment (Alg. 1) or "joint"
    guidance: float = GUIDANCE    # embedded guidance of both recipes (the miniature's 4; HunyuanVideo's is 6)
    lambda_adv: float = 0.1       # the paper's value
    head_width: int = 64
    probe_updates: int = 240      # fresh-head updates per key timestep of the discriminator probe (0: no probe)
    heldout_prompts: int = 6      # distinct held-out prompts
    seeds_per_prompt: int = 2     # evaluation videos per prompt
    shown: int = 4                # prompts in the side-by-side video
    threads: int = 0              # 0 = auto (2 threads, or 1 when the machine is already loaded)
    seed: int = 0


def say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def auto_threads() -> int:
    """Two OpenMP threads on an idle 2-core machine; one when other work already keeps the cores busy (two
    contending OpenMP threads then run several times slower than one)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if load > cores - 0.5 else min(2, cores)


def training_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions of the training split (the teacher's own distribution)."""
    seen: list[str] = []
    i = 0
    while len(seen) < n and i < 50 * n:
        cap = clip_spec(i, seed=seed, split="train").caption()
        if cap not in seen:
            seen.append(cap)
        i += 1
    return seen


def heldout_prompts(n: int) -> list[str]:
    """``n`` held-out captions spread over colours, shapes and directions (fixed order): each new one has a shape
    colour not chosen yet (while there are) and a shape and direction unlike the previous two's."""
    combos = list(attribute_combos("heldout"))
    chosen: list[tuple] = []

    def new_colour(c: tuple) -> bool:
        colours = {o[1] for o in chosen}
        return c[1] not in colours or len(colours) == len(SHAPE_COLORS)

    def new_motion(c: tuple) -> bool:
        return not any(c[0] == o[0] or c[2] == o[2] for o in chosen[-2:])

    tests = (lambda c: new_colour(c) and new_motion(c), new_colour, lambda c: True)  # strictest first
    while len(chosen) < min(n, len(combos)):
        chosen.append(next(c for test in tests for c in combos if c not in chosen and test(c)))
    return [ClipSpec(s, col, bg, d, 0.15, (0.5, 0.5), 0.4).caption() for s, col, d, bg in chosen]


def text_embeddings(family: MiniFamily, prompts: list[str]) -> dict:
    """The prompts' text encodings in the dumper's embeddings layout (``synvid.dump.load_embeddings``)."""
    text = family.encode(prompts)
    return {"text_states": text.states, "text_mask": text.mask, "pooled": text.pooled, "prompts": list(prompts)}


def train_config(cfg: DemoConfig, family: MiniFamily, synvid: Path, out_dir: Path, adversarial: bool) -> dict:
    """Both ablation arms make ``train_steps`` student updates; the adversarial one first trains its heads alone
    for ``heads_only_steps`` iterations (docs/training.md: at k = 1-4 they cannot catch up with a moving student)."""
    heads_only = cfg.heads_only_steps if adversarial else 0
    return {
        "model": {"teacher": str(family.paths["teacher"]), "gradient_checkpointing": False},
        "data": {"root": str(synvid), "val_samples": cfg.val_samples},
        "optim": {"steps": cfg.train_steps + heads_only, "total_batch": cfg.batch, "micro_batch": cfg.batch,
                  "lr": cfg.lr, "head_lr": cfg.head_lr, "head_betas": [0.5, 0.999], "seed": cfg.seed,
                  "warmup_steps": 0, "segment_updates": cfg.segment_updates},
        "loss": {"adversarial": adversarial, "lambda_adv": cfg.lambda_adv, "head_width": cfg.head_width,
                 "head_groups": 8, "head_steps": cfg.head_steps, "heads_only_steps": heads_only,
                 "queue_capacity": max(64, cfg.batch)},
        "runtime": {"device": "cpu", "precision": "fp32", "fsdp": "off"},
        "log": {"out_dir": str(out_dir), "log_every": 5, "val_every": 0, "ckpt_every": 0, "save_dtype": "fp32",
                "plot": True},
    }


def run_training(config: dict, run_dir: Path, fresh: bool) -> tuple[Path, bool]:
    """The distillation trainer (``Trainer``, as ``python -m accvideo_core.train --config`` runs it) on ``config``;
    reuses a finished run with the same config. Returns (student checkpoint, whether it was reused)."""
    from .train.loop import Interrupted, Trainer

    student = run_dir / "student.safetensors"
    cfg = config_from_dict(json.loads(json.dumps(config)))
    wanted = json.loads(json.dumps(cfg.to_dict()))
    done = run_dir / "demo_done.json"
    finished = _finished_config(done)
    if not fresh and student.is_file() and finished is not None and _portable(finished) == _portable(wanted):
        say(f"reusing the finished training run in {run_dir} (--fresh retrains)")
        return student, True
    if run_dir.exists():
        shutil.rmtree(run_dir)
    say(f"training into {run_dir} (its config: {run_dir / 'config.json'})")
    trainer = Trainer(cfg)
    try:
        trainer.run()
    except Interrupted as err:
        raise KeyboardInterrupt from err
    finally:
        trainer.close()
    write_json(wanted, done)
    return student, False


def _finished_config(done: Path) -> dict | None:
    """The config a finished run recorded, resolved like a new one: a field added to the trainer since then reads
    as its default (the run stays reusable unless the new field's value changes); ``None`` if none or unreadable."""
    try:
        return json.loads(json.dumps(config_from_dict(json.loads(done.read_text())).to_dict()))
    except (OSError, ValueError, ConfigError):
        return None


def _portable(config: dict) -> dict:
    """``config`` with the demo folder it was written for (its ``log.out_dir``'s parent) spelt ``<out>``: a run
    folder copied or moved with its demo folder stays reusable."""
    base = str(Path(config["log"]["out_dir"]).parent)

    def swap(value):
        return "<out>" + value[len(base):] if isinstance(value, str) and value.startswith(base) else value

    return {section: {k: swap(v) for k, v in values.items()} for section, values in config.items()}


CHANCE_LOSS = 2 * math.log(2)  # the non-saturating discriminator loss of a head that cannot tell real from fake


def discriminator_summary(run_dir: Path, segments: int) -> dict:
    """The adversarial run's discriminator, from its ``metrics.jsonl``: its loss at the start and end of the run
    (mean of the first 5 / last 10 iterations, overall and per key timestep k) and over the last 10 heads-only
    iterations, against chance, and the real/fake accuracy of every head on the held-out samples before training,
    when the heads-only iterations end (the student still the teacher) and at the end (``Trainer.validate``)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r.get("type") == "train" and "adv_d" in r]
    heads_only = [r for r in train if r.get("heads_only")]
    val = [r for r in rows if r.get("type") == "val" and "d_acc" in r]
    val_heads_only = [r for r in val if heads_only and r["step"] == heads_only[-1]["step"]]

    def mean(records: list[dict], key: str) -> float | None:
        values = [r[key] for r in records if key in r]
        return sum(values) / len(values) if values else None

    keys = ["adv_d"] + [f"adv_d_k{k}" for k in range(segments)]
    return {
        "chance_loss": CHANCE_LOSS,
        "loss_first5": {key: mean(train[:5], key) for key in keys},
        "loss_last10": {key: mean(train[-10:], key) for key in keys},
        "loss_heads_only_last10": {key: mean(heads_only[-10:], key) for key in keys} if heads_only else {},
        "heads_only_steps": len(heads_only),
        "heldout_accuracy_start": {k: val[0][f"d_acc_k{k}"] for k in range(segments)} if val else {},
        "heldout_accuracy_heads_only": ({k: val_heads_only[0][f"d_acc_k{k}"] for k in range(segments)}
                                        if val_heads_only else {}),
        "heldout_accuracy_end": {k: val[-1][f"d_acc_k{k}"] for k in range(segments)} if val else {},
    }


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) / 2).square().mean())  # [-1, 1] -> [0, 1] pixel units
    return 99.0 if mse == 0 else -10 * math.log10(mse)


def evaluate(family: MiniFamily, models: dict[str, tuple[torch.nn.Module, FlowPreset]], prompts: list[str],
             seeds: list[int], progress: Callable[[str], None] = say) -> dict:
    """Generate every (prompt, seed) with every model at its recipe, interleaved so the timings share the
    machine's load.

    Returns per model: median seconds per video (text, sampling, decode, total), latent MSE and pixel PSNR to the
    ``"teacher"`` model's videos (the full teacher recipe), prompt checks, plus the videos themselves
    (``[N, 3, F, H, W]``)."""
    jobs = [(p, s) for p in prompts for s in seeds]
    stats = {name: {"text": [], "sampling": [], "decode": [], "latents": [], "videos": []} for name in models}
    names = list(models)
    for j, (prompt, seed) in enumerate(jobs):
        for name in names[j % len(names):] + names[:j % len(names)]:  # rotate the order: no model always first
            model, recipe = models[name]
            t0 = time.perf_counter()
            text = family.encode([prompt])
            t1 = time.perf_counter()
            lat = family.sample(model, text, family.noise([seed]), recipe.steps, shift=recipe.shift,
                                guidance=recipe.guidance)
            t2 = time.perf_counter()
            video = family.decode(lat)
            t3 = time.perf_counter()
            st = stats[name]
            st["text"].append(t1 - t0)
            st["sampling"].append(t2 - t1)
            st["decode"].append(t3 - t2)
            st["latents"].append(lat)
            st["videos"].append(video)
        progress(f"evaluation {j + 1}/{len(jobs)}: {prompt!r} seed {seed}")
    ref_lat = torch.cat(stats["teacher"]["latents"])
    ref_vid = torch.cat(stats["teacher"]["videos"])
    result = {}
    for name, st in stats.items():
        lat, vid = torch.cat(st["latents"]), torch.cat(st["videos"])
        n = len(jobs)
        per = {k: statistics.median(st[k]) for k in ("text", "sampling", "decode")}
        per["total"] = statistics.median([a + b + c for a, b, c in zip(st["text"], st["sampling"], st["decode"])])
        checks = [prompt_checks(vid[i], prompt) for i, (prompt, _) in enumerate(jobs)]
        colour_ok, motion_ok, shape_ok = (sum(column) for column in zip(*checks))
        result[name] = {
            "steps": models[name][1].steps, "seconds_per_video": per,
            "latent_mse_to_teacher": float((lat - ref_lat).square().mean()),
            "psnr_db_to_teacher": _psnr(vid, ref_vid) if name != "teacher" else None,
            "prompt_colour_match": colour_ok / n, "prompt_motion_match": motion_ok / n,
            "prompt_shape_match": shape_ok / n,
            "videos": vid}
    return result


def _frame_grid(columns: list[torch.Tensor], labels: list[str], scale: int = 2):
    """Frames (PIL images) of a grid: one column per model, one row per video; labels on top."""
    from PIL import Image, ImageDraw

    rows, frames, h, w = columns[0].shape[0], columns[0].shape[2], columns[0].shape[3], columns[0].shape[4]
    cell_w, cell_h, pad, top = w * scale, h * scale, 4, 14
    width = len(columns) * (cell_w + pad) + pad
    height = top + rows * (cell_h + pad) + pad
    out = []
    for f in range(frames):
        img = Image.new("RGB", (width, height), (24, 24, 24))
        draw = ImageDraw.Draw(img)
        for c, (vids, label) in enumerate(zip(columns, labels)):
            x = pad + c * (cell_w + pad)
            draw.text((x + 2, 2), label, fill=(230, 230, 230))
            for r in range(rows):
                arr = ((vids[r, :, f].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                cell = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
                img.paste(cell, (x, top + pad + r * (cell_h + pad)))
        out.append(img)
    return out


def write_side_by_side(result: dict, rows: list[int], out: Path, *, references: torch.Tensor | None = None,
                       fps: int = 8) -> tuple[Path, Path]:
    """``side_by_side.mp4`` (H.264) and ``side_by_side.gif`` of the chosen evaluation videos; ``references``
    (``[len(rows), 3, F, H, W]``, the renderer's version of each prompt) becomes the first column."""
    import numpy as np

    from .video import write_mp4

    names = list(result)
    columns, labels = [result[n]["videos"][rows] for n in names], [MODELS[n][0] for n in names]
    if references is not None:
        columns, labels = [references, *columns], ["prompt (renderer)", *labels]
    frames = _frame_grid(columns, labels)
    gif = out / "side_by_side.gif"
    tmp = gif.with_suffix(".tmp.gif")
    from PIL import Image

    small = [f.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE) for f in frames]
    small[0].save(tmp, save_all=True, append_images=small[1:], duration=int(1000 / fps), loop=0, optimize=True)
    os.replace(tmp, gif)
    stack = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).float() / 255.0
    mp4 = write_mp4(stack, out / "side_by_side.mp4", fps=fps, metadata={"comment": "AccVideo miniature demo"})
    return mp4, gif


def markdown_report(report: dict) -> str:
    r = report["results"]
    full, few = f"teacher-{TEACHER.steps}", f"teacher-{STUDENT.steps}"
    lines = ["# AccVideo miniature demo: report", "",
             f"Held-out prompts: {len(report['prompts'])} x {report['seeds_per_prompt']} seeds "
             f"({report['videos']} videos per model, {VIDEO.frames} frames x {VIDEO.height} x {VIDEO.width}), CPU "
             f"threads {report['threads']}. Every model samples with shift {TEACHER.shift:g} and embedded guidance "
             f"{report['config']['guidance']:g}. Times are median wall seconds per video, measured interleaved "
             "(rotating order) in one run.", "",
             f"| model | steps | text (s) | sampling (s) | VAE decode (s) | total (s) | speedup vs {full} | "
             f"latent MSE to {full} | PSNR to {full} (dB) | colour ok | motion ok | shape ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = r["teacher"]["seconds_per_video"]["total"]
    for name, v in r.items():
        s = v["seconds_per_video"]
        psnr = "-" if v["psnr_db_to_teacher"] is None else f"{v['psnr_db_to_teacher']:.2f}"
        lines.append(f"| {MODELS[name][0]} | {v['steps']} | {s['text']:.4f} | {s['sampling']:.3f} | "
                     f"{s['decode']:.3f} | {s['total']:.3f} | {base / s['total']:.2f}x | "
                     f"{v['latent_mse_to_teacher']:.4f} | {psnr} | {v['prompt_colour_match']:.0%} | "
                     f"{v['prompt_motion_match']:.0%} | {v['prompt_shape_match']:.0%} |")
    a, heads_only = report["ablation"], report["discriminator"].get("heads_only_steps")
    lines += ["", "## Findings", "",
              f"- End-to-end speedup of the {STUDENT.steps}-step student over {full} (text + sampling + decode): "
              f"**{report['speedup_end_to_end']:.2f}x**; sampling alone {report['speedup_sampling']:.2f}x "
              f"(the limit is {TEACHER.steps / STUDENT.steps:g}x: {TEACHER.steps} vs {STUDENT.steps} model calls). "
              "Text encoding and VAE decoding are the same work for every model and cap the end-to-end figure.",
              f"- Error to {full} (latent MSE): {few} {r['teacher_few_steps']['latent_mse_to_teacher']:.4f}, "
              f"AccVideo student-{STUDENT.steps} {r['student_accvideo']['latent_mse_to_teacher']:.4f} "
              f"({report['student_vs_teacher_few_steps']:.2f}x of {few}'s error).",
              f"- Ablation (same {a['train_steps']} student iterations x batch {a['batch']}"
              + (f"; the adversarial run first trains its heads alone for {heads_only} iterations"
                 if heads_only else "") + "): trajectory loss only "
              f"{a['traj_only_mse']:.4f}, trajectory + adversarial {a['traj_adv_mse']:.4f} (latent MSE to "
              f"{full} on held-out prompts). One seed: seed noise is of the same order as this difference "
              "(`--seeds 0-4` measures it over seeds).",
              *discriminator_lines(report["discriminator"]),
              "", "## Pipeline timings", ""]
    for stage, sec in report["stage_seconds"].items():
        lines.append(f"- {stage}: {sec:.1f} s")
    lines += ["", "Side-by-side video: `side_by_side.mp4` / `side_by_side.gif` (columns: the prompt as the data "
              "set's renderer draws it (not a model output), " + ", ".join(MODELS[n][0] for n in r) + ").", ""]
    return "\n".join(lines)


def discriminator_lines(d: dict) -> list[str]:
    """The report's discriminator section (see :func:`discriminator_summary`)."""
    first, last = d["loss_first5"], d["loss_last10"]
    if last["adv_d"] is None:
        return []
    ks = sorted(d["heldout_accuracy_end"], key=int)
    h, heads = d.get("heads_only_steps", 0), d.get("loss_heads_only_last10") or {}
    lines = ["", "## Discriminator (trajectory + adversarial run)", "",
             f"Loss of the heads (non-saturating; chance = 2 ln 2 = {d['chance_loss']:.3f}): "
             f"{first['adv_d']:.3f} over the first 5 iterations, "
             + (f"**{heads['adv_d']:.3f}** over the last 10 of the {h} heads-only iterations (the student frozen "
                "at the teacher's weights, its fakes teacher-5's chain), " if heads else "")
             + f"**{last['adv_d']:.3f}** over the last 10. Real/fake accuracy on the held-out samples (real: their "
             "teacher key latents; fake: the student's own chain from fresh noise, same prompts; chance 50 %):", ""]
    columns = [("loss, first 5", lambda k: f"{first[f'adv_d_k{k}']:.3f}")]
    columns += [("loss, last 10 heads-only", lambda k: f"{heads[f'adv_d_k{k}']:.3f}")] if heads else []
    columns += [("loss, last 10", lambda k: f"{last[f'adv_d_k{k}']:.3f}"),
                ("held-out accuracy before training", lambda k: f"{d['heldout_accuracy_start'][k]:.0%}")]
    columns += ([("after the heads-only iterations", lambda k: f"**{d['heldout_accuracy_heads_only'][k]:.0%}**")]
                if heads else [])
    columns += [("at the end", lambda k: f"**{d['heldout_accuracy_end'][k]:.0%}**")]
    lines += ["| key timestep k | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(cell(k) for _, cell in columns) + " |" for k in ks]
    if d.get("probe"):
        probed = d["probe"]
        lines += ["", "Is anything left to see? Fresh heads of the same kind trained offline on *fixed* fakes "
                  "(`accvideo_core.train.probe`: trained on 65 % of the SynVid's samples, accuracy on the rest). "
                  "Where they separate teacher-5's chain but not the student's, the student has removed the "
                  "difference and a head at chance there is the equilibrium, not a failure to learn:", "",
                  "| key timestep k | " + " | ".join(PROBED[n] for n in probed) + " |",
                  "|---|" + "---|" * len(probed)]
        for k in ks:
            lines.append(f"| {k} | " + " | ".join(f"{probed[n][int(k)]:.0%}" for n in probed) + " |")
    return lines


def require_pillow() -> None:
    """Stop before any work when Pillow (the side-by-side GIF's encoder) is missing, saying how to get it."""
    if importlib.util.find_spec("PIL") is None:
        raise ModuleNotFoundError("the demo writes its side-by-side GIF with Pillow, which is not installed: "
                                  "pip install Pillow (make demo installs it with requirements-test.txt)")


def prepare_folder(out: Path, family: MiniFamily, fresh: bool) -> None:
    """Start over (drop the SynVid and the training runs) when asked or when the family changed since the last
    run in ``out``; record the family's file hashes."""
    fingerprint = {name: file_sha256(path) for name, path in family.paths.items()}
    previous = out / "family.json"
    earlier = json.loads(previous.read_text()) if previous.is_file() else None
    changed = earlier != fingerprint and any((out / sub).exists() for sub in ("synvid", "train_traj"))
    if changed and not fresh:
        say("the miniature family changed since the last run in this folder (or that run did not record it): "
            "starting over")
    if fresh or changed:
        for sub in ("synvid", "train_traj", "train_adv"):
            shutil.rmtree(out / sub, ignore_errors=True)
    write_json(fingerprint, previous)


def dump_teacher_trajectories(cfg: DemoConfig, family: MiniFamily, out: Path) -> str:
    """The teacher's SynVid (``dump_synvid``, the dumper CLI's code path); returns the stage's label."""
    from .synvid.dump import dump_synvid

    prompts = training_prompts(cfg.synvid_samples, cfg.seed)
    teacher_file = family.paths["teacher"]
    say(f"[2/4] SynVid dump: {cfg.synvid_samples} teacher trajectories, {TEACHER.steps} steps, shift "
        f"{TEACHER.shift:g}, guidance {cfg.guidance:g} -> {out / 'synvid'}")
    t0 = time.perf_counter()
    dump_synvid(family.teacher, text_embeddings(family, prompts), out / "synvid", num=cfg.synvid_samples,
                seed=1000, frames=VIDEO.frames, height=VIDEO.height, width=VIDEO.width, steps=TEACHER.steps,
                shift=TEACHER.shift, guidance=cfg.guidance, segments=STUDENT.steps, dtype="float32",
                batch_size=8, source_model=teacher_file.name, source_model_hash=file_sha256(teacher_file),
                progress=say)
    reused = time.perf_counter() - t0 < 1 and (out / "synvid" / "manifest.json").is_file()
    return f"SynVid dump (teacher, {TEACHER.steps} steps)" + (" - samples already present" if reused else "")


def evaluate_and_report(cfg: DemoConfig, family: MiniFamily, students: dict[str, Path], out: Path,
                        threads: int, stage: dict[str, float]) -> dict:
    """Held-out evaluation of every model, the side-by-side videos and the report dict."""
    from .models.loading import load_transformer

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    loaded = {"teacher": family.teacher, "teacher_few_steps": family.teacher,
              "student_trajectory": load_transformer(students["traj"], dtype=torch.float32).eval(),
              "student_accvideo": load_transformer(students["adv"], dtype=torch.float32).eval()}
    models = {name: (loaded[name], replace(recipe, guidance=cfg.guidance)) for name, (_, recipe) in MODELS.items()}
    held = heldout_prompts(cfg.heldout_prompts)
    seeds = [cfg.seed * 1000 + 7 + i for i in range(cfg.seeds_per_prompt)]
    say(f"[4/4] held-out evaluation: {len(held)} prompts x {len(seeds)} seeds x {len(models)} models")
    result = evaluate(family, models, held, seeds)
    stage["held-out evaluation (all models)"] = time.perf_counter() - t0
    probed = {}
    if cfg.probe_updates > 0:
        t0 = time.perf_counter()
        say("[4/4] discriminator probe: fresh heads on fixed fakes of teacher-5 and of the AccVideo student")
        probed = probe(family.teacher, {name: loaded[name] for name in PROBED}, out / "synvid",
                       segments=STUDENT.steps, updates=cfg.probe_updates, seed=cfg.seed)
        stage["discriminator probe (fresh heads, fixed fakes)"] = time.perf_counter() - t0
    rows = [i * len(seeds) for i in range(min(cfg.shown, len(held)))]
    references = torch.stack([reference_video(held[i]) for i in range(len(rows))])
    mp4, gif = write_side_by_side(result, rows, out, references=references)
    full, student = result["teacher"]["seconds_per_video"], result["student_accvideo"]["seconds_per_video"]
    mse = {name: r["latent_mse_to_teacher"] for name, r in result.items()}
    return {
        "config": asdict(cfg), "threads": threads, "prompts": held, "seeds_per_prompt": len(seeds),
        "videos": len(held) * len(seeds),
        "results": {n: {k: v for k, v in r.items() if k != "videos"} for n, r in result.items()},
        "speedup_end_to_end": full["total"] / student["total"],
        "speedup_sampling": full["sampling"] / student["sampling"],
        "student_vs_teacher_few_steps": mse["student_accvideo"] / mse["teacher_few_steps"],
        "ablation": {"train_steps": cfg.train_steps, "batch": cfg.batch, "traj_only_mse": mse["student_trajectory"],
                     "traj_adv_mse": mse["student_accvideo"]},
        "discriminator": {**discriminator_summary(out / "train_adv", STUDENT.steps), "probe": probed},
        "stage_seconds": stage,
        "files": {"mp4": str(mp4), "gif": str(gif), "synvid": str(out / "synvid"),
                  "students": {k: str(v) for k, v in students.items()}},
    }


def run_demo(cfg: DemoConfig, out: Path, *, fresh: bool = False, assets: str | None = None) -> dict:
    """The whole demo; returns the report dict (also written as JSON and markdown under ``out``)."""
    require_pillow()
    threads = cfg.threads or auto_threads()
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    stage: dict[str, float] = {}
    t_all = t0 = time.perf_counter()
    family = load_family(assets)
    prepare_folder(out, family, fresh)
    stage["load family"] = time.perf_counter() - t0
    say(f"[1/4] family loaded ({threads} CPU threads)")

    arms = {"traj": False, "adv": True}  # run name -> adversarial
    configs = {name: train_config(cfg, family, out / "synvid", out / f"train_{name}", adversarial)
               for name, adversarial in arms.items()}
    for config in configs.values():  # a bad trainer option (e.g. --segment-updates) fails before any work
        config_from_dict(json.loads(json.dumps(config)))

    t0 = time.perf_counter()
    label = dump_teacher_trajectories(cfg, family, out)
    stage[label] = time.perf_counter() - t0

    students = {}
    for name, adversarial in arms.items():
        t0 = time.perf_counter()
        say(f"[3/4] distilling a {STUDENT.steps}-step student: trajectory loss"
            f"{' + adversarial' if adversarial else ' only'}")
        run_dir = out / f"train_{name}"
        students[name], reused = run_training(configs[name], run_dir, fresh)
        label = f"training ({'trajectory + adversarial' if adversarial else 'trajectory only'})"
        stage[label + (" - reused a finished run" if reused else "")] = time.perf_counter() - t0

    report = evaluate_and_report(cfg, family, students, out, threads, stage)
    report["total_seconds"] = time.perf_counter() - t_all
    write_json(report, out / "report.json")
    write_bytes(markdown_report(report).encode(), out / "report.md")
    return report


def parse_seeds(text: str) -> list[int]:
    """``"0-4"`` or ``"0,3,7"`` (or a mix, ``"0-2,9"``) -> the seeds, in order, each once."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            seeds += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ValueError(f"--seeds {text!r}: expected a range such as 0-4 or a list such as 0,1,2") from None
    if not seeds:
        raise ValueError(f"--seeds {text!r} names no seed")
    return list(dict.fromkeys(seeds))


def t_quantile(p: float, df: int) -> float:
    """Quantile ``p`` (> 0.5) of Student's t distribution with ``df`` degrees of freedom: bisection on its CDF,
    the density integrated by Simpson's rule (no SciPy in the core's dependencies)."""
    const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, n: int = 4000) -> float:
        h = x / n
        f = [math.exp(const - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean and the two-sided t-interval of the mean (``level``) of independent replicates."""
    n, mean = len(values), statistics.fmean(values)
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.inf
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half}


def run_seeds(cfg: DemoConfig, seeds: list[int], out: Path, *, fresh: bool = False,
              assets: str | None = None) -> dict:
    """The whole demo once per seed (other training prompts, trainer seed and held-out noise; ``out/seed_S``),
    then the ablation over seeds: per seed and as mean with its 95 % t-interval, the paired difference included
    (``out/report.json``, ``out/report.md``)."""
    rows = []
    for i, seed in enumerate(seeds):
        say(f"=== seed {seed} ({i + 1} of {len(seeds)}) ===")
        rep = run_demo(replace(cfg, seed=seed), out / f"seed_{seed}", fresh=fresh, assets=assets)
        mse = {name: r["latent_mse_to_teacher"] for name, r in rep["results"].items()}
        d = rep["discriminator"]
        rows.append({"seed": seed, "teacher_few_steps": mse["teacher_few_steps"],
                     "traj_only": mse["student_trajectory"], "traj_adv": mse["student_accvideo"],
                     "adv_minus_traj": mse["student_accvideo"] - mse["student_trajectory"],
                     "traj_adv_vs_teacher_few_steps": mse["student_accvideo"] / mse["teacher_few_steps"],
                     "traj_only_vs_teacher_few_steps": mse["student_trajectory"] / mse["teacher_few_steps"],
                     "d_loss_last10": d["loss_last10"]["adv_d"],
                     "d_heldout_accuracy_heads_only": d["heldout_accuracy_heads_only"],
                     "d_heldout_accuracy_end": d["heldout_accuracy_end"], "probe": d["probe"],
                     "seconds": rep["total_seconds"]})
    keys = ("teacher_few_steps", "traj_only", "traj_adv", "adv_minus_traj", "traj_only_vs_teacher_few_steps",
            "traj_adv_vs_teacher_few_steps", "d_loss_last10")
    summary = {"config": asdict(cfg), "seeds": seeds, "per_seed": rows,
               "intervals_95": {key: mean_interval([r[key] for r in rows]) for key in keys},
               "adv_better_seeds": sum(r["adv_minus_traj"] < 0 for r in rows),
               "students_within_half_of_teacher_few_steps": sum(
                   max(r["traj_only_vs_teacher_few_steps"], r["traj_adv_vs_teacher_few_steps"]) <= 0.5 for r in rows)}
    write_json(summary, out / "report.json")
    write_bytes(seeds_markdown(summary).encode(), out / "report.md")
    return summary


def seeds_markdown(summary: dict) -> str:
    rows, iv = summary["per_seed"], summary["intervals_95"]
    few, full = f"teacher-{STUDENT.steps}", f"teacher-{TEACHER.steps}"
    lines = ["# AccVideo miniature demo over seeds: report", "",
             f"Seeds {summary['seeds']} (per seed: other training prompts, trainer seed and held-out noise; each "
             "seed's own report is in `seed_S/`). Latent MSE to " + full + " on the held-out prompts; "
             f"discriminator: loss over the last 10 iterations (chance {CHANCE_LOSS:.3f}) and held-out real/fake "
             "accuracy per key timestep k = 0..4 when its heads-only iterations end (the student still the teacher) "
             "and at the end; fresh heads on fixed fakes (the probe of each seed's report): their mean held-out "
             f"accuracy over k = 1..4 on {few}'s chain and on the AccVideo student's.",
             "", f"| seed | {few} | trajectory only | trajectory + adversarial | adv - traj | AccVideo / {few} | "
             f"D loss | D accuracy k=0..4, heads only | at the end | fresh heads k=1..4: {few} / AccVideo |",
             "|---" * 10 + "|"]

    def accuracies(acc: dict) -> str:
        return " / ".join(f"{acc[k]:.0%}" for k in sorted(acc, key=int)) or "-"

    for r in rows:
        fresh = " / ".join(f"{statistics.mean(r['probe'][n][1:]):.0%}" for n in PROBED) if r["probe"] else "-"
        lines.append(f"| {r['seed']} | {r['teacher_few_steps']:.4f} | {r['traj_only']:.4f} | {r['traj_adv']:.4f} | "
                     f"{r['adv_minus_traj']:+.4f} | {r['traj_adv_vs_teacher_few_steps']:.2f}x | "
                     f"{r['d_loss_last10']:.3f} | {accuracies(r['d_heldout_accuracy_heads_only'])} | "
                     f"{accuracies(r['d_heldout_accuracy_end'])} | {fresh} |")
    lines += ["", "| quantity | mean | 95 % t-interval |", "|---|---|---|"]
    names = {"teacher_few_steps": few, "traj_only": "trajectory only", "traj_adv": "trajectory + adversarial",
             "adv_minus_traj": "paired difference adv - traj", "traj_only_vs_teacher_few_steps":
             f"trajectory only / {few}", "traj_adv_vs_teacher_few_steps": f"AccVideo / {few}",
             "d_loss_last10": "discriminator loss, last 10 iterations"}
    for key, label in names.items():
        v = iv[key]
        lines.append(f"| {label} | {v['mean']:+.4f} | [{v['low']:+.4f}, {v['high']:+.4f}] |")
    diff = iv["adv_minus_traj"]
    verdict = ("the adversarial term lowers the error" if diff["high"] < 0 else
               "the adversarial term raises the error" if diff["low"] > 0 else
               "the interval of the paired difference contains 0: no effect of the adversarial term is resolved")
    lines += ["", f"Adversarial arm better on {summary['adv_better_seeds']} of {len(rows)} seeds; {verdict} at this "
              f"budget. Both students within 0.5x of {few}'s error on "
              f"{summary['students_within_half_of_teacher_few_steps']} of {len(rows)} seeds.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo, git-ignored)")
    p.add_argument("--assets", help="folder with the mini family (default: the shipped assets/mini)")
    p.add_argument("--fresh", action="store_true", help="rebuild the SynVid and retrain instead of continuing")
    p.add_argument("--seeds", help="e.g. 0-4: the whole demo once per seed (OUT/seed_S) and the ablation over "
                   "seeds with 95 %% intervals in OUT/report.md (about 5 minutes per seed on 2 idle cores)")
    for f, default in asdict(DemoConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=type(default), default=default)
    args = vars(p.parse_args(argv))
    out, assets, fresh, seeds = Path(args.pop("out")), args.pop("assets"), args.pop("fresh"), args.pop("seeds")
    cfg = DemoConfig(**args)
    try:
        if seeds:
            run_seeds(cfg, parse_seeds(seeds), out, fresh=fresh, assets=assets)
            print((out / "report.md").read_text())
            return 0
        report = run_demo(cfg, out, fresh=fresh, assets=assets)
    except KeyboardInterrupt:
        say("interrupted; run the same command again to continue (the SynVid and finished runs are kept)")
        return 130
    except (FileNotFoundError, ModuleNotFoundError, SynVidError, ConfigError, ValueError) as err:
        say(f"error: {err}")
        return 2
    say(f"done in {report['total_seconds']:.0f} s: {out / 'report.md'}, {report['files']['mp4']}, "
        f"{report['files']['gif']}")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
