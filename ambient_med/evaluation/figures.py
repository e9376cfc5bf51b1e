"""Figures people open: image grids (Pillow) and plots (matplotlib, Agg, no display).

Image grids are plain tiles of magnitude slices, shown in radiological display orientation.
Plots have labelled axes, ticks, colour bars and legends. Every writer takes the final path
and writes atomically (a temporary file beside it, renamed on success).

matplotlib is imported inside the plotting functions: stages that draw nothing (ingest,
corrupt) do not pay for importing it. Figures are built with ``matplotlib.figure.Figure``
and the Agg canvas, never pyplot, so no global state or display backend is involved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ambient_med.io.store import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 110
GREY_RAW = "0.65"  # colour of raw per-step values under their moving average


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
    """Writes :func:`grid_image` as a grey PNG (matplotlib), enlarged by ``upscale`` (nearest
    neighbour), without a timestamp: same images, same bytes."""
    from matplotlib.image import imsave

    canvas = grid_image(images, columns)
    canvas = np.repeat(np.repeat(canvas, upscale, axis=0), upscale, axis=1)
    imsave(path, canvas, cmap="gray", vmin=0, vmax=255, format="png", metadata={"Software": None})


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure on the Agg canvas (inches), independent of pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | Path) -> None:
    """Writes ``figure`` as a PNG at ``path`` atomically, without a timestamp in the file,
    so that the same inputs give the same bytes."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each run of ``window`` consecutive values (``len - window + 1`` of them)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) < window:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return (sums[window:] - sums[:-window]) / window


