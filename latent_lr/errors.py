"""Errors that are the user's to fix (bad input files, options, models).

The command line prints a :class:`UserInputError` as one line,
``latent-lr: error: <message>``, with exit status 2 and no traceback;
anything else is a programming error and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union


class UserInputError(ValueError):
    """Something the user gave (a file, a frame, an option) is wrong; the message says how to fix it."""


def frame_location(path: Union[str, Path], index: int) -> str:
    """``"train.xyz, frame 17 (0-based)"``: a frame as the user gave it (path as typed, index in that file)."""
    return f"{path}, frame {index} (0-based)"
