"""Pure-tensor checks of the DMD2 losses and schedules against hand-derived values (§2, §4-§6)."""

import pytest
import torch

from dmd2 import losses
from dmd2.schedule import DDPMSchedule, EDMSchedule, sample_timesteps


def test_dm_loss_autograd_identity():
    """dL_dm/dx = g / x.numel() with g = (x0_fake - x0_teacher) / mean|x - x0_teacher| (§4 step 6)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    fake, real = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    losses.dmd_loss(x, fake, real).backward()
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / norm / x.numel()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-8)


def test_dm_gradient_nan_becomes_zero():
    x = torch.zeros(1, 1, 2, 2)
    g = losses.dm_gradient(x, torch.zeros_like(x), x.clone())  # 0 / 0
    assert torch.equal(g, torch.zeros_like(g))


def test_cfg_standard_form():
    """uncond + w (cond - uncond); the off-by-one variant cond + w (cond - uncond) differs."""
    cond, uncond = torch.tensor([2.0]), torch.tensor([1.0])
    assert losses.cfg(cond, uncond, 8.0).item() == pytest.approx(9.0)
    assert losses.cfg(cond, uncond, 1.0).item() == pytest.approx(2.0)  # w=1: conditional only


def test_fake_score_loss_weighted_mean():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert losses.fake_score_loss(pred, target).item() == pytest.approx(1.0)
    w = torch.tensor([1.0, 3.0])
    assert losses.fake_score_loss(pred, target, w).item() == pytest.approx(2.0)


def test_gan_losses_softplus():
    z = torch.zeros(4)
    log2 = torch.log(torch.tensor(2.0)).item()
    assert losses.gan_generator_loss(z).item() == pytest.approx(log2)
    assert losses.gan_discriminator_loss(z, z).item() == pytest.approx(2 * log2)
    # a confident, correct discriminator has a small loss; the generator then a large one
    big = torch.full((4,), 10.0)
    assert losses.gan_discriminator_loss(big, -big).item() < 1e-3
    assert losses.gan_generator_loss(-big).item() > 9


def test_ddpm_reference_alphas():
    """Scaled-linear 0.00085 -> 0.012 reference values of §2."""
    ab = DDPMSchedule.scaled_linear().alphas_cumprod
    for t, ref in [(999, 0.00466), (749, 0.0566), (499, 0.278), (399, 0.426), (249, 0.675)]:
        assert ab[t].item() == pytest.approx(ref, rel=2e-2)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_ddpm_to_x0_inverts_add_noise(pred):
    s = DDPMSchedule.scaled_linear(prediction_type=pred)
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 250, 700, 999])
    x_t = s.add_noise(x0, eps, t)
    out = s.target(x0, eps, t)  # a perfect network's output
    torch.testing.assert_close(s.to_x0(x_t, out, t), x0, rtol=1e-4, atol=1e-4)


def test_ddpm_to_x0_is_float64_inside():
    """At t=999 a float32 conversion loses digits that the float64 one keeps."""
    s = DDPMSchedule.scaled_linear()
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    t = torch.full((2,), 999)
    x_t = s.add_noise(x0, eps, t)
    err = (s.to_x0(x_t, eps, t) - x0).abs().max().item()
    assert err < 2e-5


def test_edm_grid_and_preconditioning():
    s = EDMSchedule()
    assert s.sigmas[0].item() == pytest.approx(0.002) and s.sigmas[-1].item() == pytest.approx(80.0)
    assert torch.all(s.sigmas[1:] > s.sigmas[:-1])  # ascending
    torch.manual_seed(0)
    x0, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = s.add_noise(x0, eps, t)
    # the F that makes D(x) = x0 exactly: F = (x0 - c_skip x) / c_out
    sig = s.sigma(t, x_t)
    c_skip = 0.25 / (sig**2 + 0.25)
    c_out = sig * 0.5 / (sig**2 + 0.25).sqrt()
    f = ((x0.double() - c_skip * x_t.double()) / c_out).float()
    torch.testing.assert_close(s.to_x0(x_t, f, t), x0, rtol=1e-4, atol=1e-4)
    _, c_noise = s.model_input(x_t, t)
    torch.testing.assert_close(c_noise, (s.sigmas[t].log() / 4).float())
    assert s.initial_noise_scale(999) == pytest.approx(80.0)


def test_timestep_sampling_inclusive():
    t = sample_timesteps(10000, 20, 980, generator=torch.Generator().manual_seed(0))
    assert t.min().item() == 20 and t.max().item() == 980  # inclusive bounds (§4 step 1)
