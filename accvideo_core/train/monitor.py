"""Run logging: JSONL of every metric per iteration, a progress line with step/s and ETA, loss-curve PNG."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from accvideo_core.train.plot import plot_panels
from accvideo_core.utils.io import write_bytes


class Monitor:
    """Rank-0 logger. ``metrics.jsonl`` gets one JSON object per iteration (and per validation)."""

    def __init__(self, out_dir: Path, *, total_steps: int, start_step: int, enabled: bool, log_every: int = 1,
                 stream=None):
        self.enabled = enabled
        self.total, self.start = total_steps, start_step
        self.log_every = max(1, log_every)
        self.stream = stream or sys.stderr
        self.path = out_dir / "metrics.jsonl"
        self.t0 = time.perf_counter()
        self.last_line = ""
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate(self, step: int) -> None:
        """Keep only rows up to ``step`` (none for a fresh run): on resume, the rows of the killed run past its
        checkpoint go. Rewritten atomically, so a kill here never cuts the log."""
        if not self.enabled or not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if step > 0 and json.loads(line).get("step", 0) <= step]
        write_bytes("".join(line + "\n" for line in kept).encode(), self.path)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Record iteration ``step`` (1-based count of finished iterations) and maybe print the progress line."""
        self.write({"type": "train", "step": step, "time": round(time.perf_counter() - self.t0, 3), **metrics})
        if self.enabled and (step % self.log_every == 0 or step == self.total):
            self.last_line = self.progress_line(step, metrics)
            print(self.last_line, file=self.stream, flush=True)

    def progress_line(self, step: int, metrics: dict[str, float]) -> str:
        """``step 3/6 | traj 0.01 | ... | 0.5 step/s | ETA 0:00:06`` after iteration ``step`` of this process."""
        elapsed = time.perf_counter() - self.t0
        rate = (step - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        parts = [f"step {step}/{self.total}"] + (["heads only"] if metrics.get("heads_only") else [])
        for key in ("traj", "adv_g", "adv_d", "grad_norm"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        parts.append(f"{rate:.3g} step/s")
        parts.append(f"ETA {_hms(eta)}")
        return " | ".join(parts)

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def plot(self, out_png: Path, *, teacher_steps: int) -> Path | None:
        """Loss curves of ``metrics.jsonl``: trajectory loss per segment, adversarial losses, validation MSE
        (to the teacher's final latent after ``teacher_steps`` steps)."""
        if not self.enabled or not self.path.is_file():
            return None
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [r for r in rows if r.get("type") == "train"]
        val = [r for r in rows if r.get("type") == "val"]

        def series(records: list[dict], keys: list[str]) -> dict[str, list[tuple[float, float]]]:
            return {k: [(r["step"], float(r[k])) for r in records if k in r] for k in keys}

        traj_keys = ["traj"] + sorted({k for r in train for k in r if k.startswith("traj_k")})
        panels = [("TRAJECTORY LOSS", series(train, traj_keys), True)]
        if any("adv_g" in r for r in train):
            panels.append(("ADVERSARIAL", series(train, ["adv_g", "adv_d"]), False))
        if val:
            title = f"VALIDATION MSE TO TEACHER {teacher_steps} STEP"
            panels.append((title, series(val, ["student_mse", "teacher_mse"]), True))
        return plot_panels(panels, out_png)


def _hms(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
