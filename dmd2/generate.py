"""Load a distilled generator (a run folder or a dmd2 export) and draw images with THE few-step
sampler (sampling.py); also the teacher's own many-step sampler, which eval compares against.

Image i is drawn from seed + i (``Noise.per_sample``), so it is the same whatever the batch size
or the number of ranks; under the deepspeed launcher rank r draws the images i = r (mod world).
The generator here is a plain module (consolidated from ZeRO-3), so ranks need no collectives
except one barrier before rank 0 reads what the others wrote.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import torch

from . import checkpoint
from .config import Recipe, RecipeError, load_recipe
from .errors import UserError
from .models import Conditioner, Denoiser, Teacher, load_teacher
from .sampling import Noise, pure_noise, sample, timestep_batch
from .schedule import T

EXPORT_META = "dmd2.json"  # what makes a folder a dmd2 export (written by export.py)
GRID_MAX = 64  # images in sample's grid.png


class Generator:
    """A distilled generator ready to sample: ``x0 = denoiser(x_t, t, cond)`` at its trained
    timesteps, with the teacher's VAE and text encoders around it.

    ``parts`` holds the teacher's components, except that ``parts.unet`` is the generator's UNet.
    """

    def __init__(self, parts: Teacher, recipe: Recipe, step: int | None, source: str, device):
        self.parts, self.recipe, self.step, self.source = parts, recipe, step, source
        self.device = torch.device(device)
        self.family = parts.family
        self.resolution = recipe.train.resolution or parts.resolution  # as train.Setup resolves it
        self.timesteps = recipe.generator.resolved_timesteps()
        self.schedule = parts.schedule
        for m in parts.text_encoders:
            fp32(m, self.device)
        self.denoiser = Denoiser(fp32(parts.unet, self.device).eval(), parts.schedule)
        self.cond = Conditioner(parts, self.resolution, self.device)
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
        return decode(self.vae, x)


def fp32(module, device):
    """``module`` on ``device`` in float32 (exports may be fp16/bf16); None stays None."""
    if module is None:
        return None
    module.to(device)
    return module if all(p.dtype == torch.float32 for p in module.parameters()) else module.to(torch.float32)


@torch.no_grad()
def decode(vae, x: torch.Tensor) -> torch.Tensor:
    if vae is None:
        return x.float()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((x / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()


# ---------------------------------------------------------------------------------------------
# Loading


def is_export(path: str | Path) -> bool:
    return (Path(path) / EXPORT_META).is_file()


def read_export_meta(folder: str | Path) -> dict:
    path = Path(folder) / EXPORT_META
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def load_generator(path: str | Path, device="cpu", *, merge_lora: bool = True) -> Generator:
    """A generator from a run folder (its newest committed checkpoint) or a dmd2 export folder.

    LoRA runs are merged into full weights unless ``merge_lora`` is False (export keeps the
    peft layers to write the adapter file).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such run folder or export")
    if is_export(path):
        return _from_export(path, device)
    if (path / "recipe.yaml").is_file():
        return _from_run(path, device, merge_lora)
    raise UserError(f"{path}: neither a run folder (recipe.yaml + checkpoints/) nor a dmd2 export ({EXPORT_META})")


def teacher_of(recipe: Recipe, where: str) -> Teacher:
    m = recipe.model
    try:
        return load_teacher(m.teacher, m.family, m.teacher_config)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


