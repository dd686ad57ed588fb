"""A teacher sampling run -> SynVid samples: the one implementation behind the core dumper and the ComfyUI node.

Both sample with the same Euler integrator (``accvideo_core.sampling.euler_flow``: through our transformer in
``dump``, through ComfyUI's model in the node), record the trajectory with :class:`TrajectoryRecorder` and turn it
into samples with :func:`trajectory_samples`; :class:`TeacherRun` holds the settings (by default the HunyuanVideo
teacher preset) and what follows from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from accvideo_core.latents import latent_shape
from accvideo_core.sampling import ACCVIDEO_STUDENT, HUNYUAN_TEACHER, check_settings, flow_sigmas
from accvideo_core.synvid.format import SynVidSample, dataset_facts, key_steps_for, stored_steps_for


class TrajectoryRecorder:
    """Collects the Euler iterates of one sampling run at the requested step indices (0 = initial noise).

    Use :meth:`start` with the initial latent and pass :meth:`on_step` as the ``euler_flow`` callback (it reads
    ``info["i"]`` and ``info["x"]``, the latent at ``sigmas[i + 1]``). Latents are copied to ``device``.
    """

    def __init__(self, steps: Sequence[int], device: str | torch.device = "cpu"):
        self.steps = sorted(set(int(s) for s in steps))
        self.device = torch.device(device)
        self.latents: dict[int, torch.Tensor] = {}

    def start(self, x: torch.Tensor) -> None:
        self.latents.clear()
        self._keep(0, x)

    def on_step(self, info: dict) -> None:
        self._keep(int(info["i"]) + 1, info["x"])

    def _keep(self, step: int, x: torch.Tensor) -> None:
        if step in self.steps:
            self.latents[step] = x.detach().to(self.device, torch.float32, copy=True)

    def stacked(self) -> torch.Tensor:
        """``[S, B, C, T, H, W]`` in the order of :attr:`steps`; raises if a step was never reached."""
        missing = [s for s in self.steps if s not in self.latents]
        if missing:
            raise RuntimeError(f"trajectory is missing steps {missing}: sampling stopped early")
        return torch.stack([self.latents[s] for s in self.steps])



@dataclass(frozen=True)
class TeacherRun:
    """Settings of a teacher sampling run whose trajectories become SynVid samples (validated on creation)."""

    frames: int
    height: int
    width: int
    steps: int = HUNYUAN_TEACHER.steps
    shift: float = HUNYUAN_TEACHER.shift
    guidance: float = HUNYUAN_TEACHER.guidance
    segments: int = ACCVIDEO_STUDENT.steps  # the student's steps m: key latents at every steps/m teacher steps
    store: str = "key"                       # accvideo_core.synvid.format.STORE_MODES
    source_model: str = ""
    source_model_hash: str = ""

    def __post_init__(self) -> None:
        check_settings(shift=self.shift, guidance=self.guidance)
        stored_steps_for(self.steps, self.store, self.segments)
        latent_shape(self.frames, self.height, self.width)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``[16, T, H, W]`` of one sample."""
        return latent_shape(self.frames, self.height, self.width)[1:]

    @property
    def key_steps(self) -> list[int]:
        return key_steps_for(self.steps, self.segments)

    @property
    def stored_steps(self) -> list[int]:
        return stored_steps_for(self.steps, self.store, self.segments)

    def sigmas(self) -> torch.Tensor:
        return flow_sigmas(self.steps, self.shift)

    def recorder(self, device: str | torch.device = "cpu") -> TrajectoryRecorder:
        return TrajectoryRecorder(self.stored_steps, device)

    def record_bytes(self, batch: int) -> int:
        """Host bytes the recorder keeps for a batch (fp32 latents at the stored steps)."""
        return batch * len(self.stored_steps) * 4 * int(torch.Size(self.latent_shape).numel())

    def facts(self, text_dim: int, pooled_shape: Sequence[int]) -> dict[str, object]:
        """The data-set facts the samples of this run will have, known before sampling (to check a folder)."""
        empty = torch.empty((len(self.stored_steps), *self.latent_shape), device="meta")
        template = self._sample(empty, torch.empty((1, text_dim), device="meta"), torch.ones(1, dtype=torch.bool),
                                torch.empty(tuple(pooled_shape), device="meta"), seed=0, prompt="", extra={})
        return dataset_facts(template)

    def _sample(self, latents: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor, *, seed: int, prompt: str, extra: Mapping[str, object]) -> SynVidSample:
        return SynVidSample(
            latents=latents, stored_steps=self.stored_steps, sigmas=self.sigmas(), text_states=text_states,
            text_mask=text_mask.bool(), pooled=pooled, guidance=float(self.guidance), prompt=prompt, seed=int(seed),
            shift=float(self.shift), height=self.height, width=self.width, frames=self.frames,
            source_model=self.source_model, source_model_hash=self.source_model_hash, key_steps=self.key_steps,
            extra={k: str(v) for k, v in extra.items()})


def trajectory_samples(run: TeacherRun, trajectory: torch.Tensor, *, seeds: Sequence[int], prompts: Sequence[str],
                       text_states: torch.Tensor, text_mask: torch.Tensor, pooled: torch.Tensor,
                       extra: Sequence[Mapping[str, object]] | None = None) -> list[SynVidSample]:
    """SynVid samples from a recorded trajectory ``[S, B, 16, T, H, W]`` (model space, :meth:`TrajectoryRecorder.
    stacked`) and the batch's conditioning ``text_states [B, L, D]``, ``text_mask [B, L]``, ``pooled [B, P]``."""
    batch = trajectory.shape[1]
    if not len(seeds) == len(prompts) == text_states.shape[0] == batch:
        raise ValueError(f"a trajectory of {batch} samples needs {batch} seeds, prompts and conditionings; got "
                         f"{len(seeds)}, {len(prompts)}, {text_states.shape[0]}")
    return [run._sample(trajectory[:, b], text_states[b].cpu(), text_mask[b].cpu(), pooled[b].cpu(), seed=seeds[b],
                        prompt=prompts[b], extra=extra[b] if extra else {}) for b in range(batch)]
