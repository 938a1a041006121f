"""Adapter for CACE (Cartesian Atomic Cluster Expansion, github.com/BingqingCheng/cace).

``CaceBackbone(host)`` wraps a CACE ``NeuralNetworkPotential`` (a module with
``representation``, ``input_modules`` and ``output_modules``).  Each call it

1. builds CACE's input dict from the :class:`~latent_lr.data.AtomsBatch`:
   ``atomic_numbers``, ``positions``, ``cell`` as (3B, 3), ``batch``, ``ptr``,
   ``edge_index`` (row 0 sender, row 1 receiver), ``unit_shifts`` and
   ``shifts = unit_shifts @ cell[batch[sender]]`` recomputed from the given
   (possibly strained, grad-carrying) cell; ``displacement`` is None because
   latent-lr applies the strain itself;
2. calls ``host.representation`` and flattens its 5-D ``node_feats`` to (N, F)
   exactly as CACE's own read-outs do (``reshape(N, -1)``);
3. runs the host's output modules in order, except

   * derivative modules (``Forces``, ``Grad`` or anything with a
     ``forces_key``): latent-lr differentiates the *total* energy itself, and
     CACE's ``Forces`` frees the graph when ``training`` is False;
   * CACE's own long-range branch (``EwaldPotential``, ``LesWrapper`` and any
     module named like ``*Ewald*``), and every later module that reads one of
     their outputs (e.g. ``FeatureAdd(['SR_energy', 'ewald_potential'])``):
     latent-lr's long-range head replaces it;

4. returns the energy under ``energy_key`` (B,) plus, optionally, per-element
   reference energies (CACE trains with E0 removed; its ASE calculator adds
   them back, and so does ``atomic_energies`` here).

The host runs with torch's default dtype set to its parameter dtype (CACE's
``NodeEncoder`` builds its one-hot in the default dtype); the previous default
is restored afterwards.  CACE's input modules (``Preprocess``) are not run:
their only job, straining positions and cell for the virial, is done by
latent-lr.

Adapter options (``latent_lr.wrap(host, backbone="cace", adapter_options={...})``):

* ``energy_key``: which output key is the short-range energy.  Default: the
  ``energy_key`` of the host's ``Forces`` module if a kept module produces it,
  else the single kept ``Atomwise`` with one output whose result feeds no
  long-range module (``SR_energy`` in CACE's LES examples).
* ``output_index``: head index for multi-head energies, passed to the modules
  as CACE does.
* ``atomic_energies``: ``{Z: E0}`` in eV for every element of the model.

Saving (:func:`latent_lr.save`) stores the adapter options (:meth:`CaceBackbone.options`)
and the host's architecture as JSON (:mod:`latent_lr.adapters.cace_config`, which
also builds the small default host for training from scratch).  Lazily built
layers (CACE's ``Atomwise(n_in=None)``) are materialised by a dry run on a
two-atom molecule when the adapter is constructed, with the global RNG state
saved and restored, so ``load_state_dict`` finds every weight.

Checked against the cace package at commit 19ae23c: energies, forces and stress
equal CACE's own (``tests/test_adapter_cace_real.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from ase import Atoms
from torch import nn

from latent_lr.adapters import cace_config
from latent_lr.adapters.common import edge_shifts
from latent_lr.backbone import Backbone, isolated_global_state
from latent_lr.data import AtomsBatch
from latent_lr.neighbors import radius_graph
from latent_lr.safe_pickle import load_whole_model

#: Class names of output modules that differentiate an energy (never run).
DERIVATIVE_MODULES = ("Forces", "Grad")
#: Class names of CACE's own long-range modules (never run; latent-lr replaces them).
LONG_RANGE_MODULES = ("EwaldPotential", "LesWrapper")

_INPUT_ATTRIBUTES = ("feature_key", "feature_keys", "feature1_key", "feature2_key", "y_key", "x_key")
_OUTPUT_ATTRIBUTES = (
    "output_key",
    "per_atom_output_key",
    "descriptor_output_key",
    "charge_key",
    "bec_key",
    "forces_key",
    "stress_key",
    "virial_key",
    "virials_key",
)


# ----------------------------------------------------------------------------
# Which output modules run, and which key is the energy
# ----------------------------------------------------------------------------


def _keys(module: nn.Module, attributes) -> set[str]:
    keys: set[str] = set()
    for attribute in attributes:
        value = getattr(module, attribute, None)
        if isinstance(value, str):
            keys.add(value)
        elif isinstance(value, (list, tuple)):
            keys.update(v for v in value if isinstance(v, str))
    return keys


def _is_derivative(module: nn.Module) -> bool:
    return type(module).__name__ in DERIVATIVE_MODULES or hasattr(module, "forces_key")


def _is_long_range(module: nn.Module) -> bool:
    name = type(module).__name__
    return name in LONG_RANGE_MODULES or "Ewald" in name


def _outputs(module: nn.Module) -> set[str]:
    keys = _keys(module, _OUTPUT_ATTRIBUTES)
    keys.update(getattr(module, "model_outputs", None) or [])
    if not _is_derivative(module):  # LesWrapper writes its energy under energy_key
        keys |= _keys(module, ("energy_key",))
    return keys


def _plan(output_modules, energy_key: Optional[str]) -> tuple[list[int], str, list[str]]:
    """Indices of the output modules to run, the energy key, and what was skipped (for messages)."""
    kept: list[int] = []
    skipped: list[str] = []
    tainted: set[str] = set()
    long_range_inputs: set[str] = set()
    forces_energy_keys: list[str] = []
    for index, module in enumerate(output_modules):
        name = type(module).__name__
        if _is_derivative(module):
            forces_energy_keys += sorted(_keys(module, ("energy_key", "y_key")))
            tainted |= _outputs(module)
            skipped.append(f"{index}:{name} (derivatives are taken by latent-lr)")
        elif _is_long_range(module):
            long_range_inputs |= _keys(module, _INPUT_ATTRIBUTES)
            tainted |= _outputs(module)
            skipped.append(f"{index}:{name} (CACE's long-range branch, replaced by latent-lr's)")
        elif _keys(module, _INPUT_ATTRIBUTES) & tainted:
            tainted |= _outputs(module)
            skipped.append(f"{index}:{name} (reads the output of a skipped module)")
        else:
            kept.append(index)
    produced: dict[str, int] = {}
    for index in kept:
        for key in _outputs(output_modules[index]):
            produced[key] = index
    if energy_key is not None:
        if energy_key not in produced:
            raise ValueError(
                f"energy_key {energy_key!r} is not produced by the CACE output modules that "
                f"the adapter runs (they produce {sorted(produced)}; skipped: {skipped})."
            )
        return kept, energy_key, skipped
    for key in forces_energy_keys:
        if key in produced:
            return kept, key, skipped
    candidates = []
    for index in kept:
        module = output_modules[index]
        output_key = getattr(module, "output_key", None)
        if not isinstance(output_key, str) or not type(module).__name__.endswith("Atomwise"):
            continue
        if int(getattr(module, "n_out", 1)) != 1:
            continue
        if _outputs(module) & long_range_inputs:  # e.g. latent charges for CACE's Ewald
            continue
        candidates.append(output_key)
    if len(candidates) == 1:
        return kept, candidates[0], skipped
    raise ValueError(
        f"cannot tell which output of this CACE model is the short-range energy (candidates: "
        f"{candidates or sorted(produced)}; skipped modules: {skipped}); pass "
        "adapter_options={'energy_key': ...} to latent_lr.wrap."
    )


# ----------------------------------------------------------------------------
# Host helpers
# ----------------------------------------------------------------------------


def _first_tensor(host: nn.Module) -> Optional[torch.Tensor]:
    for tensor in host.parameters():
        if tensor.dtype.is_floating_point:
            return tensor
    for buffer in host.buffers():
        if buffer.dtype.is_floating_point:
            return buffer
    return None


def cace_inputs(data: AtomsBatch, cutoff: float, dtype: torch.dtype) -> dict[str, Optional[torch.Tensor]]:
    """CACE's input dict for ``data`` (what ``Batch.to_dict()`` gives CACE), geometry in ``dtype``.

    ``shifts`` are rebuilt from integer ``unit_shifts`` and the current cell, so
    a strained cell carrying gradients reaches the representation.
    """
    edge_index, unit_shifts = radius_graph(data, cutoff)
    positions = data.positions.to(dtype)
    cell = data.cell.to(dtype)
    unit_shifts = unit_shifts.to(dtype)
    shifts = edge_shifts(unit_shifts, cell, data.batch[edge_index[0]])
    counts = torch.bincount(data.batch, minlength=data.n_structures)
    ptr = torch.zeros(data.n_structures + 1, dtype=torch.long, device=counts.device)
    ptr[1:] = torch.cumsum(counts, 0)
    return {
        "atomic_numbers": data.numbers.long(),
        "positions": positions,
        "cell": cell.reshape(-1, 3),
        "batch": data.batch.long(),
        "ptr": ptr,
        "edge_index": edge_index,
        "shifts": shifts,
        "unit_shifts": unit_shifts,
        "displacement": None,
    }


# ----------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------


class CaceBackbone(Backbone):
    """latent-lr backbone around a CACE ``NeuralNetworkPotential`` (see the module docstring).

    Args:
        host: the CACE model (``representation`` + ``output_modules``).  For a
            ``CombinePotential`` wrap its short-range member ``host.models[i]``.
        atomic_energies: ``{Z: E0}`` (eV) added back per atom, for models
            trained with reference energies removed; must cover every element
            of ``host.representation.zs``.
        energy_key: output key of the short-range energy (default: detected).
        output_index: head index of a multi-head energy.
    """

    name = "cace"
    label = "CACE"

    def __init__(
        self,
        host: nn.Module,
        atomic_energies: Optional[Mapping[Any, float]] = None,
        energy_key: Optional[str] = None,
        output_index: Optional[int] = None,
    ):
        super().__init__(host)

        rep = getattr(host, "representation", None)
        if rep is None or not hasattr(host, "output_modules"):
            hint = (
                " It looks like a CombinePotential: wrap its short-range member host.models[i]."
                if hasattr(host, "models")
                else ""
            )
            raise ValueError(
                f"{type(host).__name__} is not a CACE NeuralNetworkPotential (needs .representation "
                f"and .output_modules).{hint}"
            )
        for module in getattr(host, "input_modules", None) or []:
            if type(module).__name__ != "Preprocess":
                raise ValueError(
                    f"CACE input module {type(module).__name__} is not supported: the adapter runs "
                    "no input modules (latent-lr strains positions and cell itself, which is all "
                    "Preprocess does)."
                )
        self.zs = [int(z) for z in rep.zs]
        self._cutoff = float(rep.cutoff)
        self.output_index = None if output_index is None else int(output_index)
        self.kept_modules, self.energy_key, self.skipped_modules = _plan(host.output_modules, energy_key)

        self.atomic_energies: Optional[dict[int, float]] = None
        if atomic_energies is not None:
            table = {int(z): float(e) for z, e in dict(atomic_energies).items()}
            missing = sorted(set(self.zs) - set(table))
            if missing:
                raise ValueError(
                    f"atomic_energies has no reference energy for atomic numbers {missing}; give "
                    f"one (eV) for every element of the model {self.zs}."
                )
            self.atomic_energies = table

        self._feature_dim = self._dry_run()  # also builds CACE's lazily built layers

    # -- Backbone interface ---------------------------------------------------

    @property
    def feature_dim(self) -> int:
        return self._feature_dim

    @property
    def cutoff(self) -> float:
        return float(self._cutoff)

    @property
    def known_elements(self) -> list[int]:
        return sorted(self.zs)

    @property
    def receptive_field(self) -> float:
        """Å: CACE's first layer plus its message-passing layers, each one cut-off."""
        layers = int(getattr(self.host.representation, "num_message_passing", 0)) + 1
        return layers * self.cutoff

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        energy, features = self._energy_and_features(data, per_atom=False)
        return self._add_atomic_energies(energy, data, data.batch), features

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies (N,) eV (``atomic_energies`` included) and the features (N, F).

        The kept output modules run with every atom as its own structure, so each
        sum-aggregating read-out returns its per-atom terms; read-outs that average
        (``aggregation_mode="avg"``) have no per-atom split and are refused.
        """
        modules: Any = self.host.output_modules  # a CACE model (untyped)
        averaging = [
            type(modules[index]).__name__
            for index in self.kept_modules
            if getattr(modules[index], "aggregation_mode", None) not in (None, "sum")
        ]
        if averaging:
            raise NotImplementedError(
                f"CACE output modules {averaging} average over atoms, so this model has no per-atom energies, "
                "which runs on several MPI ranks need; run LAMMPS on one rank."
            )
        energy, features = self._energy_and_features(data, per_atom=True)
        own_structure = torch.arange(len(data.numbers), device=data.numbers.device)
        return self._add_atomic_energies(energy, data, own_structure), features

    def _energy_and_features(self, data: AtomsBatch, per_atom: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The energy under ``energy_key`` ((B,), or (N,) if ``per_atom``) and the features (N, F), in ``data``'s dtype."""
        reference = _first_tensor(self.host)
        dtype = reference.dtype if reference is not None else data.positions.dtype
        inputs = cace_inputs(data, self.cutoff, dtype)
        host: Any = self.host  # a CACE model (untyped)
        with isolated_global_state():
            torch.set_default_dtype(dtype)
            out = host.representation(inputs)
            node_feats = out["node_feats"]
            features = node_feats.reshape(node_feats.shape[0], -1)
            if per_atom:
                n_atoms = len(data.numbers)
                out = dict(out, batch=torch.arange(n_atoms, device=data.numbers.device))
                out["ptr"] = torch.arange(n_atoms + 1, device=data.numbers.device)
            for index in self.kept_modules:
                out = host.output_modules[index](
                    out, training=self.training, output_index=self.output_index
                )
        energy = out[self.energy_key]
        if energy.dim() == 2 and energy.shape[1] == 1:
            energy = energy[:, 0]
        if energy.dim() != 1:
            raise ValueError(
                f"CACE energy {self.energy_key!r} has shape {tuple(energy.shape)}; for a multi-head "
                "model pass adapter_options={'output_index': ...}."
            )
        return energy.to(data.positions.dtype), features.to(data.positions.dtype)

    def _add_atomic_energies(self, energy: torch.Tensor, data: AtomsBatch, owner: torch.Tensor) -> torch.Tensor:
        """``energy`` plus the per-element reference energies of the atoms, summed by ``owner``."""
        if self.atomic_energies is None:
            return energy
        table = torch.zeros(max(self.atomic_energies) + 1, dtype=energy.dtype, device=energy.device)
        for z, e0 in self.atomic_energies.items():
            table[z] = e0
        return energy.index_add(0, owner, table[data.numbers])

    # -- save / load ------------------------------------------------------------

    def options(self) -> dict[str, Any]:
        return {
            "energy_key": self.energy_key,
            "output_index": self.output_index,
            "atomic_energies": None
            if self.atomic_energies is None
            else {str(z): e for z, e in sorted(self.atomic_energies.items())},
        }

    def host_config(self) -> dict[str, Any]:
        return cace_config.describe_host(self.host)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "CaceBackbone":
        host = config["host"]
        if "adapter" in host:  # files written before options(): {"host": description, "adapter": options}
            config = {"host": host["host"], "options": {**host["adapter"], **(config.get("options") or {})}}
        return cls(cls.build_host(config["host"]), **(config.get("options") or {}))

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        return cace_config.build_host(config)

    @classmethod
    def default_host(cls, species: list[int], **options: Any) -> nn.Module:
        return cace_config.default_host(species, **options)

    @classmethod
    def load_host_file(cls, path: Path, trust_pickle: bool = False, payload: Optional[object] = None) -> nn.Module:
        """A CACE model from a whole-model pickle (``torch.save(model)``, as CACE's training scripts write).

        Read with the allow-list of cace and torch.nn classes (nothing from the
        file runs), or plainly unpickled with ``trust_pickle``.  For a
        ``CombinePotential`` wrap its short-range member (``host.models[i]``).
        """
        with isolated_global_state():
            host = load_whole_model(path, ("cace",), "CACE", trust_pickle)
        if not isinstance(host, nn.Module):
            raise ValueError(f"{path} holds a {type(host).__name__}, not a CACE model.")
        return host

    # -- internals ------------------------------------------------------------

    def _dry_run(self) -> int:
        """Run the host once on a two-atom molecule, RNG state kept (builds lazy layers); returns F."""
        reference = _first_tensor(self.host)
        dtype = reference.dtype if reference is not None else torch.get_default_dtype()
        device = reference.device if reference is not None else torch.device("cpu")
        pair = Atoms(numbers=[self.zs[0]] * 2, positions=[[0.0, 0.0, 0.0], [0.5 * self.cutoff, 0.0, 0.0]])
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            _, features = self.forward(AtomsBatch.from_atoms(pair).to(device, dtype))
        return int(features.shape[1])
