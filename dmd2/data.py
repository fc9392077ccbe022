"""Prompts, real images and class labels, and the batch of every step; deterministic and
resumable without saved state.

Every batch is a pure function of (seed, step, rank): sample j of the global batch at step s is
item perm_e[(s * world * B + j) mod N] of epoch e's seeded permutation. Resuming at step s
therefore replays the same data with nothing to restore.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import size_and_time

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
RGB_CONVERTIBLE = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


def _text_of(record: dict) -> str | None:
    for key in ("prompt", "caption", "text"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def load_prompts(path: str | Path, field: str = "data.prompts", caption_column: str = "text") -> list[str]:
    """Prompts from a .txt (one per line), a .jsonl (a "prompt", "caption" or "text" key), or a table:
    a .parquet file, a folder of them, or a Hugging Face ``datasets`` folder (its ``caption_column``)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".parquet":
        from .sources import table_prompts

        return table_prompts(p, field, caption_column)
    if not p.is_file():
        raise UserError(f"{field}: {str(p)!r} does not exist{_build_hint(p)}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{field}: cannot read {str(p)!r}: {e}") from None
    if p.suffix == ".jsonl":
        prompts = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                text = _text_of(json.loads(line))
            except json.JSONDecodeError:
                text = None
            if text is None:
                raise UserError(f"{field}: {p}:{i}: expected a JSON object with a 'prompt', 'caption' or 'text' string")
            prompts.append(text)
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"{field}: {str(p)!r} holds no prompts")
    return prompts


def prompts_fingerprint(path: str | Path, caption_column: str = "text") -> str:
    """What identifies the prompts (the conditioning cache's key): a .txt/.jsonl file's sha256; for a
    table (parquet, ``datasets`` folder), a sha256 over its data files' names, sizes and times and
    the column read (tables may hold gigabytes of images too)."""
    p = Path(path)
    if p.is_dir() or p.suffix == ".parquet":
        from .sources import table_files

        files = [f for f, _ in table_files(p, "data.prompts")]
        blob = json.dumps({"files": [[str(f.resolve()), *size_and_time(f)] for f in files], "column": caption_column})
        return hashlib.sha256(blob.encode()).hexdigest()
    from .files import sha256_file

    return sha256_file(p)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # computed once per epoch, not once per sample (32 permutations of COCO's 118k per step cost ~0.1 s)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(n: int, step: int, rank: int, world: int, batch: int, seed: int) -> list[int]:
    """Indices into a dataset of n items for (step, rank): seeded per-epoch permutations."""
    out = []
    for j in range(batch):
        flat = (step * world + rank) * batch + j
        epoch, pos = divmod(flat, n)
        out.append(int(_epoch_permutation(n, seed, epoch)[pos]))
    return out


@dataclass
class RealItem:
    path: Path
    caption: str | None = None
    label: int | None = None


def _load_image(path, resolution: int) -> torch.Tensor:
    """RGB, shorter side resized to ``resolution``, centre-cropped, scaled to [-1, 1]: 3 x R x R.
    ``path``: a file path or a binary file object (an image's bytes in a tar or a table)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in RGB_CONVERTIBLE:  # e.g. 16-bit or float images: no faithful 8-bit RGB
            raise ValueError(f"unsupported image mode {im.mode}")
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _build_hint(root: Path) -> str:
    """For a missing data path: the command that builds it when it is the digits the repository's
    own recipes expect, else where the README's data section says how to make the real ones."""
    from .digits.data import build_command

    cmd = build_command(root)
    if cmd:
        return f"; build it with `{cmd}` (make demo builds it too)"
    return "; docs/data.md says how to make COCO-2014 prompts and a LAION-style image set"


