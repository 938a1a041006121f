"""The sign convention of latent charges: gauge invariance, the rule, what overrides it, and every entry point."""

import copy
import json

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

import latent_lr
from latent_lr.cli import _build_parser, _config_from, main
from latent_lr.sign_convention import PAULING_ELECTRONEGATIVITY, apply_sign_convention, most_electronegative
from latent_lr.synthetic import make_structure, write_dataset
from latent_lr.training import TrainConfig, Trainer
from latent_lr.training.predict import predict_file

OXYGEN = 8


def _model(seed=0, **options):
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential([1, 6, 8, 11, 17], cutoff=4.0, hidden_dim=8, n_layers=1)
    return latent_lr.wrap(host, **options).double()


def _structures(n=6, seed=1, charge=0.0):
    rng = np.random.default_rng(seed)
    structures = [make_structure(rng, rng.uniform(2.5, 5.0)) for _ in range(n)]
    for atoms in structures:
        atoms.calc = None
        atoms.info["charge"] = charge
    return structures


def _flipped(model):
    twin = copy.deepcopy(model)
    twin.long_range.charge_sign.fill_(-1.0)
    return twin


def _oxygen_positive(model):
    """Give O a positive raw charge (so the convention must act on the model's raw sign)."""
    model.long_range.charge_head.element_baseline.weight.data[OXYGEN] = 0.5
    return model


def _outputs(model, structures, **kwargs):
    data = latent_lr.AtomsBatch.from_atoms(structures)
    return model.eval()(data, compute_bec=True, **kwargs)


def _crystal():
    atoms = Atoms("NaClOH2", positions=[[0, 0, 0], [2.6, 0.3, 0.1], [1.2, 2.4, 0.2], [1.9, 2.9, 0.6], [0.6, 2.9, 0.5]],
                  cell=[[5.5, 0, 0], [0.4, 5.2, 0], [0.2, 0.3, 5.0]], pbc=True)
    atoms.info["charge"] = 0.0
    return atoms


@pytest.mark.parametrize("options", [{}, {"charge_redistribution": "uniform"}, {"charge_redistribution": "fragments"},
                                     {"charge_model": "qeq", "qeq_solver": "dense"},
                                     {"polarizability": "one_step"}])
def test_flip_leaves_energies_forces_stress_bit_identical_and_negates_moments(options):
    """Bit-identical for charges alone; with polarisabilities to round-off (the engine's field is computed
    by the polarisation identity ½[E(q+1) − E(q−1)], odd in q only to the last bit)."""
    model = _model(**options)
    structures = _structures(3)
    exact = "polarizability" not in options

    def same(a, b):
        return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-12, atol=1e-15)

    plain, flipped = _outputs(model, structures), _outputs(_flipped(model), structures)
    for key in ("energy", "long_range_energy", "forces"):
        assert same(plain[key], flipped[key]), key
    for key in ("charges", "dipole", "bec"):
        assert same(plain[key], -flipped[key]), key
    assert plain["charges"].abs().max() > 1e-3  # a non-trivial check
    periodic = [_crystal()]
    plain, flipped = _outputs(model, periodic), _outputs(_flipped(model), periodic)
    for key in ("energy", "forces", "stress"):
        assert same(plain[key], flipped[key]), key
    assert same(plain["polarization"], -flipped["polarization"])


