"""FlowSchedule (rectified flow: SD3, FLUX) behind the integer-timestep interface of docs/algorithm.md §2:
its sigma table is the teacher scheduler's own, x0 round-trips, the fake score's target is the velocity."""

import math

import pytest
import torch

from dmd2.sampling import implied_noise, pure_noise, sample
from dmd2.schedule import FlowSchedule, dynamic_shift_mu, flow_sigmas


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sigma_table_is_the_schedulers_own():
    """Integer t indexes FlowMatchEulerDiscreteScheduler's training sigmas (ascending): u = (t+1)/1000,
    shifted; t = 999 is pure noise, and the timestep the transformer is told is s * 1000."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        fs = FlowSchedule.from_scheduler_config(dict(sched.config))
        torch.testing.assert_close(fs.sigmas.float(), sched.sigmas.flip(0), rtol=1e-6, atol=1e-7)
        t = torch.tensor([0, 249, 499, 749, 999])
        _, t_in = fs.model_input(torch.zeros(5, 1), t)
        torch.testing.assert_close(t_in, sched.timesteps.flip(0)[t], rtol=1e-6, atol=1e-4)
    s = flow_sigmas(shift=3.0)
    assert s.dtype == torch.float64 and s[-1] == 1.0 and s[0] == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))
    assert (s[1:] > s[:-1]).all()  # strictly increasing in t
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert (s >= u).all() and (flow_sigmas(shift=1.0) == u).all()  # shift > 1 moves every level towards noise
    assert float(s[499]) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))  # 0.75


def test_add_noise_to_x0_round_trip_and_velocity_target():
    fs = FlowSchedule(flow_sigmas(shift=3.0))
    x0 = torch.randn(4, 16, 8, 8, generator=_g(0))
    eps = torch.randn(4, 16, 8, 8, generator=_g(1))
    t = torch.tensor([0, 300, 700, 999])
    x_t = fs.add_noise(x0, eps, t)
    s = fs.sigmas[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    assert torch.equal(fs.add_noise(x0, eps, torch.full((4,), 999)), eps)  # pure noise is eps (scale 1)
    v = fs.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(fs.to_x0(x_t, v, t), x0, rtol=0, atol=2e-6)  # the exact velocity gives x0 back
    assert fs.native(v, x_t, t) is v and fs.loss_weight(t).tolist() == [1.0] * 4
    assert fs.initial_noise_scale(999) == 1.0 and fs.kind == "flow"
    # the sampler's implied noise (deterministic re-noising) is eps again
    torch.testing.assert_close(implied_noise(fs, x_t, x0, t), eps, rtol=0, atol=1e-4)


def test_to_x0_is_float64_inside():
    """x0 = x_t - s v in float64 and rounded once, as the DDPM and EDM conversions."""
    fs = FlowSchedule(flow_sigmas(shift=3.0))
    x_t, v = torch.randn(3, 4, generator=_g(3)), torch.randn(3, 4, generator=_g(4)) * 30
    t = torch.tensor([5, 500, 998])
    ref = (x_t.double() - fs.sigmas[t].view(-1, 1) * v.double()).float()
    assert torch.equal(fs.to_x0(x_t, v, t), ref)


def test_dynamic_shift_mu_and_time_shift_match_diffusers():
    """FLUX's resolution-dependent shift: mu from the image token count (diffusers' calculate_shift),
    then the scheduler's exponential (or linear) time shift of the same u = (t+1)/1000 grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq in (256, 1024, 4096, 64):
        assert dynamic_shift_mu(seq, 256, 4096, 0.5, 1.15) == pytest.approx(calculate_shift(seq, 256, 4096, 0.5, 1.15))
    assert dynamic_shift_mu(256) == pytest.approx(0.5) and dynamic_shift_mu(4096) == pytest.approx(1.15)
    cfg = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
           "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    with pytest.raises(ValueError, match="image_seq_len"):
        FlowSchedule.from_scheduler_config(cfg)
    seq = (512 // 16) ** 2  # FLUX at 512 px: 64x64 latents, 2x2 patches, 1024 tokens
    mu = dynamic_shift_mu(seq, 256, 4096, 0.5, 1.15)
    fs = FlowSchedule.from_scheduler_config(cfg, image_seq_len=seq)
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(fs.sigmas, sched.time_shift(mu, 1.0, u))
    torch.testing.assert_close(fs.sigmas, math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    assert fs.sigmas[-1] == 1.0 and (fs.sigmas[1:] > fs.sigmas[:-1]).all()
    linear = FlowSchedule.from_scheduler_config({**cfg, "time_shift_type": "linear"}, image_seq_len=seq)
    torch.testing.assert_close(linear.sigmas, mu / (mu + (1 / u - 1)))
    # more tokens (1024 px: 4096) -> larger mu -> noisier at every t
    assert (FlowSchedule.from_scheduler_config(cfg, image_seq_len=4096).sigmas[:-1] > fs.sigmas[:-1]).all()


def test_sampler_with_an_exact_denoiser_recovers_x0():
    """sampling.sample over a flow schedule: pure noise at 999, x0 predictions re-noised with fresh
    noise; an oracle velocity model returns its x0 whatever the steps."""
    fs = FlowSchedule(flow_sigmas(shift=3.0))
    target = torch.randn(2, 4, 8, 8, generator=_g(5))

    def oracle(x_t, t, cond):
        s = fs.sigmas[t].float().view(-1, 1, 1, 1)
        eps = (x_t - (1 - s) * target) / s
        return fs.to_x0(x_t, eps - target, t)

    from dmd2.sampling import Noise

    out = sample(oracle, fs, {}, target.shape, [999, 749, 499, 249], Noise(_g(1)))
    torch.testing.assert_close(out, target, rtol=0, atol=1e-5)
    assert torch.equal(pure_noise(fs, Noise(_g(2)), (1, 3), 999), torch.randn(1, 3, generator=_g(2)))
