"""The spin channel: sum rules, the Fukui share of the spin, forces, the sign gauge, bad input, and a
synthetic spin gap that a spin-resolved model learns and a spin-blind one cannot."""

import copy

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule
from ase.calculators.singlepoint import SinglePointCalculator

import latent_lr
from latent_lr.cli import main
from latent_lr.errors import UserInputError
from latent_lr.sign_convention import apply_sign_convention
from latent_lr.spin import total_spin
from latent_lr.synthetic import make_structure
from latent_lr.training.dataset import LabelKeys, frame_from_atoms
from latent_lr.training.predict import predict_file
from latent_lr.training.store import FrameStore, prepare_data

SPECIES = [1, 6, 8, 11, 17]


def _model(seed=0, spin_channel=True, **options):
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential(SPECIES, cutoff=4.0, hidden_dim=8, n_layers=1)
    return latent_lr.wrap(host, spin_channel=spin_channel, **options).double().eval()


def _salt_water(seed=1, n=1):
    rng = np.random.default_rng(seed)
    structures = [make_structure(rng, rng.uniform(2.5, 5.0)) for _ in range(n)]
    for atoms in structures:
        atoms.calc = None
    return structures


def _with(atoms, **info):
    copied = atoms.copy()
    copied.info.update(info)
    return copied


def _crystal():
    atoms = Atoms("NaClOH2", positions=[[0, 0, 0], [2.6, 0.3, 0.1], [1.2, 2.4, 0.2], [1.9, 2.9, 0.6], [0.6, 2.9, 0.5]],
                  cell=[[5.5, 0, 0], [0.4, 5.2, 0], [0.2, 0.3, 5.0]], pbc=True)
    return atoms


def _by_structure(values, data):
    return values.new_zeros(data.n_structures).index_add(0, data.batch, values)


def test_charges_and_spins_sum_to_the_given_totals():
    """Σ q = Q and Σ s = 2S_z for every structure of a mixed batch (open, periodic; spin or multiplicity)."""
    water = molecule("H2O")  # 10 electrons
    methyl = molecule("CH3")  # 9 electrons
    structures = [
        _with(water), _with(water, spin=2), _with(water, multiplicity=3, charge=0.0), _with(water, spin=-2),
        _with(methyl, spin=1), _with(methyl, multiplicity=2, charge=2.0),  # CH3²⁺: 7 electrons, doublet
        _with(_crystal(), spin=4, charge=-2.0),  # 40 electrons
    ]
    data = latent_lr.AtomsBatch.from_atoms(structures)
    out = _model()(data, compute_forces=False)
    expected_spin = torch.tensor([0.0, 2.0, 2.0, -2.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    expected_charge = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 2.0, -2.0], dtype=torch.float64)
    assert torch.equal(data.total_spin, expected_spin)
    torch.testing.assert_close(_by_structure(out["spins"], data), expected_spin, rtol=0, atol=1e-12)
    torch.testing.assert_close(_by_structure(out["charges"], data), expected_charge, rtol=0, atol=1e-12)
    assert out["spins"].abs().max() > 1e-3  # not trivially zero


def test_the_total_spin_is_shared_by_the_two_channels_fukui_weights():
    """s(S) − s(0) = S/2 (w↑/Σw↑ + w↓/Σw↓) and q does not move by more than S/2 (w↑/Σw↑ − w↓/Σw↓): numpy from the weights."""
    model = _model()
    atoms = _salt_water()[0]
    data = latent_lr.AtomsBatch.from_atoms([_with(atoms), _with(atoms, spin=2)])
    out = model(data, compute_forces=False)
    n = len(atoms)
    head = model.long_range.charge_head
    with torch.no_grad():
        features = model.backbone(latent_lr.AtomsBatch.from_atoms(atoms))[1]
        up = head.up_weights.weights(features).numpy()
        down = head.down_weights.weights(features).numpy()
    share_up, share_down = up / up.sum(), down / down.sum()
    spins, charges = out["spins"].numpy(), out["charges"].numpy()
    np.testing.assert_allclose(spins[n:] - spins[:n], share_up + share_down, rtol=0, atol=1e-12)
    np.testing.assert_allclose(charges[n:] - charges[:n], share_up - share_down, rtol=0, atol=1e-12)


