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


def line_plot(
    path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    title: str,
    size: tuple[int, int] = (640, 320),
    smooth: int = 25,
) -> None:
    """A minimal PNG line plot (Pillow only): raw values in grey, a moving average in black,
    the y range from the 1st to the 99th percentile, axis labels with their extremes."""
    from PIL import ImageDraw

    width, height = size
    margin = 48
    picture = Image.new("L", size, 255)
    draw = ImageDraw.Draw(picture)
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) == 0:
        picture.save(path, format="PNG")
        return
    lo, hi = np.percentile(y, 1), np.percentile(y, 99)
    hi = hi if hi > lo else lo + 1.0
    x_span = (x.max() - x.min()) or 1.0

    def point(xv: float, yv: float) -> tuple[float, float]:
        px = margin + (xv - x.min()) / x_span * (width - 2 * margin)
        py = height - margin - (np.clip(yv, lo, hi) - lo) / (hi - lo) * (height - 2 * margin)
        return float(px), float(py)

    draw.rectangle([margin, margin, width - margin, height - margin], outline=0)
    draw.line([point(a, b) for a, b in zip(x, y, strict=True)], fill=170, width=1)
    if len(y) >= smooth:
        kernel = np.ones(smooth) / smooth
        averaged = np.convolve(y, kernel, mode="valid")
        xs = x[smooth - 1 :]
        draw.line([point(a, b) for a, b in zip(xs, averaged, strict=True)], fill=0, width=2)
    draw.text((margin, 10), title, fill=0)
    draw.text((4, margin - 6), f"{hi:.3g}", fill=0)
    draw.text((4, height - margin - 6), f"{lo:.3g}", fill=0)
    draw.text((margin, height - margin + 8), f"{x.min():g}", fill=0)
    draw.text((width - margin - 30, height - margin + 8), f"{x.max():g}", fill=0)
    picture.save(path, format="PNG")
