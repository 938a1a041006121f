"""CHGNet adapter against chgnet's pretrained model: CHGNet's own predictions, hooks, finite differences.

CHGNet's units: ``predict_structure`` returns the energy in eV/atom and the
stress in GPa with ASE's sign (positive = tensile, σ = (1/V) ∂E/∂ε); latent-lr
returns eV per structure and eV/Å³, so E = e·N and σ = s·ase.units.GPa.
"""

import copy
import os

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.calculators.singlepoint import SinglePointCalculator

import latent_lr
from adapter_checks import (
    assert_long_range_sees_beyond_the_cutoff,
    assert_rotation_equivariance_and_bec_sum_rule,
    triclinic_salt,
)
from latent_lr import AtomsBatch
from latent_lr.backbone import adapter_class

pytest.importorskip("chgnet")
# CHGNet's own predict_structure (the reference) warns about its volume tensor.
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad:UserWarning")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The graphs here are tiny: intra-op threads only add waiting on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter():
    return adapter_class("chgnet")


@pytest.fixture(scope="module")
def host(adapter):
    return adapter.pretrained_host("chgnet").eval()


@pytest.fixture(scope="module")
def double_host(host):
    return copy.deepcopy(host).double()


@pytest.fixture(scope="module")
def model(double_host):
    torch.manual_seed(0)
    return latent_lr.wrap(double_host).eval()


salt = triclinic_salt


def structure(atoms):
    from pymatgen.io.ase import AseAtomsAdaptor

    return AseAtomsAdaptor.get_structure(atoms)


def test_wrap_detects_chgnet_and_leaks_no_global_state(host):
    before = (torch.get_default_dtype(), os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"), torch.get_float32_matmul_precision())
    model = latent_lr.wrap(host)
    model.eval()(AtomsBatch.from_atoms(salt()))
    assert model.backbone.name == "chgnet"
    assert model.backbone.feature_dim == 64
    assert model.backbone.cutoff == 6.0
    assert model.dtype == torch.float32  # CHGNet's weights; the long-range head follows them
    after = (torch.get_default_dtype(), os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"), torch.get_float32_matmul_precision())
    assert after == before and torch.get_default_dtype() == torch.float32


def test_host_part_equals_chgnet_own_energy_forces_stress(host):
    atoms = salt()
    reference = host.predict_structure(structure(atoms), task="efs")
    ours = latent_lr.wrap(host, long_range=False).eval()(AtomsBatch.from_atoms(atoms))
    assert ours["energy"].dtype == torch.float32
    assert ours["energy"].item() == pytest.approx(float(reference["e"]) * len(atoms), rel=1e-6)
    np.testing.assert_allclose(ours["forces"].numpy(), reference["f"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours["stress"][0].numpy(), reference["s"] * units.GPa, atol=1e-6, rtol=0)
    assert np.abs(reference["f"]).max() > 0.1 and np.abs(reference["s"]).max() * units.GPa > 1e-3


def test_double_precision_host_agrees_with_float32_and_float64_input_is_cast(host, double_host, adapter):
    atoms = salt()
    reference = host.predict_structure(structure(atoms), task="e")
    energy, features = adapter(host)(AtomsBatch.from_atoms(atoms, dtype=torch.float64))  # float32 host, float64 batch
    assert energy.dtype == features.dtype == torch.float64
    double = latent_lr.wrap(double_host, long_range=False).eval()(AtomsBatch.from_atoms(atoms), compute_forces=False)
    assert double["energy"].item() == pytest.approx(float(reference["e"]) * len(atoms), rel=1e-6)
    assert energy.item() == pytest.approx(double["energy"].item(), rel=1e-6)


def test_features_equal_hook_on_last_atom_conv(host, adapter):
    atoms = salt()
    captured = []
    hook = host.atom_conv_layers[-1].register_forward_hook(lambda module, args, output: captured.append(output.detach()))
    try:
        host.predict_structure(structure(atoms), task="e")
    finally:
        hook.remove()
    _, features = adapter(host).eval()(AtomsBatch.from_atoms(atoms, dtype=torch.float32))
    assert features.shape == (len(atoms), 64)
    torch.testing.assert_close(features.detach(), captured[0], atol=2e-4, rtol=1e-5)
    assert len(host.atom_conv_layers[-1]._forward_hooks) == 0  # the adapter's hook is gone


def test_batch_equals_single_structures_and_open_boundaries_equal_a_big_box(model):
    crystal, ethanol = salt(), molecule("CH3CH2OH")
    boxed = ethanol.copy()
    boxed.cell, boxed.pbc = [25.0, 26.0, 27.0], True
    boxed.center()
    together = model(AtomsBatch.from_atoms([crystal, ethanol, boxed]))
    for index, atoms in enumerate([crystal, ethanol, boxed]):
        alone = model(AtomsBatch.from_atoms(atoms))
        assert together["host_energy"][index].item() == pytest.approx(alone["host_energy"].item(), abs=1e-9)
    # No vacuum box is needed: the open molecule's host energy is the boxed one's.
    assert together["host_energy"][1].item() == pytest.approx(together["host_energy"][2].item(), abs=1e-9)
    short = latent_lr.wrap(model.backbone, long_range=False).eval()
    np.testing.assert_allclose(
        short(AtomsBatch.from_atoms(ethanol))["forces"].numpy(), short(AtomsBatch.from_atoms(boxed))["forces"].numpy(), atol=1e-9
    )


def test_forces_and_stress_with_long_range_match_finite_differences(model, double_host):
    atoms = salt()
    atoms.calc = latent_lr.Calculator(model)
    forces = atoms.get_forces()
    numerical = calculate_numerical_forces(atoms, 1e-5, iatoms=[0, 3, 6])
    np.testing.assert_allclose(forces[[0, 3, 6]], numerical, atol=1e-7)
    stress = atoms.get_stress()
    np.testing.assert_allclose(stress, calculate_numerical_stress(atoms, 1e-5), atol=1e-8)
    short = latent_lr.Calculator(latent_lr.wrap(double_host, long_range=False))
    assert np.abs(stress - short.get_stress(atoms)).max() > 1e-6
    assert np.abs(forces - short.get_forces(atoms)).max() > 1e-6


def test_molecule_forces_match_finite_differences(model):
    atoms = molecule("CH3CH2OH")
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, 3e-6), atol=1e-7)


def test_bec_rotation_and_sum_rule(model):
    assert_rotation_equivariance_and_bec_sum_rule(model, atol=1e-8)


def test_long_range_sees_beyond_the_cutoff(model):
    assert_long_range_sees_beyond_the_cutoff(model, atol=1e-4)


def test_save_load_is_exact_and_freeze_host(model, tmp_path):
    latent_lr.save(model, tmp_path / "chgnet.pt")
    loaded = latent_lr.load(tmp_path / "chgnet.pt").eval()
    assert loaded.dtype == torch.float64
    data = AtomsBatch.from_atoms([salt(), molecule("CH3CH2OH")])
    first, second = model(data), loaded(data)
    assert torch.equal(first["energy"], second["energy"])
    assert torch.equal(first["forces"], second["forces"])

    frozen = latent_lr.load(tmp_path / "chgnet.pt").freeze_host()
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.long_range.parameters())
    frozen.train()(AtomsBatch.from_atoms(salt()))["energy"].sum().backward()
    assert all(p.grad is None for p in frozen.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in frozen.long_range.parameters())


