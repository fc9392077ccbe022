"""LoRA on the generator through peft (rank, alpha, target modules from the recipe)."""

from __future__ import annotations

from torch import nn


def add_lora(unet: nn.Module, cfg) -> None:
    """Freeze the base and attach a peft adapter; only the adapter trains (and gets optimizer state)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
