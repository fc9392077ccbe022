"""One DMD2 training iteration, defined once: ``generator_step``, ``critic_step`` and ``train_step``.

They drive two trainable modules through a small optimizer interface (``Trainee``: forward,
backward, step, lr). ``engines.EngineTrainee`` implements it with a DeepSpeed engine,
``TorchTrainee`` below with plain PyTorch and AdamW; the training loop, the benchmarks (the
meta-device FLOP count included) and the engine tests all call these functions, so none of them
drives ``backward``/``step`` by hand. Fault injection (``faults.wrap``) and the generator's EMA
(``EngineTrainee(ema=...)``) sit behind the same interface instead of inside the loop.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from .data import Batch
from .distill import critic_loss, generator_input, generator_loss
from .models.roles import set_phase
from .sampling import Noise, rollout, sample


class Trainee(Protocol):
    """A trainable module and its optimizer."""

    module: nn.Module  # the plain module (the generator phase calls the critic's, never its engine)

    def __call__(self, *args, **kwargs):
        """Forward through whatever bookkeeping the optimizer needs (a DeepSpeed engine's forward)."""

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Back-propagate ``loss``; returns the loss that was back-propagated (what gets logged)."""

    def step(self) -> bool:
        """Apply the update; False when it was skipped (a non-finite gradient norm)."""

    def lr(self) -> float: ...


class Wrapped:
    """A ``Trainee`` that passes everything to ``inner``: subclasses override the one call they
    change (fault injection, tests that record what passed through)."""

    def __init__(self, inner):
        self.inner, self.module = inner, inner.module

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def backward(self, loss):
        return self.inner.backward(loss)

    def step(self) -> bool:
        return self.inner.step()

    def lr(self) -> float:
        return self.inner.lr()


def lr_factor(optim_cfg, updates: int):
    """The LR multiplier after ``s`` optimizer updates: linear warmup, then constant or cosine decay
    to ``min_lr_ratio`` at ``updates`` (the trainee's updates in the whole run)."""
    warmup, floor = optim_cfg.warmup_steps, optim_cfg.min_lr_ratio

    def factor(s: int) -> float:
        f = min(1.0, (s + 1) / warmup) if warmup else 1.0
        if optim_cfg.schedule == "cosine":
            progress = min(1.0, max(0, s - warmup) / max(1, updates - warmup))
            f *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return f

    return factor


def adamw(params: list[nn.Parameter], optim_cfg, updates: int = 0):
    """AdamW with the recipe's settings and LR schedule (what both implementations use)."""
    opt = torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                            weight_decay=optim_cfg.weight_decay, eps=optim_cfg.eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(optim_cfg, updates))


class TorchTrainee:
    """Plain PyTorch: AdamW, gradient-norm clipping, and the same non-finite skip as DeepSpeed's
    ZeRO optimizers (a NaN/Inf global norm skips the update)."""

    def __init__(self, module: nn.Module, optim_cfg=None, updates: int = 0):
        """``optim_cfg=None``: forward and backward only, no update (FLOP counting on the meta
        device, where there are no values to clip or check)."""
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.opt = self.sched = None
        if optim_cfg is not None:
            self.grad_clip = optim_cfg.grad_clip
            self.opt, self.sched = adamw(self.params, optim_cfg, updates)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss):
        loss.backward()
        return loss

    def step(self) -> bool:
        if self.opt is None:
            return True
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        applied = bool(torch.isfinite(norm))
        if applied:
            self.opt.step()
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return applied

    def lr(self) -> float:
        return self.sched.get_last_lr()[0] if self.sched is not None else 0.0


def to_floats(logs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors to floats with one device-to-host copy (one sync), not one per loss."""
    if not logs:
        return {}
    return dict(zip(logs, torch.stack([v.float() for v in logs.values()]).tolist(), strict=True))


def generator_step(gen: Trainee, critic: Trainee, x_t, t, batch: Batch, loss_cfg, rng: torch.Generator,
                   weight: float = 1.0, rest: list[int] | None = None):
    """The generator's update (docs/algorithm.md §4, §6) with the critic frozen; returns its sample
    ``x`` (which the critic then trains on), its losses and whether the update was applied.
    ``weight`` scales the loss (``loss.step_weights`` of the step trained). ``rest``: the remaining
    timesteps, through which the output is carried with gradient before the loss scores it
    (``loss.generator_samples: last_step``); ``x`` is then the last step's output."""
    module = critic.module  # calling the critic's engine here would corrupt its next backward
    set_phase(module, "generator")
    try:
        x = gen(x_t, t, batch.cond)
        if rest:  # the later steps through the plain module: one backward through the engine counts them all
            x = rollout(gen.module, gen.module.schedule, batch.cond, x.shape, rest, Noise(rng, x.device), start=x)
        loss, logs = generator_loss(module, x, batch, loss_cfg, rng)
        if weight != 1.0:
            loss = loss * weight
        logs["loss_generator"] = gen.backward(loss).detach()
        applied = gen.step()
    finally:
        set_phase(module, "critic")
    return x, logs, applied


def critic_step(critic: Trainee, x: torch.Tensor, batch: Batch, loss_cfg, rng: torch.Generator):
    """The critic's update (fake score §5 + GAN discriminator §6) on detached generator samples,
    through the critic's forward so its optimizer's bookkeeping sees it."""
    loss, logs = critic(critic_loss, x.detach(), batch, loss_cfg, rng)
    logs["loss_critic"] = critic.backward(loss).detach()
    return logs, critic.step()


def train_step(gen: Trainee, critic: Trainee, batch: Batch, *, k: int, timesteps: list[int], shape, loss_cfg,
               backward_simulation: bool, generator_turn: bool, rng: torch.Generator, device):
    """One iteration (§7): the generator's training input at sampler step ``k`` (§3), the generator's
    update when it is its turn (two time-scale rule), then the critic's update on this iteration's
    pre-update generator sample. Returns (losses as 0-d tensors, whether every update was applied);
    ``to_floats`` brings them to the host in one copy."""
    schedule = gen.module.schedule
    x_t, t = generator_input(gen.module, schedule, timesteps, k, shape, batch, rng, backward_simulation, device)
    logs, applied = {}, True
    rest = timesteps[k + 1:] if generator_turn and loss_cfg.generator_samples == "last_step" else []
    if generator_turn:
        weight = loss_cfg.step_weights[k] if loss_cfg.step_weights else 1.0
        x, logs, applied = generator_step(gen, critic, x_t, t, batch, loss_cfg, rng, weight, rest)
    else:
        with torch.no_grad():
            x = gen.module(x_t, t, batch.cond)
    # (with ``rest`` the generator's x is already the last step's, and critic_samples is last_step)
    if loss_cfg.critic_samples == "last_step" and k + 1 < len(timesteps) and not rest:
        # the critic models what sampling draws: this output through the remaining steps
        x = sample(gen.module, schedule, batch.cond, shape, timesteps[k + 1:], Noise(rng, device), start=x.detach())
    logs_c, critic_applied = critic_step(critic, x, batch, loss_cfg, rng)
    return {**logs, **logs_c}, applied and critic_applied


def regression_step(gen: Trainee, x_t, t, cond, target, loss_fn):
    """The regression stage's update (docs/algorithm.md §10): the generator's x0 for the pairs' noise
    pulled towards the teacher's; returns its losses and whether the update was applied."""
    loss, logs = loss_fn(gen(x_t, t, cond), target)
    logs["loss_regression"] = gen.backward(loss).detach()
    return logs, gen.step()
