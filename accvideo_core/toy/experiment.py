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

The command line (``python -m accvideo_core.toy --out DIR``) is in ``__main__.py``, the table and the figure in
``report.py``.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Toy1DConfig:
    """Everything that defines one run. ``RUN_SIZES`` holds the paper-sized, default and CI-sized variants."""

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


RUN_SIZES: dict[str, Toy1DConfig] = {  # the CLI's --size
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


def linear_sigmas(steps: int) -> torch.Tensor:
    """``linspace(1, 0, steps + 1)`` in fp32: the toy's unshifted schedule (a 1D toy needs no resolution shift).

    Not ``sampling.flow_sigmas(steps, shift=1.0)``: that rounds an fp64 linspace and differs by an ulp at some
    points (e.g. 50 steps), which would move the documented figures."""
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
    """How well generated points land on the data, and their paired error to the teacher's full-step outputs
    (``reference``: the teacher with ``teacher_steps`` from the same noise)."""
    dist = (outputs[:, None] - data_points[None]).abs().min(1).values
    return {
        "on_data_pct": 100.0 * (dist <= tolerance).float().mean().item(),
        "mean_dist_to_data": dist.mean().item(),
        "mean_abs_err_to_teacher": (outputs - reference).abs().mean().item(),
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
    teacher_sigmas = linear_sigmas(cfg.teacher_steps)
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
        teacher_path = euler_trajectory(teacher, eval_noise, teacher_sigmas)
        heldout = teacher_path[::stride][:-1]  # fresh teacher trajectories at the key sigmas
        clock.lap("data")

        # 4. students: the teacher's architecture and weights, trained on each data set with the trajectory loss
        teacher_full = teacher_path[-1]
        outputs = {f"teacher-{cfg.teacher_steps}": teacher_full,
                   f"teacher-{cfg.student_steps}": euler_trajectory(teacher, eval_noise, key_sigmas)[-1]}
        student_losses = {}
        for name, pairs in datasets.items():
            student = copy.deepcopy(teacher)
            student_losses[name] = fit(student, trajectory_loss_batch(pairs, key_sigmas, cfg.batch),
                                       cfg.student_iters, cfg.student_lr, gen, label=f"student[{name}]",
                                       progress=progress)
            outputs[f"student[{name}]"] = euler_trajectory(student, eval_noise, key_sigmas)[-1]
        clock.lap("students")
    clock.total()

    rows, heldout_useless = _summarise(cfg, data, datasets, key_reference, heldout, outputs)
    return {
        "config": asdict(cfg),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "teacher": {"final_loss": teacher_losses[-1], "velocity_rel_err_on_trajectories": velocity_rel_err,
                    **{f"{k}_outputs": output_stats(outputs[k], teacher_full, data, cfg.on_data_tolerance)
                       for k in (f"teacher-{cfg.teacher_steps}", f"teacher-{cfg.student_steps}")}},
        "heldout_teacher_trajectories_useless_pct": heldout_useless,
        "rows": rows,
        "losses": {"teacher": teacher_losses, "students": student_losses},
        "arrays": {"key_sigmas": key_sigmas, "teacher_sigmas": teacher_sigmas, "trajectories": trajectories,
                   "key_reference": key_reference, "datasets": datasets, "outputs": outputs},
    }


def _summarise(cfg: Toy1DConfig, data: torch.Tensor, datasets: dict[str, PairSet], key_reference: torch.Tensor,
               heldout: torch.Tensor, outputs: dict[str, torch.Tensor]) -> tuple[list[dict], dict[str, float]]:
    """One table row per distillation data set (useless fractions, endpoint mismatch, its student's outputs) and
    the useless fraction of fresh teacher trajectories (the control)."""
    radii = (cfg.coverage_radius, *cfg.sensitivity_radii)
    teacher_full = outputs[f"teacher-{cfg.teacher_steps}"]
    rows = []
    for name, pairs in datasets.items():
        rows.append({
            "dataset": name, "mismatch": None if name == "trajectory" else float(name[2:]),
            "useless_pct": {f"{r:g}": 100.0 * useless_mask(pairs.x_start, key_reference, r).float().mean().item()
                            for r in radii},
            "useless_pct_per_key_sigma": [round(100.0 * v, 3) for v in useless_mask(
                pairs.x_start, key_reference, cfg.coverage_radius).float().mean(1).tolist()],
            "endpoint_mismatch_pct": 100.0 * endpoint_mismatch(pairs, data).float().mean().item(),
            "student": output_stats(outputs[f"student[{name}]"], teacher_full, data, cfg.on_data_tolerance)})
    heldout_useless = {f"{r:g}": 100.0 * useless_mask(heldout, key_reference, r).float().mean().item() for r in radii}
    return rows, heldout_useless
