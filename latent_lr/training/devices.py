"""The device a command runs on: ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from ..errors import UserInputError


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, …; a CUDA device that is not there is a user error."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserInputError(f"unknown device {name!r}; use cpu or cuda (cuda:N).") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserInputError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...); pick one of them."
        )
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"unknown device {name!r}; use cpu or cuda (cuda:N).")
    return device
