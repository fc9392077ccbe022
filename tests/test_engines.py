"""The two ZeRO-3 engines against a plain-PyTorch reference: gradients match, and none of the four
engine traps of docs/algorithm.md §9 (stale critic gradients, critic updated by the generator's loss,
reading partitioned tensors, unequal calls across ranks) is present."""

import copy

import pytest
import torch

from dmd2.config import DEFAULT_DS_CONFIG, OptimizerConfig, Recipe
from dmd2.data import Batch
from dmd2.distill import critic_loss, generator_loss
from dmd2.models import Conditioner, load_teacher
from dmd2.models.roles import build_roles, set_phase
from dmd2.step import Wrapped

OPTIM = OptimizerConfig(lr=1e-4)


def _loss_cfg(cfg_scale=1.75):
    return Recipe.model_validate({"output_dir": "x", "model": {"teacher": "x"}, "train": {"max_steps": 1},
                                  "loss": {"cfg_scale": cfg_scale, "gan": {"enabled": True}},
                                  "data": {"real_images": "x"}}).loss


def _gen():
    return torch.Generator().manual_seed(1234)


# ZeRO-3 layouts that engines._drop_idle_zero3_hooks treats differently: every parameter persistent
# (the tiny model at the shipped threshold: persistent modules lose their hooks); mixed persistent
# and partitioned with activation checkpointing (they keep them: without, the recomputed conv
# weights came back released); mixed without checkpointing (they lose them).
LAYOUTS = {"all-persistent": (100_000, True), "mixed-checkpointed": (5_000, True), "mixed": (5_000, False)}


def _rig(tiny_teacher, family: str, layout: str) -> dict:
    from dmd2 import engines

    threshold, checkpointing = LAYOUTS[layout]
    engines.init_distributed()
    teacher = load_teacher(str(tiny_teacher(family)), resolution=32)
    gen, critic = build_roles(teacher, gan=True, resolution=32, seed=0, gradient_checkpointing=checkpointing,
                              cfg_scale=_loss_cfg().cfg_scale)
    ref_gen, ref_critic = copy.deepcopy(gen), copy.deepcopy(critic)  # before ZeRO-3 partitions them
    cfg = engines.ds_config(DEFAULT_DS_CONFIG,
                            batch_size=2, grad_clip=10.0, bf16=False, zero_stage=3)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    gen_engine = engines.build_engine(gen, OPTIM, cfg)
    critic_engine = engines.build_engine(critic, OPTIM, copy.deepcopy(cfg))
    c = Conditioner(teacher, 32)
    g = torch.Generator().manual_seed(0)
    shape = (2, teacher.channels, 8, 8)
    batch = Batch(cond=c.encode_prompts(["a red circle", "blue stripes"]), uncond=c.uncond(2),
                  real=torch.randn(*shape, generator=g), real_cond=c.encode_prompts(["a square", "a dot"]))
    x_t = torch.randn(*shape, generator=g)
    t = torch.full((2,), 999)
    return locals()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def rig(tiny_teacher, request):
    return _rig(tiny_teacher, "sd15", request.param)


@pytest.fixture(scope="module")
def sd3_rig(tiny_teacher):
    """The SD3 transformer (flow schedule, GAN head on the middle block's tokens), partitioned and
    persistent parameters mixed, with activation checkpointing (the transformer's own)."""
    return _rig(tiny_teacher, "sd3", "mixed-checkpointed")


@pytest.fixture(scope="module", params=["flux", "flux-schnell"])
def flux_rig(tiny_teacher, request):
    """The FLUX transformer (packed latents, RoPE ids; double- then single-stream blocks, the GAN head on
    the middle one's tokens), mixed partitioning with its own activation checkpointing: FLUX.1-dev-like
    with the guidance input at loss.cfg_scale in all three networks, schnell-like with CFG."""
    return _rig(tiny_teacher, request.param, "mixed-checkpointed")


def _full_grads(module):
    from deepspeed.utils import safe_get_full_grad

    return {n: safe_get_full_grad(p) for n, p in module.named_parameters()}


