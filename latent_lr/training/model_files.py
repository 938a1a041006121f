"""Read a model from either file a training run writes: ``best_model.pt`` or ``checkpoint.pt``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import UserInputError
from ..model import LongRangeModel
from ..serialization import FORMAT, from_payload

#: Checkpoint key holding ``LongRangeModel.config()`` (architecture; weights are under ``"model"``).
CHECKPOINT_MODEL_CONFIG = "model_config"
#: Checkpoint key of the weight average (``{"weights": state_dict, "updates": int}``; None without one).
CHECKPOINT_EMA = "ema"


def _read_payload(path: Path, map_location: Union[str, torch.device] = "cpu") -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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


def load_model_file(
    path: Union[str, Path], map_location: Union[str, torch.device] = "cpu", payload: Optional[object] = None
) -> LongRangeModel:
    """A model from ``best_model.pt`` (:func:`latent_lr.save` format) or a training ``checkpoint.pt``
    (its weight average when the run kept one, else its last weights).

    ``payload``: the file's contents when the caller already read them (weights-only, e.g.
    :func:`latent_lr.host_files.identify_file`), so the file is not read again.

    Raises:
        UserInputError: the file is missing or is neither kind of file.
    """
    path = Path(path)
    if payload is None:
        if not path.is_file():
            raise UserInputError(f"model file {path} does not exist; give best_model.pt or checkpoint.pt of a training run.")
        payload = _read_payload(path, map_location)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        return from_payload(payload, path)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict) and "optimiser" in payload:
        average = payload.get(CHECKPOINT_EMA)
        weights = payload["model"] if average is None else average["weights"]  # the evaluated model: the average if any
        return from_payload({"format": FORMAT, "config": _checkpoint_config(path, payload), "state_dict": weights}, path)
    raise UserInputError(
        f"{path} is not a latent-lr model file (expected format {FORMAT} or a training checkpoint); "
        "give best_model.pt or checkpoint.pt written by latent-lr train."
    )
