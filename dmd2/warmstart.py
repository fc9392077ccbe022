"""Warm starts (docs/algorithm.md §10): the generator's weights from a previous run or an export
(``model.generator_init``), the fake score and GAN head from a previous run (``model.critic_init``).

Both are read into the plain modules before the engines wrap them (the generator's by
``models.roles.build_roles``), so ZeRO partitions the loaded weights and the optimizers start fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import checkpoint
from .errors import UserError


def generator_weights(source: str) -> tuple[dict[str, torch.Tensor], str]:
    """The full UNet weights a student samples with (EMA when the run kept one, LoRA merged), and
    a description for the log. Through the one student loader, so any run or export works."""
    from .models.student import load_student, quiet

    try:
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