def test_from_scratch_host_round_trips(adapter, tmp_path):
    torch.manual_seed(1)
    small = adapter.default_host([11, 17], atom_fea_dim=16, bond_fea_dim=16, angle_fea_dim=16, n_conv=2, mlp_hidden_dims=[16], num_radial=7, num_angular=7)
    assert small.composition_model is None  # latent-lr fits reference energies itself
    wrapped = latent_lr.wrap(small).eval()
    assert wrapped.backbone.feature_dim == 16
    latent_lr.save(wrapped, tmp_path / "small.pt")
    data = AtomsBatch.from_atoms(salt())
    assert torch.equal(wrapped(data)["energy"], latent_lr.load(tmp_path / "small.pt").eval()(data)["energy"])


def test_pretrained_names(adapter):
    assert adapter.pretrained_host("0.3.0").version == "0.3.0"
    with pytest.raises(ValueError, match="unknown pretrained CHGNet"):
        adapter.pretrained_host("9.9.9")


def test_element_outside_chgnet_range_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"outside CHGNet's range 1\.\.94"):
        model(AtomsBatch.from_atoms(Atoms("Am2", positions=[[0, 0, 0], [2.6, 0, 0]])))


def test_fine_tune_pretrained_from_the_command_line(host, tmp_path):
    from latent_lr.cli import main

    frames = []
    for index, a in enumerate([5.5, 5.6, 5.7, 5.65, 5.75]):
        atoms = bulk("NaCl", "rocksalt", a=a)
        atoms.rattle(0.05, seed=index)
        prediction = host.predict_structure(structure(atoms), task="ef")
        atoms.calc = SinglePointCalculator(atoms, energy=float(prediction["e"]) * len(atoms) + 0.01, forces=prediction["f"])
        frames.append(atoms)
    ase.io.write(tmp_path / "train.xyz", frames)
    out = tmp_path / "run"
    main(["train", "--backbone", "chgnet", "--init-model", "chgnet", "--train", str(tmp_path / "train.xyz"),
          "--epochs", "2", "--batch-size", "2", "--valid-fraction", "0.2", "--out", str(out), "--no-progress"])
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3
    assert all(np.isfinite(float(value)) for row in rows[1:] for value in row.split(","))
    tuned = latent_lr.load(out / "best_model.pt")
    assert tuned.backbone.name == "chgnet" and tuned.long_range is not None
    assert tuned.backbone.host.version == "0.3.0"
