"""One denoiser interface over diffusers UNets and transformers: ``x0 = denoiser(x_t, t, cond)``.

SD1.5, SDXL, SD3 and class-conditional (DDPM or EDM) teachers all sit behind it, so the
algorithm never asks which family it runs. ``cond`` is a dict of tensors:
``encoder_hidden_states`` (+ ``text_embeds``/``time_ids`` for SDXL, + ``pooled_projections``
for SD3) and/or ``class_labels``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..schedule import DDPMSchedule, EDMSchedule, FlowSchedule
from .loader import is_transformer


def _transformer_kwargs(cond: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    return {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype),
            "pooled_projections": cond["pooled_projections"].to(dtype)}


def feature_block(net: nn.Module, layer: str | int = "mid_block") -> int:
    """The transformer block whose output the GAN head reads: ``layer`` itself when an int, else the
    middle block, (L - 1) // 2 of L (the first half of the blocks, as a UNet's mid-block closes its
    first half)."""
    n = len(net.transformer_blocks)
    if isinstance(layer, int):
        if not 0 <= layer < n:
            raise ValueError(f"loss.gan.feature_layer: block {layer} of a transformer with {n} blocks")
        return layer
    if layer != "mid_block":
        raise ValueError(f"loss.gan.feature_layer: {layer!r} is for UNets; a transformer takes mid_block or "
                         "a block index")
    return (n - 1) // 2


def transformer_block_features(net: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor, *,
                               encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                               block: int) -> torch.Tensor:
    """SD3Transformer2DModel's forward up to and including ``transformer_blocks[block]``, its image
    tokens (B, N, D) as the latent patch grid (B, D, H/p, W/p), so the conv GAN head applies.

    Mirrors the first part of SD3Transformer2DModel.forward (diffusers 0.3x-0.4x: pos_embed,
    time_text_embed, context_embedder, the blocks, with its gradient checkpointing) for the plain
    text-conditional case, and stops: the remaining blocks would be discarded.
    tests/test_sd3.py pins it to a forward hook on the full forward.
    """
    height, width = hidden_states.shape[-2:]
    p = net.config.patch_size
    h = net.pos_embed(hidden_states).contiguous()
    temb = net.time_text_embed(timestep, pooled_projections)
    ehs = net.context_embedder(encoder_hidden_states)
    for blk in net.transformer_blocks[:block + 1]:
        if torch.is_grad_enabled() and net.gradient_checkpointing:
            ehs, h = net._gradient_checkpointing_func(blk, h, ehs, temb, None)
        else:
            ehs, h = blk(hidden_states=h, encoder_hidden_states=ehs, temb=temb, joint_attention_kwargs=None)
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[-1], height // p, width // p)


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
    """A diffusers UNet or transformer (``unet``, whichever) plus its noise schedule, predicting x0
    (float32 out, float64 inside the conversion)."""

    def __init__(self, unet: nn.Module, schedule: DDPMSchedule | EDMSchedule | FlowSchedule):
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's own output (eps, v, EDM's F, or a flow velocity) as float32."""
        dtype = unet_dtype(self.unet)
        x_in, t_in = self.schedule.model_input(x_t, t)
        if is_transformer(self.unet):
            # keywords: SD3Transformer2DModel.forward's second positional argument is encoder_hidden_states
            out = self.unet(hidden_states=x_in.to(dtype), timestep=t_in, **_transformer_kwargs(cond, dtype),
                            return_dict=False)[0]
            return out.float()
        out = self.unet(x_in.to(dtype), t_in, **_unet_kwargs(self.unet, cond, dtype), return_dict=False)[0]
        return out.float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.schedule.to_x0(x_t.float(), self.raw(x_t, t, cond), t)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 layer: str | int = "mid_block") -> torch.Tensor:
        """Mid-block (or ``layer="encoder_end"``: last down block) activations at (x_t, t, cond),
        for the GAN head; for a transformer, the image tokens after the middle block (or block
        ``layer``) as a B x D x H/p x W/p map."""
        dtype = unet_dtype(self.unet)
        x_in, t_in = self.schedule.model_input(x_t, t)
        if is_transformer(self.unet):
            return transformer_block_features(self.unet, x_in.to(dtype), t_in, block=feature_block(self.unet, layer),
                                              **_transformer_kwargs(cond, dtype))
        return mid_block_features(self.unet, x_in.to(dtype), t_in, layer=layer,
                                  **_unet_kwargs(self.unet, cond, dtype))
