"""Resumable training state: both engines' ZeRO state + step, one folder per saved step.

Layout of ``<output_dir>/checkpoints/step_XXXXXXXX/``::

    generator/       DeepSpeed tag folder of the generator engine
    guidance/        DeepSpeed tag folder of the guidance engine (the frozen teacher is not saved)
    state.json       step and what resume checks
    COMMITTED        written last, atomically, after every rank finished: only then does it count

Randomness and data order derive from (seed, rank, step), so the step is all the loop needs.
The step is read from state.json, never parsed from a folder name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMMIT = "COMMITTED"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def committed(run_dir: str | Path) -> list[Path]:
    """Committed checkpoint folders, oldest first (ordered by the step in state.json)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if (d / COMMIT).is_file() and (d / "state.json").is_file():
            found.append((json.loads((d / "state.json").read_text())["step"], d))
    return [d for _, d in sorted(found)]


def latest(run_dir: str | Path) -> Path | None:
    done = committed(run_dir)
    return done[-1] if done else None


def read_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "state.json").read_text())


def save(run_dir: Path, step: int, gen_engine, guidance_engine, state: dict, *, keep_last: int, rank: int) -> Path:
    """Save both engines collectively, then commit on rank 0 and rotate old checkpoints."""
    import deepspeed.comm as dist

    ckpt = checkpoints_dir(run_dir) / f"step_{step:08d}"
    if rank == 0 and ckpt.exists():
        shutil.rmtree(ckpt)  # an uncommitted leftover of a crashed save of the same step
    dist.barrier()
    gen_engine.save_checkpoint(str(ckpt), tag="generator", save_latest=False)
    guidance_engine.save_checkpoint(str(ckpt), tag="guidance", save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        _atomic_write(ckpt / "state.json", json.dumps({**state, "step": step}, indent=1))
        _atomic_write(ckpt / COMMIT, "ok\n")
        for old in committed(run_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return ckpt


def load(ckpt: Path, gen_engine, guidance_engine) -> dict:
    """Load both engines by explicit tag; returns state.json."""
    for engine, tag in ((gen_engine, "generator"), (guidance_engine, "guidance")):
        path, _ = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=False)
        if path is None:
            raise RuntimeError(f"checkpoint {ckpt}/{tag} could not be loaded")
    return read_state(ckpt)


def consolidated_generator(ckpt: Path) -> dict:
    """The generator's full fp32 weights from a ZeRO checkpoint, keys as in the diffusers UNet."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="generator")
    return {k.removeprefix("unet."): v for k, v in sd.items()}
