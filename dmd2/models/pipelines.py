"""diffusers pipelines around loaded components: the teacher's own sampler for eval, the
exported pipeline folder, and LoRA files merged into a UNet."""

from __future__ import annotations

from pathlib import Path

from .loader import Teacher


def pipeline_class(family: str):
    from diffusers import (
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    return {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline,
            "flux": FluxPipeline}.get(family, StableDiffusionPipeline)


def guidance_kwargs(parts: Teacher, cfg_scale: float, batch: int) -> dict:
    """The pipeline call's arguments for guidance ``cfg_scale``, as training guides the teacher
    (models.roles.guided_x0): guidance_scale (CFG, or FLUX.1-dev's guidance input); a FLUX
    transformer without the guidance embedding gets CFG only as FluxPipeline's "true CFG", a negative
    prompt ("", conditioning.py's uncond) with true_cfg_scale (pipeline_flux.py)."""
    if parts.family == "flux" and not parts.guidance_embeds:
        return {"negative_prompt": [""] * batch, "true_cfg_scale": cfg_scale}
    return {"guidance_scale": cfg_scale}


def apply_lora_file(parts: Teacher, file: Path) -> None:
    """Merge a LoRA .safetensors (diffusers or kohya key names) into ``parts.unet``."""
    state, alphas = pipeline_class(parts.family).lora_state_dict(str(file))
    parts.unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="dmd2")
    parts.unet.fuse_lora()
    parts.unet.unload_lora()


def diffusers_pipeline(parts: Teacher, scheduler):
    """A StableDiffusion(XL/3)Pipeline or FluxPipeline from loaded components (the UNet or transformer
    is ``parts.unet``)."""
    kw = dict(vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0], scheduler=scheduler)
    if parts.family == "flux":
        kw.update(transformer=parts.unet, text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1])
        pipe = pipeline_class(parts.family)(**kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    if parts.family == "sd3":
        kw.update(transformer=parts.unet, text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1],
                  text_encoder_3=(parts.text_encoders[2:] or [None])[0], tokenizer_3=(parts.tokenizers[2:] or [None])[0])
        pipe = pipeline_class(parts.family)(**kw)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    kw["unet"] = parts.unet
    if parts.family == "sdxl":
        # zero unconditional embeddings, as the SDXL teacher's CFG in training (conditioning.py)
        kw.update(text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1],
                  force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(parts.family)(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_scheduler(parts: Teacher):
    """The teacher's own diffusers scheduler, from the scheduler config it ships."""
    import diffusers

    cfg = dict(parts.scheduler_config)
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
