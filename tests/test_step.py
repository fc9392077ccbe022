"""dmd2.step on plain PyTorch (TorchTrainee): the multi-step options of the loss section."""

import copy

import pytest
import torch

from dmd2.config import LossConfig, OptimizerConfig
from dmd2.data import Batch
from dmd2.models import Conditioner, load_teacher
from dmd2.models.roles import build_roles
from dmd2.sampling import Noise, sample
from dmd2.step import TorchTrainee, Wrapped, train_step

TIMESTEPS = [999, 749, 499, 249]


@pytest.fixture(scope="module")
def parts(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher("sd15")))
    gen, critic = build_roles(teacher, gan=False, resolution=32, seed=0, gradient_checkpointing=False)
    cond = Conditioner(teacher, 32).encode_prompts(["a red circle", "blue stripes"])
    return gen, critic, Batch(cond=cond)


class _Recorder(Wrapped):
    """A trainee that records what its forward was called with."""

    def __init__(self, inner):
        super().__init__(inner)
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append(args)
        return self.inner(*args, **kwargs)


def _run(parts, k, generator_turn=True, **loss):
    gen, critic, batch = (copy.deepcopy(p) for p in parts)
    g, c = TorchTrainee(gen, OptimizerConfig(lr=1e-4)), _Recorder(TorchTrainee(critic, OptimizerConfig(lr=1e-4)))
    calls = []
    gen.register_forward_hook(lambda m, a, out: calls.append(int(a[1][0])))
    logs, applied = train_step(g, c, batch, k=k, timesteps=TIMESTEPS, shape=(2, 4, 8, 8),
                               loss_cfg=LossConfig.model_validate(loss), backward_simulation=True,
                               generator_turn=generator_turn, rng=torch.Generator().manual_seed(3), device="cpu")
    return logs, applied, c.calls[0][1], calls


def test_sample_continues_from_a_start():
    x0 = torch.randn(2, 3, 4, 4)
    from dmd2.schedule import DDPMSchedule

    s = DDPMSchedule.scaled_linear()
    seen = []
    out = sample(lambda x, t, c: seen.append((x.clone(), int(t[0]))) or x * 0.5, s, {}, (2, 3, 4, 4), [499, 249],
                 Noise.per_sample([0, 1]), start=x0)
    first_noise = Noise.per_sample([0, 1])((2, 3, 4, 4))
    assert seen[0][1] == 499 and torch.allclose(seen[0][0], s.add_noise(x0, first_noise, torch.full((2,), 499)))
    assert seen[1][1] == 249 and out.shape == x0.shape


@pytest.mark.parametrize("k", [1, 3])
def test_critic_trains_on_last_step_samples_when_asked(parts, k):
    """critic_samples=last_step: the critic's input is step k's output carried through the remaining
    steps (K-1-k more generator calls, no gradient); at the last step it changes nothing."""
    _, _, drawn_x, drawn_calls = _run(parts, k)
    _, _, last_x, last_calls = _run(parts, k, critic_samples="last_step")
    assert drawn_calls == TIMESTEPS[:k + 1]  # backward simulation (k calls) + the trained step
    assert last_calls == TIMESTEPS[:k + 1] + TIMESTEPS[k + 1:]
    assert not last_x.requires_grad
    if k == len(TIMESTEPS) - 1:
        assert torch.equal(drawn_x, last_x)
    else:
        assert not torch.allclose(drawn_x, last_x)


def test_step_weights_scale_the_generator_loss(parts):
    plain, *_ = _run(parts, 2)
    half, *_ = _run(parts, 2, step_weights=[1, 1, 0.5, 1])
    assert half["loss_generator"].item() == pytest.approx(0.5 * plain["loss_generator"].item(), rel=1e-6)
    assert half["loss_dm"].item() == pytest.approx(plain["loss_dm"].item(), rel=1e-6)  # the term itself is unweighted


