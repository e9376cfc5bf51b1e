"""Writers for what people open: NIfTI volumes of slices and PNG grids, atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ambient_med.evaluation.figures import save_grid
from ambient_med.io.store import atomic_path


def write_slice_volume(path: str | Path, slices: np.ndarray, affine: np.ndarray) -> None:
    """``(N, H, W)`` slices → a NIfTI volume ``(H, W, N)`` (float32)."""
    volume = np.ascontiguousarray(np.moveaxis(slices.astype(np.float32), 0, -1))
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=2)
    image.set_qform(affine, code=2)
    with atomic_path(path) as tmp:
        # nibabel picks compression from the suffix, so write under the final name's suffix.
        staged = tmp.with_name(tmp.name + "".join(Path(path).suffixes))
        try:
            nib.save(image, str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)


def write_png_grid(path: str | Path, images: np.ndarray, columns: int = 4) -> None:
    with atomic_path(path) as tmp:
        save_grid(tmp, images, columns)
