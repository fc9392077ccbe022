"""Conditioning computed once: prompt and unconditional text embeddings, real-image latents and their
caption embeddings, encoded with the teacher's frozen encoders and stored as safetensors.

The authors re-encode every step; the encoders are frozen, so the same tensors come out every
time. Training reads rows of the cache by the same indices it would have encoded (``data.cache``).

The cache folder is keyed by everything its contents depend on: the teacher's text encoders,
tokenizers and VAE (file sizes and times), the family, the resolution, the prompts (a file's sha256,
a table's files) and the real images (the source's ``fingerprint``: its items' names and captions,
its files' sizes and times), and the format below.
Change any of them and a new folder is built; a resumed run finds the same folder. Items are
stored in chunks of ``CHUNK`` rows, each encoded in fixed sub-batches, so a chunk's contents do
not depend on how many ranks built it. Ranks build chunks round-robin. A chunk file appears
atomically and a ``.json`` sidecar with its sha256 after it, so an interrupted build (kill -9)
resumes where it stopped, keeping the chunks that verify; ``meta.json`` marks the cache complete.
A chunk that does not match its sidecar is refused with its name, never silently rebuilt.

``dmd2 prepare RECIPE`` builds the folder ahead of training (alone or under the launcher, each
rank encoding its share) and re-hashes every chunk of a complete one; ``dmd2 train`` then finds
it, checking each chunk's size and time against its sidecar (and re-hashing any that changed).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import faults
from .errors import UserError
from .files import cache_root, save_shard, shard_state, sidecar, size_and_time, writer_tag
from .models.conditioning import cond_to

FORMAT = 2  # bump when what is stored or how it is encoded changes (2: checksum sidecars)
CHUNK = 1024  # rows per file
ENCODE_BATCH = 32  # rows per encoder call when building
META = "meta.json"
_TEACHER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "vae",
                  "model_index.json")


def default_root() -> Path:
    """``$DMD2_CACHE_DIR``, else ``~/.cache/dmd2/conditioning`` (shared by runs: folders are keyed)."""
    if os.environ.get("DMD2_CACHE_DIR"):
        return Path(os.environ["DMD2_CACHE_DIR"]).expanduser()
    return cache_root("conditioning")


def teacher_fingerprint(source: str, config_source: str | None = None) -> dict:
    """What identifies the teacher's encoders without hashing gigabytes: a local folder's encoder,
    tokenizer and VAE files by size and modification time; a single file likewise; a hub id by
    the snapshot revision in the local hub cache."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for part in _TEACHER_PARTS for f in ([p / part] if (p / part).is_file() else
                                                               (p / part).rglob("*")) if f.is_file())
        return {"path": str(p.resolve()), "files": [[str(f.relative_to(p)), *size_and_time(f)] for f in files]}
    if p.is_file():
        return {"path": str(p.resolve()), "file": size_and_time(p), "config": config_source}
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "model_index.json")
        revision = Path(found).parent.name if isinstance(found, str) else None
    except ImportError:
        revision = None
    return {"hub": source, "revision": revision}


def real_images_fingerprint(real) -> dict:
    """What identifies a data.real_images source cheaply: its ``fingerprint()`` (a folder: the items'
    paths, captions, labels and each file's size and time; tars, tables: the files' sizes and times
    and the items' names and captions)."""
    return real.fingerprint()


def cache_key(inputs: dict) -> str:
    blob = json.dumps({"format": FORMAT, "chunk": CHUNK, "encode_batch": ENCODE_BATCH, **inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k].cpu() for p in parts]) for k in parts[0]}


