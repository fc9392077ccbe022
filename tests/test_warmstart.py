"""Warm starts (`model.generator_init`, `model.critic_init`): the right weights, a fresh run that
trains from them, and one-line refusals of what does not fit."""

import pytest
import torch
from helpers import cli_error, run_cli


@pytest.fixture(scope="module")
def source_run(tmp_path_factory, tiny_teacher):
    """A 2-step tiny SD1.5 run with the GAN on: the run the warm starts read."""
    teacher = tiny_teacher("sd15")
    run = tmp_path_factory.mktemp("warm") / "source"
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={run}", "logging.preview_every=0", "optim.generator.lr=1e-3", "optim.critic.lr=1e-3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return teacher, run


def _inputs(teacher):
    from dmd2.models import load_teacher
    from dmd2.models.conditioning import Conditioner

    t = load_teacher(str(teacher))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t.channels, 4, 4, generator=g)
    cond = Conditioner(t, 32).encode_prompts(["a red square", "a blue circle"])
    return t, x, torch.tensor([999, 999]), cond


def test_generator_init_starts_where_the_source_run_ended(source_run, tmp_path, monkeypatch):
    """The warm generator's first output is the source run's student output, not the teacher's;
    the fake score and GAN head are the source run's trained ones. A full run's or a pipeline
    export's weights are read without loading the source's teacher (a second UNet and encoders)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    import dmd2.models.student as student_mod
    from dmd2 import checkpoint, warmstart
    from dmd2.export import export
    from dmd2.models.roles import build_roles
    from dmd2.models.student import load_student

    teacher_dir, run = source_run
    teacher, x, t, cond = _inputs(teacher_dir)
    export(run, tmp_path / "export", pipeline=True)
    with monkeypatch.context() as m:
        m.setattr(student_mod, "teacher_of", lambda *a: pytest.fail("the source's teacher was loaded"))
        m.setattr(student_mod, "load_teacher", lambda *a: pytest.fail("the source's teacher was loaded"))
        weights = warmstart.generator_weights(str(run))
        exported = warmstart.generator_weights(str(tmp_path / "export"))
    assert "at step 2" in weights[1] and "at step 2" in exported[1]
    reference = load_student(run).parts.unet.state_dict()
    assert set(weights[0]) == set(reference) == set(exported[0])
    assert all(torch.equal(weights[0][k], reference[k]) and torch.equal(exported[0][k], reference[k]) for k in reference)
    gen, critic = build_roles(teacher, gan=True, resolution=32, seed=0, gradient_checkpointing=False,
                              generator_init=weights)
    student = load_student(run)
    with torch.no_grad():
        ours, theirs, cold = gen(x, t, cond), student.denoiser(x, t, cond), critic.teacher(x, t, cond)
    assert torch.equal(ours, theirs)
    assert not torch.allclose(ours, cold)  # the source run moved away from the teacher

    said = warmstart.load_critic(critic, str(run))
    assert "fake score and GAN head" in said and "step 2" in said
    saved = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.latest(run)), tag="critic")
    params = dict(critic.named_parameters())
    for name in ("head.net.0.weight" if "head.net.0.weight" in saved else next(k for k in saved if k.startswith("head.")),
                 next(k for k in saved if k.startswith("fake."))):
        assert torch.equal(params[name], saved[name])
    assert any(not torch.equal(params[k], teacher.unet.state_dict()[k.removeprefix("fake.unet.")])
               for k in saved if k.startswith("fake."))


@pytest.mark.slow  # 26 s; under 15 minutes (the weights: test_generator_init_starts_where_the_source_run_ended)
def test_a_warm_run_trains_and_says_where_it_started(tmp_path, source_run):
    teacher, source = source_run
    run = tmp_path / "warm"
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "train.max_steps=1",
                  f"output_dir={run}", "logging.preview_every=0", f"model.generator_init={source}",
                  f"model.critic_init={source}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"warm start: generator from {source} at step 2" in res.stdout
    assert "warm start: fake score and GAN head from" in res.stdout
    # resuming it reads its own checkpoint, not the sources (gone now)
    import shutil

    shutil.rmtree(source / "checkpoints")
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={run}", "logging.preview_every=0", f"model.generator_init={source}",
                  f"model.critic_init={source}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resumed from" in res.stdout and "warm start" not in res.stdout


def test_another_architecture_is_refused_in_one_line(tmp_path, tiny_teacher):
    from dmd2.errors import UserError
    from dmd2.models import load_teacher
    from dmd2.models.roles import load_generator

    sd15, sdxl = load_teacher(str(tiny_teacher("sd15"))), load_teacher(str(tiny_teacher("sdxl")))
    with pytest.raises(UserError, match=r"^model.generator_init: other: not the teacher's UNet architecture \("):
        load_generator(sd15.unet, sdxl.unet.state_dict(), "other")
    # through the CLI: a folder that is neither a run nor an export, exit 2, one line
    assert "model.generator_init:" in cli_error("train", "recipes/tiny_sd15.yaml", f"model.teacher={tiny_teacher('sd15')}",
                                                "train.max_steps=1", f"output_dir={tmp_path / 'run'}",
                                                f"model.generator_init={tiny_teacher('sdxl')}")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow  # make test-all: two more training runs; the critic_init path itself is in the default suite
def test_sd15_two_stages_stage_two_adds_the_gan(tmp_path, tiny_teacher):
    """The authors' SD1.5 procedure in small: stage 1 without the GAN, stage 2 from its generator and
    fake score with the GAN on (a new head) and a lower LR: what recipes/sd15_1step_stage2.yaml does."""
    teacher = tiny_teacher("sd15")
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={stage1}", "loss.gan.enabled=false", "data.real_images=null", "logging.preview_every=0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={stage2}", f"model.generator_init={stage1}", f"model.critic_init={stage1}",
                  "optim.generator.lr=5e-7", "optim.critic.lr=5e-7", "logging.preview_every=0")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "warm start: fake score (GAN head fresh: the source had none)" in res.stdout
    assert "loss_gan_d" in (stage2 / "metrics.jsonl").read_text()
