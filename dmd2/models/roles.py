"""The networks of DMD2 built from one teacher (docs/algorithm.md §1): the generator, and the critic, and the one place
that switches ``requires_grad`` per phase."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UserError
from .conditioning import cat_cond
from .denoiser import Denoiser
from .gan_head import GANHead
from .loader import Teacher


class TeacherView(Denoiser):
    """The teacher when the fake score is a LoRA of its UNet: the same module, adapters off."""

    def raw(self, x_t, t, cond):
        from .lora import adapters_off

        with adapters_off(self.unet):
            return super().raw(x_t, t, cond)

    def features(self, x_t, t, cond, layer="mid_block"):
        from .lora import adapters_off

        with adapters_off(self.unet):
            return super().features(x_t, t, cond, layer)


@torch.no_grad()
def guided_x0(teacher: Denoiser, x_t, t, cond, uncond, cfg_scale: float | torch.Tensor) -> torch.Tensor:
    """Teacher x0 with classifier-free guidance in the standard form (§4 step 4); cond and uncond
    run as one batch so ZeRO-3 gathers the teacher once. Also the teacher of ``dmd2 ode-pairs``.

    A guidance-distilled teacher (FLUX.1-dev, ``guidance_embeds``) was trained to give the guided
    prediction in one call with the guidance scale as an input: FluxPipeline passes guidance_scale to
    the transformer and runs no unconditional branch (pipeline_flux.py). Its real score is that one
    call with guidance = ``cfg_scale`` (loss.cfg_scale), in place of CFG. The trainable copies
    (generator, fake score) are called with the same guidance (``Teacher.guidance``, build_roles), so
    the exported student runs in stock FluxPipeline with guidance_scale = loss.cfg_scale.

    Also the per-sample scales of loss.cfg_interval (a B x 1 x 1 x 1 tensor, distill._cfg_scales).
    """
    if teacher.guidance is not None:
        if torch.is_tensor(cfg_scale):
            raise ValueError("loss.cfg_interval needs a teacher with an unconditional branch; this teacher "
                             "takes its guidance as an input (guidance-distilled)")
        if teacher.guidance != cfg_scale:
            raise ValueError(f"the teacher's guidance input is {teacher.guidance} but loss.cfg_scale is {cfg_scale}")
        return teacher(x_t, t, cond)
    if uncond is None or (not torch.is_tensor(cfg_scale) and cfg_scale == 1.0):
        return teacher(x_t, t, cond)
    from ..losses import cfg

    out = teacher.raw(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, uncond))
    out_c, out_u = out.chunk(2)
    return teacher.schedule.to_x0(x_t.float(), cfg(out_c, out_u, cfg_scale), t)


class Critic(nn.Module):
    """The critic: frozen teacher (the real score) + trainable fake score + GAN head, one DeepSpeed
    engine (the recipe's ``optim.critic``). Only the fake score and the head train.

    ``forward(fn, *args)`` returns ``fn(self, *args)``: the critic loss (a function in
    distill.py) runs through the engine's forward, so DeepSpeed's bookkeeping sees it, while the
    generator phase calls the methods below on ``engine.module`` (docs/algorithm.md §9.1).
    """

    def __init__(self, teacher: Denoiser, fake: Denoiser, head: GANHead | None, gan_layer: str | int = "mid_block"):
        super().__init__()
        self.teacher = teacher
        self.fake = fake
        self.head = head
        self.gan_layer = gan_layer  # loss.gan.feature_layer
        # the fake score's own trainable weights: all of them, or its adapter when it is a LoRA of
        # the teacher's UNet (a plain list, so nn.Module does not register them twice)
        self.fake_params = [p for p in fake.parameters() if p.requires_grad]

    def forward(self, fn, *args, **kwargs):
        return fn(self, *args, **kwargs)

    def teacher_x0(self, x_t, t, cond, uncond, cfg_scale: float) -> torch.Tensor:
        return guided_x0(self.teacher, x_t, t, cond, uncond, cfg_scale)

    def logits(self, x_t, t, cond) -> torch.Tensor:
        """GAN logits: the head on the fake score's mid-block (or encoder end) at (x_t, t, cond) (§6)."""
        return self.head(self.fake.features(x_t, t, cond, self.gan_layer))


def set_phase(critic: Critic, phase: str) -> None:
    """Generator phase: the critic is frozen so its gradients neither accumulate nor reach the
    bucket twice (docs/algorithm.md §9.2); critic phase: fake score and GAN head train. The
    teacher never does."""
    train = phase == "critic"
    critic.teacher.requires_grad_(False)
    for p in critic.fake_params:
        p.requires_grad_(train)
    if critic.head is not None:
        critic.head.requires_grad_(train)


def without_dropout(module: nn.Module) -> nn.Module:
    """Zero every dropout of a trainable copy: the teacher's training-time dropout is not the
    student's. The authors' networks have none (docs/algorithm.md §1), and with it backward
    simulation and the training forward (train mode) would see another network function than
    sampling (eval mode). LoRA's own dropout is added afterwards and stays the recipe's."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return module


def load_generator(unet: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Into the generator's UNet (before LoRA is attached); a different architecture is one line."""
    ours = unet.state_dict()
    missing = sorted(set(ours) - set(weights))
    extra = sorted(set(weights) - set(ours))
    shape = [k for k in ours if k in weights and ours[k].shape != weights[k].shape]
    if missing or extra or shape:
        what = (f"{len(missing)} of the teacher's weights missing (e.g. {missing[0]})" if missing
                else f"{len(extra)} weights the teacher's UNet lacks (e.g. {extra[0]})" if extra
                else f"{shape[0]} is {tuple(weights[shape[0]].shape)}, the teacher's {tuple(ours[shape[0]].shape)}")
        raise UserError(f"model.generator_init: {source}: not the teacher's UNet architecture ({what})")
    unet.load_state_dict(weights, strict=True)


def _checkpoint(module, *args):
    """diffusers' default gradient checkpointing (non-reentrant torch.utils.checkpoint of the block,
    modeling_utils.py enable_gradient_checkpointing) without the recomputation's metadata check.

    Under ZeRO-3 the check can fail on correct values: until its trace is complete (the engine's
    first iteration) DeepSpeed releases every parameter of a module after its forward, persistent
    ones too (partitioned_param_coordinator.py release_sub_module), so a parameter that an op saved
    itself, e.g. FLUX's RMSNorm query/key weights (torch.nn.RMSNorm: rms_norm multiplies by the weight),
    reads as empty when the recomputed tensors are compared, and is gathered again before its
    module's backward. tests/test_engines.py's FLUX rig (persistent and partitioned parameters,
    checkpointing) compares the gradients with plain PyTorch's.
    """
    from torch.utils.checkpoint import checkpoint

    return checkpoint(module.__call__, *args, use_reentrant=False, determinism_check="none")


def check_gan_layer(teacher: Teacher, layer: str | int) -> None:
    """loss.gan.feature_layer against the teacher's denoiser: UNets have a mid-block and an encoder
    end, transformers a middle block or any block by index."""
    if teacher.transformer:
        from .denoiser import feature_block

        try:
            feature_block(teacher.unet, layer)
        except ValueError as e:
            raise UserError(str(e)) from None
    elif isinstance(layer, int):
        raise UserError(f"loss.gan.feature_layer: {layer} (a block index) is for transformer teachers; a UNet "
                        "takes mid_block or encoder_end")


def build_roles(teacher: Teacher, *, lora=None, gan: bool, resolution: int, seed: int,
                gradient_checkpointing: bool, gan_layer: str | int = "mid_block",
                generator_init: tuple[dict, str] | None = None,
                critic: bool = True, cfg_scale: float | None = None,
                fake_score_dropout: bool = False) -> tuple[Denoiser, Critic | None]:
    """Generator and fake score start as copies of the teacher; the GAN head is random but the
    same on every rank (seeded), as ZeRO-3 partitions each rank's own copy. ``generator_init``:
    (full UNet weights, their source) the generator starts from instead (``model.generator_init``).
    ``critic=False`` (the regression stage): the generator only, and None. ``cfg_scale``
    (loss.cfg_scale): the guidance input of all three networks when the teacher is guidance-distilled
    (FLUX.1-dev; see guided_x0), which then needs it; unused otherwise. ``fake_score_dropout``
    (loss.fake_score_dropout: teacher): the fake score keeps the teacher's dropout layers; the
    generator never does.

    With ``lora.fake_score`` the fake score is a LoRA adapter on the teacher's own UNet, and the
    teacher is that UNet with its adapters off: one frozen base instead of two UNets, and no
    weight gradients or optimizer state for it.
    """
    shared = lora is not None and lora.fake_score
    if shared and fake_score_dropout:
        raise ValueError("build_roles: fake_score_dropout needs a fake score of its own, not the teacher's UNet")
    gen_unet = copy.deepcopy(teacher.unet)
    if generator_init is not None:
        load_generator(gen_unet, *generator_init)
    fake_unet = None if not critic else teacher.unet if shared else copy.deepcopy(teacher.unet)
    for unet in (gen_unet, fake_unet) if critic else (gen_unet,):
        unet.requires_grad_(True).train()
        if not (fake_score_dropout and unet is fake_unet):
            without_dropout(unet)
        if gradient_checkpointing:
            # non-reentrant: works when a module runs twice per backward
            unet.enable_gradient_checkpointing(_checkpoint)
    if lora is not None and (lora.enabled or shared):
        from .lora import add_lora

        if lora.enabled:
            add_lora(gen_unet, lora)
        if shared and critic:
            add_lora(fake_unet, lora, adapter_name="fake")
    if teacher.guidance_embeds and cfg_scale is None:
        raise ValueError("build_roles: a guidance-distilled teacher needs cfg_scale (its guidance input)")
    guidance = teacher.guidance(cfg_scale) if cfg_scale is not None else None
    if not critic:
        return Denoiser(gen_unet, teacher.schedule, guidance), None
    head = None
    if gan:
        check_gan_layer(teacher, gan_layer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = GANHead(teacher.mid_channels, teacher.mid_spatial(resolution))
    teacher_view = (TeacherView if shared else Denoiser)(teacher.unet, teacher.schedule, guidance)
    critic = Critic(teacher_view, Denoiser(fake_unet, teacher.schedule, guidance), head, gan_layer)
    set_phase(critic, "critic")
    return Denoiser(gen_unet, teacher.schedule, guidance), critic
