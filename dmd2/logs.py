"""Rank-0 metrics sink: a progress line, metrics.jsonl in the run folder, wandb, preview grids;
and the start-up phase lines (``phase``) that ``--quiet`` silences."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

# Losses of the generator phase (distill.generator_loss); every other loss is the critic's.
GENERATOR_LOSSES = ("loss_dm", "loss_gan_g", "loss_generator", "loss_regression")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no phase lines or progress bars; errors, warnings and summaries still print."""
    global _quiet
    _quiet = quiet


def progress_on() -> bool:
    """Phase lines and progress bars are for rank 0 (RANK, as the launcher sets it), unless --quiet."""
    return not _quiet and int(os.environ.get("RANK", "0")) == 0


class phase:
    """One line per long start-up phase with its time, e.g. ``teacher loaded: PATH (3.2 s)``.

    ``with phase("teacher loaded: PATH"): ...`` prints when the block ends (not when it raises:
    the error stays the last line); ``p = phase("engines ready")`` ... ``p.done()`` times a stretch
    of code without re-indenting it.
    """

    def __init__(self, what: str):
        self.what, self.t0 = what, time.perf_counter()

    def __enter__(self) -> phase:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.done()

    def done(self, what: str | None = None) -> None:
        if progress_on():
            print(f"{what or self.what} ({time.perf_counter() - self.t0:.1f} s)", flush=True)


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W in [-1, 1] -> B x H x W x 3 uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


GRID_PADDING = 2  # px between images: small images (8x8 digits) stay apart instead of merging into strips
GRID_PAD_VALUE = 128  # mid-grey: visible between dark images (digits) and light ones alike
GRID_GROUPS_MAX = 16  # more conditions than this: a near-square grid (a row or column each would be a strip)


def save_grid(images: torch.Tensor, path: str | Path, *, cols: int | None = None, rows: int | None = None,
              padding: int = GRID_PADDING) -> Path:
    """Save B x 3 x H x W images in [-1, 1] as one PNG grid (``torchvision.utils.make_grid``), with
    ``padding`` px of grey between images.

    ``cols``: filled row by row, image i in column i mod cols. ``rows``: filled column by column,
    image i in row i mod rows. Neither: row by row, near-square. When image i has condition
    i mod n (``dmd2 sample``, training previews), ``cols=n`` puts one condition per column and
    ``rows=n`` one per row (see ``condition_layout``).
    """
    from PIL import Image
    from torchvision.utils import make_grid

    if cols and rows:
        raise ValueError("save_grid: pass cols or rows, not both")
    x = to_uint8_images(images).permute(0, 3, 1, 2)  # uint8 B x 3 x H x W: no second rounding
    b = len(x)
    if rows:
        rows = min(rows, b)
        cols = math.ceil(b / rows)
        # make_grid fills row by row: slot (r, c) takes image c * rows + r, blank past the end
        blank = torch.full_like(x[0], GRID_PAD_VALUE)
        x = torch.stack([x[c * rows + r] if c * rows + r < b else blank for r in range(rows) for c in range(cols)])
    grid = make_grid(x, nrow=cols or math.ceil(math.sqrt(b)), padding=padding, pad_value=GRID_PAD_VALUE)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
    return path


def condition_layout(n_conditions: int, text: bool, n_images: int) -> dict[str, int]:
    """``save_grid``'s layout for ``n_images`` images whose image i has condition i mod
    ``n_conditions``: one class per column (class-conditional), or one prompt per row when prompts
    repeat (each prompt drawn once would be a one-image-wide strip). Near-square with more than
    ``GRID_GROUPS_MAX`` conditions."""
    if not 1 <= n_conditions <= GRID_GROUPS_MAX:
        return {}
    if text:
        return {"rows": n_conditions} if n_conditions < n_images else {}
    return {"cols": n_conditions}


class RunLogger:
    """Writes on rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, cfg, *, rank: int, max_steps: int, start_step: int, recipe: dict):
        self.active = rank == 0
        self.cfg, self.run_dir, self.max_steps = cfg, Path(run_dir), max_steps
        self.start_step, self.t0 = start_step, time.time()
        self.wandb = None
        # The console line's generator losses: the mean over the generator steps since the last
        # printed line. With train.update_ratio 5 and log_every 10 no printed step is a generator
        # step, so the printed step's own losses would never show the generator.
        # (the regression stage updates the generator every step, whatever update_ratio says)
        ratio = 1 if recipe.get("regression") else int(recipe.get("train", {}).get("update_ratio", 1))
        self.gen_updates = -(-start_step // ratio)  # generator steps are the 0-based steps % ratio == 0
        self.gen_window: list[dict[str, float]] = []
        self.gen_last: tuple[int, dict[str, float]] | None = None
        if not self.active:
            return
        self.file = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, entity=cfg.wandb.entity,
                                    mode=cfg.wandb.mode, dir=str(self.run_dir), config=recipe,
                                    resume="allow", id=self._wandb_id())

    def _wandb_id(self) -> str:
        """One wandb run per run folder, so a resumed run continues the same curves."""
        path = self.run_dir / "wandb_id.txt"
        if not path.exists():
            import uuid

            path.write_text(uuid.uuid4().hex[:12])
        return path.read_text().strip()

    def log(self, step: int, metrics: dict[str, float], images_per_s: float) -> None:
        if not self.active:
            return
        row = {"step": step, **metrics, "images_per_s": images_per_s, "time": time.time()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        gen = {k: metrics[k] for k in GENERATOR_LOSSES if k in metrics}
        if gen:
            self.gen_updates += 1
            self.gen_window.append(gen)
            self.gen_last = (step, gen)
        if step % self.cfg.log_every == 0 or step == self.max_steps:
            done = step - self.start_step
            eta = (time.time() - self.t0) / max(done, 1) * (self.max_steps - step)
            critic = " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "loss" in k and k not in GENERATOR_LOSSES)
            critic = f"critic {critic} | " if critic else ""  # the regression stage has none
            print(f"step {step}/{self.max_steps} | {critic}{self._generator_losses()} | "
                  f"gen updates {self.gen_updates} | {images_per_s:.2f} img/s | eta {eta:.0f}s", flush=True)
            self.gen_window = []

    def _generator_losses(self) -> str:
        """Mean over this window's generator steps, else the latest (marked with its step)."""
        if self.gen_window:
            keys = [k for k in GENERATOR_LOSSES if all(k in w for w in self.gen_window)]
            mean = {k: sum(w[k] for w in self.gen_window) / len(self.gen_window) for k in keys}
            n = len(self.gen_window)
            head = "generator" if n == 1 else f"generator (mean of {n})"
            return head + " " + " ".join(f"{k} {v:.4g}" for k, v in mean.items())
        if self.gen_last is None:
            return "generator: no update yet"
        at, last = self.gen_last
        return f"generator (latest, step {at}) " + " ".join(f"{k} {v:.4g}" for k, v in last.items())

    def preview(self, step: int, images: torch.Tensor, **layout: int) -> None:
        """``layout``: ``save_grid``'s ``cols`` or ``rows`` (``condition_layout``)."""
        if not self.active:
            return
        path = save_grid(images, self.run_dir / "previews" / f"step_{step:08d}.png", **layout)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"preview": wandb.Image(str(path))}, step=step)

    def message(self, text: str) -> None:
        if self.active:
            print(text, flush=True)

    def close(self) -> None:
        if self.active:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
