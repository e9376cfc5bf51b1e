"""Ambient diffusion: the MONAI network, the training objective and the samplers."""
