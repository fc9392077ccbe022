"""The teacher's VAE between pixels and the generator's space, in one place (training's real-image
encoding and previews, sample, eval, serve). Teachers without a VAE work in pixel space."""

from __future__ import annotations

import torch


def _shift(vae) -> float:
    return getattr(vae.config, "shift_factor", None) or 0.0


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the generator's space (scaled VAE latents: the mode, no sampling)."""
    if vae is None:
        return images
    lat = vae.encode(images.to(vae.dtype)).latent_dist.mode()
    return ((lat - _shift(vae)) * vae.config.scaling_factor).float()


def decode_differentiable(vae, x: torch.Tensor) -> torch.Tensor:
    """The generator's space -> images in [-1, 1] (float32), with gradient to ``x`` (the regression
    stage's image-space losses)."""
    if vae is None:
        return x.float()
    return vae.decode((x / vae.config.scaling_factor + _shift(vae)).to(vae.dtype)).sample.float()


@torch.no_grad()
def decode(vae, x: torch.Tensor) -> torch.Tensor:
    """The generator's space -> images in [-1, 1] (float32)."""
    return decode_differentiable(vae, x)
