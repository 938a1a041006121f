"""The CACE adapter against the real cace package (github.com/BingqingCheng/cace, checked at 19ae23c).

CACE is not on PyPI (and is CC BY-NC 4.0), so CI cannot install it and this
file is skipped there; on a development machine install it with
``pip install --no-deps -e <cace checkout>`` (plus ``matscipy``).

References: CACE's own ASE calculator (energy, forces, stress), finite
differences (ASE), rotations, the acoustic sum rule, and the energy's
independence of a molecule moved beyond the host's cut-off.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from adapter_checks import (
    assert_forces_match_finite_differences,
    assert_long_range_sees_beyond_the_cutoff,
    assert_long_range_stress_matches_finite_strain,
    assert_rotation_equivariance_and_bec_sum_rule,
    triclinic_salt,
)
from ase.build import molecule
from test_domain_decomposition import one_rank_subdomain

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.backbone import isolated_global_state
from latent_lr.domain_decomposition import DecomposedModel

cace = pytest.importorskip("cace")
import cace.modules as cace_modules  # noqa: E402
from cace.models.atomistic import NeuralNetworkPotential  # noqa: E402
from cace.representations import Cace  # noqa: E402

ZS = [1, 6, 8, 11, 17]
CUTOFF = 4.0


def make_host(radial: str = "bessel", trainable: bool = True) -> torch.nn.Module:
    """A small float64 CACE model with stress, built as CACE's example scripts build one."""
    with isolated_global_state():
        torch.set_default_dtype(torch.float32)  # GaussianRBF calls torch.FloatTensor (fails under float64)
        if radial == "gaussian":
            basis = cace_modules.GaussianRBF(n_rbf=5, cutoff=CUTOFF, trainable=trainable)
        else:
            basis = cace_modules.BesselRBF(cutoff=CUTOFF, n_rbf=5, trainable=trainable)
        representation = Cace(
            zs=ZS, n_atom_basis=2, embed_receiver_nodes=True, cutoff=CUTOFF,
            cutoff_fn=cace_modules.PolynomialCutoff(cutoff=CUTOFF), radial_basis=basis, n_radial_basis=6,
            max_l=2, max_nu=3, num_message_passing=1, type_message_passing=["Bchi"],
        )
        energy = cace_modules.Atomwise(n_layers=3, n_hidden=[16, 8], output_key="CACE_energy", add_linear_nn=True)
        forces = cace_modules.Forces(energy_key="CACE_energy", forces_key="CACE_forces", stress_key="CACE_stress")
        host = NeuralNetworkPotential(input_modules=None, representation=representation, output_modules=[energy, forces])
    return host.double()


@pytest.fixture(scope="module")
def host():
    torch.manual_seed(0)
    return make_host()


@pytest.fixture(scope="module")
def model(host):
    torch.manual_seed(0)  # the long-range head's initial weights
    return latent_lr.wrap(host, backbone="cace").eval()


def cace_results(host, atoms, stress: bool):
    """Energy (eV), forces (eV/Å) and stress (eV/Å^3, Voigt, ASE sign) from CACE's own data pipeline and forward."""
    from cace.data import AtomicData
    from cace.tools import torch_geometric

    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        data = AtomicData.from_atoms(atoms, cutoff=host.representation.cutoff)
        batch = next(iter(torch_geometric.dataloader.DataLoader([data], batch_size=1, shuffle=False)))
        out = copy.deepcopy(host)(batch.to_dict(), training=True, compute_stress=stress)
    energy = out["CACE_energy"].detach().reshape(-1)[0].item()
    forces = out["CACE_forces"].detach().numpy()
    if not stress:
        return energy, forces, None
    s = out["CACE_stress"].detach().numpy()[0]
    return energy, forces, np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])


def test_energy_forces_stress_equal_caces_own(host):
    short = latent_lr.wrap(host, backbone="cace", long_range=False).eval()
    assert short.backbone.energy_key == "CACE_energy"
    crystal = triclinic_salt()
    energy, forces, stress = cace_results(host, crystal, stress=True)
    calculator = latent_lr.Calculator(short)
    deviations = [
        abs(calculator.get_potential_energy(crystal) - energy),
        np.abs(calculator.get_forces(crystal) - forces).max(),
        np.abs(calculator.get_stress(crystal) - stress).max(),
    ]
    ethanol = molecule("CH3CH2OH")
    ethanol.center(vacuum=6.0)  # CACE's calculator needs a cell; open boundaries otherwise
    energy, forces, _ = cace_results(host, ethanol, stress=False)
    deviations += [
        abs(calculator.get_potential_energy(ethanol) - energy),
        np.abs(calculator.get_forces(ethanol) - forces).max(),
    ]
    print(f"max deviation from CACE (salt E, F, stress; ethanol E, F): {deviations}")
    assert max(deviations) < 1e-10
    assert abs(energy) > 1e-6  # not trivially zero


