"""A small built-in short-range potential: the backbone of demos and tests.

It needs no backbone package, so the demo and the test-suite run anywhere.
Each atom starts from an element embedding; ``n_layers`` rounds of messages
m_i = Σ_j φ(r_ij) ⊙ W h_j (Gaussian radial basis φ, cosine cut-off) update it;
the energy is a per-atom MLP plus a per-element reference energy.  All
features are invariant; the energy is strictly local within ``cutoff``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from latent_lr.backbone import Backbone
from latent_lr.data import AtomsBatch
from latent_lr.neighbors import edge_vectors, radius_graph

from .common import species_lookup


class RadialPotential(nn.Module):
    """Message-passing invariant potential (host model).

    Args:
        species: atomic numbers the model knows.
        cutoff: interaction cut-off, Å.
        hidden_dim: feature width.
        n_radial: number of Gaussian radial basis functions.
        n_layers: message-passing rounds.
    """

    species_index: torch.Tensor  # buffer (Z_max + 1,): atomic number -> row of the embedding
    centres: torch.Tensor  # buffer (n_radial,): radial basis centres, Å

    def __init__(
        self,
        species: Sequence[int],
        cutoff: float = 4.0,
        hidden_dim: int = 32,
        n_radial: int = 8,
        n_layers: int = 2,
    ):
        super().__init__()
        self.species = [int(z) for z in species]
        self.cutoff = float(cutoff)
        self.hidden_dim = hidden_dim
        self.n_radial = n_radial
        self.n_layers = n_layers
        self.register_buffer("species_index", species_lookup(self.species), persistent=False)
        self.embedding = nn.Embedding(len(self.species), hidden_dim)
        self.register_buffer("centres", torch.linspace(0.0, cutoff, n_radial))
        # No bias: a filter must vanish with the radial basis at the cut-off (smooth energy).
        self.filters = nn.ModuleList(nn.Linear(n_radial, hidden_dim, bias=False) for _ in range(n_layers))
        self.mixers = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(n_layers))
        self.updates = nn.ModuleList(
            nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.SiLU()) for _ in range(n_layers)
        )
        self.readout = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 1))
        self.reference_energy = nn.Parameter(torch.zeros(len(self.species)))

    def radial_basis(self, distance: torch.Tensor) -> torch.Tensor:
        width = self.cutoff / self.n_radial
        gauss = torch.exp(-((distance[:, None] - self.centres) ** 2) / (2 * width**2))
        envelope = 0.5 * (torch.cos(math.pi * distance / self.cutoff) + 1.0)
        envelope = torch.where(distance < self.cutoff, envelope, torch.zeros_like(envelope))
        return gauss * envelope[:, None]

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy (B,) eV and features (N, hidden_dim)."""
        atomic, features = self.per_atom_energies(data)
        energy = atomic.new_zeros(data.n_structures).index_add(0, data.batch, atomic)
        return energy, features

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energies (N,) eV and features (N, hidden_dim)."""
        edge_index, unit_shifts = radius_graph(data, self.cutoff)
        sender, receiver = edge_index
        distance = edge_vectors(data, edge_index, unit_shifts).norm(dim=1)
        basis = self.radial_basis(distance)
        kind = self.species_index[data.numbers]
        features = self.embedding(kind).to(data.positions.dtype)
        for filt, mix, update in zip(self.filters, self.mixers, self.updates):
            message = filt(basis) * mix(features)[sender]
            aggregated = torch.zeros_like(features).index_add(0, receiver, message)
            features = features + update(torch.cat([features, aggregated], dim=1))
        return self.readout(features).squeeze(-1) + self.reference_energy[kind], features


class RadialBackbone(Backbone):
    """Adapter for :class:`RadialPotential` (built in, no extra package)."""

    name = "radial"
    label = "built-in radial"
    host: RadialPotential

    @property
    def feature_dim(self) -> int:
        return self.host.hidden_dim

    @property
    def cutoff(self) -> float:
        return self.host.cutoff

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return isinstance(model, RadialPotential)

    @property
    def known_elements(self) -> list[int]:
        return sorted(self.host.species)

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.host(data)

    @property
    def receptive_field(self) -> float:
        return self.host.n_layers * self.host.cutoff

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.host.per_atom_energies(data)

    def host_config(self) -> dict[str, Any]:
        host = self.host
        return dict(
            species=host.species,
            cutoff=host.cutoff,
            hidden_dim=host.hidden_dim,
            n_radial=host.n_radial,
            n_layers=host.n_layers,
        )

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        return RadialPotential(**config).double()

    @classmethod
    def default_host(cls, species: list[int], **options: Any) -> nn.Module:
        return RadialPotential(species, **options).double()
