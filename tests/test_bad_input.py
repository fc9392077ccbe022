"""Bad input: a corpus generated from the schema and the shipped recipes, each rejected with one
line naming the file and the field; bad paths through the CLI with exit status 2, no traceback,
nothing written."""

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from helpers import REPO, cli_error, run_cli
from pydantic import BaseModel

from dmd2.config import Recipe, RecipeError, load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
BASE = REPO / "recipes" / "tiny_sd15.yaml"


def _leaves(model: type[BaseModel], prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            yield from _leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _bounds(field):
    out = {}
    for m in field.metadata:
        for k in ("ge", "gt", "le", "lt"):
            if getattr(m, k, None) is not None:
                out[k] = getattr(m, k)
    return out


def _bad_values(path: str, field) -> list[tuple[str, object]]:
    """Values that must be rejected for this field, derived from its type and constraints."""
    ann = field.annotation
    args = set(typing.get_args(ann)) | {ann}
    text = repr(ann)
    cases = []
    if "Literal" in text:
        cases.append(("not one of the choices", "no-such-choice"))
    if "int" in text or "float" in text:
        cases.append(("wrong type", "fast"))
        b = _bounds(field)
        if "ge" in b:
            cases.append(("below minimum", b["ge"] - 1))
        if "gt" in b:
            cases.append(("not above minimum", b["gt"]))
        if "le" in b:
            cases.append(("above maximum", b["le"] + 1))
        if "lt" in b:
            cases.append(("not below maximum", b["lt"]))
    elif "bool" in text:
        cases.append(("wrong type", "perhaps"))
    elif str in args or "str" in text:
        cases.append(("wrong type", {"a": 1}))
    if "list" in text or "tuple" in text:
        cases.append(("wrong type", 7))
    return cases


def _corpus():
    cases = []
    for path, field in _leaves(Recipe):
        for why, value in _bad_values(path, field):
            cases.append(pytest.param(BASE, path, value, id=f"{path}-{why}"))
    # every shipped recipe: a typo of one of its own keys, and a value out of range
    for recipe in RECIPES:
        cases.append(pytest.param(recipe, "train.max_step", 3, id=f"{recipe.stem}-typo"))
        cases.append(pytest.param(recipe, "train.batch_size", 0, id=f"{recipe.stem}-range"))
        cases.append(pytest.param(recipe, "generator.timesteps", [249, 999], id=f"{recipe.stem}-ascending"))
    return cases


CORPUS = _corpus()


def test_corpus_is_large():
    assert len(CORPUS) >= 50


@pytest.mark.parametrize(("recipe", "key", "value"), CORPUS)
def test_bad_value_is_rejected_naming_the_field(recipe, key, value):
    import yaml

    override = f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, ["model.teacher=x/y", override])
    msg = str(e.value)
    assert "\n" not in msg
    assert recipe.name in msg
    named = key.split(".")[0] if key == "generator.timesteps" and recipe.stem != "tiny_sdxl" else key
    assert named in msg or key.rsplit(".", 1)[0] in msg, msg


def _cli_fails(*args, run: Path | None = None):
    """In-process (a subprocess per case cost ~7 s of start-up): exit status 2, one line, and a
    rejected run writes no folder. The real process's exit path is tested in test_first_hour.py."""
    line = cli_error(*(REPO / a if str(a).startswith("recipes/") else a for a in args))
    if run is not None:
        assert not run.exists(), "a rejected run wrote its folder"
    return line


