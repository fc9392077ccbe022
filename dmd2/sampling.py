"""The one sampler (docs/algorithm.md §3), used by backward simulation, previews,
``dmd2 sample``, eval and serve.

Noise comes from a ``Noise`` source so that training draws one stream per (seed, rank, step)
and sampling draws one stream per image (image i is the same whatever the batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class Noise:
    """Standard normal noise from one generator per row (per-sample seeds) or one for the batch."""

    def __init__(self, generators: torch.Generator | Sequence[torch.Generator], device="cpu"):
        self.generators = generators
        self.device = device

    @classmethod
    def per_sample(cls, seeds: Sequence[int], device="cpu") -> Noise:
        return cls([torch.Generator().manual_seed(int(s)) for s in seeds], device)

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        """A tensor of ``shape``; with per-row generators, shape[0] must equal their number."""
        if isinstance(self.generators, torch.Generator):
            dev = self.generators.device
            return torch.randn(tuple(shape), generator=self.generators, device=dev).to(self.device)
        rows = [torch.randn(tuple(shape[1:]), generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


def pure_noise(schedule, noise: Noise, shape: Sequence[int], t: int) -> torch.Tensor:
    """Pure noise labelled t (scaled by sigma_t for EDM, eps itself for DDPM)."""
    return noise(shape) * schedule.initial_noise_scale(t)


def timestep_batch(t: int, batch: int, device) -> torch.Tensor:
    return torch.full((batch,), int(t), dtype=torch.long, device=device)


def implied_noise(schedule, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The eps with x_t = a_t x0 + s_t eps, for both parameterisations (add_noise is linear in
    (x0, eps), so a_t x0 and s_t come from it)."""
    zero = torch.zeros_like(x0)
    return (x_t - schedule.add_noise(x0, zero, t)) / schedule.add_noise(zero, torch.ones_like(x0), t)


def rollout(
    denoise: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
    schedule,
    cond: dict[str, torch.Tensor],
    shape: Sequence[int],
    timesteps: Sequence[int],
    noise: Noise,
    *,
    deterministic: bool = False,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Start from pure noise at timesteps[0]; at each step predict x0, then re-noise it to the
    next timestep with *fresh* noise (correlated noise causes artifacts); return the last x0.
    No CFG: it is distilled into the generator.

    ``deterministic``: re-noise with the noise implied by the x0 prediction instead, which makes
    this the teacher's own ODE sampler (DDIM for DDPM schedules, Euler for EDM), for eval.
    ``start``: an x0 prediction to continue from (re-noised to timesteps[0] with fresh noise)
    instead of pure noise."""
    if start is not None:
        x = schedule.add_noise(start, noise(shape), timestep_batch(timesteps[0], shape[0], start.device))
    else:
        x = pure_noise(schedule, noise, shape, timesteps[0])
    x0 = x
    for i, t in enumerate(timesteps):
        tt = timestep_batch(t, shape[0], x.device)
        x0 = denoise(x, tt, cond)
        if i + 1 < len(timesteps):
            eps = implied_noise(schedule, x, x0, tt) if deterministic else noise(shape)
            x = schedule.add_noise(x0, eps, timestep_batch(timesteps[i + 1], shape[0], x.device))
    return x0


# Sampling, backward simulation and the critic's samples need no graph; the generator's loss on
# its last-step output (loss.generator_samples: last_step) calls ``rollout`` with gradient.
sample = torch.no_grad()(rollout)
