"""scikit-learn's bundled digits written as the class sub-folders ``data.real_images`` reads.

``load_digits`` holds 1797 real 8x8 images with 17 grey levels (0 = no ink, 16 = full ink). They
are written as 8x8 RGB PNGs (ink bright on black, grey replicated over the channels, because
``RealImages`` loads RGB) into ``train/<label>/`` and ``heldout/<label>/``: a stratified, seeded
split. The teacher and the GAN see only ``train``; ``heldout`` gives the real-vs-real floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

LEVELS = 16  # load_digits' maximum value
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Split:
    heldout_fraction: float = 0.2
    seed: int = 0


def load_split(split: Split = Split()) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images N x 8 x 8 uint8, labels N), "heldout": (...)}: stratified, seeded."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / LEVELS)).astype(np.uint8)
    tr_x, ho_x, tr_y, ho_y = train_test_split(images, digits.target, test_size=split.heldout_fraction,
                                              stratify=digits.target, random_state=split.seed)
    return {"train": (tr_x, tr_y.astype(np.int64)), "heldout": (ho_x, ho_y.astype(np.int64))}


def write_class_folders(images: np.ndarray, labels: np.ndarray, out: Path) -> None:
    """``out/<label>/<index>.png``, 8x8 RGB."""
    from PIL import Image

    for i, (img, y) in enumerate(zip(images, labels, strict=True)):
        d = out / str(int(y))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(img[..., None], 3, axis=2)).save(d / f"{i:05d}.png")


def read_class_folders(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images N x H x W x 3 uint8 and labels N from ``root/<label>/*.png`` (sorted)."""
    from PIL import Image

    images, labels = [], []
    for d in sorted((d for d in Path(root).iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)):
        for f in sorted(d.glob("*.png")):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
            labels.append(int(d.name))
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_digits(out: str | Path, split: Split = Split()) -> Path:
    """Write ``out/train`` and ``out/heldout`` (kept if ``out/split.json`` already matches)."""
    from ..files import publish_folder

    def build(folder: Path) -> None:
        for name, (images, labels) in load_split(split).items():
            write_class_folders(images, labels, folder / name)

    return publish_folder(Path(out), "split.json", asdict(split), build)


def build_command(path: str | Path) -> str | None:
    """The command that writes ``path`` if it is a split of a digits data folder (``.../digits/data/train``
    or ``heldout``, as the digits recipes and ``make demo`` use), else None: for the one-line error
    of a missing ``data.real_images``."""
    p = Path(path).absolute()
    if p.name not in SPLITS or p.parent.name != "data" or p.parent.parent.name != "digits":
        return None
    try:
        shown = p.parent.relative_to(Path.cwd())
    except ValueError:
        shown = p.parent
    return f"python -m dmd2.digits.data {shown}"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dmd2.digits.data",
                                     description="Write the digits' train/ and heldout/ class folders (a few seconds).")
    parser.add_argument("out", nargs="?", default="runs/digits/data", help="folder to write (default: %(default)s)")
    print(write_digits(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
