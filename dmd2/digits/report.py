"""The demo's table: one row per sampler, scored from the images ``dmd2 eval`` kept, and the
quality targets in the README ("The main job on CPU").

The images come from ``dmd2 eval --draw-only``; FID (clean-fid's features with the digits feature
extractor, ``dmd2.evaluate.folder_features``, as ``dmd2 eval --fid`` takes it) and precision/recall
(k = 3) come from one pass of features over them, and label accuracy from the held-out SVM of
``classifiers``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import NUM_CLASSES

# the three benchmarks: class-conditional EDM; SDXL-style text-to-image (DDPM, UNet); SD3-style flow
# matching (transformer) on the same VAE latents and prompts
DIGITS, T2I, FLOW = "digits", "digits-t2i", "digits-flow"
TEXT = (T2I, FLOW)  # prompted benchmarks: 16 px images judged at 8 x 8, the teacher with and without CFG
MAIN_STUDENTS = ("student_1step", "student_4step")  # the _first3 / _quarter rows are the same students again


@dataclass
class Row:
    # teacher, teacher_cfg, teacher_nocfg, student_1step(_warm), student_4step(_first3|_quarter), regression_only,
    # real_heldout
    name: str
    nfe: int  # sampling steps (network calls per image without CFG; 0: real images)
    fid: float
    precision: float
    recall: float
    label_accuracy: float
    images_per_s: float | None
    benchmark: str = DIGITS
    steps: int | None = None  # students: training steps of the scored checkpoint

    @property
    def key(self) -> str:
        prefix = {T2I: "t2i ", FLOW: "flow "}.get(self.benchmark, "")
        return f"{prefix}{self.name}@{self.nfe}"


class Judge:
    """The feature extractor, the training digits' features and the label classifier, loaded once."""

    def __init__(self, features: Path, train_dir: Path):
        from ..evaluate import folder_features, load_feature_extractor
        from . import classifiers
        from .data import read_class_folders

        self.extractor = load_feature_extractor(features)
        self.real = folder_features(train_dir, self.extractor, batch_size=500)
        self.labels = classifiers.train_label_classifier(read_class_folders(train_dir))

    def _row(self, name: str, nfe: int, folder: Path, images: np.ndarray, labels: np.ndarray, **kw) -> Row:
        """FID, precision and recall from one pass of features over ``folder``."""
        from ..evaluate import folder_features, frechet_distance, stats
        from . import classifiers
        from .metrics import precision_recall

        feats = folder_features(folder, self.extractor, batch_size=500)
        fid = frechet_distance(*stats(feats), *stats(self.real))
        prec, rec = precision_recall(self.real, feats)
        acc = float((classifiers.predict_labels(self.labels, images) == labels).mean())
        return Row(name, nfe, fid, prec, rec, acc, None, **kw)

    def row(self, name: str, nfe: int, folder: Path, n: int, **kw) -> Row:
        """A sampler's row from its ``n`` images ``folder/{i:06d}.png``; image i has class i mod C
        (digits-t2i: prompt i mod 60, whose digit is i mod 10)."""
        from ..generate import load_images

        images = load_images(folder, range(n)).numpy()
        return self._row(name, nfe, folder, images, np.arange(n) % NUM_CLASSES, **kw)

    def score(self, name: str, nfe: int, folder: Path, n: int, benchmark: str, **kw) -> tuple[Row, Path]:
        """The row of the images ``dmd2 eval --draw-only`` kept in ``folder``, and the folder it
        judged: FID, precision and recall from one pass of features; digits-t2i's (digits-flow's)
        16 px images are reduced to 8 x 8 grey first (``<folder>_8px``), into the same feature space."""
        if benchmark in TEXT:
            from .t2i import downscale_folder

            folder = downscale_folder(folder, folder.with_name(folder.name + "_8px"), n)
        return self.row(name, nfe, folder, n, benchmark=benchmark, **kw), folder

    def floor(self, heldout_dir: Path, benchmark: str = DIGITS) -> Row:
        """The real-vs-real floor: held-out digits against the training digits, measured the same way."""
        from .data import read_class_folders

        images, labels = read_class_folders(heldout_dir)
        return self._row("real_heldout", 0, heldout_dir, images, labels, benchmark=benchmark)


