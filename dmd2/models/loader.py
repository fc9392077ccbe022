"""THE model loader: a teacher from a hub id, a local diffusers folder, or one .safetensors file.

Everything that can be read from the teacher (family, latent channels, resolution, mid-block
width, cross-attention width, class count, prediction type, noise schedule) is read here and
never repeated in the recipe.

Folder layouts: SD1.5 / SDXL / SD3 / FLUX are ordinary diffusers pipeline folders (model_index.json;
SD3's denoiser is ``transformer/``, an SD3Transformer2DModel, FLUX's a FluxTransformer2DModel, held in
``Teacher.unet`` all the same);
class-conditional teachers are a folder with ``unet/`` (UNet2DModel, or UNet2DConditionModel
with a class embedding), ``scheduler/`` (DDPM-style or EDM scheduler config) and optionally
``vae/`` for latent-space models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..hub import TEACHER_INSTEAD, hub_file, is_local
from ..schedule import DDPMSchedule, EDMSchedule, FlowSchedule, T

FAMILIES = ("sd15", "sdxl", "sd3", "flux", "classcond")
TEXT_FAMILIES = ("sd15", "sdxl", "sd3", "flux")  # prompted, with CFG (or FLUX.1-dev's guidance embedding)
TRANSFORMER_FAMILIES = ("sd3", "flux")  # the denoiser is a diffusers transformer (folder transformer/), not a UNet


def is_transformer(net: nn.Module) -> bool:
    """A diffusers DiT-style denoiser (SD3Transformer2DModel, FluxTransformer2DModel): blocks of tokens,
    no down/up path."""
    return hasattr(net, "transformer_blocks")


def is_flux(net: nn.Module) -> bool:
    """FluxTransformer2DModel: double-stream then single-stream blocks, on latents packed 2x2 into
    tokens (FluxPipeline._pack_latents), told where each token sits by RoPE ids."""
    return hasattr(net, "single_transformer_blocks")


@dataclass
class Teacher:
    """Everything loaded from a teacher, frozen. ``unet`` is the network every role starts from
    (a UNet, or SD3's transformer)."""

    source: str
    family: str
    unet: nn.Module
    schedule: DDPMSchedule | EDMSchedule | FlowSchedule
    scheduler_config: dict
    vae: nn.Module | None = None
    text_encoders: list[nn.Module] = field(default_factory=list)
    tokenizers: list = field(default_factory=list)
    config_source: str | None = None  # model.teacher_config, for a single-file teacher
    # train.resolution as given to load_teacher: the resolution of a teacher whose config records
    # none (FLUX), and the one a resolution-dependent noise schedule (FLUX.1-dev's) was built for
    given_resolution: int | None = None

    def training_resolution(self, requested: int | None) -> int:
        """``train.resolution`` (default: the native one), checked against the UNet's downsampling."""
        res = requested or self.resolution
        if res % (self.vae_scale_factor * self._downsampling):
            raise UserError(f"train.resolution: {res} is not divisible by the teacher's downsampling")
        if self.scheduler_config.get("use_dynamic_shifting") and res != self.resolution:
            raise UserError(f"train.resolution: {res}, but the teacher was loaded for {self.resolution} (its noise "
                            "schedule depends on the resolution: use_dynamic_shifting)")
        most = self.transformer and self.unet.config.get("pos_embed_max_size")
        if most and res // (self.vae_scale_factor * self._downsampling) > most:
            # SD3's PatchEmbed crops a fixed grid of position embeddings (pos_embed_max_size patches a side)
            raise UserError(f"train.resolution: {res} is above the teacher's largest, "
                            f"{most * self.vae_scale_factor * self._downsampling} (pos_embed_max_size)")
        return res

    def check_cfg(self, cfg_scale: float, cfg_interval=None) -> None:
        if self.family == "classcond" and cfg_scale != 1.0:
            raise UserError(f"loss.cfg_scale: {cfg_scale} but class-conditional teachers use no CFG (set 1.0)")
        if cfg_interval is not None and self.guidance_embeds:
            raise UserError(f"loss.cfg_interval: {list(cfg_interval)} needs an unconditional branch, but this "
                            "teacher takes its guidance as an input (guidance-distilled); remove it")

    @property
    def transformer(self) -> bool:
        return is_transformer(self.unet)

    @property
    def flux(self) -> bool:
        return is_flux(self.unet)

    @property
    def t5_free(self) -> bool:
        """An SD3 pipeline without T5 (``text_encoder_3`` null): its T5 tokens are zeros."""
        return self.family == "sd3" and len(self.text_encoders) == 2

    @property
    def guidance_embeds(self) -> bool:
        """A guidance-distilled denoiser (FLUX.1-dev): the guidance scale is one of its inputs."""
        return bool(self.unet.config.get("guidance_embeds"))

    def guidance(self, cfg_scale: float) -> float | None:
        """The value of the guidance input every role is called with (loss.cfg_scale), or None for a
        denoiser without one (see models.roles.guided_x0)."""
        return float(cfg_scale) if self.guidance_embeds else None

    @property
    def denoiser_folder(self) -> str:
        """The pipeline folder the denoiser lives in: ``transformer`` (SD3) or ``unet``."""
        return "transformer" if self.transformer else "unet"

    @property
    def _downsampling(self) -> int:
        """Latent pixels per feature-map pixel: the patch size (transformers; FLUX: times 2, its 2x2
        packing), or one halving per down block but the last (UNets)."""
        if self.transformer:
            return int(self.unet.config.patch_size) * (2 if self.flux else 1)
        return 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def resolution(self) -> int:
        """Native pixel resolution: the UNet's sample size times the VAE's downsampling; for a
        denoiser whose config records none (FLUX), train.resolution as given to load_teacher."""
        size = self.unet.config.get("sample_size")
        if size is None:
            if self.given_resolution is None:
                raise UserError(f"train.resolution: the {self.family} teacher's {type(self.unet).__name__} config "
                                "records no training resolution; set train.resolution (FLUX.1: 1024)")
            return int(self.given_resolution)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def channels(self) -> int:
        """Latent channels (FLUX's in_channels are 4 of them per packed 2x2 token)."""
        return int(self.unet.config.in_channels) // (4 if self.flux else 1)

    def image_seq_len(self, resolution: int) -> int:
        """Image tokens of a transformer at ``resolution``: (H / vae / p) (W / vae / p), FLUX's packed
        (H / vae / 2) (W / vae / 2) (FluxPipeline: latents.shape[1]), the mu of a dynamic shift."""
        return self.mid_spatial(resolution) ** 2

    @property
    def num_classes(self) -> int | None:
        n = getattr(self.unet.config, "num_class_embeds", None)
        return int(n) if n else None

    @property
    def mid_channels(self) -> int:
        """Channels of the GAN head's input: the mid-block's, or a transformer's token width."""
        if self.transformer:
            return int(self.unet.config.num_attention_heads * self.unet.config.attention_head_dim)
        return int(self.unet.config.block_out_channels[-1])

    def latent_size(self, resolution: int) -> int:
        return resolution // self.vae_scale_factor

    def mid_spatial(self, resolution: int) -> int:
        """Spatial size of the GAN head's input map: one halving per down block but the last
        (UNets), the latent patch grid (transformers)."""
        return self.latent_size(resolution) // self._downsampling


def _schedule_from_config(cfg: dict, where: str, teacher: Teacher | None = None) -> DDPMSchedule | EDMSchedule | FlowSchedule:
    """The teacher's noise schedule; ``teacher`` (its denoiser, VAE and given resolution) for a flow
    schedule whose shift depends on the resolution."""
    cls = cfg.get("_class_name", "")
    if cls.startswith("FlowMatch"):
        n = cfg.get("num_train_timesteps", T)
        if n != T:
            raise UserError(f"{where}: num_train_timesteps is {n}; dmd2 supports teachers trained with T={T}")
        if cfg.get("invert_sigmas"):
            raise UserError(f"{where}: invert_sigmas (Mochi-style) flow schedulers are not supported")
        if cfg.get("use_dynamic_shifting"):
            # FluxPipeline's mu: calculate_shift of the packed image token count at the resolution drawn;
            # the table is FlowMatchEulerDiscreteScheduler's at that mu (schedule.flow_sigmas). Other
            # pipelines' fallbacks differ (StableDiffusion3Pipeline: max_shift 1.16), so FLUX only.
            if teacher is None or teacher.family != "flux":
                raise UserError(f"{where}: use_dynamic_shifting (a resolution-dependent shift) is supported for "
                                "FLUX teachers only")
            return FlowSchedule.from_scheduler_config(cfg, teacher.image_seq_len(teacher.resolution))
        return FlowSchedule.from_scheduler_config(cfg)
    if cls.startswith("EDM"):
        return EDMSchedule(
            sigma_min=cfg.get("sigma_min", 0.002), sigma_max=cfg.get("sigma_max", 80.0),
            rho=cfg.get("rho", 7.0), sigma_data=cfg.get("sigma_data", 0.5), num_timesteps=T,
        )
    from diffusers import DDPMScheduler

    n = cfg.get("num_train_timesteps", T)
    if n != T:
        raise UserError(f"{where}: num_train_timesteps is {n}; dmd2 supports teachers trained with T={T}")
    keys = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "num_train_timesteps")
    ddpm = DDPMScheduler(**{k: cfg[k] for k in keys if k in cfg and cfg[k] is not None})
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise UserError(f"{where}: prediction_type {pred!r} is not supported (epsilon or v_prediction)")
    return DDPMSchedule(ddpm.alphas_cumprod, pred)


