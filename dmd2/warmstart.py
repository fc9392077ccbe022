"""Warm starts (docs/algorithm.md §10): the generator's weights from a previous run or an export
(``model.generator_init``), the fake score and GAN head from a previous run (``model.critic_init``).

Both are read into the plain modules before the engines wrap them (the generator's by
``models.roles.build_roles``), so ZeRO partitions the loaded weights and the optimizers start fresh.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint
from .errors import UserError


def generator_weights(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The full UNet weights a student samples with (EMA when the run kept one, LoRA merged), and
    a description for the log.

    A full fine-tuning run's checkpoint and a UNet or pipeline export are read directly: the
    weights are all there, and loading the source's whole teacher beside this run's would hold a
    second copy of its encoders and UNet (10+ GB at SDXL size). A LoRA run or a LoRA export needs
    its base UNet to merge into, so it goes through the one student loader."""
    from .models.student import EXPORT_META, is_export, load_student, quiet, read_export_meta

    path = Path(source)
    try:
        if (path / "recipe.yaml").is_file() and not is_export(path):
            from .config import RecipeError, load_recipe

            try:
                recipe = load_recipe(path / "recipe.yaml")
            except RecipeError as e:
                raise UserError(str(e)) from None
            if not recipe.model.lora.enabled:
                ckpt = checkpoint.latest(path)
                if ckpt is None:
                    raise UserError(f"{path}: no committed checkpoint in {path / 'checkpoints'} (train it first)")
                with quiet():
                    weights = checkpoint.consolidated_generator(ckpt, ema=recipe.train.ema_decay > 0)
                return weights, f"generator from {source} at step {checkpoint.read_state(ckpt)['step']}"
        elif is_export(path) and read_export_meta(path).get("format") != "lora" and (path / "unet").is_dir():
            from diffusers import UNet2DConditionModel, UNet2DModel

            meta = read_export_meta(path)
            cls_name = json.loads((path / "unet" / "config.json").read_text()).get("_class_name")
            cls = UNet2DModel if cls_name == "UNet2DModel" else UNet2DConditionModel
            with quiet():
                unet = cls.from_pretrained(path, subfolder="unet")
            at = f" at step {meta['step']}" if meta.get("step") is not None else ""
            return {k: v.float() for k, v in unet.state_dict().items()}, f"generator from {source}{at} ({EXPORT_META})"
        with quiet():
            student = load_student(source, "cpu")
    except UserError as e:
        raise UserError(f"model.generator_init: {e}") from None
    weights = {k: v.detach().clone() for k, v in student.parts.unet.state_dict().items()}
    at = f" at step {student.step}" if student.step is not None else ""
    return weights, f"generator from {source}{at}"


def load_critic(critic, source: str) -> str:
    """The fake score (and the GAN head, when both runs have one) from ``source``'s newest committed
    checkpoint; returns a description for the log. The frozen teacher is never saved or loaded."""
    from .models.student import quiet

    run = Path(source)
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"model.critic_init: {source}: not a run folder (recipe.yaml + checkpoints/); "
                        "exports hold the generator only")
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise UserError(f"model.critic_init: {source}: no committed checkpoint (train it first)")
    if not (ckpt / "critic").is_dir():
        raise UserError(f"model.critic_init: {ckpt}: holds no critic (a regression-stage run?)")
    with quiet():
        saved = checkpoint.consolidated_critic(ckpt)
    trainable = {n: p for n, p in critic.named_parameters() if p.requires_grad}
    fake = {n: p for n, p in trainable.items() if not n.startswith("head.")}
    head = {n: p for n, p in trainable.items() if n.startswith("head.")}
    saved_head = any(k.startswith("head.") for k in saved)
    for names in (fake, head) if saved_head else (fake,):
        for n, p in names.items():
            if n not in saved:
                raise UserError(f"model.critic_init: {ckpt}: not this recipe's critic ({n} missing; the same teacher, "
                                "LoRA settings and loss.gan.feature_layer are needed)")
            if saved[n].shape != p.shape:
                raise UserError(f"model.critic_init: {ckpt}: {n} is {tuple(saved[n].shape)}, this recipe's "
                                f"{tuple(p.shape)} (not the same architecture)")
    with torch.no_grad():
        for n, p in {**fake, **(head if saved_head else {})}.items():
            p.copy_(saved[n].to(p.dtype))
    step = checkpoint.read_state(ckpt)["step"]
    parts = "fake score and GAN head" if head and saved_head else "fake score" + (
        " (GAN head fresh: the source had none)" if head else "")
    return f"{parts} from {ckpt} (step {step})"
