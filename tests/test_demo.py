"""The miniature demo's whole chain (text encoding -> core dumper -> trainer x2 -> held-out evaluation -> reports +
mp4 + GIF) at a very reduced setting, on the shipped family."""
from __future__ import annotations

import json
import shutil

import pytest

from accvideo_core.demo import (DemoConfig, heldout_prompts, main, mean_interval, parse_seeds, run_demo, seeds_markdown,
                                 t_quantile,
                                 training_prompts)
from accvideo_core.mini.data import attribute_combos, parse_caption
from accvideo_core.mini.family import GUIDANCE
from accvideo_core.sampling import ACCVIDEO_STUDENT, HUNYUAN_TEACHER
from accvideo_core.synvid.format import SynVidDataset
from tests.helpers import count_frames


def test_prompt_sets_are_disjoint_and_follow_the_template():
    train, held = training_prompts(12), heldout_prompts(4)
    assert len(set(train)) == 12 and len(set(held)) == 4
    held_combos = set(attribute_combos("heldout"))
    for p in held:
        s = parse_caption(p)
        assert (s.shape, s.color, s.direction, s.background) in held_combos
    for p in train:
        s = parse_caption(p)
        assert (s.shape, s.color, s.direction, s.background) not in held_combos


def test_demo_runs_end_to_end_reduced(tmp_path, capsys):
    cfg = DemoConfig(synvid_samples=3, train_steps=1, batch=2, heldout_prompts=1, seeds_per_prompt=1, shown=1,
                     threads=1, probe_updates=3, heads_only_steps=1)
    report = run_demo(cfg, tmp_path)
    # the real entry points ran: a SynVid from the dumper, two trainer runs with their exported students
    ds = SynVidDataset(tmp_path / "synvid")
    assert len(ds) == 3 and ds.manifest["steps"] == HUNYUAN_TEACHER.steps
    assert ds.load(0).guidance == cfg.guidance == GUIDANCE  # the miniature's guidance, not HunyuanVideo's 6
    for run in ("train_traj", "train_adv"):
        assert (tmp_path / run / "student.safetensors").is_file()
        cfg_used = json.loads((tmp_path / run / "config.json").read_text())
        adversarial = run == "train_adv"   # both make 1 student update; the AccVideo run 1 heads-only iteration first
        assert cfg_used["loss"]["adversarial"] == adversarial and cfg_used["loss"]["heads_only_steps"] == adversarial
        assert cfg_used["optim"]["steps"] == 1 + adversarial
        assert cfg_used["optim"]["segment_updates"] == cfg.segment_updates == "sequential"
    r = report["results"]
    assert set(r) == {"teacher", "teacher_few_steps", "student_trajectory", "student_accvideo"}
    assert [r[n]["steps"] for n in r] == [HUNYUAN_TEACHER.steps] + [ACCVIDEO_STUDENT.steps] * 3
    assert r["teacher"]["latent_mse_to_teacher"] == 0.0
    assert r["teacher_few_steps"]["latent_mse_to_teacher"] > 0.0
    for name in r:
        s = r[name]["seconds_per_video"]
        assert s["total"] == pytest.approx(s["text"] + s["sampling"] + s["decode"])
    assert report["speedup_sampling"] > 1.0
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["ablation"]["traj_only_mse"] == pytest.approx(r["student_trajectory"]["latent_mse_to_teacher"])
    md = (tmp_path / "report.md").read_text()
    assert "| AccVideo student 5 | 5 |" in md and "| teacher 50 steps | 50 |" in md and "Ablation" in md
    assert f"embedded guidance {GUIDANCE:g}." in md
    # the discriminator section: its loss and each head's held-out accuracy before training, after the heads-only
    # iteration and at the end
    d = report["discriminator"]
    assert d["heads_only_steps"] == 1 and d["loss_heads_only_last10"]["adv_d"] > 0
    assert sorted(d["heldout_accuracy_end"]) == sorted(d["heldout_accuracy_heads_only"]) == [0, 1, 2, 3, 4]
    assert d["loss_last10"]["adv_d"] > 0
    assert all(0.0 <= a <= 1.0 for key in ("start", "heads_only", "end")
               for a in d[f"heldout_accuracy_{key}"].values())
    assert "## Discriminator" in md and "| after the heads-only iterations |" in md
    assert "(same 1 student iterations x batch 2; the adversarial run first trains its heads alone for 1" in md
    # the probe: fresh heads' held-out accuracy per key timestep on teacher-5's and the AccVideo student's fakes
    assert sorted(d["probe"]) == ["student_accvideo", "teacher_few_steps"]
    assert all(len(acc) == 5 and all(0.0 <= a <= 1.0 for a in acc) for acc in d["probe"].values())
    assert "Fresh heads of the same kind" in md and "| AccVideo student's chain |" in md
    assert count_frames(tmp_path / "side_by_side.mp4") == 17
    assert (tmp_path / "side_by_side.gif").stat().st_size > 1000
    # a second run continues: nothing is re-dumped and both finished trainings are reused, also when a run was
    # recorded before the trainer gained a field (it reads as its default)
    marker = sorted(tmp_path.glob("*/demo_done.json"))[0]
    old = json.loads(marker.read_text())
    del old["model"]["fp8_base"]
    marker.write_text(json.dumps(old))
    assert main(["--out", str(tmp_path), "--synvid-samples", "3", "--train-steps", "1", "--batch", "2",
                 "--heldout-prompts", "1", "--seeds-per-prompt", "1", "--shown", "1", "--threads", "1",
                 "--probe-updates", "0", "--heads-only-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "3 of 3 samples already present" in err and err.count("reusing the finished training run") == 2
    assert "Fresh heads" not in (tmp_path / "report.md").read_text()   # --probe-updates 0: no probe
    # a demo folder copied elsewhere keeps its finished runs (the markers' paths are read relative to it)
    copied = tmp_path.with_name(tmp_path.name + "_copied")
    shutil.copytree(tmp_path, copied)
    assert main(["--out", str(copied), "--synvid-samples", "3", "--train-steps", "1",
                 "--batch", "2", "--heldout-prompts", "1", "--seeds-per-prompt", "1", "--shown", "1", "--threads", "1",
                 "--probe-updates", "0", "--heads-only-steps", "1"]) == 0
    assert capsys.readouterr().err.count("reusing the finished training run") == 2
    # a changed family (here: a different recorded fingerprint) is never mixed with the old run's data
    (tmp_path / "family.json").write_text(json.dumps({"teacher": "sha256:other"}))
    assert main(["--out", str(tmp_path), "--synvid-samples", "3", "--train-steps", "1", "--batch", "2",
                 "--heldout-prompts", "1", "--seeds-per-prompt", "1", "--shown", "1", "--threads", "1",
                 "--probe-updates", "0", "--heads-only-steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "family changed since the last run" in err and "already present" not in err
    assert "reusing the finished training run" not in err


def test_seed_statistics():
    # Student's t quantiles against the published table (two-sided 95 %: df 1, 4, 30)
    assert [round(t_quantile(0.975, df), 3) for df in (1, 4, 30)] == [12.706, 2.776, 2.042]
    iv = mean_interval([0.08, 0.10, 0.09, 0.12, 0.11])
    half = 2.776445 * 0.015811388 / 5 ** 0.5   # t(0.975, 4) x sample std / sqrt(n)
    assert iv["mean"] == pytest.approx(0.1) and iv["high"] - iv["mean"] == pytest.approx(half, rel=1e-5)
    assert iv["low"] == pytest.approx(0.1 - half, rel=1e-5) and iv["n"] == 5
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4] and parse_seeds("3, 0-1,3") == [3, 0, 1]
    with pytest.raises(ValueError, match="expected a range such as 0-4"):
        parse_seeds("a-b")


def test_bad_trainer_option_fails_before_any_work(tmp_path, capsys):
    """A demo option the trainer rejects is reported (exit 2) before the SynVid dump starts."""
    assert main(["--out", str(tmp_path), "--segment-updates", "sideways", "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "segment_updates" in err and "sequential" in err and "joint" in err, err
    assert not (tmp_path / "synvid").exists()


def test_seeds_report_lists_every_seed_with_its_probe():
    rows = [{"seed": s, "teacher_few_steps": 0.1, "traj_only": 0.04 + s / 100, "traj_adv": 0.05, "adv_minus_traj":
             0.01 - s / 100, "traj_adv_vs_teacher_few_steps": 0.5, "traj_only_vs_teacher_few_steps": 0.4,
             "d_loss_last10": 1.2, "d_heldout_accuracy_end": {k: 0.5 for k in range(5)},
             "d_heldout_accuracy_heads_only": {k: 1.0 - k / 10 for k in range(5)},
             "probe": {"teacher_few_steps": [1.0, 0.6, 0.7, 0.8, 0.9], "student_accvideo": [1.0, 0.5, 0.5, 0.5, 0.6]}}
            for s in (0, 1)]
    keys = ("teacher_few_steps", "traj_only", "traj_adv", "adv_minus_traj", "traj_only_vs_teacher_few_steps",
            "traj_adv_vs_teacher_few_steps", "d_loss_last10")
    summary = {"seeds": [0, 1], "per_seed": rows, "adv_better_seeds": 0, "students_within_half_of_teacher_few_steps": 2,
               "intervals_95": {key: mean_interval([r[key] for r in rows]) for key in keys}}
    md = seeds_markdown(summary)
    assert ("| 0 | 0.1000 | 0.0400 | 0.0500 | +0.0100 | 0.50x | 1.200 | 100% / 90% / 80% / 70% / 60% | "
            "50% / 50% / 50% / 50% / 50% | 75% / 52% |") in md
    assert "| 1 | 0.1000 | 0.0500 |" in md and "on 2 of 2 seeds" in md
