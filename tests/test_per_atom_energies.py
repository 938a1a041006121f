"""Per-atom host energies of the MACE, NequIP, CHGNet and CACE adapters (what several MPI ranks need).

References: the adapters' own total energy (the sum of the per-atom energies
must equal it to 1e-12 relative) and the wrapped model itself (the
domain-decomposed evaluation on one process, periodic images as ghosts out to
layers × cut-off, must give the model's energy, forces and charges; a
receptive field stated too short fails it).  Tiny random hosts (cut-off 2.5 Å,
two layers; CHGNet 3 Å atom and 2 Å bond graphs; CACE: the contract stand-in of
tests/cace_contract.py) on a 36-atom triclinic water box.
"""

from __future__ import annotations

import pytest
import torch
from cace_contract import Atomwise, CaceContractModel
from md_structures import set_charge_baselines, triclinic_water
from test_domain_decomposition import one_rank_subdomain

import latent_lr
from latent_lr.backbone import adapter_class
from latent_lr.domain_decomposition import DecomposedModel

SPECIES = [1, 8]
HOST_OPTIONS = {
    "mace": {"r_max": 2.5, "num_interactions": 2, "hidden_irreps": "8x0e + 8x1o", "MLP_irreps": "8x0e"},
    "nequip": {"r_max": 2.5, "num_layers": 2},
    "chgnet": {
        "atom_fea_dim": 16, "bond_fea_dim": 16, "angle_fea_dim": 16, "n_conv": 2, "mlp_hidden_dims": [16],
        "num_radial": 7, "num_angular": 7, "atom_graph_cutoff": 3.0, "bond_graph_cutoff": 2.0,
    },
}
#: Expected receptive fields, Å: layers × cut-off; CHGNet adds a bond-graph hop between its atom layers.
RECEPTIVE_FIELDS = {"mace": 2 * 2.5, "nequip": 2 * 2.5, "chgnet": 2 * 3.0 + 2.0, "cace": 2 * 2.5}


def tiny_host(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if backbone == "cace":
        return CaceContractModel(
            zs=SPECIES, cutoff=2.5, n_atom_basis=2, n_radial_basis=4, max_l=2, max_nu=2, num_message_passing=1, n_hidden=8
        ).double()
    pytest.importorskip(backbone)
    return adapter_class(backbone).default_host(SPECIES, **HOST_OPTIONS[backbone]).double()


def tiny_model(backbone: str, **adapter_options) -> latent_lr.LongRangeModel:
    host = tiny_host(backbone)
    model = latent_lr.wrap(host, backbone=backbone, adapter_options=adapter_options or None).eval()
    return set_charge_baselines(model.double(), {8: -0.8, 1: 0.4})


@pytest.mark.parametrize("backbone", ["mace", "nequip", "chgnet", "cace"])
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
    assert model.backbone.receptive_field == pytest.approx(RECEPTIVE_FIELDS[backbone])

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



def test_cace_reference_energies_are_per_atom_and_averaging_read_outs_are_refused():
    model = tiny_model("cace", atomic_energies={1: -13.6, 8: -432.1})
    data = latent_lr.AtomsBatch.from_atoms(triclinic_water())
    atomic, _ = model.backbone.per_atom_energies(data)
    assert float(atomic.detach().sum()) == pytest.approx(float(model.backbone(data)[0][0].detach()), rel=1e-12)

    host = tiny_host("cace")
    host.output_modules[0] = Atomwise(n_layers=2, n_hidden=[8], output_key="CACE_energy", aggregation_mode="avg")
    averaging = latent_lr.wrap(host.double(), backbone="cace", adapter_options={"energy_key": "CACE_energy"})
    with pytest.raises(NotImplementedError, match="average over atoms"):
        averaging.backbone.per_atom_energies(data)


def test_chgnet_without_per_atom_read_out_is_refused():
    pytest.importorskip("chgnet")
    torch.manual_seed(0)
    host = adapter_class("chgnet").default_host(SPECIES, **HOST_OPTIONS["chgnet"], mlp_first=False)
    model = latent_lr.wrap(host.double(), backbone="chgnet")
    with pytest.raises(NotImplementedError, match="mlp_first=False"):
        model.backbone.per_atom_energies(latent_lr.AtomsBatch.from_atoms(triclinic_water()))
