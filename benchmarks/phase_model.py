"""Does the cohort's simulated phase decide what the prior learns? An ablation of the phase
magnitude image cohorts are given.

Image cohorts (DICOM, NIfTI, the demo) hold magnitudes; ``corrupt`` gives each slice its
subject's smooth phase (:func:`ambient_med.physics.acquisition.complex_slices`: one
polynomial map per subject, strength 0.5–1 × π). ``phase_rotation.py`` shows the crop prior
trained on it gains +2.3–2.6 dB on its hold-out under that phase and loses 0.4–0.85 dB
under none: the prior predicts phase-spread energy in the unmeasured lines whether or not a
scan has it. This runs ``robust_prior.py`` (arguments passed on) with the cohort's phase
swapped for ``--cohort-phase``:

- ``subject``: the workflow's phase (the control);
- ``slice``: a map per slice (seeded by cohort, subject and slice), strength as before;
- ``varied``: a map per slice with its strength also scaled by u ~ U(0, 1) per slice, so
  the cohort holds phases from none to the workflow's strongest.

The swap covers every path that reads the cohort's phase (corrupt, the hold-out); a file's
phase (``file-`` subjects: the new scans) stays the workflow's. Then ``phase_rotation.py``
scores the prior on the hold-out under the workflow's cohort phase, a file's phase and none.

    python benchmarks/phase_model.py --cohort-phase varied --crop-prior --image-size 64 \\
        --steps 1200 --subjects 24 --name robust_prior_crop24_rot_varied_1coil \\
        --workdir benchmarks/work/robust_crop24_varied --scans t1_anatomical demo_t1w_crop \\
        --coils 1 --center-fraction 0.08 --mask-type random --rotate-phase
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ambient_med.physics.acquisition as acquisition  # noqa: E402
import ambient_med.stages.common as common  # noqa: E402
from ambient_med.physics.masks import derive_seed  # noqa: E402

WORKFLOW_PHASE = acquisition.complex_slices


def per_slice_phase(varied: bool):
    """A ``complex_slices`` whose cohort slices each get their own smooth phase (seeded by
    cohort seed, subject and slice), scaled by u ~ U(0, 1) per slice when ``varied``; files'
    slices (``file-`` subjects) keep the workflow's phase."""

    def complex_slices(
        images: np.ndarray,
        subjects: Sequence[str],
        slice_index: np.ndarray | Sequence[int],
        cohort_seed: int,
    ) -> np.ndarray:
        subjects = list(subjects)
        if subjects and str(subjects[0]).startswith("file-"):
            return WORKFLOW_PHASE(images, subjects, slice_index, cohort_seed)
        images = np.asarray(images, dtype=np.float32)
        out = np.empty(images.shape, dtype=np.complex64)
        height, width = images.shape[-2:]
        for n, (subject, z) in enumerate(zip(subjects, np.asarray(slice_index), strict=True)):
            seed = derive_seed(cohort_seed, "phase", subject, int(z))
            phase = acquisition.smooth_phase(height, width, seed, [z])[0]
            if varied:
                phase = phase * np.random.default_rng(seed + 1).uniform(0.0, 1.0)
            out[n] = images[n] * np.exp(1j * phase)
        return out

    return complex_slices


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort-phase", choices=("subject", "slice", "varied"), required=True)
    # Read here and handed to both scripts: the prior phase_rotation.py scores is the one
    # robust_prior.py trains in --workdir.
    shared = parser.add_argument_group("passed to robust_prior.py and phase_rotation.py")
    shared.add_argument("--workdir", required=True)
    shared.add_argument("--results", default=None)
    shared.add_argument("--threads", default="2")
    args, passed_on = parser.parse_known_args(argv)
    both = ["--workdir", args.workdir, "--threads", args.threads]
    if args.results is not None:
        both += ["--results", args.results]
    import phase_rotation
    import robust_prior

    if args.cohort_phase != "subject":
        swapped = per_slice_phase(args.cohort_phase == "varied")
        acquisition.complex_slices = common.complex_slices = swapped
    try:
        path = robust_prior.main(passed_on + both)
    finally:
        acquisition.complex_slices = common.complex_slices = WORKFLOW_PHASE
    phase_rotation.main(both + ["--name", f"{path.stem}_rotation"])
    return path


if __name__ == "__main__":
    main()
