"""The paper's 1D toy experiment (AccVideo Fig. 2, supplement A), small enough to run on a CPU in about a minute.

A flow-matching teacher learns the ODE from N(0, 1) to the two data points {-3, +3}. Students (5 Euler steps,
initialised from the teacher, trained with the paper's trajectory loss) are distilled from two kinds of data:

(a) the teacher's own ODE trajectories (AccVideo's SynVid in one dimension), and
(b) forward diffusion of a *mismatched* data set: the teacher's points pushed outwards by M
    (``y -> y + M * sign(y)``), with the teacher's ODE solution from each noisy start point as the target
    (knowledge distillation from forward-diffused start points, as in progressive/consistency distillation).

A start point ``(x, sigma)`` is **useless** when no trajectory of the teacher's trajectory set passes within
``coverage_radius`` of ``x`` at that ``sigma`` (see ``docs/toy1d.md`` for why and for the sensitivity to the
radius). Convention as in the rest of the project: ``x_sigma = (1 - sigma) * x0 + sigma * noise``, velocity
``noise - x0``, Euler from sigma 1 (noise) to 0 (data).

Run ``python -m accvideo_core.toy1d --out DIR`` (writes ``toy1d.json``, ``toy1d.md`` and ``toy1d.png``).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils.io import write_bytes, write_json

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Toy1DConfig:
    """Everything that defines one run. ``PRESETS`` holds the paper-sized, default and CI-sized variants."""

    data_points: tuple[float, ...] = (-3.0, 3.0)
    # network: Conv1D + BatchNorm residual blocks, AvgPool, positional encoding of t, FC head (paper Fig. 8)
    channels: int = 16
    length: int = 8
    blocks: int = 2
    time_features: int = 32
    # teacher: flow matching, Adam (paper: lr 1e-4, batch 2048, 10,000 iterations)
    teacher_iters: int = 2500
    batch: int = 2048
    lr: float = 1e-4
    teacher_steps: int = 50
    # distillation: students with `student_steps` Euler steps on the key sigmas (every k-th teacher sigma)
    student_steps: int = 5
    trajectories: int = 4096
    mismatches: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0)
    student_iters: int = 300
    student_lr: float = 1e-4
    # the "useless point" criterion and its sensitivity check
    coverage_radius: float = 0.1
    sensitivity_radii: tuple[float, ...] = (0.05, 0.2)
    # evaluation
    eval_samples: int = 4096
    on_data_tolerance: float = 0.1
    seed: int = 0
    # torch CPU threads during the run (restored afterwards): the net is so small that a second thread gains
    # little on an idle machine, and OpenMP spinning makes 2 threads several times slower on a busy one
    threads: int = 1

    def __post_init__(self) -> None:
        if self.teacher_steps % self.student_steps:
            raise ValueError(f"teacher_steps ({self.teacher_steps}) must be a multiple of student_steps "
                             f"({self.student_steps}) so that the key sigmas are teacher sigmas")
        if len(self.data_points) < 2 or any(p == 0 for p in self.data_points):
            raise ValueError(f"data_points must hold >= 2 non-zero points (M shifts them away from 0); "
                             f"got {self.data_points}")
        if self.time_features % 2:
            raise ValueError(f"time_features must be even, got {self.time_features}")


PRESETS: dict[str, Toy1DConfig] = {
    # the paper's budget for the teacher (10,000 iterations; the paper gives no student budget); minutes on a CPU
    "paper": Toy1DConfig(teacher_iters=10_000, student_iters=1500),
    # the documented run: iterations scaled down so the whole experiment stays within ~2 minutes on 2 CPU cores
    "default": Toy1DConfig(),
    # CI: a smaller net and batch with a 10x larger learning rate, a few seconds
    "fast": Toy1DConfig(channels=16, length=8, time_features=16, teacher_iters=800, batch=512, lr=1e-3,
                        trajectories=1024, mismatches=(0.0, 1.0, 3.0, 6.0), student_iters=150,
                        student_lr=1e-3, eval_samples=1024),
}


# ---------------------------------------------------------------------------------------------------- network


def time_encoding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal positional encoding of ``t = sigma * 1000`` ([cos, sin], max period 10000, as HunyuanVideo)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock1D(nn.Module):
    """Conv1D -> BatchNorm -> (+ time) -> SiLU -> Conv1D -> BatchNorm, plus the skip connection."""

    def __init__(self, channels: int, time_dim: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm1 = nn.BatchNorm1d(channels)
        self.time_proj = nn.Linear(time_dim, channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = nn.BatchNorm1d(channels)

    def forward(self, hidden: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        residual = F.silu(self.norm1(self.conv1(hidden)) + self.time_proj(time_emb)[:, :, None])
        return F.silu(hidden + self.norm2(self.conv2(residual)))


class ToyVelocityNet(nn.Module):
    """``v(x, sigma)`` for scalar ``x``: x is lifted to a ``channels x length`` signal, refined by residual
    Conv1D/BatchNorm blocks conditioned on the encoding of t, average-pooled and read out by an FC head."""

    def __init__(self, channels: int, length: int, blocks: int, time_features: int, data_scale: float):
        super().__init__()
        self.channels, self.length, self.time_features, self.data_scale = channels, length, time_features, data_scale
        self.lift = nn.Linear(1, channels * length)
        self.time_mlp = nn.Sequential(nn.Linear(time_features, time_features), nn.SiLU())
        self.blocks = nn.ModuleList(ResBlock1D(channels, time_features) for _ in range(blocks))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        hidden = self.lift((x / self.data_scale)[:, None]).view(-1, self.channels, self.length)
        time_emb = self.time_mlp(time_encoding(sigma, self.time_features))
        for block in self.blocks:
            hidden = block(hidden, time_emb)
        return self.head(self.pool(hidden).squeeze(-1)).squeeze(-1)


def make_net(cfg: Toy1DConfig) -> ToyVelocityNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ToyVelocityNet(cfg.channels, cfg.length, cfg.blocks, cfg.time_features,
                              data_scale=max(abs(p) for p in cfg.data_points))


# ---------------------------------------------------------------------------------------------------- training

BatchFn = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def fit(net: nn.Module, batch_fn: BatchFn, iters: int, lr: float, gen: torch.Generator, *, label: str,
        progress: Progress) -> list[float]:
    """Adam on the MSE between ``net(x, sigma)`` and the target velocity; returns the loss every 50 iterations."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    losses: list[float] = []
    for it in range(iters):
        x, sigma, target = batch_fn(gen)
        loss = F.mse_loss(net(x, sigma), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 0 or it == iters - 1:
            losses.append(round(loss.item(), 5))
            progress(f"{label} {it + 1}/{iters} loss {loss.item():.4f}")
    net.eval()
    return losses


def flow_matching_batch(data_points: torch.Tensor, batch: int) -> BatchFn:
    """Rectified-flow pairs: ``x = (1 - sigma) * y + sigma * noise``, target ``noise - y``, sigma ~ U(0, 1)."""

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = data_points[torch.randint(len(data_points), (batch,), generator=gen)]
        noise = torch.randn(batch, generator=gen)
        sigma = torch.rand(batch, generator=gen)
        return (1 - sigma) * y + sigma * noise, sigma, noise - y

    return draw


def trajectory_loss_batch(pairs: "PairSet", key_sigmas: torch.Tensor, batch: int) -> BatchFn:
    """The paper's trajectory loss (Eq. 6): input the noisier key point, target the segment's mean velocity."""
    segments, n = pairs.x_start.shape
    sigma = key_sigmas[:-1, None].expand(segments, n).reshape(-1)
    dsigma = (key_sigmas[1:] - key_sigmas[:-1])[:, None]
    x = pairs.x_start.reshape(-1)
    target = ((pairs.x_end - pairs.x_start) / dsigma).reshape(-1)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x), (batch,), generator=gen)
        return x[idx], sigma[idx], target[idx]

    return draw


