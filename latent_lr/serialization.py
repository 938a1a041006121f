"""Save and load wrapped models as config + state_dict (no pickled modules).

Whole-module pickles break across versions of backbone dependencies (e.g.
e3nn 0.4 -> 0.6); a config and a state_dict do not.  Files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .backbone import adapter_class
from .info_keys import InfoKeys
from .long_range import LongRangeModule
from .model import LongRangeModel

FORMAT = "latent-lr/1"


def save(model: LongRangeModel, path: Union[str, Path]) -> None:
    """Write ``model``'s config and weights to ``path``."""
    if not isinstance(model, LongRangeModel):
        raise ValueError(f"save() takes a model made by latent_lr.wrap, got {type(model).__name__}.")
    torch.save({"format": FORMAT, "config": model.config(), "state_dict": model.state_dict()}, path)


def load(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> LongRangeModel:
    """Rebuild a model written by :func:`save`."""
    return from_payload(torch.load(path, map_location=map_location, weights_only=True), path)


def from_payload(payload: object, source: Union[str, Path]) -> LongRangeModel:
    """Rebuild a model from the contents of a :func:`save` file already read (``source`` names it in errors)."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{source} is not a latent-lr model file (expected format {FORMAT}).")
    config = payload["config"]
    # Files written before adapter options were saved have no "adapter_options".
    options = config.get("adapter_options") or {}
    backbone = adapter_class(config["backbone"]).from_config({"host": config["host"], "options": options})
    long_range = None if config["long_range"] is None else LongRangeModule.from_dict(config["long_range"])
    model = LongRangeModel(backbone, long_range).to(getattr(torch, config["dtype"]))
    model.load_state_dict(payload["state_dict"])
    model.info_keys = InfoKeys.from_dict(config.get("info_keys"))  # absent in files written before keys were stored
    return model
