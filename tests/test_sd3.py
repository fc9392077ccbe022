"""The SD3 family: a rectified-flow MMDiT teacher (SD3Transformer2DModel, CLIP-L + CLIP-G + T5) behind the
same interfaces as the UNet families: the tiny teacher loads in plain diffusers, the loader reads it,
conditioning is StableDiffusion3Pipeline.encode_prompt's, the GAN features stop at the middle block,
and `dmd2 train` / `sample` / `export --pipeline` run end to end."""

import copy
import json

import numpy as np
import pytest
import torch
from helpers import check_run, lora_1step_flow_run, metrics, run_cli, sample_and_export_flow_run

from dmd2.errors import UserError
from dmd2.models import Conditioner, Denoiser, GANHead, load_teacher
from dmd2.schedule import FlowSchedule, flow_sigmas

PROMPTS = ["a red circle", "a cat riding a horse"]


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_teacher(str(tiny_teacher("sd3")))


def _inputs(t, batch=2, seed=0):
    lat = t.latent_size(t.resolution)
    x = torch.randn(batch, t.channels, lat, lat, generator=torch.Generator().manual_seed(seed))
    return x, torch.tensor([10, 900][:batch])


def test_tiny_sd3_is_a_plain_diffusers_pipeline(tiny_teacher):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer

    path = tiny_teacher("sd3")
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) < 10 * 2**20
    pipe = DiffusionPipeline.from_pretrained(path)  # no dmd2 code
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert pipe.vae.config.shift_factor and pipe.vae_scale_factor == 4 and pipe.patch_size == 2
    # the T5 tokenizer, built offline, reloads and tells prompts apart; eos appended, pad 0
    tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3")
    a = tok("a red circle", padding="max_length", max_length=8).input_ids
    assert a[3] == tok.eos_token_id == 1 and a[4:] == [tok.pad_token_id] * 4 and tok.unk_token_id not in a
    assert tok("blue stripes").input_ids != tok("a cat").input_ids
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_loader_reads_sd3(tiny_teacher, teacher):
    t = teacher
    assert t.family == "sd3" and t.transformer and t.denoiser_folder == "transformer"
    assert type(t.unet).__name__ == "SD3Transformer2DModel"
    assert not any(p.requires_grad for p in t.unet.parameters())
    assert (t.resolution, t.channels, t.latent_size(32), t.mid_channels, t.mid_spatial(32)) == (32, 16, 8, 32, 4)
    assert isinstance(t.schedule, FlowSchedule) and torch.equal(t.schedule.sigmas, flow_sigmas(shift=3.0))
    assert len(t.text_encoders) == 3 and t.num_classes is None
    assert t.training_resolution(48) == 48  # divisible by VAE 4 x patch 2
    with pytest.raises(UserError, match="not divisible"):
        t.training_resolution(36)
    assert t.training_resolution(128) == 128  # 16 patches a side, pos_embed_max_size
    with pytest.raises(UserError, match="above the teacher's largest, 128"):
        t.training_resolution(136)
    with pytest.raises(UserError, match="is a sd3 teacher but model.family is sdxl"):
        load_teacher(str(tiny_teacher("sd3")), family="sdxl")
    # dmd2 prepare's load: the transformer from its config on the meta device, weights unread
    meta = load_teacher(str(tiny_teacher("sd3")), denoiser=False)
    assert next(meta.unet.parameters()).is_meta and meta.transformer and meta.mid_spatial(32) == 4
    assert len(meta.text_encoders) == 3 and meta.vae is not None


