"""Training settings, from the command line or a JSON/TOML file."""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from ..config import LongRangeConfig
from .defaults import AUTO, AUTO_SETTINGS, check_auto_setting

#: Seconds per unit accepted by :func:`parse_duration`.
DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: Union[str, float, int]) -> float:
    """Seconds in ``text``: a number of seconds, or a number followed by s, m/min or h (``"90"``, ``"30m"``, ``"1.5h"``)."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|m|min|h|)\s*", text)
        if match is None:
            raise ValueError(f"time budget {text!r} is not a duration; give seconds (3600) or a number with s, m or h (30m, 1.5h).")
        seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"time budget {text!r} must be a positive, finite duration.")
    return seconds


#: Learning-rate schedules after the warm-up.
SCHEDULERS = ("plateau", "cosine", "constant")


@dataclass
class TrainConfig:
    """Everything a training run needs.  Units: energies eV, forces eV/Å.

    Loss = energy_weight·MSE(E/N) + forces_weight·MSE(F) + dipole_weight·MSE(μ)
    + charges_weight·MSE(q) (optional terms only when the key is given), averaged over
    the global batch (see :mod:`latent_lr.training.loss`).

    ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (under ``distributed``, ``cuda`` is each
    rank's local GPU).  ``dtype`` is the training precision; ``eval_dtype`` (default: the
    same) the precision of validation and final evaluation, e.g. float32 training with
    float64 evaluation.  ``distributed``: data-parallel over the processes a launcher
    (torchrun, SLURM srun) started, ``batch_size`` structures (or the budgets below) per rank and step.

    Data (``train``, ``valid``, ``test``): a file or a list of files, folders of
    shards or globs (extended XYZ, or HDF5 from ``latent-lr prepare-data``).
    Batches: ``batch_size`` structures each, or, when ``max_atoms_per_batch``
    and/or ``max_edges_per_batch`` (directed edges within the backbone's
    cut-off) are set, as many structures as fit that budget (``batch_size`` is
    then ignored; see :mod:`latent_lr.training.sampler`).

    Recipe (see :mod:`latent_lr.training.recipe`; the defaults reproduce the plain recipe):
    ``amsgrad``; ``gradient_clip`` (max gradient 2-norm, 0/None: off); ``scheduler``
    plateau|cosine|constant after ``warmup_epochs`` of linear warm-up from
    ``warmup_start_factor``·learning_rate; ``plateau_factor``/``plateau_patience``
    (None: max(1, patience // 4)); ``min_learning_rate`` (cosine floor); ``ema_decay``
    (None: no weight average; e.g. 0.99); a second stage from ``stage_two_start`` (fraction
    of ``epochs`` if < 1, else an epoch) with ``stage_two_energy_weight``,
    ``stage_two_forces_weight``, ``stage_two_learning_rate`` (None: unchanged);
    ``nonfinite_lr_factor`` (rate multiplier after a non-finite step); ``time_budget``
    (seconds, or a string such as "30m"; None: no limit).

    ``energy_weight``, ``forces_weight``, ``epochs`` and ``patience`` default to ``"auto"``:
    chosen from the training set when it is read (:mod:`latent_lr.training.defaults`).
    """

    train: Union[str, list[str]] = ""
    valid: Optional[Union[str, list[str]]] = None
    valid_fraction: float = 0.1
    test: Optional[Union[str, list[str]]] = None
    backbone: str = "radial"
    host_options: dict[str, Any] = field(default_factory=dict)
    long_range: bool = True
    long_range_options: LongRangeConfig = field(default_factory=LongRangeConfig)
    init_model: Optional[str] = None
    trust_pickle: bool = False
    freeze_host: bool = False
    trainable_host_parameters: list[str] = field(default_factory=list)
    energy_key: str = "energy"
    forces_key: str = "forces"
    dipole_key: Optional[str] = None
    charges_key: Optional[str] = None
    total_charge_key: Optional[str] = None
    bec_key: Optional[str] = None
    total_spin_key: Optional[str] = None
    multiplicity_key: Optional[str] = None
    energy_weight: Union[float, str] = AUTO
    forces_weight: Union[float, str] = AUTO
    dipole_weight: float = 1.0
    charges_weight: float = 1.0
    reference_energies: Union[str, dict[str, float]] = "fit"
    epochs: Union[int, str] = AUTO
    batch_size: int = 8
    max_atoms_per_batch: Optional[int] = None
    max_edges_per_batch: Optional[int] = None
    learning_rate: float = 3e-3
    patience: Union[int, str] = AUTO
    seed: int = 0
    dtype: str = "float64"
    eval_dtype: Optional[str] = None
    device: str = "cpu"
    distributed: bool = False
    out: str = "runs/train"
    progress: bool = True
    amsgrad: bool = False
    gradient_clip: Optional[float] = 10.0
    scheduler: str = "plateau"
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    plateau_factor: float = 0.5
    plateau_patience: Optional[int] = None
    min_learning_rate: float = 0.0
    ema_decay: Optional[float] = None
    stage_two_start: Optional[float] = None
    stage_two_energy_weight: Optional[float] = None
    stage_two_forces_weight: Optional[float] = None
    stage_two_learning_rate: Optional[float] = None
    nonfinite_lr_factor: float = 0.5
    time_budget: Optional[Union[float, str]] = None
    #: After training, fix the global sign of latent charges (latent_lr.sign_convention); off: keep the raw sign.
    sign_convention: bool = True
    #: Issue 13 item 2: weight of Σ_s (Q_s − Σ_i q̃_i)² / S for fragment-aware latent charges (0: off).
    charge_excess_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("dtype", "eval_dtype"):
            value = getattr(self, name)
            if value is not None and value not in ("float32", "float64"):
                raise ValueError(f"{name} must be float32 or float64, got {value!r}.")
        if isinstance(self.long_range_options, dict):
            self.long_range_options = LongRangeConfig.from_dict(self.long_range_options)
        elif not isinstance(self.long_range_options, LongRangeConfig):
            raise ValueError(
                f"long_range_options must be a table of long-range settings, got {self.long_range_options!r}."
            )
        for name in AUTO_SETTINGS:
            check_auto_setting(name, getattr(self, name))
        if self.time_budget is not None:
            self.time_budget = parse_duration(self.time_budget)
        if self.long_range and self.long_range_options.spin_channel and not (self.total_spin_key or self.multiplicity_key):
            raise ValueError(
                "spin_channel needs total_spin_key (--total-spin-key) or multiplicity_key (--multiplicity-key): "
                "without one every training structure is read as 2S_z = 0; give the info key of the spins."
            )
        if self.trainable_host_parameters and not self.freeze_host:
            raise ValueError("trainable_host_parameters (--trainable-host-parameters) needs freeze_host (--freeze-host).")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """Reject recipe settings out of range (ValueError, one line naming the setting)."""
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}.")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (e.g. 0.99), got {self.ema_decay}.")
        if self.warmup_epochs < 0 or not 0.0 < self.warmup_start_factor <= 1.0:
            raise ValueError("warmup_epochs must be >= 0 and warmup_start_factor in (0, 1].")
        if not 0.0 < self.plateau_factor < 1.0 or not 0.0 < self.nonfinite_lr_factor <= 1.0:
            raise ValueError("plateau_factor must be in (0, 1) and nonfinite_lr_factor in (0, 1].")
        if self.gradient_clip is not None and self.gradient_clip < 0:
            raise ValueError(f"gradient_clip must be >= 0 (0: no clipping), got {self.gradient_clip}.")
        if self.stage_two_start is not None and not 0.0 < self.stage_two_start:
            raise ValueError(f"stage_two_start must be a fraction in (0, 1) of the epochs or an epoch >= 1, got {self.stage_two_start}.")

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "TrainConfig":
        """Read settings from a ``.json`` or ``.toml`` file."""
        path = Path(path)
        text = path.read_text()
        values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        return cls().updated(values)

    def updated(self, values: dict[str, Any]) -> "TrainConfig":
        """A copy with ``values`` (None entries ignored) applied; unknown names are errors."""
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(known)}.")
        merged = asdict(self)
        values = {k: v for k, v in values.items() if v is not None}
        if isinstance(values.get("long_range_options"), dict):
            values["long_range_options"] = {**merged["long_range_options"], **values["long_range_options"]}
        merged.update(values)
        return TrainConfig(**merged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
