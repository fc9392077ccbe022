"""Shared by the tests that run the real CLI in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIST_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}


def cli_env(**extra) -> dict:
    """A fresh process group: drop what an in-process engine test left in os.environ."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "DMD2_FAULT"}
    env.update({"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli_cmd(*args, ranks=1) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "dmd2", *map(str, args)]
    launcher = Path(sys.executable).parent / "deepspeed"
    port = 29500 + (os.getpid() * 7 + len(args)) % 2000
    return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), "--module", "dmd2", *map(str, args)]


def run_cli(*args, ranks=1, timeout=600, fault=None, **env):
    extra = {"DMD2_FAULT": fault} if fault else {}
    return subprocess.run(cli_cmd(*args, ranks=ranks), cwd=REPO, env={**cli_env(**env), **extra},
                          capture_output=True, text=True, timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loss_curve(run: Path) -> dict[int, dict]:
    """step -> losses of the last time that step ran (a resumed run re-runs lost steps)."""
    out = {}
    for row in metrics(run):
        out[row["step"]] = {k: v for k, v in row.items() if "loss" in k or k in ("k", "skipped")}
    return out
