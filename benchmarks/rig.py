"""One DMD2 iteration (generator phase, then critic phase) composed from dmd2's own pieces exactly as
dmd2/train.py runs it, either through the two DeepSpeed engines or on plain PyTorch modules with
torch AdamW; plus SD1.5/SDXL-architecture UNets and SD3.5-Medium/FLUX.1-dev-architecture
transformers built from config with random weights.

Shared by ``benchmarks/cpu.py`` (make bench) and ``benchmarks/gpu.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from pathlib import Path

import torch

from dmd2.tiny import FLUX_DEV_SCHEDULER, SD3_SCHEDULER, TINY_FLUX_TRANSFORMER, TINY_SD3_TRANSFORMER

REPO = Path(__file__).resolve().parent.parent

# diffusers UNet2DConditionModel configs (runwayml SD1.5 and SDXL base 1.0 unet/config.json, keys
# that differ from the defaults), and small ones of the same shape for CPU.
UNETS = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 layers_per_block=2, sample_size=64,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "sdxl": dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                 layers_per_block=2, sample_size=128, transformer_layers_per_block=(1, 2, 10),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # ~21M parameters, SD1.5-shaped: big enough that model state outweighs the framework on CPU
    "small-sd15": dict(block_out_channels=(64, 128, 256, 256), cross_attention_dim=256, attention_head_dim=8,
                       layers_per_block=1, sample_size=16, norm_num_groups=32,
                       down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                       up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "tiny-sd15": dict(block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=4,
                      layers_per_block=1, sample_size=8, norm_num_groups=32,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "tiny-sdxl": dict(block_out_channels=(32, 64), cross_attention_dim=64, attention_head_dim=4,
                      layers_per_block=1, sample_size=8, norm_num_groups=32, transformer_layers_per_block=(1, 2),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8,
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
}
# diffusers transformer configs of the flow-matching teachers (stabilityai/stable-diffusion-3.5-medium
# and black-forest-labs/FLUX.1-dev transformer/config.json, keys that differ from the defaults), and
# tiny ones of the same kind for CPU (as dmd2.tiny's). SD3.5-Medium: 24 MMDiT-X blocks, the first 13
# with dual attention, 2.24B parameters as built here; FLUX.1-dev: 19 double- and 38 single-stream
# blocks, 11.9B.
TRANSFORMERS = {
    "sd35": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "flux": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    # dmd2.tiny's, with SD3.5's dual attention and qk norm; FLUX.1-dev-like (guidance input)
    "tiny-sd35": ("SD3Transformer2DModel", {**TINY_SD3_TRANSFORMER, "dual_attention_layers": (0, 1),
                                            "qk_norm": "rms_norm"}),
    "tiny-flux": ("FluxTransformer2DModel", {**TINY_FLUX_TRANSFORMER, "guidance_embeds": True}),
}
# Text tokens each transformer is called with: SD3's 77 CLIP + 256 T5 (StableDiffusion3Pipeline's
# max_sequence_length), FLUX.1-dev's 512 T5 tokens (FluxPipeline's).
TEXT_TOKENS = {"sd35": 77 + 256, "flux": 512}
# Their scheduler configs: SD3.5's static shift 3.0; FLUX.1-dev's resolution-dependent shift.
FLOW_SCHEDULERS = {"sd35": {"_class_name": "FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER},
                   "flux": {"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_DEV_SCHEDULER}}
# What the shipped recipes train: pixel resolution, generator timesteps, CFG (FLUX.1-dev: its
# guidance input), GAN weights (recipes/sd15_1step.yaml, sdxl_4step.yaml, sd35_4step.yaml, flux_4step.yaml).
RECIPES = {
    "sd15": dict(resolution=512, timesteps=[999], cfg=1.75, gan=(1e-3, 1e-2)),
    "sdxl": dict(resolution=1024, timesteps=[999, 749, 499, 249], cfg=8.0, gan=(5e-3, 1e-2)),
    "sd35": dict(resolution=1024, timesteps=[999, 749, 499, 249], cfg=4.0, gan=(5e-3, 1e-2)),
    "flux": dict(resolution=1024, timesteps=[999, 749, 499, 249], cfg=3.5, gan=(5e-3, 1e-2)),
}


# The teachers' frozen encoders (SD1.5 / SDXL VAE and CLIP text encoders), for the cost of encoding
# conditioning every step; tiny ones of the same kind for CPU.
ENCODERS = {
    "sd15": dict(vae=(128, 256, 512, 512), text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12)]),
    "sdxl": dict(vae=(128, 256, 512, 512), text=[dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12),
                                                 dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                      num_attention_heads=20, projection_dim=1280)]),
    "tiny": dict(vae=(16, 32, 32, 32), text=[dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2)]),
}


def make_encoders(name: str, device="cpu"):
    """(VAE, [text encoders]) of the kind ``name``'s teacher ships, random weights, fp32 (as training
    holds them)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = ENCODERS["tiny" if name.startswith(("tiny", "small")) else family_of(name)]
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=spec["vae"], layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=min(32, spec["vae"][0]))
        texts = [(CLIPTextModelWithProjection if "projection_dim" in t else CLIPTextModel)(
            CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **t)) for t in spec["text"]]
    return vae.eval().requires_grad_(False), [t.eval().requires_grad_(False) for t in texts]


