"""Training settings, from the command line or a JSON/TOML file."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

from ..config import LongRangeConfig


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
    freeze_host: bool = False
    energy_key: str = "energy"
    forces_key: str = "forces"
    dipole_key: Optional[str] = None
    charges_key: Optional[str] = None
    total_charge_key: Optional[str] = None
    bec_key: Optional[str] = None
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    dipole_weight: float = 1.0
    charges_weight: float = 1.0
    reference_energies: Union[str, dict[str, float]] = "fit"
    epochs: int = 100
    batch_size: int = 8
    max_atoms_per_batch: Optional[int] = None
    max_edges_per_batch: Optional[int] = None
    learning_rate: float = 3e-3
    patience: int = 20
    seed: int = 0
    dtype: str = "float64"
    eval_dtype: Optional[str] = None
    device: str = "cpu"
    distributed: bool = False
    out: str = "runs/train"
    progress: bool = True

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