def comparison_grid(rows: list[Row], folders: dict[str, Path], path: Path, per_class: int = 2, scale: int = 4) -> Path:
    """One row of digits 0..9 (``per_class`` rows each) per sampler, named on the left."""
    from PIL import Image, ImageDraw
    from torchvision.utils import make_grid

    from ..generate import load_images

    cell, pad, left = 8 * scale, 2, 150
    names = [r.key for r in rows if r.key in folders]
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
    head = (f"{'benchmark':<11} {'sampler':<22} {'calls':>5} {'steps':>5} {'FID':>8} {'precision':>9} {'recall':>7} "
            f"{'label acc':>9} {'images/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = f"{r.images_per_s:9.0f}" if r.images_per_s else f"{'-':>9}"
        steps = f"{r.steps:>5}" if r.steps is not None else f"{'-':>5}"
        lines.append(f"{r.benchmark:<11} {r.name:<22} {r.nfe:>5} {steps} {r.fid:8.3f} {r.precision:9.3f} {r.recall:7.3f} "
                     f"{r.label_accuracy:9.3f} {speed}")
    return "\n".join(lines)


def _find(rows: list[Row], benchmark: str, name: str, nfe: int | None = None) -> Row | None:
    return next((r for r in rows if r.benchmark == benchmark and r.name == name and nfe in (None, r.nfe)), None)


def check_targets(rows: list[Row], which: str, wall_s: float | None = None,
                  budget_s: float | None = None) -> list[tuple[str, bool]]:
    """The quality targets (README, "The main job on CPU"), as (description with figures, met),
    and the run's wall time ``wall_s`` against ``budget_s`` when both are given. A target whose
    rows the profile does not produce is not checked."""
    checks: list[tuple[str, bool]] = []
    if wall_s is not None and budget_s is not None:
        checks.append((f"wall time {wall_s / 60:.1f} min <= {budget_s / 60:g} min", wall_s <= budget_s))

    def le(a: Row | None, b: Row | None, factor: float = 1.0, what: str = "FID") -> None:
        if a is None or b is None:
            return
        x, y = (a.fid, b.fid) if what == "FID" else (a.recall, b.recall)
        text = f"{a.key} {what} {x:.2f} " + ("<=" if what == "FID" else ">=") + \
            (f" {factor:g} x " if factor != 1 else " ") + f"{b.key} {what} {y:.2f}"
        checks.append((text, x <= factor * y if what == "FID" else x >= factor * y))

    def acc(r: Row | None, floor: float) -> None:
        if r is not None:
            checks.append((f"{r.key} label accuracy {r.label_accuracy:.3f} >= {floor}", r.label_accuracy >= floor))

    if which == "test":
        le(_find(rows, DIGITS, "student_1step"), _find(rows, DIGITS, "teacher", 1), 0.5)
        for bench in TEXT:
            one = _find(rows, bench, "student_1step")
            if one is not None:
                le(one, _find(rows, bench, "teacher_cfg", one.nfe), 0.5)
        return checks
    if which == "demo":
        for r in rows:
            if r.name in MAIN_STUDENTS:
                teacher = _find(rows, r.benchmark, "teacher" if r.benchmark == DIGITS else "teacher_cfg", r.nfe)
                le(r, teacher, 0.25)
                acc(r, 0.9)
        return checks
    # bench
    for bench, teacher_name in ((DIGITS, "teacher"), (T2I, "teacher_cfg"), (FLOW, "teacher_cfg")):
        one, four = _find(rows, bench, "student_1step"), _find(rows, bench, "student_4step")
        t50 = _find(rows, bench, teacher_name, 50)
        if bench in TEXT and t50 is not None:
            floor = _find(rows, bench, "real_heldout")
            acc(t50, 0.95)
            le(t50, floor, 3.0)
        le(one, t50)
        le(four, one)
        le(four, _find(rows, bench, "student_4step_first3"))
        le(four, _find(rows, bench, "student_4step_quarter"))
        for r in (one, four):
            acc(r, 0.97)
            if t50 is not None and r is not None:
                le(r, t50, 0.8, what="recall")
        warm = _find(rows, bench, "student_1step_warm")  # the regression stage's warm start, equal DMD2 steps
        le(warm, one)
        le(warm, one, what="recall")
    return checks