class ImageSource:
    """What every ``data.real_images`` source offers: ``items`` (RealItem: caption, label, and a
    ``path`` that names the sample in messages), ``read(k)``, ``load(indices)``, ``probe()``,
    ``fingerprint()``, ``root``, ``bad`` (indices found unreadable) and ``non_images`` (entries
    ignored, for a warning).

    Unreadable images (corrupt, empty, an unsupported mode, not an image) are skipped (the next
    item is taken) and counted; more than ``max_bad_fraction`` of the items being bad stops
    training with a message.
    """

    root: Path
    items: list[RealItem]

    def __init__(self, resolution: int, max_bad_fraction: float, field: str):
        self.resolution, self.max_bad_fraction, self.field = resolution, max_bad_fraction, field
        self.bad: set[int] = set()
        self.non_images: list[Path] = []

    def read(self, k: int) -> torch.Tensor:
        """Item k's image, 3 x R x R in [-1, 1]; raises OSError/ValueError/SyntaxError if unreadable."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What identifies the items cheaply (the conditioning cache's key): no image is read."""
        raise NotImplementedError

    def probe(self, n: int = 16) -> None:
        """Open up to n evenly spread images at start-up, so that a source of unreadable files is
        refused before anything is written (the rest are checked as they are used)."""
        m = min(n, len(self.items))
        picks = sorted({round(i * (len(self.items) - 1) / max(m - 1, 1)) for i in range(m)})
        bad = []
        for k in picks:
            try:
                self.read(k)
            except (OSError, ValueError, SyntaxError):
                bad.append(self.items[k].path)
        if len(bad) > self.max_bad_fraction * len(picks):
            raise UserError(f"{self.field}: {len(bad)} of {len(picks)} images probed are unreadable "
                            f"(e.g. {str(bad[0])!r}); more than data.max_bad_fraction={self.max_bad_fraction}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, indices: list[int]) -> tuple[torch.Tensor, list[RealItem]]:
        """Images B x 3 x R x R in [-1, 1]; a bad file is replaced by the next good item."""
        images, items = [], []
        for i in indices:
            for j in range(len(self.items)):
                k = (i + j) % len(self.items)
                try:
                    images.append(self.read(k))
                    items.append(self.items[k])
                    break
                except (OSError, ValueError, SyntaxError):
                    self.bad.add(k)
                    if len(self.bad) > self.max_bad_fraction * len(self.items):
                        raise UserError(f"{self.field}: {len(self.bad)} of {len(self.items)} images are unreadable "
                                        f"(e.g. {str(self.items[k].path)!r}); more than data.max_bad_fraction="
                                        f"{self.max_bad_fraction}") from None
        return torch.stack(images), items


class RealImages(ImageSource):
    """A folder of images with captions.jsonl ({"file_name", "text"}), or class sub-folders.
    Files without an image extension in class folders are counted in ``non_images``."""

    def __init__(self, root: str | Path, resolution: int, *, labelled: bool, num_classes: int | None = None,
                 max_bad_fraction: float = 0.1, field: str = "data.real_images"):
        super().__init__(resolution, max_bad_fraction, field)
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"{field}: {str(self.root)!r} is not a folder{_build_hint(self.root)}")
        self.items = self._scan_labelled(num_classes) if labelled else self._scan_captioned()
        if not self.items:
            raise UserError(f"{field}: {str(self.root)!r} holds no images")

    def _scan_captioned(self) -> list[RealItem]:
        meta = next((self.root / n for n in CAPTION_FILES if (self.root / n).is_file()), None)
        if meta is None:
            raise UserError(f"{self.field}: {str(self.root)!r} needs a captions.jsonl "
                            '(one {"file_name": ..., "text": ...} per line), or webdataset .tar or .parquet files')
        items = []
        for i, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                items.append(RealItem(self.root / rec["file_name"], caption=_text_of(rec) or ""))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{self.field}: {meta}:{i}: expected {{\"file_name\": ..., \"text\": ...}}") from None
        return items

    def _scan_labelled(self, num_classes: int | None) -> list[RealItem]:
        dirs = sorted((d for d in self.root.iterdir() if d.is_dir()), key=lambda d: (not d.name.isdigit(), d.name.zfill(8)))
        items = []
        for idx, d in enumerate(dirs):
            label = int(d.name) if d.name.isdigit() else idx
            if num_classes is not None and label >= num_classes:
                raise UserError(f"{self.field}: class folder {str(d)!r} is label {label}, "
                                f"but the teacher has {num_classes} classes")
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    items.append(RealItem(f, label=label))
                elif f.is_file():
                    self.non_images.append(f)
        return items

    def read(self, k: int) -> torch.Tensor:
        return _load_image(self.items[k].path, self.resolution)

    def fingerprint(self) -> dict:
        """The items (paths, captions, labels) and each file's size and time."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps([str(it.path), it.caption, it.label, *size_and_time(it.path)]).encode())
        return {"root": str(self.root.resolve()), "items": len(self.items), "sha256": h.hexdigest()}


def open_real_images(source, resolution: int, *, labelled: bool, num_classes: int | None = None,
                     max_bad_fraction: float | None = None, image_column: str | None = None,
                     caption_column: str | None = None, field: str = "data.real_images") -> ImageSource:
    """The ``data.real_images`` source ``source`` names: a DataConfig (its real_images, max_bad_fraction,
    image_column and caption_column; keywords given here win) or a path. Accepted: a folder with
    captions.jsonl, or class sub-folders (class-conditional teachers: the only form they take);
    webdataset tar shards (a .tar, a brace pattern such as ``shards/{00000..00099}.tar``, or a folder
    of .tar files); parquet (a .parquet file, a pattern of them, or a folder of them); a Hugging Face
    ``datasets`` ``save_to_disk`` folder."""
    if hasattr(source, "real_images"):
        cfg, source = source, source.real_images
        max_bad_fraction = cfg.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
        image_column = cfg.image_column if image_column is None else image_column
        caption_column = cfg.caption_column if caption_column is None else caption_column
    max_bad_fraction = 0.1 if max_bad_fraction is None else max_bad_fraction
    image_column, caption_column = image_column or "image", caption_column or "text"
    from .sources import source_kind

    kind, files = source_kind(str(source), field)
    if kind == "folder":
        return RealImages(source, resolution, labelled=labelled, num_classes=num_classes,
                          max_bad_fraction=max_bad_fraction, field=field)
    if labelled:
        raise UserError(f"{field}: {str(source)!r} is a {kind} source; a class-conditional teacher reads a folder "
                        "of class sub-folders (one per label)")
    from .sources import TableImages, TarImages

    if kind == "webdataset":
        return TarImages(source, files, resolution, max_bad_fraction=max_bad_fraction, field=field)
    return TableImages(source, files, resolution, image_column=image_column, caption_column=caption_column,
                       max_bad_fraction=max_bad_fraction, field=field)


@dataclass
class Batch:
    """One rank's batch: generator conditioning (+ CFG uncond), and real data for the GAN."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None = None
    real: torch.Tensor | None = None  # real latents (or pixels), same shape as generator samples
    real_cond: dict[str, torch.Tensor] | None = None


class LiveConditioning:
    """The conditioning source that encodes every step with the teacher's frozen encoders and
    VAE (``data.cache: false``); ``cache.CachedConditioning`` reads the same rows from the cache.

    ``prompts(idx)`` / ``uncond(n)``: text conditioning (dicts as ``Conditioner.encode_prompts``);
    ``real(idx)``: (latents, caption conditioning or {}, the items used: an unreadable image is
    replaced by the next readable one)."""

    def __init__(self, prompts: list[str] | None, real: ImageSource | None, conditioner, vae, device):
        self.prompt_list, self.real_images, self.conditioner, self.vae = prompts, real, conditioner, vae
        self.device = device

    def prompts(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.conditioner.encode_prompts([self.prompt_list[i] for i in idx])

    def uncond(self, n: int) -> dict[str, torch.Tensor]:
        return self.conditioner.uncond(n)

    def real(self, idx: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[RealItem]]:
        from .models import vae

        images, items = self.real_images.load(idx)
        latents = vae.encode(self.vae, images.to(self.device))
        cond = self.conditioner.encode_prompts([it.caption for it in items]) if self.conditioner.text else {}
        return latents, cond, items


class Batches:
    """This rank's batch at each step, a pure function of (seed, step, rank): prompts (or random
    class labels) for the generator, the unconditional embedding when the teacher uses CFG, and
    real images with their captions (or labels) for the GAN, from one conditioning source."""

    def __init__(self, source, conditioner, *, prompts: list[str] | None, real: ImageSource | None, shape,
                 cfg: bool, seed: int, rank: int, world: int, captions: bool = False):
        self.source, self.conditioner, self.prompts, self.real = source, conditioner, prompts, real
        self.shape, self.cfg, self.seed, self.rank, self.world = tuple(shape), cfg, seed, rank, world
        self.captions = captions  # the generator's prompts are the real batch's captions

    @property
    def batch_size(self) -> int:
        return self.shape[0]

    def __call__(self, step: int, rng: torch.Generator) -> Batch:
        B, text = self.batch_size, self.conditioner.text
        if self.captions:
            cond = None  # taken from the real batch below
        elif self.prompts is not None:
            cond = self.source.prompts(batch_indices(len(self.prompts), step, self.rank, self.world, B, self.seed))
        else:
            labels = torch.randint(0, self.conditioner.num_classes, (B,), generator=rng, device=rng.device)
            cond = self.conditioner.encode_labels(labels)
        uncond = self.source.uncond(B) if text and self.cfg else None
        real = real_cond = None
        if self.real is not None:
            ridx = batch_indices(len(self.real), step, self.rank, self.world, B, self.seed + 1)
            real, real_cond, items = self.source.real(ridx)
            if not text:
                real_cond = self.conditioner.encode_labels(torch.tensor([it.label for it in items]))
            if self.captions:
                cond = real_cond
        return Batch(cond, uncond, real, real_cond)

    def preview_cond(self, n: int) -> dict[str, torch.Tensor]:
        """The conditioning of the preview grid: the first n prompts, or the classes in turn."""
        if self.prompts is not None:
            return self.source.prompts([i % len(self.prompts) for i in range(n)])
        if self.captions:  # no prompt list: the first real images' captions
            return self.source.real([i % len(self.real) for i in range(n)])[1]
        return self.conditioner.encode_labels(torch.arange(n) % self.conditioner.num_classes)


def build_batches(cfg, teacher, *, resolution: int, batch_size: int, seed: int, cfg_scale: float, rank: int,
                  world: int, device, full_verify: bool = False) -> Batches:
    """Read and check ``data`` (a DataConfig) for ``teacher``, and open its conditioning source: the
    cache (built first if needed; collective; ``full_verify``: see ``cache.open_or_build``) or live
    encoding."""
    from .models import Conditioner

    captions = cfg.generator_prompts == "captions"
    if captions and teacher.family == "classcond":
        raise UserError("data.generator_prompts: captions is for text-to-image teachers; a class-conditional "
                        "teacher draws labels")
    prompts = None
    if teacher.family != "classcond" and not (captions and cfg.prompts is None):
        if cfg.prompts is None:
            raise UserError(f"data.prompts: a {teacher.family} teacher needs prompts (a .txt or .jsonl file, "
                            "parquet or a datasets folder)")
        prompts = load_prompts(cfg.prompts, caption_column=cfg.caption_column)
    real = None
    if cfg.real_images is not None:
        real = open_real_images(cfg, resolution, labelled=teacher.family == "classcond",
                                num_classes=teacher.num_classes)
        real.probe()
    conditioner = Conditioner(teacher, resolution, device)
    vae = teacher.vae.to(device) if teacher.vae is not None else None
    lat = teacher.latent_size(resolution)
    shape = (batch_size, teacher.channels, lat, lat)
    if cfg.cache and (prompts is not None or real is not None):
        from . import cache

        source = cache.open_source(cfg, teacher, conditioner, vae, prompts=prompts, real=real, resolution=resolution,
                                   sample_shape=shape[1:], rank=rank, world=world, device=device,
                                   full_verify=full_verify)
    else:
        source = LiveConditioning(prompts, real, conditioner, vae, device)
    return Batches(source, conditioner, prompts=prompts, real=real, shape=shape, cfg=cfg_scale != 1.0, seed=seed,
                   rank=rank, world=world, captions=captions)