@contextlib.contextmanager
def quiet():
    """Silence the chatter (prints, progress bars) of DeepSpeed's consolidation and of loaders."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _from_run(run: Path, device, merge_lora: bool) -> Generator:
    try:
        recipe = load_recipe(run / "recipe.yaml")
    except RecipeError as e:
        raise UserError(str(e)) from None
    ckpt = checkpoint.latest(run)
    if ckpt is None:
        raise UserError(f"{run}: no committed checkpoint in {run / 'checkpoints'} (train it first)")
    step = int(checkpoint.read_state(ckpt)["step"])
    parts = teacher_of(recipe, str(run / "recipe.yaml"))
    with quiet():
        weights = checkpoint.consolidated_generator(ckpt, ema=recipe.train.ema_decay > 0)
    unet = parts.unet
    if recipe.model.lora.enabled:
        from .models.lora import add_lora

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
    return Generator(parts, recipe, step, str(run), device)


def _from_export(folder: Path, device) -> Generator:
    meta = read_export_meta(folder)
    where = str(folder / EXPORT_META)
    try:
        recipe = Recipe.model_validate(meta["recipe"])
    except (KeyError, ValueError) as e:
        raise UserError(f"{where}: no valid recipe ({str(e).splitlines()[0]})") from None
    if meta.get("format") == "lora":
        parts = teacher_of(recipe, where)
        apply_lora_file(parts, folder / meta["weights"])
    elif meta.get("complete"):
        # a pipeline folder, or a class-conditional unet/ + scheduler/ (+ vae/): loads as a teacher would
        parts = load_teacher(str(folder))
    else:  # a UNet folder only: the rest comes from the run's teacher
        parts = teacher_of(recipe, where)
        parts.unet = type(parts.unet).from_pretrained(folder, subfolder="unet").requires_grad_(False)
    return Generator(parts, recipe, meta.get("step"), str(folder), device)


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def apply_lora_file(parts: Teacher, file: Path) -> None:
    """Merge a LoRA .safetensors (diffusers or kohya key names) into ``parts.unet``."""
    state, alphas = pipeline_class(parts.family).lora_state_dict(str(file))
    parts.unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="dmd2")
    parts.unet.fuse_lora()
    parts.unet.unload_lora()


def diffusers_pipeline(parts: Teacher, scheduler):
    """A StableDiffusion(XL)Pipeline from loaded components (the UNet is ``parts.unet``)."""
    kw = dict(vae=parts.vae, text_encoder=parts.text_encoders[0], tokenizer=parts.tokenizers[0],
              unet=parts.unet, scheduler=scheduler)
    if parts.family == "sdxl":
        # zero unconditional embeddings, as the SDXL teacher's CFG in training (conditioning.py)
        kw.update(text_encoder_2=parts.text_encoders[1], tokenizer_2=parts.tokenizers[1],
                  force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        kw.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(parts.family)(**kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# What to draw


def choose_timesteps(trained: Sequence[int], steps: int | None = None,
                     timesteps: Sequence[int] | None = None) -> list[int]:
    """The timesteps to sample at: the trained ones, an evenly spaced subset of them (``steps``),
    or an explicit strictly descending list."""
    trained = list(trained)
    if timesteps is not None:
        ts = [int(t) for t in timesteps]
        if not ts or any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:], strict=False)):
            raise UserError(f"--timesteps {ts}: expected strictly descending integers in [0, {T})")
        if steps is not None and steps != len(ts):
            raise UserError(f"--steps {steps} but --timesteps has {len(ts)} entries")
        return ts
    if steps is None:
        return trained
    if not 1 <= steps <= len(trained):
        raise UserError(f"--steps {steps}: the generator was trained for {len(trained)} step(s) at timesteps "
                        f"{trained}; use 1..{len(trained)} (or --timesteps to choose others)")
    return [trained[round(i * len(trained) / steps)] for i in range(steps)]


def conditions(gen: Generator, prompts: Sequence[str] = (), labels: Sequence[int] = (),
               num_images: int | None = None) -> list[str | int]:
    """One condition per image: prompts (text models) or class labels (class-conditional), cycled
    to ``num_images``; class-conditional models with no labels get every class in turn."""
    if gen.cond.text:
        if labels:
            raise UserError(f"--label: {gen.source} is a text-to-image ({gen.family}) model; pass prompts")
        if not prompts:
            raise UserError(f"{gen.source} is a text-to-image ({gen.family}) model: pass --prompt or --prompts-file")
        pool: list = list(prompts)
    else:
        if prompts:
            raise UserError(f"{gen.source} is class-conditional: pass --label N or --labels all, not prompts")
        n = gen.num_classes
        for label in labels:
            if not 0 <= label < n:
                raise UserError(f"--label {label}: out of range; the model has {n} classes (0..{n - 1})")
        pool = list(labels) or list(range(n))
    n_images = len(pool) if num_images is None else num_images
    if n_images < 1:
        raise UserError(f"--num-images {n_images}: must be >= 1")
    return [pool[i % len(pool)] for i in range(n_images)]


# ---------------------------------------------------------------------------------------------
# Drawing


def dist_env() -> tuple[int, int]:
    """(rank, world) as set by the deepspeed launcher or torchrun; (0, 1) without one."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier(world: int) -> None:
    """Wait for every rank (gloo, CPU tensors only: works beside CUDA too)."""
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
    dist.barrier()