def family_of(name: str) -> str:
    """The recipe family of architecture ``name``: sd15, sdxl, sd35 or flux."""
    return next((f for f in ("sdxl", "sd35", "flux") if name.endswith(f)), "sd15")


def recipe_of(name: str) -> dict:
    if name in RECIPES:
        return RECIPES[name]
    base = RECIPES[family_of(name)]
    # tiny ones: the resolution whose latents (pixels / 8) are the tiny denoiser's own size
    size = UNETS[name]["sample_size"] if name in UNETS else TRANSFORMERS[name][1].get("sample_size", 8)
    return {**base, "resolution": size * 8}


def make_unet(name: str, device="cpu", dtype=torch.float32, seed: int = 0):
    """A denoiser of architecture ``name`` (a UNet, or SD3/FLUX's transformer) with random weights
    (nothing is downloaded)."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):
        if name in TRANSFORMERS:
            cls, config = TRANSFORMERS[name]
            net = getattr(diffusers, cls)(**config)
        else:
            net = diffusers.UNet2DConditionModel(**UNETS[name])
    return net.to(dtype).requires_grad_(False).eval()


def synthetic_teacher(name: str, unet, latent: int | None = None):
    """A dmd2 Teacher around ``unet``: SD's noise schedule, or SD3.5's / FLUX.1-dev's flow schedule
    (FLUX's shifted for ``latent``, its latent size); text encoders and VAE are left out (the batch
    holds random embeddings and latents of the right shapes, so the teacher's "pixels" are latents)."""
    from dmd2.models import Teacher
    from dmd2.models.loader import _schedule_from_config
    from dmd2.schedule import DDPMSchedule

    family = family_of(name)
    if family not in FLOW_SCHEDULERS:
        return Teacher(f"random:{name}", family, unet, DDPMSchedule.scaled_linear(), {})
    teacher = Teacher(f"random:{name}", "sd3" if family == "sd35" else "flux", unet, None,
                      dict(FLOW_SCHEDULERS[family]), given_resolution=latent or recipe_of(name)["resolution"] // 8)
    # as the loader does: the schedule after the teacher, whose resolution a dynamic shift reads
    teacher.schedule = _schedule_from_config(teacher.scheduler_config, teacher.source, teacher)
    return teacher


def random_batch(name: str, batch: int, latent: int, device, seed: int = 0, gan: bool = True):
    """Conditioning (and real latents for the GAN) of the right shapes for architecture ``name``."""
    from dmd2.data import Batch

    g = torch.Generator().manual_seed(seed)
    res = latent * 8
    if name in TRANSFORMERS:
        cfg = TRANSFORMERS[name][1]
        tokens = TEXT_TOKENS[family_of(name)] if not name.startswith("tiny") else 16

        def text(b):
            c = {"encoder_hidden_states": torch.randn(b, tokens, cfg["joint_attention_dim"], generator=g),
                 "pooled_projections": torch.randn(b, cfg["pooled_projection_dim"], generator=g)}
            return {k: v.to(device) for k, v in c.items()}

        channels = cfg["in_channels"] // (4 if family_of(name) == "flux" else 1)  # FLUX's are packed 2x2
        real = torch.randn(batch, channels, latent, latent, generator=g).to(device) if gan else None
        return Batch(text(batch), text(batch), real, text(batch) if gan else None)
    cfg = UNETS[name]

    def text(b):
        c = {"encoder_hidden_states": torch.randn(b, 77, cfg["cross_attention_dim"], generator=g)}
        if family_of(name) == "sdxl":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            c["text_embeds"] = torch.randn(b, pooled, generator=g)
            c["time_ids"] = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32).repeat(b, 1)
        return {k: v.to(device) for k, v in c.items()}

    uncond = text(batch)
    if family_of(name) == "sdxl":  # SDXL's unconditional embedding is all zeros, time ids kept (§4)
        uncond = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in uncond.items()}
    real = torch.randn(batch, 4, latent, latent, generator=g).to(device) if gan else None
    return Batch(text(batch), uncond, real, text(batch) if gan else None)