def test_per_atom_energies_sum_to_caces_own_energy_and_decompose(host, model):
    crystal = triclinic_salt()
    energy, _, _ = cace_results(host, crystal, stress=False)
    short = latent_lr.wrap(host, backbone="cace", long_range=False).eval()
    atomic, _ = short.backbone.per_atom_energies(AtomsBatch.from_atoms(crystal))
    assert float(atomic.detach().sum()) == pytest.approx(energy, rel=1e-12)
    assert short.backbone.receptive_field == pytest.approx(2 * CUTOFF)

    crystal.info["charge"] = 0.0
    reference = model(AtomsBatch.from_atoms(crystal))
    decomposed = DecomposedModel(model, allreduce=lambda values: values)
    subdomain = one_rank_subdomain(crystal, decomposed.ghost_cutoff(crystal.cell.array, len(crystal)))
    total, forces, _, _ = decomposed(subdomain)
    assert total == pytest.approx(float(reference["energy"][0]), rel=1e-10)
    assert float((forces - reference["forces"]).abs().max()) <= 1e-9 * float(reference["forces"].abs().max())


def test_forces_match_finite_differences(model):
    assert_forces_match_finite_differences(model, triclinic_salt())


def test_stress_with_long_range_matches_finite_strain(model, host):
    assert_long_range_stress_matches_finite_strain(model, host)


def test_rotation_equivariance_and_bec_sum_rule(model):
    assert_rotation_equivariance_and_bec_sum_rule(model)


def test_long_range_sees_beyond_the_cutoff(model):
    assert_long_range_sees_beyond_the_cutoff(model)


def test_unknown_element_is_a_clear_error(model):
    fluorine = molecule("CH3CH2OH")
    fluorine.numbers[0] = 9
    with pytest.raises(ValueError, match="unknown to this CACE model"):
        model(AtomsBatch.from_atoms(fluorine))


@pytest.mark.parametrize("radial", ["bessel", "gaussian"])
def test_save_load_round_trip_is_exact_under_float64_default(radial, tmp_path):
    torch.manual_seed(1)
    host = make_host(radial=radial, trainable=True)
    model = latent_lr.wrap(host, backbone="cace", adapter_options={"atomic_energies": {z: -z / 7 for z in ZS}})
    model.eval()
    path = tmp_path / "model.pt"
    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no float() of a tensor that requires grad
            latent_lr.save(model, path)
        loaded = latent_lr.load(path).eval()
    assert type(loaded.backbone.host.representation.radial_basis) is type(host.representation.radial_basis)
    assert loaded.backbone.atomic_energies == model.backbone.atomic_energies
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), triclinic_salt()])
    a, b = model(data), loaded(data)
    for key in ("energy", "forces", "stress"):
        assert torch.equal(a[key], b[key]), key


def test_default_host_trains_from_the_cli(tmp_path):
    from latent_lr.cli import main
    from latent_lr.synthetic import write_dataset

    data = write_dataset(tmp_path / "data", n_train=8, n_test=2, seed=2)
    out = tmp_path / "run"
    main([
        "train", "--train", str(data["train"]), "--test", str(data["test"]), "--epochs", "2", "--out", str(out),
        "--backbone", "cace", "--host-options", '{"cutoff": 4.0, "n_hidden": [8], "n_layers": 2}',
        "--no-progress", "--batch-size", "4",
    ])
    model = latent_lr.load(out / "best_model.pt")
    assert model.backbone.name == "cace" and type(model.backbone.host).__module__.startswith("cace.")
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3
    assert_forces_match_finite_differences(model.double().eval(), triclinic_salt())


def test_default_host_gradient_step_changes_the_host():
    torch.manual_seed(2)
    adapter = latent_lr.backbone.adapter_class("cace")
    model = latent_lr.wrap(adapter.default_host(ZS, cutoff=4.0), backbone="cace").double().train()
    before = [p.detach().clone() for p in model.backbone.host.parameters()]
    out = model(AtomsBatch.from_atoms([molecule("CH3CH2OH"), triclinic_salt()]).to(dtype=torch.float64))
    loss = (out["energy"] ** 2).sum() + (out["forces"] ** 2).sum()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    changed = [not torch.equal(p0, p) for p0, p in zip(before, model.backbone.host.parameters())]
    assert torch.isfinite(loss) and sum(changed) >= len(changed) // 2


def test_cace_pickle_loads_through_the_allow_list_and_equals_caces_own(tmp_path):
    """A model saved as CACE's training scripts save it (torch.save of the whole model) loads without trust_pickle."""
    torch.manual_seed(2)
    saved = make_host()
    latent_lr.wrap(saved, backbone="cace")  # its dry run builds CACE's lazy layers, as a trained model has them
    crystal = triclinic_salt()
    energy, forces, stress = cace_results(saved, crystal, stress=True)
    path = tmp_path / "best_model.pth"
    torch.save(saved, path)
    host = latent_lr.load_host(path)
    assert type(host) is NeuralNetworkPotential
    calculator = latent_lr.Calculator(latent_lr.wrap(host, long_range=False).eval())
    assert calculator.get_potential_energy(crystal) == pytest.approx(energy, abs=1e-10)
    np.testing.assert_allclose(calculator.get_forces(crystal), forces, atol=1e-10, rtol=0)
    np.testing.assert_allclose(calculator.get_stress(crystal), stress, atol=1e-10, rtol=0)
