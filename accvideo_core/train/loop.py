"""The AccVideo distillation loop (paper Eq. 6-8, Alg. 1), nanoGPT style: one class, one ``run``.

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
import copy
import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from accvideo_core.sampling import sample_flow
from accvideo_core.synvid.format import SynVidDataset, SynVidError, key_steps_for, read_sample
from accvideo_core.train import distributed as D
from accvideo_core.train.batching import Record, SampleStream, collate, noise_for, sample_record
from accvideo_core.train.config import ConfigError, TrainConfig, check_batching
from accvideo_core.train.heads import build_heads, default_feature_layers
from accvideo_core.train.losses import discriminator_loss, generator_loss, segment_target, trajectory_loss
from accvideo_core.train.monitor import Monitor
from accvideo_core.train.queues import TrajectoryQueues
from accvideo_core.utils.io import atomic_path, load_torch, read_state_dict, save_safetensors, save_torch, write_json

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CHECKPOINT_DIR = "checkpoints"
SIGNAL_DEBOUNCE = 5.0  # seconds


class Interrupted(Exception):
    """Raised by :meth:`Trainer.run` after Ctrl-C / SIGTERM once the checkpoint is written."""


class Trainer:
    """Builds data, student, frozen teacher, heads, optimizers and queues from a :class:`TrainConfig`.

    ``teacher``: an already built ``HunyuanVideoTransformer3D`` (fp32) instead of ``cfg.model.teacher``.
    """

    def __init__(self, cfg: TrainConfig, *, teacher: nn.Module | None = None, resume: str | None = None):
        self.cfg = cfg
        self.info = D.init_distributed(cfg.runtime.device, cfg.runtime.fsdp)
        self.out = Path(cfg.log.out_dir)
        self.device = self.info.device
        cuda = self.device.type == "cuda"
        self.bf16 = cfg.runtime.precision == "bf16" or (cfg.runtime.precision == "auto" and cuda)
        if cfg.runtime.deterministic:
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.optim.seed)
        self.n_micro = check_batching(cfg, self.info.world)
        self.m = cfg.data.segments
        if cfg.loss.queue_capacity < cfg.optim.micro_batch * self.n_micro:
            raise ConfigError(f"loss.queue_capacity ({cfg.loss.queue_capacity}) must hold one iteration of this "
                              f"rank's samples ({cfg.optim.micro_batch * self.n_micro})")
        self.bad_samples: list[str] = []
        self._setup_data()
        self._setup_models(teacher)
        self.queues = TrajectoryQueues(self.m, cfg.loss.queue_capacity)
        self.step = 0
        self.teacher5: float | None = None
        self.interrupted = False
        self._signal_time = 0.0
        self._last_note = time.monotonic()
        if resume:
            self._load_checkpoint(self._resolve_resume(resume))
        self.monitor = Monitor(self.out, total_steps=cfg.optim.steps, start_step=self.step,
                               enabled=self.info.is_main, log_every=cfg.log.log_every)
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(cfg.to_dict(), self.out / "config.json")
            self._truncate_metrics(self.step)

    # ------------------------------------------------------------------ setup
    def _setup_data(self) -> None:
        cfg, info = self.cfg, self.info
        root = cfg.data.root
        if not root:
            raise ConfigError("data.root is empty: set it to a SynVid folder (python -m accvideo_core.synvid.dump)")
        probe = SynVidDataset(root)
        steps = probe.manifest.get("steps")
        if not isinstance(steps, int):
            raise SynVidError(f"{root}: manifest has no teacher 'steps'; rebuild it")
        self.key_steps = key_steps_for(steps, self.m)
        train_ds = SynVidDataset(root, steps=self.key_steps)
        n = len(train_ds)
        if cfg.data.val_root:
            val_ds = SynVidDataset(cfg.data.val_root, steps=self.key_steps)
            val_idx, train_idx = list(range(min(len(val_ds), max(cfg.data.val_samples, 0)))), list(range(n))
        else:
            n_val = max(0, min(cfg.data.val_samples, n - info.world))
            val_ds, val_idx, train_idx = train_ds, list(range(n - n_val, n)), list(range(n - n_val))
        self.key_sigmas: list[float] | None = None
        for i in train_idx:
            try:
                s = read_sample(train_ds.path(i), steps=self.key_steps[:1], check_finite=False)
            except SynVidError:
                continue
            self.key_sigmas = [float(s.sigmas[j]) for j in self.key_steps]
            break
        if self.key_sigmas is None:
            raise SynVidError(f"{root}: no readable training sample")
        self.stream = SampleStream(train_ds, train_idx, rank=info.rank, world=info.world, seed=cfg.optim.seed,
                                   on_error=self._report_bad, check=self._check_sigmas)
        self.val_records: list[Record] = []
        for i, sample in val_ds.iter_valid(val_idx, on_error=self._report_bad):
            self.val_records.append(sample_record(sample, -1 - i))

    def _check_sigmas(self, sample) -> None:
        got = [float(sample.sigmas[j]) for j in self.key_steps]
        if any(abs(a - b) > 1e-6 for a, b in zip(got, self.key_sigmas)):
            raise SynVidError(f"key sigmas {got} differ from the data set's {self.key_sigmas}")

    def _report_bad(self, index: int, err: SynVidError) -> None:
        msg = f"skipping corrupt SynVid sample (rank {self.info.rank}): {err}"
        self.bad_samples.append(str(err))
        print(msg, file=sys.stderr, flush=True)

    def _setup_models(self, teacher: nn.Module | None) -> None:
        """Student (fp32 copy of the teacher), frozen teacher, optional EMA; FSDP2-sharded under torchrun.

        Under torchrun with a checkpoint path, only rank 0 reads the teacher: every rank builds the three models
        on the meta device, shards them, allocates its shards and receives the weights by broadcast, so a node
        holds one full copy in CPU memory instead of one per rank, and a GPU never holds an unsharded model.
        """
        cfg, info = self.cfg, self.info
        tdtype = DTYPES.get(cfg.model.teacher_dtype) or (torch.bfloat16 if self.device.type == "cuda" else
                                                         torch.float32)
        full_sd: dict[str, torch.Tensor] | None = None
        if teacher is None:
            if not cfg.model.teacher:
                raise ConfigError("model.teacher is empty: set it to the teacher checkpoint (.safetensors/.pt)")
            from accvideo_core.models.loading import load_transformer

            if info.fsdp and info.world > 1:
                from accvideo_core.models.transformer_hunyuan_video import (
                    HunyuanVideoTransformer3D, TransformerConfig,
                )

                shared: list[Any] = [None]
                if info.is_main:
                    loaded = load_transformer(cfg.model.teacher, dtype=torch.float32)
                    self._check_not_fp8(loaded)
                    full_sd = loaded.state_dict()
                    shared = [loaded.config.to_dict()]
                    del loaded
                torch.distributed.broadcast_object_list(shared, src=0)
                with torch.device("meta"):
                    teacher = HunyuanVideoTransformer3D(TransformerConfig.from_dict(shared[0]))
            else:
                teacher = load_transformer(cfg.model.teacher, dtype=torch.float32)
        meta = next(teacher.parameters()).is_meta
        if not meta:
            self._check_not_fp8(teacher)
        self.model_config = teacher.config
        student = copy.deepcopy(teacher).float().train().requires_grad_(True)
        teacher = teacher.to(dtype=tdtype).eval().requires_grad_(False)
        student.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)
        teacher.enable_gradient_checkpointing(cfg.model.gradient_checkpointing)
        self.ema = copy.deepcopy(student).requires_grad_(False).eval() if cfg.optim.ema_decay > 0 else None
        models = [m for m in (student, teacher, self.ema) if m is not None]
        if info.fsdp:
            pdt = torch.bfloat16 if self.bf16 else None
            D.shard_transformer(student, param_dtype=pdt, reshard_after_forward=cfg.runtime.reshard_after_forward,
                                device=self.device)
            D.shard_transformer(teacher, param_dtype=None, reshard_after_forward=True, device=self.device,
                                extra_methods=("image_features",))
            if self.ema is not None:
                D.shard_transformer(self.ema, param_dtype=None, reshard_after_forward=True, device=self.device)
            if meta:
                for model in models:
                    model.to_empty(device=self.device)
                    D.load_full_model_state(model, dict(full_sd or {}), info)  # the loader mutates its dict
                full_sd = None
        else:
            for model in models:
                model.to(self.device)
        self.student, self.teacher = student, teacher
        nl = self.model_config.num_layers
        self.feature_layers = list(cfg.loss.feature_layers or default_feature_layers(nl, self.m))
        if any(not 1 <= layer <= nl for layer in self.feature_layers):
            raise ConfigError(f"loss.feature_layers {self.feature_layers} must be in 1..{nl} for this teacher")
        lo = cfg.loss
        self.heads = build_heads(self.m, self.model_config.hidden_size, width=lo.head_width, blocks=lo.head_blocks,
                                 kernel=lo.head_kernel, groups=lo.head_groups).to(self.device)
        D.broadcast_module_(self.heads, info)
        o = cfg.optim
        self.opt = torch.optim.AdamW(student.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                     weight_decay=o.weight_decay)
        self.head_opt = torch.optim.AdamW(self.heads.parameters(), lr=o.head_lr, betas=o.betas, eps=o.eps,
                                          weight_decay=o.weight_decay)

    @staticmethod
    def _check_not_fp8(model: nn.Module) -> None:
        if any(p.dtype.itemsize == 1 for p in model.parameters()):
            raise ConfigError("the teacher holds fp8 weights; distil from a bf16/fp32 checkpoint (the student "
                              "trains every parameter and starts from the teacher's weights)")

    # ------------------------------------------------------------------ one iteration
    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _cond(self, batch: dict[str, torch.Tensor]) -> tuple:
        return batch["text_states"], batch["text_mask"], batch["pooled"], batch["guidance"]

    def _segment(self, batch: dict[str, torch.Tensor], k: int) -> tuple:
        """(x at t'_{k+1}, x at t'_k, sigma t'_{k+1}, sigma t'_k) of segment k from a batch of key latents."""
        j_noisy, j_clean = self.m - 1 - k, self.m - k          # indices in sampling order (sigma 1 first)
        lat = batch["key_latents"]
        return lat[:, j_noisy], lat[:, j_clean], self.key_sigmas[j_noisy], self.key_sigmas[j_clean]

    def trajectory_losses(self, batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Eq. 6 for segment k (t'_{k+1} -> t'_k): the student at the noisier key latent vs the average velocity."""
        x_noisy, x_clean, s_noisy, s_clean = self._segment(batch, k)
        t = torch.full((x_noisy.shape[0],), s_noisy * 1000.0, device=self.device)
        with self._autocast():
            v = self.student(x_noisy, t, *self._cond(batch))
        target = segment_target(x_clean, x_noisy, s_clean, s_noisy)
        return {"traj": trajectory_loss(v, target, self.cfg.loss.traj_reduction)}

    def adversarial_losses(self, batch: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Alg. 1 for segment k: fake = one student Euler step from Q_{k+1} (pushed to Q_k); ``adv_g`` trains the
        student only (heads detached), ``adv_d`` trains head H_k only (teacher features of the fake detached)."""
        m = self.m
        x_noisy, x_clean, s_noisy, s_clean = self._segment(batch, k)
        b = x_noisy.shape[0]
        if k == m - 1:
            cond = {key: batch[key] for key in ("text_states", "text_mask", "pooled", "guidance", "uid")}
            noise = noise_for(batch["uid"], tuple(x_noisy.shape[1:]), self.cfg.optim.seed).to(self.device)
            self.queues.push(m, noise, cond)
        z, cond_fake = self.queues.pop(k + 1, b, self.device)
        t = torch.full((b,), s_noisy * 1000.0, device=self.device)
        with self._autocast():
            v_fake = self.student(z, t, *self._cond(cond_fake))
        fake = z.float() + (s_clean - s_noisy) * v_fake.float()   # one student Euler step to t'_k
        self.queues.push(k, fake.detach(), cond_fake)
        layer, head, kind = self.feature_layers[k], self.heads[k], self.cfg.loss.gan_loss
        t_clean = torch.full((b,), s_clean * 1000.0, device=self.device)
        with self._autocast():
            with torch.no_grad():
                f_real = self.teacher.image_features(x_clean, t_clean, *self._cond(batch), layer=layer)
            f_fake = self.teacher.image_features(fake, t_clean, *self._cond(cond_fake), layer=layer)
            logits_real = head(f_real)
            logits_fake_d = head(f_fake.detach())
            frozen = {name: p.detach() for name, p in head.named_parameters()}
            logits_fake_g = functional_call(head, frozen, (f_fake,))
        return {"adv_d": discriminator_loss(logits_real, logits_fake_d, kind),
                "adv_g": generator_loss(logits_fake_g, kind),
                "d_real": logits_real.detach().float().mean(), "d_fake": logits_fake_d.detach().float().mean()}

    def _heartbeat(self, step: int, k: int, micro: int) -> None:
        """Inside long iterations (13B: minutes to hours) a line every ``log.progress_seconds``."""
        every = self.cfg.log.progress_seconds
        now = time.monotonic()
        if every > 0 and now - self._last_note >= every:
            self._last_note = now
            self.monitor.note(f"  iteration {step + 1}: segment k={k} done for micro-batch {micro + 1}/{self.n_micro}")

    def segments_for(self, step: int) -> list[int]:
        """Segments k trained in iteration ``step``: all m (k = m-1 .. 0) by default; with
        ``optim.segments_per_iteration = s < m`` the next s of the cycle m-1, ..., 0, m-1, ... (the queues carry
        the student's fakes from one iteration to the next)."""
        m = self.m
        s = self.cfg.optim.segments_per_iteration or m
        return [m - 1 - (step * s + j) % m for j in range(s)]

    def _set_lr(self, step: int) -> float:
        o = self.cfg.optim
        scale = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
        for g in self.opt.param_groups:
            g["lr"] = o.lr * scale
        for g in self.head_opt.param_groups:
            g["lr"] = o.head_lr * scale
        return o.lr * scale

    def train_step(self, step: int) -> dict[str, float]:
        """One iteration (``total_batch`` samples over all ranks). Returns metrics averaged over ranks."""
        cfg, m = self.cfg, self.m
        micro = [collate([self.stream.next() for _ in range(cfg.optim.micro_batch)]) for _ in range(self.n_micro)]
        adversarial = cfg.loss.adversarial and cfg.loss.lambda_adv > 0 and step >= cfg.loss.adv_start_step
        order = self.segments_for(step)
        groups = [order] if cfg.optim.segment_updates == "joint" else [[k] for k in order]
        lr = self._set_lr(step)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        norms = []
        lam = cfg.loss.lambda_adv
        for group in groups:
            self.opt.zero_grad(set_to_none=True)
            self.head_opt.zero_grad(set_to_none=True)
            for i, mb in enumerate(micro):
                batch = {k: v.to(self.device) for k, v in mb.items()}
                scale = 1.0 / (len(group) * self.n_micro)
                for n, k in enumerate(group):
                    last = i == self.n_micro - 1 and n == len(group) - 1
                    # fakes for t'_k need Q_{k+1} filled (by segment k+1 of this or an earlier iteration)
                    adv_now = adversarial and (k == m - 1 or self.queues.size(k + 1) >= cfg.optim.micro_batch)
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
            if cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.grad_clip)
                norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
            self.opt.step()
            if adversarial:
                self.head_opt.step()
        if self.ema is not None:
            self._update_ema()
        metrics = {key: value / counts[key] for key, value in sums.items()}
        if norms:
            metrics["grad_norm"] = sum(norms) / len(norms)
        names = sorted(metrics)
        values = torch.tensor([metrics[n] for n in names], dtype=torch.float64, device=self.device)
        D.all_reduce_mean_([values], self.info)
        out = {n: float(v) for n, v in zip(names, values.tolist())}
        out["lr"] = lr
        return out

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

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _five_step_mse(self, model: nn.Module) -> float:
        """Mean over held-out samples of MSE(model's m-step latent from the SynVid noise, teacher's final latent)."""
        records, info, mb = self.val_records, self.info, self.cfg.optim.micro_batch
        if not records:
            return float("nan")
        mine = list(range(info.rank, len(records), info.world))
        rounds = math.ceil(len(records) / info.world)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        slots = mine + [None] * (rounds - len(mine))   # every rank runs the same number of forwards (FSDP)
        for start in range(0, rounds, mb):
            chunk = slots[start:start + mb]
            batch = collate([records[i if i is not None else 0] for i in chunk], self.device)
            noise, final = batch["key_latents"][:, 0], batch["key_latents"][:, -1]
            with self._autocast():
                x = sample_flow(model, noise, self.key_sigmas, text_states=batch["text_states"],
                                text_mask=batch["text_mask"], pooled=batch["pooled"], guidance=batch["guidance"])
            err = (x.float() - final.float()).pow(2).flatten(1).mean(1)
            weight = torch.tensor([0.0 if i is None else 1.0 for i in chunk], dtype=torch.float64,
                                  device=self.device)
            total[0] += (err.double() * weight).sum()
            total[1] += weight.sum()
        if info.world > 1:
            torch.distributed.all_reduce(total)
        return float(total[0] / total[1])

    def validate(self) -> dict[str, float]:
        self.student.eval()
        if self.teacher5 is None:
            self.teacher5 = self._five_step_mse(self.teacher)
        result = {"student_mse": self._five_step_mse(self.student), "teacher5_mse": self.teacher5}
        if self.ema is not None:
            result["student_ema_mse"] = self._five_step_mse(self.ema)
        result["ratio"] = result["student_mse"] / result["teacher5_mse"] if result["teacher5_mse"] else float("nan")
        self.student.train()
        self.monitor.write({"type": "val", "step": self.step, **result})
        self.monitor.note(f"validation @ step {self.step}: student {self.m}-step MSE {result['student_mse']:.4g}, "
                          f"teacher {self.m}-step MSE {result['teacher5_mse']:.4g} (vs the teacher's "
                          f"{self.key_steps[-1]}-step latents of {len(self.val_records)} held-out samples)")
        return result

    # ------------------------------------------------------------------ checkpoints
    def _export(self, sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
        from accvideo_core.models.loading import CONFIG_METADATA_KEY

        meta = {CONFIG_METADATA_KEY: json.dumps(self.model_config.to_dict()), "accvideo_step": str(self.step),
                "accvideo_key_sigmas": json.dumps(self.key_sigmas)}
        save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path, meta)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_NNNNNNN/`` (all ranks take part) and point ``latest.json`` at it."""
        info, cfg = self.info, self.cfg
        ckdir = self.out / CHECKPOINT_DIR / f"step_{self.step:07d}"
        student_sd = D.full_model_state(self.student, info)
        opt_sd = D.full_optimizer_state(self.student, self.opt, info)
        ema_sd = D.full_model_state(self.ema, info) if self.ema is not None else None
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_torch({"world": info.world, "queues": self.queues.state_dict(), "stream": self.stream.state_dict(),
                    "rng": rng}, ckdir / f"rank{info.rank:05d}.pt")
        if info.is_main:
            save_dtype = DTYPES[cfg.log.save_dtype]
            self._export(student_sd, ckdir / "student.safetensors", save_dtype)
            if save_dtype != torch.float32:
                self._export(student_sd, ckdir / "student_fp32.safetensors", torch.float32)
            if ema_sd is not None:
                self._export(ema_sd, ckdir / "student_ema.safetensors", torch.float32)
            save_torch(opt_sd, ckdir / "optimizer.pt")
            save_torch({"step": self.step, "world": info.world, "teacher5": self.teacher5,
                        "heads": self.heads.state_dict(), "heads_optimizer": self.head_opt.state_dict(),
                        "config": json.dumps(cfg.to_dict())}, ckdir / "trainer.pt")
        if info.world > 1:
            torch.distributed.barrier()
        if info.is_main:
            write_json({"step": self.step, "path": ckdir.name}, self.out / CHECKPOINT_DIR / "latest.json")
            self._prune_checkpoints()
            self.monitor.note(f"checkpoint: {ckdir}")
        return ckdir

    def _prune_checkpoints(self) -> None:
        keep = self.cfg.log.keep_checkpoints
        if keep <= 0:
            return
        dirs = sorted(p for p in (self.out / CHECKPOINT_DIR).glob("step_*") if p.is_dir())
        for old in dirs[:-keep]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def _resolve_resume(self, resume: str) -> Path:
        if resume == "auto":
            latest = self.out / CHECKPOINT_DIR / "latest.json"
            if not latest.is_file():
                raise FileNotFoundError(f"--resume auto: no {latest}; nothing to resume (start without --resume)")
            return self.out / CHECKPOINT_DIR / json.loads(latest.read_text())["path"]
        path = Path(resume)
        if not (path / "trainer.pt").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint folder (no trainer.pt)")
        return path

    def _load_checkpoint(self, ckdir: Path) -> None:
        info = self.info
        state = load_torch(ckdir / "trainer.pt")
        if state["world"] != info.world:
            raise ConfigError(f"{ckdir} was written by {state['world']} ranks; resume it with the same "
                              f"--nproc_per_node (queues and data positions are per rank)")
        master = ckdir / ("student_fp32.safetensors" if (ckdir / "student_fp32.safetensors").is_file()
                          else "student.safetensors")
        D.load_full_model_state(self.student, read_state_dict(master) if info.is_main else {}, info)
        opt_state = load_torch(ckdir / "optimizer.pt") if info.is_main else {}
        D.load_full_optimizer_state(self.student, self.opt, opt_state, info)
        if self.ema is not None:
            ema_path = ckdir / "student_ema.safetensors"
            if not ema_path.is_file():
                raise ConfigError(f"{ckdir} has no EMA weights but optim.ema_decay > 0")
            D.load_full_model_state(self.ema, read_state_dict(ema_path) if info.is_main else {}, info)
        self.heads.load_state_dict(state["heads"])
        self.head_opt.load_state_dict(state["heads_optimizer"])
        self.step, self.teacher5 = int(state["step"]), state["teacher5"]
        mine = load_torch(ckdir / f"rank{info.rank:05d}.pt")
        self.queues.load_state_dict(mine["queues"], self.device)
        self.stream.load_state_dict(mine["stream"])
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate(mine["rng"]["python"])
        if "cuda" in mine["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["rng"]["cuda"], self.device)

    def _truncate_metrics(self, step: int) -> None:
        """On resume, drop log rows past the checkpoint (written by the run that was killed)."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line).get("step", 0) <= step]
        if step == 0:
            kept = []
        path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ main loop
    def _on_signal(self, signum: int, frame: Any) -> None:
        # Under torchrun a Ctrl-C reaches a worker twice (terminal + the agent forwarding it): repeats within
        # SIGNAL_DEBOUNCE seconds are the same request; a later one aborts without saving.
        now = time.monotonic()
        if self.interrupted:
            if now - self._signal_time > SIGNAL_DEBOUNCE:
                raise KeyboardInterrupt
            return
        self.interrupted, self._signal_time = True, now
        print(f"\nsignal {signum}: finishing this iteration, writing a checkpoint, then exiting "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``optim.steps``. ``stop_after``: return right after that iteration without any final
        checkpoint or export (what a killed process leaves behind; used by the resume test)."""
        cfg = self.cfg
        handlers = {}
        if self._main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            if self.step == 0:
                self.validate()
            while self.step < cfg.optim.steps:
                metrics = self.train_step(self.step)
                self.step += 1
                self.monitor.step(self.step, metrics)
                self._last_note = time.monotonic()
                stop = D.any_rank(self.interrupted, self.info)
                if stop_after is not None and self.step >= stop_after:
                    return {"step": self.step, "stopped": True}
                if stop:
                    path = self.save_checkpoint()
                    raise Interrupted(f"interrupted at step {self.step}; resume with --resume {path}")
                if cfg.log.val_every and self.step % cfg.log.val_every == 0 and self.step < cfg.optim.steps:
                    self.validate()
                if cfg.log.ckpt_every and self.step % cfg.log.ckpt_every == 0 and self.step < cfg.optim.steps:
                    self.save_checkpoint()
            final_val = self.validate()
            ckdir = self.save_checkpoint()
            if self.info.is_main:
                with atomic_path(self.out / "student.safetensors") as tmp:
                    shutil.copyfile(ckdir / "student.safetensors", tmp)
                if cfg.log.plot:
                    png = self.monitor.plot(self.out / "loss_curves.png")
                    self.monitor.note(f"loss curves: {png}")
            return {"step": self.step, "val": final_val, "checkpoint": str(ckdir),
                    "student": str(self.out / "student.safetensors"), "bad_samples": list(self.bad_samples)}
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    @staticmethod
    def _main_thread() -> bool:
        import threading

        return threading.current_thread() is threading.main_thread()

    def close(self) -> None:
        D.shutdown(self.info)


def train(cfg: TrainConfig, *, teacher: nn.Module | None = None, resume: str | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it (the process group, if any, stays up; see ``__main__``)."""
    return Trainer(cfg, teacher=teacher, resume=resume).run(stop_after=stop_after)
