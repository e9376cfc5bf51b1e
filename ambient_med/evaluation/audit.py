"""Memorization audit (docs/audit.md): how close does each generated image come to a training
image, and would the audit notice a copy?

**Copy statistic.** Whole-image NCC of foreground-masked magnitudes (:func:`nearest_ncc`, kept
for comparison) mostly measures the head outline: binary silhouettes with no anatomy score
0.9 and more, while an exact training copy shifted by one pixel scores below the held-out
threshold. The audit therefore compares *anatomy*:

1. each image is divided by its standard deviation (gain); outside its head (the filled
   foreground) it is replaced by a smooth extension of the tissue next to it (normalised
   convolution), so that the head outline is no edge at all; then it is band-passed with a
   difference of Gaussians (offset and smooth shading removed; fine anatomy kept);
2. only its brain mask is kept — the head eroded by a few pixels, leaving out partial-volume
   pixels of the outline — and the result is centred inside the mask;
3. two images so prepared, ``a`` and ``b``, score ``2 <a, b> / (|a|^2 + |b|^2)``, the
   contrast-structure term of SSIM without its stabilising constants: 1 for an exact copy,
   and low both for different anatomy and for an image with little anatomy in the band
   (a silhouette, a blurred average brain), which a plain NCC would rescale to look alike;
4. maximised over integer shifts of the query of up to ``max_shift`` pixels in each direction.

Every shift costs one matrix product between a chunk of queries and all references (on the
GPU when there is one), so thousands of samples against thousands of training slices stay
cheap. Each image's mask is its own, so a reference with a small brain does not match any
query containing a similar patch (the query's anatomy outside that patch counts against it).

**Threshold.** The ``quantile`` of the same statistic for held-out subjects' real slices
against the training set — on one half of the held-out slices; the other half is a negative
control (:func:`split_holdout`). **Controls** (:func:`control_images`): modified training
slices that must be flagged and synthetic non-copies that must not.

**Canaries** (:func:`canary_exposure`): how often samples reproduce a pattern planted into
training slices, at its place.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.networks.layers import separable_filtering
from monai.networks.layers.convutils import gaussian_1d
from scipy import ndimage

from ambient_med.errors import AmbientMedError
from ambient_med.physics.masks import derive_seed

# Done-when targets of the controls: copies flagged at least this often, non-copies at most.
POSITIVE_TARGET = 0.95
NEGATIVE_TARGET = 0.02
# Control name → whether a sound audit flags it.
CONTROLS_EXPECTED: dict[str, bool] = {
    "exact": True,
    "shift1": True,
    "shift2": True,
    "noise": True,
    "blur": True,
    "holdout": False,
    "silhouette": False,
    "blurred_mean": False,
}
# Score matrices of one chunk stay below this many float32 entries (256 MiB).
_CHUNK_ENTRIES = 1 << 26
# 4-connected 2-D structure inside a 3-D one: no connectivity between stacked images.
_STRUCTURE = ndimage.generate_binary_structure(2, 1)[None]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the statistic before the 2026 audit review, kept for comparison ------------------------


def foreground_masked(images: np.ndarray, level: float = 0.1) -> np.ndarray:
    """Zeroes the background of each ``(H, W)`` magnitude: pixels below ``level`` times the
    image's 99th percentile. Sample noise in the background then adds nothing to the NCC."""
    images = np.abs(np.asarray(images, dtype=np.float32))
    peaks = np.percentile(images.reshape(len(images), -1), 99, axis=1)[:, None, None]
    return np.where(images >= level * np.maximum(peaks, 1e-12), images, 0.0).astype(np.float32)


def _normalised(images: np.ndarray, device: torch.device) -> torch.Tensor:
    flat = torch.from_numpy(foreground_masked(images).reshape(len(images), -1)).to(device)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)


