"""How separable a model's few-step fakes are from a SynVid's real key latents, per key timestep.

``python -m accvideo_core.train.probe --synvid DIR --teacher TEACHER.safetensors MODEL.safetensors [...]``

A run's own heads at chance at the end cannot tell "nothing left to see" from "did not learn". This probe trains
*fresh* heads of the trainer's kind (``DiscriminatorHead`` on the frozen teacher's features at
``default_feature_layers``) offline on fixed fakes - each model's m-step Euler chain from fresh noise, with the
real samples' prompts - and reports their real/fake accuracy on held-out samples, the trainer's measure
(``Trainer.discriminator_accuracy``). docs/training.md ("Why the heads at k = 1-3 still stay at chance") has the
miniature's figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from accvideo_core.models.loading import load_transformer
from accvideo_core.synvid.format import SynVidDataset, SynVidError, key_steps_for
from accvideo_core.train.batching import chain_from_noise, collate, conditioning, sample_record
from accvideo_core.train.heads import DiscriminatorHead, default_feature_layers
from accvideo_core.train.losses import discriminator_loss


def load_key_latents(root: str | Path, segments: int) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Every sample of a SynVid at its ``segments`` + 1 key steps, collated (``key_latents [N, m+1, C, T, H, W]``,
    sigma 1 first), and the key sigmas."""
    steps = SynVidDataset(root).manifest.get("steps")
    if not isinstance(steps, int):
        raise SynVidError(f"{root}: manifest has no teacher 'steps'; rebuild it")
    key_steps = key_steps_for(steps, segments)
    ds = SynVidDataset(root, steps=key_steps)
    samples = [ds.load(i) for i in range(len(ds))]
    sigmas = [float(samples[0].sigmas[j]) for j in key_steps]
    return collate([sample_record(s, i) for i, s in enumerate(samples)]), sigmas


@torch.no_grad()
def key_features(teacher: nn.Module, batch: dict[str, torch.Tensor], sigmas: list[float], layers: list[int],
                 model: nn.Module | None = None, *, seed: int = 0, chunk: int = 16) -> list[torch.Tensor]:
    """Teacher features per key timestep k = 0..m-1 (each ``[N, hidden, T, H, W]``) of the real key latents, or,
    given ``model``, of its m-step chain from noise (``chain_from_noise``) with the same prompts."""
    m = len(sigmas) - 1
    features: list[list[torch.Tensor]] = [[] for _ in range(m)]
    for start in range(0, batch["key_latents"].shape[0], chunk):
        part = {key: value[start:start + chunk] for key, value in batch.items()}
        cond = conditioning(part)
        latents = ([part["key_latents"][:, j + 1] for j in range(m)] if model is None   # t'_k, k = m-1-j
                   else chain_from_noise(model, part, sigmas, seed))
        for j, x in enumerate(latents):
            k = m - 1 - j
            t_k = torch.full((x.shape[0],), sigmas[j + 1] * 1000.0)
            features[k].append(teacher.image_features(x, t_k, *cond, layer=layers[k]))
    return [torch.cat(f).float() for f in features]


def heldout_accuracy(real: torch.Tensor, fake: torch.Tensor, *, train: int, updates: int, batch: int, lr: float,
                     width: int, groups: int, seed: int) -> float:
    """Train a fresh head on the first ``train`` real and fake feature maps (AdamW, beta1 0.5 as the demo's heads,
    non-saturating loss, ``updates`` steps on random batches of ``batch`` each), return its real/fake accuracy on
    the rest (a sample is right when its mean logit is > 0 for real, < 0 for fake; 0.5 is chance)."""
    if not 0 < train < real.shape[0]:
        raise ValueError(f"train must leave held-out samples: 0 < train < {real.shape[0]}, got {train}")
    torch.manual_seed(seed)
    head = DiscriminatorHead(real.shape[1], width, 1, 3, groups)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=(0.5, 0.999), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        i, j = (torch.randint(0, train, (batch,), generator=gen) for _ in range(2))
        loss = discriminator_loss(head(real[i]), head(fake[j]), "nonsaturating")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        right_real = (head(real[train:]).flatten(1).mean(1) > 0).float().mean()
        right_fake = (head(fake[train:]).flatten(1).mean(1) < 0).float().mean()
    return float(right_real + right_fake) / 2


def probe(teacher: nn.Module, models: dict[str, nn.Module], root: str | Path, *, segments: int = 5,
          train_fraction: float = 0.65, updates: int = 240, batch: int = 8, lr: float = 3e-4, width: int = 64,
          groups: int = 8, seed: int = 0) -> dict[str, list[float]]:
    """Held-out real/fake accuracy per key timestep k = 0..m-1 of fresh heads, for each named model's fakes.
    Defaults: the miniature demo's head size and budget (60 iterations x 4 updates of lr 3e-4 on batches of 8)."""
    data, sigmas = load_key_latents(root, segments)
    layers = default_feature_layers(teacher.config.num_layers, segments)
    train = int(train_fraction * data["key_latents"].shape[0])
    real = key_features(teacher, data, sigmas, layers)
    result = {}
    for name, model in models.items():
        fake = key_features(teacher, data, sigmas, layers, model, seed=seed + 12345)
        result[name] = [heldout_accuracy(real[k], fake[k], train=train, updates=updates, batch=batch, lr=lr,
                                         width=width, groups=groups, seed=seed) for k in range(segments)]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accvideo_core.train.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path, help="checkpoints whose m-step chains are the fakes")
    p.add_argument("--synvid", required=True, type=Path, help="SynVid folder: the real key latents and prompts")
    p.add_argument("--teacher", required=True, type=Path, help="the frozen teacher (features; also a valid model)")
    p.add_argument("--segments", type=int, default=5)
    p.add_argument("--updates", type=int, default=240)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        teacher = load_transformer(args.teacher, dtype=torch.float32).eval().requires_grad_(False)
        models = {str(path): (teacher if path == args.teacher else
                              load_transformer(path, dtype=torch.float32).eval().requires_grad_(False))
                  for path in args.models}
        result = probe(teacher, models, args.synvid, segments=args.segments, updates=args.updates, lr=args.lr)
    except (FileNotFoundError, SynVidError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, acc in result.items():
        print(json.dumps({"model": name, "heldout_accuracy_k": [round(a, 4) for a in acc]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
