"""The package stands alone: `pip install .` (not editable) into a fresh venv, then `dmd2 train` from
another folder, with the DeepSpeed template the wheel ships. Slow (a fresh torch install): run it
with `make test-install`. And `make install`'s constraints.txt pins what pyproject declares, and
is what this venv holds."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from helpers import REPO, cli_env


def _pins(text: str) -> dict[str, str]:
    return dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))


def test_constraints_are_this_venvs_dependency_closure():
    """constraints.txt (make install's pip -c) is what scripts/constraints.py writes from this venv:
    every dependency of .[dev], transitively, at the version installed here, torch and torchvision
    left to the Makefile's TORCH. A name pyproject gained, a dropped or edited pin, or a venv
    installed another way fails here; regenerate the file once the suite passes on new versions."""
    spec = importlib.util.spec_from_file_location("constraints", REPO / "scripts" / "constraints.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    pinned, held = _pins((REPO / "constraints.txt").read_text()), _pins(script.render())
    assert "deepspeed" in held and "diffusers" in held and not {"torch", "torchvision"} & set(held)
    assert not set(held) - set(pinned), f"constraints.txt does not pin {sorted(set(held) - set(pinned))}"
    wrong = {n: f"{held.get(n, 'not a dependency')} here, {v} pinned" for n, v in pinned.items() if held.get(n) != v}
    assert not wrong, wrong


def test_the_venv_satisfies_every_declared_range():
    """The pinned versions are within what dmd2 and every dependency declare (pip's own check)."""
    res = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


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
