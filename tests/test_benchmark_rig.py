"""benchmarks/gpu.py's flow-matching configurations (SD3.5-Medium and FLUX.1-dev architectures)
run through the same rig on CPU at tiny size: one DMD2 iteration with finite losses, and FLOPs
counted on the meta device that grow with the backward-simulation index."""

import math

import pytest

from benchmarks.rig import (
    Rig,
    family_of,
    loss_config,
    make_unet,
    model_flops,
    random_batch,
    recipe_of,
    synthetic_teacher,
)


@pytest.mark.parametrize("name", ["tiny-sd35", "tiny-flux"])
def test_tiny_flow_transformer_iteration_and_flops(name):
    r = recipe_of(name)
    latent = r["resolution"] // 8
    teacher = synthetic_teacher(name, make_unet(name), latent)
    assert teacher.family == {"sd35": "sd3", "flux": "flux"}[family_of(name)]
    assert teacher.schedule.kind == "flow" and teacher.guidance_embeds == (family_of(name) == "flux")
    cfg = loss_config(r["cfg"], r["gan"])
    rig = Rig(teacher, latent=latent, batch_size=2, timesteps=r["timesteps"], loss_cfg=cfg,
              lora=None, gradient_checkpointing=True)
    losses = rig.iteration(random_batch(name, 2, latent, "cpu"), k=len(r["timesteps"]) - 1)
    assert {"loss_dm", "loss_fake", "loss_gan_d"} <= set(losses) and all(math.isfinite(v) for v in losses.values())
    f0, f1 = (model_flops(name, lora_mode="lora+fake", batch_size=1, latent=latent, timesteps=r["timesteps"],
                          loss_cfg=cfg, k=k, lora_rank=4) for k in (0, 1))
    assert 0 < f0 < f1  # one more generator call (backward simulation) per k