# ---------------------------------------------------------------------------------------------------- sampling


def flow_sigmas(steps: int) -> torch.Tensor:
    """``linspace(1, 0, steps + 1)`` (shift 1: the toy needs no resolution shift)."""
    return torch.linspace(1.0, 0.0, steps + 1)


EVAL_CHUNK = 2048  # points per forward pass when sampling: keeps activations in cache (large batches are slower)


@torch.no_grad()
def velocity(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``net(x, sigma)`` in chunks of ``EVAL_CHUNK`` points (per-sample results: BatchNorm is in eval mode)."""
    return torch.cat([net(c, torch.full_like(c, sigma)) for c in x.split(EVAL_CHUNK)]) if len(x) else x


@torch.no_grad()
def euler_trajectory(net: nn.Module, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """All Euler states ``[len(sigmas), N]`` of ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, sigma_i)``."""
    states = [x]
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (s_next - s) * velocity(net, x, s)
        states.append(x)
    return torch.stack(states)


def optimal_velocity(x: torch.Tensor, sigma: torch.Tensor, data_points: torch.Tensor) -> torch.Tensor:
    """The exact flow-matching velocity for point data: ``(x - E[y | x, sigma]) / sigma`` (sigma > 0)."""
    logits = -((x[:, None] - (1 - sigma[:, None]) * data_points[None]) ** 2) / (2 * sigma[:, None] ** 2)
    mean = (torch.softmax(logits, dim=1) * data_points[None]).sum(1)
    return (x - mean) / sigma


# ---------------------------------------------------------------------------------------------------- data sets


@dataclass
class PairSet:
    """Distillation data: per student segment j, start points at key sigma j and the teacher's point at key
    sigma j+1 (``[segments, N]``), the teacher's ODE endpoint from each start, and the data point the pair
    assigns to it (its trajectory's end for (a), the forward-diffused data point for (b))."""

    x_start: torch.Tensor
    x_end: torch.Tensor
    teacher_endpoint: torch.Tensor
    assigned: torch.Tensor


def trajectory_pairs(trajectories: torch.Tensor, stride: int) -> PairSet:
    """(a) Key points of the teacher's own trajectories ``[teacher_steps + 1, N]``."""
    keys = trajectories[::stride]
    final = trajectories[-1].expand_as(keys[:-1])
    return PairSet(keys[:-1].clone(), keys[1:].clone(), final.clone(), final.clone())


def shifted_points(data_points: torch.Tensor, mismatch: float) -> torch.Tensor:
    """The mismatched data set: every point pushed away from 0 (and from the teacher's data) by ``mismatch``."""
    return data_points + mismatch * torch.sign(data_points)


@torch.no_grad()
def euler_from_levels(net: nn.Module, x: torch.Tensor, start_level: torch.Tensor,
                      sigmas: torch.Tensor) -> torch.Tensor:
    """Euler paths ``[len(sigmas), N]`` for start points that begin at different levels of one sigma grid
    (``x[n]`` lives at ``sigmas[start_level[n]]``; entries before a point's start level hold its start value)."""
    states = [x]
    for i, (s, s_next) in enumerate(zip(sigmas[:-1].tolist(), sigmas[1:].tolist())):
        active = start_level <= i
        x = x.clone()
        if active.any():
            xa = x[active]
            x[active] = xa + (s_next - s) * velocity(net, xa, s)
        states.append(x)
    return torch.stack(states)


@torch.no_grad()
def forward_diffusion_pairs(teacher: nn.Module, data_points: torch.Tensor, mismatches: tuple[float, ...], n: int,
                            teacher_sigmas: torch.Tensor, stride: int, gen: torch.Generator) -> list[PairSet]:
    """(b) For each M: start points by forward diffusion of the M-shifted data at each key sigma, targets by the
    teacher's ODE from there (all data sets solved in one batched Euler pass)."""
    segments = (len(teacher_sigmas) - 1) // stride
    levels = (torch.arange(segments) * stride)[:, None].expand(segments, n)  # [segments, n]
    sigma = teacher_sigmas[levels]
    starts, assigned = [], []
    for m in mismatches:
        shifted = shifted_points(data_points, m)
        y = shifted[torch.randint(len(shifted), (segments, n), generator=gen)]
        starts.append((1 - sigma) * y + sigma * torch.randn(segments, n, generator=gen))
        assigned.append(y)
    x = torch.stack(starts)  # [n_mismatch, segments, n]
    start_level = levels.expand_as(x)
    path = euler_from_levels(teacher, x.reshape(-1), start_level.reshape(-1), teacher_sigmas)
    path = path.view(len(teacher_sigmas), *x.shape)
    x_end = path.gather(0, (start_level + stride)[None]).squeeze(0)
    return [PairSet(x[i], x_end[i], path[-1, i], assigned[i]) for i in range(len(mismatches))]


def distance_to_trajectories(x: torch.Tensor, reference_sorted: torch.Tensor) -> torch.Tensor:
    """Distance from each ``x`` to the nearest of the sorted reference positions (same sigma)."""
    idx = torch.searchsorted(reference_sorted, x.contiguous()).clamp(1, len(reference_sorted) - 1)
    return torch.minimum((x - reference_sorted[idx - 1]).abs(), (x - reference_sorted[idx]).abs())


def useless_mask(x_start: torch.Tensor, key_reference: torch.Tensor, radius: float) -> torch.Tensor:
    """``[segments, N]`` True where no teacher trajectory passes within ``radius`` of the start point.

    ``key_reference`` holds the teacher trajectory set at the same key sigmas, ``[segments, N_ref]``.
    """
    ref = key_reference.sort(dim=1).values
    return torch.stack([distance_to_trajectories(x_start[j], ref[j]) > radius for j in range(len(x_start))])


def nearest_point(x: torch.Tensor, data_points: torch.Tensor) -> torch.Tensor:
    return data_points[(x[..., None] - data_points).abs().argmin(-1)]


def endpoint_mismatch(pairs: PairSet, data_points: torch.Tensor) -> torch.Tensor:
    """True where the teacher's trajectory through the start point ends at a different teacher data point than
    the one nearest to the pair's assigned data point (the Gaussian-noise mismatch of forward diffusion)."""
    return nearest_point(pairs.teacher_endpoint, data_points) != nearest_point(pairs.assigned, data_points)


def output_stats(outputs: torch.Tensor, reference: torch.Tensor, data_points: torch.Tensor,
                 tolerance: float) -> dict[str, float]:
    """How well generated points land on the data, and their paired error to the teacher's 50-step outputs."""
    dist = (outputs[:, None] - data_points[None]).abs().min(1).values
    return {
        "on_data_pct": 100.0 * (dist <= tolerance).float().mean().item(),
        "mean_dist_to_data": dist.mean().item(),
        "mean_abs_err_to_teacher50": (outputs - reference).abs().mean().item(),
        "positive_pct": 100.0 * (outputs > 0).float().mean().item(),
    }


# ---------------------------------------------------------------------------------------------------- experiment


class _Clock:
    """Wall and process-CPU seconds per phase (CPU time stays meaningful on a shared, loaded machine)."""

    def __init__(self, timings: dict[str, float]):
        self.timings = timings
        self.start = self.last = (time.perf_counter(), time.process_time())

    def lap(self, name: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.timings[f"{name}_wall_s"] = now[0] - self.last[0]
        self.timings[f"{name}_cpu_s"] = now[1] - self.last[1]
        self.last = now

    def total(self) -> None:
        self.timings["total_wall_s"] = time.perf_counter() - self.start[0]
        self.timings["total_cpu_s"] = time.process_time() - self.start[1]


def run(cfg: Toy1DConfig, progress: Progress | None = None) -> dict:
    """Run the whole experiment and return a JSON-able result dict (with raw arrays under ``"arrays"``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Toy1DConfig, progress: Progress | None) -> dict:
    progress = progress or (lambda msg: None)
    timings: dict[str, float] = {}
    clock = _Clock(timings)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = torch.tensor(cfg.data_points, dtype=torch.float32)
    teacher_sigmas = flow_sigmas(cfg.teacher_steps)
    stride = cfg.teacher_steps // cfg.student_steps
    key_sigmas = teacher_sigmas[::stride]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        # 1. teacher
        teacher = make_net(cfg)
        teacher_losses = fit(teacher, flow_matching_batch(data, cfg.batch), cfg.teacher_iters, cfg.lr, gen,
                             label="teacher", progress=progress)
        clock.lap("teacher")

        # 2. the teacher's trajectory set (the toy's SynVid) and its accuracy against the exact velocity field
        trajectories = euler_trajectory(teacher, torch.randn(cfg.trajectories, generator=gen), teacher_sigmas)
        with torch.no_grad():
            lv = trajectories[:-1].reshape(-1)
            ls = teacher_sigmas[:-1, None].expand(-1, cfg.trajectories).reshape(-1)
            v_teacher, v_exact = teacher(lv, ls), optimal_velocity(lv, ls, data)
        velocity_rel_err = ((v_teacher - v_exact).norm() / v_exact.norm()).item()
        key_reference = trajectories[::stride][:-1]

        # 3. distillation data sets and their useless points
        datasets: dict[str, PairSet] = {"trajectory": trajectory_pairs(trajectories, stride)}
        shifted_sets = forward_diffusion_pairs(teacher, data, cfg.mismatches, cfg.trajectories, teacher_sigmas,
                                               stride, gen)
        datasets.update({f"M={m:g}": pairs for m, pairs in zip(cfg.mismatches, shifted_sets)})
        eval_noise = torch.randn(cfg.eval_samples, generator=gen)
        teacher50_path = euler_trajectory(teacher, eval_noise, teacher_sigmas)
        heldout = teacher50_path[::stride][:-1]  # fresh teacher trajectories at the key sigmas
        radii = (cfg.coverage_radius, *cfg.sensitivity_radii)
        clock.lap("data")

        # 4. students: the teacher's architecture and weights, trained on each data set with the trajectory loss
        teacher50 = teacher50_path[-1]
        outputs = {"teacher-50": teacher50, f"teacher-{cfg.student_steps}": euler_trajectory(teacher, eval_noise,
                                                                                               key_sigmas)[-1]}
        student_losses = {}
        for name, pairs in datasets.items():
            student = copy.deepcopy(teacher)
            student_losses[name] = fit(student, trajectory_loss_batch(pairs, key_sigmas, cfg.batch),
                                       cfg.student_iters, cfg.student_lr, gen, label=f"student[{name}]",
                                       progress=progress)
            outputs[f"student[{name}]"] = euler_trajectory(student, eval_noise, key_sigmas)[-1]
        clock.lap("students")
    clock.total()

    rows = []
    for name, pairs in datasets.items():
        row = {"dataset": name, "mismatch": None if name == "trajectory" else float(name[2:]),
               "useless_pct": {f"{r:g}": 100.0 * useless_mask(pairs.x_start, key_reference, r).float().mean().item()
                               for r in radii},
               "useless_pct_per_key_sigma": [round(100.0 * v, 3) for v in useless_mask(
                   pairs.x_start, key_reference, cfg.coverage_radius).float().mean(1).tolist()],
               "endpoint_mismatch_pct": 100.0 * endpoint_mismatch(pairs, data).float().mean().item(),
               "student": output_stats(outputs[f"student[{name}]"], teacher50, data, cfg.on_data_tolerance)}
        rows.append(row)
    heldout_useless = {f"{r:g}": 100.0 * useless_mask(heldout, key_reference, r).float().mean().item() for r in radii}
    return {
        "config": asdict(cfg),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "teacher": {"final_loss": teacher_losses[-1], "velocity_rel_err_on_trajectories": velocity_rel_err,
                    **{f"{k}_outputs": output_stats(outputs[k], teacher50, data, cfg.on_data_tolerance)
                       for k in ("teacher-50", f"teacher-{cfg.student_steps}")}},
        "heldout_teacher_trajectories_useless_pct": heldout_useless,
        "rows": rows,
        "losses": {"teacher": teacher_losses, "students": student_losses},
        "arrays": {"key_sigmas": key_sigmas, "teacher_sigmas": teacher_sigmas, "trajectories": trajectories,
                   "key_reference": key_reference, "datasets": datasets, "outputs": outputs},
    }


# ---------------------------------------------------------------------------------------------------- reporting


def markdown_table(result: dict) -> str:
    cfg = result["config"]
    radius = f"{cfg['coverage_radius']:g}"
    others = [f"{r:g}" for r in cfg["sensitivity_radii"]]
    head = (f"| distillation data | useless % (r={radius}) | " + " | ".join(f"useless % (r={r})" for r in others)
            + " | endpoint mismatch % | student on data % | student mean dist to data | student mean abs err vs teacher-50 |")
    lines = [head, "|" + "---|" * (6 + len(others))]
    for row in result["rows"]:
        name = "teacher trajectories (a)" if row["dataset"] == "trajectory" else f"forward diffusion, {row['dataset']} (b)"
        s = row["student"]
        lines.append(f"| {name} | {row['useless_pct'][radius]:.2f} | "
                     + " | ".join(f"{row['useless_pct'][r]:.2f}" for r in others)
                     + f" | {row['endpoint_mismatch_pct']:.2f} | {s['on_data_pct']:.1f} | {s['mean_dist_to_data']:.3f}"
                     f" | {s['mean_abs_err_to_teacher50']:.3f} |")
    held = result["heldout_teacher_trajectories_useless_pct"]
    lines.append(f"| (check) fresh teacher trajectories, held out | {held[radius]:.2f} | "
                 + " | ".join(f"{held[r]:.2f}" for r in others) + " | - | - | - | - |")
    t = result["teacher"]
    steps = cfg["student_steps"]
    for k in ("teacher-50", f"teacher-{steps}"):
        s = t[f"{k}_outputs"]
        lines.append(f"| (baseline) {k} sampling, no distillation | - | " + " | ".join("-" for _ in others)
                     + f" | - | {s['on_data_pct']:.1f} | {s['mean_dist_to_data']:.3f} | {s['mean_abs_err_to_teacher50']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | Path, show_mismatch: float | None = None) -> Path:
    """The figure: (A) teacher trajectories, (B) forward-diffused start points with the useless ones in red,
    (C) useless fraction against M, (D) the outputs of every model as histograms."""
    from .toy.plot import BLACK, BLUE, GRAY, GREEN, LIGHT, ORANGE, PURPLE, RED, Axes, Canvas

    cfg, arrays = result["config"], result["arrays"]
    key_sigmas = arrays["key_sigmas"]
    canvas = Canvas(1500, 1040)
    ymax = float(max(abs(p) for p in cfg["data_points"]) + max(cfg["mismatches"]) + 1.0)
    top_tick = int(ymax // 3) * 3
    ticks = list(range(-top_tick, top_tick + 1, 3))

    def draw_trajectories(ax: Axes, color, alpha: float) -> None:
        sig = arrays["teacher_sigmas"].numpy()
        traj = arrays["trajectories"].numpy()
        for i in range(0, traj.shape[1], max(1, traj.shape[1] // 96)):
            ax.line(sig, traj[:, i], color, width=1.0, alpha=alpha)
        for p in cfg["data_points"]:
            ax.scatter([0.0], [p], BLACK, radius=5)

    a = Axes(canvas, 80, 50, 620, 380, (1.0, 0.0), (-ymax, ymax))
    a.frame("A  TEACHER ODE TRAJECTORIES = DATA (A)", "SIGMA (1 = NOISE, 0 = DATA)", "X",
            xticks=[1.0, 0.8, 0.6, 0.4, 0.2, 0.0], yticks=ticks)
    draw_trajectories(a, BLUE, 0.25)
    ref = arrays["key_reference"].numpy()
    for j, s in enumerate(key_sigmas[:-1].tolist()):
        a.scatter(np.full(ref.shape[1], s), ref[j], GREEN, radius=1.5, alpha=0.5)

    ms = [m for m in cfg["mismatches"]]
    m_show = show_mismatch if show_mismatch is not None else ms[len(ms) // 2]
    pairs = arrays["datasets"][f"M={m_show:g}"]
    useless = useless_mask(pairs.x_start, arrays["key_reference"], cfg["coverage_radius"]).numpy()
    b = Axes(canvas, 840, 50, 620, 380, (1.0, 0.0), (-ymax, ymax))
    b.frame(f"B  FORWARD DIFFUSION, M={m_show:g} (B): USELESS IN RED", "SIGMA", "X",
            xticks=[1.0, 0.8, 0.6, 0.4, 0.2, 0.0], yticks=ticks)
    draw_trajectories(b, GRAY, 0.2)
    rng = np.random.default_rng(0)
    for j, s in enumerate(key_sigmas[:-1].tolist()):
        xs = pairs.x_start[j].numpy()
        jitter = s + rng.uniform(-0.03, 0.03, size=len(xs))
        b.scatter(jitter[~useless[j]], xs[~useless[j]], GREEN, radius=1.2, alpha=0.35)
        b.scatter(jitter[useless[j]], xs[useless[j]], RED, radius=1.5, alpha=0.8)

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

    outputs = arrays["outputs"]
    names = list(outputs)
    d = Axes(canvas, 1040, 560, 420, 380, (-ymax, ymax), (0.0, float(len(names))))
    d.frame("D  OUTPUTS FROM THE SAME NOISE", "X", "", xticks=ticks)
    bins = np.linspace(-ymax, ymax, 141)
    for p in cfg["data_points"]:
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
    canvas.text(80, 1000, f"AccVideo 1D toy: teacher {cfg['teacher_iters']} it, students {cfg['student_iters']} it, "
                f"{cfg['student_steps']} steps, r={cfg['coverage_radius']:g}; {result['timings']['total_wall_s']:.0f} s wall, "
                f"{result['timings']['total_cpu_s']:.0f} s CPU",
                color=GRAY)
    return canvas.save_png(path)


def to_json(result: dict) -> dict:
    """The JSON-able part of a result (everything but the raw tensors under ``"arrays"``)."""
    return {k: v for k, v in result.items() if k != "arrays"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accvideo_core.toy1d", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder for toy1d.json/.md/.png")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="default: ~1-2 min on 2 CPU cores; fast: seconds (CI); paper: the paper's 10k "
                             "teacher iterations")
    parser.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1: fastest for this tiny net on a shared machine)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset]
    if args.seed is not None:
        cfg = replace(cfg, seed=args.seed)
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"\r\033[K{msg}", end="", file=sys.stderr, flush=True)

    try:
        result = run(cfg, progress)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing written", file=sys.stderr)
        return 130
    if not args.quiet:
        print(file=sys.stderr)
    out: Path = args.out
    write_json(to_json(result), out / "toy1d.json")
    table = markdown_table(result)
    write_bytes(table.encode(), out / "toy1d.md")
    plot(result, out / "toy1d.png")
    print(table)
    print(f"teacher: final loss {result['teacher']['final_loss']:.4f}, velocity rel. error on its trajectories "
          f"{result['teacher']['velocity_rel_err_on_trajectories']:.4f}; timings {result['timings']}")
    print(f"wrote {out / 'toy1d.json'}, {out / 'toy1d.md'}, {out / 'toy1d.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