def _assert_grads_match(ds_grads, ref_module, names):
    ref = dict(ref_module.named_parameters())
    flat_ds = torch.cat([ds_grads[n].flatten() for n in names])
    flat_ref = torch.cat([ref[n].grad.flatten() for n in names])
    cos = torch.nn.functional.cosine_similarity(flat_ds, flat_ref, dim=0).item()
    assert cos > 0.99999, cos
    torch.testing.assert_close(flat_ds, flat_ref, rtol=1e-3, atol=1e-7)


def test_plain_pytorch_phases_touch_only_their_parameters(rig):
    """FastGen-style: which parameters receive gradients in each phase (the teacher never)."""
    gen, critic, batch = copy.deepcopy(rig["ref_gen"]), copy.deepcopy(rig["ref_critic"]), rig["batch"]
    set_phase(critic, "generator")
    x = gen(rig["x_t"], rig["t"], batch.cond)
    generator_loss(critic, x, batch, _loss_cfg(), _gen())[0].backward()
    assert all(p.grad is not None for p in gen.parameters())
    assert all(p.grad is None for p in critic.parameters())
    set_phase(critic, "critic")
    gen.zero_grad(set_to_none=True)
    critic_loss(critic, x.detach(), batch, _loss_cfg(), _gen())[0].backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is None for p in critic.teacher.parameters())
    assert all(p.grad is not None for p in critic.head.parameters())
    assert sum(p.grad is not None for p in critic.fake.parameters()) > 0.9 * len(list(critic.fake.parameters()))


def _sync(ref, module):
    """Copy the engine's (partitioned) weights into the plain reference, through a gather (docs/algorithm.md §9.3)."""
    from deepspeed import zero

    params = list(module.parameters())
    with zero.GatheredParameters(params), torch.no_grad():
        for p_ref, p in zip(ref.parameters(), params, strict=True):
            p_ref.copy_(p)
            p_ref.grad = None


def _gathered(module, prefix=""):
    from deepspeed import zero

    params = [p for n, p in module.named_parameters() if n.startswith(prefix)]
    with zero.GatheredParameters(params):
        return torch.cat([p.detach().flatten().clone() for p in params])


class _Recording(Wrapped):
    """The engine's ``step.Trainee``, recording full gradients (of its module and of ``also``) just
    before each update and the loss it back-propagated."""

    def __init__(self, engine, also=None):
        from dmd2.engines import EngineTrainee

        super().__init__(EngineTrainee(engine))
        self.also, self.grads, self.also_grads, self.loss = also, None, None, None

    def backward(self, loss):
        self.loss = loss.item()
        return self.inner.backward(loss)

    def step(self):
        self.grads = _full_grads(self.module)
        self.also_grads = _full_grads(self.also) if self.also is not None else None
        return self.inner.step()


def test_engines_match_plain_pytorch(rig):
    """Three iterations of (generator step, critic step) through the engines with dmd2.step's
    functions, as train.py runs them; at every phase the gradients equal plain autograd on the same
    weights, so nothing stale accumulates (docs/algorithm.md §9.1)
    and the critic never receives the generator's gradients (§9.2)."""
    _check_engines_match_plain_pytorch(rig)


def test_transformer_engines_match_plain_pytorch(sd3_rig):
    """The same for an SD3 transformer denoiser (keyword call, early-exit block features)."""
    assert sd3_rig["teacher"].transformer
    _check_engines_match_plain_pytorch(sd3_rig)


def test_transformer_phases_touch_only_their_parameters(sd3_rig):
    test_plain_pytorch_phases_touch_only_their_parameters(sd3_rig)


def test_flux_transformer_engines_match_plain_pytorch(flux_rig):
    """The same for a FLUX transformer denoiser (packing, guidance input or CFG, early-exit features)."""
    assert flux_rig["teacher"].flux
    assert flux_rig["gen"].guidance == (1.75 if flux_rig["teacher"].guidance_embeds else None)
    _check_engines_match_plain_pytorch(flux_rig)


def test_flux_transformer_phases_touch_only_their_parameters(flux_rig):
    test_plain_pytorch_phases_touch_only_their_parameters(flux_rig)


