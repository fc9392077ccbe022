"""The regression stage (docs/algorithm.md §10): the 1-step generator fitted to the teacher's ODE
pairs (``dmd2 ode-pairs``) before DMD2, as the authors warm-start their 1-step SDXL model.

The generator sees each pair's noise exactly as at inference (pure noise labelled
``generator.conditioning_timestep``, e.g. 399) and its x0 is pulled towards the teacher's output
for that noise, by ``regression.loss``:
- ``lpips``: LPIPS (VGG, max-pooling replaced by average pooling, as the authors) between the
  decodes of both, mapped to [0, 1]; the gradient flows through the frozen decoder;
- ``mse``: mean squared error in the generator's space;
- ``features``: squared distance between a TorchScript feature network's outputs on the decodes
  (clean-fid's convention: images in [0, 255], as ``dmd2 eval --feature-extractor``), so the stage
  runs offline.
Decodes use ``model.tiny_vae`` (an AutoencoderTiny, as the authors' taesdxl) or the teacher's VAE.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import batch_indices
from .errors import UserError
from .models.conditioning import cond_to
from .pairs import Pairs
from .sampling import timestep_batch

LPIPS_INSTEAD = ("regression.loss: lpips needs the `lpips` package (pip install 'dmd2[lpips]') and torchvision's "
                 "VGG16 weights, which it downloads once; offline, use regression.loss: features with "
                 "regression.feature_extractor PATH.pt, or mse")


class RegressionBatches:
    """This rank's pairs at each step, a pure function of (seed, step, rank) like ``data.Batches``."""

    prompts = None  # previews: one image per pair's own condition

    def __init__(self, folder: str, teacher, *, resolution: int, batch_size: int, timestep: int, seed: int,
                 rank: int, world: int, device):
        self.pairs = Pairs(folder)
        self.pairs.verify()
        s = self.pairs.settings
        lat = teacher.latent_size(resolution)
        self.shape = (batch_size, teacher.channels, lat, lat)
        if list(s["shape"]) != list(self.shape[1:]) or s["family"] != teacher.family:
            raise UserError(f"regression.pairs: {folder}: drawn for a {s['family']} teacher at shape {s['shape']}, "
                            f"this recipe trains a {teacher.family} generator at {list(self.shape[1:])}")
        self.schedule, self.timestep = teacher.schedule, timestep
        self.seed, self.rank, self.world, self.device = seed, rank, world, torch.device(device)

    def _rows(self, idx: list[int]):
        rows = self.pairs.rows(idx)
        cond = cond_to({k.removeprefix("cond."): v for k, v in rows.items() if k.startswith("cond.")}, self.device)
        # pure noise labelled t, exactly as sampling.pure_noise makes the generator's input
        x = rows["noise"].to(self.device) * self.schedule.initial_noise_scale(self.timestep)
        return x, cond, rows["target"].to(self.device)

    def __call__(self, step: int):
        """(x_t, t, cond, target) of this rank's batch at ``step``."""
        idx = batch_indices(len(self.pairs), step, self.rank, self.world, self.shape[0], self.seed)
        x, cond, target = self._rows(idx)
        return x, timestep_batch(self.timestep, len(idx), self.device), cond, target

    def preview_cond(self, n: int) -> dict[str, torch.Tensor]:
        return self._rows([i % len(self.pairs) for i in range(n)])[1]


def _avg_pooled(net: nn.Module) -> nn.Module:
    for name, child in net.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(net, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        else:
            _avg_pooled(child)
    return net


def _load_tiny_vae(source: str, device):
    from diffusers import AutoencoderTiny

    from .hub import require

    require(source, "config.json", what="model.tiny_vae", instead="model.tiny_vae: a local AutoencoderTiny folder")
    try:
        return AutoencoderTiny.from_pretrained(source).to(device).requires_grad_(False).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"model.tiny_vae: {source}: not an AutoencoderTiny ({str(e).splitlines()[0]})") from None


class RegressionLoss(nn.Module):
    """``regression.loss`` between the generator's x0 and the pairs' targets (both in the generator's space)."""

    def __init__(self, cfg, teacher, tiny_vae: str | None, device):
        super().__init__()
        self.kind = cfg.loss
        self.decoder = None
        if self.kind == "mse":
            return
        self.decoder = _load_tiny_vae(tiny_vae, device) if tiny_vae else teacher.vae
        if self.decoder is not None:
            self.decoder = self.decoder.to(device).requires_grad_(False).eval()
        if self.kind == "features":
            try:
                self.net = torch.jit.load(cfg.feature_extractor, map_location=device).eval()
            except (OSError, RuntimeError, ValueError) as e:
                raise UserError(f"regression.feature_extractor: {cfg.feature_extractor}: not a TorchScript "
                                f"module ({str(e).strip().splitlines()[0][:120]})") from None
            for p in self.net.parameters():  # ScriptModules have no requires_grad_()
                p.requires_grad_(False)
        else:
            try:
                import lpips
            except ImportError:
                raise UserError(LPIPS_INSTEAD) from None
            try:
                self.net = _avg_pooled(lpips.LPIPS(net="vgg", verbose=False)).to(device).requires_grad_(False).eval()
            except (OSError, RuntimeError) as e:  # torchvision's download of the VGG weights, offline
                raise UserError(f"{LPIPS_INSTEAD} ({str(e).strip().splitlines()[0][:120]})") from None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Generator space -> images in [-1, 1], differentiable (the decoder is frozen, not detached)."""
        from .models.vae import decode_differentiable

        return decode_differentiable(self.decoder, x)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.kind == "mse":
            loss = torch.mean((pred.float() - target.float()) ** 2)
        else:
            with torch.no_grad():
                goal = self.decode(target)
            img = self.decode(pred)
            if self.kind == "lpips":  # [0, 1] as the authors; normalize=True is LPIPS's own [0, 1] convention
                loss = self.net((img + 1) / 2, (goal + 1) / 2, normalize=True).mean()
            else:  # clean-fid's convention: float images in [0, 255]
                f_pred, f_goal = self.net((img + 1) * 127.5), self.net((goal + 1) * 127.5)
                loss = torch.mean((f_pred.float() - f_goal.float()) ** 2)
        return loss, {"loss_regression": loss.detach()}
