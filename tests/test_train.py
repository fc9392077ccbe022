"""`dmd2 train` end to end through the real CLI: each family under ZeRO-3, 2 ranks through the
deepspeed launcher, multi-step backward simulation, dry-runs of every shipped recipe."""

import json

import pytest
import torch
from helpers import REPO, check_run, metrics, run_cli

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.slow  # 20 s; under 15 minutes (wandb's step axis is also in test_eval_all.py)
def test_train_logs_previews_and_wandb_offline(tmp_path, tiny_teacher):
    """Preview grids every N steps and wandb in offline mode (no network needed)."""
    teacher = tiny_teacher("sd15")
    run = tmp_path / "run"
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={teacher}", "train.max_steps=2",
                  f"output_dir={run}", "logging.preview_every=2", "logging.preview_images=4",
                  "logging.wandb.mode=offline", WANDB_MODE="offline")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    from PIL import Image

    grid = Image.open(run / "previews" / "step_00000002.png")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2)  # 2 x 2 grid of 32 px images, 2 px gaps
    assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run written"
    assert "step 2/2" in res.stdout


def test_train_edm_teacher_multistep(tmp_path, tiny_teacher):
    """EDM parameterisation with 2-step backward simulation (k = 1 is drawn within 3 steps)."""
    teacher = tiny_teacher("classcond-edm")
    run = tmp_path / "run"
    res = run_cli("train", "recipes/tiny_classcond.yaml", f"model.teacher={teacher}", "train.max_steps=3",
                  "generator.num_steps=2", f"output_dir={run}", "train.update_ratio=1", "train.seed=1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 3, teacher)
    assert {r["k"] for r in metrics(run)} == {0, 1}


def test_train_two_ranks_deepspeed_launcher(tmp_path, tiny_teacher):
    """SDXL-style, 2-step backward simulation, ZeRO-3 across 2 ranks (gloo) via the real launcher."""
    teacher = tiny_teacher("sdxl")
    run = tmp_path / "run"
    res = run_cli("train", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", "train.max_steps=3",
                  f"output_dir={run}", "train.seed=1", ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    check_run(run, 3, teacher)
    assert {r["k"] for r in metrics(run)} == {0, 1}
    assert json.loads((run / "checkpoints/step_00000003/state.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_dry_run(recipe):
    res = run_cli("train", str(recipe), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "max_steps" in res.stdout and "teacher" in res.stdout
    assert "torch" not in res.stderr


def test_bad_recipe_is_one_line_exit_2(tmp_path):
    res = run_cli("train", "recipes/tiny_sd15.yaml", "train.max_step=3")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_step" in lines[0] and "max_steps" in lines[0], res.stderr


def test_missing_teacher_is_one_line_exit_2(tmp_path):
    res = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={tmp_path}/nope", f"output_dir={tmp_path}/run")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.teacher" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from dmd2.config import OptimizerConfig
    from dmd2.step import lr_factor

    const = lr_factor(OptimizerConfig(warmup_steps=4), 100)
    assert [const(s) for s in (0, 1, 3, 50, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cos = lr_factor(OptimizerConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), 104)
    assert cos(0) == 0.25 and cos(4) == pytest.approx(1.0)
    assert cos(54) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert cos(104) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    values = [cos(s) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_a_cosine_run_cannot_be_extended(tmp_path):
    """Raising train.max_steps is allowed on a constant schedule only: a cosine schedule's past
    learning rates depend on it."""
    import yaml

    from dmd2.config import load_recipe
    from dmd2.errors import UserError
    from dmd2.train import check_resume_compatible

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 10}))
    (ckpt / "COMMITTED").write_text("")
    base = ["model.teacher=/x", f"output_dir={tmp_path / 'run'}", "train.max_steps=10"]
    recipe = load_recipe(REPO / "recipes/tiny_classcond.yaml", base + ["optim.generator.schedule=cosine"])
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    check_resume_compatible(tmp_path / "run", recipe)  # the same recipe resumes
    longer = load_recipe(REPO / "recipes/tiny_classcond.yaml",
                         base + ["optim.generator.schedule=cosine", "train.max_steps=20"])
    with pytest.raises(UserError, match="optim.generator.schedule is cosine"):
        check_resume_compatible(tmp_path / "run", longer)
    constant = load_recipe(REPO / "recipes/tiny_classcond.yaml", base)
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump(constant.model_dump(mode="json")))
    check_resume_compatible(tmp_path / "run", load_recipe(REPO / "recipes/tiny_classcond.yaml",
                                                          base + ["train.max_steps=20"]))


# ZeRO-1 (the digits recipes' stage) is marked slow to keep the default suite under 15 minutes
@pytest.mark.parametrize("stage", [pytest.param(1, marks=pytest.mark.slow), 3])
def test_generator_ema_is_the_average_of_its_updates_and_resumes(tmp_path, tiny_teacher, stage):
    """train.ema_decay: with one generator update per step, the EMA saved at step 3 is
    d * EMA(2) + (1 - d) * W(3) with the warm-up's d = min(0.75, 3/12), also when step 3 runs in a
    resumed process (the EMA shards and their update count load); sample/export read it
    (models.student.load_student)."""
    from dmd2.checkpoint import committed, consolidated_generator
    from dmd2.models.student import load_student

    teacher, run = tiny_teacher("classcond"), tmp_path / "run"
    args = ["train", "recipes/tiny_classcond.yaml", f"model.teacher={teacher}", f"output_dir={run}",
            "train.update_ratio=1", "train.checkpoint_every=1", "train.keep_last=5", "train.ema_decay=0.75",
            f"train.zero_stage={stage}"]
    for steps in (2, 3):  # the second command resumes at step 2
        res = run_cli(*args, f"train.max_steps={steps}")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ck = {int(c.name.split("_")[1]): c for c in committed(run)}
    e2, e3 = consolidated_generator(ck[2], ema=True), consolidated_generator(ck[3], ema=True)
    w3 = consolidated_generator(ck[3])
    assert set(e3) == set(w3)
    moved = [k for k in w3 if not torch.equal(e3[k], w3[k])]
    assert moved, "the EMA equals the weights"
    for k in w3:
        torch.testing.assert_close(e3[k], 0.25 * e2[k] + 0.75 * w3[k], rtol=1e-5, atol=1e-6)
    unet = load_student(run).parts.unet
    got = unet.state_dict()
    assert all(torch.equal(got[k], e3[k]) for k in moved)
