"""DMD2 losses as pure functions of tensors (docs/algorithm.md §4-§6). Only torch is imported."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cfg(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, standard form: uncond + w (cond - uncond) (§4 step 4).

    Some ports use cond + w (cond - uncond), which is off by one in w. The combination is
    linear, so it is the same whether applied to eps, v or x0 predictions.
    """
    return out_uncond + scale * (out_cond - out_uncond)


def dm_gradient(x: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake - x0_teacher) / mean_{C,H,W} |x - x0_teacher|, per sample, fp32, NaN -> 0 (§4 step 5).

    Shapes: all B x C x H x W.
    """
    x, fake, teacher = x.float(), x0_fake.float(), x0_teacher.float()
    norm = (x - teacher).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.nan_to_num((fake - teacher) / norm)


def dmd_loss(x: torch.Tensor, x0_fake: torch.Tensor, x0_teacher: torch.Tensor) -> torch.Tensor:
    """L_dm = 1/2 mean((x - sg(x - g))^2) over all B*C*H*W elements, so dL/dx = g / x.numel().

    x (B x C x H x W) carries the generator's gradient; x0_fake / x0_teacher are the fake-score and
    CFG-teacher x0 predictions at a noised copy of x (no gradient). The learning rates of §7 are
    tuned to this mean reduction and the 1/2.
    """
    g = dm_gradient(x.detach(), x0_fake, x0_teacher)
    target = (x.detach().float() - g).detach()
    return 0.5 * F.mse_loss(x.float(), target, reduction="mean")


def fake_score_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss of the fake score on detached generator samples (§5).

    pred/target: B x C x H x W in the network's native space (eps for eps-prediction, v, or x0 for
    EDM); weight: per-sample B (1 for eps, 1/sigma^2 + 1/sigma_data^2 for EDM).
    """
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
    if weight is not None:
        per_sample = per_sample * weight.float()
    return per_sample.mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(fake)) (§6)."""
    return F.softplus(-logits_fake.float()).mean()


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """mean softplus(D(fake)) + mean softplus(-D(real)) (§6); inputs detached by the caller."""
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
