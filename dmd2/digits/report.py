"""The demo's table: one row per sampler, scored from the images ``dmd2 eval`` kept, and the
quality targets in the README ("The main job on CPU").

FID comes from ``dmd2 eval`` (clean-fid with the digits feature extractor); precision/recall
(k = 3) use the same features of the same images (``dmd2.evaluate.folder_features``), and label
accuracy the held-out SVM of ``classifiers``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import NUM_CLASSES, RESOLUTION


@dataclass
class Row:
    name: str
    nfe: int  # network calls per image (0: real images)
    fid: float
    precision: float
    recall: float
    label_accuracy: float
    images_per_s: float | None


class Judge:
    """The feature extractor, the training digits' features and the label classifier, loaded once."""

    def __init__(self, features: Path, train_dir: Path):
        from ..evaluate import folder_features, load_feature_extractor
        from . import classifiers
        from .data import read_class_folders

        self.extractor = load_feature_extractor(features)
        self.real = folder_features(train_dir, self.extractor, batch_size=500)
        self.labels = classifiers.train_label_classifier(read_class_folders(train_dir))

    def _scores(self, folder: Path, images: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
        from ..evaluate import folder_features
        from . import classifiers
        from .metrics import precision_recall

        prec, rec = precision_recall(self.real, folder_features(folder, self.extractor, batch_size=500))
        return prec, rec, float((classifiers.predict_labels(self.labels, images) == labels).mean())

    def row(self, name: str, nfe: int, folder: Path, fid: float, n: int) -> Row:
        """A sampler's row from its ``n`` images ``folder/{i:06d}.png``; image i has class i mod C."""
        from ..generate import load_images

        images = load_images(folder, range(n)).numpy()
        return Row(name, nfe, fid, *self._scores(folder, images, np.arange(n) % NUM_CLASSES), None)

    def floor(self, heldout_dir: Path) -> Row:
        """The real-vs-real floor: held-out digits against the training digits, measured the same way."""
        from ..evaluate import folder_features, frechet_distance, stats
        from .data import read_class_folders

        images, labels = read_class_folders(heldout_dir)
        fid = frechet_distance(*stats(folder_features(heldout_dir, self.extractor, batch_size=500)), *stats(self.real))
        return Row(f"real_heldout (n={len(images)})", 0, fid, *self._scores(heldout_dir, images, labels), None)


def measure_speed(rows: list[Row], runs: dict[str, Path], teacher_dir: Path, n: int = 500) -> None:
    """images/s of each sampler on one core: ``n`` images in one batch, after a warm-up.
    ``runs`` maps a row-name prefix (e.g. "student_1step@") to its run folder."""
    import torch

    from ..generate import choose_timesteps, draw, teacher_draw
    from ..models import load_teacher
    from ..models.student import load_student

    torch.set_num_threads(1)
    conds, seeds = [i % NUM_CLASSES for i in range(n)], list(range(n))
    teacher = load_teacher(str(teacher_dir))
    for r in rows:
        run = next((path for prefix, path in runs.items() if r.name.startswith(prefix)), None)
        if r.name.startswith("teacher@"):
            def go(m, r=r):
                for _ in teacher_draw(teacher, conds, seeds, r.nfe, range(m), m, cfg_scale=1.0,
                                      resolution=RESOLUTION, device="cpu"):
                    pass
        elif run is not None:
            gen = load_student(run)
            ts = choose_timesteps(gen.timesteps, r.nfe)

            def go(m, gen=gen, ts=ts):
                for _ in draw(gen, conds, seeds, ts, range(m), m):
                    pass
        else:
            continue
        go(8)
        t0 = time.perf_counter()
        go(n)
        r.images_per_s = n / (time.perf_counter() - t0)


def comparison_grid(rows: list[Row], folders: dict[str, Path], path: Path, per_class: int = 2, scale: int = 4) -> Path:
    """One row of digits 0..9 (``per_class`` rows each) per sampler, named on the left."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    from ..generate import load_images

    cell, pad, left = 8 * scale, 2, 150
    names = [r.name for r in rows if r.name in folders]
    height = len(names) * (per_class * (cell + pad) + 6)
    img = Image.new("RGB", (left + NUM_CLASSES * (cell + pad), height + 16), "white")
    draw = ImageDraw.Draw(img)
    for c in range(NUM_CLASSES):
        draw.text((left + c * (cell + pad) + cell // 2 - 3, 2), str(c), fill="black")
    y = 16
    for name in names:
        draw.text((4, y + per_class * (cell + pad) // 2 - 6), name, fill="black")
        images = load_images(folders[name], range(per_class * NUM_CLASSES)).permute(0, 3, 1, 2)
        tiles = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)  # nearest-neighbour upscale
        # image i (class i mod 10) in column i mod 10; make_grid's border of `pad` sits above and left of it
        block = make_grid(tiles, nrow=NUM_CLASSES, padding=pad, pad_value=255)
        img.paste(Image.fromarray(block.permute(1, 2, 0).numpy()), (left - pad, y - pad))
        y += per_class * (cell + pad) + 6
    img.save(path)
    return path


def table(rows: list[Row]) -> str:
    head = f"{'sampler':<26} {'calls':>5} {'FID':>8} {'precision':>9} {'recall':>7} {'label acc':>9} {'images/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r.images_per_s:9.0f}" if r.images_per_s else f"{'-':>9}"
        lines.append(f"{r.name:<26} {r.nfe:>5} {r.fid:8.3f} {r.precision:9.3f} {r.recall:7.3f} {r.label_accuracy:9.3f} {speed}")
    return "\n".join(lines)


def check_targets(rows: list[Row], which: str) -> list[tuple[str, bool]]:
    """The demo's quality targets (README), as (description with figures, met)."""
    teacher = {r.nfe: r for r in rows if r.name.startswith("teacher@")}
    students = [r for r in rows if r.name.startswith("student")]
    one = next(r for r in students if r.nfe == 1)
    checks = []
    ratio = one.fid / teacher[1].fid
    if which == "test":
        return [(f"1-call student FID {one.fid:.2f} <= 0.5 x 1-call teacher FID {teacher[1].fid:.2f} "
                 f"(ratio {ratio:.3f})", ratio <= 0.5)]
    if which == "demo":
        checks.append((f"1-call student FID {one.fid:.2f} <= 0.25 x 1-call teacher FID {teacher[1].fid:.2f} "
                       f"(ratio {ratio:.3f})", ratio <= 0.25))
        checks += [(f"{r.name} label accuracy {r.label_accuracy:.3f} >= 0.9", r.label_accuracy >= 0.9) for r in students]
        return checks
    best = min((r for r in teacher.values() if r.nfe > 1), key=lambda r: r.fid)
    checks.append((f"1-call student FID {one.fid:.2f} <= best multi-step teacher FID {best.fid:.2f} ({best.name})",
                   one.fid <= best.fid))
    checks.append((f"1-call student FID {one.fid:.2f} <= 0.1 x 1-call teacher FID {teacher[1].fid:.2f} "
                   f"(ratio {ratio:.3f})", ratio <= 0.1))
    checks += [(f"{r.name} recall {r.recall:.3f} >= 0.8 x {best.name} recall {best.recall:.3f}",
                r.recall >= 0.8 * best.recall) for r in students]
    checks += [(f"{r.name} label accuracy {r.label_accuracy:.3f} >= 0.97", r.label_accuracy >= 0.97) for r in students]
    return checks


