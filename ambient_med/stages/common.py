"""What several stages share: loading a trained model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ambient_med.diffusion.model import AmbientDenoiser, build_denoiser
from ambient_med.errors import AmbientMedError
from ambient_med.io.store import load_torch

MODEL_FORMAT = "ambient-med/model/1"


def load_model(path: str | Path) -> tuple[AmbientDenoiser, dict[str, Any]]:
    """The EMA denoiser (eval mode) and the model file's metadata."""
    state = load_torch(path, what="model")
    if state.get("format") != MODEL_FORMAT:
        raise AmbientMedError(
            f"model '{path}': format {state.get('format')!r} is not {MODEL_FORMAT}"
        )
    net = build_denoiser(state["model"], int(state["image_channels"]))
    net.load_state_dict(state["state_dict"])
    net.eval()
    meta = {k: v for k, v in state.items() if k != "state_dict"}
    return net, meta
