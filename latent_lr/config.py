"""`LongRangeConfig`: every setting of the long-range module, defined once.

`wrap`, :class:`~latent_lr.long_range.LongRangeModule`, the CLI flags,
:class:`~latent_lr.training.TrainConfig`, `save`/`load` and the docs all read
the option names, defaults, choices and help texts from this dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .electrostatics.warm_start import MAX_EXTRAPOLATION

CHARGE_MODELS = ("latent", "qeq", "qeq_dipoles")
CHARGE_REDISTRIBUTIONS = ("auto", "learned", "fragments", "uniform", "none")
QEQ_SOLVERS = ("auto", "dense", "cg")
POLARIZABILITY_MODES = ("none", "one_step", "self_consistent")
POLARIZABILITY_SOLVERS = ("cg", "dense")
QEQ_PRECONDITIONERS = ("kspace", "jacobi", "blocks")


def _option(default: Any, help: str, choices: Optional[tuple[str, ...]] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class LongRangeConfig:
    """Settings of the long-range module (latent charges, smearing, Ewald, polarisabilities).

    Example::

        config = LongRangeConfig(charge_model="qeq", smearing=0.8)
        model = latent_lr.wrap(host, config=config)

    Every rule between options is checked here, on construction, with an error
    that names the option and how to fix it.
    """

    hidden_dim: int = _option(32, "hidden width of the charge MLP (0: linear)")
    smearing: float = _option(1.0, "Gaussian charge width sigma, Å (LES default 1 Å)")
    learnable_smearing: bool = _option(False, "train sigma as a parameter (kept positive)")
    element_baseline: bool = _option(True, "add a learned per-element offset to the charges")
    accuracy: float = _option(1e-6, "relative accuracy requested from the Ewald/PME engine")
    charge_model: str = _option(
        "latent",
        "latent: charges from an MLP; qeq: charge equilibration with learned χ and J; qeq_dipoles: charges "
        "and induced dipoles (learned α) equilibrated together",
        CHARGE_MODELS,
    )
    charge_redistribution: str = _option(
        "auto",
        "latent charges: how the total charge is imposed (learned: Fukui-like weights over all atoms; fragments: "
        "shared among the separate molecules by a learned score, then by Fukui-like weights; uniform shift; "
        "none: not imposed, the LES baseline; auto: training picks fragments for charged training data, "
        "else learned, and stores the choice; outside training auto is learned)",
        CHARGE_REDISTRIBUTIONS,
    )
    qeq_solver: str = _option("auto", "Qeq linear solver (auto: dense up to 32 atoms, else CG)", QEQ_SOLVERS)
    polarizability: str = _option(
        "none", "latent polarisabilities: none, one_step (p = α E⁰) or self_consistent (p = α(E⁰ + T p))",
        POLARIZABILITY_MODES,
    )
    polarizability_solver: str = _option(
        "cg", "solver of the self-consistent dipoles", POLARIZABILITY_SOLVERS
    )
    polarizability_hidden_dim: Optional[int] = _option(
        None, "hidden width of the polarisability MLP (default: hidden_dim // 2)"
    )
    # Issue 15, item 2: spin channel (spin-up/-down latent charges, total spin imposed, local spin energy).
    spin_channel: bool = _option(
        False, "latent charges split into spin-up and spin-down channels: total charge and total spin 2S_z "
        "imposed by learned Fukui-like weights per channel, plus a learned local spin energy (needs "
        "charge_model='latent', charge_redistribution='learned')"
    )
    # Issue 15 item 5: fast solvers
    solver_warm_start: bool = _option(
        True, "start the Qeq, joint charge-dipole and self-consistent-dipole CG solves from the last solution of the "
        "same structure "
        "(same atomic numbers) kept in the run's engine state; results change only within the CG tolerance"
    )
    qeq_preconditioner: str = _option(
        "blocks", "preconditioner of the Qeq CG and of the charge block of qeq_dipoles: kspace (long-wavelength mesh "
        "model of the Coulomb operator for periodic structures, Jacobi elsewhere; iteration counts stop growing "
        "with the box), blocks (kspace around exact near-field blocks of bonded neighbours; block Jacobi for open "
        "structures; qeq_dipoles uses kspace for it) or jacobi",
        QEQ_PRECONDITIONERS,
    )
    # Issue 15 item 5 (Qeq during MD): extrapolated warm starts and the tolerance of eval-mode (MD) solves.
    solver_extrapolation: int = _option(
        2, "eval mode (MD): warm-start the Qeq CG from the polynomial of this degree (0-3) through the last "
        "steps' charges of the same structure, extrapolated one step ahead (0: the last charges); training "
        "starts from the last charges"
    )
    qeq_md_rtol: Optional[float] = _option(
        None, "eval mode (MD, inference): relative CG tolerance of Qeq and qeq_dipoles (None: accuracy / 10, so that the "
        "solver's force error stays below the engine's; training always uses the dtype default, 1e-10 in "
        "float64); forces err to first order and energies to second order in it"
    )
    # Issue 13 item 2: fragment-aware total charge (charge_redistribution="fragments").
    fragment_bond_factor: float = _option(
        1.2, "fragments: atoms i, j are bonded (same molecule) when |r_ij| < factor x (covalent radius i + j)"
    )

    def __post_init__(self) -> None:
        for name in ("hidden_dim", "polarizability_hidden_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        for name, value in (("smearing", self.smearing), ("accuracy", self.accuracy),
                            ("fragment_bond_factor", self.fragment_bond_factor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}.")
        if not self.smearing > 0:
            raise ValueError(f"smearing must be > 0 Å for latent charges, got {self.smearing}.")
        if not isinstance(self.solver_extrapolation, int) or not 0 <= self.solver_extrapolation <= MAX_EXTRAPOLATION:
            raise ValueError(
                f"solver_extrapolation must be an integer in 0..{MAX_EXTRAPOLATION}, got {self.solver_extrapolation!r}."
            )
        if self.qeq_md_rtol is not None and not (
            isinstance(self.qeq_md_rtol, (int, float)) and 0 < self.qeq_md_rtol < 1
        ):
            raise ValueError(f"qeq_md_rtol is a relative tolerance in (0, 1) or None, got {self.qeq_md_rtol!r}.")
        if not self.fragment_bond_factor > 0:
            raise ValueError(f"fragment_bond_factor must be > 0 (about 1.2), got {self.fragment_bond_factor}.")
        if not 0 < self.accuracy < 1:
            raise ValueError(f"accuracy is a relative error and must lie in (0, 1), got {self.accuracy}.")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}.")
        if self.charge_model != "latent" and self.charge_redistribution not in ("learned", "auto"):
            raise ValueError(
                f"charge_redistribution={self.charge_redistribution!r} applies to charge_model='latent' only; "
                "Qeq imposes the total charge through its constraint. Leave charge_redistribution at its default."
            )
        if self.charge_model == "qeq_dipoles" and self.polarizability != "none":
            raise ValueError(
                f"charge_model='qeq_dipoles' solves its own induced dipoles; polarizability={self.polarizability!r} "
                "would add a second set. Leave polarizability='none' (its width: polarizability_hidden_dim)."
            )

        if self.spin_channel and (self.charge_model != "latent" or self.charge_redistribution not in ("learned", "auto")):
            raise ValueError(
                f"spin_channel=True needs charge_model='latent' and charge_redistribution='learned' (got "
                f"{self.charge_model!r}, {self.charge_redistribution!r}): both spin channels impose their totals "
                "with learned weights. Use those settings or turn spin_channel off."
            )

    def resolved_for(self, charged: bool) -> "LongRangeConfig":
        """``charge_redistribution="auto"`` made concrete for training data that is ``charged`` (some
        non-zero total charge): fragments for latent charges of charged data, else learned."""
        if self.charge_redistribution != "auto":
            return self
        fragments = charged and self.charge_model == "latent" and not self.spin_channel
        return self.replace(charge_redistribution="fragments" if fragments else "learned")

    @property
    def polarizability_width(self) -> int:
        """Hidden width of the polarisability MLP actually used."""
        return self.hidden_dim // 2 if self.polarizability_hidden_dim is None else self.polarizability_hidden_dim

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "long-range options") -> "LongRangeConfig":
        """Build from a mapping; unknown names are an error that lists the known ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown {source} {unknown}; known long-range options are {list(cls.names())}.")
        return cls(**values)

    def replace(self, **changes: Any) -> "LongRangeConfig":
        """A copy with ``changes`` applied (checked like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings; ``LongRangeConfig.from_dict(c.to_dict()) == c``."""
        return dataclasses.asdict(self)

    @classmethod
    def describe(cls) -> str:
        """One line per option, ``name (default): help [choices]``, for docs and ``--help``."""
        lines = []
        for f in dataclasses.fields(cls):
            choices = f" [{', '.join(f.metadata['choices'])}]" if f.metadata["choices"] else ""
            lines.append(f"{f.name} ({f.default!r}): {f.metadata['help']}{choices}")
        return "\n".join(lines)
