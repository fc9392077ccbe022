"""Draw and write images: the distilled student (``models.student``) with the one sampler
(``sampling.sample``), and the teacher at many steps, which eval compares against.

Image i is drawn from seed + i (``Noise.per_sample``), so it is the same whatever the batch size
or the number of ranks; under the deepspeed launcher rank r draws the images i = r (mod world).
The generator here is a plain module (consolidated from ZeRO-3), so ranks need no collectives
except one barrier before rank 0 reads what the others wrote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import torch

from .errors import UserError
from .models import Conditioner, Denoiser, Teacher, vae
from .models.loader import TEXT_FAMILIES
from .models.pipelines import diffusers_pipeline, guidance_kwargs, teacher_scheduler
from .models.student import Student, fp32, load_student
from .sampling import Noise, sample
from .schedule import T

GRID_MAX = 64  # images in sample's grid.png


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


def conditions(student: Student, prompts: Sequence[str] = (), labels: Sequence[int] = (),
               num_images: int | None = None) -> list[str | int]:
    """One condition per image: prompts (text models) or class labels (class-conditional), cycled
    to ``num_images``; class-conditional models with no labels get every class in turn."""
    if student.cond.text:
        if labels:
            raise UserError(f"--label: {student.source} is a text-to-image ({student.family}) model; pass prompts")
        if not prompts:
            raise UserError(f"{student.source} is a text-to-image ({student.family}) model: pass --prompt or --prompts-file")
        pool: list = list(prompts)
    else:
        if prompts:
            raise UserError(f"{student.source} is class-conditional: pass --label N or --labels all, not prompts")
        n = student.num_classes
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
def draw(student: Student, conds: Sequence[str | int], seeds: Sequence[int], timesteps: Sequence[int],
         positions: Sequence[int], batch_size: int, progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (positions, images in [-1, 1]) for images ``positions``: image i has condition conds[i]
    and seed seeds[i], and is the same whatever the batching."""
    for chunk in _batches(positions, batch_size, progress, "sample"):
        cond = student.encode([conds[i] for i in chunk])
        noise = Noise.per_sample([seeds[i] for i in chunk], student.device)
        x = sample(student.denoiser, student.schedule, cond, (len(chunk), *student.latent_shape), timesteps, noise)
        yield chunk, student.decode(x)


def generate_images(student: Student, conds: Sequence[str | int], seed: int = 0, timesteps: Sequence[int] | None = None,
                    batch_size: int = 16) -> torch.Tensor:
    """All images as one N x H x W x 3 uint8 tensor (image i from seed + i), for metrics in memory."""
    from .logs import to_uint8_images

    seeds = [seed + i for i in range(len(conds))]
    out = [to_uint8_images(x) for _, x in draw(student, conds, seeds, timesteps or student.timesteps,
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
    gen = load_student(source, device or default_device())
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
        from .logs import condition_layout, save_grid

        first = load_images(out, range(min(len(conds), GRID_MAX)))
        period = len(prompts or labels) or gen.num_classes  # conditions() cycles them: image i has i mod period
        save_grid(first.permute(0, 3, 1, 2).float() / 127.5 - 1, out / "grid.png",
                  **condition_layout(period, gen.cond.text, len(first)))
    return out


# ---------------------------------------------------------------------------------------------
# The teacher, with its own many-step sampler


def teacher_timesteps(steps: int) -> list[int]:
    """``steps`` evenly spaced timesteps from T-1 down (the spacing the generator's default uses)."""
    if not 1 <= steps <= T:
        raise UserError(f"--teacher-steps {steps}: must be in 1..{T}")
    return [T - 1 - i * (T // steps) for i in range(steps)]


@torch.no_grad()
def teacher_draw(teacher: Teacher, conds: Sequence[str | int], seeds: Sequence[int], steps: int,
                 positions: Sequence[int], batch_size: int, *, cfg_scale: float, resolution: int, device,
                 progress: bool = False) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Like ``draw``, for the teacher at ``steps`` network calls per image (x2 with CFG).

    Text models: the diffusers pipeline with the teacher's own scheduler and CFG ``cfg_scale``, or
    FLUX.1-dev's guidance input at ``cfg_scale`` (``pipelines.guidance_kwargs``; one torch.Generator
    per image: seed i draws image i's initial and any scheduler noise).
    Class-conditional models: ``sampling.sample(deterministic=True)`` (DDIM / Euler) through the
    same denoiser interface as training.
    """
    device = torch.device(device)
    text = teacher.family in TEXT_FAMILIES
    for m in (teacher.unet, teacher.vae, *teacher.text_encoders):
        fp32(m, device)
    if text:
        pipe = diffusers_pipeline(teacher, teacher_scheduler(teacher))
        # SD3 without T5: one zero T5 token, which the loader's attention processor counts as the
        # pipeline's 256 (models/attention.py): the same images at a quarter of the context
        t5_free = {"max_sequence_length": 1} if teacher.t5_free else {}
    else:
        denoiser = Denoiser(teacher.unet.eval(), teacher.schedule)
        cond = Conditioner(teacher, resolution, device)
        teacher_vae = teacher.vae
        lat = teacher.latent_size(resolution)
        ts = teacher_timesteps(steps)
    for chunk in _batches(positions, batch_size, progress, f"teacher {steps} steps"):
        if text:
            gens = [torch.Generator().manual_seed(int(seeds[i])) for i in chunk]
            images = pipe([conds[i] for i in chunk], num_inference_steps=steps, **guidance_kwargs(teacher, cfg_scale, len(chunk)),
                          generator=gens, height=resolution, width=resolution, output_type="pt", **t5_free).images
            yield chunk, images.float() * 2 - 1
        else:
            c = cond.encode_labels(torch.tensor([conds[i] for i in chunk]))
            noise = Noise.per_sample([seeds[i] for i in chunk], device)
            x = sample(denoiser, teacher.schedule, c, (len(chunk), teacher.channels, lat, lat), ts, noise,
                       deterministic=True)
            yield chunk, vae.decode(teacher_vae, x)
