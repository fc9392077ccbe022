"""LoRA fake score (model.lora.fake_score): the fake score is an adapter on the teacher's own UNet,
the teacher is that UNet with its adapters off; each phase still touches only its own parameters."""

import copy

import torch

from dmd2.config import LoraConfig, Recipe
from dmd2.data import Batch
from dmd2.distill import critic_loss, generator_loss
from dmd2.models import Conditioner, load_teacher
from dmd2.models.roles import build_roles, set_phase


def _loss_cfg():
    return Recipe.model_validate({"output_dir": "x", "model": {"teacher": "x"}, "train": {"max_steps": 1},
                                  "loss": {"cfg_scale": 1.75, "gan": {"enabled": True}},
                                  "data": {"real_images": "x"}}).loss


def test_lora_fake_score_shares_the_frozen_base(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher("sd15")))
    original = copy.deepcopy(teacher.unet)
    lora = LoraConfig(enabled=True, fake_score=True, rank=4, alpha=4.0)
    gen, critic = build_roles(teacher, lora=lora, gan=True, resolution=32, seed=0, gradient_checkpointing=True)
    assert critic.teacher.unet is critic.fake.unet  # one base for both
    names = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert names and all(".fake." in n or n.startswith("head.") for n in names)
    c = Conditioner(teacher, 32)
    g = torch.Generator().manual_seed(0)
    batch = Batch(cond=c.encode_prompts(["a red circle", "blue stripes"]), uncond=c.uncond(2),
                  real=torch.randn(2, 4, 8, 8, generator=g), real_cond=c.encode_prompts(["a dot", "a square"]))
    x_t, t = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 999)

    # generator phase: the critic's adapter stays frozen (peft's enable_adapters would unfreeze it)
    set_phase(critic, "generator")
    x = gen(x_t, t, batch.cond)
    generator_loss(critic, x, batch, _loss_cfg(), torch.Generator().manual_seed(1))[0].backward()
    assert all(p.grad is None for p in critic.parameters())
    assert not any(p.requires_grad for p in critic.parameters())
    # critic phase: gradients reach the fake score's adapter and the head, never the base
    set_phase(critic, "critic")
    critic_loss(critic, x.detach(), batch, _loss_cfg(), torch.Generator().manual_seed(2))[0].backward()
    got = {n for n, p in critic.named_parameters() if p.grad is not None}
    assert got and got <= names and any(".fake." in n for n in got)

    # with a trained adapter the fake score moves, the teacher view is still the teacher
    with torch.no_grad():
        for n, p in critic.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
        tt = torch.full((2,), 500)
        ref = original(x_t, tt, batch.cond["encoder_hidden_states"]).sample
        assert torch.allclose(critic.teacher.raw(x_t, tt, batch.cond), ref, atol=1e-6)
        assert not torch.allclose(critic.fake.raw(x_t, tt, batch.cond), ref, atol=1e-4)
