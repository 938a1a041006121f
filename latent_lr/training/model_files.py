"""Read a model from either file a training run writes: ``best_model.pt`` or ``checkpoint.pt``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import torch

from ..errors import UserInputError
from ..model import LongRangeModel
from ..serialization import FORMAT, load

#: Checkpoint key holding ``LongRangeModel.config()`` (architecture; weights are under ``"model"``).
CHECKPOINT_MODEL_CONFIG = "model_config"
#: Checkpoint key of the weight average (``{"weights": state_dict, "updates": int}``; None without one).
CHECKPOINT_EMA = "ema"


def _read_payload(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not its own
        raise UserInputError(
            f"{path} is not a latent-lr model file (torch cannot read it); give best_model.pt or checkpoint.pt "
            "written by latent-lr train, or a file written by latent_lr.save."
        ) from error


def _checkpoint_config(path: Path, payload: dict) -> dict:
    """The architecture of a checkpoint: stored in it, or (older checkpoints) from best_model.pt beside it."""
    if CHECKPOINT_MODEL_CONFIG in payload:
        return payload[CHECKPOINT_MODEL_CONFIG]
    sibling = path.with_name("best_model.pt")
    if sibling.is_file():
        sibling_payload = _read_payload(sibling)
        if isinstance(sibling_payload, dict) and sibling_payload.get("format") == FORMAT:
            return sibling_payload["config"]
    raise UserInputError(
        f"{path} is a training checkpoint without the model's architecture and has no best_model.pt beside it; "
        "give the run's best_model.pt."
    )


def load_model_file(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> LongRangeModel:
    """A model from ``best_model.pt`` (:func:`latent_lr.save` format) or a training ``checkpoint.pt``
    (its weight average when the run kept one, else its last weights).

    Raises:
        UserInputError: the file is missing or is neither kind of file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"model file {path} does not exist; give best_model.pt or checkpoint.pt of a training run.")
    payload = _read_payload(path)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return load(path, map_location=map_location)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict) and "optimiser" in payload:
        average = payload.get(CHECKPOINT_EMA)
        weights = payload["model"] if average is None else average["weights"]  # the evaluated model: the average if any
        buffer = io.BytesIO()  # re-use load()'s rebuild: the checkpoint's weights in the model-file format
        torch.save({"format": FORMAT, "config": _checkpoint_config(path, payload), "state_dict": weights}, buffer)
        buffer.seek(0)
        return load(buffer, map_location=map_location)  # type: ignore[arg-type]
    raise UserInputError(
        f"{path} is not a latent-lr model file (expected format {FORMAT} or a training checkpoint); "
        "give best_model.pt or checkpoint.pt written by latent-lr train."
    )
