"""The FLUX family: a rectified-flow transformer (FluxTransformer2DModel: double- then single-stream
blocks on 2x2-packed latents with RoPE ids; CLIP pooled + T5) behind the same interfaces as the other
families: the tiny teachers (FLUX.1-dev-like, guidance-distilled with a dynamic shift; FLUX.1-schnell-like,
no guidance input, static shift) load in plain diffusers, the loader reads them, conditioning is
FluxPipeline.encode_prompt's, the denoiser calls the transformer as FluxPipeline does, the GAN features
stop at a block, and `dmd2 train` / `sample` / `export --pipeline` run end to end."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    check_run,
    cli_error,
    lora_1step_flow_run,
    metrics,
    run_cli,
    sample_and_export_flow_run,
)

from dmd2.errors import UserError
from dmd2.models import Conditioner, Denoiser, GANHead, load_teacher
from dmd2.schedule import FlowSchedule, dynamic_shift_mu, flow_sigmas

PROMPTS = ["a red circle", "a cat riding a horse"]
FAMILIES = ["flux", "flux-schnell"]


@pytest.fixture(scope="module")
def dev(tiny_teacher):
    return load_teacher(str(tiny_teacher("flux")), resolution=32)


@pytest.fixture(scope="module")
def schnell(tiny_teacher):
    return load_teacher(str(tiny_teacher("flux-schnell")), resolution=32)


@pytest.fixture(scope="module")
def pipes(tiny_teacher):
    from diffusers import FluxPipeline

    out = {}
    for family in FAMILIES:
        out[family] = FluxPipeline.from_pretrained(tiny_teacher(family))
        out[family].set_progress_bar_config(disable=True)
    return out


def _inputs(batch=2, seed=0):
    x = torch.randn(batch, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([10, 900][:batch])


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_flux_is_a_plain_diffusers_pipeline(family, tiny_teacher, pipes):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline

    path = tiny_teacher(family)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 10 * 2**20
    pipe = DiffusionPipeline.from_pretrained(path)  # no dmd2 code
    assert isinstance(pipe, FluxPipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    cfg, sched = pipe.transformer.config, pipe.scheduler.config
    assert cfg.patch_size == 1 and cfg.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert len(pipe.transformer.transformer_blocks) == len(pipe.transformer.single_transformer_blocks) == 2
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (0.3611, 0.1159)
    assert not pipe.vae.config.use_quant_conv and pipe.vae_scale_factor == 4
    if family == "flux":  # FLUX.1-dev: guidance-distilled, the resolution-dependent shift
        assert cfg.guidance_embeds and sched.use_dynamic_shifting
        assert (sched.base_shift, sched.max_shift, sched.base_image_seq_len, sched.max_image_seq_len) == (
            0.5, 1.15, 256, 4096)
    else:  # FLUX.1-schnell: no guidance input, a static shift of 1
        assert not cfg.guidance_embeds and not sched.use_dynamic_shifting and sched.shift == 1.0
    pipe.set_progress_bar_config(disable=True)
    kw = {"guidance_scale": 3.5} if family == "flux" else {"negative_prompt": [""], "true_cfg_scale": 3.5}
    images = pipe(PROMPTS[:1], num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0), **kw).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_loader_reads_flux(tiny_teacher, dev, schnell, tmp_path):
    for t in (dev, schnell):
        assert t.family == "flux" and t.transformer and t.flux and t.denoiser_folder == "transformer"
        assert type(t.unet).__name__ == "FluxTransformer2DModel"
        assert not any(p.requires_grad for p in t.unet.parameters())
        assert (t.resolution, t.channels, t.latent_size(32), t.mid_channels, t.mid_spatial(32)) == (32, 16, 8, 32, 4)
        assert t.image_seq_len(32) == 16  # FluxPipeline's latents.shape[1] at 32 x 32
        assert len(t.text_encoders) == 2 and t.num_classes is None
        with pytest.raises(UserError, match="not divisible"):
            t.training_resolution(36)  # VAE 4 x packing 2
    assert dev.guidance_embeds and dev.guidance(3.5) == 3.5
    assert not schnell.guidance_embeds and schnell.guidance(3.5) is None
    # FLUX.1-dev's table: mu from the packed token count (calculate_shift), the scheduler's time_shift
    assert isinstance(dev.schedule, FlowSchedule)
    torch.testing.assert_close(dev.schedule.sigmas, flow_sigmas(mu=dynamic_shift_mu(16)), rtol=0, atol=0)
    at64 = load_teacher(str(tiny_teacher("flux")), resolution=64)
    torch.testing.assert_close(at64.schedule.sigmas, flow_sigmas(mu=dynamic_shift_mu(64)), rtol=0, atol=0)
    assert at64.schedule.sigmas[499] > dev.schedule.sigmas[499]  # more tokens, more shift
    torch.testing.assert_close(schnell.schedule.sigmas, flow_sigmas(shift=1.0), rtol=0, atol=0)
    assert dev.training_resolution(None) == 32
    with pytest.raises(UserError, match="train.resolution: 64, but the teacher was loaded for 32"):
        dev.training_resolution(64)
    assert schnell.training_resolution(48) == 48  # a static shift: any resolution
    # no resolution: the config records none, and FLUX.1-dev's schedule needs one
    with pytest.raises(UserError, match=r"^train.resolution: .*records no training resolution"):
        load_teacher(str(tiny_teacher("flux")))
    bare = load_teacher(str(tiny_teacher("flux-schnell")))
    with pytest.raises(UserError, match=r"^train.resolution: "):
        bare.training_resolution(None)
    with pytest.raises(UserError, match="is a flux teacher but model.family is sd3"):
        load_teacher(str(tiny_teacher("flux")), family="sd3", resolution=32)
    # dmd2 prepare's load: the transformer from its config on the meta device, weights unread
    meta = load_teacher(str(tiny_teacher("flux")), denoiser=False, resolution=32)
    assert next(meta.unet.parameters()).is_meta and meta.flux and meta.mid_spatial(32) == 4
    assert len(meta.text_encoders) == 2 and meta.vae is not None
    # the dynamic shift is read for FLUX only (other pipelines' calculate_shift fallbacks differ)
    from dmd2.models.loader import _schedule_from_config

    with pytest.raises(UserError, match="use_dynamic_shifting .* FLUX teachers only"):
        _schedule_from_config(dict(dev.scheduler_config), "model.teacher: 'x'")
    # a single-file FLUX checkpoint (Black Forest Labs' layout) is refused in one line
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.proj.weight": torch.zeros(2, 2)}, str(tmp_path / "flux1.safetensors"))
    with pytest.raises(UserError, match="single-file FLUX checkpoints hold the transformer only"):
        load_teacher(str(tmp_path / "flux1.safetensors"))


def test_missing_resolution_is_one_line_through_the_cli(tiny_teacher, tmp_path):
    line = cli_error("train", REPO / "recipes/tiny_flux.yaml", f"model.teacher={tiny_teacher('flux')}",
                     "train.resolution=null", f"output_dir={tmp_path / 'run'}")
    assert line.startswith("error: ") and "train.resolution" in line and "records no training resolution" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_conditioning_is_the_pipelines_encode_prompt(family, dev, schnell, pipes):
    """CLIP's pooler_output (77 tokens), T5's last hidden states at 512 tokens; uncond = the
    pipeline's encoding of the empty negative prompt (its true-CFG path), not zeros."""
    t, pipe = (dev if family == "flux" else schnell), pipes[family]
    with torch.no_grad():  # as in FluxPipeline.__call__ (autograd would pick another attention kernel)
        pe, pooled, text_ids = pipe.encode_prompt(PROMPTS, None)
        npe, npooled, _ = pipe.encode_prompt(["", ""], None)
    c = Conditioner(t, 32)
    assert c.text
    cond = c.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (2, 512, 48) and cond["pooled_projections"].shape == (2, 32)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=0)
    assert text_ids.shape == (512, 3) and not text_ids.any()  # what the denoiser passes as txt_ids
    u = c.uncond(2)
    torch.testing.assert_close(u["encoder_hidden_states"], npe, rtol=0, atol=0)
    torch.testing.assert_close(u["pooled_projections"], npooled, rtol=0, atol=0)
    assert u["pooled_projections"].abs().sum() > 0


