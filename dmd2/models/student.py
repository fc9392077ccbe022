"""The one loader of distilled generators: a run folder (its newest committed checkpoint,
consolidated from ZeRO-3) or any ``dmd2 export`` format, as a ``Student`` ready to sample; and the
export record (``dmd2.json``) that ``dmd2 export`` writes and this module reads."""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .. import checkpoint
from ..config import Recipe, RecipeError, load_recipe
from ..errors import UserError
from . import vae
from .conditioning import Conditioner
from .denoiser import Denoiser
from .loader import Teacher, load_teacher

EXPORT_META = "dmd2.json"  # what makes a folder a dmd2 export
# The weight dtypes export writes and serve runs in, by the names their flags take.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Student:
    """The distilled generator ready to sample: ``x0 = denoiser(x_t, t, cond)`` at its trained
    timesteps, with the teacher's VAE and text encoders around it.

    ``parts`` holds the teacher's components, except that ``parts.unet`` is the generator's UNet.
    """

    def __init__(self, parts: Teacher, recipe: Recipe, step: int | None, source: str, device):
        self.parts, self.recipe, self.step, self.source = parts, recipe, step, source
        self.device = torch.device(device)
        self.family = parts.family
        self.resolution = recipe.train.resolution or parts.resolution  # as training resolves it
        self.timesteps = recipe.generator.resolved_timesteps()
        self.schedule = parts.schedule
        for m in parts.text_encoders:
            fp32(m, self.device)
        # a guidance-distilled generator is called with the guidance it was trained at (roles.guided_x0)
        self.denoiser = Denoiser(fp32(parts.unet, self.device).eval(), parts.schedule,
                                 parts.guidance(recipe.loss.cfg_scale))
        # the pipeline's own conditioning, so that an exported pipeline draws exactly this
        self.cond = Conditioner(parts, self.resolution, self.device, compact_t5=False)
        self.vae = fp32(parts.vae, self.device)
        lat = parts.latent_size(self.resolution)
        self.latent_shape = (parts.channels, lat, lat)

    @property
    def num_classes(self) -> int | None:
        return self.parts.num_classes

    def encode(self, conditions: Sequence[str | int]) -> dict[str, torch.Tensor]:
        """Prompts or class labels -> the conditioning dict the UNet takes."""
        if self.cond.text:
            return self.cond.encode_prompts(list(conditions))
        return self.cond.encode_labels(torch.tensor(list(conditions)))

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Generator space (scaled VAE latents, or pixels) -> images in [-1, 1]."""
        return vae.decode(self.vae, x)


def fp32(module, device):
    """``module`` on ``device`` in float32 (exports may be fp16/bf16); None stays None."""
    if module is None:
        return None
    module.to(device)
    return module if all(p.dtype == torch.float32 for p in module.parameters()) else module.to(torch.float32)


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_META).is_file()


def write_export_meta(folder: str | Path, meta: dict) -> None:
    (Path(folder) / EXPORT_META).write_text(json.dumps(meta, indent=1))


def read_export_meta(folder: str | Path) -> dict:
    path = Path(folder) / EXPORT_META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def load_student(path: str | Path, device="cpu", *, merge_lora: bool = True, ckpt: str | Path | None = None) -> Student:
    """The distilled generator from a run folder (its newest committed checkpoint, or ``ckpt``, one
    of its committed checkpoint folders) or a dmd2 export folder.

    LoRA runs are merged into full weights unless ``merge_lora`` is False (export keeps the
    peft layers to write the adapter file).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run folder or export")
    if is_export(path):
        if ckpt is not None:
            raise UserError(f"{path}: an export holds one generator; a checkpoint can only be chosen in a run folder")
        return _from_export(path, device)
    if (path / "recipe.yaml").is_file():
        return _from_run(path, device, merge_lora, None if ckpt is None else Path(ckpt))
    raise UserError(f"{path}: neither a run folder (recipe.yaml + checkpoints/) nor a dmd2 export ({EXPORT_META})")


def teacher_of(recipe: Recipe, where: str) -> Teacher:
    m = recipe.model
    try:
        return load_teacher(m.teacher, m.family, m.teacher_config, resolution=recipe.train.resolution)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


@contextlib.contextmanager
def quiet():
    """Silence the chatter (prints, progress bars) of DeepSpeed's consolidation and of loaders."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _from_run(run: Path, device, merge_lora: bool, ckpt: Path | None = None) -> Student:
    try:
        recipe = load_recipe(run / "recipe.yaml")
    except RecipeError as e:
        raise UserError(str(e)) from None
    if ckpt is None:
        ckpt = checkpoint.latest(run)
        if ckpt is None:
            raise UserError(f"{run}: no committed checkpoint in {run / 'checkpoints'} (train it first)")
    elif not checkpoint.is_committed(ckpt):
        raise UserError(f"{ckpt}: not a committed checkpoint (missing, interrupted, or removed by train.keep_last)")
    step = int(checkpoint.read_state(ckpt)["step"])
    parts = teacher_of(recipe, str(run / "recipe.yaml"))
    with quiet():
        weights = checkpoint.consolidated_generator(ckpt, ema=recipe.train.ema_decay > 0)
    unet = parts.unet
    if recipe.model.lora.enabled:
        from .lora import add_lora

        add_lora(unet, recipe.model.lora)  # the same adapter layout the run trained, so keys match
    try:
        unet.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{ckpt}: the generator's weights do not fit the teacher's UNet ({first})") from None
    if recipe.model.lora.enabled and merge_lora:
        unet.fuse_lora()
        unet.unload_lora()
    unet.requires_grad_(False)
    return Student(parts, recipe, step, str(run), device)


def _from_export(folder: Path, device) -> Student:
    meta = read_export_meta(folder)
    where = str(folder / EXPORT_META)
    try:
        recipe = Recipe.model_validate(meta["recipe"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{where}: no valid recipe ({str(e).splitlines()[0]})") from None
    if meta.get("format") == "lora":
        parts = teacher_of(recipe, where)
        from .pipelines import apply_lora_file

        apply_lora_file(parts, folder / meta["weights"])
    elif meta.get("complete"):
        # a pipeline folder, or a class-conditional unet/ + scheduler/ (+ vae/): loads as a teacher would
        parts = load_teacher(str(folder), resolution=recipe.train.resolution)
    else:  # a UNet folder only: the rest comes from the run's teacher
        parts = teacher_of(recipe, where)
        parts.unet = type(parts.unet).from_pretrained(folder, subfolder=parts.denoiser_folder).requires_grad_(False)
    return Student(parts, recipe, meta.get("step"), str(folder), device)


def export_metadata(student: Student, **extra) -> dict:
    """The record every export holds (in dmd2.json and its safetensors headers)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("dmd2")
    except PackageNotFoundError:
        v = "unknown"
    return {
        "dmd2_version": v, "source": str(Path(student.source).resolve()), "step": student.step,
        "family": student.family, "resolution": student.resolution, "timesteps": student.timesteps,
        "schedule": {"kind": student.schedule.kind, "prediction_type": student.schedule.prediction_type},
        "teacher": student.recipe.model.teacher, **extra, "recipe": student.recipe.model_dump(mode="json"),
    }
