"""One denoiser interface over diffusers UNets: ``x0 = denoiser(x_t, t, cond)``.

SD1.5, SDXL and class-conditional (DDPM or EDM) teachers all sit behind it, so the
algorithm never asks which family it runs. ``cond`` is a dict of tensors:
``encoder_hidden_states`` (+ ``text_embeds``/``time_ids`` for SDXL) and/or ``class_labels``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..schedule import DDPMSchedule, EDMSchedule


def _unet_kwargs(unet: nn.Module, cond: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    kw: dict = {}
    if "encoder_hidden_states" in cond:
        kw["encoder_hidden_states"] = cond["encoder_hidden_states"].to(dtype)
    if "text_embeds" in cond:
        kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": cond["time_ids"].to(dtype)}
    if "class_labels" in cond:
        kw["class_labels"] = cond["class_labels"]
    return kw


def unet_dtype(unet: nn.Module) -> torch.dtype:
    return next(unet.parameters()).dtype


def mid_block_features(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, *, layer: str = "mid_block",
                       **kw) -> torch.Tensor:
    """The UNet's forward up to and including the mid-block (the GAN head's input, §6); with
    ``layer="encoder_end"`` up to the last down block, before the mid-block.

    diffusers has no early exit, and running the up-blocks only to discard them would cost
    about half of each GAN pass, so this mirrors the first half of UNet2DConditionModel.forward
    and UNet2DModel.forward (diffusers 0.3x-0.4x) for the plain text/class-conditional case.
    tests/test_models.py pins it to a forward hook on the full forward.
    """
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    timestep = timestep.expand(sample.shape[0]) if timestep.ndim else timestep.repeat(sample.shape[0])
    ehs = kw.get("encoder_hidden_states")
    if hasattr(unet, "get_time_embed"):  # UNet2DConditionModel
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        class_emb = unet.get_class_embed(sample=sample, class_labels=kw.get("class_labels"))
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=kw.get("added_cond_kwargs"))
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=kw.get("added_cond_kwargs"))
        h = unet.conv_in(sample)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if layer == "encoder_end":
            return h
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(h, emb, encoder_hidden_states=ehs)
        return unet.mid_block(h, emb)
    # UNet2DModel
    emb = unet.time_embedding(unet.time_proj(timestep).to(unet_dtype(unet)))
    if unet.class_embedding is not None:
        labels = kw["class_labels"]
        if unet.config.class_embed_type == "timestep":
            labels = unet.time_proj(labels)
        emb = emb + unet.class_embedding(labels).to(emb.dtype)
    skip = sample
    h = unet.conv_in(sample)
    for block in unet.down_blocks:
        if hasattr(block, "skip_conv"):
            h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    return h if layer == "encoder_end" else unet.mid_block(h, emb)


class Denoiser(nn.Module):
    """A diffusers UNet plus its noise schedule, predicting x0 (float32 out, float64 inside the conversion)."""

    def __init__(self, unet: nn.Module, schedule: DDPMSchedule | EDMSchedule):
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's own output (eps, v, or EDM's F) as float32."""
        dtype = unet_dtype(self.unet)
        x_in, t_in = self.schedule.model_input(x_t, t)
        out = self.unet(x_in.to(dtype), t_in, **_unet_kwargs(self.unet, cond, dtype), return_dict=False)[0]
        return out.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.schedule.to_x0(x_t.float(), self.raw(x_t, t, cond), t)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 layer: str = "mid_block") -> torch.Tensor:
        """Mid-block (or ``layer="encoder_end"``: last down block) activations at (x_t, t, cond),
        for the GAN head."""
        dtype = unet_dtype(self.unet)
        x_in, t_in = self.schedule.model_input(x_t, t)
        return mid_block_features(self.unet, x_in.to(dtype), t_in, layer=layer,
                                  **_unet_kwargs(self.unet, cond, dtype))
