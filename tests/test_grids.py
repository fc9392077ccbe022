"""Image grids (dmd2/logs.py save_grid): grey padding between images, one condition per row or column."""

import numpy as np
import pytest
import torch
from PIL import Image

from dmd2.logs import GRID_PAD_VALUE, condition_layout, save_grid

PAD = 2


def tile(grid: np.ndarray, r: int, c: int, h: int, w: int) -> np.ndarray:
    """The image at row r, column c of a grid with PAD px around every image."""
    top, left = PAD + r * (h + PAD), PAD + c * (w + PAD)
    return grid[top:top + h, left:left + w]


def flat_images(values) -> torch.Tensor:
    """One 8x8 image per value (uint8 level), as B x 3 x 8 x 8 in [-1, 1]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 3, 8, 8) / 127.5 - 1


def test_grid_has_grey_gaps_between_images(tmp_path):
    grid = np.array(Image.open(save_grid(flat_images([255] * 4), tmp_path / "g.png")))
    assert grid.shape == (2 * (8 + PAD) + PAD, 2 * (8 + PAD) + PAD, 3)  # 2 x 2, near-square
    for line in (0, 1, 10, 11, 20, 21):  # the padding rows and columns around and between the images
        assert (grid[line] == GRID_PAD_VALUE).all() and (grid[:, line] == GRID_PAD_VALUE).all()
    for r in range(2):
        for c in range(2):
            assert (tile(grid, r, c, 8, 8) == 255).all()


def test_grid_cols_fill_rows_and_rows_fill_columns(tmp_path):
    levels = [10, 40, 70, 100, 130]
    by_col = np.array(Image.open(save_grid(flat_images(levels), tmp_path / "c.png", cols=3)))
    assert by_col.shape[:2] == (2 * 10 + PAD, 3 * 10 + PAD)
    for i, v in enumerate(levels):  # image i in column i mod 3
        assert (tile(by_col, i // 3, i % 3, 8, 8) == v).all()

    by_row = np.array(Image.open(save_grid(flat_images(levels), tmp_path / "r.png", rows=2)))
    assert by_row.shape[:2] == (2 * 10 + PAD, 3 * 10 + PAD)
    for i, v in enumerate(levels):  # image i in row i mod 2
        assert (tile(by_row, i % 2, i // 2, 8, 8) == v).all()
    assert (tile(by_row, 1, 2, 8, 8) == GRID_PAD_VALUE).all()  # no image 5: a blank slot
    with pytest.raises(ValueError, match="cols or rows"):
        save_grid(flat_images(levels), tmp_path / "x.png", cols=2, rows=2)


def test_condition_layout():
    assert condition_layout(10, text=False, n_images=10) == {"cols": 10}  # one class per column
    assert condition_layout(10, text=False, n_images=20) == {"cols": 10}
    assert condition_layout(3, text=True, n_images=8) == {"rows": 3}  # one prompt per row
    assert condition_layout(16, text=True, n_images=16) == {}  # each prompt once: near-square, not a strip
    assert condition_layout(1000, text=False, n_images=64) == {}  # ImageNet: near-square
