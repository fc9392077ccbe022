"""``dmd2 export``: a run's generator as files that diffusers, ComfyUI and A1111 load.

- ``diffusers``: ``unet/`` (``transformer/`` for SD3 and FLUX; safetensors, fp32/fp16/bf16). With
  ``pipeline`` (SD1.5/SDXL/SD3/FLUX), a whole StableDiffusion(XL/3)Pipeline or FluxPipeline folder
  (the teacher's VAE, text encoders
  and tokenizers) whose scheduler steps exactly as the distilled sampler (predict x0, re-noise it to
  the next timestep with fresh noise, return the last x0): an ``LCMScheduler`` for DDPM teachers, a
  ``FlowMatchEulerDiscreteScheduler`` with ``stochastic_sampling`` for flow teachers. Class-conditional
  models have no diffusers pipeline: their export is ``unet/`` + the teacher's ``scheduler/`` (for
  the parameterisation) + ``vae/`` if any, sampled by ``dmd2 sample`` or by hand (dmd2.json).
- ``lora`` (LoRA runs): the adapter as one .safetensors with diffusers (peft) key names, or
  kohya's (``lora_unet_*.lora_down/lora_up/alpha``). The alpha/rank scale is folded into the up
  weights, so every loader applies it the same way (alpha = rank).

Every export holds dmd2.json (recipe, step, timesteps, family, schedule) and the same record in
the "dmd2" entry of its safetensors headers, so a lone copied file still says what it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError
from .models.conditioning import FLUX_T5_TOKENS
from .models.pipelines import diffusers_pipeline
from .models.student import DTYPES, Student, export_metadata, is_export, load_student, write_export_meta

LORA_FILES = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "dmd2_lora_kohya.safetensors"}
# Scheduler settings carried from the teacher to the exported LCMScheduler (the noise schedule).
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "prediction_type", "rescale_betas_zero_snr")


def distilled_scheduler(scheduler_config: dict, timesteps: list[int]):
    """An LCMScheduler on the teacher's noise schedule that steps like ``sampling.sample``.

    ``original_inference_steps = K`` makes ``num_inference_steps=K`` pick T-1, ..., T/K - 1 (e.g.
    [999, 749, 499, 249]); other trained timesteps (1-step at 399) must be passed as ``timesteps=``.
    No clipping or thresholding of x0: the distilled sampler has none.
    """
    from diffusers import LCMScheduler

    cfg = {k: scheduler_config[k] for k in _SCHEDULE_KEYS if scheduler_config.get(k) is not None}
    return LCMScheduler(**cfg, original_inference_steps=len(timesteps), clip_sample=False,
                        thresholding=False, steps_offset=1)


def distilled_flow_scheduler(scheduler_config: dict):
    """The flow teacher's FlowMatchEulerDiscreteScheduler with ``stochastic_sampling``: its step is
    x0 = x - s v, then (1 - s_next) x0 + s_next * fresh noise (diffusers'
    scheduling_flow_match_euler_discrete.py), the distilled sampler's step. Called with
    ``sigmas=flow_pipeline_sigmas(timesteps)``, which its shift maps to the trained noise levels
    (a dynamic shift, FLUX.1-dev's: at the trained height and width, as ``_usage`` passes them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return FlowMatchEulerDiscreteScheduler(**{**cfg, "stochastic_sampling": True})


def flow_pipeline_sigmas(timesteps: list[int], num_train_timesteps: int = 1000) -> list[float]:
    """The unshifted sigmas (t + 1) / T to pass a flow pipeline for trained timesteps t: the scheduler
    shifts them exactly as dmd2.schedule.flow_sigmas does (999 -> 1.0)."""
    return [(t + 1) / num_train_timesteps for t in timesteps]


def _stamp(files, meta: dict) -> None:
    """Add the dmd2 record to safetensors headers (keeping what is there, e.g. format=pt)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    for f in files:
        with safe_open(str(f), "pt") as h:
            old = h.metadata() or {}
        save_file(load_file(str(f)), str(f), metadata={**old, "dmd2": json.dumps(meta)})


def _usage(gen: Student, pipeline: bool) -> str:
    K = len(gen.timesteps)
    if gen.family == "classcond":
        return ("x = sigma_or_1(t0) * randn; for each t in timesteps: x0 = x0-prediction of unet/ with scheduler/'s "
                "parameterisation; x = add_noise(x0, fresh randn, next t); image = vae/ decode of the last x0 "
                "(dmd2 sample does this)")
    if pipeline and gen.family == "flux":
        # a guidance-distilled student keeps the guidance input it was trained at (models.roles.guided_x0);
        # without one, guidance_scale is unused (as FLUX.1-schnell's). height and width: FluxPipeline's
        # dynamic shift (mu) depends on them, and the conditioning on max_sequence_length
        g = gen.parts.guidance(gen.recipe.loss.cfg_scale)
        return (f"DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps={K}, "
                f"sigmas={flow_pipeline_sigmas(gen.timesteps)}, guidance_scale={0.0 if g is None else g}, "
                f"height={gen.resolution}, width={gen.resolution}, max_sequence_length={FLUX_T5_TOKENS})  # "
                + ("the guidance it was distilled at; no CFG (true_cfg_scale 1)" if g is not None else
                   "no CFG: it is distilled in")
                + f"; sigmas = (t + 1) / 1000 of the trained timesteps {gen.timesteps}, shifted by the scheduler")
    if pipeline and gen.schedule.kind == "flow":
        # diffusers loads a pipeline's null components (an SD3 without T5) only when passed as None
        nulls = ", text_encoder_3=None, tokenizer_3=None" if len(gen.parts.text_encoders) == 2 else ""
        return (f"DiffusionPipeline.from_pretrained(folder{nulls})(prompt, sigmas={flow_pipeline_sigmas(gen.timesteps)}, "
                f"guidance_scale=0)  # no CFG: it is distilled in; sigmas = (t + 1) / 1000 of the trained "
                f"timesteps {gen.timesteps}, shifted by the scheduler")
    if pipeline:
        return (f"DiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps={K}, "
                f"timesteps={gen.timesteps}, guidance_scale=0)  # no CFG: it is distilled in")
    if gen.family in ("sd3", "flux"):
        return "the transformer of the teacher's pipeline; sample it with dmd2 sample, or export with --pipeline"
    return "the UNet of the teacher's pipeline; sample it with dmd2 sample, or with --pipeline's LCMScheduler"


def export(run: str | Path, out: str | Path, *, fmt: str = "diffusers", pipeline: bool = False, dtype: str = "fp32",
           lora_style: str = "diffusers", merge_lora: bool = False) -> Path:
    """Write the run's newest committed generator to ``out`` (a new or empty folder)."""
    run, out = Path(run), Path(out)
    if fmt not in ("diffusers", "lora"):
        raise UserError(f"--format {fmt}: expected diffusers or lora")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if lora_style not in LORA_FILES:
        raise UserError(f"--lora-style {lora_style}: expected diffusers or kohya")
    if lora_style != "diffusers" and fmt != "lora":
        raise UserError("--lora-style is for --format lora")
    if fmt == "lora" and (pipeline or merge_lora):
        raise UserError(f"--format lora writes the adapter file only; {'--pipeline' if pipeline else '--merge-lora'} "
                        "is for full weights (--format diffusers)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder")
    if is_export(run):
        raise UserError(f"{run}: is already an export; dmd2 export reads a run folder")

    gen = load_student(run, "cpu", merge_lora=fmt != "lora")
    lora = gen.recipe.model.lora.enabled
    if fmt == "lora" and not lora:
        raise UserError(f"--format lora: {run} trained full weights, not a LoRA; use --format diffusers")
    if fmt == "lora" and gen.family in ("classcond", "sd3", "flux"):
        raise UserError(f"--format lora: LoRA files are for SD1.5/SDXL pipelines; use --merge-lora for a "
                        f"{'class-conditional' if gen.family == 'classcond' else gen.family} model")
    if fmt == "diffusers" and lora and not merge_lora:
        raise UserError(f"{run} is a LoRA run: --format lora writes the adapter, --merge-lora writes full weights")
    if merge_lora and not lora:
        raise UserError(f"--merge-lora: {run} is not a LoRA run")
    if pipeline and gen.family == "classcond":
        raise UserError("--pipeline: class-conditional models have no diffusers pipeline; the export is already "
                        "complete (unet/, scheduler/, vae/)")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "lora":
        _export_lora(gen, out, dtype, lora_style)
    else:
        _export_diffusers(gen, out, dtype, pipeline, merged=merge_lora)
    return out


def _export_diffusers(gen: Student, out: Path, dtype: str, pipeline: bool, merged: bool) -> None:
    parts = gen.parts
    complete = pipeline or gen.family == "classcond"
    folder = parts.denoiser_folder
    meta = export_metadata(gen, format="diffusers", weights=folder, complete=complete, pipeline=pipeline, dtype=dtype,
                     merged_lora=merged, usage=_usage(gen, pipeline))
    torch_dtype = DTYPES[dtype]
    if pipeline:
        flow = gen.schedule.kind == "flow"
        scheduler = (distilled_flow_scheduler(parts.scheduler_config) if flow else
                     distilled_scheduler(parts.scheduler_config, gen.timesteps))
        pipe = diffusers_pipeline(parts, scheduler)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
        pipe.save_pretrained(out, safe_serialization=True)
    else:
        parts.unet.to(torch_dtype).save_pretrained(out / folder, safe_serialization=True)  # noqa
        if gen.family == "classcond":
            (out / "scheduler").mkdir()
            (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler_config, indent=2))
            if parts.vae is not None:
                parts.vae.to(torch_dtype).save_pretrained(out / "vae", safe_serialization=True)
    _stamp(sorted((out / folder).glob("*.safetensors")), meta)
    write_export_meta(out, meta)


