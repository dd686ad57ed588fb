"""AccVideo trainer on a tiny random teacher: distillation quality on held-out noise, adversarial wiring,
resume bit-exactness, corrupt-sample skipping, Ctrl-C checkpointing, and 2-process torchrun + FSDP2."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from accvideo_core.models.loading import load_transformer, save_transformer
from accvideo_core.synvid.dump import dump_synvid
from accvideo_core.testing import tiny_transformer
from accvideo_core.train.config import ConfigError, TrainConfig, config_from_dict, load_config
from accvideo_core.train.checkpoint import checkpoint_tensors
from accvideo_core.train.loop import Trainer
from accvideo_core.utils.io import read_state_dict
from tests.integration.comfy_probe import run_probe

ROOT = Path(__file__).resolve().parents[1]
TEACHER_SEED = 0


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synvid(tmp_path_factory) -> Path:
    """12 teacher trajectories (4 prompts x 3 seeds), 50 steps, 5 frames at 32x48; the last 4 are held out."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synvid")
    g = torch.Generator().manual_seed(1)
    emb = {"text_states": torch.randn(4, 7, 40, generator=g), "text_mask": torch.ones(4, 7, dtype=torch.long),
           "pooled": torch.randn(4, 24, generator=g), "prompts": [f"prompt {i}" for i in range(4)]}
    emb["text_mask"][:, 5:] = 0
    save_transformer(tiny_transformer(seed=TEACHER_SEED), root / "teacher.safetensors")
    dump_synvid(tiny_transformer(seed=TEACHER_SEED), emb, root / "data", num=12, frames=5, height=32, width=48,
                dtype="float32", batch_size=4, source_model="tiny", progress=lambda msg: None)
    return root


