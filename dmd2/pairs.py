"""``dmd2 ode-pairs``: noise -> image pairs drawn by the teacher's deterministic ODE sampler with the
recipe's CFG, the data of the regression stage (docs/algorithm.md §10); and their reader.

The folder: ``manifest.json`` (the settings, then the shards with their sha256 once complete) and
shards ``pairs_XXXXX.safetensors`` of ``--shard-size`` pairs, each with a ``.json`` sidecar (its
sha256) written after the shard itself, so a shard is done exactly when its sidecar verifies.
A shard holds, per pair: ``noise`` (the standard normal eps the generator's input is made of),
``target`` (the teacher's x0 in the generator's space), ``index``, and the conditioning the UNet
takes as ``cond.<key>`` (prompt embeddings, pooled embedding and time ids; or class labels).

Pair i depends on (train.seed, i) only: its noise seed, its prompt (a seeded permutation of
``data.prompts``) or label (i mod classes); shard j is drawn whole by rank j mod world, in
batches inside the shard. So a pair is the same whatever the number of ranks, and a killed
run re-run with the same command keeps the shards it finished and draws the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .files import atomic_write, save_shard, sha256_file, shard_state

MANIFEST = "manifest.json"
FORMAT = "dmd2-ode-pairs-1"


def shard_name(j: int) -> str:
    return f"pairs_{j:05d}.safetensors"


def pair_seed(seed: int, i: int) -> int:
    """Pair i's noise seed: from (seed, i) only."""
    return int(np.random.SeedSequence([int(seed), 7, int(i)]).generate_state(1, np.uint32)[0])


def _settings(recipe, teacher, *, num_pairs: int, steps: int, shard_size: int, resolution: int) -> dict:
    return {"format": FORMAT, "teacher": recipe.model.teacher, "family": teacher.family, "num_pairs": num_pairs,
            "shard_size": shard_size, "teacher_steps": steps, "cfg_scale": recipe.loss.cfg_scale,
            "seed": recipe.train.seed, "resolution": resolution, "prompts": recipe.data.prompts,
            "conditioning_timestep": recipe.generator.conditioning_timestep,
            "shape": [teacher.channels, teacher.latent_size(resolution), teacher.latent_size(resolution)]}


def _shard_done(out: Path, j: int) -> bool:
    return shard_state(out / shard_name(j)) == "done"  # a corrupt shard is drawn again


