"""The recipe schema: shipped recipes validate and round-trip, overrides, one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dmd2.config import GeneratorConfig, RecipeError, T, load_recipe, recipe_to_yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TEACHER = "model.teacher=some-org/some-teacher"
DELETE = object()


def _write(tmp_path: Path, data, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def _base(**changes) -> dict:
    """A minimal valid recipe with dotted-key changes (DELETE removes the key)."""
    recipe = {
        "output_dir": "runs/t",
        "model": {"teacher": "some-org/some-teacher"},
        "train": {"max_steps": 4},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return recipe


# ---------------------------------------------------------------------------------------------
# Shipped recipes


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"sdxl_4step", "sdxl_1step", "sd15_1step", "imagenet64_1step"} <= names
    assert {"tiny_sd15", "tiny_sdxl", "tiny_sd3", "tiny_flux", "tiny_classcond"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_round_trips(path, tmp_path, monkeypatch):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and f"train recipes/{path.name}" in first
    monkeypatch.chdir(tmp_path)  # recipes must not depend on the cwd
    recipe = load_recipe(path, [TEACHER])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(recipe_to_yaml(recipe))
    again = load_recipe(dumped)
    assert again == recipe
    assert recipe_to_yaml(again) == recipe_to_yaml(recipe)
    for field in (recipe.data.prompts, recipe.data.real_images, recipe.train.ds_config):
        assert field is None or Path(field).is_absolute()


def test_paper_numbers_in_recipes():
    sdxl4 = load_recipe(REPO / "recipes/sdxl_4step.yaml")
    assert sdxl4.generator.resolved_timesteps() == [999, 749, 499, 249]
    assert (sdxl4.loss.cfg_scale, sdxl4.optim.generator.lr, sdxl4.train.update_ratio) == (8.0, 5e-7, 5)
    assert (sdxl4.loss.gan.generator_weight, sdxl4.loss.gan.discriminator_weight) == (5e-3, 1e-2)
    assert load_recipe(REPO / "recipes/sdxl_1step.yaml").generator.resolved_timesteps() == [399]
    sd15 = load_recipe(REPO / "recipes/sd15_1step.yaml")
    assert (sd15.loss.cfg_scale, sd15.optim.critic.lr, sd15.train.update_ratio) == (1.75, 1e-5, 10)
    assert not sd15.loss.gan.enabled
    tiny = load_recipe(REPO / "recipes/tiny_sd15.yaml")
    assert tiny.data.prompts == str(REPO / "recipes/data/tiny_prompts.txt")
    assert len(Path(tiny.data.prompts).read_text().split("\n")) >= 16


# ---------------------------------------------------------------------------------------------
# Overrides and paths


def test_overrides_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        REPO / "recipes/tiny_sd15.yaml",
        [
            TEACHER,
            "train.max_steps=7",  # int
            "optim.generator.lr=1e-5",  # YAML 1.1 reads this as a string; we read a float
            "loss.cfg_scale=3",  # int into a float field
            "generator.num_steps=2",
            "generator.timesteps=[999,499]",  # list
            "loss.gan.enabled=false",  # bool
            "data.real_images=null",  # null
            "logging.wandb.name=my run",
            "data.prompts=prompts.jsonl",  # relative to the cwd on the command line
        ],
    )
    assert recipe.train.max_steps == 7
    assert recipe.optim.generator.lr == 1e-5 and isinstance(recipe.optim.generator.lr, float)
    assert recipe.loss.cfg_scale == 3.0
    assert recipe.generator.resolved_timesteps() == [999, 499]
    assert recipe.loss.gan.enabled is False
    assert recipe.data.real_images is None
    assert recipe.logging.wandb.name == "my run"
    assert recipe.data.prompts == str(tmp_path / "prompts.jsonl")
    assert recipe.model.teacher == "some-org/some-teacher"


def test_override_creates_sections(tmp_path):
    path = _write(tmp_path, _base())
    recipe = load_recipe(path, ["logging.wandb.mode=offline", "model.lora.enabled=true"])
    assert recipe.logging.wandb.mode == "offline" and recipe.model.lora.enabled


def test_paths(tmp_path, monkeypatch):
    (tmp_path / "cfg" / "teacher").mkdir(parents=True)
    path = _write(
        tmp_path / "cfg",
        _base(
            model__teacher="teacher", data__prompts="p.txt", train__ds_config="../ds.json", output_dir="out"
        ),
    )
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(path)
    assert recipe.model.teacher == str(tmp_path / "cfg" / "teacher")
    assert recipe.data.prompts == str(tmp_path / "cfg" / "p.txt")
    assert recipe.train.ds_config == str(tmp_path / "ds.json")
    assert recipe.output_dir == "out"
    # A hub id stays as written; an existing folder given on the command line becomes absolute.
    assert load_recipe(path, ["model.teacher=org/model"]).model.teacher == "org/model"
    assert load_recipe(path, ["model.teacher=cfg/teacher"]).model.teacher == str(tmp_path / "cfg" / "teacher")


def test_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, _base()))
    assert recipe.train.ds_config == str(REPO / "dmd2" / "ds_configs" / "zero3.json")
    assert recipe.optim.generator.betas == (0.9, 0.999)
    assert recipe.generator.resolved_timesteps() == [999]
    assert "conv_shortcut" in recipe.model.lora.target_modules


def test_allowed_combinations(tmp_path):
    ok = _base(
        generator__num_steps=2,
        generator__backward_simulation=False,
        data__real_images="imgs",
        train__checkpoint_every=1000,
    )
    recipe = load_recipe(_write(tmp_path, ok))
    assert recipe.generator.resolved_timesteps() == [999, 499]
    # An empty section (all children commented out) is an empty mapping.
    assert load_recipe(
        _write(tmp_path, "output_dir: x\nmodel: {teacher: t}\ntrain: {max_steps: 1}\nlogging:\n")
    )


# ---------------------------------------------------------------------------------------------
# resolved_timesteps


@pytest.mark.parametrize("steps,expected", [(4, [999, 749, 499, 249]), (2, [999, 499]), (3, [999, 666, 333])])
def test_default_timesteps(steps, expected):
    assert GeneratorConfig(num_steps=steps).resolved_timesteps() == expected


def test_one_step_uses_conditioning_timestep():
    assert GeneratorConfig(conditioning_timestep=399).resolved_timesteps() == [399]


def test_default_timesteps_valid_for_every_step_count():
    for steps in range(2, T + 1):
        ts = GeneratorConfig(num_steps=steps).resolved_timesteps()
        assert len(ts) == steps and ts[0] == T - 1 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
        GeneratorConfig(num_steps=steps, timesteps=ts)


# ---------------------------------------------------------------------------------------------
# Bad recipes: one line naming the file and the field

BAD = {
    "unknown_key": (_base(train__max_step=3, train__max_steps=DELETE), [], ["train.max_step", "'max_steps'"]),
    "unknown_section": (_base(trian={"seed": 1}), [], ["trian", "unknown key", "'train'"]),
    "wrong_type_int": (_base(train__max_steps="ten"), [], ["train.max_steps", "'ten'"]),
    "bool_for_int": (_base(train__batch_size=True), [], ["train.batch_size"]),
    "float_for_int": (_base(train__seed=1.5), [], ["train.seed"]),
    "string_for_float": (_base(loss__cfg_scale="high"), [], ["loss.cfg_scale"]),
    "max_steps_zero": (_base(train__max_steps=0), [], ["train.max_steps", ">= 1"]),
    "zero_stage": (_base(train__zero_stage=4), [], ["train.zero_stage", "<= 3"]),
    "lr_zero": (_base(optim={"generator": {"lr": 0}}), [], ["optim.generator.lr", "> 0"]),
    "lr_nan": (_base(optim={"critic": {"lr": float("nan")}}), [], ["optim.critic.lr", "finite"]),
    "beta_one": (_base(optim={"critic": {"betas": [0.9, 1.0]}}), [], ["optim.critic.betas"]),
    "betas_length": (_base(optim={"critic": {"betas": [0.9]}}), [], ["optim.critic.betas"]),
    "negative_cfg": (_base(loss__cfg_scale=-1), [], ["loss.cfg_scale"]),
    "frac_order": (_base(loss__min_step_frac=0.5, loss__max_step_frac=0.5), [], ["loss.min_step_frac"]),
    "frac_range": (_base(loss__max_step_frac=1.5), [], ["loss.max_step_frac"]),
    "timesteps_ascending": (
        _base(generator={"num_steps": 4, "timesteps": [249, 499, 749, 999]}),
        [],
        ["generator.timesteps", "descending"],
    ),
    "timestep_out_of_range": (
        _base(generator={"num_steps": 2, "timesteps": [1000, 499]}),
        [],
        ["generator.timesteps"],
    ),
    "timesteps_length": (
        _base(generator={"num_steps": 4, "timesteps": [999, 499]}),
        [],
        ["generator.timesteps", "num_steps=4"],
    ),
    "timesteps_one_step": (
        _base(generator={"timesteps": [999]}),
        [],
        ["generator.timesteps", "generator.conditioning_timestep"],
    ),
    "conditioning_timestep": (
        _base(generator={"conditioning_timestep": T}),
        [],
        ["generator.conditioning_timestep"],
    ),
    "num_steps_zero": (_base(generator={"num_steps": 0}), [], ["generator.num_steps"]),
    "gan_without_real": (
        _base(loss={"gan": {"enabled": True}}),
        [],
        ["loss.gan.enabled", "data.real_images"],
    ),
    "multistep_without_backsim": (
        _base(generator={"num_steps": 4, "backward_simulation": False}),
        [],
        ["generator.backward_simulation", "data.real_images"],
    ),
    "family": (_base(model__family="sd2"), [], ["model.family", "'sd2'"]),
    "precision": (_base(train__precision="fp16"), [], ["train.precision"]),
    "wandb_mode": (_base(logging={"wandb": {"mode": "cloud"}}), [], ["logging.wandb.mode"]),
    "lora_rank": (_base(model__lora={"rank": 0}), [], ["model.lora.rank"]),
    "lora_targets_empty": (
        _base(model__lora={"target_modules": []}),
        [],
        ["model.lora.target_modules", "empty"],
    ),
    "lora_dropout": (_base(model__lora={"dropout": 1.0}), [], ["model.lora.dropout"]),
    "fake_score_dropout_shared": (
        _base(model__lora={"fake_score": True}, loss={"fake_score_dropout": "teacher"}),
        [],
        ["loss.fake_score_dropout", "model.lora.fake_score"],
    ),
    "fake_score_dropout_value": (_base(loss={"fake_score_dropout": 0.1}), [], ["loss.fake_score_dropout"]),
    "bad_fraction": (_base(data__max_bad_fraction=2), [], ["data.max_bad_fraction"]),
    "resolution": (_base(train__resolution=4), [], ["train.resolution"]),
    "log_every": (_base(logging={"log_every": 0}), [], ["logging.log_every"]),
    "empty_teacher": (_base(model__teacher=""), [], ["model.teacher"]),
    "missing_max_steps": (_base(train__max_steps=DELETE, train__seed=1), [], ["train.max_steps", "required"]),
    "missing_model": (_base(model=DELETE), [], ["model", "required"]),
    "missing_output_dir": (_base(output_dir=DELETE), [], ["output_dir", "required"]),
    "section_not_mapping": (_base(train=5), [], ["train", "mapping"]),
    "duplicate_key": (
        "output_dir: x\nmodel: {teacher: t}\ntrain:\n  max_steps: 1\n  max_steps: 2\n",
        [],
        [":5:", "duplicate key 'max_steps'"],
    ),
    "broken_yaml": ("output_dir: x\nmodel: [teacher\n", [], [":3:1:", "invalid YAML"]),
    "top_level_list": ("- output_dir: x\n", [], ["top level", "mapping"]),
    "top_level_scalar": ("just a string\n", [], ["top level", "mapping"]),
    "malformed_override": (_base(), ["train.max_steps"], ["override 'train.max_steps'", "key.path=value"]),
    "override_bad_key": (_base(), ["train..seed=1"], ["override 'train..seed=1'"]),
    "override_bad_yaml": (_base(), ["generator.timesteps=[999,"], ["generator.timesteps", "invalid YAML"]),
    "override_unknown_key": (
        _base(),
        ["train.max_step=3"],
        ["train.max_step", "'max_steps'", "command line"],
    ),
    "override_through_scalar": (_base(), ["train.max_steps.x=1"], ["train.max_steps", "not a mapping"]),
    "override_range": (_base(), ["train.update_ratio=0"], ["train.update_ratio", "command line"]),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipe_is_one_line(case, tmp_path):
    data, overrides, fragments = BAD[case]
    path = _write(tmp_path, data, name=f"{case}.yaml")
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    for fragment in fragments:
        assert fragment in message, message


def test_several_errors_are_counted(tmp_path):
    path = _write(tmp_path, _base(train__seed=-1, train__keep_last=0))
    with pytest.raises(RecipeError, match=r"\(and 1 more\)$"):
        load_recipe(path)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


# ---------------------------------------------------------------------------------------------


def test_config_does_not_import_torch():
    code = "import sys, dmd2.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
