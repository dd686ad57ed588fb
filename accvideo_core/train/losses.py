"""Losses of AccVideo: trajectory loss (paper Eq. 6) and the GAN losses of the adversarial term (Eq. 7-8)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_target(latent_clean: torch.Tensor, latent_noisy: torch.Tensor, sigma_clean: float,
                   sigma_noisy: float) -> torch.Tensor:
    """Average velocity of a teacher segment: ``(l_{t'_k} - l_{t'_{k+1}}) / (t'_k - t'_{k+1})``.

    With this as the student's output at ``(l_{t'_{k+1}}, t'_{k+1})``, one Euler step lands exactly on ``l_{t'_k}``.
    """
    return (latent_clean.float() - latent_noisy.float()) / (sigma_clean - sigma_noisy)


def trajectory_loss(velocity: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Squared L2 between predicted and target velocity, averaged over the batch.

    ``reduction="mean"``: mean over latent elements (scale independent of resolution, keeps lambda_adv
    meaningful); ``"sum"``: sum over a sample's elements.
    """
    sq = (velocity.float() - target.float()).pow(2).flatten(1)
    per_sample = sq.mean(1) if reduction == "mean" else sq.sum(1)
    return per_sample.mean()


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss the heads minimise. ``nonsaturating``: the standard GAN ``-log D(real) - log(1 - D(fake))`` with
    ``D = sigmoid(logit)``; ``hinge``: ``relu(1 - real) + relu(1 + fake)``. Logits are averaged over positions."""
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "nonsaturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'nonsaturating' or 'hinge'")


def generator_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Loss the student minimises: ``-log D(fake)`` (non-saturating) or ``-fake`` (hinge)."""
    fake = fake_logits.float()
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    if kind == "hinge":
        return -fake.mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'nonsaturating' or 'hinge'")