@pytest.mark.parametrize("periodic", [False, True])
def test_forces_are_minus_the_gradient_of_the_energy(periodic):
    atoms = _with(_crystal() if periodic else _salt_water()[0], spin=2)
    model = _model(seed=3)
    calc = latent_lr.Calculator(model)
    atoms.calc = calc
    forces = atoms.get_forces()
    numerical = np.zeros_like(forces)
    step = 1e-5
    for i in range(len(atoms)):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                shifted = atoms.copy()
                shifted.positions[i, k] += sign * step
                shifted.calc = calc
                energies.append(shifted.get_potential_energy())
            numerical[i, k] = -(energies[0] - energies[1]) / (2 * step)
    np.testing.assert_allclose(forces, numerical, rtol=0, atol=1e-7)
    assert abs(float(calc.results["magmom"]) - 2.0) < 1e-12


def test_spin_blind_model_gives_equal_energies_for_every_spin_state():
    """spin_channel off: exactly the same outputs for S = 0 and S = 2 of one geometry, and no spin parameters."""
    atoms = _salt_water()[0]
    model = _model(spin_channel=False)
    singlet = model(latent_lr.AtomsBatch.from_atoms(_with(atoms)))
    triplet = model(latent_lr.AtomsBatch.from_atoms(_with(atoms, spin=2)))
    assert set(singlet) == set(triplet) and "spins" not in singlet
    for key in singlet:
        assert torch.equal(singlet[key], triplet[key]), key
    assert not any("spin" in name or "up_weights" in name for name in model.state_dict())


def _spin_gap_data(n_geometries, seed):
    """Structures in S = 0 and S = 2 (2S_z) with E = Σ_i I_Z m_i², m_i = S u_Z / Σ_j u_Zj, listed pairwise.

    A Stoner-like local exchange: the two unpaired electrons sit mostly on O and Cl (shares u),
    whose exchange gain I < 0 lowers the triplet by 0.748 eV.  The geometry's own energy is left
    out (zero), so brief training measures what the spin channel learns, not the host's fit.
    """
    share = {11: 0.1, 17: 1.0, 8: 2.0, 1: 0.2}
    exchange = {11: 0.2, 17: -0.3, 8: -0.5, 1: 0.1}
    rng = np.random.default_rng(seed)
    structures, energies = [], []
    for atoms in (make_structure(rng, rng.uniform(2.5, 5.0)) for _ in range(n_geometries)):
        atoms.calc = None
        u = np.array([share[z] for z in atoms.numbers])
        for spin in (0, 2):
            moments = spin * u / u.sum()
            structures.append(_with(atoms, spin=spin))
            energies.append(float(sum(exchange[z] * m * m for z, m in zip(atoms.numbers, moments))))
    return structures, np.array(energies)


def _trained(spin_channel, structures, energies, steps):
    model = _model(seed=5, spin_channel=spin_channel).train()
    data = latent_lr.AtomsBatch.from_atoms(structures)
    target = torch.tensor(energies)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        predicted = model(data, compute_forces=False, compute_stress=False)["energy"]
        ((predicted - target) ** 2).mean().backward()
        optimiser.step()
    return model.eval()


def test_spin_model_learns_the_spin_gap_a_spin_blind_model_cannot():
    structures, energies = _spin_gap_data(16, seed=0)
    test_structures, test_energies = _spin_gap_data(8, seed=1)
    true_gap = test_energies[1::2] - test_energies[0::2]  # E(S=2) − E(S=0), same geometry
    assert np.allclose(true_gap, -0.7477551020408163)
    gaps = {}
    for spin_channel, steps in ((True, 80), (False, 20)):
        model = _trained(spin_channel, structures, energies, steps)
        predicted = model(latent_lr.AtomsBatch.from_atoms(test_structures), compute_forces=False)["energy"].numpy()
        gaps[spin_channel] = predicted[1::2] - predicted[0::2]
    assert np.all(gaps[False] == 0.0)  # spin-blind: the two states are the same input, whatever it learnt
    np.testing.assert_allclose(gaps[True], true_gap, rtol=0, atol=0.05)  # held-out geometries, 7 % of the gap