def loss_config(cfg_scale: float, gan: tuple[float, float] | None):
    from dmd2.config import LossConfig

    g = {"enabled": gan is not None}
    if gan is not None:
        g.update(generator_weight=gan[0], discriminator_weight=gan[1])
    return LossConfig.model_validate({"cfg_scale": cfg_scale, "gan": g})


def lora_config(mode: str, rank: int = 64, alpha: float = 8.0):
    """mode: full | lora (generator) | lora+fake (generator and fake score, sharing the teacher's base)."""
    from dmd2.config import LoraConfig

    if mode == "full":
        return None
    return LoraConfig(enabled=True, fake_score=mode == "lora+fake", rank=rank, alpha=alpha)


class Rig:
    """Generator + critic (teacher, fake score, GAN head) and their optimizers: two DeepSpeed
    engines when ``ds`` holds their configs, else plain modules with torch AdamW and the same
    clipping and non-finite-step skip (``step.TorchTrainee``)."""

    def __init__(self, teacher, *, latent: int, batch_size: int, timesteps, loss_cfg, lora=None,
                 gradient_checkpointing: bool = True, ds: dict | None = None, lr: float = 1e-5, device="cpu"):
        from dmd2.config import OptimizerConfig
        from dmd2.models.roles import build_roles
        from dmd2.step import TorchTrainee

        self.teacher, self.loss_cfg, self.timesteps = teacher, loss_cfg, list(timesteps)
        self.shape = (batch_size, teacher.channels, latent, latent)
        self.device = torch.device(device)
        # build_roles takes the *pixel* resolution only to size the GAN head from the mid-block;
        # a teacher without a VAE has latent == pixel size
        res = latent * teacher.vae_scale_factor
        gen, critic = build_roles(teacher, lora=lora, gan=loss_cfg.gan.enabled, resolution=res, seed=0,
                                  gradient_checkpointing=gradient_checkpointing, cfg_scale=loss_cfg.cfg_scale)
        optim = OptimizerConfig(lr=lr)
        self.engines = ds is not None
        if self.engines:
            from dmd2 import engines

            self.gen_engine = engines.build_engine(gen, optim, ds["generator"])
            self.critic_engine = engines.build_engine(critic, optim, ds["critic"])
            self.gen, self.critic = engines.EngineTrainee(self.gen_engine), engines.EngineTrainee(self.critic_engine)
        elif self.device.type == "meta":
            self.gen, self.critic = TorchTrainee(gen), TorchTrainee(critic)  # no optimizer: FLOPs only
        else:
            self.gen = TorchTrainee(gen.to(self.device), optim)
            self.critic = TorchTrainee(critic.to(self.device), optim)

    def iteration(self, batch, k: int = 0, seed: int = 0, generator_turn: bool = True) -> dict[str, float]:
        """One training iteration as dmd2/train.py runs it (``step.train_step``); returns its losses."""
        from dmd2.step import to_floats, train_step

        rng = torch.Generator(self.device if self.device.type != "meta" else "cpu").manual_seed(seed)
        with contextlib.nullcontext() if self.engines else torch_linear():
            logs, _ = train_step(self.gen, self.critic, batch, k=k, timesteps=self.timesteps, shape=self.shape,
                                 loss_cfg=self.loss_cfg, backward_simulation=True, generator_turn=generator_turn,
                                 rng=rng, device=self.device)
        return logs if self.device.type == "meta" else to_floats(logs)

    def destroy(self) -> None:
        if self.engines:
            for e in (self.gen_engine, self.critic_engine):
                e.destroy()


