"""Train the digits teacher: a class-conditional diffusers ``UNet2DModel`` in 8x8 pixel space with
EDM preconditioning (Karras et al. 2022), saved as an ordinary teacher folder (``unet/`` in fp16,
``scheduler/`` = ``EDMEulerScheduler``) that ``dmd2.models.load_teacher`` reads.

    python -m dmd2.digits.teacher recipes/data/digits_teacher    # ~15 min on one idle CPU core

Deterministic and seeded (single-threaded CPU). The folder checked in at recipes/data/digits_teacher
was written by this script with the default settings; ``digits_teacher.json`` records them.

Why EDM rather than DDPM-eps: the 1-step generator maps pure noise at sigma = 80 to x0 with
c_out ~ 0.5, where an eps-parameterised UNet must divide by sqrt(abar_999) (~1/156 for linear betas).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import NUM_CLASSES, RESOLUTION
from .data import Split, load_split


@dataclass(frozen=True)
class TeacherSettings:
    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    dropout: float = 0.1
    steps: int = 4000
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    # EDM training noise: ln sigma ~ N(p_mean, p_std^2); a fraction drawn uniformly over the
    # indices of the 1000-point Karras grid instead, because the DMD losses query the teacher
    # there (docs/algorithm.md §4), where lognormal sampling alone rarely goes above sigma ~ 5.
    p_mean: float = -1.2
    p_std: float = 1.2
    grid_fraction: float = 0.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    seed: int = 0
    split: Split = Split()

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_unet(s: TeacherSettings):
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=RESOLUTION, in_channels=3, out_channels=3,
        block_out_channels=s.block_out_channels, layers_per_block=s.layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NUM_CLASSES, norm_num_groups=s.norm_num_groups, dropout=s.dropout,
    )


def build_scheduler(s: TeacherSettings):
    from diffusers import EDMEulerScheduler

    return EDMEulerScheduler(sigma_min=s.sigma_min, sigma_max=s.sigma_max, sigma_data=s.sigma_data, rho=s.rho,
                             num_train_timesteps=1000, prediction_type="epsilon")


def edm_loss(unet, x0: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
             sigma_data: float) -> torch.Tensor:
    """EDM eq. 8 with the preconditioning of Table 1, written as the F-space regression
    ||F(c_in x, c_noise) - (x0 - c_skip x) / c_out||^2 (same optimum and weighting); these are
    the formulas of dmd2.schedule.EDMSchedule at continuous sigma."""
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps
    c_in = 1 / (s**2 + sigma_data**2).sqrt()
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    out = unet(c_in * x, sigma.log() / 4, class_labels=labels).sample
    return ((out - (x0 - c_skip * x) / c_out) ** 2).mean()


def _karras_grid(s: TeacherSettings, n: int = 1000) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = s.sigma_min ** (1 / s.rho), s.sigma_max ** (1 / s.rho)
    return ((lo + ramp * (hi - lo)) ** s.rho).float()


def train_teacher(out: str | Path, s: TeacherSettings = TeacherSettings(), log_every: int = 500) -> Path:
    """Train and write the teacher folder ``out``; returns it."""
    torch.manual_seed(s.seed)
    images, labels = load_split(s.split)["train"]
    x_all = torch.from_numpy(images).float().div(127.5).sub(1).unsqueeze(1).repeat(1, 3, 1, 1)
    y_all = torch.from_numpy(labels)
    grid = _karras_grid(s)
    unet = build_unet(s).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.Adam(unet.parameters(), lr=s.lr)
    g = torch.Generator().manual_seed(s.seed)
    tic, running = time.time(), []
    for step in range(s.steps):
        idx = torch.randint(0, len(x_all), (s.batch_size,), generator=g)
        sigma = (torch.randn(s.batch_size, generator=g) * s.p_std + s.p_mean).exp()
        on_grid = torch.rand(s.batch_size, generator=g) < s.grid_fraction
        sigma = torch.where(on_grid, grid[torch.randint(0, len(grid), (s.batch_size,), generator=g)], sigma)
        eps = torch.randn(x_all[idx].shape, generator=g)
        loss = edm_loss(unet, x_all[idx], y_all[idx], sigma, eps, s.sigma_data)
        for group in opt.param_groups:  # linear warmup, then cosine decay to 10%
            p = step / s.steps
            group["lr"] = s.lr * min(1.0, (step + 1) / s.warmup_steps) * (0.55 + 0.45 * math.cos(math.pi * p))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(pu, 1 - s.ema_decay)
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == s.steps:
            print(f"teacher step {step + 1}/{s.steps} | loss {np.mean(running):.4f} | {time.time() - tic:.0f}s", flush=True)
            running = []
    return save_teacher(ema, s, out)


def save_teacher(unet, s: TeacherSettings, out: str | Path) -> Path:
    """``out/unet`` (fp16 safetensors, loaded back as fp32), ``out/scheduler``, provenance json."""
    from safetensors.torch import save_file

    out = Path(out)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    unet.save_config(out / "unet")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()},
              str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    build_scheduler(s).save_config(out / "scheduler")
    (out / "digits_teacher.json").write_text(json.dumps({"settings": asdict(s), "digest": s.digest(),
                                                          "made_by": "python -m dmd2.digits.teacher"}, indent=1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="teacher folder to write")
    ap.add_argument("--steps", type=int, default=TeacherSettings.steps)
    args = ap.parse_args()
    torch.set_num_threads(1)
    train_teacher(args.out, TeacherSettings(steps=args.steps))


if __name__ == "__main__":
    main()