def loss_curve(
    path: str | Path,
    steps: np.ndarray,
    loss: np.ndarray,
    title: str,
    ylabel: str = "loss",
    xlabel: str = "training step",
    smooth: int = 25,
) -> None:
    """Per-step values in grey, their moving average over ``smooth`` steps in black.

    The y axis is logarithmic when every value is positive and they span more than a decade
    (losses fall over decades), and limited to the 1st–99th percentile range widened by a
    margin, so that the first steps' spike does not flatten the rest of the curve.
    """
    steps = np.asarray(steps, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    figure = new_figure(7.0, 3.6)
    axes = figure.add_subplot()
    finite = np.isfinite(loss)
    if finite.any():
        axes.plot(steps, loss, color=GREY_RAW, linewidth=0.8, label="per step")
        window = min(smooth, max(1, len(loss) // 4))
        if window > 1:
            averaged = moving_average(loss, window)
            axes.plot(
                steps[window - 1 :],
                averaged,
                color="black",
                linewidth=1.8,
                label=f"moving average ({window} steps)",
            )
        values = loss[finite]
        low, high = np.percentile(values, [1, 99])
        if values.min() > 0 and high > 10 * low:
            axes.set_yscale("log")
            axes.set_ylim(low / 1.5, high * 1.5)
        elif high > low:
            margin = 0.1 * (high - low)
            axes.set_ylim(low - margin, high + margin)
        axes.legend(loc="upper right", frameon=False)
    else:
        axes.text(0.5, 0.5, "no finite values", ha="center", va="center", transform=axes.transAxes)
    if len(steps):
        axes.set_xlim(steps.min(), max(steps.max(), steps.min() + 1))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    save_figure(figure, path)


def _slice_psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of one slice against the reference slice (peak = reference maximum)."""
    rmse = float(np.sqrt(np.mean((reference - image) ** 2)))
    peak = float(reference.max()) or 1.0
    return float("inf") if rmse == 0 else 20 * np.log10(peak / rmse)


def recon_panel(
    path: str | Path,
    columns: Sequence[tuple[str, np.ndarray]],
    reference: np.ndarray,
    error_gain: float = 5.0,
    title: str | None = None,
    scored: bool = True,
) -> None:
    """Reconstructions of one slice beside the reference, with colour bars and error maps.

    Top row: each image on the reference's grey scale (0 to its maximum), one colour bar.
    Bottom row: |image − reference| on a common scale from 0 to max/``error_gain`` (errors
    shown ``error_gain`` times brighter), with its own colour bar; each column is titled with
    its method and the slice's PSNR against the reference.

    Args:
        columns: ``(name, (H, W) magnitude)`` in display order; the reference itself may be one.
        reference: ``(H, W)`` magnitude the errors are measured against.
        scored: False when ``reference`` is not a fully sampled image (a new scan compared with
            its zero-filled image): no PSNR, and the bottom row is labelled a difference.
    """
    reference = np.asarray(reference, dtype=np.float32)
    peak = float(reference.max()) or 1.0
    count = len(columns)
    figure = new_figure(1.9 * count + 1.2, 4.3)
    grid = figure.add_gridspec(2, count)
    image_axes, error_axes = [], []
    shown = error_shown = None
    for i, (name, image) in enumerate(columns):
        image = np.asarray(image, dtype=np.float32)
        top = figure.add_subplot(grid[0, i])
        shown = top.imshow(
            display_orientation(image), cmap="gray", vmin=0.0, vmax=peak, interpolation="nearest"
        )
        is_reference = image.shape == reference.shape and np.array_equal(image, reference)
        caption = name
        if scored and not is_reference:
            caption = f"{name}\n{_slice_psnr(reference, image):.1f} dB"
        top.set_title(caption, fontsize=9)
        bottom = figure.add_subplot(grid[1, i])
        error_shown = bottom.imshow(
            display_orientation(np.abs(image - reference)),
            cmap="inferno",
            vmin=0.0,
            vmax=peak / error_gain,
            interpolation="nearest",
        )
        for axes in (top, bottom):
            axes.set_xticks([])
            axes.set_yticks([])
        image_axes.append(top)
        error_axes.append(bottom)
    difference = "|error|" if scored else f"|difference from {columns[0][0]}|"
    image_axes[0].set_ylabel("image", fontsize=9)
    row_label = "|error|" if scored else "|difference|"
    error_axes[0].set_ylabel(f"{row_label} ×{error_gain:g}", fontsize=9)
    figure.colorbar(shown, ax=image_axes, shrink=0.9, label="intensity")
    figure.colorbar(error_shown, ax=error_axes, shrink=0.9, label=difference)
    if title:
        figure.suptitle(title, fontsize=10)
    save_figure(figure, path)


def audit_histogram(
    path: str | Path,
    holdout_scores: np.ndarray,
    sample_scores: np.ndarray,
    threshold: float,
    controls: Mapping[str, np.ndarray] | None = None,
    xlabel: str = "similarity to the nearest training image",
    title: str = "Memorization audit",
) -> None:
    """Histograms of nearest-training similarity: held-out real slices against samples.

    Both are drawn as fractions of their own count on shared bins, so sets of different
    sizes compare; the copy threshold (calibrated on the held-out slices) is a dashed line,
    and the legend gives how many of each set lie above it. ``controls`` adds reference
    sets as outlines, e.g. ``{"training slices (exact copies)": scores}``.
    """
    holdout_scores = np.asarray(holdout_scores, dtype=np.float64).ravel()
    sample_scores = np.asarray(sample_scores, dtype=np.float64).ravel()
    named: list[tuple[str, np.ndarray]] = [
        ("held-out real slices", holdout_scores),
        ("generated samples", sample_scores),
    ]
    named += [
        (name, np.asarray(s, dtype=np.float64).ravel()) for name, s in (controls or {}).items()
    ]
    every = np.concatenate([s[np.isfinite(s)] for _, s in named] + [[threshold]])
    low, high = float(every.min()), float(every.max())
    if high - low < 1e-6:
        low, high = low - 0.01, high + 0.01
    bins = np.linspace(low, high, 41)
    figure = new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    styles = [
        {"color": "tab:blue", "alpha": 0.45, "histtype": "stepfilled"},
        {"color": "tab:red", "alpha": 0.45, "histtype": "stepfilled"},
    ]
    outline = ["black", "tab:green", "tab:purple", "tab:brown", "tab:gray"]
    for i, (name, scores) in enumerate(named):
        scores = scores[np.isfinite(scores)]
        style = (
            styles[i]
            if i < len(styles)
            else {
                "color": outline[(i - len(styles)) % len(outline)],
                "histtype": "step",
                "linewidth": 1.6,
            }
        )
        above = float(np.mean(scores > threshold)) if len(scores) else float("nan")
        label = f"{name} (n = {len(scores)}, {100 * above:.1f} % above)"
        weights = np.full(len(scores), 1.0 / len(scores)) if len(scores) else None
        axes.hist(scores, bins=bins, weights=weights, label=label, **style)
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1.2)
    axes.annotate(
        f"copy threshold {threshold:.3f}",
        xy=(threshold, 0.5),
        xycoords=("data", "axes fraction"),
        xytext=(-3, 0),
        textcoords="offset points",
        rotation=90,
        ha="right",
        va="center",
        fontsize=9,
    )
    axes.set_xlabel(xlabel)
    axes.set_ylabel("fraction of each set")
    axes.set_title(title)
    axes.legend(loc="upper left", fontsize=8, frameon=False)
    axes.grid(True, alpha=0.3)
    save_figure(figure, path)
