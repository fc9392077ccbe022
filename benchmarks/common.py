"""Measuring side by side: alternate the variants, repeat, take medians; rows {name, value, goal, unit}."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

OUT = Path("runs/bench")


def cpu_env() -> None:
    """The settings every CPU measurement runs under (as the tests: one thread, CPU DeepSpeed, offline)."""
    for k, v in {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def child_env(**extra) -> dict:
    """The environment for a child process: its own process group (a parent that initialised
    torch.distributed holds MASTER_PORT)."""
    from dmd2.engines import fresh_process_env

    return fresh_process_env(**extra)


def alternate(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant, measured in turns (ABC, CBA, ABC, ...) so that a change in
    machine load hits all variants alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        for k in names if r % 2 == 0 else reversed(names):
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of t[num] / t[den] (each round's pair ran back to back)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def median(xs) -> float:
    return statistics.median(xs)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class Results:
    """Rows {name, value, goal, unit}; ``goal`` is a comparison such as '>= 0.95' or None (report only)."""

    def __init__(self, path: Path = OUT / "results.json", echo: bool = True):
        self.path, self.echo = Path(path), echo
        self.rows: list[dict] = []

    def add(self, name: str, value: float | None, goal: str | None, unit: str) -> dict:
        row = {"name": name, "value": None if value is None else round(float(value), 4), "goal": goal, "unit": unit}
        self.rows.append(row)
        if self.echo:
            print(f"  -> {name}: {_fmt(row['value'])} {unit} (goal {goal or '-'}: {verdict(row)})", flush=True)
        return row

    def write(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.rows, indent=1) + "\n")
        return self.path

    def table(self) -> str:
        lines = [f"{'name':<40} {'value':>10}  {'unit':<28} {'goal':<9} result"]
        for r in self.rows:
            lines.append(f"{r['name']:<40} {_fmt(r['value']):>10}  {r['unit']:<28} {r['goal'] or '-':<9} {verdict(r)}")
        return "\n".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def verdict(row: dict) -> str:
    goal, v = row["goal"], row["value"]
    if goal is None:
        return "(report)"
    if v is None:
        return "not measured"
    op, target = goal.split()
    ok = {">=": v >= float(target), "<=": v <= float(target), "<": v < float(target), ">": v > float(target),
          "==": abs(v - float(target)) < 1e-9}[op]
    return "met" if ok else "NOT met"
