"""The 1D toy experiment's outputs: the markdown table, the four-panel figure and the JSON-able result."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .experiment import useless_mask
from ..utils.canvas import BLACK, BLUE, GRAY, GREEN, LIGHT, ORANGE, PURPLE, RED, Canvas
from .plot import Axes

SIGMA_TICKS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]


def markdown_table(result: dict) -> str:
    """One row per distillation data set, then the control and the two teacher baselines."""
    cfg = result["config"]
    full = f"teacher-{cfg['teacher_steps']}"
    radius = f"{cfg['coverage_radius']:g}"
    others = [f"{r:g}" for r in cfg["sensitivity_radii"]]
    head = (f"| distillation data | useless % (r={radius}) | " + " | ".join(f"useless % (r={r})" for r in others)
            + f" | endpoint mismatch % | student on data % | student mean dist to data | student mean abs err vs {full} |")
    lines = [head, "|" + "---|" * (6 + len(others))]
    for row in result["rows"]:
        name = "teacher trajectories (a)" if row["dataset"] == "trajectory" else f"forward diffusion, {row['dataset']} (b)"
        s = row["student"]
        lines.append(f"| {name} | {row['useless_pct'][radius]:.2f} | "
                     + " | ".join(f"{row['useless_pct'][r]:.2f}" for r in others)
                     + f" | {row['endpoint_mismatch_pct']:.2f} | {s['on_data_pct']:.1f} | {s['mean_dist_to_data']:.3f}"
                     f" | {s['mean_abs_err_to_teacher']:.3f} |")
    held = result["heldout_teacher_trajectories_useless_pct"]
    lines.append(f"| (check) fresh teacher trajectories, held out | {held[radius]:.2f} | "
                 + " | ".join(f"{held[r]:.2f}" for r in others) + " | - | - | - | - |")
    t = result["teacher"]
    for k in (full, f"teacher-{cfg['student_steps']}"):
        s = t[f"{k}_outputs"]
        lines.append(f"| (baseline) {k} sampling, no distillation | - | " + " | ".join("-" for _ in others)
                     + f" | - | {s['on_data_pct']:.1f} | {s['mean_dist_to_data']:.3f} | {s['mean_abs_err_to_teacher']:.3f} |")
    return "\n".join(lines) + "\n"


def _draw_trajectories(ax: Axes, result: dict, color, alpha: float) -> None:
    """About 96 of the teacher's ODE trajectories and the data points."""
    sig = result["arrays"]["teacher_sigmas"].numpy()
    traj = result["arrays"]["trajectories"].numpy()
    for i in range(0, traj.shape[1], max(1, traj.shape[1] // 96)):
        ax.line(sig, traj[:, i], color, width=1.0, alpha=alpha)
    for p in result["config"]["data_points"]:
        ax.scatter([0.0], [p], BLACK, radius=5)


def _panel_trajectories(canvas: Canvas, result: dict, ymax: float, ticks: list[int]) -> None:
    """(A) the teacher's trajectories with data set (a)'s key points."""
    a = Axes(canvas, 80, 50, 620, 380, (1.0, 0.0), (-ymax, ymax))
    a.frame("A  TEACHER ODE TRAJECTORIES = DATA (A)", "SIGMA (1 = NOISE, 0 = DATA)", "X", xticks=SIGMA_TICKS,
            yticks=ticks)
    _draw_trajectories(a, result, BLUE, 0.25)
    ref = result["arrays"]["key_reference"].numpy()
    for j, s in enumerate(result["arrays"]["key_sigmas"][:-1].tolist()):
        a.scatter(np.full(ref.shape[1], s), ref[j], GREEN, radius=1.5, alpha=0.5)


def _panel_forward_diffusion(canvas: Canvas, result: dict, ymax: float, ticks: list[int], mismatch: float) -> None:
    """(B) forward-diffused start points of the data shifted by ``mismatch``, useless ones in red."""
    cfg, arrays = result["config"], result["arrays"]
    pairs = arrays["datasets"][f"M={mismatch:g}"]
    useless = useless_mask(pairs.x_start, arrays["key_reference"], cfg["coverage_radius"]).numpy()
    b = Axes(canvas, 840, 50, 620, 380, (1.0, 0.0), (-ymax, ymax))
    b.frame(f"B  FORWARD DIFFUSION, M={mismatch:g} (B): USELESS IN RED", "SIGMA", "X", xticks=SIGMA_TICKS,
            yticks=ticks)
    _draw_trajectories(b, result, GRAY, 0.2)
    rng = np.random.default_rng(0)
    for j, s in enumerate(arrays["key_sigmas"][:-1].tolist()):
        xs = pairs.x_start[j].numpy()
        jitter = s + rng.uniform(-0.03, 0.03, size=len(xs))
        b.scatter(jitter[~useless[j]], xs[~useless[j]], GREEN, radius=1.2, alpha=0.35)
        b.scatter(jitter[useless[j]], xs[useless[j]], RED, radius=1.5, alpha=0.8)


def _panel_useless_fraction(canvas: Canvas, result: dict) -> None:
    """(C) the useless fraction against M for the definition's radius and the sensitivity radii."""
    cfg = result["config"]
    rows = [r for r in result["rows"] if r["dataset"] != "trajectory"]
    m_arr = np.array([r["mismatch"] for r in rows])
    ymax_c = max(5.0, max(max(r["useless_pct"].values()) for r in rows) * 1.15)
    c = Axes(canvas, 80, 560, 620, 380, (0.0, float(m_arr.max()) + 0.5), (0.0, ymax_c))
    step = 10 if ymax_c > 40 else 5
    c.frame("C  USELESS START POINTS (%) VS MISMATCH M", "M", "%",
            xticks=[float(m) for m in m_arr], yticks=list(range(0, int(ymax_c) + 1, step)))
    colors = [RED, ORANGE, PURPLE]
    radii = [f"{cfg['coverage_radius']:g}"] + [f"{r:g}" for r in cfg["sensitivity_radii"]]
    for k, r in enumerate(radii):
        vals = np.array([row["useless_pct"][r] for row in rows])
        c.line(m_arr, vals, colors[k % 3], width=3 if k == 0 else 1.5, dashed=k > 0)
        c.scatter(m_arr, vals, colors[k % 3], radius=4 if k == 0 else 2.5)
        canvas.text(c.left + 330, c.top + 12 + 20 * k, f"(B) R={r}" + (" (DEFINITION)" if k == 0 else ""),
                    color=colors[k % 3])
    c.line([0.0, float(m_arr.max()) + 0.5], [0.0, 0.0], GREEN, width=3)
    canvas.text(c.left + 330, c.top + 12 + 20 * len(radii), "(A) TRAJECTORIES: 0", color=GREEN)


def _panel_outputs(canvas: Canvas, result: dict, ymax: float, ticks: list[int]) -> None:
    """(D) histograms of every model's outputs from the same noise."""
    outputs = result["arrays"]["outputs"]
    names = list(outputs)
    d = Axes(canvas, 1040, 560, 420, 380, (-ymax, ymax), (0.0, float(len(names))))
    d.frame("D  OUTPUTS FROM THE SAME NOISE", "X", "", xticks=ticks)
    bins = np.linspace(-ymax, ymax, 141)
    for p in result["config"]["data_points"]:
        d.line([p, p], [0.0, float(len(names))], LIGHT, width=2)
    for i, name in enumerate(names):
        base = len(names) - 1 - i
        hist, _ = np.histogram(outputs[name].numpy(), bins=bins)
        hist = hist / max(1, hist.max())
        color = BLUE if name.startswith("teacher") else GREEN if "trajectory" in name else RED
        for k, h in enumerate(hist):
            if h > 0:
                x0, x1 = float(d.px(bins[k])), float(d.px(bins[k + 1]))
                canvas.rect(x0, float(d.py(base + 0.1)), x1 - 1, float(d.py(base + 0.1 + 0.8 * h)), color)
        label = name.replace("student[", "").replace("]", "").replace("trajectory", "STUDENT (A)")
        if label.startswith("M="):
            label = f"STUDENT (B) {label}"
        canvas.text(d.left - 8, float(d.py(base + 0.5)) - 7, label, anchor="right", scale=2)


def figure(result: dict, path: str | Path, show_mismatch: float | None = None) -> Path:
    """The figure as a PNG: (A) teacher trajectories, (B) forward-diffused start points with the useless ones in
    red, (C) useless fraction against M, (D) the outputs of every model as histograms."""
    cfg = result["config"]
    canvas = Canvas(1500, 1040)
    ymax = float(max(abs(p) for p in cfg["data_points"]) + max(cfg["mismatches"]) + 1.0)
    top_tick = int(ymax // 3) * 3
    ticks = list(range(-top_tick, top_tick + 1, 3))
    ms = list(cfg["mismatches"])
    _panel_trajectories(canvas, result, ymax, ticks)
    _panel_forward_diffusion(canvas, result, ymax, ticks, show_mismatch if show_mismatch is not None
                             else ms[len(ms) // 2])
    _panel_useless_fraction(canvas, result)
    _panel_outputs(canvas, result, ymax, ticks)
    t = result["timings"]
    canvas.text(80, 1000, f"AccVideo 1D toy: teacher {cfg['teacher_iters']} it, students {cfg['student_iters']} it, "
                f"{cfg['student_steps']} steps, r={cfg['coverage_radius']:g}; {t['total_wall_s']:.0f} s wall, "
                f"{t['total_cpu_s']:.0f} s CPU", color=GRAY)
    return canvas.save_png(path)


def to_json(result: dict) -> dict:
    """The JSON-able part of a result (everything but the raw tensors under ``"arrays"``)."""
    return {k: v for k, v in result.items() if k != "arrays"}