def test_recipe_rejected_without_importing_torch():
    """Recipe errors come before any heavy import (a bad recipe is refused in well under a second)."""
    code = ("import sys; from typer.testing import CliRunner; from dmd2.cli import app; "
            "r = CliRunner().invoke(app, ['train', 'recipes/tiny_sd15.yaml', 'train.max_steps=0']); "
            "print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert out == ["2", "False"]


def test_broken_and_duplicate_yaml(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("output_dir: x\nmodel: {teacher: [\n")
    assert "broken.yaml" in _cli_fails("train", broken)
    dup = tmp_path / "dup.yaml"
    dup.write_text("output_dir: x\nmodel: {teacher: t}\ntrain:\n  max_steps: 2\n  max_steps: 3\n")
    assert "duplicate key 'max_steps'" in _cli_fails("train", dup)


@pytest.fixture
def sd15(tiny_teacher):
    return tiny_teacher("sd15")


def test_teacher_of_the_wrong_kind(sd15, tmp_path):
    msg = _cli_fails("train", "recipes/tiny_classcond.yaml", f"model.teacher={sd15}", f"output_dir={tmp_path / 'r'}",
                     run=tmp_path / "r")
    assert "model.teacher" in msg and "classcond" in msg


def test_missing_and_empty_prompt_files(sd15, tmp_path):
    run = tmp_path / "r"
    msg = _cli_fails("train", "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"output_dir={run}",
                     f"data.prompts={tmp_path / 'nope.txt'}", run=run)
    assert "data.prompts" in msg and "nope.txt" in msg
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    msg = _cli_fails("train", "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"output_dir={run}",
                     f"data.prompts={empty}", run=run)
    assert "data.prompts" in msg and "no prompts" in msg


def test_image_folder_of_bad_files(sd15, tmp_path):
    """Corrupt, empty, wrong-mode and non-image files: too many of them stop the run before it writes."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "empty.png").write_bytes(b"")
    Image.fromarray(np.full((8, 8), 300, dtype=np.uint16)).save(folder / "wrongmode.png")  # 16-bit
    (folder / "notes.png").write_text("not an image")
    (folder / "captions.jsonl").write_text("\n".join(
        f'{{"file_name": "{n}", "text": "x"}}' for n in ("corrupt.png", "empty.png", "wrongmode.png", "notes.png")))
    run = tmp_path / "r"
    msg = _cli_fails("train", "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"output_dir={run}",
                     f"data.real_images={folder}", run=run)
    assert "data.real_images" in msg and "4 of 4" in msg and "unreadable" in msg


def test_resume_with_a_different_teacher_or_recipe(sd15, tiny_teacher, tmp_path):
    run = tmp_path / "r"
    ok = run_cli("train", "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"output_dir={run}", "train.max_steps=1")
    assert ok.returncode == 0, ok.stderr[-2000:]
    before = (run / "recipe.yaml").read_text()
    other = tiny_teacher("sd15", seed=1)
    msg = _cli_fails("train", "recipes/tiny_sd15.yaml", f"model.teacher={other}", f"output_dir={run}",
                     "train.max_steps=2")
    assert "model.teacher" in msg and "recipe.yaml" in msg
    msg = _cli_fails("train", "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"output_dir={run}",
                     "train.max_steps=2", "optim.generator.lr=0.1")
    assert "optim.generator.lr" in msg
    assert (run / "recipe.yaml").read_text() == before  # nothing overwritten
    # a checkpoint of this run named by train.resume_from from a new folder: the engines must be shaped alike
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    common = ("train", REPO / "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"train.resume_from={ckpt}")
    msg = cli_error(*common, f"output_dir={tmp_path / 'nogan'}", "loss.gan.enabled=false")
    assert f"{ckpt} was trained with loss.gan.enabled=True, this recipe has False" in msg and "generator_init" in msg
    msg = cli_error(*common, f"output_dir={tmp_path / 'lora'}", "model.lora.enabled=true")
    assert "model.lora.enabled=False" in msg
    msg = cli_error("train", REPO / "recipes/tiny_sd15.yaml", f"model.teacher={sd15}", f"train.resume_from={run}",
                    f"output_dir={tmp_path / 'x'}")
    assert "is a run folder; name one of its checkpoints" in msg and str(ckpt) in msg
    assert not (tmp_path / "nogan").exists() and not (tmp_path / "lora").exists()
