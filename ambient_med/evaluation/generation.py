"""Generation quality without downloaded weights: MMD on pixels and a Fréchet distance on
features of a fixed, seeded random network (MONAI's MMD and FID metric classes).

The feature network is documented here and never trained: three 3x3 convolutions (1→16→32→64
channels, stride 2, ReLU) with weights drawn from N(0, 2/fan_in) under ``torch.manual_seed(0)``
in a private generator, then global average and standard-deviation pooling (128 features).
Random convolutional features preserve distances between image distributions well enough to
rank generators at this scale; they are no substitute for a trained network's, and numbers are
comparable only between runs of this same definition.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import FIDMetric, MMDMetric
from scipy import ndimage

# Blur of the "blobs" reference: a held-out slice at this Gaussian σ (pixels of a 64² slice)
# keeps the head and ventricles but loses cortex and lesions.
BLUR_SIGMA = 2.0


def random_features(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` magnitudes → ``(N, 128)`` features of the fixed random network."""
    generator = torch.Generator().manual_seed(0)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    channels = [1, 16, 32, 64]
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        weight = torch.randn(c_out, c_in, 3, 3, generator=generator) * np.sqrt(2.0 / (9 * c_in))
        x = torch.relu(torch.nn.functional.conv2d(x, weight, stride=2, padding=1))
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def generation_metrics(samples: np.ndarray, real: np.ndarray, seed: int = 0) -> dict[str, float]:
    """MMD (pixels) and random-feature Fréchet distance between samples and real slices.

    MONAI's MMD needs equal counts: the larger set is subsampled (seeded) to the smaller.
    """
    n = min(len(samples), len(real))
    rng = np.random.default_rng(seed)
    real_sub = real[np.sort(rng.choice(len(real), n, replace=False))]
    sample_sub = samples[np.sort(rng.choice(len(samples), n, replace=False))]
    mmd = MMDMetric()(
        torch.from_numpy(np.ascontiguousarray(real_sub, dtype=np.float32))[:, None],
        torch.from_numpy(np.ascontiguousarray(sample_sub, dtype=np.float32))[:, None],
    )
    fid = FIDMetric()(random_features(samples).double(), random_features(real).double())
    return {"gen_mmd_pixels": float(mmd), "gen_frechet_random_features": float(fid)}


def generation_report(samples: np.ndarray, holdout: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Where the samples fall between anatomy and blobs.

    The held-out slices are split into interleaved halves A and B; every distance is to B:
    the samples (``gen_*``), real slices A (``gen_*_real``: the floor a perfect generator
    reaches with this many slices) and A blurred by :data:`BLUR_SIGMA` (``gen_*_blurred``:
    what smooth blobs score). Samples nearer the floor than the blur show anatomy.
    """
    half_a, half_b = holdout[0::2], holdout[1::2]
    blurred = np.stack([ndimage.gaussian_filter(x, BLUR_SIGMA) for x in half_a])
    report = generation_metrics(samples, half_b, seed)
    for suffix, images in (("real", half_a), ("blurred", blurred)):
        report |= {f"{k}_{suffix}": v for k, v in generation_metrics(images, half_b, seed).items()}
    return report
