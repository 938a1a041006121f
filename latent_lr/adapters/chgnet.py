"""CHGNet (``chgnet``) adapter.

Features: the atom features after CHGNet's last atom convolution (output of
``atom_conv_layers[-1]``, before the read-out; width ``atom_fea_dim``, 64 for
the pretrained model), captured with a forward hook for one call
(``return_atom_feas=True`` would give those *before* that layer).  Host
energy: CHGNet's total energy per structure in eV (per-atom energy plus its
``AtomRef`` composition energy, times the number of atoms for intensive models).

Geometry: CHGNet's own path builds positions as ``fractional @ lattice`` from
float32 pymatgen data; the adapter instead (1) finds neighbours within
``atom_graph_cutoff`` with latent-lr's neighbour list (indices and integer
images only) and numbers bonds and angles with CHGNet's own graph builder
(``create_graph``, ``adjacency_list``, ``line_graph_adjacency_list``), then
(2) computes bond vectors in torch from ``data.positions`` and ``data.cell``
(strain and displacement gradients flow) and runs CHGNet's basis expansions
and ``_compute`` without CHGNet's force/stress autograd.  Open and mixed
boundaries need no lattice once neighbours are known; atoms without
neighbours keep their element embedding only.

dtype: the geometry is cast to the host's dtype (float32 weights; ``host.double()``
runs float64); energy and features come back in ``data.positions``' dtype.

Hosts: :meth:`ChgnetBackbone.pretrained_host` loads the weights shipped with
``chgnet`` (offline; ``"chgnet"``, ``"0.3.0"``, ``"0.2.0"``, ``"r2scan"``; used by
``--init-model chgnet``); :meth:`ChgnetBackbone.default_host` is a random CHGNet
without composition model (the trainer fits reference energies itself).
Saving stores ``host.model_args`` (as ``CHGNet.todict``), an ``AtomRef`` by its
settings.  Constructions run silenced inside
:func:`latent_lr.backbone.isolated_global_state`.  Tested with chgnet 0.4.2.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from latent_lr.backbone import Backbone, isolated_global_state
from latent_lr.data import AtomsBatch
from latent_lr.safe_pickle import load_whole_model

from .chgnet_graph import topology as graph_topology
from .common import captured_output, edge_shifts, to_json

with isolated_global_state():
    from chgnet.model.composition_model import AtomRef
    from chgnet.model.model import BatchedGraph, CHGNet

#: ``pretrained_host`` names -> ``CHGNet.load(model_name=...)``.
PRETRAINED_ALIASES = {"chgnet": "0.3.0", "pretrained": "0.3.0", "default": "0.3.0"}
PRETRAINED_NAMES = ("0.3.0", "0.2.0", "r2scan")


@contextlib.contextmanager
def _quiet_construction():
    """CHGNet prints on construction/load; keep the library quiet and torch's state intact."""
    with isolated_global_state(), contextlib.redirect_stdout(io.StringIO()):
        yield


