"""The loader reads what the recipe must not repeat; one denoiser interface over every family."""

import pytest
import torch

from dmd2.errors import UserError
from dmd2.models import Conditioner, Denoiser, GANHead, load_teacher
from dmd2.schedule import DDPMSchedule, EDMSchedule

FAMILIES = ["sd15", "sdxl", "classcond", "classcond-v", "classcond-edm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_loader_reads_the_teacher(tiny_teacher, family):
    t = load_teacher(str(tiny_teacher(family)))
    assert t.family == family.split("-")[0]
    assert not any(p.requires_grad for p in t.unet.parameters())
    if family in ("sd15", "sdxl"):
        assert (t.resolution, t.channels, t.latent_size(t.resolution), t.mid_channels) == (32, 4, 8, 64)
        assert len(t.text_encoders) == (2 if family == "sdxl" else 1)
        assert isinstance(t.schedule, DDPMSchedule) and t.schedule.prediction_type == "epsilon"
    else:
        assert (t.resolution, t.channels, t.num_classes, t.vae) == (16, 3, 10, None)
    if family == "classcond-edm":
        assert isinstance(t.schedule, EDMSchedule)
    if family == "classcond-v":
        assert t.schedule.prediction_type == "v_prediction"


def test_loader_errors_are_one_line(tmp_path, tiny_teacher):
    with pytest.raises(UserError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a diffusers teacher"):
        load_teacher(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="is a sd15 teacher but model.family is sdxl"):
        load_teacher(str(tiny_teacher("sd15")), family="sdxl")


def _cond(t, batch):
    c = Conditioner(t, t.resolution)
    if c.text:
        return c.encode_prompts(["a red circle", "blue stripes"][:batch])
    return c.encode_labels(torch.arange(batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_features_equal_mid_block_of_full_forward(tiny_teacher, family):
    """The early-exit feature path matches a forward hook on the full UNet's mid-block."""
    t = load_teacher(str(tiny_teacher(family)))
    d = Denoiser(t.unet, t.schedule)
    lat = t.latent_size(t.resolution)
    x = torch.randn(2, t.channels, lat, lat, generator=torch.Generator().manual_seed(0))
    tt = torch.tensor([10, 900])
    cond = _cond(t, 2)
    seen = {}
    h = t.unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    with torch.no_grad():
        x0 = d(x, tt, cond)
        feats = d.features(x, tt, cond)
    h.remove()
    torch.testing.assert_close(feats, seen["mid"])
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert feats.shape[-1] == t.mid_spatial(t.resolution)
    logits = GANHead(t.mid_channels, t.mid_spatial(t.resolution))(feats)
    assert logits.shape == (2,)

    # loss.gan.feature_layer=encoder_end: the mid-block's input, the same shape (the head fits both)
    def into_mid(module, args, kwargs):  # returns None: the input is recorded, not replaced
        seen["into_mid"] = args[0] if args else kwargs["hidden_states"]

    h = t.unet.mid_block.register_forward_pre_hook(into_mid, with_kwargs=True)
    with torch.no_grad():
        d(x, tt, cond)
        early = d.features(x, tt, cond, "encoder_end")
    h.remove()
    torch.testing.assert_close(early, seen["into_mid"])
    assert early.shape == feats.shape and not torch.allclose(early, feats)


@pytest.mark.parametrize("channels,groups", [(1280, 32), (768, 32), (64, 4)])
def test_gan_head_groups_hold_at_least_16_channels(channels, groups):
    """GroupNorm on the head's 1x1 map normalises each group alone: with 2 channels a group (a
    64-channel mid-block under GroupNorm(32)) only signs survive and D never leaves chance."""
    norms = [m for m in GANHead(channels, 8).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == groups for m in norms)


def test_sdxl_conditioning(tiny_teacher):
    """SDXL: both encoders' penultimate states concatenated, pooled text_embeds, [H,W,0,0,H,W]; zero uncond."""
    t = load_teacher(str(tiny_teacher("sdxl")))
    c = Conditioner(t, 32)
    cond = c.encode_prompts(["a red circle"])
    assert cond["encoder_hidden_states"].shape[-1] == t.unet.config.cross_attention_dim
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    u = c.uncond(3)
    assert u["encoder_hidden_states"].abs().sum() == 0 and u["text_embeds"].abs().sum() == 0
    assert u["time_ids"].shape == (3, 6) and u["time_ids"][0].tolist() == [32, 32, 0, 0, 32, 32]


def test_sd15_uncond_is_empty_prompt(tiny_teacher):
    t = load_teacher(str(tiny_teacher("sd15")))
    c = Conditioner(t, 32)
    torch.testing.assert_close(c.uncond(2)["encoder_hidden_states"][1], c.encode_prompts([""])["encoder_hidden_states"][0])


def _dropout_teacher():
    """A tiny class-conditional EDM teacher whose config says dropout 0.1 (as the digits teachers')."""
    from diffusers import UNet2DModel

    from dmd2.models import Teacher
    from dmd2.schedule import EDMSchedule

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       num_class_embeds=10, norm_num_groups=8, dropout=0.1).eval()
    return Teacher("test", "classcond", unet, EDMSchedule(), {"_class_name": "EDMEulerScheduler"}), unet


def _dropout_rates(module):
    return [d.p for d in module.modules() if isinstance(d, torch.nn.Dropout)]


def test_trainable_copies_have_no_dropout_whatever_the_teacher_says():
    """A teacher trained with dropout 0.1: the generator and fake score run the same function in
    train mode (training, backward simulation) as in eval mode (sampling); the teacher is untouched."""
    from dmd2.models.roles import build_roles

    teacher, unet = _dropout_teacher()
    gen, critic = build_roles(teacher, gan=False, resolution=8, seed=0, gradient_checkpointing=False)
    x, t, cond = torch.randn(2, 3, 8, 8), torch.full((2,), 500), {"class_labels": torch.tensor([1, 2])}
    assert gen.training and critic.fake.training
    with torch.no_grad():
        for net in (gen, critic.fake):
            train_out = net(x, t, cond)
            assert torch.equal(train_out, net(x, t, cond))  # deterministic in train mode
            net.eval()
            assert torch.equal(train_out, net(x, t, cond))  # and the function sampling uses
            net.train()
    assert 0.1 in _dropout_rates(unet)  # the teacher keeps its own


def test_fake_score_dropout_teacher_keeps_it_in_the_fake_score_only():
    """loss.fake_score_dropout: teacher: the fake score has the teacher's dropout layers at their
    rates (stochastic in train mode), the generator still none."""
    from dmd2.models.roles import build_roles

    teacher, unet = _dropout_teacher()
    gen, critic = build_roles(teacher, gan=False, resolution=8, seed=0, gradient_checkpointing=False,
                              fake_score_dropout=True)
    assert _dropout_rates(critic.fake) == _dropout_rates(unet) and 0.1 in _dropout_rates(unet)
    assert set(_dropout_rates(gen)) == {0.0}
    x, t, cond = torch.randn(2, 3, 8, 8), torch.full((2,), 500), {"class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        assert not torch.equal(critic.fake(x, t, cond), critic.fake(x, t, cond))
        assert torch.equal(gen(x, t, cond), gen(x, t, cond))
