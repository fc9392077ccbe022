"""The ``dmd2`` command line. Each command parses, validates and calls one library function;
heavy imports happen inside the commands so ``--help`` and recipe errors are instant."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Distill a diffusion model into a 1-4 step generator with DMD2 (DeepSpeed ZeRO-3).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    local_rank: int = typer.Option(-1, "--local_rank", "--local-rank", hidden=True,
                                   help="Injected by the deepspeed launcher; the rank is read from LOCAL_RANK."),
) -> None:
    """dmd2: DMD2 distillation for SD1.5, SDXL and class-conditional diffusion models."""


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/sdxl_4step.yaml."),
    overrides: list[str] = typer.Argument(None, help="key.path=value overrides, applied before validation "
                                          "(e.g. model.teacher=PATH train.max_steps=100)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit without loading models."),
    local_rank: int = typer.Option(-1, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Train (or resume) a DMD2 generator from RECIPE.

    Re-running the same command on the same output_dir resumes from its newest checkpoint.
    For N ranks: deepspeed --num_gpus N --module dmd2 train RECIPE \\[overrides]
    (on CPU, set DS_ACCELERATOR=cpu).
    """
    from .config import RecipeError, load_recipe, recipe_to_yaml

    try:
        cfg = load_recipe(recipe, overrides or [])
    except RecipeError as e:
        _fail(str(e))
    if dry_run:
        typer.echo(recipe_to_yaml(cfg), nl=False)
        return
    import warnings

    from .errors import UserError
    from .train import train as run_training

    # DeepSpeed's ZeRO-3 collectives use torch APIs deprecated in torch 2.14; one warning per call
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    try:
        run_training(cfg)
    except UserError as e:
        _fail(str(e))


@app.command("make-tiny-teacher")
def make_tiny_teacher(
    family: str = typer.Argument(..., help="sd15, sdxl, classcond, classcond-v or classcond-edm."),
    out: Path = typer.Argument(..., help="Folder to write the diffusers-format teacher into."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a tiny random teacher (a few MB) to try dmd2 without downloading weights."""
    from . import tiny

    if family not in tiny.FAMILIES:
        _fail(f"family: {family!r} is not one of {', '.join(tiny.FAMILIES)}")
    typer.echo(str(tiny.make_tiny_teacher(family, out, seed=seed)))


def main() -> None:
    app(prog_name="dmd2")


if __name__ == "__main__":
    sys.exit(main())