def _load_config(source: str, name: str, subfolder: str | None = None) -> dict | None:
    """A JSON config from a local folder or the hub; None if it does not exist."""
    if is_local(source):
        path = Path(source).expanduser() / (subfolder or "") / name
        return json.loads(path.read_text()) if path.is_file() else None
    # cache first, the hub once with a short timeout: "not cached and offline" is its own message
    path = hub_file(source, f"{subfolder}/{name}" if subfolder else name, what="model.teacher", instead=TEACHER_INSTEAD)
    return json.loads(path.read_text()) if path is not None else None


def _detect_family(model_index: dict | None, unet_cfg: dict) -> str:
    name = (model_index or {}).get("_class_name", "")
    if name.startswith("StableDiffusion3"):
        return "sd3"
    # FluxPipeline only: Fill/Control/Kontext pipelines add image inputs (their in_channels differ)
    if name == "FluxPipeline" and unet_cfg.get("_class_name") == "FluxTransformer2DModel":
        return "flux"
    if "XL" in name or unet_cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if model_index and "text_encoder" in model_index:
        return "sd15"
    return "classcond"


def _quiet_loading() -> None:
    """No per-module "Loading weights" bars: errors after loading must stay one line."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()


def load_teacher(source: str, family: str = "auto", config_source: str | None = None, *,
                 denoiser: bool = True, resolution: int | None = None) -> Teacher:
    """Load a frozen teacher. ``family`` (from the recipe) is checked against what is found.
    ``denoiser=False`` (a diffusers folder or hub id): the UNet is built from its config on the meta
    device, weights unread, for work that needs only the encoders and the VAE (``dmd2 prepare``).
    ``resolution``: the recipe's train.resolution, which a FLUX teacher needs (its config records
    none, and FLUX.1-dev's noise schedule depends on it)."""
    _quiet_loading()
    where = f"model.teacher: {source!r}"
    if source.endswith((".safetensors", ".ckpt")):
        teacher = _load_single_file(source, family, config_source)
    else:
        if is_local(source) and not Path(source).expanduser().is_dir():
            raise UserError(f"{where} does not exist (expected a diffusers folder, a hub id, or a .safetensors file)")
        try:
            teacher = _load_diffusers(source, denoiser, resolution)
        except UserError:
            raise
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{where} could not be loaded: {first}") from None
    if family != "auto" and family != teacher.family:
        raise UserError(f"{where} is a {teacher.family} teacher but model.family is {family}")
    for m in (teacher.unet, teacher.vae, *teacher.text_encoders):
        if m is not None:
            m.requires_grad_(False).eval()
    teacher.config_source = config_source
    return teacher