def test_flip_keeps_the_total_charge_and_changes_a_charged_energy():
    model = _model()
    structures = _structures(2, charge=1.0)
    plain, flipped = _outputs(model, structures), _outputs(_flipped(model), structures)
    sums = torch.zeros(2, dtype=torch.float64).index_add(0, latent_lr.AtomsBatch.from_atoms(structures).batch, flipped["charges"])
    torch.testing.assert_close(sums, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.allclose(plain["energy"], flipped["energy"])  # why the data fix the sign here


def test_pauling_table_and_reference_element():
    # literature values (Pauling scale): F 3.98, O 3.44, N 3.04, Cl 3.16, C 2.55, H 2.20, Na 0.93
    for z, value in {9: 3.98, 8: 3.44, 7: 3.04, 17: 3.16, 6: 2.55, 1: 2.20, 11: 0.93}.items():
        assert PAULING_ELECTRONEGATIVITY[z] == value
    assert most_electronegative([11, 17, 8, 1]) == 8
    assert most_electronegative([1, 6, 7]) == 7
    assert most_electronegative([2, 10, 1]) == 1  # noble gases have no Pauling value
    assert most_electronegative([2]) is None


def test_model_and_its_flipped_copy_end_with_the_same_sign():
    structures = _structures(8)
    model = _oxygen_positive(_model())
    twin = _flipped(model)
    raw = _outputs(model, structures)["charges"]
    oxygen = latent_lr.AtomsBatch.from_atoms(structures).numbers == OXYGEN
    assert raw[oxygen].mean() > 0 > _outputs(twin, structures)["charges"][oxygen].mean()
    first, second = apply_sign_convention(model, structures), apply_sign_convention(twin, structures)
    assert (first.flipped, second.flipped) == (True, False)
    assert first.rule == second.rule == "electronegativity" and first.element == "O"
    charges = _outputs(model, structures)["charges"]
    assert torch.equal(charges, _outputs(twin, structures)["charges"])
    assert torch.equal(charges, -raw)
    assert charges[oxygen].mean() < 0 and first.mean_charge == pytest.approx(float(charges[oxygen].mean()))
    assert not apply_sign_convention(model, structures).flipped  # idempotent


def test_charged_structures_with_total_charge_input_fix_the_sign_and_a_conflict_is_reported():
    structures = _structures(4) + _structures(2, seed=5, charge=1.0)
    model = _oxygen_positive(_model())
    decision = apply_sign_convention(model, structures)
    assert decision.rule == "data" and not decision.flipped and float(model.long_range.charge_sign) == 1.0
    assert "charged" in decision.reason and "positive mean latent charge" in decision.conflict
    # no total-charge input: the net charge does not enter, so the convention applies
    ignoring = _oxygen_positive(_model(charge_redistribution="none"))
    assert apply_sign_convention(ignoring, structures).flipped


def test_external_field_fixes_the_sign():
    structures = _structures(3)
    structures[1].info["external_field"] = np.array([0.0, 0.0, 0.05])
    decision = apply_sign_convention(_oxygen_positive(_model()), structures)
    assert decision.rule == "data" and not decision.flipped and "field" in decision.reason


def test_trained_dipole_labels_decide_and_evaluation_labels_only_report():
    structures = _structures(6)
    model = _model()  # raw O charge: whatever the random head gives
    dipoles = list(_outputs(model, structures)["dipole"].numpy())
    against = {"dipole": [-d for d in dipoles]}
    # trained on labels opposite to the model: the labels flip it, whatever the convention says
    decision = apply_sign_convention(copy.deepcopy(model), structures, against, trained_on=["dipole"])
    assert decision.rule == "labels" and decision.flipped and decision.label_agreement["dipole"] == pytest.approx(1.0)
    agreeing = apply_sign_convention(copy.deepcopy(model), structures, {"dipole": dipoles}, trained_on=["dipole"])
    assert agreeing.rule == "labels" and not agreeing.flipped
    # the same labels for evaluation only: the convention decides and the disagreement is reported
    conventional = apply_sign_convention(copy.deepcopy(model), structures)
    evaluated = apply_sign_convention(copy.deepcopy(model), structures, {"dipole": dipoles if conventional.flipped else against["dipole"]})
    assert evaluated.rule == "electronegativity" and evaluated.flipped == conventional.flipped
    assert evaluated.label_agreement["dipole"] == pytest.approx(-1.0) and "disagree" in evaluated.conflict


def test_undetermined_cases_are_skipped_with_a_reason():
    carbon = [Atoms("C3", positions=[[0, 0, 0], [1.4, 0, 0], [2.1, 1.2, 0]])]
    decision = apply_sign_convention(_model(), carbon)
    assert decision.rule == "skipped" and not decision.flipped and "two elements" in decision.reason
    short_range = latent_lr.wrap(latent_lr.RadialPotential([1, 8, 11, 17]), long_range=False)
    assert apply_sign_convention(short_range, _structures(1)).rule == "skipped"


def test_sign_is_stored_and_old_files_load_with_plus_one(tmp_path):
    model = _flipped(_model())
    latent_lr.save(model, tmp_path / "m.pt")
    loaded = latent_lr.load(tmp_path / "m.pt")
    assert float(loaded.long_range.charge_sign) == -1.0 and loaded.long_range.charge_sign_stored
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    del payload["state_dict"]["long_range.charge_sign"]
    torch.save(payload, tmp_path / "old.pt")
    old = latent_lr.load(tmp_path / "old.pt")
    assert float(old.long_range.charge_sign) == 1.0 and not old.long_range.charge_sign_stored


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A demo-like model trained through the CLI on energies and forces (labels for evaluation only)."""
    root = tmp_path_factory.mktemp("sign")
    paths = write_dataset(root / "data", n_train=64, n_test=8, seed=2)
    status = main([
        "train", "--train", str(paths["train"]), "--out", str(root / "run"), "--backbone", "radial",
        "--host-options", '{"cutoff": 4.0, "hidden_dim": 16, "n_layers": 2}', "--epochs", "12",
        "--learning-rate", "0.005", "--dipole-key", "ref_dipole", "--dipole-weight", "0",
        "--charges-key", "ref_charges", "--charges-weight", "0", "--no-progress",
    ])
    assert status == 0
    return root / "run", paths


def test_training_stores_the_convention_in_best_model_and_checkpoint(trained):
    run, paths = trained
    best, last = latent_lr.load(run / "best_model.pt"), latent_lr.training.model_files.load_model_file(run / "checkpoint.pt")
    structures = ase.io.read(paths["train"], index=":")
    for model in (best, last):
        data = latent_lr.AtomsBatch.from_atoms(structures)
        charges = model.eval()(data, compute_forces=False)["charges"]
        assert charges[data.numbers == OXYGEN].mean() < 0
        assert not apply_sign_convention(model, structures).flipped  # already conventional


def test_two_seeds_that_learn_opposite_raw_signs_agree_after_training(trained):
    run, paths = trained
    other = run.parent / "seed1"
    config = TrainConfig(train=str(paths["train"]), out=str(other), backbone="radial", seed=1, epochs=12,
                         host_options={"cutoff": 4.0, "hidden_dim": 16, "n_layers": 2}, learning_rate=0.005,
                         dipole_key="ref_dipole", dipole_weight=0.0, charges_key="ref_charges", charges_weight=0.0,
                         progress=False)
    Trainer(config).fit()
    decisions = [json.loads((directory / "sign_convention.json").read_text())["best_model"] for directory in (run, other)]
    assert decisions[0]["flipped"] != decisions[1]["flipped"], "seeds 0 and 1 learn opposite raw signs on this set"
    structures = ase.io.read(paths["test"], index=":")
    data = latent_lr.AtomsBatch.from_atoms(structures)
    reference = np.concatenate([a.arrays["ref_charges"] for a in structures])
    for directory, decision in zip((run, other), decisions):
        assert decision["rule"] == "electronegativity" and decision["conflict"] is None
        charges = latent_lr.load(directory / "best_model.pt").eval()(data, compute_forces=False)["charges"]
        assert charges[data.numbers == OXYGEN].mean() < 0
        assert np.corrcoef(charges.numpy(), reference)[0, 1] > 0.5


def test_predict_cli_and_calculator_apply_the_stored_sign(trained, tmp_path):
    run, paths = trained
    target = tmp_path / "out.xyz"
    assert main(["predict", str(run / "best_model.pt"), str(paths["test"]), str(target), "--no-progress"]) == 0
    written = ase.io.read(target, index=":")
    predicted = np.concatenate([a.arrays["latent_charges"] for a in written])
    reference = np.concatenate([a.arrays["ref_charges"] for a in ase.io.read(paths["test"], index=":")])
    assert np.corrcoef(predicted, reference)[0, 1] > 0.5  # the synthetic Na⁺ Cl⁻ O⁻ H⁺ charges, sign included
    model = latent_lr.load(run / "best_model.pt")
    latent_lr.save(_flipped(model), tmp_path / "flipped.pt")
    predict_file(tmp_path / "flipped.pt", paths["test"], tmp_path / "flipped.xyz")
    flipped = np.concatenate([a.arrays["latent_charges"] for a in ase.io.read(tmp_path / "flipped.xyz", index=":")])
    np.testing.assert_allclose(flipped, -predicted, atol=1e-7)
    atoms = written[0].copy()
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_charges(), written[0].arrays["latent_charges"], atol=1e-7)
    np.testing.assert_allclose(atoms.get_dipole_moment(), written[0].get_dipole_moment(), atol=1e-7)


def _old_file_with_the_other_sign(model, path):
    """Write ``model`` as a file from before the convention (no charge_sign) whose charges are the opposite ones."""
    state = dict(model.state_dict())
    sign = float(state.pop("long_range.charge_sign"))
    if sign == 1.0:  # fold a flip into the head's output layer and element offsets
        for key in ("long_range.charge_head.mlp.2.weight", "long_range.charge_head.mlp.2.bias",
                    "long_range.charge_head.element_baseline.weight"):
            state[key] = -state[key]
    torch.save({"format": "latent-lr/1", "config": model.config(), "state_dict": state}, path)


def test_predict_decides_the_sign_for_files_written_before_it(trained, tmp_path, capsys):
    run, paths = trained
    model = latent_lr.load(run / "best_model.pt")
    _old_file_with_the_other_sign(model, tmp_path / "old.pt")
    old = latent_lr.load(tmp_path / "old.pt")
    data = latent_lr.AtomsBatch.from_atoms(ase.io.read(paths["test"], index=":"))
    torch.testing.assert_close(old(data, compute_forces=False)["charges"], -model(data, compute_forces=False)["charges"])
    predict_file(run / "best_model.pt", paths["test"], tmp_path / "new.xyz")
    for reference in (None, paths["train"]):
        predict_file(tmp_path / "old.pt", paths["test"], tmp_path / "old.xyz", sign_reference=reference)
        assert "flipped" in capsys.readouterr().err
        new, old_written = (ase.io.read(tmp_path / name, index=":") for name in ("new.xyz", "old.xyz"))
        for a, b in zip(new, old_written):
            np.testing.assert_allclose(b.arrays["latent_charges"], a.arrays["latent_charges"], atol=1e-7)


def test_sign_convention_can_be_switched_off(trained, tmp_path):
    run, paths = trained
    args = ["train", "--train", str(paths["train"]), "--out", str(tmp_path / "off"), "--sign-convention", "off"]
    assert _config_from(_build_parser().parse_args(args)).sign_convention is False
    config = TrainConfig(train=str(paths["train"]), out=str(tmp_path / "off"), backbone="radial", seed=1, epochs=1,
                         host_options={"cutoff": 4.0, "hidden_dim": 4, "n_layers": 1}, progress=False,
                         sign_convention=False)
    model = Trainer(config).fit()
    assert float(model.long_range.charge_sign) == 1.0 and not (tmp_path / "off" / "sign_convention.json").exists()