class ChgnetBackbone(Backbone):
    """Adapter for ``chgnet.model.CHGNet``."""

    name = "chgnet"
    label = "CHGNet"
    host: CHGNet

    def __init__(self, host: nn.Module):
        super().__init__(host)
        if not isinstance(host, CHGNet):
            raise ValueError(f"the chgnet adapter wraps chgnet.model.CHGNet, got {type(host).__name__}.")
        self.max_atomic_number = int(host.atom_embedding.embedding.num_embeddings)

    @property
    def feature_dim(self) -> int:
        return int(self.host.atom_fea_dim)

    @property
    def cutoff(self) -> float:
        return float(self._graph_cutoffs()[0])

    def _graph_cutoffs(self) -> tuple[float, float]:
        args = getattr(self.host, "model_args", {})
        converter = getattr(self.host, "graph_converter", None)
        atom_cutoff = args.get("atom_graph_cutoff", getattr(converter, "atom_graph_cutoff", None))
        bond_cutoff = args.get("bond_graph_cutoff", getattr(converter, "bond_graph_cutoff", None))
        if atom_cutoff is None:
            raise ValueError("this CHGNet has neither model_args nor a graph_converter giving its cut-offs.")
        return float(atom_cutoff), float(atom_cutoff if bond_cutoff is None else bond_cutoff)

    def check_elements(self, numbers: torch.Tensor) -> None:
        unknown = sorted({int(z) for z in numbers.tolist()} - set(range(1, self.max_atomic_number + 1)))
        if unknown:
            raise ValueError(
                f"elements with atomic numbers {unknown} are outside CHGNet's range "
                f"1..{self.max_atomic_number}; CHGNet has no embedding for them."
            )

    def _graph_builder(self):
        converter = getattr(self.host, "graph_converter", None)
        if converter is None:
            from chgnet.graph import CrystalGraphConverter

            atom_cutoff, bond_cutoff = self._graph_cutoffs()
            converter = CrystalGraphConverter(atom_graph_cutoff=atom_cutoff, bond_graph_cutoff=bond_cutoff)
        return converter.create_graph

    @property
    def receptive_field(self) -> float:
        """Å: n_conv atom-graph hops plus, between them, one bond-graph hop each (undirected bond
        features are updated from both ends), a bound rather than the exact reach."""
        atom_cutoff, bond_cutoff = self._graph_cutoffs()
        layers = len(self.host.atom_conv_layers)
        return layers * atom_cutoff + (layers - 1) * bond_cutoff

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        prediction, features, dtype = self._run(data)
        energy = prediction["e"] + self._composition_energy(data, dtype)
        if self.host.is_intensive:
            energy = energy * data.n_atoms.to(dtype)
        return energy.to(data.positions.dtype), features

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """CHGNet's site energies plus each atom's composition (AtomRef) energy, (N,) eV, and the features (N, F).

        Only CHGNets that read out per atom before pooling (``mlp_first=True``,
        the pretrained models' setting) have per-atom energies.
        """
        if not self.host.mlp_first:
            raise NotImplementedError(
                "this CHGNet pools atom features before its read-out (mlp_first=False), so it has no "
                "per-atom energies, which runs on several MPI ranks need; run LAMMPS on one rank."
            )
        prediction, features, dtype = self._run(data, site_energies=True)
        atomic = torch.cat(list(prediction["site_energies"])).reshape(-1)
        atomic = atomic + self._atomic_composition_energy(data, dtype)
        return atomic.to(data.positions.dtype), features

    def _run(self, data: AtomsBatch, site_energies: bool = False) -> tuple[dict[str, Any], torch.Tensor, torch.dtype]:
        """CHGNet's prediction dictionary, the features (N, F) in ``data.positions``' dtype, and the host's dtype."""
        host = self.host
        out_dtype = data.positions.dtype
        dtype = next(host.parameters()).dtype
        positions = data.positions.to(dtype)
        cell = data.cell.to(dtype)
        topology = graph_topology(data, self._graph_builder(), *self._graph_cutoffs())

        centre_index = topology.atom_graph[:, 0].long()
        neighbour_index = topology.atom_graph[:, 1].long()
        shifts = edge_shifts(topology.image, cell, data.batch[centre_index])
        centre = positions[centre_index]
        neighbour = positions[neighbour_index] + shifts
        # The lattice term is already in ``neighbour``: zero images against a zero lattice.
        bond_bases_ag, bond_bases_bg, bond_vectors = host.bond_basis_expansion(
            center=centre,
            neighbor=neighbour,
            undirected2directed=topology.undirected2directed,
            image=positions.new_zeros(len(centre), 3),
            lattice=positions.new_zeros(3, 3),
        )
        bond_graph = topology.bond_graph
        if len(bond_graph):
            angle_bases = host.angle_basis_expansion(
                bond_vectors[bond_graph[:, 2].long()], bond_vectors[bond_graph[:, 4].long()]
            )
            batched_bond_graph = bond_graph[:, [0, 1, 3]]
        else:
            angle_bases = positions.new_zeros(0)
            batched_bond_graph = bond_graph.new_zeros(0)
        counts = data.n_atoms
        graph = BatchedGraph(
            atomic_numbers=data.numbers.to(torch.int32),
            bond_bases_ag=bond_bases_ag,
            bond_bases_bg=bond_bases_bg,
            angle_bases=angle_bases,
            batched_atom_graph=topology.atom_graph,
            batched_bond_graph=batched_bond_graph,
            atom_owners=data.batch.to(torch.int32),
            directed2undirected=topology.directed2undirected,
            atom_positions=list(torch.split(positions, counts.tolist())),
            strains=[None] * data.n_structures,  # type: ignore[list-item]  # chgnet's own no-stress value, annotated list[Tensor]
            volumes=torch.linalg.det(cell).abs().detach(),
        )

        with captured_output(host.atom_conv_layers[-1]) as captured:
            prediction = host._compute(
                graph, compute_force=False, compute_stress=False, return_site_energies=site_energies
            )
        return prediction, captured[-1].to(out_dtype), dtype

    def _atomic_composition_energy(self, data: AtomsBatch, dtype: torch.dtype) -> torch.Tensor | float:
        """Each atom's share (N,) of the composition-model energy, in ``dtype``; they sum to the extensive total."""
        model: Any = self.host.composition_model
        if model is None:
            return 0.0
        if not isinstance(model, AtomRef):
            raise NotImplementedError(
                f"CHGNet's {type(model).__name__} composition model is not a sum over atoms, so this CHGNet "
                "has no per-atom energies, which runs on several MPI ranks need; run LAMMPS on one rank."
            )
        one_hot = torch.zeros(len(data.numbers), int(model.max_num_elements), dtype=dtype, device=data.positions.device)
        one_hot[torch.arange(len(data.numbers), device=one_hot.device), data.numbers - 1] = 1.0
        return model._get_energy(one_hot).reshape(-1)  # AtomRef is linear: each atom alone gives its own w_Z

    def _composition_energy(self, data: AtomsBatch, dtype: torch.dtype) -> torch.Tensor | float:
        """CHGNet's composition-model energy (per atom for intensive models), in ``dtype``."""
        # Duck-typed like CHGNet itself does (an AtomRef or any module with these members); typed nn.Module there.
        model: Any = self.host.composition_model
        if model is None:
            return 0.0
        width = int(model.max_num_elements)
        counts = torch.zeros(data.n_structures, width, dtype=dtype, device=data.positions.device)
        counts.index_put_((data.batch, data.numbers - 1), torch.ones_like(data.batch, dtype=dtype), accumulate=True)
        if model.is_intensive:
            counts = counts / data.n_atoms.to(dtype)[:, None]
        return model._get_energy(counts)

    def host_config(self) -> dict[str, Any]:
        args = dict(getattr(self.host, "model_args", None) or {})
        if not args:
            raise ValueError("this CHGNet has no model_args; build it with CHGNet(...) or CHGNet.load().")
        composition = args.get("composition_model")
        if isinstance(composition, nn.Module):
            if type(composition) is not AtomRef:
                raise ValueError(
                    f"cannot save a CHGNet whose composition model is a {type(composition).__name__}; "
                    "only AtomRef, a dataset name or None can be rebuilt."
                )
            args["composition_model"] = {
                "AtomRef": {"is_intensive": bool(composition.is_intensive), "max_num_elements": int(composition.max_num_elements)}
            }
        return {key: to_json(value) for key, value in args.items()}

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        kwargs = dict(config)
        composition = kwargs.get("composition_model")
        if isinstance(composition, dict):
            settings = composition["AtomRef"]
            atom_ref = AtomRef(**settings)
            atom_ref.fitted = True  # its weights come with the state_dict
            kwargs["composition_model"] = atom_ref
        with _quiet_construction():
            return CHGNet(**kwargs)

    @classmethod
    def pretrained_host(cls, name: str = "chgnet") -> nn.Module:
        """A pretrained CHGNet from the weights shipped with the package (no download).

        Args:
            name: ``"chgnet"``/``"pretrained"`` (the newest, 0.3.0) or a CHGNet
                version: ``"0.3.0"``, ``"0.2.0"``, ``"r2scan"``.
        """
        key = str(name).strip().lower()
        key = PRETRAINED_ALIASES.get(key, key)
        for prefix in ("chgnet-", "chgnet_", "chgnet", "v"):
            if key.startswith(prefix) and key[len(prefix) :] in PRETRAINED_NAMES:
                key = key[len(prefix) :]
        if key not in PRETRAINED_NAMES:
            raise ValueError(
                f"unknown pretrained CHGNet {name!r}; use 'chgnet' or one of {list(PRETRAINED_NAMES)}, "
                "or a latent-lr model file."
            )
        with _quiet_construction():
            return CHGNet.load(model_name=key, use_device="cpu", verbose=False)

    @classmethod
    def load_host_file(cls, path: Path, trust_pickle: bool = False, payload: Optional[object] = None) -> nn.Module:
        """A CHGNet from a weight file (``CHGNet.save``/the bundled ``.pth.tar``: ``{"model": {"model_args", "state_dict"}}``).

        Weight files load weights-only (nothing runs); whole-model pickles
        (``torch.save(model)``) go through the allow-list of chgnet and torch.nn classes.
        """
        if payload is None:
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # not weights-only: a whole-model pickle
                payload = None
        if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
            saved = payload["model"]
            with _quiet_construction():
                host = CHGNet(**saved["model_args"])
            host.load_state_dict(saved["state_dict"])
            return host
        with _quiet_construction():
            host = load_whole_model(path, ("chgnet",), "CHGNet", trust_pickle)
        if not isinstance(host, CHGNet):
            raise ValueError(f"{path} holds a {type(host).__name__}, not a CHGNet.")
        return host

    @classmethod
    def default_host(cls, species: Sequence[int], **options: Any) -> nn.Module:
        """A randomly initialised CHGNet for training from scratch.

        CHGNet's own architecture defaults (``CHGNet()``), overridden by
        ``options`` (any ``CHGNet`` keyword), except that the composition model
        defaults to None: latent-lr fits per-element reference energies itself.
        For the pretrained model use :meth:`pretrained_host` (``--init-model chgnet``).
        """
        bad = sorted(int(z) for z in species if not 1 <= int(z) <= 94)
        if bad:
            raise ValueError(f"elements with atomic numbers {bad} are outside CHGNet's range 1..94.")
        settings = dict({"composition_model": None}, **options)
        with _quiet_construction():
            return CHGNet(**settings)