def lora_state_dict(unet: torch.nn.Module, scale: float, style: str) -> dict[str, torch.Tensor]:
    """The peft adapter of ``unet`` as a LoRA file's tensors, with ``scale`` folded into B (up):
    diffusers' key names (``unet.<module>.lora_A/B.weight``, peft's under ``unet.``) or kohya's,
    converted by diffusers' ``convert_state_dict_to_kohya``
    (``lora_unet_<module with _>.lora_down/lora_up.weight`` and ``.alpha``)."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict

    out = {f"unet.{key}": (w * scale if ".lora_B." in key else w).contiguous()
           for key, w in get_peft_model_state_dict(unet).items()}
    if style == "kohya":
        # diffusers writes each alpha as the rank (an int64 scalar): with the scale folded into the
        # up weights, alpha / rank = 1 in every loader. _export_lora casts it to the file's dtype
        # like every tensor, so the file is the one the former hand-written conversion wrote.
        out = convert_state_dict_to_kohya(out)
    return out


def _export_lora(gen: Student, out: Path, dtype: str, style: str) -> None:
    from safetensors.torch import save_file

    cfg = gen.recipe.model.lora
    name = LORA_FILES[style]
    meta = export_metadata(gen, format="lora", weights=name, lora_style=style, lora_rank=cfg.rank, lora_alpha=cfg.alpha,
                     complete=False, dtype=dtype,
                     usage=f"pipe = <{gen.family} pipeline of the teacher>; pipe.scheduler = LCMScheduler(...); "
                           f"pipe.load_lora_weights(folder); pipe(prompt, timesteps={gen.timesteps}, guidance_scale=0)")
    tensors = {k: v.to(DTYPES[dtype]) for k, v in lora_state_dict(gen.parts.unet, cfg.alpha / cfg.rank, style).items()}
    save_file(tensors, str(out / name), metadata={"format": "pt", "dmd2": json.dumps(meta)})
    write_export_meta(out, meta)
