"""One denoiser interface over diffusers UNets and transformers: ``x0 = denoiser(x_t, t, cond)``.

SD1.5, SDXL, SD3, FLUX and class-conditional (DDPM or EDM) teachers all sit behind it, so the
algorithm never asks which family it runs. ``cond`` is a dict of tensors:
``encoder_hidden_states`` (+ ``text_embeds``/``time_ids`` for SDXL, + ``pooled_projections``
for SD3 and FLUX) and/or ``class_labels``. FLUX's latents are packed into tokens and back here, so
x_t and x0 are B x C x H x W latents for every family.
"""

from __future__ import annotations

import torch
from torch import nn

from ..schedule import DDPMSchedule, EDMSchedule, FlowSchedule
from .loader import is_flux, is_transformer


def _transformer_kwargs(cond: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    return {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype),
            "pooled_projections": cond["pooled_projections"].to(dtype)}


def feature_block(net: nn.Module, layer: str | int = "mid_block") -> int:
    """The transformer block whose output the GAN head reads: ``layer`` itself when an int, else the
    middle block, (L - 1) // 2 of L (the first half of the blocks, as a UNet's mid-block closes its
    first half). FLUX's blocks are counted in the order they run: its double-stream
    ``transformer_blocks``, then its ``single_transformer_blocks``."""
    n = len(net.transformer_blocks) + len(getattr(net, "single_transformer_blocks", ()))
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


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """B x C x H x W latents -> B x (H/2)(W/2) x 4C tokens, each a 2x2 patch, row-major
    (FluxPipeline._pack_latents)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width`` (FluxPipeline._unpack_latents)."""
    b, _, d = tokens.shape
    out = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device) -> torch.Tensor:
    """The RoPE ids of the packed tokens of ``height`` x ``width`` latents: (0, row, column) per token
    (FluxPipeline._prepare_latent_image_ids at height/2, width/2). float32: the transformer's
    FluxPosEmbed reads them as float whatever the model's dtype. Made on ``device``: a host-to-device
    copy on every call would be a sync."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def _flux_kwargs(x_in: torch.Tensor, t_in: torch.Tensor, cond: dict[str, torch.Tensor], guidance: float | None,
                 dtype: torch.dtype) -> dict:
    """FluxTransformer2DModel's keyword arguments as FluxPipeline.__call__ builds them."""
    b, _, h, w = x_in.shape
    ehs = cond["encoder_hidden_states"].to(dtype)
    return {
        "hidden_states": pack_latents(x_in.to(dtype)),
        # FluxPipeline passes the scheduler's timestep / 1000, i.e. sigma in [0, 1] (the transformer
        # multiplies by 1000 itself); FlowSchedule.model_input gives sigma * T, T = 1000 (loader.py)
        "timestep": t_in / 1000,
        # the guidance scale for a guidance-distilled transformer (models.roles.guided_x0), one per row
        # as FluxPipeline's torch.full([1], guidance_scale).expand(batch); None without guidance_embeds
        "guidance": None if guidance is None else torch.full((b,), guidance, dtype=torch.float32, device=x_in.device),
        "pooled_projections": cond["pooled_projections"].to(dtype),
        "encoder_hidden_states": ehs,
        "txt_ids": torch.zeros(ehs.shape[1], 3, device=x_in.device),  # FluxPipeline.encode_prompt's text_ids
        "img_ids": latent_image_ids(h, w, x_in.device),
    }


def flux_block_features(net: nn.Module, hidden_states: torch.Tensor, timestep: torch.Tensor, *,
                        encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor, txt_ids: torch.Tensor,
                        img_ids: torch.Tensor, guidance: torch.Tensor | None, block: int,
                        grid: tuple[int, int]) -> torch.Tensor:
    """FluxTransformer2DModel's forward up to and including block ``block`` (double-stream blocks
    first, then single-stream), its image tokens (B, N, D) as the packed ``grid`` (B, D, H/2, W/2),
    the N tokens being row-major over it (``pack_latents``).

    Mirrors the first part of FluxTransformer2DModel.forward (diffusers 0.3x-0.4x:
    transformer_flux.py: x_embedder, the timestep and guidance scaled by 1000, time_text_embed,
    context_embedder, RoPE of the text and image ids, the blocks with its gradient checkpointing) for
    the plain text-conditional case (no ControlNet, no IP-Adapter), and stops. A single-stream block
    runs on the text and image tokens concatenated and returns the two parts again, the image tokens
    being the tail (FluxSingleTransformerBlock.forward), so every block's second output is the image
    tokens. tests/test_flux.py pins it to forward hooks on the full forward.
    """
    h = net.x_embedder(hidden_states)
    timestep = timestep.to(h.dtype) * 1000
    if guidance is None:
        temb = net.time_text_embed(timestep, pooled_projections)
    else:
        temb = net.time_text_embed(timestep, guidance.to(h.dtype) * 1000, pooled_projections)
    ehs = net.context_embedder(encoder_hidden_states)
    rope = net.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    for blk in [*net.transformer_blocks, *net.single_transformer_blocks][:block + 1]:
        if torch.is_grad_enabled() and net.gradient_checkpointing:
            ehs, h = net._gradient_checkpointing_func(blk, h, ehs, temb, rope, None)
        else:
            ehs, h = blk(hidden_states=h, encoder_hidden_states=ehs, temb=temb, image_rotary_emb=rope,
                         joint_attention_kwargs=None)
    return h.transpose(1, 2).reshape(h.shape[0], h.shape[-1], *grid)


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
    (float32 out, float64 inside the conversion).

    ``guidance``: the guidance scale a guidance-distilled transformer (FLUX.1-dev: guidance_embeds)
    is called with, on every call (``Teacher.guidance``: loss.cfg_scale); None for every other
    denoiser, which has no such input."""

    def __init__(self, unet: nn.Module, schedule: DDPMSchedule | EDMSchedule | FlowSchedule,
                 guidance: float | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        embeds = bool((getattr(unet, "config", None) or {}).get("guidance_embeds"))
        if embeds and guidance is None:
            raise ValueError(f"{type(unet).__name__} has a guidance embedding: pass its guidance scale (loss.cfg_scale)")
        if guidance is not None and not embeds:
            raise ValueError(f"guidance={guidance}: {type(unet).__name__} has no guidance embedding")
        self.guidance = None if guidance is None else float(guidance)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The network's own output (eps, v, EDM's F, or a flow velocity) as float32."""
        dtype = unet_dtype(self.unet)
        x_in, t_in = self.schedule.model_input(x_t, t)
        if is_flux(self.unet):
            out = self.unet(**_flux_kwargs(x_in, t_in, cond, self.guidance, dtype), return_dict=False)[0]
            return unpack_latents(out, *x_in.shape[-2:]).float()
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
        ``layer``) as a B x D x H/p x W/p map (FLUX: B x D x H/2 x W/2, its packing grid)."""
        dtype = unet_dtype(self.unet)
        x_in, t_in = self.schedule.model_input(x_t, t)
        if is_flux(self.unet):
            grid = (x_in.shape[-2] // 2, x_in.shape[-1] // 2)
            return flux_block_features(self.unet, block=feature_block(self.unet, layer), grid=grid,
                                       **_flux_kwargs(x_in, t_in, cond, self.guidance, dtype))
        if is_transformer(self.unet):
            return transformer_block_features(self.unet, x_in.to(dtype), t_in, block=feature_block(self.unet, layer),
                                              **_transformer_kwargs(cond, dtype))
        return mid_block_features(self.unet, x_in.to(dtype), t_in, layer=layer,
                                  **_unet_kwargs(self.unet, cond, dtype))
