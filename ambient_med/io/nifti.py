"""NIfTI volumes → canonical RAS float arrays.

Only the header is read until the size is known to be acceptable (``ingest.max_voxels``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

from ambient_med.errors import AmbientMedError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path: Path, max_voxels: int, volume: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reads a 3-D (or one volume of a 4-D) NIfTI image reoriented to canonical RAS.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        max_voxels: refuse, before reading any voxel, images larger than this.
        volume: index along the 4th axis of a 4-D image.

    Returns:
        ``(volume (X, Y, Z) float32, affine (4, 4))``; scl_slope/scl_inter applied.
    """
    try:
        image = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a damaged header
        raise AmbientMedError(f"'{path.name}': not a readable NIfTI file ({exc})") from None
    shape = image.shape
    if len(shape) not in (3, 4):
        raise AmbientMedError(f"'{path.name}': {len(shape)}-D image, expected 3-D or 4-D")
    if int(np.prod(shape[:3])) > max_voxels:
        raise AmbientMedError(
            f"'{path.name}': {'x'.join(map(str, shape[:3]))} voxels exceed "
            f"ingest.max_voxels={max_voxels}"
        )
    if len(shape) == 4:
        if not 0 <= volume < shape[3]:
            raise AmbientMedError(f"'{path.name}': has {shape[3]} volumes, asked for {volume}")
        image = image.slicer[..., volume]
    try:
        # Straight to float32 (scl_slope / scl_inter applied): no float64 copy of the volume.
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:
        raise AmbientMedError(f"'{path.name}': voxel data unreadable ({exc})") from None
    # Closest canonical (RAS) orientation, as nib.as_closest_canonical, by flips and axis
    # swaps that are views of the data rather than a second copy.
    ornt = io_orientation(image.affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, image.affine
    return apply_orientation(data, ornt), image.affine @ inv_ornt_aff(ornt, data.shape)
