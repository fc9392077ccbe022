"""The package stands alone: `pip install .` (not editable) into a fresh venv, then `dmd2 train` from
another folder, with the DeepSpeed template the wheel ships. Slow (a fresh torch install): run it
with `make test-install`."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, cli_env


@pytest.mark.slow
def test_pip_install_then_train_from_another_folder(tmp_path, tiny_teacher):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    torch = os.environ.get("TORCH", "torch==2.14.1 torchvision==0.29.1").split()
    subprocess.run([*pip, *torch], check=True, timeout=1800)
    subprocess.run([*pip, str(REPO)], check=True, timeout=1800)  # a wheel build: no link to the checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    recipe = elsewhere / "tiny.yaml"
    # the recipe's data paths are relative to its folder: point them at the checkout's tiny data
    recipe.write_text((REPO / "recipes" / "tiny_sd15.yaml").read_text().replace(
        "data/tiny_", f"{REPO / 'recipes' / 'data'}/tiny_"))
    res = subprocess.run([str(venv / "bin" / "dmd2"), "train", str(recipe), f"model.teacher={tiny_teacher('sd15')}",
                          "train.max_steps=2", "output_dir=run"], cwd=elsewhere, env=cli_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert (elsewhere / "run" / "checkpoints").is_dir()
    saved = (elsewhere / "run" / "recipe.yaml").read_text()
    ds = next(line for line in saved.splitlines() if "ds_config" in line).split(":", 1)[1].strip()
    assert str(venv) in ds and "site-packages/dmd2/ds_configs/zero3.json" in ds, ds  # the wheel's own template
    assert json.loads(open(ds).read())["zero_optimization"]
