"""The paper's 1D toy experiment (Fig. 2): the qualitative claims on a CI-sized run, plus its building blocks."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from PIL import Image

from accvideo_core.toy.__main__ import main
from accvideo_core.toy.experiment import (RUN_SIZES, Toy1DConfig, distance_to_trajectories, euler_from_levels,
                                          euler_trajectory, linear_sigmas, optimal_velocity, run, shifted_points,
                                          useless_mask)
from accvideo_core.utils.canvas import Canvas
from accvideo_core.utils.png import encode_png, write_png

DATA = torch.tensor([-3.0, 3.0])


def exact_teacher(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return optimal_velocity(x, sigma.clamp_min(1e-4), DATA)


@pytest.fixture(scope="module")
def fast_result():
    return run(RUN_SIZES["fast"])


def row(result: dict, name: str) -> dict:
    return next(r for r in result["rows"] if r["dataset"] == name)


def test_trajectory_data_has_no_useless_points(fast_result):
    traj = row(fast_result, "trajectory")
    assert all(v == 0.0 for v in traj["useless_pct"].values())
    assert traj["endpoint_mismatch_pct"] == 0.0
    # the criterion is not vacuous: fresh teacher trajectories and matched forward diffusion are rarely useless
    radius = f"{fast_result['config']['coverage_radius']:g}"
    assert fast_result["heldout_teacher_trajectories_useless_pct"][radius] < 2.0
    assert row(fast_result, "M=0")["useless_pct"][radius] < 2.0


def test_useless_fraction_grows_with_mismatch(fast_result):
    radius = f"{fast_result['config']['coverage_radius']:g}"
    shifted = [r for r in fast_result["rows"] if r["dataset"] != "trajectory"]
    values = [r["useless_pct"][radius] for r in shifted]
    assert [r["mismatch"] for r in shifted] == sorted(r["mismatch"] for r in shifted)
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[-1] > values[0] + 20.0
    # the same ordering holds for the other radii (the conclusion does not hinge on the radius)
    for r in fast_result["config"]["sensitivity_radii"]:
        v = [x["useless_pct"][f"{r:g}"] for x in shifted]
        assert v[-1] > v[0] + 20.0


def test_trajectory_student_lands_on_the_data(fast_result):
    s = row(fast_result, "trajectory")["student"]
    assert s["mean_dist_to_data"] < 0.25, s
    assert s["on_data_pct"] > 50.0, s
    assert 35.0 < s["positive_pct"] < 65.0, s  # both modes, about equally
    assert s["mean_abs_err_to_teacher"] < 0.3, s
    worst = row(fast_result, f"M={max(fast_result['config']['mismatches']):g}")["student"]
    assert worst["mean_dist_to_data"] > 2 * s["mean_dist_to_data"], (worst, s)


def test_teacher_learns_the_flow(fast_result):
    t = fast_result["teacher"]
    assert t["velocity_rel_err_on_trajectories"] < 0.6
    assert t[f"teacher-{fast_result['config']['teacher_steps']}_outputs"]["mean_dist_to_data"] < 0.25


def test_exact_velocity_field_transports_noise_onto_the_data():
    """An independent check of the sampler: the closed-form field with 50 Euler steps lands on {-3, +3}."""
    z = torch.randn(2000)
    out = euler_trajectory(exact_teacher, z, linear_sigmas(50))[-1]
    assert (out.abs() - 3).abs().max() < 1e-3
    assert torch.equal(out > 0, z > 0)  # 1D ODE flows preserve order: the sign of the noise picks the mode


def test_flow_matching_target_matches_the_exact_velocity():
    """Monte-Carlo mean of the regression target (noise - y) given x equals the closed-form velocity."""
    gen = torch.Generator().manual_seed(0)
    sigma = 0.6
    y = DATA[torch.randint(2, (400_000,), generator=gen)]
    noise = torch.randn(400_000, generator=gen)
    x = (1 - sigma) * y + sigma * noise
    bins = torch.linspace(-2, 2, 9)
    idx = torch.bucketize(x, bins)
    for b in range(1, len(bins)):
        sel = idx == b
        residual = (noise - y)[sel] - optimal_velocity(x[sel], torch.full((int(sel.sum()),), sigma), DATA)
        standard_error = residual.std() / residual.numel() ** 0.5
        assert residual.mean().abs() < 4 * standard_error + 1e-3, (b, residual.mean(), standard_error)


def test_distance_and_useless_mask_against_brute_force():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(3, 50, generator=gen)
    x = 3 * torch.randn(3, 200, generator=gen)
    for j in range(3):
        brute = (x[j][:, None] - ref[j][None]).abs().min(1).values
        assert torch.allclose(distance_to_trajectories(x[j], ref[j].sort().values), brute)
    mask = useless_mask(x, ref, 0.1)
    brute_mask = (x[..., None] - ref[:, None]).abs().min(-1).values > 0.1
    assert torch.equal(mask, brute_mask)
    assert not useless_mask(ref, ref, 0.0).any()


def test_euler_from_levels_matches_per_level_solves():
    sigmas = linear_sigmas(10)
    x = torch.linspace(-4, 4, 12)
    levels = torch.tensor([0, 2, 5, 9] * 3)
    paths = euler_from_levels(exact_teacher, x, levels, sigmas)
    for n in range(len(x)):
        own = euler_trajectory(exact_teacher, x[n:n + 1], sigmas[levels[n]:])
        assert torch.allclose(paths[levels[n]:, n], own[:, 0], atol=1e-6)


def test_shifted_points_move_away_from_the_data():
    assert shifted_points(DATA, 2.0).tolist() == [-5.0, 5.0]


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of student_steps"):
        Toy1DConfig(teacher_steps=50, student_steps=4)


def read_png(data: bytes) -> np.ndarray:
    """Decode with Pillow: an independent PNG reader."""
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img).copy()


def test_png_writer_round_trips_through_pillow(tmp_path):
    gen = np.random.default_rng(0)
    for shape in ((1, 1, 3), (7, 13, 3), (64, 48, 3)):
        img = gen.integers(0, 256, size=shape, dtype=np.uint8)
        assert np.array_equal(read_png(encode_png(img)), img)
    path = write_png(img, tmp_path / "sub" / "x.png")
    assert np.array_equal(read_png(path.read_bytes()), img)
    assert [p.name for p in path.parent.iterdir()] == ["x.png"]  # atomic: no temp file left behind
    for bad in (img.astype(np.float32), img[..., :2], img[0], np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError, match="uint8|pixel"):
            encode_png(bad)


def test_canvas_draws_text_and_dots():
    canvas = Canvas(40, 20)
    canvas.text(2, 2, "M=3 10%", scale=1)
    canvas.dots([30], [10], (1.0, 0.0, 0.0), radius=3)
    img = canvas.to_uint8()
    assert (img[:10, :25] < 128).any() and (img[10, 30] == [255, 0, 0]).all()
    assert (img[15:, :20] == 255).all()  # nothing drawn outside the text and the dot


def test_cli_writes_json_table_and_png(tmp_path, monkeypatch):
    tiny = replace(RUN_SIZES["fast"], teacher_iters=20, student_iters=5, trajectories=256, eval_samples=128,
                   mismatches=(0.0, 2.0))
    monkeypatch.setitem(RUN_SIZES, "fast", tiny)
    assert main(["--out", str(tmp_path), "--size", "fast", "--quiet"]) == 0
    result = json.loads((tmp_path / "toy1d.json").read_text())
    assert [r["dataset"] for r in result["rows"]] == ["trajectory", "M=0", "M=2"]
    assert result["config"]["teacher_iters"] == 20
    table = (tmp_path / "toy1d.md").read_text()
    assert "| teacher trajectories (a) | 0.00 |" in table and "vs teacher-50 |" in table
    png = read_png((tmp_path / "toy1d.png").read_bytes())
    assert png.shape == (1040, 1500, 3) and png.std() > 10
