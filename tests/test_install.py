"""The package stands alone: `pip install .` (not editable) into a fresh venv, then `dmd2 train` from
another folder, with the DeepSpeed template the wheel ships. Slow (a fresh torch install): run it
with `make test-install`. And `make install`'s constraints.txt pins what pyproject declares, and
is what this venv holds."""

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, requires, version

import pytest
from helpers import REPO, cli_env
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TORCH = {"torch", "torchvision"}  # pinned by the Makefile's TORCH, the user's CUDA build otherwise


def _pins() -> dict[str, str]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in reqs), \
        "constraints.txt: one name==version per line"
    return {canonicalize_name(r.name): next(iter(r.specifier)).version for r in reqs}


def _declared() -> list[Requirement]:
    """What the installed dmd2 declares (pyproject's dependencies; make install reinstalls when
    pyproject changes) for its dev extra, with the extras that names (dmd2[serve])."""
    out, todo, seen = [], ["dev"], set()
    for text in requires("dmd2"):
        r = Requirement(text)
        if r.marker is None:
            out.append(r)
    while todo:
        extra = todo.pop()
        seen.add(extra)
        for text in requires("dmd2"):
            r = Requirement(text)
            if r.marker is None or not r.marker.evaluate({"extra": extra}):
                continue
            if r.name == "dmd2":
                todo += sorted(r.extras - seen)
            else:
                out.append(r)
    return out


def test_constraints_pin_every_declared_dependency_within_its_range():
    pins = _pins()
    missing = [r.name for r in _declared() if canonicalize_name(r.name) not in pins | dict.fromkeys(TORCH, "")]
    assert not missing, f"constraints.txt does not pin {missing}: run scripts/constraints.py after make install"
    outside = [f"{r.name}=={pins[canonicalize_name(r.name)]} not in {r.specifier}" for r in _declared()
               if r.name not in TORCH and not r.specifier.contains(pins[canonicalize_name(r.name)])]
    assert not outside, outside
    assert not TORCH & set(pins), "torch and torchvision are the Makefile's TORCH, not constraints.txt's"


def test_the_venv_holds_the_pinned_versions():
    """make install installs through constraints.txt; a different version here means the venv was
    installed another way, or the pins are stale (regenerate them with scripts/constraints.py
    once the suite passes on the new versions)."""
    held = {}
    for name, pinned in _pins().items():
        try:
            held[name] = (version(name), pinned)
        except PackageNotFoundError:
            continue
    wrong = {n: f"{v} installed, {p} pinned" for n, (v, p) in held.items() if v != p}
    assert not wrong, wrong
    assert len(held) > 50  # the pins are this venv's packages, not a list of names it lacks


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