def _check_folder(out: Path, settings: dict) -> dict | None:
    """The existing manifest when ``out`` holds pairs drawn with the same settings; refuse a folder
    that holds anything else (new pairs never mix with other ones)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{manifest}: unreadable ({e}); choose another --out") from None
        for k, v in settings.items():
            if old.get("settings", {}).get(k) != v:
                raise UserError(f"{manifest}: these pairs were drawn with {k}={old.get('settings', {}).get(k)!r}, "
                                f"now {v!r}; use the same command to resume, or another --out")
        return old
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out}: not empty and holds no {MANIFEST}; choose an empty or new folder")
    return None


def draw_pairs(recipe, out: str | Path, *, num_pairs: int, steps: int = 50, shard_size: int = 1000,
               batch_size: int = 8, device=None, progress: bool = True) -> Path:
    """Draw (or finish drawing) the pairs into ``out``; every rank of the launcher draws its shards."""
    from tqdm import tqdm

    from .data import load_prompts
    from .engines import device as default_device
    from .generate import barrier, dist_env, teacher_timesteps
    from .models import load_teacher
    from .models.conditioning import Conditioner
    from .models.denoiser import Denoiser
    from .models.roles import guided_x0
    from .models.student import fp32
    from .sampling import Noise, sample

    if num_pairs < 1 or shard_size < 1 or batch_size < 1:
        raise UserError("--num-pairs, --shard-size and --batch-size must be at least 1")
    rank, world = dist_env()
    out = Path(out)
    device = torch.device(device or default_device())
    m = recipe.model
    teacher = load_teacher(m.teacher, m.family, m.teacher_config, resolution=recipe.train.resolution)
    resolution = teacher.training_resolution(recipe.train.resolution)
    teacher.check_cfg(recipe.loss.cfg_scale)
    settings = _settings(recipe, teacher, num_pairs=num_pairs, steps=steps, shard_size=shard_size,
                         resolution=resolution)
    old = _check_folder(out, settings)
    shards = -(-num_pairs // shard_size)
    if old is not None and old.get("complete"):
        if rank == 0:
            print(f"{out}: all {num_pairs} pairs are already drawn")
        return out
    cond = Conditioner(teacher, resolution, device)
    prompts = order = None
    if cond.text:
        if recipe.data.prompts is None:
            raise UserError("data.prompts: ode-pairs draws the teacher's images for these prompts; set it")
        prompts = load_prompts(recipe.data.prompts, caption_column=recipe.data.caption_column)
        order = np.random.default_rng([recipe.train.seed, 11]).permutation(len(prompts))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if old is None:
            atomic_write(out / MANIFEST, json.dumps({"settings": settings, "complete": False}, indent=1))
    barrier(world)

    for mod in (teacher.unet, *teacher.text_encoders):
        fp32(mod, device)
    denoiser = Denoiser(teacher.unet.eval(), teacher.schedule, teacher.guidance(recipe.loss.cfg_scale))
    uncond = cond.uncond(1) if cond.text and recipe.loss.cfg_scale != 1.0 else None
    ts = teacher_timesteps(steps)
    shape = settings["shape"]

    def teacher_fn(x, t, c):
        u = None if uncond is None else {k: v.expand(len(x), *v.shape[1:]) for k, v in uncond.items()}
        return guided_x0(denoiser, x, t, c, u, recipe.loss.cfg_scale)

    mine = [j for j in range(rank, shards, world)]
    todo = [j for j in mine if not _shard_done(out, j)]
    total = sum(min(shard_size, num_pairs - j * shard_size) for j in todo)
    bar = tqdm(total=total, unit="pair", desc=f"ode-pairs ({len(mine) - len(todo)} of {len(mine)} shards kept)",
               disable=not (progress and rank == 0), dynamic_ncols=True)
    for j in todo:
        first, count = j * shard_size, min(shard_size, num_pairs - j * shard_size)
        rows: dict[str, list[torch.Tensor]] = {}
        for b in range(first, first + count, batch_size):
            idx = list(range(b, min(b + batch_size, first + count)))
            if cond.text:
                c = cond.encode_prompts([prompts[order[i % len(prompts)]] for i in idx])
            else:
                c = cond.encode_labels(torch.tensor([i % teacher.num_classes for i in idx]))
            seeds = [pair_seed(recipe.train.seed, i) for i in idx]
            eps = Noise.per_sample(seeds, device)((len(idx), *shape))
            # the same eps again through the sampler: its pure_noise scales it as the generator's input is
            x0 = sample(teacher_fn, teacher.schedule, c, (len(idx), *shape), ts, Noise.per_sample(seeds, device),
                        deterministic=True)
            for k, v in {"noise": eps, "target": x0.float(), "index": torch.tensor(idx),
                         **{f"cond.{k}": v for k, v in c.items()}}.items():
                rows.setdefault(k, []).append(v.detach().cpu())
            bar.update(len(idx))
        tensors = {k: torch.cat(v).contiguous() for k, v in rows.items()}
        save_shard(tensors, out / shard_name(j), {"first": first, "count": count}, fault=("pairs_after_shard", j))
    bar.close()
    barrier(world)
    if rank == 0:
        listing = []
        for j in range(shards):
            if not _shard_done(out, j):
                raise UserError(f"{out / shard_name(j)}: missing or fails its checksum after drawing; re-run the command")
            listing.append({"file": shard_name(j), **json.loads((out / shard_name(j)).with_suffix(".json").read_text())})
        prompt_of = ([prompts[order[i % len(prompts)]] for i in range(num_pairs)] if prompts is not None else None)
        atomic_write(out / MANIFEST, json.dumps({"settings": settings, "complete": True, "shards": listing,
                                                 **({"prompts": prompt_of} if prompt_of else {})}, indent=1))
        print(f"{out}: {num_pairs} pairs in {shards} shards ({steps} teacher steps, CFG {recipe.loss.cfg_scale})")
    barrier(world)
    return out


class Pairs:
    """The pairs of a complete ``dmd2 ode-pairs`` folder, read by index (shards opened lazily,
    tensors read one row at a time: memory does not grow with the number of pairs)."""

    def __init__(self, folder: str | Path, field: str = "regression.pairs"):
        self.folder = Path(folder)
        manifest = self.folder / MANIFEST
        try:
            self.manifest = json.loads(manifest.read_text())
        except FileNotFoundError:
            raise UserError(f"{field}: {self.folder} holds no {MANIFEST} (draw pairs with dmd2 ode-pairs)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"{field}: {manifest}: unreadable ({e})") from None
        if not self.manifest.get("complete"):
            raise UserError(f"{field}: {self.folder}: incomplete (re-run its dmd2 ode-pairs command to finish it)")
        self.settings = self.manifest["settings"]
        self.shard_size = self.settings["shard_size"]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.settings["num_pairs"])

    def verify(self) -> None:
        """Every shard against the manifest's sha256; a bad one is a one-line error naming it."""
        for s in self.manifest["shards"]:
            path = self.folder / s["file"]
            if not path.is_file() or sha256_file(path) != s["sha256"]:
                raise UserError(f"regression.pairs: {path}: missing or fails its checksum; draw the pairs again")

    def _shard(self, j: int):
        if j not in self._open:
            from safetensors import safe_open

            self._open[j] = safe_open(str(self.folder / shard_name(j)), framework="pt")
        return self._open[j]

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """noise, target and cond.* for ``indices``, stacked in that order."""
        out: dict[str, list[torch.Tensor]] = {}
        for i in indices:
            f = self._shard(i // self.shard_size)
            r = i % self.shard_size
            for k in f.keys():
                if k != "index":
                    out.setdefault(k, []).append(f.get_slice(k)[r:r + 1])
        return {k: torch.cat(v) for k, v in out.items()}
