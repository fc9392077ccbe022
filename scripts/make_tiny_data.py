"""Write the small real-image folders the tiny recipes use for their GAN loss.

    python scripts/make_tiny_data.py [--out recipes/data]

Deterministic (numpy + PIL only, no randomness):

* ``tiny_images/``: 12 RGB 32x32 PNGs ``img_000.png`` .. ``img_011.png`` of simple shapes, plus
  ``captions.jsonl`` with one ``{"file_name": ..., "text": ...}`` line per image.
* ``tiny_classes/``: class folders ``0`` .. ``9``, each with 2 RGB 16x16 PNGs; class ``k`` has its own
  colour and ``k + 1`` dots arranged on a 4x4 grid (image 0 on black, image 1 on white).
"""

from __future__ import annotations

import argparse
import colorsys
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
    "pink": (245, 130, 190),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
}

# (shape, foreground colour, background colour)
IMAGES = [
    ("circle", "red", "blue"),
    ("square", "yellow", "black"),
    ("horizontal stripes", "green", "white"),
    ("circle", "white", "purple"),
    ("square", "blue", "orange"),
    ("vertical stripes", "red", "yellow"),
    ("triangle", "orange", "gray"),
    ("circle", "pink", "green"),
    ("square", "black", "white"),
    ("vertical stripes", "blue", "pink"),
    ("triangle", "green", "black"),
    ("horizontal stripes", "purple", "yellow"),
]

IMAGE_SIZE = 32
CLASS_SIZE = 16
NUM_CLASSES = 10


def draw_shape(
    shape: str, fg: tuple[int, int, int], bg: tuple[int, int, int], size: int = IMAGE_SIZE
) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = bg
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2
    if shape == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= (0.32 * size) ** 2
    elif shape == "square":
        lo, hi = size // 4, size - size // 4
        mask = (yy >= lo) & (yy < hi) & (xx >= lo) & (xx < hi)
    elif shape == "triangle":
        top, bottom = size // 5, size - size // 5
        half = (yy - top) / (bottom - top) * (0.4 * size)
        mask = (yy >= top) & (yy < bottom) & (np.abs(xx - c) <= half)
    elif shape == "horizontal stripes":
        mask = (yy // (size // 8)) % 2 == 0
    elif shape == "vertical stripes":
        mask = (xx // (size // 8)) % 2 == 0
    else:
        raise ValueError(shape)
    img[mask] = fg
    return img


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(shape: str, fg: str, bg: str) -> str:
    if shape.endswith("stripes"):
        return f"{fg} and {bg} {shape}"
    return f"{_article(fg)} {fg} {shape} on {_article(bg)} {bg} background"


def class_colour(k: int) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(k / NUM_CLASSES, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_class(k: int, variant: int, size: int = CLASS_SIZE) -> np.ndarray:
    bg = (0, 0, 0) if variant == 0 else (255, 255, 255)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = bg
    cell = size // 4
    for i in range(k + 1):  # k + 1 dots of 2x2 pixels, row-major on a 4x4 grid
        y, x = divmod(i, 4)
        y0, x0 = y * cell + 1, x * cell + 1
        img[y0 : y0 + 2, x0 : x0 + 2] = class_colour(k)
    img[-2:, :] = class_colour(k)  # a bottom bar in the class colour
    return img


def save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", optimize=True)


def main(out: Path) -> None:
    images = out / "tiny_images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (shape, fg, bg) in enumerate(IMAGES):
        name = f"img_{i:03d}.png"
        save_png(draw_shape(shape, COLOURS[fg], COLOURS[bg]), images / name)
        lines.append(json.dumps({"file_name": name, "text": caption(shape, fg, bg)}))
    (images / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    classes = out / "tiny_classes"
    for k in range(NUM_CLASSES):
        folder = classes / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(2):
            save_png(draw_class(k, v), folder / f"img_{v}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes" / "data"
    )
    main(parser.parse_args().out)
