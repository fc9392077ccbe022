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


def _folder_option(path: Path | None, name: str) -> None:
    """A folder to write that is an existing file fails here, before any model loads."""
    if path is not None and path.exists() and not path.is_dir():
        _fail(f"{name} {path}: is a file, not a folder; choose a folder")


QUIET_HELP = "No start-up phase lines or progress bars (errors, warnings and the summary still print)."


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML, e.g. recipes/sdxl_4step.yaml."),
    overrides: list[str] = typer.Argument(None, help="key.path=value overrides, applied before validation "
                                          "(e.g. model.teacher=PATH train.max_steps=100)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit without loading models."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
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
    _folder_option(Path(cfg.output_dir), "output_dir:")
    from . import hub
    from .errors import UserError

    if not cfg.model.teacher.endswith((".safetensors", ".ckpt")):
        try:  # a hub id neither cached nor reachable fails in a second, not after loading torch
            hub.require(cfg.model.teacher, "unet/config.json", what="model.teacher", instead=hub.TEACHER_INSTEAD)
        except UserError as e:
            _fail(str(e))
    import warnings

    from .checkpoint import CheckpointError, DiskFull
    from .logs import set_quiet
    from .train import TrainingStopped
    from .train import train as run_training

    # DeepSpeed's ZeRO-3 collectives use torch APIs deprecated in torch 2.14; one warning per call
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    set_quiet(quiet)
    try:
        run_training(cfg)
    except (UserError, CheckpointError) as e:
        _fail(str(e))
    except (TrainingStopped, DiskFull) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command(context_settings={"allow_extra_args": False})
def prepare(
    recipe: Path = typer.Argument(..., help="The recipe whose teacher, data.prompts and data.real_images to encode."),
    overrides: list[str] = typer.Argument(None, help="key.path=value overrides, the same ones `dmd2 train` will get."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    local_rank: int = typer.Option(-1, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Build the recipe's conditioning cache before training (docs/data.md).

    Prompt and caption embeddings, the unconditional embedding and the real
    images' latents; `dmd2 train` with the same overrides then encodes nothing.

    Re-run it to finish a killed build (finished chunks are verified and kept)
    or to re-verify a complete cache. For N ranks:
    deepspeed --num_gpus N --module dmd2 prepare RECIPE
    """
    from .config import RecipeError, load_recipe

    try:
        cfg = load_recipe(recipe, overrides or [])
    except RecipeError as e:
        _fail(str(e))
    from . import hub
    from .errors import UserError
    from .logs import set_quiet

    set_quiet(quiet)
    try:
        if not cfg.model.teacher.endswith((".safetensors", ".ckpt")):
            hub.require(cfg.model.teacher, "unet/config.json", what="model.teacher", instead=hub.TEACHER_INSTEAD)
        _quiet_loaders()
        from .cache import prepare as run_prepare

        run_prepare(cfg, " ".join([str(recipe), *(overrides or [])]))
    except UserError as e:
        _fail(str(e))


@app.command("ode-pairs", context_settings={"allow_extra_args": False})
def ode_pairs(
    recipe: Path = typer.Argument(..., help="The recipe whose teacher, loss.cfg_scale, data.prompts and train.seed "
                                  "draw the pairs (e.g. recipes/sdxl_1step_regression.yaml)."),
    overrides: list[str] = typer.Argument(None, help="key.path=value overrides (e.g. model.teacher=PATH)."),
    num_pairs: int = typer.Option(..., "--num-pairs", min=1, help="Pairs to draw (the authors: 10k for SDXL)."),
    out: Path = typer.Option(..., "--out", help="Folder for manifest.json and the shards; re-run the same command "
                             "to finish a killed run (finished shards are verified and kept)."),
    steps: int = typer.Option(50, "--steps", min=1, help="Teacher ODE steps per pair (DDIM / Euler, x2 calls with CFG)."),
    shard_size: int = typer.Option(1000, "--shard-size", min=1, help="Pairs per safetensors shard."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Pairs per teacher forward (per rank)."),
    local_rank: int = typer.Option(-1, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Draw noise -> image pairs with the teacher's deterministic sampler, for the regression stage.

    Pair i is the same whatever the number of ranks; under the launcher
    (deepspeed --num_gpus N --module dmd2 ode-pairs ...) each rank draws its shards.
    """
    from .config import RecipeError, load_recipe

    try:
        cfg = load_recipe(recipe, overrides or [])
    except RecipeError as e:
        _fail(str(e))
    _folder_option(out, "--out")
    from .errors import UserError

    try:
        _quiet_loaders()
        from .pairs import draw_pairs

        draw_pairs(cfg, out, num_pairs=num_pairs, steps=steps, shard_size=shard_size, batch_size=batch_size)
    except UserError as e:
        _fail(str(e))


@app.command("make-tiny-teacher")
def make_tiny_teacher(
    family: str = typer.Argument(..., help="sd15, sdxl, sd3, flux (FLUX.1-dev-like: guidance-distilled, dynamic "
                                 "shift), flux-schnell (no guidance input: distilled with CFG), classcond, "
                                 "classcond-v or classcond-edm."),
    out: Path = typer.Argument(..., help="Folder to write the diffusers-format teacher into."),
    seed: int = typer.Option(0, help="Seed of the random weights."),
) -> None:
    """Write a tiny random teacher (a few MB) to try dmd2 without downloading weights."""
    from . import tiny

    if family not in tiny.FAMILIES:
        _fail(f"family: {family!r} is not one of {', '.join(tiny.FAMILIES)}")
    typer.echo(str(tiny.make_tiny_teacher(family, out, seed=seed)))


@app.command("convert-edm")
def convert_edm(
    pkl: Path = typer.Argument(..., help="An NVlabs EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl."),
    out: Path = typer.Argument(..., help="A new (or empty) folder for the teacher: unet/, scheduler/, edm_source.json."),
    key: str = typer.Option("ema", "--key", help="The pickle's entry that holds the network."),
) -> None:
    """Convert an EDM network pickle (EDMPrecond + DhariwalUNet, ADM) into a class-conditional teacher folder.

    Neither EDM's code nor the code the pickle embeds is run. Then train with model.teacher=OUT, e.g.
    dmd2 train recipes/imagenet64_1step.yaml model.teacher=OUT
    """
    if not pkl.is_file():
        _fail(f"{pkl}: no such file (expected an EDM network pickle, e.g. edm-imagenet-64x64-cond-adm.pkl)")
    _folder_option(out, "OUT")
    if out.is_dir() and any(out.iterdir()):  # before torch loads; convert_edm checks again
        _fail(f"{out}: exists and is not empty; choose a new folder for the teacher")
    from .errors import UserError

    try:
        _quiet_loaders()
        from .convert_edm import convert_edm as run_convert

        summary = run_convert(pkl, out, key=key)
    except UserError as e:
        _fail(str(e))
    typer.echo(summary)


def _quiet_loaders() -> None:
    """diffusers/transformers progress bars and advice would bury the command's own output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def _timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        _fail(f"--timesteps {text!r}: expected comma-separated integers, e.g. 999,749,499,249")


SOURCE_HELP = "A run folder (its newest committed checkpoint) or a folder written by dmd2 export."


@app.command()
def sample(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for one PNG per image, images.jsonl and grid.png."),
    prompt: list[str] = typer.Option(None, "--prompt", help="A prompt (repeatable)."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help=".txt (one prompt a line) or .jsonl "
                                      "(a prompt/caption/text key)."),
    label: list[int] = typer.Option(None, "--label", help="A class label (repeatable; class-conditional models)."),
    labels: str = typer.Option(None, "--labels", help="'all': every class in turn (the default for class-conditional models)."),
    steps: int = typer.Option(None, "--steps", help="Steps, 1 to the number trained (an evenly spaced subset of the "
                              "trained timesteps); default: all trained timesteps."),
    timesteps: str = typer.Option(None, "--timesteps", help="Explicit timesteps, strictly descending, e.g. 999,499."),
    seed: int = typer.Option(0, "--seed", help="Image i is drawn from seed + i, whatever the batch size or ranks."),
    num_images: int = typer.Option(None, "--num-images", help="Images in all (conditions cycle); default: one per "
                                   "prompt or label."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass (per rank)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="OUT already holds images: delete them (and "
                                   "images.jsonl, grid.png) and draw the new ones."),
    local_rank: int = typer.Option(-1, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Draw images with a distilled generator: OUT/000000.png ..., images.jsonl, grid.png.

    Under the launcher (deepspeed --num_gpus N --module dmd2 sample ...) each rank draws its share.
    """
    if labels is not None and labels != "all":
        _fail(f"--labels {labels!r}: the only value is 'all' (or pass --label N, repeatable)")
    if labels and label:
        _fail("pass --label N or --labels all, not both")
    _folder_option(out, "--out")
    ts = _timesteps(timesteps)
    from .errors import UserError

    try:
        from .data import load_prompts

        prompts = list(prompt or []) + (load_prompts(prompts_file, "--prompts-file") if prompts_file else [])
        _quiet_loaders()
        from .generate import sample_to_folder

        folder = sample_to_folder(source, out, prompts=prompts, labels=list(label or []), steps=steps, timesteps=ts,
                                  seed=seed, num_images=num_images, batch_size=batch_size, overwrite=overwrite)
    except UserError as e:
        _fail(str(e))
    typer.echo(str(folder))


@app.command("eval")
def eval_(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    fid: bool = typer.Option(False, "--fid", help="FID (clean-fid, 'clean' mode) against --ref-dir or --ref-stats."),
    clip: bool = typer.Option(False, "--clip", help="CLIP score: mean cosine similarity of image and prompt embeddings."),
    prompts_file: Path = typer.Option(None, "--prompts-file", help=".txt or captions .jsonl (e.g. a COCO subset); "
                                      "image i gets prompt i (cycled). Class-conditional models: classes evenly."),
    num_images: int = typer.Option(None, "--num-images", help="Images to generate; default: one per prompt, or one "
                                   "per class."),
    seed: int = typer.Option(0, "--seed", help="Image i is drawn from seed + i (the teacher too)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass (per rank)."),
    steps: int = typer.Option(None, "--steps", help="Generator steps (default: all trained timesteps)."),
    timesteps: str = typer.Option(None, "--timesteps", help="Explicit generator timesteps, e.g. 999,499."),
    ref_dir: Path = typer.Option(None, "--ref-dir", help="Reference images; statistics computed once and cached."),
    ref_stats: Path = typer.Option(None, "--ref-stats", help="Reference statistics .npz (mu, sigma), e.g. a cached one."),
    eval_res: int = typer.Option(None, "--eval-res", min=8, help="Centre-crop and resize every image to this size "
                                 "before FID (paper: 256 for SD1.5, 512 for SDXL)."),
    patch_fid: bool = typer.Option(False, "--patch-fid", help="Also patch FID: central 299x299 crops at native resolution."),
    feature_extractor: Path = typer.Option(None, "--feature-extractor", help="TorchScript module, N x 3 x H x W in "
                                           "[0, 255] -> N x D (default: clean-fid's Inception, downloaded once)."),
    clip_model: str = typer.Option(None, "--clip-model", help="CLIP model: hub id or local folder (transformers)."),
    stats_cache: Path = typer.Option(None, "--stats-cache", help="Where reference statistics are cached "
                                     "(default ~/.cache/dmd2/fid_stats)."),
    images_dir: Path = typer.Option(None, "--images-dir", help="Where generated images are kept (default: beside "
                                    "--out as <name>_images/, else a temporary folder)."),
    teacher: bool = typer.Option(False, "--teacher", help="Also score the teacher, sampled with its own scheduler."),
    teacher_only: bool = typer.Option(False, "--teacher-only", help="Score the teacher alone (implies --teacher): "
                                      "its baseline at --teacher-steps, without drawing the generator."),
    teacher_steps: int = typer.Option(25, "--teacher-steps", min=1, help="Teacher sampling steps (with --teacher)."),
    teacher_cfg: float = typer.Option(None, "--teacher-cfg", help="Teacher CFG scale (default: the recipe's loss.cfg_scale)."),
    out: Path = typer.Option(None, "--out", help="Write the JSON report here (and to the run's wandb, if it logs there)."),
    draw_only: bool = typer.Option(False, "--draw-only", help="Draw the images (same seeds, prompts and timesteps) into "
                                   "--images-dir or beside --out, and score nothing: for metrics of your own."),
    all_checkpoints: bool = typer.Option(False, "--all-checkpoints", help="SOURCE is a run folder: score each of its "
                                         "committed checkpoints once, oldest first -> SOURCE/eval/step_XXXXXXXX.json, "
                                         "a row each in SOURCE/eval/eval.jsonl, the run's wandb against the step; "
                                         "checkpoints already scored are skipped (a re-run resumes). Prints the best."),
    watch: bool = typer.Option(False, "--watch", help="With --all-checkpoints: keep polling for new checkpoints while "
                               "training runs (e.g. on other GPUs) until the one of train.max_steps is scored."),
    poll_s: float = typer.Option(60.0, "--poll-s", min=0.0, help="Seconds between polls with --watch."),
    quiet: bool = typer.Option(False, "--quiet", help=QUIET_HELP),
    local_rank: int = typer.Option(-1, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Measure a generator (and optionally its teacher): FID, patch FID, CLIP score -> a JSON report.

    With --all-checkpoints, every checkpoint of a run (train.keep_last decides which are kept).
    """
    teacher = teacher or teacher_only
    if watch and not all_checkpoints:
        _fail("--watch polls for new checkpoints of a run: pass it with --all-checkpoints")
    if all_checkpoints:
        from .models.student import is_export

        if is_export(source) or not (source / "recipe.yaml").is_file():
            _fail(f"{source}: --all-checkpoints needs a run folder (recipe.yaml + checkpoints/), not an export "
                  "or another folder")
        if out is not None:
            _fail("--all-checkpoints writes its reports to SOURCE/eval/step_XXXXXXXX.json; drop --out")
        if teacher:
            _fail("--all-checkpoints scores the generator's checkpoints; score the teacher once with "
                  "dmd2 eval SOURCE --teacher")
        if draw_only:
            _fail("--all-checkpoints scores each checkpoint; --draw-only draws one: pass one of them")
    if ref_dir is not None and ref_stats is not None:
        _fail("pass --ref-dir or --ref-stats, not both")
    if ref_dir is not None and not ref_dir.is_dir():
        _fail(f"--ref-dir {ref_dir}: no such folder")
    if ref_stats is not None and not ref_stats.is_file():
        _fail(f"--ref-stats {ref_stats}: no such file")
    if feature_extractor is not None and not feature_extractor.is_file():
        _fail(f"--feature-extractor {feature_extractor}: no such file")
    if out is not None and out.is_dir():  # eval's --out is the report file; the report would be lost at the end
        _fail(f"--out {out}: is a folder; --out names the JSON report file to write, e.g. {out / 'report.json'}")
    _folder_option(images_dir, "--images-dir")
    ts = _timesteps(timesteps)
    from .errors import UserError
    from .logs import set_quiet

    set_quiet(quiet)
    try:
        _quiet_loaders()
        from .evaluate import best_row, evaluate, evaluate_all

        kwargs = dict(fid=fid, clip=clip, prompts_file=prompts_file, num_images=num_images, seed=seed,
                      batch_size=batch_size, steps=steps, timesteps=ts, ref=ref_dir or ref_stats, eval_res=eval_res,
                      patch_fid=patch_fid, feature_extractor=feature_extractor, clip_model=clip_model,
                      stats_cache=stats_cache, images_dir=images_dir)
        if all_checkpoints:
            rows = evaluate_all(source, watch=watch, poll_s=poll_s, echo=typer.echo, **kwargs)
        else:
            report = evaluate(source, **kwargs, teacher_steps=teacher_steps if teacher else None,
                              teacher_cfg=teacher_cfg, out=out, student=not teacher_only, draw_only=draw_only)
    except UserError as e:
        _fail(str(e))
    if all_checkpoints:
        best = best_row(rows)
        if best is None:
            _fail(f"{source}: no committed checkpoint to score in {source / 'checkpoints'} (train it first)")
        name, row = best
        step = row["step"]
        typer.echo(f"best of {len(rows)} checkpoints by {name}: step {step}, {name} {row[name]:.6g} "
                   f"({source / 'eval' / f'step_{step:08d}.json'})")
        return
    for m in report["metrics"]:
        typer.echo(f"{m['name']}: {m['value']:.6g}")
    if draw_only:
        typer.echo(f"images: {report['protocol']['images']}")


@app.command()
def export(
    source: Path = typer.Argument(..., help="A run folder (its newest committed checkpoint)."),
    out: Path = typer.Option(..., "--out", help="A new (or empty) folder to write."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers: UNet (SD3, FLUX: transformer) folder (full weights); lora: the LoRA adapter "
                            "of a LoRA run as one .safetensors."),
    pipeline: bool = typer.Option(False, "--pipeline", help="A complete diffusers pipeline folder (SD1.5/SDXL/SD3/FLUX): "
                                  "the teacher's VAE, text encoders, tokenizers and a scheduler that steps as the distilled "
                                  "sampler (LCMScheduler; SD3, FLUX: FlowMatchEuler with stochastic sampling)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    lora_style: str = typer.Option("diffusers", "--lora-style", help="Key names of --format lora: diffusers, or kohya "
                                   "(ComfyUI / A1111)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="LoRA runs: write merged full weights (--format diffusers)."),
) -> None:
    """Export a run's generator for diffusers, ComfyUI or A1111; recipe, step and timesteps go into
    OUT/dmd2.json and the safetensors metadata."""
    _folder_option(out, "--out")
    from .errors import UserError

    try:
        _quiet_loaders()
        from .export import export as run_export

        folder = run_export(source, out, fmt=fmt, pipeline=pipeline, dtype=dtype, lora_style=lora_style,
                            merge_lora=merge_lora)
    except UserError as e:
        _fail(str(e))
    typer.echo(str(folder))


@app.command()
def serve(
    source: Path = typer.Argument(..., help=SOURCE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Loopback by default; 0.0.0.0 lets "
                             "anyone who can reach this machine use the page."),
    port: int = typer.Option(None, "--port", min=1, max=65535, help="Port (default: the first free one from 7860)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16 or bf16 weights for the UNet and VAE; "
                                  "fp32 draws exactly dmd2 sample's images."),
    tiny_vae: str = typer.Option(None, "--tiny-vae", help="An AutoencoderTiny folder or hub id (e.g. "
                                 "madebyollin/taesdxl) the page can decode with instead of the VAE."),
    max_images: int = typer.Option(8, "--max-images", min=1, help="Most images one request may ask for."),
) -> None:
    """Serve a web page that draws images with a distilled generator (loaded once) as you type prompts."""
    if precision not in ("fp32", "fp16", "bf16"):
        _fail(f"--precision {precision!r}: expected fp32, fp16 or bf16")
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        _fail("dmd2 serve needs gradio: pip install 'dmd2[serve]'")
    from .errors import UserError

    try:
        _quiet_loaders()
        from .serve import serve as run_server

        run_server(source, host=host, port=port, precision=precision, tiny_vae=tiny_vae, max_images=max_images)
    except UserError as e:
        _fail(str(e))


def main() -> None:
    app(prog_name="dmd2")


if __name__ == "__main__":
    sys.exit(main())
