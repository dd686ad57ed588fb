"""The AccVideo distillation loop (paper Eq. 6-8, Alg. 1): :meth:`Trainer.run` and one iteration,
:meth:`Trainer.train_step`, read top to bottom here. What is built before the first iteration lives in
``setup.py`` (data, models, mesh and sharding, optimizers), what is written and restored in ``checkpoint.py``.

Per iteration each rank takes ``total_batch / world`` SynVid samples (micro-batches of ``micro_batch``). For the
key timesteps t'_k (k = m-1 .. 0; t'_m = 1 is noise, t'_0 = 0 is data):
- trajectory loss: the student at (l_{t'_{k+1}}, t'_{k+1}) regresses the segment's average velocity;
- adversarial: Q_m gets fresh noise (k = m-1); a batch popped from Q_{k+1} takes one student Euler step to t'_k
  (pushed to Q_k); the frozen teacher's features at t'_k of real SynVid latents and of these fakes go through
  head H_k. The heads minimise the discriminator loss, the student ``L_traj + lambda_adv * L_G``.
``optim.segment_updates = "sequential"`` updates after every segment as in Alg. 1; ``"joint"`` once per iteration.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from accvideo_core.models.loading import fp8_layout
from accvideo_core.sampling import sample_flow
from accvideo_core.train import distributed as D
from accvideo_core.train import lora_mode
from accvideo_core.train.batching import CONDITIONING, chain_from_noise, collate, conditioning, noise_for
from accvideo_core.train.checkpoint import (Lineage, export_final, load_checkpoint, prepare_out_dir, resolve_resume,
                                            rng_state, save_checkpoint, set_rng_state)
from accvideo_core.train.config import ConfigError, TrainConfig, check_batching
from accvideo_core.train.estimate import SETTING_NAMES as CONFIG_SETTING_NAMES
from accvideo_core.train.estimate import memory_advice, run_settings
from accvideo_core.train.losses import discriminator_loss, generator_loss, segment_target, trajectory_loss
from accvideo_core.train.monitor import Monitor
from accvideo_core.train.queues import TrajectoryQueues
from accvideo_core.train.setup import build_data, build_models
from accvideo_core.utils.io import write_json

SIGNAL_DEBOUNCE = 5.0  # seconds


class Interrupted(Exception):
    """Raised by :meth:`Trainer.run` after Ctrl-C / SIGTERM once the checkpoint is written."""


class _StopRequested(Exception):
    """A stop request all ranks agreed on; the trainer is at a point a checkpoint can record (after an iteration,
    after some segment updates of one (:meth:`Trainer._abandon_update`), or with a validation left to make)."""


@dataclass
class InIteration:
    """Where an interrupted iteration stopped: ``updates_done`` of its segment updates were made (0: none, the
    trainer is as at the iteration's start), the data position at its start, and the metric sums of those
    updates."""

    updates_done: int
    groups: list[list[int]]   # the iteration's segment updates (the segments k of each)
    stream: Any
    sums: dict[str, float]
    counts: dict[str, int]
    norms: list[float]


def device_memory_gb(device: torch.device) -> float:
    """The device's total memory in GB (10^9 bytes); 0 for the CPU (no limit the trainer checks)."""
    return torch.cuda.get_device_properties(device).total_memory / 1e9 if device.type == "cuda" else 0.0


class Trainer:
    """Builds data, student, frozen teacher, heads, optimizers and queues from a :class:`TrainConfig`.

    ``teacher``: an already built ``HunyuanVideoTransformer3D`` (fp32) instead of ``cfg.model.teacher``.
    ``resume``: ``"auto"`` (the latest checkpoint of ``log.out_dir``) or a checkpoint folder; without it a
    non-empty ``log.out_dir`` is refused unless ``overwrite`` (which removes the run files there).
    """

    SETTING_NAMES = CONFIG_SETTING_NAMES   # how the memory advice names the settings (a host: its own inputs)

    def __init__(self, cfg: TrainConfig, *, teacher: nn.Module | None = None, resume: str | None = None,
                 overwrite: bool = False):
        self.cfg = cfg
        self.info = D.init_distributed(cfg.runtime.device, cfg.runtime.fsdp, cfg.runtime.sequence_parallel)
        self.out = Path(cfg.log.out_dir)
        ckdir = resolve_resume(self.out, resume) if resume else None
        prepare_out_dir(self.out, self.info, resuming=ckdir is not None, overwrite=overwrite)
        self.device = self.info.device
        self.bf16 = cfg.runtime.precision == "bf16" or (cfg.runtime.precision == "auto" and
                                                        self.device.type == "cuda")
        if cfg.runtime.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.optim.seed)
        self.n_micro = check_batching(cfg, self.info.dp)
        self.m = cfg.data.segments
        if cfg.loss.queue_capacity < cfg.optim.micro_batch * self.n_micro:
            raise ConfigError(f"loss.queue_capacity ({cfg.loss.queue_capacity}) must hold one iteration of this "
                              f"rank's samples ({cfg.optim.micro_batch * self.n_micro})")
        data = build_data(cfg, self.info)
        self.stream, self.val_records, self.bad_samples = data.stream, data.val_records, data.bad_samples
        self.key_steps, self.key_sigmas = data.key_steps, data.key_sigmas
        self.latent_grid, self.text_tokens = data.latent_grid, data.text_tokens
        models = build_models(cfg, self.info, teacher, bf16=self.bf16)
        self.student, self.teacher, self.ema, self.heads = models.student, models.teacher, models.ema, models.heads
        self.opt, self.head_opt, self.feature_layers = models.opt, models.head_opt, models.feature_layers
        self.adapters, self.base_fingerprint = models.adapters, models.base_fingerprint  # LoRA mode
        self.queues = TrajectoryQueues(self.m, cfg.loss.queue_capacity)
        self._head_inputs: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # see _extra_head_steps
        self.step = 0
        self.teacher_baseline: float | None = None  # the teacher's own m-step validation MSE (computed once)
        self.lineage = Lineage()  # which checkpoints are this run's (pruning)
        self.interrupted = False
        self._signal_time = 0.0
        self._last_note = time.monotonic()
        self.in_iteration: InIteration | None = None  # set when a stop request ends an iteration early
        self.resume_in_iteration: dict | None = None  # a checkpoint's unfinished iteration (load_checkpoint)
        self.validation_pending = False  # a stop request cut a validation short: the resume makes it first
        # on a GPU: the estimate of this run against its memory (in an out-of-memory error; a warning when over)
        self.memory_note = self.memory_warning = ""
        device_gb = device_memory_gb(self.device)
        if device_gb:
            peak, self.memory_note = self.memory_advice(device_gb)
            if peak > device_gb and self.info.is_main:
                self.memory_warning = self.memory_note
                print(f"warning: {self.memory_warning}", file=sys.stderr, flush=True)
        if ckdir is not None:
            load_checkpoint(self, ckdir)
        self.monitor = Monitor(self.out, total_steps=cfg.optim.steps, start_step=self.step,
                               enabled=self.info.is_main, log_every=cfg.log.log_every)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(cfg.to_dict(), self.out / "config.json")
            self.monitor.truncate(self.step)

    # ------------------------------------------------------------------ the run
    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``optim.steps``. ``stop_after``: return right after that iteration without any final
        checkpoint or export (what a killed process leaves behind; used by the resume test)."""
        cfg = self.cfg
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        self._last_checkpoint = time.monotonic()
        try:
            if (self.step == 0 or self.validation_pending) and self.step < cfg.optim.steps:
                self.validate()   # at the start, or the one a stop request cut short before the checkpoint
            while self.step < cfg.optim.steps:
                metrics = self.train_step(self.step)
                self.step += 1
                self.monitor.step(self.step, metrics)
                self._last_note = time.monotonic()
                stop = self._stop_requested()
                if stop_after is not None and self.step >= stop_after:
                    return {"step": self.step, "stopped": True}
                if stop:
                    raise _StopRequested(f"interrupted at step {self.step}")
                due = cfg.log.val_every and self.step % cfg.log.val_every == 0
                if (due or self.step == cfg.loss.heads_only_steps) and self.step < cfg.optim.steps:
                    self.validate()   # also once the heads-only iterations end: the heads before the student moves
                due = cfg.log.ckpt_every and self.step % cfg.log.ckpt_every == 0
                late = cfg.log.ckpt_minutes > 0 and D.any_rank(   # the ranks' clocks differ: they agree
                    time.monotonic() - self._last_checkpoint >= 60.0 * cfg.log.ckpt_minutes, self.info)
                if (due or late) and self.step < cfg.optim.steps:
                    save_checkpoint(self)
                    self._last_checkpoint = time.monotonic()
            final_val = self.validate()
            ckdir = save_checkpoint(self)
            files = {"student": str(self.out / "student.safetensors")}
            if self.adapters is not None:
                files = lora_mode.export_final(self)
            else:
                export_final(self)
            if self.info.is_main:
                if cfg.log.plot:
                    png = self.monitor.plot(self.out / "loss_curves.png", teacher_steps=self.key_steps[-1])
                    self.monitor.note(f"loss curves: {png}")
            return {"step": self.step, "val": final_val, "checkpoint": str(ckdir), **files,
                    "bad_samples": list(self.bad_samples)}
        except _StopRequested as stop:   # all ranks agreed: the trainer is at a consistent point
            path = save_checkpoint(self)
            raise Interrupted(f"{stop}; resume with --resume {path}") from None
        except torch.OutOfMemoryError as err:   # say what the estimate says and what would fit
            if not self.memory_note:
                raise
            raise torch.OutOfMemoryError(f"{err}\n{self.memory_note}") from err
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def memory_advice(self, device_gb: float) -> tuple[float, str]:
        """``train.estimate``'s peak GB per GPU for this run (its model, data size, mode and settings) and what to
        change when it exceeds ``device_gb`` (:func:`~accvideo_core.train.estimate.memory_advice`)."""
        return memory_advice(self.teacher.config, device_gb, self.SETTING_NAMES, **run_settings(
            self.cfg, latent=self.latent_grid, text_tokens=self.text_tokens, gpus=self.info.world, sp=self.info.sp,
            fp8_base=bool(fp8_layout(self.teacher))))   # fp8_base, or an fp8 teacher

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Under torchrun a Ctrl-C reaches a worker twice (terminal + the agent forwarding it): repeats within
        # SIGNAL_DEBOUNCE seconds are the same request; a later one aborts without saving.
        now = time.monotonic()
        if self.interrupted:
            if now - self._signal_time > SIGNAL_DEBOUNCE:
                raise KeyboardInterrupt
            return
        self.interrupted, self._signal_time = True, now
        print(f"\nsignal {signum}: stopping after this micro-batch, writing a checkpoint, then exiting "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def _stop_requested(self) -> bool:
        """Whether any rank was asked to stop. A collective: every rank calls it at the same points (after every
        iteration, and inside one before every micro-batch of every segment)."""
        return D.any_rank(self.interrupted, self.info)

    def close(self) -> None:
        D.shutdown(self.info)

    # ------------------------------------------------------------------ one iteration
    def train_step(self, step: int) -> dict[str, float]:
        """One iteration (``total_batch`` samples over all ranks). Returns metrics averaged over ranks."""
        cfg, m = self.cfg, self.m
        start = self.stream.state_dict()  # a checkpoint inside this iteration draws the same micro-batches again
        micro = [collate([self.stream.next() for _ in range(cfg.optim.micro_batch)]) for _ in range(self.n_micro)]
        start["bad"] = self.stream.state_dict()["bad"]  # corrupt samples found just now are skipped, not re-read
        adversarial = cfg.loss.adversarial and cfg.loss.lambda_adv > 0 and step >= cfg.loss.adv_start_step
        heads_only = step < cfg.loss.heads_only_steps   # the student only makes fakes (they fill the queues)
        order = self.segments_for(step)
        groups = [order] if cfg.optim.segment_updates == "joint" else [[k] for k in order]
        lr = self._set_lr(step)
        resumed, self.resume_in_iteration = self.resume_in_iteration or {}, None
        done = resumed.get("updates_done", 0)   # segment updates a checkpoint inside this iteration had made
        if resumed and resumed["groups"] != groups:
            raise ConfigError(f"the checkpoint was written after {done} segment updates of iteration {step + 1}, "
                              f"whose updates were (segments k) {resumed['groups']}; this run's are {groups}: "
                              "resume it with its optim.segment_updates and optim.segments_per_iteration")
        sums: dict[str, float] = dict(resumed.get("sums", {}))
        counts: dict[str, int] = dict(resumed.get("counts", {}))
        norms: list[float] = list(resumed.get("norms", []))
        lam = cfg.loss.lambda_adv
        for u, group in enumerate(groups):
            if u < done:
                continue
            # what a stop request inside this update rolls back to (the update is made again on resume)
            before = InIteration(u, groups, start, dict(sums), dict(counts), list(norms))
            queues, rng = self.queues.snapshot(), rng_state(self.device)
            self.opt.zero_grad(set_to_none=True)
            self.head_opt.zero_grad(set_to_none=True)
            self._head_inputs = []
            for i, mb in enumerate(micro):
                batch = {k: v.to(self.device) for k, v in mb.items()}
                scale = 1.0 / (len(group) * self.n_micro)
                for n, k in enumerate(group):
                    if self._stop_requested():  # 13B: an iteration takes minutes to hours, a micro-batch seconds
                        self._abandon_update(before, queues, rng)
                    last = i == self.n_micro - 1 and n == len(group) - 1
                    # fakes for t'_k need Q_{k+1} filled (by segment k+1 of this or an earlier iteration)
                    adv_now = adversarial and (k == m - 1 or self.queues.size(k + 1) >= cfg.optim.micro_batch)
                    if heads_only:
                        losses = {}
                        if adv_now:
                            losses = self.adversarial_losses(batch, k, generator=False)
                            (scale * lam * losses["adv_d"]).backward()
                    else:
                        # two backward passes per segment: only one student graph is alive at a time (memory)
                        self._grad_sync(last and not adv_now)
                        losses = self.trajectory_losses(batch, k)
                        (scale * losses["traj"]).backward()
                        if adv_now:
                            self._grad_sync(last)
                            adv = self.adversarial_losses(batch, k)
                            (scale * lam * (adv["adv_g"] + adv["adv_d"])).backward()
                            losses.update(adv)
                    for name, value in losses.items():
                        for key in (name, f"{name}_k{k}"):
                            sums[key] = sums.get(key, 0.0) + float(value.detach())
                            counts[key] = counts.get(key, 0) + 1
                    self._heartbeat(step, k, i)
            self._sync_head_grads()
            if not heads_only:
                if cfg.optim.grad_clip > 0:
                    trained = [p for g in self.opt.param_groups for p in g["params"]]
                    norm = torch.nn.utils.clip_grad_norm_(trained, cfg.optim.grad_clip)
                    norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
                self.opt.step()
            if adversarial:
                self.head_opt.step()
                self._extra_head_steps(scale_of=len(group) * self.n_micro)
        if self.ema is not None and not heads_only:
            self._update_ema()
        metrics = {key: value / counts[key] for key, value in sums.items()}
        if norms:
            metrics["grad_norm"] = sum(norms) / len(norms)
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
        D.all_reduce_mean_([values], self.info)
        out = {n: float(v) for n, v in zip(names, values.tolist())}
        out["lr"] = lr
        if heads_only:
            out["heads_only"] = 1.0
        return out

    def _abandon_update(self, before: InIteration, queues: Any, rng: dict[str, Any]) -> None:
        """Drop the segment update in progress (its gradients; the queues and RNG as before it) and stop: the
        trainer is as after ``before.updates_done`` updates of this iteration, which a checkpoint records."""
        self.opt.zero_grad(set_to_none=True)
        self.head_opt.zero_grad(set_to_none=True)
        self.queues.restore(queues)
        set_rng_state(rng, self.device)
        self.in_iteration = before
        raise _StopRequested(f"interrupted in iteration {self.step + 1} after {before.updates_done} of its segment "
                             "updates (a resume makes the rest)")

    def trajectory_losses(self, batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Eq. 6 for segment k (t'_{k+1} -> t'_k): the student at the noisier key latent vs the average velocity."""
        x_noisy, x_clean, s_noisy, s_clean = self._segment(batch, k)
        t = torch.full((x_noisy.shape[0],), s_noisy * 1000.0, device=self.device)
        with self._autocast():
            v = self.student(x_noisy, t, *conditioning(batch))
        target = segment_target(x_clean, x_noisy, s_clean, s_noisy)
        return {"traj": trajectory_loss(v, target, self.cfg.loss.traj_reduction)}

    def adversarial_losses(self, batch: dict[str, torch.Tensor], k: int, *,
                           generator: bool = True) -> dict[str, torch.Tensor]:
        """Alg. 1 for segment k: fake = one student Euler step from Q_{k+1} (pushed to Q_k); ``adv_g`` trains the
        student only (heads detached), ``adv_d`` trains head H_k only (teacher features of the fake detached).
        ``generator=False`` (``loss.heads_only_steps``): no ``adv_g`` and no graph through the student."""
        m = self.m
        x_noisy, x_clean, s_noisy, s_clean = self._segment(batch, k)
        b = x_noisy.shape[0]
        if k == m - 1:
            cond = {key: batch[key] for key in (*CONDITIONING, "uid")}
            noise = noise_for(batch["uid"], tuple(x_noisy.shape[1:]), self.cfg.optim.seed).to(self.device)
            self.queues.push(m, noise, cond)
        z, cond_fake = self.queues.pop(k + 1, b, self.device)
        t = torch.full((b,), s_noisy * 1000.0, device=self.device)
        with self._autocast(), torch.set_grad_enabled(generator):
            v_fake = self.student(z, t, *conditioning(cond_fake))
        fake = z.float() + (s_clean - s_noisy) * v_fake.float()   # one student Euler step to t'_k
        self.queues.push(k, fake.detach(), cond_fake)
        layer, head, kind = self.feature_layers[k], self.heads[k], self.cfg.loss.gan_loss
        t_clean = torch.full((b,), s_clean * 1000.0, device=self.device)
        with self._autocast(), self._teacher_mode():
            with torch.no_grad():
                f_real = self.teacher.image_features(x_clean, t_clean, *conditioning(batch), layer=layer)
            with torch.set_grad_enabled(generator):
                f_fake = self.teacher.image_features(fake, t_clean, *conditioning(cond_fake), layer=layer)
            logits_real = head(f_real)
            logits_fake_d = head(f_fake.detach())
            if generator:
                frozen = {name: p.detach() for name, p in head.named_parameters()}
                logits_fake_g = functional_call(head, frozen, (f_fake,))
        if self.cfg.loss.head_steps > 1:   # kept for the extra head updates of this group (_extra_head_steps)
            self._head_inputs.append((k, f_real.detach(), f_fake.detach()))
        losses = {"adv_d": discriminator_loss(logits_real, logits_fake_d, kind),
                  "d_real": logits_real.detach().float().mean(), "d_fake": logits_fake_d.detach().float().mean()}
        if generator:
            losses["adv_g"] = generator_loss(logits_fake_g, kind)
        return losses

    def _extra_head_steps(self, scale_of: int) -> None:
        """``loss.head_steps - 1`` more updates of the heads of this group on the teacher features they were just
        updated on (each over all its micro-batches and segments, like the first); the transformers do no extra
        work. Alg. 1 makes one (``head_steps = 1``); docs/training.md says why the miniature needs more."""
        inputs, self._head_inputs = self._head_inputs, []
        kind, lam = self.cfg.loss.gan_loss, self.cfg.loss.lambda_adv
        for _ in range(self.cfg.loss.head_steps - 1):
            self.head_opt.zero_grad(set_to_none=True)
            for k, f_real, f_fake in inputs:
                with self._autocast():
                    loss = discriminator_loss(self.heads[k](f_real), self.heads[k](f_fake), kind)
                (lam * loss / scale_of).backward()
            self._sync_head_grads()
            self.head_opt.step()

    def _segment(self, batch: dict[str, torch.Tensor], k: int) -> tuple:
        """(x at t'_{k+1}, x at t'_k, sigma t'_{k+1}, sigma t'_k) of segment k from a batch of key latents."""
        j_noisy, j_clean = self.m - 1 - k, self.m - k          # indices in sampling order (sigma 1 first)
        lat = batch["key_latents"]
        return lat[:, j_noisy], lat[:, j_clean], self.key_sigmas[j_noisy], self.key_sigmas[j_clean]

    def _teacher_mode(self):
        """LoRA mode: the one model with its adapters off is the teacher."""
        return self.adapters.disabled() if self.adapters is not None else contextlib.nullcontext()

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def segments_for(self, step: int) -> list[int]:
        """Segments k trained in iteration ``step``: all m (k = m-1 .. 0) by default; with
        ``optim.segments_per_iteration = s < m`` the next s of the cycle m-1, ..., 0, m-1, ... (the queues carry
        the student's fakes from one iteration to the next)."""
        m = self.m
        s = self.cfg.optim.segments_per_iteration or m
        return [m - 1 - (step * s + j) % m for j in range(s)]

    def _set_lr(self, step: int) -> float:
        """Linear warm-up over ``optim.warmup_steps``: the heads' from the first iteration, the student's from its
        first update (after ``loss.heads_only_steps``, in which its lr is 0)."""
        o, first = self.cfg.optim, self.cfg.loss.heads_only_steps

        def ramp(i: int) -> float:
            return min(1.0, (i + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0

        lr = o.lr * ramp(step - first) if step >= first else 0.0
        for g in self.opt.param_groups:
            g["lr"] = lr
        for g in self.head_opt.param_groups:
            g["lr"] = o.head_lr * ramp(step)
        return lr

    def _grad_sync(self, last_backward: bool) -> None:
        """FSDP2 reduce-scatters after every backward (sharded gradient memory) unless
        ``runtime.unsharded_accumulation`` keeps full gradients until the group's last backward (less traffic)."""
        if self.info.fsdp and self.cfg.runtime.unsharded_accumulation:
            D.set_gradient_sync(self.student, last_backward)

    def _sync_head_grads(self) -> None:
        grads = [p.grad for p in self.heads.parameters() if p.grad is not None]
        D.all_reduce_mean_(grads, self.info)

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.optim.ema_decay
        for e, p in zip(self.ema.parameters(), self.student.parameters()):
            e_local = e.to_local() if hasattr(e, "to_local") else e
            p_local = p.to_local() if hasattr(p, "to_local") else p
            e_local.lerp_(p_local.detach().to(e_local.dtype), 1.0 - decay)

    def _heartbeat(self, step: int, k: int, micro: int) -> None:
        """Inside long iterations (13B: minutes to hours) a line every ``log.progress_seconds``."""
        every = self.cfg.log.progress_seconds
        now = time.monotonic()
        if every > 0 and now - self._last_note >= every:
            self._last_note = now
            self.monitor.note("  " + self._position(step, k, micro))

    def _position(self, step: int, k: int, micro: int) -> str:
        """Where an iteration is (after one micro-batch of one segment)."""
        return (f"iteration {step + 1}/{self.cfg.optim.steps}: segment k={k} done for micro-batch "
                f"{micro + 1}/{self.n_micro}")

    # ------------------------------------------------------------------ validation
    def _heldout_batches(self):
        """This rank's held-out records in micro-batches, each with per-sample weights (0 = a padding slot: every
        rank runs the same number of forwards, which FSDP needs; an SP group shares its samples)."""
        records, info, mb = self.val_records, self.info, self.cfg.optim.micro_batch
        mine = list(range(info.dp_rank, len(records), info.dp))
        rounds = math.ceil(len(records) / info.dp)
        slots = mine + [None] * (rounds - len(mine))
        for start in range(0, rounds, mb):
            if self._stop_requested():   # 13B: a validation takes minutes, one batch of it seconds
                self.validation_pending = True
                raise _StopRequested(f"interrupted during the validation at step {self.step} (a resume makes it "
                                     "first)")
            chunk = slots[start:start + mb]
            batch = collate([records[i if i is not None else 0] for i in chunk], self.device)
            yield batch, torch.tensor([0.0 if i is None else 1.0 for i in chunk], dtype=torch.float64,
                                      device=self.device)

    def _all_ranks_sum(self, total: torch.Tensor) -> torch.Tensor:
        if self.info.world > 1:
            torch.distributed.all_reduce(total)
        return total

    @torch.no_grad()
    def _few_step_mse(self, model: nn.Module) -> float:
        """Mean over held-out samples of MSE(model's m-step latent from the SynVid noise, teacher's final latent)."""
        if not self.val_records:
            return float("nan")
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch, weight in self._heldout_batches():
            noise, final = batch["key_latents"][:, 0], batch["key_latents"][:, -1]
            with self._autocast():
                x = sample_flow(model, noise, self.key_sigmas, **{key: batch[key] for key in CONDITIONING})
            err = (x.float() - final.float()).pow(2).flatten(1).mean(1)
            total[0] += (err.double() * weight).sum()
            total[1] += weight.sum()
        total = self._all_ranks_sum(total)
        return float(total[0] / total[1])

    @torch.no_grad()
    def discriminator_accuracy(self) -> dict[str, float]:
        """Real/fake accuracy of every head H_k on the held-out samples: real = their key latents at t'_k; fake =
        the student's m-step Euler chain from fresh noise with the same prompts (what the queues hold). A sample
        is judged right when its mean logit is > 0 (real) or < 0 (fake). ``d_acc_k{k}`` per key timestep and
        their mean ``d_acc``; 0.5 is chance."""
        m, sig = self.m, self.key_sigmas
        right = torch.zeros(m + 1, dtype=torch.float64, device=self.device)   # per k, then the sample count
        for batch, weight in self._heldout_batches():
            cond = conditioning(batch)
            with self._autocast():
                fakes = chain_from_noise(self.student, batch, sig, self.cfg.optim.seed)
                with self._teacher_mode():
                    for j, fake in enumerate(fakes):              # sampling order: t'_k with k = m-1-j
                        k = m - 1 - j
                        t_k = torch.full((fake.shape[0],), sig[j + 1] * 1000.0, device=self.device)
                        features = [self.teacher.image_features(x, t_k, *cond, layer=self.feature_layers[k])
                                    for x in (batch["key_latents"][:, j + 1], fake)]
                        logits = [self.heads[k](f).float().flatten(1).mean(1) for f in features]
                        right[k] += (((logits[0] > 0).double() + (logits[1] < 0).double()) * weight).sum()
            right[m] += 2 * weight.sum()
        right = self._all_ranks_sum(right)
        acc = {f"d_acc_k{k}": float(right[k] / right[m]) for k in range(m)}
        return {**acc, "d_acc": sum(acc.values()) / m}

    def validate(self) -> dict[str, float]:
        """Held-out MSE of the student's (and the teacher's, once) m-step samples to the teacher's final latents,
        and the heads' real/fake accuracy; a metrics row and a note. Stops at a stop request (see run)."""
        self.student.eval()
        if self.teacher_baseline is None:
            with self._teacher_mode():
                self.teacher_baseline = self._few_step_mse(self.teacher)
        result = {"student_mse": self._few_step_mse(self.student), "teacher_mse": self.teacher_baseline}
        if self.ema is not None:
            result["student_ema_mse"] = self._few_step_mse(self.ema)
        result["ratio"] = result["student_mse"] / result["teacher_mse"] if result["teacher_mse"] else float("nan")
        if self.cfg.loss.adversarial and self.cfg.loss.lambda_adv > 0 and self.val_records:
            result.update(self.discriminator_accuracy())
        self.student.train()
        self.validation_pending = False
        self.monitor.write({"type": "val", "step": self.step, **result})
        self.monitor.note(f"validation @ step {self.step}: student {self.m}-step MSE {result['student_mse']:.4g}, "
                          f"teacher {self.m}-step MSE {result['teacher_mse']:.4g} (vs the teacher's "
                          f"{self.key_steps[-1]}-step latents of {len(self.val_records)} held-out samples)")
        if "d_acc" in result:
            self.monitor.note("  discriminator real/fake accuracy on them: " + ", ".join(
                f"k={k} {result[f'd_acc_k{k}']:.0%}" for k in range(self.m)))
        return result


def train(cfg: TrainConfig, *, teacher: nn.Module | None = None, resume: str | None = None,
          overwrite: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it (the process group, if any, stays up; see ``__main__``)."""
    return Trainer(cfg, teacher=teacher, resume=resume, overwrite=overwrite).run(stop_after=stop_after)