def _check_engines_match_plain_pytorch(rig):
    from dmd2.step import critic_step, generator_step

    gen_engine, critic_engine, batch = rig["gen_engine"], rig["critic_engine"], rig["batch"]
    critic_module = critic_engine.module
    gen, critic = _Recording(gen_engine, also=critic_module), _Recording(critic_engine)
    ref_gen, ref_critic = rig["ref_gen"], rig["ref_critic"]
    teacher0 = torch.cat([p.detach().flatten().clone() for n, p in ref_critic.named_parameters()
                          if n.startswith("teacher.")])
    gen0, fake0 = _gathered(gen_engine.module), _gathered(critic_module, "fake.")
    for _ in range(3):
        _sync(ref_gen, gen_engine.module)
        _sync(ref_critic, critic_module)
        # generator step: engine forward of the generator, the critic's *module* with the critic frozen
        x, _, applied = generator_step(gen, critic, rig["x_t"], rig["t"], batch, _loss_cfg(), _gen())
        assert applied
        set_phase(ref_critic, "generator")
        x_ref = ref_gen(rig["x_t"], rig["t"], batch.cond)
        ref_loss, _ = generator_loss(ref_critic, x_ref, batch, _loss_cfg(), _gen())
        ref_loss.backward()  # the plain-autograd reference
        set_phase(ref_critic, "critic")
        assert gen.loss == pytest.approx(ref_loss.item(), rel=1e-5)
        _assert_grads_match(gen.grads, ref_gen, list(gen.grads))
        assert all(gr is None or gr.abs().sum() == 0 for gr in gen.also_grads.values()), "critic got generator gradients"

        # critic step through the critic's engine, on the pre-update generator sample
        _, applied = critic_step(critic, x, batch, _loss_cfg(), _gen())
        assert applied
        ref_closs, _ = critic_loss(ref_critic, x_ref.detach(), batch, _loss_cfg(), _gen())
        ref_closs.backward()
        assert critic.loss == pytest.approx(ref_closs.item(), rel=1e-5)
        trainable = [n for n, p in critic_module.named_parameters() if p.requires_grad]
        assert trainable and not any(n.startswith("teacher.") for n in trainable)
        _assert_grads_match(critic.grads, ref_critic, trainable)
        assert all(g is None for n, g in critic.grads.items() if n.startswith("teacher."))

    # the teacher is unchanged; generator and fake score moved
    assert torch.equal(_gathered(critic_module, "teacher."), teacher0)
    assert not torch.equal(_gathered(critic_module, "fake."), fake0)
    assert not torch.equal(_gathered(gen_engine.module), gen0)


def test_generator_gradients_through_its_remaining_steps_match_plain_pytorch(rig):
    """loss.generator_samples: last_step: the generator's output is carried through its later steps
    with gradient, through the plain module (one ZeRO-3-partitioned network called three times in
    one graph, then one backward through the engine); the gradients equal plain autograd's."""
    from dmd2.sampling import Noise, rollout
    from dmd2.step import generator_step

    gen_engine, critic_engine, batch = rig["gen_engine"], rig["critic_engine"], rig["batch"]
    ref_gen, ref_critic = rig["ref_gen"], rig["ref_critic"]
    gen = _Recording(gen_engine, also=critic_engine.module)
    _sync(ref_gen, gen_engine.module)
    _sync(ref_critic, critic_engine.module)
    rest = [499, 249]
    x, _, applied = generator_step(gen, _Recording(critic_engine), rig["x_t"], rig["t"], batch, _loss_cfg(), _gen(),
                                   rest=rest)
    assert applied
    rng = _gen()  # the same draws in the same order: the rollout's noise, then the loss's
    set_phase(ref_critic, "generator")
    x_ref = ref_gen(rig["x_t"], rig["t"], batch.cond)
    x_ref = rollout(ref_gen, ref_gen.schedule, batch.cond, x_ref.shape, rest, Noise(rng, "cpu"), start=x_ref)
    ref_loss, _ = generator_loss(ref_critic, x_ref, batch, _loss_cfg(), rng)
    ref_loss.backward()
    set_phase(ref_critic, "critic")
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-5)
    assert gen.loss == pytest.approx(ref_loss.item(), rel=1e-5)
    _assert_grads_match(gen.grads, ref_gen, list(gen.grads))
    assert all(gr is None or gr.abs().sum() == 0 for gr in gen.also_grads.values()), "critic got generator gradients"
