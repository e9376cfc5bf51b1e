"""Image grids as PNG (Pillow), in radiological display orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def display_orientation(axial: np.ndarray) -> np.ndarray:
    """An axial slice stored as ``[x (right), y (anterior)]`` → ``[row, col]`` for display:
    anterior at the top, the patient's right on the image's left (radiological)."""
    return axial.T[::-1, ::-1]


def grid_image(images: np.ndarray, columns: int = 4, vmax: float | None = None) -> np.ndarray:
    """Tiles ``(N, H, W)`` magnitude slices into one uint8 image with 2-pixel gutters."""
    images = np.asarray(images, dtype=np.float32)
    n, height, width = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    scale = vmax if vmax is not None else float(np.percentile(images, 99.5)) or 1.0
    gutter = 2
    canvas = np.zeros(
        (rows * (height + gutter) - gutter, columns * (width + gutter) - gutter), np.uint8
    )
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        tile = np.clip(display_orientation(image) / scale, 0.0, 1.0)
        y, x = r * (height + gutter), c * (width + gutter)
        canvas[y : y + height, x : x + width] = np.round(tile * 255).astype(np.uint8)
    return canvas


def save_grid(path: str | Path, images: np.ndarray, columns: int = 4, upscale: int = 2) -> None:
    """Writes :func:`grid_image` as a PNG, enlarged by ``upscale`` (nearest neighbour)."""
    canvas = grid_image(images, columns)
    picture = Image.fromarray(canvas)
    if upscale > 1:
        picture = picture.resize(
            (canvas.shape[1] * upscale, canvas.shape[0] * upscale), Image.Resampling.NEAREST
        )
    picture.save(path, format="PNG")
