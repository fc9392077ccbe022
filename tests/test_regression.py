"""`dmd2 ode-pairs` and the regression stage on a tiny SDXL-style teacher: pairs that survive a kill
and do not depend on the number of ranks, a regression run that lowers its loss and is a run like
any other (sample, generator_init), and one-line errors."""

import json

import pytest
import torch
from helpers import cli_error, metrics, run_cli

PAIRS = ("--num-pairs", "6", "--shard-size", "2", "--steps", "3", "--batch-size", "2")
ONE_STEP = ("generator.num_steps=1", "generator.timesteps=null", "generator.conditioning_timestep=399")


def _shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("pairs_*.safetensors"))}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tiny_teacher):
    teacher = tiny_teacher("sdxl")
    out = tmp_path_factory.mktemp("pairs") / "one_rank"
    res = run_cli("ode-pairs", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *PAIRS, "--out", out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return teacher, out


def test_pairs_hold_the_teachers_ode_output_for_their_noise(pairs):
    """Pair i: the seeded noise, the teacher's deterministic CFG sample from it, its prompt's embeddings."""
    from safetensors.torch import load_file

    from dmd2.config import load_recipe
    from dmd2.generate import teacher_timesteps
    from dmd2.models import load_teacher
    from dmd2.models.conditioning import Conditioner
    from dmd2.models.denoiser import Denoiser
    from dmd2.models.roles import guided_x0
    from dmd2.pairs import Pairs, pair_seed
    from dmd2.sampling import Noise, sample

    teacher_dir, out = pairs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3 and len(manifest["prompts"]) == 6
    shard = load_file(str(out / "pairs_00001.safetensors"))
    assert shard["index"].tolist() == [2, 3]
    assert set(shard) >= {"noise", "target", "cond.encoder_hidden_states", "cond.text_embeds", "cond.time_ids"}
    recipe = load_recipe("recipes/tiny_sdxl.yaml", [f"model.teacher={teacher_dir}"])
    t = load_teacher(str(teacher_dir))
    cond = Conditioner(t, 32)
    c = cond.encode_prompts(manifest["prompts"][2:4])
    seeds = [pair_seed(0, 2), pair_seed(0, 3)]
    den = Denoiser(t.unet.eval(), t.schedule)
    u = cond.uncond(2)
    x0 = sample(lambda x, tt, cc: guided_x0(den, x, tt, cc, u, recipe.loss.cfg_scale), t.schedule, c,
                (2, *manifest["settings"]["shape"]), teacher_timesteps(3), Noise.per_sample(seeds), deterministic=True)
    torch.testing.assert_close(shard["target"], x0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(shard["noise"], Noise.per_sample(seeds)((2, *manifest["settings"]["shape"])))
    torch.testing.assert_close(shard["cond.encoder_hidden_states"], c["encoder_hidden_states"])
    rows = Pairs(out).rows([3, 0])
    torch.testing.assert_close(rows["target"][0], shard["target"][1])


@pytest.mark.slow  # 27 s; keeps the default suite under 15 minutes (make test-all runs it)
def test_pairs_survive_a_kill_and_do_not_depend_on_the_ranks(tmp_path, pairs):
    teacher, reference = pairs
    killed = tmp_path / "killed"
    res = run_cli("ode-pairs", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *PAIRS, "--out", killed,
                  fault="kill:pairs_after_shard@1")
    assert res.returncode != 0
    assert (killed / "pairs_00001.safetensors").is_file() and not (killed / "pairs_00001.json").exists()
    kept = (killed / "pairs_00000.safetensors").stat().st_mtime_ns
    res = run_cli("ode-pairs", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *PAIRS, "--out", killed)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (killed / "pairs_00000.safetensors").stat().st_mtime_ns == kept  # verified and kept, not redrawn
    assert _shards(killed) == _shards(reference)

    two = tmp_path / "two_ranks"
    res = run_cli("ode-pairs", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *PAIRS, "--out", two, ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert _shards(two) == _shards(reference)

    # other settings into the same folder are refused; so is a folder of something else
    assert "teacher_steps=3" in cli_error("ode-pairs", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}",
                                          *PAIRS[:-4], "--steps", "4", "--batch-size", "2", "--out", two)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes(b"")
    assert "not empty" in cli_error("ode-pairs", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *PAIRS,
                                    "--out", tmp_path / "other")


def _feature_net(path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

        def forward(self, x):
            return self.conv(x / 255.0).mean(dim=(2, 3))

    torch.jit.script(Net()).save(str(path))
    return path


@pytest.mark.slow  # 35-45 s: keeps the default suite under 15 minutes (make test-all runs it)
def test_regression_stage_lowers_its_loss_and_is_a_run_like_any_other(tmp_path, pairs):
    teacher, folder = pairs
    run = tmp_path / "reg"
    common = ("recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *ONE_STEP, f"regression.pairs={folder}",
              "optim.generator.lr=1e-2", "train.batch_size=3", "logging.log_every=5")
    res = run_cli("train", *common, "regression.loss=mse", "train.max_steps=20", "train.checkpoint_every=10",
                  f"output_dir={run}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    losses = [r["loss_regression"] for r in metrics(run)]
    assert len(losses) == 20 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    assert "critic" not in res.stdout.split("step 20/20")[1].split("\n")[0]
    assert not (run / "checkpoints" / "step_00000020" / "critic").exists()

    # sample from it, and warm-start a DMD2 run's generator from it
    res = run_cli("sample", run, "--prompt", "a red square", "--out", tmp_path / "samples")
    assert res.returncode == 0, res.stderr[-2000:]
    warm = tmp_path / "warm"
    res = run_cli("train", "recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *ONE_STEP, "train.max_steps=1",
                  f"model.generator_init={run}", f"output_dir={warm}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"warm start: generator from {run} at step 20" in res.stdout

    # the offline image-space loss: a TorchScript feature network on the VAE's decodes
    feats = tmp_path / "reg_features"
    res = run_cli("train", *common, "regression.loss=features",
                  f"regression.feature_extractor={_feature_net(tmp_path / 'f.pt')}", "train.max_steps=2",
                  f"output_dir={feats}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert all(r["loss_regression"] > 0 for r in metrics(feats))


def test_regression_input_errors_are_one_line(tmp_path, pairs):
    teacher, folder = pairs
    base = ("recipes/tiny_sdxl.yaml", f"model.teacher={teacher}", *ONE_STEP, "train.max_steps=1")
    cases = [
        ((f"regression.pairs={tmp_path}", "regression.loss=mse"), "holds no manifest.json"),
        ((f"regression.pairs={folder}", "regression.loss=features"), "regression.feature_extractor"),
        ((f"regression.pairs={folder}", "generator.num_steps=2", "generator.conditioning_timestep=999"),
         "fits a 1-step generator"),
    ]
    try:
        import lpips  # noqa: F401
    except ImportError:
        cases.append(((f"regression.pairs={folder}", "regression.loss=lpips"), "dmd2[lpips]"))
    for extra, expected in cases:  # in-process: the train command's checks, before any engine starts
        assert expected in cli_error("train", *base, *extra, f"output_dir={tmp_path / 'run'}")
    assert not (tmp_path / "run").exists()


def test_resumed_regression_run_counts_every_step_as_a_generator_update(tmp_path):
    """The console's "gen updates" after a resume at step 10: every step in the regression stage,
    every update_ratio-th step in DMD2."""
    from dmd2.config import LoggingConfig
    from dmd2.logs import RunLogger

    recipe = {"train": {"update_ratio": 5}, "regression": None}
    assert RunLogger(tmp_path, LoggingConfig(), rank=1, max_steps=20, start_step=10, recipe=recipe).gen_updates == 2
    recipe["regression"] = {"pairs": "pairs", "loss": "mse"}
    assert RunLogger(tmp_path, LoggingConfig(), rank=1, max_steps=20, start_step=10, recipe=recipe).gen_updates == 10
