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
    + charges_weight·MSE(q) (optional terms only when the key is given).
    """

    train: str = ""
    valid: Optional[str] = None
    valid_fraction: float = 0.1
    test: Optional[str] = None
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
    learning_rate: float = 3e-3
    patience: int = 20
    seed: int = 0
    dtype: str = "float64"
    out: str = "runs/train"
    progress: bool = True
    #: After training, fix the global sign of latent charges (latent_lr.sign_convention); off: keep the raw sign.
    sign_convention: bool = True

    def __post_init__(self) -> None:
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