def test_conditioning_is_the_pipelines_encode_prompt(tiny_teacher, teacher):
    """CLIP-L + CLIP-G penultimate states, zero-padded to T5's width, then T5's along the sequence;
    pooled = both CLIP projections; uncond = the pipeline's encoding of the empty negative prompt."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_teacher("sd3"))
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    c = Conditioner(teacher, 32)
    assert c.text
    cond = c.encode_prompts(PROMPTS)
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    assert cond["encoder_hidden_states"].shape == (2, 77 + 256, 80) and cond["pooled_projections"].shape == (2, 64)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    assert cond["encoder_hidden_states"][:, :77, 64:].abs().sum() == 0  # the CLIP part's zero padding
    u = c.uncond(2)
    torch.testing.assert_close(u["encoder_hidden_states"], npe)
    torch.testing.assert_close(u["pooled_projections"], npooled)
    assert u["pooled_projections"].abs().sum() > 0  # not zeros (SD3 has no force_zeros_for_empty_prompt)


def test_denoiser_calls_the_transformer_as_the_pipeline(teacher):
    """x0 = x_t - s v from the transformer called with timestep s * 1000 (the pipeline's)."""
    t = teacher
    d = Denoiser(t.unet, t.schedule)
    x, tt = _inputs(t)
    cond = Conditioner(t, 32).encode_prompts(PROMPTS)
    with torch.no_grad():
        v = t.unet(hidden_states=x, timestep=t.schedule.sigmas[tt].float() * 1000,
                   encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"],
                   return_dict=False)[0]
        torch.testing.assert_close(d.raw(x, tt, cond), v)
        s = t.schedule.sigmas[tt].view(-1, 1, 1, 1)
        torch.testing.assert_close(d(x, tt, cond), (x.double() - s * v.double()).float())


def test_features_are_the_middle_blocks_tokens_on_the_patch_grid(teacher):
    """The early exit equals a forward hook on transformer_blocks[(L-1)//2] of the full forward, as a
    B x D x H/p x W/p map the conv GAN head takes; any block by index; the same with gradient
    checkpointing; UNet-only layers refused."""
    t = teacher
    d = Denoiser(t.unet, t.schedule)
    x, tt = _inputs(t)
    cond = Conditioner(t, 32).encode_prompts(PROMPTS)
    seen = {}
    blocks = t.unet.transformer_blocks
    assert len(blocks) == 4
    def record(k):
        def hook(module, args, out):  # returns None: the output is recorded, not replaced
            seen.setdefault(k, out[1])
        return hook

    hooks = [b.register_forward_hook(record(k)) for k, b in enumerate(blocks)]
    with torch.no_grad():
        d(x, tt, cond)
        feats = d.features(x, tt, cond)
        last = d.features(x, tt, cond, 3)  # the last block (context_pre_only)
    for h in hooks:
        h.remove()

    def grid(tokens):  # B x N x D -> B x D x 4 x 4, row-major patches as PatchEmbed flattens them
        return tokens.transpose(1, 2).reshape(2, 32, 4, 4)

    torch.testing.assert_close(feats, grid(seen[1]))
    torch.testing.assert_close(last, grid(seen[3]))
    assert feats.shape == (2, t.mid_channels, t.mid_spatial(32), t.mid_spatial(32))
    assert GANHead(t.mid_channels, t.mid_spatial(32))(feats).shape == (2,)
    with pytest.raises(ValueError, match="for UNets"):
        d.features(x, tt, cond, "encoder_end")
    with pytest.raises(ValueError, match="block 4 of a transformer with 4 blocks"):
        d.features(x, tt, cond, 4)

    net = copy.deepcopy(t.unet).requires_grad_(True)
    net.enable_gradient_checkpointing()
    ckpt = Denoiser(net, t.schedule).features(x, tt, cond)
    assert ckpt.requires_grad
    torch.testing.assert_close(ckpt.detach(), feats)
    ckpt.square().mean().backward()
    assert net.transformer_blocks[1].attn.to_q.weight.grad is not None
    assert net.transformer_blocks[2].attn.to_q.weight.grad is None  # never ran


def test_sd35_layout_dual_attention_and_qk_norm(teacher):
    """SD3.5's transformer (dual_attention_layers: a second image self-attention; qk_norm RMS):
    the same features early exit (pinned to a hook) and default LoRA targets, which also reach attn2."""
    from diffusers import SD3Transformer2DModel

    from dmd2.config import LoraConfig
    from dmd2.models.lora import add_lora

    torch.manual_seed(0)
    net = SD3Transformer2DModel(**{**teacher.unet.config, "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"})
    d = Denoiser(net.eval(), teacher.schedule)
    x, tt = _inputs(teacher)
    cond = Conditioner(teacher, 32).encode_prompts(PROMPTS)
    seen = {}

    def hook(module, args, out):
        seen.setdefault("mid", out[1])

    h = net.transformer_blocks[1].register_forward_hook(hook)
    with torch.no_grad():
        x0 = d(x, tt, cond)
        feats = d.features(x, tt, cond)
    h.remove()
    assert torch.isfinite(x0).all()
    torch.testing.assert_close(feats, seen["mid"].transpose(1, 2).reshape(2, 32, 4, 4))
    add_lora(net, LoraConfig(rank=4))
    assert any("attn2.to_q.lora_A" in n for n, _ in net.named_parameters())


def test_roles_lora_and_gan_layer_checks(tiny_teacher):
    from dmd2.config import LoraConfig
    from dmd2.models.lora import TRANSFORMER_TARGETS
    from dmd2.models.roles import build_roles

    teacher = load_teacher(str(tiny_teacher("sd3")))  # its own: the shared fake-score LoRA goes onto teacher.unet

    lora = LoraConfig(enabled=True, fake_score=True, rank=4)
    gen, critic = build_roles(teacher, lora=lora, gan=True, resolution=32, seed=0, gradient_checkpointing=True)
    assert gen.unet.gradient_checkpointing and critic.fake.unet is teacher.unet
    adapted = {n.rsplit(".lora_A", 1)[0].split(".")[-1] for n, _ in gen.unet.named_parameters() if ".lora_A" in n}
    # the attention's image and added-context (text) projections; to_out.0 shows as "0"
    assert adapted == {"to_q", "to_k", "to_v", "0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert {p.requires_grad for n, p in gen.unet.named_parameters() if "lora_" not in n} == {False}
    assert critic.head is not None and critic.gan_layer == "mid_block"
    assert set(TRANSFORMER_TARGETS) >= {"to_q", "add_q_proj"}
    # a LoRA run's generator is merged as models.student does it
    x, tt = _inputs(teacher)
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
        build_roles(teacher, gan=True, resolution=32, seed=0, gradient_checkpointing=False, gan_layer="encoder_end")
    sd15 = load_teacher(str(tiny_teacher("sd15")))
    with pytest.raises(UserError, match="is for transformer teachers"):
        build_roles(sd15, gan=True, resolution=32, seed=0, gradient_checkpointing=False, gan_layer=1)


def test_make_tiny_teacher_cli_and_the_teachers_own_sampler(tmp_path, tiny_teacher):
    """`dmd2 make-tiny-teacher sd3 OUT`; the teacher's many-step draw (dmd2 eval's teacher column) goes
    through StableDiffusion3Pipeline with its own scheduler and CFG."""
    from typer.testing import CliRunner

    from dmd2.cli import app
    from dmd2.generate import teacher_draw

    res = CliRunner().invoke(app, ["make-tiny-teacher", "sd3", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "t" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    t = load_teacher(str(tiny_teacher("sd3")))
    (chunk, images), = teacher_draw(t, PROMPTS, [0, 1], 2, range(2), 2, cfg_scale=7.0, resolution=32, device="cpu")
    assert chunk == [0, 1] and images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


def test_recipe_feature_layer_takes_a_block_index(repo_root):
    from dmd2.config import RecipeError, load_recipe

    recipe = repo_root / "recipes/tiny_sd3.yaml"
    assert load_recipe(recipe, ["model.teacher=x"]).loss.gan.feature_layer == "mid_block"
    assert load_recipe(recipe, ["model.teacher=x", "loss.gan.feature_layer=2"]).loss.gan.feature_layer == 2
    assert load_recipe(recipe, ["model.teacher=x", "model.family=sd3"]).model.family == "sd3"
    for bad in ("-1", "true", "middle"):
        with pytest.raises(RecipeError, match="loss.gan.feature_layer"):
            load_recipe(recipe, ["model.teacher=x", f"loss.gan.feature_layer={bad}"])


# ---------------------------------------------------------------------------------------------
# dmd2 train / sample / export through the real CLI


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, tiny_teacher):
    """recipes/tiny_sd3.yaml: 2 steps [999, 499] with backward simulation, CFG, GAN on the middle
    block, under ZeRO-3 at one rank; k = 0 and k = 1 are both drawn within 3 steps at seed 1."""
    teacher = tiny_teacher("sd3")
    run = tmp_path_factory.mktemp("runs") / "sd3"
    res = run_cli("train", "recipes/tiny_sd3.yaml", f"model.teacher={teacher}", "train.max_steps=3",
                  f"output_dir={run}", "train.seed=1", "optim.generator.lr=1e-3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run


def test_train_sd3_multistep_zero3(sd3_run, tiny_teacher):
    check_run(sd3_run, 3, tiny_teacher("sd3"))
    assert {r["k"] for r in metrics(sd3_run)} == {0, 1}


@pytest.mark.slow  # ~65 s on 2 cores; the launcher path itself is in the default suite (tests/test_train.py, SDXL)
def test_train_sd3_two_ranks_deepspeed_launcher(tmp_path, tiny_teacher):
    teacher = tiny_teacher("sd3")
    run = tmp_path / "run"
    res = run_cli("train", "recipes/tiny_sd3.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={run}", "train.seed=1", ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 2, teacher)
    assert json.loads((run / "checkpoints/step_00000002/state.json").read_text())["world_size"] == 2


@pytest.mark.slow  # ~20 s; keeps the default suite under 15 minutes (LoRA targets: test_roles_lora_and_gan_layer_checks)
def test_train_sd3_lora_1step_checkpointed_and_sample(tmp_path, tiny_teacher):
    """The shared LoRA run (helpers.lora_1step_flow_run) with the GAN head on block 0."""
    lora_1step_flow_run(tmp_path, tiny_teacher("sd3"), "recipes/tiny_sd3.yaml", 0, PROMPTS)


def test_sample_and_pipeline_export_of_an_sd3_run(sd3_run, tmp_path):
    """`dmd2 sample` draws; `dmd2 export --pipeline` writes a folder StableDiffusion3Pipeline loads
    with no dmd2 code, whose 1-step draw (sigmas from dmd2.json's usage) is dmd2's for the same seeds."""
    from diffusers import StableDiffusion3Pipeline

    seeds = [3, 4]
    meta, pipe, _, ours = sample_and_export_flow_run(sd3_run, tmp_path, "sd3", PROMPTS, seeds)
    assert "sigmas=[1.0, 0.5]" in meta["usage"] and "guidance_scale=0" in meta["usage"]
    assert isinstance(pipe, StableDiffusion3Pipeline)
    got = pipe(PROMPTS, sigmas=[1.0], guidance_scale=0, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images * 2 - 1
    assert (got - ours([999])).abs().max() < 1e-5
    two = pipe(PROMPTS, sigmas=[1.0, 0.5], guidance_scale=0, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    assert two.shape == (2, 3, 32, 32) and torch.isfinite(two).all()  # re-noising draws its own noise


def test_a_pipeline_without_t5_conditions_as_the_pipeline_does(tiny_teacher, tmp_path):
    """text_encoder_3 null in model_index.json (SD3's T5-free mode, the digits-flow teacher's):
    the T5 tokens are zeros of the joint width, as StableDiffusion3Pipeline's _get_t5_prompt_embeds.
    Training folds them into one token (models/attention.py): the transformer computes the same
    function on 78 context tokens, and a stock call with all 333 still runs plain attention."""
    import shutil
    from pathlib import Path

    from diffusers import StableDiffusion3Pipeline

    folder = Path(shutil.copytree(tiny_teacher("sd3"), tmp_path / "no_t5"))
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_3"], index["tokenizer_3"] = [None, None], [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    t = load_teacher(str(folder))
    assert t.family == "sd3" and len(t.text_encoders) == 2 and t.t5_free
    # diffusers loads a null component only when it is passed as None
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    pe, npe, pooled, npooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    full = Conditioner(t, 32, compact_t5=False)
    cond = full.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(cond["pooled_projections"], pooled)
    assert cond["encoder_hidden_states"][:, 77:].abs().sum() == 0
    torch.testing.assert_close(full.uncond(2)["encoder_hidden_states"], npe)

    compact = Conditioner(t, 32)  # training's default
    small = compact.encode_prompts(PROMPTS)
    assert small["encoder_hidden_states"].shape[1] == 78
    torch.testing.assert_close(small["encoder_hidden_states"], pe[:, :78])
    torch.testing.assert_close(compact.uncond(2)["encoder_hidden_states"], npe[:, :78])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t.channels, t.latent_size(32), t.latent_size(32), generator=g)
    tt = torch.tensor([999, 250])
    d = Denoiser(copy.deepcopy(t.unet).eval(), t.schedule)  # a copy keeps the processors, as the roles
    with torch.no_grad():
        got = d(x, tt, small)
        want = d(x, tt, cond)
        # the stock transformer (diffusers' own attention processors) on the pipeline's 333 tokens
        stock = Denoiser(pipe.transformer.eval(), t.schedule)(x, tt, cond)
    assert torch.equal(want, stock)  # a full context takes diffusers' plain path unchanged
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
