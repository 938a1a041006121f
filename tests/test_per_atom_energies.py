"""Per-atom host energies of the MACE and NequIP adapters (what several MPI ranks need).

References: the adapters' own total energy (the sum of the per-atom energies
must equal it to 1e-12 relative) and the wrapped model itself (the
domain-decomposed evaluation on one process, periodic images as ghosts out to
layers × cut-off, must give the model's energy, forces and charges).  Tiny
random hosts (cut-off 2.5 Å, two layers) on a 36-atom triclinic water box.
"""

from __future__ import annotations

import pytest
import torch
from md_structures import set_charge_baselines, triclinic_water
from test_domain_decomposition import one_rank_subdomain

import latent_lr
from latent_lr.backbone import adapter_class
from latent_lr.domain_decomposition import DecomposedModel

SPECIES = [1, 8]
HOST_OPTIONS = {
    "mace": {"r_max": 2.5, "num_interactions": 2, "hidden_irreps": "8x0e + 8x1o", "MLP_irreps": "8x0e"},
    "nequip": {"r_max": 2.5, "num_layers": 2},
}


def tiny_model(backbone: str) -> latent_lr.LongRangeModel:
    pytest.importorskip(backbone)
    torch.manual_seed(0)
    host = adapter_class(backbone).default_host(SPECIES, **HOST_OPTIONS[backbone])
    return set_charge_baselines(latent_lr.wrap(host).eval(), {8: -0.8, 1: 0.4})


@pytest.mark.parametrize("backbone", ["mace", "nequip"])
def test_per_atom_energies_sum_to_the_host_energy_and_decompose(backbone):
    model = tiny_model(backbone)
    atoms = triclinic_water()
    atoms.info["charge"] = 0.0
    data = latent_lr.AtomsBatch.from_atoms(atoms)
    energy, features = model.backbone(data)
    atomic, atomic_features = model.backbone.per_atom_energies(data)
    assert atomic.shape == (len(atoms),)
    assert float(atomic.detach().sum()) == pytest.approx(float(energy[0].detach()), rel=1e-12)
    torch.testing.assert_close(atomic_features, features, rtol=0, atol=0)
    assert model.backbone.receptive_field == pytest.approx(2 * 2.5)

    reference = model(data)
    decomposed = DecomposedModel(model, allreduce=lambda values: values)
    scale = float(reference["forces"].abs().max())
    # Open cluster of ghosts, and periodic along the two directions a LAMMPS 2 x 1 x 1 grid spans whole.
    for spans in [(False, False, False), (False, True, True)]:
        subdomain = one_rank_subdomain(atoms, decomposed.ghost_cutoff(atoms.cell.array, len(atoms)), spans)
        total, forces, charges, _ = decomposed(subdomain)
        assert total == pytest.approx(float(reference["energy"][0]), rel=1e-10)
        torch.testing.assert_close(charges, reference["charges"], rtol=0, atol=1e-10)
        assert float((forces - reference["forces"]).abs().max()) <= 1e-9 * scale
