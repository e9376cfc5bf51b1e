"""ambient-med: ambient diffusion for MRI, trained on undersampled or masked scans only."""

__version__ = "0.1.0"
