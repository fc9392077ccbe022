"""Resumable training state: both engines' ZeRO state + step, one folder per saved step.

Layout of ``<output_dir>/checkpoints/step_XXXXXXXX/``::

    generator/          DeepSpeed tag folder of the generator engine
    critic/             DeepSpeed tag folder of the critic engine (the frozen teacher is not saved;
                        named guidance/ in checkpoints written before 0.2, which still load)
    manifest.rankR.json size and sha256 of every file rank R wrote
    state.json          step and what resume checks
    COMMITTED           written last, atomically, after a barrier: only then does the folder count

A checkpoint counts only when committed and verified: torch and safetensors both load a
flipped byte silently, so the manifests' checksums are what catch it. Randomness and data order
derive from (seed, rank, step), so the step is all the loop needs; it is read from state.json,
never parsed from a folder name.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from . import faults
from .errors import UserError
from .files import atomic_write, sha256_file

COMMIT = "COMMITTED"
TAGS = ("generator", "critic")


class CheckpointError(Exception):
    """A checkpoint that is incomplete or corrupt; str(e) names the file."""


class DiskFull(Exception):
    """The disk filled up during a save; str(e) is one line naming the folder and the space a
    checkpoint needs. The half-written checkpoint is removed; the previous one stays valid."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_committed(ckpt: Path) -> bool:
    return (ckpt / COMMIT).is_file() and (ckpt / "state.json").is_file()


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: unreadable ({e})") from None


def committed(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders, oldest first (ordered by the step in state.json)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and is_committed(d):
            try:
                found.append((read_state(d)["step"], d))
            except (CheckpointError, KeyError):
                continue
    return [d for _, d in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    done = committed(run_dir)
    return done[-1] if done else None


def _rank_files(ckpt: Path, rank: int) -> list[Path]:
    """Files rank ``rank`` wrote: its own ZeRO partitions (rank 0 also the shared ones)."""
    mine = []
    for tag in TAGS:
        if not (ckpt / tag).is_dir():  # critic/: absent from a regression-stage run's checkpoints
            continue
        for f in sorted((ckpt / tag).iterdir()):
            if f"zero_pp_rank_{rank}_" in f.name or (rank == 0 and "zero_pp_rank_" not in f.name):
                mine.append(f)
    return mine


def write_manifest(ckpt: Path, rank: int) -> None:
    files = {str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in _rank_files(ckpt, rank)}
    atomic_write(ckpt / f"manifest.rank{rank}.json", json.dumps(files, indent=1))


def verify(ckpt: Path, rank: int | None = None) -> dict:
    """Check a checkpoint; raises CheckpointError naming the bad file, returns state.json.

    Every rank checks that all manifests exist and all sizes match (cheap); checksums are
    computed for ``rank``'s own files, or all files when rank is None.
    """
    if not is_committed(ckpt):
        raise CheckpointError(f"{ckpt}: not committed (no {COMMIT} marker; a save was interrupted)")
    state = read_state(ckpt)
    world = int(state.get("world_size", 1))
    for r in range(world):
        mpath = ckpt / f"manifest.rank{r}.json"
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"{mpath}: missing or unreadable manifest") from None
        if not any(f"zero_pp_rank_{r}_" in name for name in manifest):
            raise CheckpointError(f"{mpath}: lists none of rank {r}'s shards")
        for name, meta in manifest.items():
            f = ckpt / name
            if not f.is_file():
                raise CheckpointError(f"{f}: missing")
            if f.stat().st_size != meta["size"]:
                raise CheckpointError(f"{f}: size {f.stat().st_size} != {meta['size']} (truncated?)")
            if (rank is None or rank == r) and sha256_file(f) != meta["sha256"]:
                raise CheckpointError(f"{f}: checksum mismatch (corrupt)")
    return state


def _invalidate(ckpt: Path) -> None:
    """Make a folder clearly invalid first (marker gone), then delete it."""
    (ckpt / COMMIT).unlink(missing_ok=True)
    faults.point("rotate_after_uncommit")
    shutil.rmtree(ckpt, ignore_errors=True)


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove folders of interrupted saves (rank 0, at start-up, before anyone saves)."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and not is_committed(d):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
    return removed


def _size(folder: Path | None) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder is not None and folder.is_dir() else 0


def _disk_full(e: BaseException, folder: Path, needed: int) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # torch.save reports a failed write as RuntimeError ("PytorchStreamWriter failed writing file ...")
    try:
        return "writ" in str(e).lower() and shutil.disk_usage(folder).free < max(needed, 1 << 20)
    except OSError:
        return False


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def save(run_dir: Path, step: int, gen_engine, critic_engine, state: dict, *, keep_last: int, rank: int,
         protect: Path | None = None, ema=None) -> Path:
    """Save both engines collectively; commit on rank 0 after every rank's manifest; rotate.

    A full disk raises DiskFull (one line: the folder, the space a checkpoint needs) after
    removing the uncommitted folder; the newest committed checkpoint is never touched by it."""
    ckpt = checkpoints_dir(run_dir) / f"step_{step:08d}"
    previous = latest(run_dir)
    needed = _size(previous)  # now: a same-step leftover is deleted by the save
    try:
        return _save(run_dir, ckpt, step, gen_engine, critic_engine, state, keep_last=keep_last, rank=rank,
                     protect=protect, ema=ema)
    except (OSError, RuntimeError) as e:
        if not _disk_full(e, ckpt.parent, needed):
            raise
        written = _size(ckpt)
        if rank == 0:
            clean_partial(run_dir)  # this save's folder, and an old one caught mid-rotation
        try:
            free = f"{_gib(shutil.disk_usage(ckpt.parent).free)} free there"
        except OSError:
            free = "free space unknown"
        size = (f"about {_gib(needed)} ({needed} bytes, the size of {previous.name})" if needed
                else f"more than the {_gib(written)} ({written} bytes) written before the disk filled")
        good = latest(run_dir)
        resume = f"resume from {good.name}" if good is not None else "start over"
        raise DiskFull(f"{ckpt.parent}: no space left on device while saving step {step}; a checkpoint needs {size}, "
                       f"{free}; free space and re-run the same command to {resume}") from None


def _save(run_dir: Path, ckpt: Path, step: int, gen_engine, critic_engine, state: dict, *, keep_last: int,
          rank: int, protect: Path | None, ema) -> Path:
    import deepspeed.comm as dist

    if rank == 0 and ckpt.exists():
        _invalidate(ckpt)  # a leftover (or a checkpoint we fell back from) of the same step
    dist.barrier()
    gen_engine.save_checkpoint(str(ckpt), tag="generator", save_latest=False)
    faults.point("save_after_generator", step)
    if critic_engine is not None:  # None: the regression stage trains the generator alone
        critic_engine.save_checkpoint(str(ckpt), tag="critic", save_latest=False, exclude_frozen_parameters=True)
        faults.point("save_after_critic", step)
    if ema is not None:
        ema.save(ckpt / "generator", rank)
    dist.barrier()  # every rank's shards are on disk before anyone lists or hashes them
    write_manifest(ckpt, rank)
    dist.barrier()
    if rank == 0:
        atomic_write(ckpt / "state.json", json.dumps({**state, "step": step}, indent=1))
        faults.point("save_before_commit", step)
        atomic_write(ckpt / COMMIT, "ok\n")
        faults.point("save_after_commit", step)
        for old in committed(run_dir)[:-keep_last]:
            if protect is None or old.resolve() != protect.resolve():
                _invalidate(old)
    dist.barrier()
    return ckpt


def load(ckpt: Path, gen_engine, critic_engine) -> None:
    """Load both engines by explicit tag and check that the tag asked for is the one loaded
    (DeepSpeed falls back to the tag in `latest`, and only warns when it is missing)."""
    critic_tag = "critic" if (ckpt / "critic").is_dir() else "guidance"  # the engine's name before 0.2
    for engine, tag in ((gen_engine, "generator"), (critic_engine, critic_tag)):
        if engine is None:  # the regression stage: no critic
            continue
        path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=False)
        if path is None or Path(path).parent.name != tag or Path(path).parent.parent.resolve() != ckpt.resolve():
            raise CheckpointError(f"{ckpt / tag}: DeepSpeed loaded {path!r} instead")


