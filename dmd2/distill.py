"""The two DMD2 phases, composed from the denoisers, the sampler and the pure losses.

- ``generator_loss``: distribution matching (§4) + GAN generator term (§6); run on
  ``critic_engine.module`` with the critic frozen, so gradients reach only the generator's output.
- ``critic_loss``: fake-score denoising (§5) + GAN discriminator (§6); run *through* the critic
  engine's forward on detached generator samples.

All randomness comes from one ``torch.Generator`` per (seed, rank, step), drawn in a fixed order,
so a resumed run replays exactly.
"""

from __future__ import annotations

import torch

from . import losses
from .data import Batch
from .models.conditioning import cat_cond
from .sampling import Noise, pure_noise, sample, timestep_batch
from .schedule import T, sample_timesteps


def _randn(g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(like.shape, generator=g, device=g.device).to(like.device, like.dtype)


def _randint(g: torch.Generator, lo: int, hi: int, n: int, device) -> torch.Tensor:
    return sample_timesteps(n, lo, hi, generator=g, device=g.device).to(device)


def generator_input(generator, schedule, timesteps: list[int], k: int, shape, batch: Batch,
                    g: torch.Generator, backward_simulation: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x_t, t) the generator is trained on at step index k of its sampler (§3).

    k = 0 is pure noise labelled timesteps[0] (999, or 399 for 1-step SDXL), as at inference.
    k > 0 with backward simulation: the generator's own k-step sample (no grad, fresh noise at
    every re-noising) noised to timesteps[k]; without it, the real images are noised instead.
    """
    noise = Noise(g, device)
    t = timestep_batch(timesteps[k], shape[0], device)
    if k == 0:
        return pure_noise(schedule, noise, shape, timesteps[0]), t
    if backward_simulation:
        x0 = sample(generator, schedule, batch.cond, shape, timesteps[:k], noise)
    else:
        x0 = batch.real
    return schedule.add_noise(x0, noise(shape), t), t


def _cfg_scales(loss_cfg, t: torch.Tensor) -> float | torch.Tensor:
    """loss.cfg_scale, or per sample (B x 1 x 1 x 1) with loss.cfg_interval: the scale where t / T lies
    in the interval, 1 (conditional only) elsewhere."""
    if loss_cfg.cfg_interval is None:
        return loss_cfg.cfg_scale
    lo, hi = loss_cfg.cfg_interval
    inside = ((t >= lo * T) & (t <= hi * T)).float()
    return (1.0 + (loss_cfg.cfg_scale - 1.0) * inside).view(-1, 1, 1, 1)


def generator_loss(critic, x: torch.Tensor, batch: Batch, loss_cfg, g: torch.Generator):
    """L_G = w_dm L_dm + w_G L_Gcls for generator samples ``x`` (B x C x H x W, with gradient)."""
    schedule = critic.teacher.schedule
    n = x.shape[0]
    t = _randint(g, int(loss_cfg.min_step_frac * T), int(loss_cfg.max_step_frac * T), n, x.device)
    with torch.no_grad():
        x_t = schedule.add_noise(x.detach(), _randn(g, x), t)
        x0_fake = critic.fake(x_t, t, batch.cond)
        x0_teacher = critic.teacher_x0(x_t, t, batch.cond, batch.uncond, _cfg_scales(loss_cfg, t))
    l_dm = losses.dmd_loss(x, x0_fake, x0_teacher)
    total = loss_cfg.dm_weight * l_dm
    logs = {"loss_dm": l_dm.detach()}
    if critic.head is not None:
        tau = _randint(g, 0, T - 1, n, x.device)
        logits = critic.logits(schedule.add_noise(x, _randn(g, x), tau), tau, batch.cond)
        l_gan = losses.gan_generator_loss(logits)
        total = total + loss_cfg.gan.generator_weight * l_gan
        logs["loss_gan_g"] = l_gan.detach()
    logs["loss_generator"] = total.detach()
    return total, logs


def critic_loss(critic, x: torch.Tensor, batch: Batch, loss_cfg, g: torch.Generator):
    """L_C = w_fake L_fake + w_D L_D on detached generator samples ``x`` (§5, §6)."""
    schedule = critic.fake.schedule
    x = x.detach()
    n = x.shape[0]
    t = _randint(g, 0, T - 1, n, x.device)
    eps = _randn(g, x)
    x_t = schedule.add_noise(x, eps, t)
    pred = schedule.native(critic.fake.raw(x_t, t, batch.cond), x_t, t)
    l_fake = losses.fake_score_loss(pred, schedule.target(x, eps, t), schedule.loss_weight(t))
    total = loss_cfg.fake_weight * l_fake
    logs = {"loss_fake": l_fake.detach()}
    if critic.head is not None:
        # diffusion GAN: independent tau for fake and real; one batched pass through the fake UNet
        tau = _randint(g, 0, T - 1, 2 * n, x.device)
        both = torch.cat([x, batch.real.to(x.dtype)])
        both_t = schedule.add_noise(both, _randn(g, both), tau)
        logits = critic.logits(both_t, tau, cat_cond(batch.cond, batch.real_cond))
        l_d = losses.gan_discriminator_loss(logits[n:], logits[:n])
        total = total + loss_cfg.gan.discriminator_weight * l_d
        logs["loss_gan_d"] = l_d.detach()
    logs["loss_critic"] = total.detach()
    return total, logs