@pytest.mark.parametrize("k", [1, 3])
def test_generator_loss_scores_the_last_step_output_with_gradient_when_asked(parts, k):
    """generator_samples=last_step: step k's output is carried through the remaining steps *with*
    gradient (the later calls are in the generator's graph) before the loss scores it, and that
    same sample is the critic's, so no second rollout is drawn; at the last step it changes nothing."""
    from pydantic import ValidationError

    def run(**loss):
        gen, critic, batch = (copy.deepcopy(p) for p in parts)
        g, c = TorchTrainee(gen, OptimizerConfig(lr=1e-4)), _Recorder(TorchTrainee(critic, OptimizerConfig(lr=1e-4)))
        calls = []
        gen.register_forward_hook(lambda m, a, out: calls.append((int(a[1][0]), out.requires_grad)))
        before = [p.detach().clone() for p in gen.parameters()]
        logs, _ = train_step(g, c, batch, k=k, timesteps=TIMESTEPS, shape=(2, 4, 8, 8),
                             loss_cfg=LossConfig.model_validate({"critic_samples": "last_step", **loss}),
                             backward_simulation=True, generator_turn=True, rng=torch.Generator().manual_seed(3),
                             device="cpu")
        moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(gen.parameters(), before, strict=True))
        return logs, calls, c.calls[0][1], moved

    logs_d, calls_d, x_d, moved_d = run()
    logs_l, calls_l, x_l, moved_l = run(generator_samples="last_step")
    rest = TIMESTEPS[k + 1:]
    # drawn_step: the rest is the critic's rollout, outside the graph; last_step: inside it
    assert calls_d == [(t, False) for t in TIMESTEPS[:k]] + [(TIMESTEPS[k], True)] + [(t, False) for t in rest]
    assert calls_l == [(t, False) for t in TIMESTEPS[:k]] + [(TIMESTEPS[k], True)] + [(t, True) for t in rest]
    assert x_l.shape == x_d.shape and moved_l > 0
    if not rest:
        assert torch.equal(x_l, x_d) and logs_l["loss_dm"].item() == logs_d["loss_dm"].item() and moved_l == moved_d
    with pytest.raises(ValidationError, match="generator_samples.*critic_samples: last_step|critic_samples: last_step"):
        LossConfig.model_validate({"generator_samples": "last_step"})


def test_cfg_interval_guides_only_the_timesteps_inside_it(parts, tiny_teacher):
    """loss.cfg_interval: each sample's real score is guided at loss.cfg_scale when its DM timestep
    lies in the interval, conditional-only (scale 1) outside; the row-wise float calls agree."""
    from dmd2.distill import _cfg_scales
    from dmd2.models.roles import guided_x0

    _, critic, batch = parts
    teacher = critic.teacher
    cfg = LossConfig.model_validate({"cfg_scale": 3.0, "cfg_interval": [0.5, 0.9]})
    t = torch.tensor([700, 300])
    scales = _cfg_scales(cfg, t)
    assert scales.flatten().tolist() == [3.0, 1.0]
    assert _cfg_scales(cfg, torch.tensor([500, 900, 901, 499])).flatten().tolist() == [3.0, 3.0, 1.0, 1.0]
    assert _cfg_scales(LossConfig(cfg_scale=3.0), t) == 3.0  # no interval: one float, the paper's form
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    u = Conditioner(load_teacher(str(tiny_teacher("sd15"))), 32).uncond(2)
    both = guided_x0(teacher, x, t, batch.cond, u, scales)
    for i, s in enumerate([3.0, 1.0]):
        row = guided_x0(teacher, x[i:i + 1], t[i:i + 1], {k: v[i:i + 1] for k, v in batch.cond.items()},
                        {k: v[i:i + 1] for k, v in u.items()}, s)
        torch.testing.assert_close(both[i:i + 1], row, rtol=1e-4, atol=1e-5)
    plain = guided_x0(teacher, x, t, batch.cond, u, 3.0)
    assert torch.allclose(both[0], plain[0], rtol=1e-4, atol=1e-5) and not torch.allclose(both[1], plain[1])