def resolve_resume(run_dir: Path, explicit: str | None, rank: int, world: int) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, and warnings about corrupt ones skipped.

    Explicit (train.resume_from): must verify, else a one-line error naming the file.
    Automatic: the newest committed checkpoint that verifies; older ones are the fallback.
    Every rank verifies its own shards' checksums; the decision is agreed on all ranks.
    """
    import deepspeed.comm as dist
    import torch

    candidates = [Path(explicit)] if explicit else list(reversed(committed(run_dir)))
    warnings = []
    for ckpt in candidates:
        try:
            state = verify(ckpt, rank=rank)
            if int(state.get("world_size", 1)) != world:
                raise UserError(f"{ckpt}: saved with {state.get('world_size')} ranks, resuming with {world}; "
                                "use the same number of ranks (or convert it with deepspeed's ds_to_universal)")
            err = ""
        except CheckpointError as e:
            err = str(e)
        bad = torch.tensor([1.0 if err else 0.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # a shard bad on any rank makes it bad for all
        if bad.item() == 0:
            return ckpt, warnings
        if explicit:
            raise UserError(f"train.resume_from: {err or f'{ckpt}: corrupt on another rank'}")
        warnings.append(f"warning: skipping checkpoint {err or ckpt}; falling back to an older one")
    return None, warnings


def consolidated_generator(ckpt: Path, ema: bool = False) -> dict:
    """The generator's full fp32 weights (or their EMA) from a ZeRO checkpoint, keys as in the
    diffusers UNet."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if ema:
        from . import ema as ema_mod

        sd = ema_mod.consolidated(ckpt / "generator")
    else:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="generator")
    return {k.removeprefix("unet."): v for k, v in sd.items()}


def consolidated_critic(ckpt: Path) -> dict:
    """The critic's trainable weights (fake score, GAN head; the frozen teacher is never saved),
    full fp32, keys as in ``models.roles.Critic``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="critic")