def nearest_ncc(
    queries: np.ndarray, references: np.ndarray, chunk: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """For each query image the highest whole-image NCC of foreground-masked magnitudes with
    any reference image, and its index (the audit's statistic before the band-pass one; it
    rewards matching head outlines and misses shifted copies).

    Args:
        queries: ``(Q, H, W)``; references: ``(R, H, W)``.

    Returns:
        ``(best (Q,), index (Q,))``.
    """
    device = _device()
    refs = _normalised(references, device)
    best, index = [], []
    for start in range(0, len(queries), chunk):
        q = _normalised(queries[start : start + chunk], device)
        values, where = (q @ refs.T).max(dim=1)
        best.append(values.cpu())
        index.append(where.cpu())
    return torch.cat(best).numpy(), torch.cat(index).numpy()


# --- the band-pass copy statistic -----------------------------------------------------------


@dataclass(frozen=True)
class CopyStatistic:
    """Parameters of the band-pass copy statistic (config section ``audit``).

    Attributes:
        sigma_fine, sigma_coarse: Gaussian widths (pixels) of the difference-of-Gaussians
            band-pass; ``sigma_fine = 0`` keeps everything finer than ``sigma_coarse``.
        erode: pixels the head mask is eroded by for the comparison (outline pixels mix
            tissue and background).
        max_shift: queries are compared at every integer shift up to this in each direction.
        level: head = pixels above ``level`` of the way from the 1st to the 99th percentile of
            the lightly smoothed image, holes filled; 0.5 puts the outline at the middle of
            the tissue/background step, where a blurred edge is.
        mask_smooth: Gaussian width (pixels) of that smoothing, so background noise does not
            enter the mask.
        extend: Gaussian width, in units of ``sigma_coarse``, of the normalised convolution
            that continues the tissue beyond the outline.
        match_blurs: Gaussian widths (pixels) at which each reference is also compared,
            blurred; a query's score is its best over these and the sharp reference. A model
            that copies a slice may draw it slightly smoother; the band-pass score of a copy
            blurred by 0.8 px at 32² fell to the level of the held-out slices at N = 435
            (60 of 64 blurred copies flagged) without this, 64 of 64 with 0.6.
    """

    sigma_fine: float = 0.7
    sigma_coarse: float = 2.0
    erode: int = 2
    max_shift: int = 2
    level: float = 0.5
    mask_smooth: float = 1.0
    extend: float = 1.5
    match_blurs: tuple[float, ...] = (0.6,)

    def __post_init__(self) -> None:
        if not 0 <= self.sigma_fine < self.sigma_coarse:
            raise AmbientMedError(
                f"config key 'audit.band_sigmas': need 0 <= fine < coarse, got "
                f"[{self.sigma_fine}, {self.sigma_coarse}]"
            )
        if any(b <= 0 for b in self.match_blurs):
            raise AmbientMedError(
                f"config key 'audit.match_blurs': widths must be > 0, got {list(self.match_blurs)}"
            )

    @classmethod
    def from_config(cls, audit: Mapping[str, Any]) -> CopyStatistic:
        """From the validated ``audit`` config section."""
        fine, coarse = audit["band_sigmas"]
        return cls(
            float(fine),
            float(coarse),
            int(audit["mask_erode"]),
            int(audit["max_shift"]),
            match_blurs=tuple(float(b) for b in audit["match_blurs"]),
        )


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(N, 1, H, W)`` smoothed with MONAI's sampled, normalised Gaussian (4 sigma)."""
    kernel = gaussian_1d(
        torch.tensor(float(sigma)), truncated=4.0, approx="sampled", normalize=True
    )
    kernel = kernel.to(x)
    if (len(kernel) - 1) // 2 >= min(x.shape[-2:]):
        raise AmbientMedError(
            f"config key 'audit.band_sigmas': sigma {sigma} is too wide for "
            f"{tuple(x.shape[-2:])} images"
        )
    # Reflection keeps a constant image constant, so offsets vanish in the band-pass.
    return separable_filtering(x, [kernel, kernel], mode="reflect")


def band_pass(images: torch.Tensor, sigma_fine: float, sigma_coarse: float) -> torch.Tensor:
    """Difference of Gaussians ``G(sigma_fine) * x - G(sigma_coarse) * x``.

    Args:
        images: ``(N, H, W)`` float.

    Returns:
        ``(N, H, W)``; zero for a constant image.
    """
    x = images[:, None]
    fine = x if sigma_fine == 0 else _gaussian(x, sigma_fine)
    return (fine - _gaussian(x, sigma_coarse))[:, 0]


def brain_masks(
    images: np.ndarray, level: float = 0.5, smooth: float = 1.0, erode: int = 0
) -> np.ndarray:
    """Filled foreground (the head) of each image, eroded by ``erode`` pixels.

    Foreground: the image smoothed by a Gaussian of ``smooth`` pixels is above ``level`` of
    the way from its 1st to its 99th percentile — relative to both, so that gain and offset do
    not change the mask. Holes (dark ventricles) are filled: the mask is the head, not its
    bright tissue.

    Args:
        images: ``(N, H, W)``.

    Returns:
        ``(N, H, W)`` bool; all false for a constant image.
    """
    images = np.asarray(images, dtype=np.float32)
    smoothed = ndimage.gaussian_filter(images, (0, smooth, smooth)) if smooth > 0 else images
    low, high = np.percentile(smoothed.reshape(len(images), -1), [1, 99], axis=1)
    masks = smoothed >= (low + level * (high - low))[:, None, None]
    masks &= (high > low)[:, None, None]
    masks = ndimage.binary_fill_holes(masks, structure=_STRUCTURE)
    if erode > 0:
        masks = ndimage.binary_erosion(masks, structure=_STRUCTURE, iterations=erode)
    return masks


def anatomy_features(
    images: np.ndarray, params: CopyStatistic, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images prepared for the copy statistic: divided by their standard deviation,
    continued smoothly beyond the head outline, band-passed, restricted to their eroded head
    mask and centred inside it.

    Args:
        images: ``(N, H, W)``.

    Returns:
        ``(features (N, H, W), energy (N,))`` on ``device``; energy = squared norm. Zero for an
        image without anatomy inside its outline (a constant, a binary silhouette).
    """
    device = device or _device()
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    x = x / x.reshape(len(x), -1).std(dim=1).clamp(min=1e-12)[:, None, None]
    head = brain_masks(images, params.level, params.mask_smooth)
    inside = torch.from_numpy(head).to(device=device, dtype=x.dtype)[:, None]
    # Normalised convolution: outside the head, a Gaussian-weighted mean of the tissue
    # nearby. The band-pass then has no outline step to respond to — the response that made
    # silhouettes look like brains — and needs no wide erosion to hide it.
    width = params.extend * params.sigma_coarse
    weight = _gaussian(inside, width)
    extended = _gaussian(x[:, None] * inside, width) / weight.clamp(min=1e-6)
    x = torch.where(inside > 0, x[:, None], extended)[:, 0]
    features = band_pass(x, params.sigma_fine, params.sigma_coarse)
    masks = (
        ndimage.binary_erosion(head, structure=_STRUCTURE, iterations=params.erode)
        if params.erode > 0
        else head
    )
    m = torch.from_numpy(masks).to(device=device, dtype=features.dtype)
    count = m.sum(dim=(1, 2)).clamp(min=1)[:, None, None]
    features = (features - (features * m).sum(dim=(1, 2))[:, None, None] / count) * m
    return features, features.reshape(len(x), -1).square().sum(dim=1)


def _shifts(radius: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


class CopyIndex:
    """Training (reference) images prepared once; queries are scored against all of them.

    Args:
        references: ``(R, H, W)``.
        params: the statistic's parameters (defaults when None).
        device: where the matrix products run (CUDA when available).
    """

    def __init__(
        self,
        references: np.ndarray,
        params: CopyStatistic | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.params = params or CopyStatistic()
        self.device = device or _device()
        self.shape = tuple(references.shape[1:])
        self.count = len(references)
        # Blurred versions follow the sharp ones: row v * count + i is reference i at
        # version v (0 = sharp); a query's score is its best over the versions.
        versions = [references] + [
            ndimage.gaussian_filter(np.asarray(references, np.float32), (0, b, b))
            for b in self.params.match_blurs
        ]
        features, self.energy = anatomy_features(np.concatenate(versions), self.params, self.device)
        self.features = features.reshape(len(features), -1)

    def _check(self, queries: np.ndarray) -> None:
        if tuple(queries.shape[1:]) != self.shape:
            raise AmbientMedError(
                f"audit: queries are {tuple(queries.shape[1:])}, references {self.shape}"
            )

    def _chunks(self, queries: np.ndarray, chunk: int | None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yields ``(start, scores (C, R))``: each chunk's score, maximised over shifts."""
        self._check(queries)
        r = self.params.max_shift
        height, width = self.shape
        size = chunk or max(1, min(4096, _CHUNK_ENTRIES // max(1, len(self.features))))
        for start in range(0, len(queries), size):
            q, q_energy = anatomy_features(queries[start : start + size], self.params, self.device)
            # Features are zero outside each image's mask, so zeros shifted in are exact.
            padded = torch.nn.functional.pad(q, (r, r, r, r))
            denominator = (q_energy[:, None] + self.energy[None, :]).clamp(min=1e-12)
            best = None
            for dy, dx in _shifts(r):
                view = padded[:, r + dy : r + dy + height, r + dx : r + dx + width]
                score = 2.0 * (view.reshape(len(q), -1) @ self.features.T) / denominator
                best = score if best is None else torch.maximum(best, score)
            yield start, best.reshape(len(q), -1, self.count).amax(dim=1)

    def nearest(
        self, queries: np.ndarray, chunk: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each query the highest score against any reference, and that reference.

        Args:
            queries: ``(Q, H, W)``.

        Returns:
            ``(best (Q,) float32 in [-1, 1], index (Q,) int64)``.
        """
        best, index = [], []
        for _, scores in self._chunks(queries, chunk):
            values, where = scores.max(dim=1)
            best.append(values.cpu())
            index.append(where.cpu())
        if not best:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return torch.cat(best).numpy(), torch.cat(index).numpy()

    def matrix(self, queries: np.ndarray) -> np.ndarray:
        """Every query against every reference: ``(Q, R)`` scores (small inputs only)."""
        return torch.cat([s.cpu() for _, s in self._chunks(queries, None)]).numpy()


def nearest_copy(
    queries: np.ndarray, references: np.ndarray, params: CopyStatistic | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Band-pass copy statistic of each query against its nearest reference.

    Args:
        queries: ``(Q, H, W)``; references: ``(R, H, W)``.

    Returns:
        ``(best (Q,), index (Q,))``.
    """
    return CopyIndex(references, params).nearest(queries)


# --- calibration split and controls ---------------------------------------------------------


def split_holdout(n: int, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Interleaved halves of the held-out slices: ``(calibration rows, control rows)``.

    Within each group (held-out subject), in the given order (by slice position in a slice
    store), slices alternate between the two halves, so both halves see every held-out
    subject. Splitting *by subject* instead was measured on the 64 x 64 demo cohort (two
    held-out subjects): one subject sits systematically nearer to the training set, so a
    threshold calibrated on the other flagged 11 % of its slices (5 % on the 32 x 32 test
    cohort), and 0 % the other way round. With a handful of held-out subjects the halves
    must be exchangeable for the negative control to test the threshold rather than the
    choice of subject; with many, interleaving still keeps every subject in both halves.

    Args:
        n: number of held-out slices.
        groups: ``(n,)`` subject of each slice; None = one group.
    """
    if n < 2:
        raise AmbientMedError(f"audit: {n} held-out slice(s); calibration needs at least 2")
    groups = np.zeros(n, np.int64) if groups is None else np.asarray(groups)
    calibration = np.zeros(n, dtype=bool)
    offset = 0
    for group in dict.fromkeys(groups.tolist()):  # first-seen order: deterministic
        rows = np.flatnonzero(groups == group)
        # Alternate the starting half between groups so odd-sized groups do not all lean
        # towards calibration.
        calibration[rows[offset::2]] = True
        offset ^= len(rows) % 2
    return np.flatnonzero(calibration), np.flatnonzero(~calibration)


def _shift_control(images: np.ndarray, distance: int, rng: np.random.Generator) -> np.ndarray:
    """Each image moved by a random integer shift whose larger component is ``distance``."""
    moves = [(dy, dx) for dy, dx in _shifts(distance) if max(abs(dy), abs(dx)) == distance]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        dy, dx = moves[rng.integers(len(moves))]
        # Order 0 with integer shifts copies pixels exactly; the vacated border is background.
        out[i] = ndimage.shift(image, (dy, dx), order=0, mode="constant", cval=0.0)
    return out


def control_images(
    train: np.ndarray,
    train_levels: np.ndarray,
    seed: int,
    n: int = 64,
    noise: float = 0.05,
    blur: float = 0.8,
    mean_blur: float = 2.0,
) -> dict[str, np.ndarray]:
    """Seeded control sets built from the training slices (the held-out control comes from
    :func:`split_holdout`).

    Positive (copies; must be flagged), from ``n`` training slices drawn without replacement
    (with replacement when there are fewer than ``n``: each draw gets its own shift and noise,
    so a small training set still gives ``n`` controls and one unlucky noise draw moves a
    fraction by 1/n, not by one over the training-set size):
    ``exact``; ``shift1`` / ``shift2``: moved by a random shift whose larger component is 1 / 2
    pixels; ``noise``: plus Gaussian noise of ``noise`` times the slice's 99th percentile;
    ``blur``: Gaussian blur of ``blur`` pixels.
    Negative (not copies; must not be flagged): ``silhouette``: the same slices' head masks
    (:func:`brain_masks`) as binary images (outline, no anatomy); ``blurred_mean``: the mean of all
    training slices at the same slice position, blurred by ``mean_blur`` pixels (what a model
    that learned only the average brain would draw).

    Args:
        train: ``(R, H, W)`` training slices.
        train_levels: ``(R,)`` slice position of each (axial index in the canonical grid).
        seed: the cohort seed; every draw derives from it.

    Returns:
        name → ``(n, H, W)`` float32 images.
    """
    train = np.asarray(train, dtype=np.float32)
    train_levels = np.asarray(train_levels)
    rng = np.random.default_rng(derive_seed(seed, "audit-controls"))
    chosen = np.sort(rng.choice(len(train), size=n, replace=len(train) < n))
    base = train[chosen]
    peaks = np.percentile(base.reshape(len(base), -1), 99, axis=1)[:, None, None]
    noisy = base + noise * peaks * rng.standard_normal(base.shape).astype(np.float32)
    means = np.stack([train[train_levels == level].mean(axis=0) for level in train_levels[chosen]])
    controls = {
        "exact": base.copy(),
        "shift1": _shift_control(base, 1, rng),
        "shift2": _shift_control(base, 2, rng),
        "noise": noisy,
        "blur": ndimage.gaussian_filter(base, (0, blur, blur)),
        "silhouette": brain_masks(base).astype(np.float32),
        "blurred_mean": ndimage.gaussian_filter(means, (0, mean_blur, mean_blur)),
    }
    return {name: images.astype(np.float32) for name, images in controls.items()}


# --- the audit ------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """Scores of an audit. ``*_ncc`` are the nearest-training values of the statistic used
    (the band-pass copy statistic unless ``method`` says otherwise).

    Attributes:
        threshold: :func:`conformal_threshold` of ``holdout_ncc`` at ``quantile``.
        sample_ncc: ``(N,)`` samples' nearest-training score; ``sample_index`` ``(N,)`` which.
        holdout_ncc: ``(C,)`` the calibration half of the held-out slices.
        control_ncc: control name → its images' nearest-training scores (``holdout``: the
            other half of the held-out slices).
    """

    threshold: float
    sample_ncc: np.ndarray
    sample_index: np.ndarray
    holdout_ncc: np.ndarray
    control_ncc: dict[str, np.ndarray] = field(default_factory=dict)
    method: str = "bandpass"

    def control_rows(self) -> list[dict[str, Any]]:
        """One row per control: ``{kind: "control", control, flagged_fraction, n, expected,
        passed}``; ``expected`` is ``"flagged"`` or ``"not_flagged"``, ``passed`` compares the
        fraction with :data:`POSITIVE_TARGET` / :data:`NEGATIVE_TARGET`."""
        rows = []
        for name, scores in self.control_ncc.items():
            fraction = float(np.mean(scores > self.threshold)) if len(scores) else float("nan")
            positive = CONTROLS_EXPECTED.get(name, False)
            passed = fraction >= POSITIVE_TARGET if positive else fraction <= NEGATIVE_TARGET
            rows.append(
                {
                    "kind": "control",
                    "control": name,
                    "flagged_fraction": fraction,
                    "n": int(len(scores)),
                    "expected": "flagged" if positive else "not_flagged",
                    "passed": bool(passed),
                }
            )
        return rows

    def summary(self, quantile: float) -> dict[str, Any]:
        """Flat record: threshold, sample quantiles, calibration-set quantiles and, per
        control, ``control_<name>_flagged`` plus ``controls_passed`` (all targets met)."""
        s, h = self.sample_ncc, self.holdout_ncc
        record: dict[str, Any] = {
            "statistic": self.method,
            "threshold": float(self.threshold),
            "threshold_quantile": quantile,
            "frac_above": float(np.mean(s > self.threshold)) if len(s) else float("nan"),
            "n_samples": int(len(s)),
            "n_holdout": int(len(h)),
            "q50": float(np.quantile(s, 0.5)) if len(s) else float("nan"),
            "q95": float(np.quantile(s, 0.95)) if len(s) else float("nan"),
            "q99": float(np.quantile(s, 0.99)) if len(s) else float("nan"),
            "max": float(s.max()) if len(s) else float("nan"),
            "holdout_q50": float(np.quantile(h, 0.5)),
            "holdout_q95": float(np.quantile(h, 0.95)),
            "holdout_q99": float(np.quantile(h, 0.99)),
            "holdout_frac_above": float(np.mean(h > self.threshold)),
        }
        rows = self.control_rows()
        for row in rows:
            record[f"control_{row['control']}_flagged"] = row["flagged_fraction"]
        if rows:
            record["controls_passed"] = all(row["passed"] for row in rows)
        return record


def conformal_threshold(scores: np.ndarray, quantile: float) -> float:
    """The split-conformal threshold of calibration ``scores`` ``(n,)``: their ⌈(n + 1) q⌉-th
    smallest value (the largest when that rank exceeds n). A new score exchangeable with the
    calibration scores exceeds it with probability at most 1 − q (at most 1 / (n + 1) when
    capped), whatever their distribution. ``np.quantile``'s interpolated value sits lower on
    a finite set: on the 67-slice calibration half of the 32² benchmark cohort it flagged
    3 % of the other half at q = 0.99."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if len(ordered) == 0:
        raise AmbientMedError("audit: no calibration score")
    rank = min(len(ordered), int(np.ceil((len(ordered) + 1) * quantile)))
    return float(ordered[max(rank, 1) - 1])


def memorization_audit(
    samples: np.ndarray,
    train: np.ndarray,
    holdout: np.ndarray,
    quantile: float = 0.99,
    *,
    holdout_groups: np.ndarray | None = None,
    controls: Mapping[str, np.ndarray] | None = None,
    params: CopyStatistic | None = None,
    method: str = "bandpass",
) -> AuditResult:
    """Nearest-training score of every sample and every control; the threshold is the
    conformal ``quantile`` (:func:`conformal_threshold`) of the same score for the calibration
    half of the held-out slices (whole subjects never trained on); the other half is the
    ``holdout`` negative control.

    Args:
        samples: ``(N, H, W)`` generated magnitudes.
        train: ``(R, H, W)`` training slices; holdout: ``(M, H, W)`` held-out slices, M >= 2.
        holdout_groups: ``(M,)`` subject of each held-out slice (see :func:`split_holdout`).
        controls: name → ``(K, H, W)`` images (:func:`control_images`); None = only the
            held-out control.
        params: band-pass statistic parameters (defaults when None).
        method: ``"bandpass"`` (the copy statistic) or ``"magnitude_ncc"`` (the earlier
            whole-image NCC of :func:`nearest_ncc`, for comparison).
    """
    if method == "bandpass":
        index = CopyIndex(train, params)
        nearest = index.nearest
    elif method == "magnitude_ncc":

        def nearest(queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return nearest_ncc(queries, train)

    else:
        raise AmbientMedError(f"audit: unknown statistic {method!r}")
    calibration, control = split_holdout(len(holdout), holdout_groups)
    holdout_ncc, _ = nearest(holdout[calibration])
    threshold = conformal_threshold(holdout_ncc, quantile)
    sample_ncc, sample_index = nearest(samples)
    control_ncc = {"holdout": nearest(holdout[control])[0]}
    for name, images in (controls or {}).items():
        control_ncc[name] = nearest(np.asarray(images, dtype=np.float32))[0]
    return AuditResult(threshold, sample_ncc, sample_index, holdout_ncc, control_ncc, method)


# --- canaries -------------------------------------------------------------------------------


@dataclass
class Canary:
    """A pattern planted (or, for a reference canary, never planted) into training slices.

    Either a small ``(h, w)`` pattern whose top-left pixel goes at ``(row, col)`` of the
    slice, or a full-size ``(H, W)`` additive image with a ``mask`` ``(H, W)`` bool saying
    where it lives (``row``/``col`` ignored).
    """

    pattern: np.ndarray
    row: int = 0
    col: int = 0
    mask: np.ndarray | None = None
    name: str = ""


@dataclass
class CanaryExposure:
    """Per canary: the fraction of samples that reproduce it at its place.

    Attributes:
        exposure: ``(K,)`` planted canaries; reference_exposure: ``(K_ref,)`` never planted.
        threshold / reference_threshold: per canary, calibrated on the null images.
        scores / reference_scores: ``(K, N)`` / ``(K_ref, N)`` samples' local scores.
        null_exposure / reference_null_exposure: the null images' own fraction above
            (about ``1 - quantile``).
    """

    exposure: np.ndarray
    threshold: np.ndarray
    scores: np.ndarray
    null_exposure: np.ndarray
    reference_exposure: np.ndarray
    reference_threshold: np.ndarray
    reference_scores: np.ndarray
    reference_null_exposure: np.ndarray

    def summary(self) -> dict[str, float]:
        """Flat record: mean and max exposure of planted and of reference canaries."""

        def stats(values: np.ndarray, prefix: str) -> dict[str, float]:
            if not len(values):
                return {}
            return {f"{prefix}_mean": float(values.mean()), f"{prefix}_max": float(values.max())}

        return stats(self.exposure, "canary_exposure") | stats(
            self.reference_exposure, "canary_reference_exposure"
        )


def _canary_template(
    canary: Canary, shape: tuple[int, int], params: CopyStatistic, device: torch.device
) -> tuple[tuple[int, int, int, int], torch.Tensor, torch.Tensor]:
    """``(box (row, col, h, w), band-passed pattern (h, w), support (h, w) bool)``."""
    height, width = shape
    pattern = np.asarray(canary.pattern, dtype=np.float32)
    label = canary.name or "canary"
    if canary.mask is not None:
        if pattern.shape != shape or np.shape(canary.mask) != shape:
            raise AmbientMedError(
                f"{label}: full-size pattern {pattern.shape} and mask {np.shape(canary.mask)} "
                f"must both be {shape}"
            )
        rows, cols = np.nonzero(canary.mask)
        if not len(rows):
            raise AmbientMedError(f"{label}: empty mask")
        row, col = int(rows.min()), int(cols.min())
        h, w = int(rows.max()) - row + 1, int(cols.max()) - col + 1
        full = pattern * np.asarray(canary.mask, dtype=np.float32)
        support = np.asarray(canary.mask, dtype=bool)[row : row + h, col : col + w]
    else:
        if pattern.ndim != 2:
            raise AmbientMedError(f"{label}: pattern must be 2-D, got {pattern.shape}")
        row, col = int(canary.row), int(canary.col)
        h, w = pattern.shape
        if row < 0 or col < 0 or row + h > height or col + w > width:
            raise AmbientMedError(
                f"{label}: pattern {pattern.shape} at ({row}, {col}) does not fit {shape} images"
            )
        full = np.zeros(shape, np.float32)
        full[row : row + h, col : col + w] = pattern
        support = np.ones((h, w), dtype=bool)
    # Band-passed where it sits, as the same filter sees it inside a slice.
    filtered = band_pass(
        torch.from_numpy(full)[None].to(device), params.sigma_fine, params.sigma_coarse
    )[0]
    template = filtered[row : row + h, col : col + w]
    return (row, col, h, w), template, torch.from_numpy(support).to(device)


def _local_scores(
    images: np.ndarray,
    canaries: Sequence[Canary],
    params: CopyStatistic,
    within_brain: bool,
    device: torch.device,
) -> np.ndarray:
    """``(K, N)``: per canary and image, the best masked NCC between the band-passed image
    patch at the canary's place (shifted by up to ``max_shift``) and the canary's template."""
    shape = tuple(images.shape[1:])
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
    filtered = band_pass(x, params.sigma_fine, params.sigma_coarse)
    # Filled foreground, not eroded: a canary may sit near the edge of the brain.
    brain = torch.from_numpy(brain_masks(images, params.level, params.mask_smooth)).to(device)
    if not within_brain:
        brain = torch.ones_like(brain)
    r = params.max_shift
    filtered = torch.nn.functional.pad(filtered, (r, r, r, r))
    brain = torch.nn.functional.pad(brain, (r, r, r, r))
    out = torch.full((len(canaries), len(images)), -1.0)
    for k, canary in enumerate(canaries):
        (row, col, h, w), template, support = _canary_template(canary, shape, params, device)
        best = torch.full((len(images),), -1.0, device=device)
        for dy, dx in _shifts(r):
            top, left = r + row + dy, r + col + dx
            patch = filtered[:, top : top + h, left : left + w]
            weight = (brain[:, top : top + h, left : left + w] & support).to(patch.dtype)
            count = weight.sum(dim=(1, 2))
            n = count.clamp(min=1)[:, None, None]
            p = (patch - (patch * weight).sum(dim=(1, 2))[:, None, None] / n) * weight
            t = (template - (template * weight).sum(dim=(1, 2))[:, None, None] / n) * weight
            num = (p * t).sum(dim=(1, 2))
            den = (p.square().sum(dim=(1, 2)) * t.square().sum(dim=(1, 2))).sqrt()
            score = torch.where(den > 1e-12, num / den.clamp(min=1e-12), torch.zeros_like(num))
            # Less than half the pattern inside the brain: the sample cannot carry it there.
            score = torch.where(count >= 0.5 * support.sum(), score, torch.full_like(score, -1.0))
            best = torch.maximum(best, score)
        out[k] = best.cpu()
    return out.numpy()


def canary_exposure(
    samples: np.ndarray,
    canaries: Sequence[Canary],
    null_images: np.ndarray,
    reference_canaries: Sequence[Canary] = (),
    quantile: float = 0.99,
    params: CopyStatistic | None = None,
    within_brain: bool = True,
) -> CanaryExposure:
    """Fraction of samples that reproduce each canary at its place.

    The local score of a canary in an image is the NCC, over the canary's support (and the
    image's filled brain mask, unless ``within_brain`` is False), between the band-passed
    image patch at the canary's place and the band-passed canary — the same difference of
    Gaussians as the copy statistic, so smooth anatomy and intensity offsets do not count —
    maximised over shifts of up to ``max_shift`` pixels. An image whose brain covers less than
    half of the canary's support scores -1. Each canary's threshold is the ``quantile`` of
    its score on ``null_images`` (slices that never carried a canary: held-out subjects'),
    calibrated at that canary's place, since the anatomy beneath differs from place to place.

    Args:
        samples: ``(N, H, W)`` generated magnitudes.
        canaries: planted canaries; reference_canaries: never planted, same statistic, so
            ``exposure`` can be compared with ``reference_exposure`` (the chance level).
        null_images: ``(M, H, W)`` images without canaries, M >= 1.

    Returns:
        :class:`CanaryExposure`.
    """
    params = params or CopyStatistic()
    device = _device()
    if len(null_images) < 1:
        raise AmbientMedError("canary exposure: no null images to calibrate on")
    if tuple(np.shape(samples)[1:]) != tuple(np.shape(null_images)[1:]):
        raise AmbientMedError(
            f"canary exposure: samples are {np.shape(samples)[1:]}, null images "
            f"{np.shape(null_images)[1:]}"
        )

    def measure(group: Sequence[Canary]) -> tuple[np.ndarray, ...]:
        if not group:
            empty = np.zeros(0, np.float32)
            return empty, empty, np.zeros((0, len(samples)), np.float32), empty
        null = _local_scores(np.asarray(null_images), group, params, within_brain, device)
        threshold = np.quantile(null, quantile, axis=1)
        scores = _local_scores(np.asarray(samples), group, params, within_brain, device)
        exposure = (scores > threshold[:, None]).mean(axis=1)
        null_exposure = (null > threshold[:, None]).mean(axis=1)
        return exposure, threshold, scores, null_exposure

    return CanaryExposure(*measure(canaries), *measure(reference_canaries))
