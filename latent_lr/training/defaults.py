"""The ``"auto"`` training defaults: loss weights, epochs and patience chosen from the training set.

Resolved once the training set is read (:func:`resolve_auto_settings`), printed in one line
and stored resolved in the run's ``config.json``.  An explicit value for a setting always wins.

Rule (measured on the shared charged dimers and the SPICE dipeptides, benchmarks/RESULTS.md,
"Issue 13, item 2"):

* energy : forces weight = 1000 : 1 below :data:`SMALL_SET` structures (few structures, where the
  energies are what extrapolate to long range: the forces of a handful of rigid molecules say
  little about the interaction energy), 100 : 1 from there on when some structure is charged
  (non-zero total charge), else 1 : 10 (the plain default of force-rich sets);
* epochs: enough for about :data:`TARGET_STEPS` optimiser steps, clamped to
  [:data:`MIN_EPOCHS`, :data:`MAX_EPOCHS`];
* patience: max(epochs // 6, :data:`MIN_PATIENCE`) epochs;
* the long-range option ``charge_redistribution="auto"``: ``"fragments"`` when some structure is charged,
  else ``"learned"`` (:meth:`~latent_lr.config.LongRangeConfig.resolved_for`; "Issue 13 item 2: fragment-aware
  charges" in RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # config.py imports this module's checks
    from .config import TrainConfig
    from .frame_sets import FrameSet

#: The value that asks for a setting to be chosen from the data.
AUTO = "auto"
#: Settings that accept :data:`AUTO`.
AUTO_SETTINGS = ("energy_weight", "forces_weight", "epochs", "patience")

SMALL_SET = 200
TARGET_STEPS = 1500
MIN_EPOCHS, MAX_EPOCHS = 100, 300
MIN_PATIENCE = 20


@dataclass(frozen=True)
class DataSummary:
    """What the rule reads from the training set: its size, optimiser steps per epoch, and whether any structure is charged."""

    n_structures: int
    steps_per_epoch: int
    charged: bool


def is_auto(value: object) -> bool:
    return isinstance(value, str) and value == AUTO


def check_auto_setting(name: str, value: Union[float, int, str]) -> None:
    """Reject a value of an :data:`AUTO_SETTINGS` setting that is neither a number nor ``"auto"`` (ValueError, one line)."""
    if is_auto(value):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or 'auto' (chosen from the training data), got {value!r}.")
    integer = name in ("epochs", "patience")
    if integer and (value != int(value) or value < 1):
        raise ValueError(f"{name} must be a whole number >= 1 or 'auto', got {value!r}.")
    if not integer and not value >= 0:
        raise ValueError(f"{name} must be >= 0 or 'auto', got {value!r}.")


def is_charged(frames: "FrameSet", total_charge_key: object) -> bool:
    """Whether some structure of ``frames`` has a non-zero total charge; read only when a total-charge key is set."""
    return bool(total_charge_key) and any(frame.total_charge != 0.0 for frame in frames)


def auto_values(data: DataSummary) -> dict[str, Union[float, int]]:
    """The rule of the module docstring: value per :data:`AUTO_SETTINGS` name."""
    if data.n_structures < SMALL_SET:
        energy, forces = 1000.0, 1.0
    elif data.charged:
        energy, forces = 100.0, 1.0
    else:
        energy, forces = 1.0, 10.0
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, round(TARGET_STEPS / max(1, data.steps_per_epoch))))
    return {"energy_weight": energy, "forces_weight": forces, "epochs": epochs, "patience": max(epochs // 6, MIN_PATIENCE)}


def resolve_auto_settings(config: "TrainConfig", data: DataSummary) -> tuple["TrainConfig", str]:
    """``config`` with its ``"auto"`` settings replaced by :func:`auto_values`, and the line that says so ("" when none was auto)."""
    chosen = {name: value for name, value in auto_values(data).items() if is_auto(getattr(config, name))}
    if not chosen:
        return config, ""
    labels = {"energy_weight": "energy weight {:g}", "forces_weight": "forces weight {:g}", "epochs": "{} epochs", "patience": "patience {}"}
    steps = f"{data.steps_per_epoch} step{'' if data.steps_per_epoch == 1 else 's'} per epoch"
    reason = f"{data.n_structures} structures, {'charged' if data.charged else 'neutral'}, {steps}"
    message = "auto settings: " + ", ".join(labels[name].format(value) for name, value in chosen.items()) + f" (because: {reason})"
    return config.updated(chosen), message