def _batches(positions: Sequence[int], batch_size: int, progress: bool, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=len(positions), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    for i in range(0, len(positions), batch_size):
        chunk = list(positions[i:i + batch_size])
        yield chunk
        bar.update(len(chunk))
    bar.close()


@torch.no_grad()
def draw(gen: Generator, conds: Sequence[str | int], seeds: Sequence[int], timesteps: Sequence[int],
         positions: Sequence[int], batch_size: int, progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (positions, images in [-1, 1]) for images ``positions``: image i has condition conds[i]
    and seed seeds[i], and is the same whatever the batching."""
    for chunk in _batches(positions, batch_size, progress, "sample"):
        cond = gen.encode([conds[i] for i in chunk])
        noise = Noise.per_sample([seeds[i] for i in chunk], gen.device)
        x = sample(gen.denoiser, gen.schedule, cond, (len(chunk), *gen.latent_shape), timesteps, noise)
        yield chunk, gen.decode(x)


def generate_images(gen: Generator, conds: Sequence[str | int], seed: int = 0, timesteps: Sequence[int] | None = None,
                    batch_size: int = 16) -> torch.Tensor:
    """All images as one N x H x W x 3 uint8 tensor (image i from seed + i), for metrics in memory."""
    from .logs import to_uint8_images

    seeds = [seed + i for i in range(len(conds))]
    out = [to_uint8_images(x) for _, x in draw(gen, conds, seeds, timesteps or gen.timesteps,
                                                 range(len(conds)), batch_size)]
    return torch.cat(out)


def teacher_images(teacher: Teacher, conds: Sequence[str | int], steps: int, seed: int = 0, *, cfg_scale: float = 1.0,
                   resolution: int | None = None, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """The teacher's images as one N x H x W x 3 uint8 tensor (image i from seed + i), like ``generate_images``."""
    from .logs import to_uint8_images

    seeds = [seed + i for i in range(len(conds))]
    out = [to_uint8_images(x) for _, x in teacher_draw(teacher, conds, seeds, steps, range(len(conds)), batch_size,
                                                         cfg_scale=cfg_scale, resolution=resolution or teacher.resolution,
                                                         device=device)]
    return torch.cat(out)


def save_images(images: torch.Tensor, positions: Sequence[int], folder: Path) -> None:
    """B x 3 x H x W in [-1, 1] -> folder/{i:06d}.png (lossless, so metrics read what was drawn)."""
    from PIL import Image

    from .logs import to_uint8_images

    for i, arr in zip(positions, to_uint8_images(images).numpy(), strict=True):
        Image.fromarray(arr).save(folder / f"{i:06d}.png")


def load_images(folder: Path, positions: Sequence[int]) -> torch.Tensor:
    """folder/{i:06d}.png -> N x H x W x 3 uint8."""
    import numpy as np
    from PIL import Image

    return torch.from_numpy(np.stack([np.array(Image.open(folder / f"{i:06d}.png").convert("RGB"))
                                      for i in positions]))


def sample_to_folder(source: str | Path, out: str | Path, *, prompts: Sequence[str] = (), labels: Sequence[int] = (),
                     steps: int | None = None, timesteps: Sequence[int] | None = None, seed: int = 0,
                     num_images: int | None = None, batch_size: int = 8, device=None, overwrite: bool = False) -> Path:
    """``dmd2 sample``: one PNG per image, images.jsonl (index, seed, condition) and grid.png.

    A folder that already holds images is refused (they would mix with the new ones) unless
    ``overwrite``: then its images, images.jsonl and grid.png are deleted first."""
    from .engines import device as default_device

    rank, world = dist_env()
    out = Path(out)
    # Checked before the model loads, and by every rank before any rank writes (the barrier below).
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder; choose a folder")
    old = sorted(p for p in out.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) if out.is_dir() else []
    if old and not overwrite:
        raise UserError(f"--out {out}: already holds {len(old)} images (e.g. {old[0].name}); pass --overwrite to "
                        "replace them, or choose another folder")
    gen = load_generator(source, device or default_device())
    ts = choose_timesteps(gen.timesteps, steps, timesteps)
    conds = conditions(gen, prompts, labels, num_images)
    seeds = [seed + i for i in range(len(conds))]
    if rank == 0:  # only now: a failed load above keeps the old images
        for p in [*old, out / "images.jsonl"]:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    barrier(world)  # the old images are gone before any rank writes a new one
    for chunk, images in draw(gen, conds, seeds, ts, range(rank, len(conds), world), batch_size, progress=rank == 0):
        save_images(images, chunk, out)
    barrier(world)
    if rank == 0:
        key = "prompt" if gen.cond.text else "label"
        with open(out / "images.jsonl", "w", encoding="utf-8") as f:
            for i, (c, s) in enumerate(zip(conds, seeds, strict=True)):
                f.write(json.dumps({"file": f"{i:06d}.png", "seed": s, key: c, "timesteps": ts}) + "\n")
        from .logs import save_grid

        first = load_images(out, range(min(len(conds), GRID_MAX)))
        save_grid(first.permute(0, 3, 1, 2).float() / 127.5 - 1, out / "grid.png")
    return out


# ---------------------------------------------------------------------------------------------
# The teacher, with its own many-step sampler


def teacher_timesteps(steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from T-1 down (the spacing the generator's default uses)."""
    if not 1 <= steps <= T:
        raise UserError(f"--teacher-steps {steps}: must be in 1..{T}")
    return [T - 1 - i * (T // steps) for i in range(steps)]


@torch.no_grad()
def ode_sample(denoise, schedule, cond: dict[str, torch.Tensor], shape: Sequence[int], timesteps: Sequence[int],
               noise: Noise) -> torch.Tensor:
    """Deterministic DDIM (DDPM schedules) / Euler (EDM: x_t = x0 + sigma eps) sampler for teachers:
    from pure noise, step x_t -> x_t' = a_t' x0 + s_t' eps_hat with eps_hat the noise implied by
    the x0 prediction; one network call per timestep, the last x0 is the sample."""
    x = pure_noise(schedule, noise, shape, timesteps[0])
    x0 = x
    for i, t in enumerate(timesteps):
        tt = timestep_batch(t, shape[0], x.device)
        x0 = denoise(x, tt, cond)
        if i + 1 < len(timesteps):
            # x_t = a_t x0 + s_t eps for both parameterisations; add_noise is linear in (x0, eps)
            zero = torch.zeros_like(x0)
            eps = (x - schedule.add_noise(x0, zero, tt)) / schedule.add_noise(zero, torch.ones_like(x0), tt)
            x = schedule.add_noise(x0, eps, timestep_batch(timesteps[i + 1], shape[0], x.device))
    return x0


def teacher_scheduler(parts: Teacher):
    """The teacher's own diffusers scheduler, from the scheduler config it ships."""
    import diffusers

    cfg = dict(parts.scheduler_config)
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


@torch.no_grad()
def teacher_draw(teacher: Teacher, conds: Sequence[str | int], seeds: Sequence[int], steps: int,
                 positions: Sequence[int], batch_size: int, *, cfg_scale: float, resolution: int, device,
                 progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Like ``draw``, for the teacher at ``steps`` network calls per image (x2 with CFG).

    Text models: the diffusers pipeline with the teacher's own scheduler and CFG ``cfg_scale``
    (one torch.Generator per image: seed i draws image i's initial and any scheduler noise).
    Class-conditional models: ``ode_sample`` through the same denoiser interface as training.
    """
    device = torch.device(device)
    text = teacher.family in ("sd15", "sdxl")
    for m in (teacher.unet, teacher.vae, *teacher.text_encoders):
        fp32(m, device)
    if text:
        pipe = diffusers_pipeline(teacher, teacher_scheduler(teacher))
    else:
        denoiser = Denoiser(teacher.unet.eval(), teacher.schedule)
        cond = Conditioner(teacher, resolution, device)
        vae = teacher.vae
        lat = teacher.latent_size(resolution)
        ts = teacher_timesteps(steps)
    for chunk in _batches(positions, batch_size, progress, f"teacher {steps} steps"):
        if text:
            gens = [torch.Generator().manual_seed(int(seeds[i])) for i in chunk]
            images = pipe([conds[i] for i in chunk], num_inference_steps=steps, guidance_scale=cfg_scale,
                          generator=gens, height=resolution, width=resolution, output_type="pt").images
            yield chunk, images.float() * 2 - 1
        else:
            c = cond.encode_labels(torch.tensor([conds[i] for i in chunk]))
            noise = Noise.per_sample([seeds[i] for i in chunk], device)
            x = ode_sample(denoiser, teacher.schedule, c, (len(chunk), teacher.channels, lat, lat), ts, noise)
            yield chunk, decode(vae, x)
