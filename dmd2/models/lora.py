"""LoRA through peft (rank, alpha, target modules from the recipe): on the generator, and optionally
on the fake score, which then shares the teacher's frozen UNet (adapters off = the teacher)."""

from __future__ import annotations

import contextlib

from torch import nn

# A transformer's default targets: its attention's image and added-context (text) projections, as
# diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py.
TRANSFORMER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# FLUX's: the attention projections (the single-stream blocks' to_q/k/v included) and the double-stream
# blocks' image and text feed-forwards, as diffusers' examples/dreambooth/train_dreambooth_lora_flux.py.
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")


def target_modules(net: nn.Module, targets) -> list[str]:
    """The recipe's ``model.lora.target_modules``; on a transformer the (UNet-oriented) default list
    stands for ``TRANSFORMER_TARGETS`` (FLUX: ``FLUX_TARGETS``)."""
    from ..config import LoraConfig as Recipe
    from .loader import is_flux, is_transformer

    targets = list(targets)
    if is_transformer(net) and targets == Recipe.model_fields["target_modules"].default_factory():
        return list(FLUX_TARGETS if is_flux(net) else TRANSFORMER_TARGETS)
    return targets


def add_lora(unet: nn.Module, cfg, adapter_name: str = "default") -> None:
    """Freeze the base and attach a peft adapter; only the adapter trains (and gets optimizer state)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                init_lora_weights="gaussian", target_modules=target_modules(unet, cfg.target_modules)),
                     adapter_name=adapter_name)


@contextlib.contextmanager
def adapters_off(unet: nn.Module):
    """The frozen base alone for the duration (the teacher, when the fake score is its LoRA).

    peft's enable_adapters() also makes the adapters trainable; the phase's requires_grad flags
    are restored, so a frozen critic stays frozen (docs/algorithm.md §9.2).
    """
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)