def _load_diffusers(source: str, denoiser: bool = True, resolution: int | None = None) -> Teacher:
    from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel

    where = f"model.teacher: {source!r}"
    model_index = _load_config(source, "model_index.json")
    folder = "transformer" if model_index and "transformer" in model_index else "unet"
    unet_cfg = _load_config(source, "config.json", folder)
    sched_cfg = _load_config(source, "scheduler_config.json", "scheduler")
    if unet_cfg is None or sched_cfg is None:
        raise UserError(f"{where} is not a diffusers teacher (needs {folder}/config.json and "
                        "scheduler/scheduler_config.json)")
    family = _detect_family(model_index, unet_cfg)
    if folder == "transformer" and family not in TRANSFORMER_FAMILIES:
        raise UserError(f"{where}: a {model_index.get('_class_name')} teacher is not supported "
                        f"(transformer families: {', '.join(TRANSFORMER_FAMILIES)})")
    if family == "sd3":
        from diffusers import SD3Transformer2DModel as unet_cls
    elif family == "flux":
        from diffusers import FluxTransformer2DModel as unet_cls
    else:
        unet_cls = UNet2DModel if unet_cfg.get("_class_name") == "UNet2DModel" else UNet2DConditionModel
    if denoiser:
        unet = unet_cls.from_pretrained(source, subfolder=folder)
    else:
        with torch.device("meta"):
            unet = unet_cls.from_config(unet_cfg)
    has_vae = (model_index and "vae" in model_index) or _load_config(source, "config.json", "vae") is not None
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae") if has_vae else None
    encoders, tokenizers = [], []
    if family in ("sd15", "sdxl"):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        encoders.append(CLIPTextModel.from_pretrained(source, subfolder="text_encoder"))
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"))
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder_2"))
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2"))
    elif family == "sd3":
        # CLIP-L, CLIP-G (both with projection: their pooled outputs are used) and T5, as
        # StableDiffusion3Pipeline's components. A pipeline may leave T5 out (text_encoder_3 null in
        # model_index.json): the pipeline then uses zeros for its tokens, and so does conditioning.py.
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        for i in ("", "_2"):
            encoders.append(CLIPTextModelWithProjection.from_pretrained(source, subfolder=f"text_encoder{i}"))
            tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{i}"))
        if (model_index.get("text_encoder_3") or [None])[0] is not None:
            encoders.append(T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3"))
            tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3"))
    elif family == "flux":
        # CLIP-L (its pooled output only) and T5, as FluxPipeline's components
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

        encoders.append(CLIPTextModel.from_pretrained(source, subfolder="text_encoder"))
        tokenizers.append(CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"))
        encoders.append(T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2"))
        tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"))
    elif unet.config.get("num_class_embeds") is None:
        raise UserError(f"{where} has neither text encoders nor a class embedding (num_class_embeds)")
    teacher = Teacher(source, family, unet, None, dict(sched_cfg), vae, encoders, tokenizers,
                      given_resolution=resolution)
    teacher.schedule = _schedule_from_config(sched_cfg, where, teacher)
    if teacher.t5_free:
        from .attention import fold_zero_tokens
        from .conditioning import SD3_T5_TOKENS

        # conditioning.py's compact context (the CLIP tokens and one zero token) runs as the
        # pipeline's 256 zero tokens; every copy of this transformer (the roles) carries it
        fold_zero_tokens(unet, tokenizers[0].model_max_length + 1, SD3_T5_TOKENS)
    return teacher


def _load_single_file(source: str, family: str, config_source: str | None) -> Teacher:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    where = f"model.teacher: {source!r}"
    if not Path(source).expanduser().is_file():
        raise UserError(f"{where} does not exist")
    if family == "auto":
        from safetensors import safe_open

        with safe_open(source, "pt") as f:
            keys = list(f.keys())
        # FLUX.1 files (Black Forest Labs' layout, or ComfyUI's under model.diffusion_model.)
        family = ("flux" if any(k.split("double_blocks.")[0] in ("", "model.diffusion_model.") for k in keys
                                if "double_blocks." in k) else
                  "sdxl" if any(k.startswith("conditioner.embedders.1") for k in keys) else "sd15")
    if family == "flux":
        # FluxPipeline.from_single_file reads the transformer only and fetches every other component and
        # config from the hub (diffusers' single_file loading), which an offline run cannot
        raise UserError(f"{where}: single-file FLUX checkpoints hold the transformer only; use a diffusers "
                        "FluxPipeline folder or hub id")
    if family in ("classcond", "sd3"):
        raise UserError(f"{where}: single-file checkpoints are supported for sd15/sdxl; use a diffusers folder")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kw = {"config": config_source} if config_source else {}
    try:
        pipe = cls.from_single_file(source, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"{where} could not be loaded ({str(e).splitlines()[0]}); "
                        "set model.teacher_config to a diffusers folder of the same architecture") from None
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    sched_cfg = dict(pipe.scheduler.config)
    return Teacher(source, family, pipe.unet, _schedule_from_config(sched_cfg, where), sched_cfg, pipe.vae, encoders, tokenizers)
