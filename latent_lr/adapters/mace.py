"""MACE (mace-torch) adapter.

Features: the invariant (0e) channels of ``node_feats`` from every interaction
layer, concatenated.  Host energy: MACE's total energy (including its E0s).
MACE is run with ``compute_force=False``: latent-lr differentiates the total
energy itself, with MACE's edge vectors built from the (strained) positions and
cell it is given, so the long-range term reaches forces and stress.

Tested with mace-torch 0.3.16 under e3nn 0.6 (see the README for the install
route).  ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, which mace's
own loaders need; it is kept (latent-lr's loads pass ``weights_only`` explicitly).

Files (:meth:`MaceBackbone.load_host_file`): a ``.model`` whole-model pickle is
read with :func:`latent_lr.safe_pickle.load_module_pickle` (mace, e3nn and
torch.nn classes only; e3nn's generated code is not loaded) and the host is
rebuilt from its settings and weights, bit-identical to unpickling it; with
``trust_pickle`` it is plainly unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, cast

import numpy as np
import torch
from torch import nn

from latent_lr.backbone import Backbone, isolated_global_state
from latent_lr.data import AtomsBatch
from latent_lr.neighbors import radius_graph
from latent_lr.safe_pickle import allow_listed, load_trusted, needs_trust

from .common import edge_shifts, scalar_index, species_lookup, to_json

with isolated_global_state():
    import mace.modules
    from e3nn import o3
    from mace.tools.scripts_utils import extract_config_mace_model

#: Packages whose classes a MACE .model pickle may name (besides torch.nn).
PICKLE_PACKAGES = ("mace", "e3nn")

DEFAULT_OPTIONS = dict(
    r_max=5.0,
    num_bessel=8,
    num_polynomial_cutoff=5,
    max_ell=2,
    num_interactions=2,
    hidden_irreps="16x0e + 16x1o",
    MLP_irreps="16x0e",
    correlation=2,
    avg_num_neighbors=10.0,
    interaction="RealAgnosticResidualInteractionBlock",
)


class MaceBackbone(Backbone):
    """Adapter for ``mace.modules.MACE`` / ``ScaleShiftMACE`` models."""

    name = "mace"
    label = "MACE"
    host: mace.modules.MACE
    scalar_index: torch.Tensor  # buffer (F,): indices of the 0e channels in the concatenated node features
    element_index: torch.Tensor  # buffer (Z_max + 1,): atomic number -> MACE's element index, -1 unknown

    def __init__(self, host: nn.Module):
        super().__init__(host)
        # MACE's submodules and buffers read as Tensor | Module to mypy (nn.Module.__getattr__).
        mace_model: Any = host
        layers = [o3.Irreps(str(product.linear.irreps_out)) for product in mace_model.products]
        self.register_buffer("scalar_index", scalar_index(layers), persistent=False)
        self.atomic_numbers = [int(z) for z in mace_model.atomic_numbers]
        self.register_buffer("element_index", species_lookup(self.atomic_numbers), persistent=False)

    @property
    def feature_dim(self) -> int:
        return int(self.scalar_index.numel())

    @property
    def cutoff(self) -> float:
        return float(cast(torch.Tensor, self.host.r_max))  # a buffer of MACE's

    @property
    def known_elements(self) -> list[int]:
        return sorted(self.atomic_numbers)

    @property
    def receptive_field(self) -> float:
        """Interaction layers × r_max, Å."""
        return int(cast(torch.Tensor, self.host.num_interactions)) * self.cutoff

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._run(data)
        return out["energy"], out["node_feats"][:, self.scalar_index]

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """MACE's node energies (N,) eV (E0 included) and the features (N, F)."""
        out = self._run(data)
        return out["node_energy"], out["node_feats"][:, self.scalar_index]

    def _run(self, data: AtomsBatch) -> dict[str, Any]:
        """MACE's output dictionary for ``data`` (no forces)."""
        edge_index, unit_shifts = radius_graph(data, self.cutoff)
        shifts = edge_shifts(unit_shifts, data.cell, data.batch[edge_index[0]])
        kinds = self.element_index[data.numbers]
        node_attrs = torch.nn.functional.one_hot(kinds, len(self.atomic_numbers)).to(data.positions.dtype)
        counts = data.n_atoms
        ptr = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        inputs = {
            "positions": data.positions,
            "node_attrs": node_attrs,
            "edge_index": edge_index,
            "shifts": shifts,
            "unit_shifts": unit_shifts,
            "cell": data.cell.reshape(-1, 3),
            "batch": data.batch,
            "ptr": ptr,
        }
        with isolated_global_state():
            return self.host(inputs, training=self.training, compute_force=False)

    def host_config(self) -> dict[str, Any]:
        config = extract_config_mace_model(self.host)
        if "error" in config:
            raise ValueError(
                f"cannot save a {type(self.host).__name__}: {config['error']}. Build the host "
                "as mace.modules.ScaleShiftMACE (scale 1, shift 0 is a plain MACE)."
            )
        return {key: to_json(value, as_string=(o3.Irreps,)) for key, value in config.items()}

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        kwargs = dict(config)
        for key in ("interaction_cls", "interaction_cls_first"):
            kwargs[key] = mace.modules.interaction_classes[kwargs[key]]
        kwargs["readout_cls"] = getattr(mace.modules.blocks, kwargs["readout_cls"])
        for key in ("hidden_irreps", "MLP_irreps", "edge_irreps"):
            if kwargs.get(key) is not None:
                kwargs[key] = o3.Irreps(kwargs[key])
        kwargs["gate"] = None if kwargs["gate"] is None else getattr(torch.nn.functional, kwargs["gate"])
        kwargs["atomic_energies"] = np.asarray(kwargs["atomic_energies"])
        for key in ("atomic_inter_scale", "atomic_inter_shift"):
            kwargs[key] = np.asarray(kwargs[key])
        with isolated_global_state():
            return mace.modules.ScaleShiftMACE(**kwargs).double()

    @classmethod
    def default_host(cls, species: Sequence[int], **options: Any) -> nn.Module:
        settings = dict(DEFAULT_OPTIONS, **options)
        interaction = mace.modules.interaction_classes[settings.pop("interaction")]
        species = sorted(int(z) for z in species)
        with isolated_global_state():
            torch.set_default_dtype(torch.float64)
            host = mace.modules.ScaleShiftMACE(
                r_max=settings["r_max"],
                num_bessel=settings["num_bessel"],
                num_polynomial_cutoff=settings["num_polynomial_cutoff"],
                max_ell=settings["max_ell"],
                interaction_cls=interaction,
                interaction_cls_first=interaction,
                num_interactions=settings["num_interactions"],
                num_elements=len(species),
                hidden_irreps=o3.Irreps(settings["hidden_irreps"]),
                MLP_irreps=o3.Irreps(settings["MLP_irreps"]),
                atomic_energies=np.zeros(len(species)),
                avg_num_neighbors=settings["avg_num_neighbors"],
                atomic_numbers=species,
                correlation=settings["correlation"],
                gate=torch.nn.functional.silu,
                atomic_inter_scale=1.0,
                atomic_inter_shift=0.0,
            )
        return host.double()


    @classmethod
    def load_host_file(cls, path: Path, trust_pickle: bool = False, payload: Optional[object] = None) -> nn.Module:
        """A MACE model from a ``.model`` file (``torch.save(model)``, as mace_run_train writes).

        Without ``trust_pickle`` nothing from the file runs: the allow-listed
        unpickling gives the model's settings and weights, and the host is
        rebuilt by mace's own constructor (e3nn regenerates its code) in the
        file's dtype.  Raises UserInputError when that is not possible.
        """
        if trust_pickle:
            with isolated_global_state():
                host = load_trusted(path)
            if not isinstance(host, mace.modules.MACE):
                raise ValueError(f"{path} holds a {type(host).__name__}, not a MACE model.")
            return host
        loaded = allow_listed(path, PICKLE_PACKAGES, "MACE")
        saved = loaded.model
        if type(saved) is not mace.modules.ScaleShiftMACE:
            raise needs_trust(path, f"it holds a {type(saved).__name__}, which latent-lr cannot rebuild from its settings "
                              "(only ScaleShiftMACE, what mace_run_train writes)")
        dtype = next(p.dtype for p in saved.parameters() if p.dtype.is_floating_point)
        with isolated_global_state():
            host = cls.build_host(cls(saved).host_config()).to(dtype)
        missing, unexpected = host.load_state_dict(saved.state_dict(), strict=False)
        prefixes = tuple(f"{path_}." for path_ in loaded.dropped)
        # Generated code is rebuilt by e3nn; its constants come from the file where both have them.
        stray = [key for key in [*missing, *unexpected] if not key.startswith(prefixes)]
        if stray:
            raise needs_trust(path, f"its weights do not fit the MACE rebuilt from its settings ({stray[:3]})")
        return host.train(saved.training)