def test_charge_sign_flip_negates_charges_keeps_spins_and_energies():
    """Neutral, S = 2: the sign gauge maps q -> −q exactly, s and every energy and force bit-identical."""
    model = _model(seed=2)
    twin = copy.deepcopy(model)
    twin.long_range.charge_sign.fill_(-1.0)
    data = latent_lr.AtomsBatch.from_atoms([_with(a, spin=2) for a in _salt_water(n=2)] + [_with(_crystal(), spin=2)])
    out, flipped = model(data), twin(data)
    assert torch.equal(flipped["charges"], -out["charges"])
    for key in ("spins", "spin_energy", "energy", "forces", "stress"):
        assert torch.equal(flipped[key], out[key]), key


def test_sign_convention_flips_charges_not_spins_and_a_spin_does_not_fix_it():
    model = _model(seed=2)
    model.long_range.charge_head.element_baseline.weight.data[8] = 0.5  # O positive: the convention must flip
    structures = [_with(a, spin=2) for a in _salt_water(n=3)]
    data = latent_lr.AtomsBatch.from_atoms(structures)
    before = model(data, compute_forces=False)
    decision = apply_sign_convention(model, structures)
    after = model(data, compute_forces=False)
    assert decision.rule == "electronegativity" and decision.flipped
    assert torch.equal(after["charges"], -before["charges"]) and torch.equal(after["spins"], before["spins"])
    charged = [_with(a, spin=2, charge=2.0) for a in _salt_water(n=2)]
    assert apply_sign_convention(model, charged).rule == "data"


@pytest.mark.parametrize("info, message", [
    ({"spin": 0.5}, "not an integer"),
    ({"spin": "high"}, "not a number"),
    ({"multiplicity": -1}, "below 1"),
    ({"multiplicity": 0}, "below 1"),
    ({"multiplicity": 2.5}, "not an integer"),
    ({"spin": 1}, "must be even"),  # 10 electrons
    ({"multiplicity": 2}, "must be even"),
    ({"spin": 12}, "needs at least 12 electrons"),
    ({"spin": 2, "multiplicity": 2}, "disagrees"),
    ({"spin": 1, "charge": 1.0}, None),  # H2O⁺: 9 electrons, a doublet is fine
])
def test_bad_spin_input_is_a_one_line_error(info, message):
    atoms = _with(molecule("H2O"), **info)
    if message is None:
        assert float(latent_lr.AtomsBatch.from_atoms(atoms).total_spin[0]) == 1.0
        return
    with pytest.raises(ValueError, match=message) as error:
        latent_lr.AtomsBatch.from_atoms(atoms)
    assert "\n" not in str(error.value)
    with pytest.raises(UserInputError, match=message):
        frame_from_atoms(atoms, LabelKeys(total_charge="charge", total_spin="spin", multiplicity="multiplicity"))


def test_spin_channel_needs_learned_latent_charges():
    with pytest.raises(ValueError, match="spin_channel=True needs charge_model='latent'"):
        latent_lr.LongRangeConfig(spin_channel=True, charge_model="qeq")
    with pytest.raises(ValueError, match="charge_redistribution='learned'"):
        latent_lr.LongRangeConfig(spin_channel=True, charge_redistribution="uniform")


def test_calculator_spin_argument_magmoms_and_state():
    model = _model()
    atoms = _salt_water()[0]  # 38 electrons
    calc = latent_lr.Calculator(model, spin=2)
    atoms.calc = calc
    magmoms = atoms.get_magnetic_moments()
    assert abs(magmoms.sum() - 2.0) < 1e-12 and abs(atoms.get_magnetic_moment() - 2.0) < 1e-12
    by_info = _with(atoms, spin=2)
    by_info.calc = latent_lr.Calculator(model)
    assert by_info.get_potential_energy() == atoms.get_potential_energy()
    plain = latent_lr.Calculator(model)
    atoms.calc = plain
    singlet = atoms.get_potential_energy()
    atoms.info["multiplicity"] = 3  # a change of spin in info is a new calculation
    assert atoms.get_potential_energy() == by_info.get_potential_energy() != singlet
    with pytest.raises(ValueError, match="not an integer"):
        latent_lr.Calculator(model, spin=0.5)
    with pytest.raises(ValueError, match="must be even"):
        atoms.calc = latent_lr.Calculator(model, spin=1)
        atoms.get_potential_energy()