def make_cfg(synvid: Path, out: Path, **sections) -> TrainConfig:
    base = {
        "model": {"teacher": str(synvid / "teacher.safetensors"), "gradient_checkpointing": False},
        "data": {"root": str(synvid / "data"), "val_samples": 4},
        "optim": {"steps": 4, "total_batch": 2, "lr": 3e-4, "head_lr": 1e-3},
        "loss": {"head_width": 32, "head_groups": 8},
        "log": {"out_dir": str(out), "val_every": 0, "ckpt_every": 0, "save_dtype": "fp32", "plot": True},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return config_from_dict(base)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'lrr' in \\[optim\\]"):
        config_from_dict({"optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match="gan_loss = 'wgan'"):
        config_from_dict({"loss": {"gan_loss": "wgan"}})
    with pytest.raises(ConfigError, match="one layer per key timestep"):
        config_from_dict({"loss": {"feature_layers": [1, 2]}})
    with pytest.raises(ConfigError, match="log.ckpt_minutes must be >= 0"):
        config_from_dict({"log": {"ckpt_minutes": -1}})
    (tmp_path / "c.toml").write_text('[optim]\nsteps = 7\nbetas = [0.8, 0.9]\n[loss]\ngan_loss = "hinge"\n')
    cfg = load_config(tmp_path / "c.toml", ["optim.total_batch=8", "log.out_dir=/tmp/x"])
    assert (cfg.optim.steps, cfg.optim.betas, cfg.loss.gan_loss, cfg.optim.total_batch, cfg.log.out_dir) == (
        7, (0.8, 0.9), "hinge", 8, "/tmp/x")
    assert (cfg.loss.lambda_adv, cfg.optim.lr, cfg.optim.head_lr) == (0.1, 5e-6, 5e-6)  # paper defaults


def test_runtime_errors_exit_2_with_the_field_named(tmp_path, capsys):
    """runtime.fsdp = 'on' without torchrun was a ValueError traceback (exit 1), as was fsdp 'off' under torchrun."""
    from accvideo_core.train.__main__ import main

    (tmp_path / "c.json").write_text(json.dumps({"runtime": {"fsdp": "on"}, "model": {"teacher": "t.safetensors"},
                                                 "log": {"out_dir": str(tmp_path / "run")}}))
    assert main(["--config", str(tmp_path / "c.json")]) == 2
    assert "runtime.fsdp = 'on' needs torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_memory_estimate_of_the_13b_run():
    from accvideo_core.models.transformer_hunyuan_video import TransformerConfig
    from accvideo_core.train.estimate import estimate

    e = estimate(TransformerConfig(), frames=93, height=544, width=960, gpus=8)
    assert e.params == 12_821_012_544 and e.tokens == 24 * 34 * 60 + 256
    assert e.static["AdamW states"] == pytest.approx(8 * e.params / 8 / 1e9)
    assert 70 < e.peak < 76  # docs/training.md: ~73 GB per GPU without sequence parallelism
    # sequence parallelism: tests/test_sequence_parallel.py


def test_distillation_beats_teacher_few_steps_and_skips_corrupt_sample(synvid, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synvid / "data", data)
    bad = data / "samples" / "000002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-64])  # truncated training sample
    cfg = make_cfg(synvid, tmp_path / "run", data={"root": str(data)},
                   optim={"steps": 6, "total_batch": 2}, log={"val_every": 3})
    result = Trainer(cfg).run()
    # the corrupt file is reported by name and training went on
    assert any("000002.safetensors" in msg and "truncated or corrupt" in msg for msg in result["bad_samples"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    val = [r for r in rows if r["type"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("traj", "adv_g", "adv_d", "grad_norm", *(f"traj_k{k}" for k in range(5))):
        assert all(key in r and r[key] == r[key] for r in train), key
    assert (train[-1]["traj"] + train[-2]["traj"]) / 2 < 0.5 * train[0]["traj"], [r["traj"] for r in train]
    assert [r["step"] for r in val] == [0, 3, 6]
    assert val[0]["student_mse"] == pytest.approx(val[0]["teacher_mse"])  # student starts as the teacher
    # held-out noise: the student's 5-step latent is at least 2x closer to the teacher's 50-step latent than the
    # teacher's own 5-step latent
    assert result["val"]["student_mse"] <= 0.5 * result["val"]["teacher_mse"], result["val"]
    png = (tmp_path / "run" / "loss_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    # the exported student is an original-layout checkpoint our loader reads, different from the teacher
    student = load_transformer(tmp_path / "run" / "student.safetensors")
    teacher_sd = read_state_dict(synvid / "teacher.safetensors")
    assert set(student.state_dict()) == set(teacher_sd)
    assert all(any(k.startswith(p) for p in ("double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.",
                                            "vector_in.", "guidance_in.", "final_layer.")) for k in teacher_sd)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, teacher_sd[k])]
    assert len(changed) == len(teacher_sd)  # every parameter trains


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge"])
def test_adversarial_gradients_reach_heads_and_student_with_the_right_sign(synvid, tmp_path, kind):
    cfg = make_cfg(synvid, tmp_path / "run", loss={"gan_loss": kind})
    tr = Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED))
    from accvideo_core.train.batching import collate
    from accvideo_core.train.queues import TrajectoryQueues

    batch = {k: v for k, v in collate([tr.stream.next(), tr.stream.next()]).items()}
    k = tr.m - 1  # first segment: the fake comes from fresh noise (Q_m), so the fake input is reproducible

    def losses():
        tr.queues = TrajectoryQueues(tr.m, 8)
        return tr.adversarial_losses(batch, k)

    students = list(tr.student.parameters())
    heads = list(tr.heads[k].parameters())
    # discriminator loss: gradients on H_k only; a small descent step raises D(real) and lowers D(fake)
    out = losses()
    out["adv_d"].backward()
    assert all(p.grad is None for p in students)
    assert all(p.grad is not None for p in heads) and sum(p.grad.abs().sum() for p in heads) > 0
    assert all(p.grad is None for h in tr.heads[:k] for p in h.parameters())  # other heads untouched
    before_real, before_fake = float(out["d_real"]), float(out["d_fake"])
    with torch.no_grad():
        for p in heads:
            p -= 1e-3 * p.grad
            p.grad = None
    after = losses()
    assert float(after["d_real"]) - float(after["d_fake"]) > before_real - before_fake
    assert float(after["adv_d"].detach()) < float(out["adv_d"].detach())
    # generator loss: gradients on the student only (through the Euler step and the frozen teacher)
    out = losses()
    out["adv_g"].backward()
    assert all(p.grad is None for p in heads)
    assert all(p.grad is None for p in tr.teacher.parameters())
    grad_norm = sum(float(p.grad.abs().sum()) for p in students if p.grad is not None)
    assert grad_norm > 0
    before_fake = float(out["d_fake"])
    with torch.no_grad():
        for p in students:
            if p.grad is not None:
                p -= 1e-3 * p.grad / grad_norm ** 0.5
    assert float(losses()["d_fake"]) > before_fake  # the student moved its fakes towards "real"


@pytest.mark.parametrize("kind", ["nonsaturating", "hinge"])
def test_gan_losses_push_logits_the_right_way(kind):
    from accvideo_core.train.losses import discriminator_loss, generator_loss

    real = torch.linspace(-0.9, 0.9, 7, requires_grad=True)
    fake = torch.linspace(-0.9, 0.9, 7, requires_grad=True)
    discriminator_loss(real, fake, kind).backward()
    assert bool((real.grad < 0).all()) and bool((fake.grad > 0).all())  # D: real up, fake down
    fake.grad = None
    generator_loss(fake, kind).backward()
    assert bool((fake.grad < 0).all())  # G: fake up


def test_sample_stream_is_one_sequence_for_any_rank_count_and_reshards_at_any_position(synvid):
    """Rank r of W reads positions r, r + W, ... of one run-wide sequence of epoch permutations, so 7 samples
    over 3 ranks give the one-rank order across epoch boundaries (nothing dropped), and a stream saved after 3
    samples (not a multiple of the new rank count) or after 6 on 3 ranks continues exactly on 2 ranks."""
    from accvideo_core.synvid.format import SynVidDataset, key_steps_for
    from accvideo_core.train.batching import SampleStream

    ds = SynVidDataset(synvid / "data", steps=key_steps_for(50, 5))

    def streams(world: int) -> list[SampleStream]:
        return [SampleStream(ds, list(range(7)), rank=r, world=world, seed=3, on_error=None) for r in range(world)]

    def read(ranks: list[SampleStream], n: int) -> list[int]:  # the ranks read in lockstep, as in training
        return [int(ranks[i % len(ranks)].next()["uid"]) for i in range(n)]

    want = read(streams(1), 18)
    assert sorted(u % 7 for u in want[:7]) == list(range(7)) and want[7] >= 7  # epoch 0, then epoch 1
    assert read(streams(3), 18) == want
    for world, consumed in ((1, 3), (3, 6)):
        old = streams(world)
        assert read(old, consumed) == want[:consumed]
        two = streams(2)
        for stream in two:
            stream.load_resharded([s.state_dict() for s in old])
        assert read(two, 10) == want[consumed:consumed + 10], (world, consumed)
    # a checkpoint of the earlier per-epoch layout (epoch, cursor in the rank's shard): 8 samples on 2 ranks, 5 read
    # by each rank = epoch 1, cursor 1, continues where the run-wide sequence stands after 10 samples
    new, old = (SampleStream(ds, list(range(8)), rank=1, world=2, seed=3, on_error=None) for _ in range(2))
    read([new], 5)
    old.load_state_dict({"epoch": 1, "cursor": 1, "bad": []})
    assert read([old], 3) == read([new], 3)


def _states(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint of ``out`` (student, optimizer, EMA, heads; either format)."""
    return checkpoint_tensors(out / "checkpoints" / json.loads((out / "checkpoints" / "latest.json").read_text())[
        "path"])


@pytest.mark.parametrize("checkpoint_format", ["sharded", "full"])
def test_resume_after_kill_is_bit_exact(synvid, tmp_path, checkpoint_format):
    # 2 of the 5 segments per iteration: the queues carry fakes across iterations, so their saved state matters
    kw = dict(optim={"steps": 4, "segment_updates": "joint", "segments_per_iteration": 2, "ema_decay": 0.9},
              log={"ckpt_every": 2, "plot": False, "save_dtype": "bf16"},
              runtime={"checkpoint_format": checkpoint_format})
    Trainer(make_cfg(synvid, tmp_path / "a", **kw), teacher=tiny_transformer(seed=TEACHER_SEED)).run()
    cfg_b = make_cfg(synvid, tmp_path / "b", **kw)
    r = Trainer(cfg_b, teacher=tiny_transformer(seed=TEACHER_SEED)).run(stop_after=3)  # killed after step 3
    assert r["stopped"] and json.loads((tmp_path / "b/checkpoints/latest.json").read_text())["step"] == 2
    resumed = Trainer(cfg_b, teacher=tiny_transformer(seed=TEACHER_SEED), resume="auto")
    assert resumed.step == 2 and resumed.queues.size(1) == 2  # fakes at t'_1 that segment 0 pops in step 3
    assert [resumed.segments_for(s) for s in range(4)] == [[4, 3], [2, 1], [0, 4], [3, 2]]
    resumed.run()
    a, b = _states(tmp_path / "a"), _states(tmp_path / "b")
    assert set(a) == set(b) and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("optimizer.") for k in a)
    ema_a = read_state_dict(tmp_path / "a/student_ema.safetensors")
    ema_b = read_state_dict(tmp_path / "b/student_ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    steps_b = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()
               if json.loads(x)["type"] == "train"]
    assert steps_b == [1, 2, 3, 4]  # the lost step 3 of the killed run is not logged twice


def test_a_stop_during_validation_checkpoints_and_the_resume_validates_first(synvid, tmp_path):
    """A stop request during the validation after iteration 2 (the 3rd check at step 2: after the iteration, then
    before each held-out batch) writes the step-2 checkpoint at once; the resume makes that validation first and
    the run ends as the uninterrupted one, metrics rows included."""
    from accvideo_core.train.loop import Interrupted

    kw = dict(optim={"steps": 4}, data={"val_samples": 4}, log={"val_every": 2, "plot": False})
    Trainer(make_cfg(synvid, tmp_path / "a", **kw), teacher=tiny_transformer(seed=TEACHER_SEED)).run()
    cfg = make_cfg(synvid, tmp_path / "b", **kw)
    with pytest.raises(Interrupted, match="during the validation at step 2"):
        StopOnRankZero(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), stop_at=(2, 3)).run()
    assert _latest(tmp_path / "b").name == "step_0000002"
    assert [r["step"] for r in _rows(tmp_path / "b") if r["type"] == "val"] == [0]
    Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), resume="auto").run()
    a, b = _states(tmp_path / "a"), _states(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


def test_a_checkpoint_inside_an_iteration_needs_its_segment_updates(synvid, tmp_path):
    from accvideo_core.train.loop import Interrupted

    cfg = make_cfg(synvid, tmp_path, optim={"steps": 3}, data={"val_samples": 1}, log={"plot": False})
    with pytest.raises(Interrupted, match="in iteration 2 after 3 of its segment updates"):
        # checks at step 1: after iteration 1, then before each of the 2 micro-batches of each segment update: the
        # 8th is before update 4's first
        StopOnRankZero(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), stop_at=(1, 8)).run()
    assert _latest(tmp_path).name == "step_0000001_update3"
    cfg.optim.segment_updates = "joint"
    with pytest.raises(ConfigError, match=r"written after 3 segment updates of iteration 2, whose updates were "
                                          r"\(segments k\) \[\[4\], \[3\], \[2\], \[1\], \[0\]\]; this run's are "
                                          r"\[\[4, 3, 2, 1, 0\]\]"):
        Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), resume="auto").run()
    # 4 segments per iteration: iteration 2 would have 4 updates (of other segments), so 3 done would "fit"
    cfg.optim.segment_updates, cfg.optim.segments_per_iteration = "sequential", 4
    with pytest.raises(ConfigError, match=r"this run's are \[\[0\], \[4\], \[3\], \[2\]\]"):
        Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), resume="auto").run()


def _rows(out: Path) -> list[dict]:
    """metrics.jsonl without the wall times."""
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in (out / "metrics.jsonl").open()]


def _latest(out: Path) -> Path:
    return out / "checkpoints" / json.loads((out / "checkpoints" / "latest.json").read_text())["path"]


def _train_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["type"] == "train"]


@pytest.mark.parametrize("minutes, steps", [(1e-9, [1, 2, 3]), (0.0, [3])])
def test_checkpoints_also_by_time(synvid, tmp_path, minutes, steps):
    """log.ckpt_minutes: a checkpoint whenever that much time passed since the last (here: after every iteration),
    besides every log.ckpt_every iterations (here: never) and the final one."""
    cfg = make_cfg(synvid, tmp_path, optim={"steps": 3}, data={"val_samples": 1},
                   log={"ckpt_every": 0, "ckpt_minutes": minutes, "keep_checkpoints": 0, "plot": False})
    Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED)).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [f"step_{s:07d}" for s in steps]


def test_pruning_counts_only_this_runs_complete_checkpoints(synvid, tmp_path):
    """An older run's higher-step checkpoint, half-written folders and temp files in checkpoints/ once made
    pruning delete the checkpoint just written (latest.json named a deleted folder, the run died at its end)."""
    out, fast = tmp_path / "run", {"data": {"val_samples": 1}}
    Trainer(make_cfg(synvid, out, optim={"steps": 2}, log={"ckpt_every": 1, "keep_checkpoints": 2}, **fast),
            teacher=tiny_transformer(seed=TEACHER_SEED)).run()
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_0000001", "step_0000002"]
    shutil.copytree(ck / "step_0000002", ck / "step_0000099")  # another run's complete, higher-step checkpoint
    marker = json.loads((ck / "step_0000099/checkpoint.json").read_text())
    (ck / "step_0000099/checkpoint.json").write_text(json.dumps({**marker, "step": 99, "run": "older"}))
    (ck / "step_0000098").mkdir()  # half-written by an older version (no marker, no trainer.pt)
    (ck / "step_0000098/rank00000.pt").write_bytes(b"partial")
    (ck / ".step_0000003.partial").mkdir()  # a killed write
    (ck / ".latest.json.x1.tmp").write_text("{")
    (out / ".metrics.jsonl.x2.tmp").write_text("")
    result = Trainer(make_cfg(synvid, out, optim={"steps": 4}, log={"ckpt_every": 1, "keep_checkpoints": 1},
                              **fast), teacher=tiny_transformer(seed=TEACHER_SEED), resume="auto").run()
    assert _latest(out).name == "step_0000004" and (_latest(out) / "checkpoint.json").is_file()
    assert Path(result["checkpoint"]) == _latest(out) and (out / "student.safetensors").is_file()
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step_0000004", "step_0000099"]
    assert not list(out.glob(".*.tmp")) and _train_steps(out) == [1, 2, 3, 4]


def test_a_killed_checkpoint_write_leaves_the_previous_one_resumable(synvid, tmp_path, monkeypatch):
    """keep_checkpoints = 1: a write killed half-way never replaces or deletes the last complete checkpoint."""
    import accvideo_core.train.checkpoint as C

    out = tmp_path / "run"
    cfg = make_cfg(synvid, out, optim={"steps": 3}, data={"val_samples": 1},
                   log={"ckpt_every": 1, "keep_checkpoints": 1})
    rank_state = C._rank_state

    def dies_at_step_2(tr):
        if tr.step == 2:
            raise KeyboardInterrupt("killed while writing")
        return rank_state(tr)

    monkeypatch.setattr(C, "_rank_state", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED)).run()
    monkeypatch.setattr(C, "_rank_state", rank_state)
    ck = out / "checkpoints"
    assert (ck / ".step_0000002.partial/sharded/.metadata").is_file()  # the model part was written
    assert _latest(out).name == "step_0000001" and (_latest(out) / "checkpoint.json").is_file()
    resumed = Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), resume="auto")
    assert resumed.step == 1 and not (ck / ".step_0000002.partial").exists()
    resumed.run()
    assert sorted(p.name for p in ck.iterdir()) == ["latest.json", "step_0000003"]
    assert _train_steps(out) == [1, 2, 3]


def test_a_non_empty_out_dir_needs_resume_or_overwrite(synvid, tmp_path):
    """A fresh run in an old run's folder once cut its metrics.jsonl (67 -> 12 lines) and mixed checkpoints."""
    from accvideo_core.train.__main__ import main

    out = tmp_path / "run"
    (out / "checkpoints/step_0000067").mkdir(parents=True)
    old_rows = "".join(json.dumps({"type": "train", "step": i}) + "\n" for i in range(1, 68))
    (out / "metrics.jsonl").write_text(old_rows)
    (out / "notes.txt").write_text("mine")
    cfg = make_cfg(synvid, out, optim={"steps": 1}, data={"val_samples": 1})
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert main(["--config", str(tmp_path / "c.json")]) == 2  # refused before any work
    with pytest.raises(ConfigError, match="--resume auto.*--overwrite"):
        Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED))
    assert (out / "metrics.jsonl").read_text() == old_rows
    Trainer(cfg, teacher=tiny_transformer(seed=TEACHER_SEED), overwrite=True).run()
    assert _train_steps(out) == [1] and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest.json", "step_0000001"]


def test_metrics_truncation_is_atomic(tmp_path, monkeypatch):
    from accvideo_core.train.monitor import Monitor

    rows = "".join(json.dumps({"type": "train", "step": i}) + "\n" for i in range(1, 68))
    (tmp_path / "metrics.jsonl").write_text(rows)
    monitor = Monitor(tmp_path, total_steps=100, start_step=12, enabled=True)

    def killed(*args):
        raise KeyboardInterrupt("killed while renaming")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        monitor.truncate(12)
    assert (tmp_path / "metrics.jsonl").read_text() == rows and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.undo()
    monitor.truncate(12)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 13))


def test_streamed_safetensors_and_safe_distributed_checkpoint_reading(tmp_path):
    """The export's one-tensor-at-a-time writer gives what safetensors itself reads back (mixed dtypes), refuses a
    tensor that does not match its header; a sharded checkpoint whose metadata pickle would run code is refused."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    from accvideo_core.utils.io import (CheckpointError, read_distributed_checkpoint_flat,
                                        save_safetensors_stream)

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).bfloat16(), "b": torch.arange(7), "c": torch.randn(2, generator=g),
               "d": torch.randn(4, 1, generator=g).half()}
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    save_safetensors_stream(specs, iter(tensors.values()), tmp_path / "s.safetensors", {"k": "v"})
    back = load_file(tmp_path / "s.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="header says"):
        save_safetensors_stream(specs, iter([tensors["b"]]), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not list(tmp_path.glob(".*.tmp"))
    with warnings.catch_warnings():  # DCP notes that it runs in one process without a process group
        warnings.simplefilter("ignore")
        dcp.save({"w": tensors["c"], "n": {"m": tensors["a"]}}, checkpoint_id=str(tmp_path / "ck"))
    flat = read_distributed_checkpoint_flat(tmp_path / "ck")
    assert set(flat) == {"w", "n.m"} and torch.equal(flat["n.m"], tensors["a"])

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not allowed"):
        read_distributed_checkpoint_flat(tmp_path / "ck")
    assert not (tmp_path / "pwned").exists()


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def test_ctrl_c_writes_a_checkpoint_first(synvid, tmp_path):
    cfg = make_cfg(synvid, tmp_path / "run", optim={"steps": 10000}, data={"val_samples": 1})
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "accvideo_core.train", "--config", str(tmp_path / "c.json")],
                            cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:
        if line.startswith("step ") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    latest = json.loads((tmp_path / "run/checkpoints/latest.json").read_text())
    assert latest["step"] >= 1 and "resume with --resume" in err
    assert (tmp_path / "run/checkpoints" / latest["path"] / "checkpoint.json").is_file()


def _launch(args: list[str], nproc: int = 2) -> None:
    """``torchrun --standalone --nproc_per_node nproc ARGS`` (gloo on CPU); fails the test on a non-zero exit."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(torchrun + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]


def _torchrun(cfg: TrainConfig, path: Path, *args: str, nproc: int = 2) -> None:
    """``python -m accvideo_core.train`` under torchrun with ``cfg`` (written to ``path``) and CLI ``args``."""
    path.write_text(json.dumps(cfg.to_dict()))
    _launch(["-m", "accvideo_core.train", "--config", str(path), *args], nproc)


class StopOnRankZero(Trainer):
    """Rank 0 alone is asked to stop (as by a signal that reached one process) at its ``poll``-th stop check
    while in iteration ``step + 1``; the other ranks must agree and stop at the same point."""

    def __init__(self, cfg: TrainConfig, *, stop_at: tuple[int, int], **kwargs):
        super().__init__(cfg, **kwargs)
        self.stop_at, self.polls = tuple(stop_at), 0

    def _stop_requested(self) -> bool:
        if self.step == self.stop_at[0]:
            self.polls += 1
            self.interrupted = self.interrupted or (self.polls == self.stop_at[1] and self.info.rank == 0)
        return super()._stop_requested()


def run_torchrun(jobs: list[tuple], path: Path, nproc: int = 2) -> None:
    """Several trainer runs ``(config, resume, stop_after[, stop_at])`` one after another in ONE torchrun launch
    (each launch costs ~25 s of CI; the process group is shared): this file run as a script, :func:`_run_jobs`.
    ``stop_at`` = (step, poll): :class:`StopOnRankZero`, the run ends interrupted after its checkpoint."""
    path.write_text(json.dumps([[job[0].to_dict(), *job[1:]] for job in jobs]))
    _launch([__file__, str(path)], nproc)


def _run_jobs(path: str) -> None:
    """torchrun side of :func:`run_torchrun`."""
    import torch.distributed as dist

    from accvideo_core.train.loop import Interrupted

    torch.set_num_threads(1)
    for cfg, resume, stop_after, *stop_at in json.loads(Path(path).read_text()):
        if stop_at:
            with pytest.raises(Interrupted):
                StopOnRankZero(config_from_dict(cfg), resume=resume, stop_at=stop_at[0]).run()
        else:
            Trainer(config_from_dict(cfg), resume=resume).run(stop_after=stop_after)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo can abort at interpreter exit after correct work (as accvideo_core.train.__main__)


def max_abs_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference over the tensors of two state dicts with the same keys."""
    assert set(got) == set(want)
    return max(float((got[k].float() - want[k].float()).abs().max()) for k in want)


def _assert_close_states(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Two checkpoints' tensors (student, optimizer, EMA, heads) agree within 1e-4 max abs."""
    assert len(want) > 100
    assert max_abs_diff(got, want) <= 1e-4


def test_torchrun_two_ranks_fsdp2_matches_single_process(synvid, tmp_path):
    """2 ranks (gloo + FSDP2, sharded checkpoints) = 1 process, and a checkpoint resumes on the other number of
    ranks like an uninterrupted single-process run: 2 -> 1 and 1 -> 2 (queues carry fakes across iterations).
    7 training samples: they do not split evenly over 2 ranks, and step 4 reads across the epoch boundary. The first
    iteration trains only the heads (loss.heads_only_steps: sharded student forward without a graph or update).
    Last, a stop request inside an iteration on one rank: a checkpoint between two segment updates."""
    common = dict(optim={"steps": 4, "total_batch": 2, "segments_per_iteration": 2, "ema_decay": 0.9},
                  loss={"heads_only_steps": 1},
                  model={"gradient_checkpointing": True}, data={"val_samples": 5},
                  log={"plot": False, "ckpt_every": 2, "val_every": 2})
    single = Trainer(make_cfg(synvid, tmp_path / "one", **common), teacher=tiny_transformer(seed=TEACHER_SEED))
    r1 = single.run()  # uninterrupted, checkpoints at steps 2 and 4
    half = tmp_path / "one/checkpoints/step_0000002"
    _torchrun(make_cfg(synvid, tmp_path / "two", **{**common, "optim": {**common["optim"], "steps": 2}}),
              tmp_path / "c2.json")
    _assert_close_states(_states(tmp_path / "two"), checkpoint_tensors(half))
    val_one = [json.loads(x) for x in (tmp_path / "one/metrics.jsonl").read_text().splitlines()]
    val_two = [json.loads(x) for x in (tmp_path / "two/metrics.jsonl").read_text().splitlines()]
    assert val_two[-1]["type"] == "val" and val_two[-1]["step"] == 2
    assert [r.get("heads_only") for r in val_two if r["type"] == "train"] == [1.0, None]
    mid = next(r for r in val_one if r["type"] == "val" and r["step"] == 2)
    assert val_two[-1]["student_mse"] == pytest.approx(mid["student_mse"], rel=1e-4)
    # 2 ranks -> 1 process: continue the 2-rank run to step 4
    Trainer(make_cfg(synvid, tmp_path / "two", **common), teacher=tiny_transformer(seed=TEACHER_SEED),
            resume="auto").run()
    _assert_close_states(_states(tmp_path / "two"), _states(tmp_path / "one"))
    # 1 process -> 2 ranks: continue the single-process checkpoint of step 2 to step 4
    _torchrun(make_cfg(synvid, tmp_path / "three", **common), tmp_path / "c3.json", "--resume", str(half))
    _assert_close_states(_states(tmp_path / "three"), _states(tmp_path / "one"))
    for name in ("student", "student_ema"):  # the 2-rank export, streamed tensor by tensor from the shards
        got, want = (read_state_dict(tmp_path / run / f"{name}.safetensors") for run in ("three", "one"))
        assert max_abs_diff(got, want) <= 1e-4
    assert r1["val"]["student_mse"] == pytest.approx(
        json.loads((tmp_path / "three/metrics.jsonl").read_text().splitlines()[-1])["student_mse"], rel=1e-4)
    # a stop request that reaches rank 0 alone inside iteration 3 (its checks: after iteration 2, then before each of
    # its 2 segment updates of 1 micro-batch; the 3rd is before update 2; no validation at step 2, which would check
    # before each held-out batch): both ranks stop there and checkpoint after update 1; resumed in one process, the
    # run ends like the uninterrupted one
    quiet = {**common, "log": {**common["log"], "val_every": 0}}
    run_torchrun([(make_cfg(synvid, tmp_path / "four", **quiet), None, None, (2, 3))], tmp_path / "jobs.json")
    assert json.loads((tmp_path / "four/checkpoints/latest.json").read_text())["path"] == "step_0000002_update1"
    Trainer(make_cfg(synvid, tmp_path / "four", **quiet), teacher=tiny_transformer(seed=TEACHER_SEED),
            resume="auto").run()
    _assert_close_states(_states(tmp_path / "four"), _states(tmp_path / "one"))


_COMFY_PROBE = r'''
model_path, inputs_path, out_path = ARGS
patcher = comfy.sd.load_diffusion_model(model_path, model_options={"dtype": torch.float32})
velocity(patcher, inputs_path, out_path)
print("PROBE", type(patcher.model).__name__)
'''


def comfy_compatible_teacher_and_data(data_dir: Path):
    """A tiny teacher that native ComfyUI can load, 3 SynVid samples of it in ``data_dir`` (10 steps, 16x16), the
    text inputs, and the generator that drew them (the tests draw their probe inputs from it next)."""
    teacher = tiny_transformer(seed=5, comfy_compatible=True)
    g = torch.Generator().manual_seed(2)
    emb = {"text_states": torch.randn(2, 6, 32, generator=g), "text_mask": torch.ones(2, 6, dtype=torch.long),
           "pooled": torch.randn(2, 768, generator=g), "prompts": ["a", "b"]}
    dump_synvid(teacher, emb, data_dir, num=3, frames=1, height=16, width=16, steps=10, dtype="float32",
                progress=lambda msg: None)
    return teacher, emb, g


@pytest.mark.integration
def test_exported_student_loads_in_native_comfyui(tmp_path, comfyui_path):
    """The trainer's exported student (bf16, original layout) loads with ComfyUI's UNETLoader code path
    (``comfy.sd.load_diffusion_model``) and predicts the same velocity as our transformer."""
    comfy = str(comfyui_path)
    from safetensors.torch import save_file

    teacher, emb, g = comfy_compatible_teacher_and_data(tmp_path / "data")
    cfg = config_from_dict({
        "data": {"root": str(tmp_path / "data"), "val_samples": 1},
        "optim": {"steps": 1, "total_batch": 2, "lr": 1e-4}, "loss": {"head_width": 32, "head_groups": 8},
        "log": {"out_dir": str(tmp_path / "run"), "plot": False, "save_dtype": "bf16"}})
    Trainer(cfg, teacher=teacher).run()
    path = tmp_path / "run" / "student.safetensors"
    ours = load_transformer(path, dtype=torch.float32)
    x = {"latents": torch.randn(1, 16, 1, 2, 2, generator=g), "timestep": torch.tensor([636.3636]),
         "text_states": emb["text_states"][:1], "pooled": emb["pooled"][:1], "guidance": torch.tensor([6.0])}
    save_file(x, str(tmp_path / "inputs.safetensors"))
    run = run_probe(_COMFY_PROBE, comfy, path, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors",
                    folder=tmp_path)
    assert "PROBE HunyuanVideo" in run.stdout
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "out.safetensors")["velocity"]
    with torch.no_grad():
        mine = ours(x["latents"], x["timestep"], x["text_states"], torch.ones(1, 6), x["pooled"], 6.0)
    torch.testing.assert_close(theirs, mine, atol=2e-3, rtol=2e-3)


if __name__ == "__main__":  # the torchrun side of run_torchrun
    _run_jobs(sys.argv[1])