def _pipeline_velocity(pipe, x, sigma, cond, guidance):
    """What FluxPipeline.__call__ does around its transformer call, with its own static methods."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    latents = FluxPipeline._pack_latents(x, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    timestep = (sigma * 1000).float()  # the scheduler's timesteps: sigmas * num_train_timesteps
    g = None if guidance is None else torch.full([1], guidance, dtype=torch.float32).expand(b)
    out = pipe.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=g,
                           pooled_projections=cond["pooled_projections"],
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3), img_ids=img_ids,
                           return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)


@pytest.mark.parametrize("family", FAMILIES)
def test_denoiser_calls_the_transformer_as_the_pipeline(family, dev, schnell, pipes):
    """Packed latents, RoPE ids, timestep sigma (the pipeline's timestep / 1000), the guidance input
    (FLUX.1-dev only), the velocity unpacked: x0 = x_t - s v."""
    t, pipe = (dev if family == "flux" else schnell), pipes[family]
    g = 3.5 if family == "flux" else None
    d = Denoiser(t.unet, t.schedule, g)
    x, tt = _inputs()
    cond = Conditioner(t, 32).encode_prompts(PROMPTS)
    s = t.schedule.sigmas[tt]
    with torch.no_grad():
        v = _pipeline_velocity(pipe, x, s, cond, g)
        torch.testing.assert_close(d.raw(x, tt, cond), v)
        torch.testing.assert_close(d(x, tt, cond), (x.double() - s.view(-1, 1, 1, 1) * v.double()).float())
        # the packing is position-aware: a transposed latent is not a transposed prediction
        assert not torch.allclose(d.raw(x.transpose(-1, -2), tt, cond), v.transpose(-1, -2), atol=1e-4)
        if family == "flux":
            other = Denoiser(t.unet, t.schedule, 1.0).raw(x, tt, cond)
            assert (other - v).abs().max() > 1e-4  # the guidance input reaches the network
    if family == "flux":
        with pytest.raises(ValueError, match="has a guidance embedding"):
            Denoiser(t.unet, t.schedule)
    else:
        with pytest.raises(ValueError, match="has no guidance embedding"):
            Denoiser(t.unet, t.schedule, 3.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_guided_x0_is_one_guided_call_or_cfg(family, dev, schnell):
    """The real score: FLUX.1-dev's one call with guidance = loss.cfg_scale (no unconditional branch);
    a teacher without the guidance input: CFG of the prompt and "" in one batch, as SD3."""
    from dmd2.losses import cfg
    from dmd2.models.roles import guided_x0

    t = dev if family == "flux" else schnell
    d = Denoiser(t.unet, t.schedule, t.guidance(3.5))
    c = Conditioner(t, 32)
    x, tt = _inputs()
    cond, uncond = c.encode_prompts(PROMPTS), c.uncond(2)
    batches = []
    hook = t.unet.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]),
                                            with_kwargs=True)
    try:
        got = guided_x0(d, x, tt, cond, uncond, 3.5)
    finally:
        hook.remove()
    with torch.no_grad():
        if family == "flux":
            assert batches == [2]
            torch.testing.assert_close(got, d(x, tt, cond), rtol=0, atol=0)
            with pytest.raises(ValueError, match="guidance input is 3.5 but loss.cfg_scale is 2.0"):
                guided_x0(d, x, tt, cond, uncond, 2.0)
            # loss.cfg_interval's per-sample scales need an unconditional branch: refused at load
            # time in one line naming the field, and by the real score itself
            with pytest.raises(UserError, match=r"^loss.cfg_interval: \[0.0, 0.5\] needs an unconditional"):
                t.check_cfg(3.5, (0.0, 0.5))
            with pytest.raises(ValueError, match="cfg_interval needs a teacher with an unconditional branch"):
                guided_x0(d, x, tt, cond, uncond, torch.full((2, 1, 1, 1), 3.5))
        else:
            assert batches == [4]
            v = cfg(d.raw(x, tt, cond), d.raw(x, tt, uncond), 3.5)
            torch.testing.assert_close(got, t.schedule.to_x0(x, v, tt), rtol=1e-5, atol=1e-5)


def test_features_are_a_blocks_image_tokens_on_the_packed_grid(dev):
    """The early exit equals forward hooks on the full forward: blocks counted double-stream first,
    then single-stream (whose image tokens are the tail of the joint sequence, the block's second
    output), the default the middle one ((4-1)//2 = 1, the last double-stream block), as a
    B x D x H/2 x W/2 map; the same with gradient checkpointing; UNet-only layers refused."""
    t = dev
    d = Denoiser(t.unet, t.schedule, 3.5)
    x, tt = _inputs()
    cond = Conditioner(t, 32).encode_prompts(PROMPTS)
    blocks = [*t.unet.transformer_blocks, *t.unet.single_transformer_blocks]
    assert len(blocks) == 4
    seen = {}

    def record(k):
        def hook(module, args, kwargs, out):  # returns None: the output is recorded, not replaced
            seen.setdefault(k, out[1])
            if k >= 2:  # single-stream: the image tokens are the tail of its joint input
                seen.setdefault(f"in{k}", kwargs["hidden_states"].shape[1])
        return hook

    hooks = [b.register_forward_hook(record(k), with_kwargs=True) for k, b in enumerate(blocks)]
    with torch.no_grad():
        d(x, tt, cond)
        feats = {k: d.features(x, tt, cond, k) for k in range(4)}
        default = d.features(x, tt, cond)
    for h in hooks:
        h.remove()
    assert seen["in2"] == seen["in3"] == 16  # the image tokens alone: the block split the text off

    def grid(tokens):  # B x N x D -> B x D x 4 x 4, row-major as _pack_latents orders the tokens
        return tokens.transpose(1, 2).reshape(2, 32, 4, 4)

    for k in range(4):
        torch.testing.assert_close(feats[k], grid(seen[k]), rtol=0, atol=0)
    torch.testing.assert_close(default, feats[1], rtol=0, atol=0)
    assert default.shape == (2, t.mid_channels, t.mid_spatial(32), t.mid_spatial(32))
    assert GANHead(t.mid_channels, t.mid_spatial(32))(default).shape == (2,)
    with pytest.raises(ValueError, match="for UNets"):
        d.features(x, tt, cond, "encoder_end")
    with pytest.raises(ValueError, match="block 4 of a transformer with 4 blocks"):
        d.features(x, tt, cond, 4)

    net = copy.deepcopy(t.unet).requires_grad_(True)
    net.enable_gradient_checkpointing()
    ckpt = Denoiser(net, t.schedule, 3.5).features(x, tt, cond, 2)
    assert ckpt.requires_grad
    torch.testing.assert_close(ckpt.detach(), feats[2], rtol=0, atol=0)
    ckpt.square().mean().backward()
    assert net.single_transformer_blocks[0].attn.to_q.weight.grad is not None
    assert net.time_text_embed.guidance_embedder.linear_1.weight.grad is not None
    assert net.single_transformer_blocks[1].attn.to_q.weight.grad is None  # never ran


def test_roles_guidance_lora_and_gan_layer_checks(tiny_teacher, dev):
    from dmd2.config import LoraConfig
    from dmd2.models.lora import FLUX_TARGETS
    from dmd2.models.roles import build_roles

    with pytest.raises(ValueError, match="needs cfg_scale"):
        build_roles(dev, gan=False, resolution=32, seed=0, gradient_checkpointing=False)
    gen, critic = build_roles(dev, gan=True, resolution=32, seed=0, gradient_checkpointing=False, cfg_scale=3.5)
    assert gen.guidance == critic.teacher.guidance == critic.fake.guidance == 3.5
    assert critic.head is not None and critic.gan_layer == "mid_block"

    teacher = load_teacher(str(tiny_teacher("flux")), resolution=32)  # its own: the fake-score LoRA goes onto it
    lora = LoraConfig(enabled=True, fake_score=True, rank=4)
    gen, critic = build_roles(teacher, lora=lora, gan=True, resolution=32, seed=0, gradient_checkpointing=True,
                              cfg_scale=3.5)
    assert gen.unet.gradient_checkpointing and critic.fake.unet is teacher.unet
    adapted = {n.split(".lora_A")[0] for n, _ in gen.unet.named_parameters() if ".lora_A" in n}
    suffixes = {a.split("transformer_blocks.", 1)[1].split(".", 1)[1] for a in adapted}
    # diffusers' train_dreambooth_lora_flux.py defaults: attention (single-stream to_q/k/v too) and feed-forwards
    assert suffixes == set(FLUX_TARGETS)
    assert any(a.startswith("single_transformer_blocks.1.attn.to_q") for a in adapted)
    assert {p.requires_grad for n, p in gen.unet.named_parameters() if "lora_" not in n} == {False}
    x, tt = _inputs()
    cond = Conditioner(teacher, 32).encode_prompts(PROMPTS)
    with torch.no_grad():
        for n, p in gen.unet.named_parameters():
            if ".lora_B." in n:
                p.add_(0.01)
        before = gen(x, tt, cond)
        gen.unet.fuse_lora()
        gen.unet.unload_lora()
        assert not any("lora" in n for n, _ in gen.unet.named_parameters())
        torch.testing.assert_close(gen(x, tt, cond), before, rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match="for UNets"):
        build_roles(dev, gan=True, resolution=32, seed=0, gradient_checkpointing=False, gan_layer="encoder_end",
                    cfg_scale=3.5)


def test_make_tiny_teacher_cli_and_the_teachers_own_sampler(tmp_path, dev, schnell, pipes):
    """`dmd2 make-tiny-teacher flux-schnell OUT`; the teacher's many-step draw (dmd2 eval's teacher
    column) goes through FluxPipeline: FLUX.1-dev with its guidance input, schnell with true CFG."""
    from typer.testing import CliRunner

    from dmd2.cli import app
    from dmd2.generate import teacher_draw

    res = CliRunner().invoke(app, ["make-tiny-teacher", "flux-schnell", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    for t, family in ((dev, "flux"), (schnell, "flux-schnell")):
        (chunk, images), = teacher_draw(t, PROMPTS, [0, 1], 2, range(2), 2, cfg_scale=3.5, resolution=32, device="cpu")
        assert chunk == [0, 1] and images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
        kw = {"guidance_scale": 3.5} if family == "flux" else {"negative_prompt": ["", ""], "true_cfg_scale": 3.5}
        ref = pipes[family](PROMPTS, num_inference_steps=2, height=32, width=32, output_type="pt",
                            generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kw).images * 2 - 1
        assert (images - ref).abs().max() < 1e-5


def test_recipe(repo_root):
    from dmd2.config import load_recipe

    r = load_recipe(repo_root / "recipes/tiny_flux.yaml", ["model.teacher=x", "model.family=flux"])
    assert (r.model.family, r.train.resolution, r.loss.cfg_scale) == ("flux", 32, 3.5)


# ---------------------------------------------------------------------------------------------
# dmd2 train / sample / export through the real CLI


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_teacher):
    """recipes/tiny_flux.yaml on the FLUX.1-dev-like teacher: 2 steps [999, 499] with backward
    simulation, the guidance input at 3.5, GAN on the middle block, under ZeRO-3 at one rank; k = 0
    and k = 1 are both drawn within 3 steps at seed 1."""
    teacher = tiny_teacher("flux")
    run = tmp_path_factory.mktemp("runs") / "flux"
    res = run_cli("train", "recipes/tiny_flux.yaml", f"model.teacher={teacher}", "train.max_steps=3",
                  f"output_dir={run}", "train.seed=1", "optim.generator.lr=1e-3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


def test_train_flux_multistep_zero3(flux_run, tiny_teacher):
    check_run(flux_run, 3, tiny_teacher("flux"))
    assert {r["k"] for r in metrics(flux_run)} == {0, 1}


def _pipeline_draw(pipe, usage_kw, seeds):
    return pipe(PROMPTS, output_type="pt", generator=[torch.Generator().manual_seed(s) for s in seeds],
                **usage_kw).images * 2 - 1


def _usage_kwargs(usage: str) -> dict:
    """The keyword arguments of dmd2.json's literal call `...(prompt, k=v, ...)`."""
    call = usage.split("(prompt, ", 1)[1].split(")  #", 1)[0]
    return eval(f"dict({call})")  # the export's own text: literals only


def test_sample_and_pipeline_export_of_a_flux_run(flux_run, tmp_path):
    """`dmd2 sample` draws; `dmd2 export --pipeline` writes a folder FluxPipeline loads with no dmd2
    code, whose 1-step draw (sigmas, guidance_scale, height, width, max_sequence_length from dmd2.json's
    usage) is dmd2's for the same seeds."""
    from diffusers import FluxPipeline

    seeds = [3, 4]
    meta, pipe, again, ours = sample_and_export_flow_run(flux_run, tmp_path, "flux", PROMPTS, seeds)
    kw = _usage_kwargs(meta["usage"])
    assert kw == {"num_inference_steps": 2, "sigmas": [1.0, 0.5], "guidance_scale": 3.5, "height": 32, "width": 32,
                  "max_sequence_length": 512}
    assert isinstance(pipe, FluxPipeline) and pipe.scheduler.config.use_dynamic_shifting
    assert again.denoiser.guidance == 3.5
    one = _pipeline_draw(pipe, {**kw, "num_inference_steps": 1, "sigmas": [1.0]}, seeds)
    assert (one - ours([999])).abs().max() < 1e-5
    # the pipeline's shifted sigmas are the trained noise levels (the re-noising draws its own noise)
    pipe.scheduler.set_timesteps(sigmas=kw["sigmas"], mu=dynamic_shift_mu(16))
    torch.testing.assert_close(pipe.scheduler.sigmas[:2].double(), again.schedule.sigmas[[999, 499]], rtol=0,
                               atol=1e-6)
    two = _pipeline_draw(pipe, kw, seeds)
    assert two.shape == (2, 3, 32, 32) and torch.isfinite(two).all()


# ~20 s; make test-all. The default suite keeps the schnell teacher's CFG call (test_guided_x0_is_one_guided_call_or_cfg),
# its pipeline (test_denoiser_calls_the_transformer_as_the_pipeline) and a FLUX run and export end to end.
@pytest.mark.slow
def test_flux_schnell_1step_cfg_run_and_its_export(tmp_path, tiny_teacher):
    """The schnell-like teacher (no guidance input): a 1-step generator distilled with CFG (prompt and
    "" in one teacher batch) under ZeRO-3; its pipeline export draws what `dmd2 sample` draws, called
    with guidance_scale 0 as FLUX.1-schnell is."""
    from diffusers import DiffusionPipeline

    from dmd2.generate import draw
    from dmd2.models.student import load_student

    teacher = tiny_teacher("flux-schnell")
    run = tmp_path / "run"
    res = run_cli("train", "recipes/tiny_flux.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={run}", "generator.num_steps=1", "generator.timesteps=null", "train.update_ratio=1",
                  "optim.generator.lr=1e-3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 2, teacher)
    assert all(r["loss_dm"] > 0 for r in metrics(run) if "loss_dm" in r)  # CFG: the teacher differs from the fake
    exp = tmp_path / "pipe"
    res = run_cli("export", run, "--pipeline", "--out", exp)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kw = _usage_kwargs(json.loads((exp / "dmd2.json").read_text())["usage"])
    assert kw == {"num_inference_steps": 1, "sigmas": [1.0], "guidance_scale": 0.0, "height": 32, "width": 32,
                  "max_sequence_length": 512}
    pipe = DiffusionPipeline.from_pretrained(exp)
    pipe.set_progress_bar_config(disable=True)
    gen = load_student(run)
    assert gen.denoiser.guidance is None
    ours = torch.cat([x for _, x in draw(gen, PROMPTS, [5, 6], [999], range(2), 2)]).clamp(-1, 1)
    assert (_pipeline_draw(pipe, kw, [5, 6]) - ours).abs().max() < 1e-5


@pytest.mark.slow  # ~40 s on 2 cores (37 s measured); one rank under ZeRO-3 is in the default suite (test_train_flux_multistep_zero3)
def test_train_flux_two_ranks_deepspeed_launcher(tmp_path, tiny_teacher):
    teacher = tiny_teacher("flux")
    run = tmp_path / "run"
    res = run_cli("train", "recipes/tiny_flux.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={run}", "train.seed=1", ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 2, teacher)
    assert json.loads((run / "checkpoints/step_00000002/state.json").read_text())["world_size"] == 2


@pytest.mark.slow  # ~25 s on 2 cores; LoRA targets and the merge are in the default suite (test_roles_guidance_lora_and_gan_layer_checks)
def test_train_flux_lora_1step_checkpointed_sample_and_export(tmp_path, tiny_teacher):
    """The shared LoRA run (helpers.lora_1step_flow_run) with the GAN head on the first single-stream
    block; the adapter exports only merged (--merge-lora), as for SD3."""
    run = lora_1step_flow_run(tmp_path, tiny_teacher("flux"), "recipes/tiny_flux.yaml", 2, PROMPTS)
    line = cli_error("export", run, "--format", "lora", "--out", tmp_path / "lora")
    assert "LoRA files are for SD1.5/SDXL pipelines" in line and "--merge-lora" in line
    res = run_cli("export", run, "--merge-lora", "--out", tmp_path / "merged")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "merged" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