@contextlib.contextmanager
def torch_linear():
    """torch's own F.linear for the duration: building a ZeRO-3 engine replaces it process-wide with
    DeepSpeed's autograd Function ("memory efficient linear"), which would slow a plain reference
    measured in the same process."""
    import torch.nn.functional as F

    try:
        from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as Init
        original = getattr(Init, "linear_bk", F.linear)
    except ImportError:
        original = F.linear
    patched, F.linear = F.linear, original
    try:
        yield
    finally:
        F.linear = patched


def model_flops(name: str, *, lora_mode: str, batch_size: int, latent: int, timesteps, loss_cfg, k: int,
                lora_rank: int = 64) -> int:
    """FLOPs of one iteration at backward-simulation index k, counted on the meta device (no memory,
    no time) with torch's FlopCounterMode: every UNet and GAN-head call, forward and backward,
    without activation-checkpoint recomputation (model FLOPs, as MFU counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    teacher = synthetic_teacher(name, make_unet(name, device="meta"), latent)
    with torch.device("meta"):
        rig = Rig(teacher, latent=latent, batch_size=batch_size, timesteps=timesteps, loss_cfg=loss_cfg,
                  lora=lora_config(lora_mode, lora_rank), gradient_checkpointing=False, device="meta")
    batch = random_batch(name, batch_size, latent, "meta", gan=loss_cfg.gan.enabled)
    counter = FlopCounterMode(display=False)
    with counter:
        rig.iteration(batch, k)
    return int(counter.get_total_flops())


def rss_peak_reset() -> int:
    """Current resident memory in bytes, after resetting the peak (Linux /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not allowed here: the peak then includes what came before
        pass
    return _proc_status("VmRSS")


def rss_peak() -> int:
    return _proc_status("VmHWM")


def _proc_status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+)", text).group(1)) * 1024


def zero_state_counts(rig: Rig) -> dict[str, int]:
    """Trainable parameters vs the fp32 master elements ZeRO keeps for them, per engine: equal when
    frozen weights (teacher, LoRA base) get no fp32 copy or optimizer state."""
    out = {}
    for name, eng in (("generator", rig.gen_engine), ("critic", rig.critic_engine)):
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in eng.module.parameters() if p.requires_grad)
        opt = eng.optimizer
        flat = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", [])
        out[f"{name}_trainable"] = trainable
        out[f"{name}_fp32_master"] = sum(t.numel() for t in flat)
    return out


def own_teacher(teacher):
    """A teacher whose UNet no other rig shares (ZeRO-3 partitions a module in place)."""
    return dataclasses.replace(teacher, unet=copy.deepcopy(teacher.unet))