def test_save_load_predict_and_training_keys(tmp_path):
    model = _model()
    latent_lr.save(model, tmp_path / "model.pt")
    loaded = latent_lr.load(tmp_path / "model.pt")
    assert loaded.long_range.config.spin_channel
    structures = [_with(a, multiplicity=3) for a in _salt_water(n=2)]
    ase.io.write(tmp_path / "in.xyz", structures, format="extxyz")
    predict_file(tmp_path / "model.pt", tmp_path / "in.xyz", tmp_path / "out.xyz")
    written = ase.io.read(tmp_path / "out.xyz", ":")
    expected = model(latent_lr.AtomsBatch.from_atoms(structures), compute_forces=False)["spins"].numpy()
    got = np.concatenate([a.arrays["latent_spins"] for a in written])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-7)  # extended XYZ keeps 8 digits
    np.testing.assert_allclose([a.arrays["latent_spins"].sum() for a in written], [2.0, 2.0], rtol=0, atol=1e-7)
    frame = frame_from_atoms(_with(structures[0], mult=3), LabelKeys(multiplicity="mult"))
    assert frame.total_spin == 2 and frame.atoms.info["spin"] == 2
    assert frame_from_atoms(structures[0], LabelKeys()).total_spin == 0  # no key given: not read
    keys = LabelKeys(energy=None, forces=None, multiplicity="multiplicity")
    prepare_data([tmp_path / "in.xyz"], tmp_path / "spins.h5", keys)
    stored = FrameStore(tmp_path / "spins.h5", keys).frames([0, 1])
    assert [f.total_spin for f in stored] == [2, 2] and stored[0].atoms.info["spin"] == 2
    assert FrameStore(tmp_path / "spins.h5", LabelKeys(energy=None, forces=None)).frames([0])[0].total_spin == 0
    prepare_data([tmp_path / "in.xyz"], tmp_path / "plain.h5", LabelKeys(energy=None, forces=None))
    with pytest.raises(UserInputError, match="prepared without total spins"):
        FrameStore(tmp_path / "plain.h5", keys)


def test_total_spin_reader_skips_parity_for_fractional_charge():
    assert total_spin({"spin": 1}, [8, 1, 1], charge=0.5) == 1


def test_several_mpi_ranks_refuse_the_spin_channel():
    from latent_lr.domain_decomposition import DecomposedModel

    with pytest.raises(UserInputError, match="spin channel"):
        DecomposedModel(_model(), allreduce=lambda values: values)


def test_cli_trains_and_predicts_with_a_multiplicity_key(tmp_path):
    """latent-lr train --spin-channel on --multiplicity-key mult, then predict: the spins sum to mult − 1."""
    structures, energies = _spin_gap_data(4, seed=2)
    for atoms, energy in zip(structures, energies):
        atoms.info["mult"] = atoms.info.pop("spin") + 1
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((len(atoms), 3)))
    ase.io.write(tmp_path / "train.xyz", structures, format="extxyz")
    tiny = ["--backbone", "radial", "--host-options", '{"cutoff": 4.0, "hidden_dim": 8}', "--no-progress"]
    assert main(["train", "--train", str(tmp_path / "train.xyz"), "--valid", str(tmp_path / "train.xyz"), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--spin-channel", "on", "--multiplicity-key", "mult", *tiny]) in (0, None)
    assert latent_lr.load(tmp_path / "run" / "best_model.pt").long_range.config.spin_channel
    main(["predict", str(tmp_path / "run" / "best_model.pt"), str(tmp_path / "train.xyz"), str(tmp_path / "out.xyz"),
          "--multiplicity-key", "mult"])
    sums = [a.arrays["latent_spins"].sum() for a in ase.io.read(tmp_path / "out.xyz", ":")]
    np.testing.assert_allclose(sums, [0.0, 2.0] * 4, rtol=0, atol=1e-7)