class Builder:
    """Encodes one chunk at a time with the teacher's encoders (callables from ``open_source``)."""

    def __init__(self, prompts: Sequence[str] | None, real, encode_prompts: Callable | None,
                 encode_images: Callable, uncond: Callable | None, sample_shape: Sequence[int]):
        self.prompts, self.real = prompts, real
        self.encode_prompts, self.encode_images, self.uncond = encode_prompts, encode_images, uncond
        self.sample_shape = tuple(sample_shape)
        self.tick: Callable[[int], object] = lambda rows: None  # progress: rows encoded

    def tasks(self) -> list[str]:
        names = ["uncond"] if self.uncond is not None else []
        if self.prompts is not None:
            names += [f"prompts_{c:05d}" for c in range(-(-len(self.prompts) // CHUNK))]
        if self.real is not None:
            names += [f"images_{c:05d}" for c in range(-(-len(self.real) // CHUNK))]
        return names

    def rows(self, name: str) -> int:
        """Items task ``name`` encodes (what the progress bar counts)."""
        if name == "uncond":
            return 1
        kind, c = name.split("_")
        return min(CHUNK, len(self.prompts if kind == "prompts" else self.real) - int(c) * CHUNK)

    def build(self, name: str) -> dict[str, torch.Tensor]:
        if name == "uncond":
            out = {k: v[:1] for k, v in self.uncond().items()}
            self.tick(1)
            return out
        kind, c = name.split("_")
        lo = int(c) * CHUNK
        if kind == "prompts":
            items = list(self.prompts[lo:lo + CHUNK])
            return _cat([self._encode(items[i:i + ENCODE_BATCH]) for i in range(0, len(items), ENCODE_BATCH)])
        return self._images(lo, min(lo + CHUNK, len(self.real)))

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        out = self.encode_prompts(prompts)
        self.tick(len(prompts))
        return out

    def _images(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        loaded = {}
        for k in range(lo, hi):
            try:
                loaded[k - lo] = self.real.read(k)
            except (OSError, ValueError, SyntaxError):  # as RealImages.load: skipped, counted
                pass
        good = sorted(loaded)
        self.tick(hi - lo - len(good))
        latents = torch.zeros(hi - lo, *self.sample_shape)
        for i in range(0, len(good), ENCODE_BATCH):
            rows = good[i:i + ENCODE_BATCH]
            latents[rows] = self.encode_images(torch.stack([loaded[r] for r in rows])).float().cpu()
            self.tick(len(rows))
        out = {"latents": latents, "ok": torch.tensor([r in loaded for r in range(hi - lo)], dtype=torch.uint8)}
        if self.encode_prompts is not None:
            captions = [self.real.items[k].caption or "" for k in range(lo, hi)]
            cond = _cat([self.encode_prompts(captions[i:i + ENCODE_BATCH]) for i in range(0, len(captions), ENCODE_BATCH)])
            out.update({f"cond.{k}": v for k, v in cond.items()})
        return out


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _shard(folder: Path, name: str) -> Path:
    return folder / f"{name}.safetensors"


def _finished(folder: Path, names: Sequence[str], *, full: bool) -> set[str]:
    """The chunks among ``names`` that are written and match their sidecar's sha256 (re-hashed when
    ``full``, else only when their size or time changed); a corrupt one is refused, not rebuilt."""
    done = set()
    for name in names:
        state = shard_state(_shard(folder, name), trust_stat=not full)
        if state == "corrupt":
            raise UserError(f"data.cache: {_shard(folder, name)} fails its checksum ({sidecar(_shard(folder, name)).name}); "
                            f"delete {folder} and run `dmd2 prepare` again")
        if state == "done":
            done.add(name)
    return done


def _build(folder: Path, builder: Builder, names: Sequence[str], tasks: Sequence[str], progress: bool,
           timing: dict | None = None) -> int:
    """Encode and write chunks ``names`` (indices into ``tasks`` name the fault points), with a
    progress bar per kind (prompts, then images: rate and ETA); returns the rows encoded and adds
    each kind's rows and seconds to ``timing``."""
    import time

    from tqdm import tqdm

    rows = 0
    for kind, unit in (("uncond", "prompt"), ("prompts", "prompt"), ("images", "img")):
        group = [n for n in names if n.split("_")[0] == kind]
        total = sum(builder.rows(n) for n in group)
        with tqdm(total=total, desc=f"encoding {kind}", unit=unit, disable=not progress or not group or kind == "uncond",
                  dynamic_ncols=True) as bar:
            builder.tick = bar.update
            t0 = time.perf_counter()
            for name in group:
                k = tasks.index(name)
                save_shard(builder.build(name), _shard(folder, name), {"rows": builder.rows(name)},
                           fault=("cache_before_sidecar", k))
                faults.point("cache_after_shard", k)
                rows += builder.rows(name)
            if timing is not None and group:
                n, secs = timing.get(kind, (0, 0.0))
                timing[kind] = (n + total, secs + time.perf_counter() - t0)
        builder.tick = lambda rows: None
    return rows


def open_or_build(root: str | Path, inputs: dict, builder: Builder, *, rank: int = 0, world: int = 1,
                  max_bad_fraction: float = 1.0, full_verify: bool = False) -> ConditioningCache:
    """The cache folder for ``inputs``, built first if needed (collective: every rank calls it).

    Each rank builds every world-th chunk not yet finished (finished ones are verified by their
    sha256 and kept: a killed build resumes); after a barrier, any chunk still missing (a cache
    folder that is not shared between nodes) is built locally, so all ranks end up with the same
    files and take the same path through the barriers. A complete cache is verified when opened:
    by size and modification time against each chunk's sidecar (re-hashing chunks that changed),
    or every chunk re-hashed with ``full_verify`` (``dmd2 prepare``; each rank its share).
    """
    import time

    from .logs import phase, progress_on

    folder = Path(root) / cache_key(inputs)
    found = (folder / META).is_file()
    clock = phase("conditioning cache")
    started, built, kept, timing = time.perf_counter(), 0, 0, {}
    tasks = builder.tasks()
    if not found:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"data.cache: cannot create {str(folder)!r} ({e.strerror}); set DMD2_CACHE_DIR to a "
                            "writable folder, or data.cache=false") from None
        share = [name for i, name in enumerate(tasks) if i % world == rank]
        done = _finished(folder, share, full=True)
        kept = len(done)
        # rank 0's share is the bars' measure of the whole (ranks build equal shares)
        built = _build(folder, builder, [n for n in share if n not in done], tasks, progress_on() and rank == 0, timing)
    _barrier()
    if not (folder / META).is_file():
        late = _finished(folder, tasks, full=False)
        built += _build(folder, builder, [n for n in tasks if n not in late], tasks, False)
        meta = {**inputs, "format": FORMAT, "chunk": CHUNK, "tasks": tasks,
                "prompts": len(builder.prompts) if builder.prompts is not None else 0,
                "images": len(builder.real) if builder.real is not None else 0}
        tmp = folder / f"{META}.{writer_tag()}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / META)
    _barrier()
    if found:
        names = [n for i, n in enumerate(tasks) if not full_verify or i % world == rank]
        ok = _finished(folder, names, full=full_verify)
        missing = [n for n in names if n not in ok]
        if missing:
            raise UserError(f"data.cache: {_shard(folder, missing[0])} is missing; delete {folder} and run "
                            "`dmd2 prepare` again")
        _barrier()
    cache = ConditioningCache(folder)
    cache.stats = {"found": found, "built_rows": built, "kept_shards": kept, "seconds": time.perf_counter() - started,
                   "timing": timing}  # timing: this rank's {kind: (rows, seconds)}
    clock.done(f"conditioning cache {'found' if found else 'built'}: {cache.num_prompts} prompts / {cache.images} "
               f"images in {folder}")
    if cache.images and len(cache.bad) > max_bad_fraction * cache.images:
        bad = cache.bad[0]
        path = builder.real.items[bad].path if builder.real is not None else bad
        raise UserError(f"data.real_images: {len(cache.bad)} of {cache.images} images are unreadable "
                        f"(e.g. {str(path)!r}); more than data.max_bad_fraction={max_bad_fraction}")
    return cache


class ConditioningCache:
    """Reads rows of a complete cache folder (memory-mapped safetensors; nothing is loaded whole)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.stats: dict = {}  # how open_or_build found or built it
        meta = json.loads((self.folder / META).read_text())
        self.num_prompts, self.images, self.tasks = meta["prompts"], meta["images"], meta["tasks"]
        self._files: dict[str, object] = {}
        ok = [self._file(n).get_tensor("ok") for n in meta["tasks"] if n.startswith("images_")]
        self.ok = torch.cat(ok).bool() if ok else torch.zeros(0, dtype=torch.bool)
        self.bad = [int(i) for i in torch.nonzero(~self.ok).flatten()]
        self._next_good = self._first_good_from() if self.images else []

    def _file(self, name: str):
        if name not in self._files:
            from safetensors import safe_open

            self._files[name] = safe_open(str(self.folder / f"{name}.safetensors"), "pt")
        return self._files[name]

    def _first_good_from(self) -> list[int]:
        """For each index, the first readable item at or after it (cyclically), as RealImages.load."""
        n, ok = self.images, self.ok.tolist()
        if not any(ok):
            raise UserError(f"data.real_images: none of the {n} images is readable")
        out, nxt = [0] * n, None
        for i in reversed(range(2 * n)):
            if ok[i % n]:
                nxt = i % n
            if i < n:
                out[i] = nxt
        return out

    def _rows(self, kind: str, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Every tensor but ``ok`` of rows ``indices`` of the ``kind`` chunks."""
        picked: dict[str, list[torch.Tensor]] = {}
        for i in indices:
            f = self._file(f"{kind}_{i // CHUNK:05d}")
            r = i % CHUNK
            for key in f.keys():
                if key != "ok":
                    picked.setdefault(key, []).append(f.get_slice(key)[r:r + 1])
        return {k: torch.cat(v) for k, v in picked.items()}

    def prompts(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Text conditioning of prompts ``indices`` (as Conditioner.encode_prompts returns it)."""
        return self._rows("prompts", indices)

    def uncond(self) -> dict[str, torch.Tensor]:
        """The unconditional embedding, one row."""
        f = self._file("uncond")
        return {k: f.get_tensor(k) for k in f.keys()}

    def real(self, indices: Sequence[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int]]:
        """(latents, caption conditioning (empty for class folders), the items used): an
        unreadable item is replaced by the next readable one, as RealImages.load does."""
        used = [self._next_good[i] for i in indices]
        rows = self._rows("images", used)
        latents = rows.pop("latents")
        return latents, {k.removeprefix("cond."): v for k, v in rows.items()}, used


class CachedConditioning:
    """``data.LiveConditioning``'s interface over a built cache: rows on ``device``, the one
    unconditional row expanded, the items used by ``real`` as RealImages items."""

    def __init__(self, cache: ConditioningCache, real, device):
        self.cache, self.real_images, self.device = cache, real, device
        self._uncond1 = cond_to(cache.uncond(), device) if "uncond" in cache.tasks else None

    def prompts(self, idx) -> dict[str, torch.Tensor]:
        return cond_to(self.cache.prompts(idx), self.device)

    def uncond(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._uncond1.items()}

    def real(self, idx):
        latents, cond, used = self.cache.real(idx)
        return latents.to(self.device), cond_to(cond, self.device), [self.real_images.items[i] for i in used]


def open_source(cfg, teacher, conditioner, vae, *, prompts, real, resolution: int, sample_shape, rank: int,
                world: int, device, full_verify: bool = False) -> CachedConditioning:
    """The cache for this teacher, resolution, prompts file and image folder, built first if needed
    (collective: ranks share the build); the text encoders then leave the accelerator, as nothing
    encodes text any more. ``full_verify``: re-hash every chunk of a complete cache (prepare)."""
    from .data import prompts_fingerprint
    from .models import vae as vae_io

    text = conditioner.text
    inputs = {"teacher": teacher_fingerprint(teacher.source, teacher.config_source), "family": teacher.family,
              "resolution": resolution,
              "prompts": prompts_fingerprint(cfg.prompts, cfg.caption_column) if prompts is not None else None,
              "real_images": real_images_fingerprint(real) if real is not None else None}
    builder = Builder(prompts, real, conditioner.encode_prompts if text else None,
                      lambda images: vae_io.encode(vae, images.to(device)),
                      (lambda: conditioner.uncond(1)) if text else None, sample_shape)
    c = open_or_build(default_root(), inputs, builder, rank=rank, world=world, max_bad_fraction=cfg.max_bad_fraction,
                      full_verify=full_verify)
    source = CachedConditioning(c, real, device)
    if text:
        for enc in conditioner.encoders:
            enc.to("cpu")
    if real is not None:
        real.bad = set(c.bad)
    return source


def prepare(recipe, recipe_path: str | Path | None = None, *, progress: bool = True) -> ConditioningCache:
    """``dmd2 prepare``: build, finish or verify the recipe's conditioning cache, under exactly the
    key ``dmd2 train`` looks for, without the denoiser or any engine. Under the launcher each rank
    encodes its share (gloo). Returns the complete, verified cache."""
    import time

    from .data import build_batches
    from .engines import device as default_device
    from .generate import barrier, dist_env
    from .models import load_teacher

    d, m = recipe.data, recipe.model
    if recipe.regression is not None:
        raise UserError("regression: the regression stage reads its ODE pairs (dmd2 ode-pairs), not a conditioning "
                        "cache; nothing to prepare")
    if not d.cache:
        raise UserError("data.cache: false: training encodes every step, so there is nothing to prepare; "
                        "set data.cache=true")
    rank, world = dist_env()
    barrier(world)  # starts the gloo group the cache's barriers use
    started = time.perf_counter()
    teacher = load_teacher(m.teacher, m.family, m.teacher_config, denoiser=False, resolution=recipe.train.resolution)
    if teacher.family == "classcond" and d.real_images is None:
        raise UserError("data.real_images: a class-conditional teacher's cache holds real-image latents only; "
                        "without data.real_images there is nothing to prepare")
    resolution = teacher.training_resolution(recipe.train.resolution)
    if teacher.family != "classcond":
        teacher.check_cfg(recipe.loss.cfg_scale)
    batches = build_batches(d, teacher, resolution=resolution, batch_size=recipe.train.batch_size,
                            seed=recipe.train.seed, cfg_scale=recipe.loss.cfg_scale, rank=rank, world=world,
                            device=default_device(), full_verify=True)
    cache = batches.source.cache
    if rank == 0:
        st, secs = cache.stats, time.perf_counter() - started
        n, s = st["timing"].get("images", (0, 0.0))
        what = ("found complete and every chunk verified" if st["found"] else
                f"built {st['built_rows']} rows in {st['seconds']:.1f} s"
                + (f" (images at {n / s:.0f}/s on rank 0)" if n and s else "")
                + (f", {st['kept_shards']} finished chunks kept" if st["kept_shards"] else ""))
        bad = f", {len(cache.bad)} unreadable skipped" if cache.bad else ""
        print(f"conditioning cache {cache.folder}: {cache.num_prompts} prompts, {cache.images} images{bad}; {what} "
              f"({secs:.1f} s in all)")
        if recipe_path is not None:
            print(f"`dmd2 train {recipe_path}` reads it")
    barrier(world)
    return cache
