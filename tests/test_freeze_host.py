"""`latent-lr train --init-model HOST_FILE --freeze-host`: only the long-range head learns; predict gives dipoles and BECs."""

import ase.io
import numpy as np
import pytest
import torch

import latent_lr
from latent_lr.cli import main
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig
from latent_lr.training.trainer import build_model

pytest.importorskip("mace")
TRAIN = ["--epochs", "2", "--batch-size", "4", "--learning-rate", "1e-2", "--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=10, n_test=3, seed=4)  # Na+/Cl- and water, open


def changed(before: dict, after: dict) -> set:
    return {key for key in before if not torch.equal(before[key], after[key])}


def test_frozen_host_stays_bit_identical_and_predict_writes_dipoles_and_becs(mace_file, dataset, tmp_path):
    out = tmp_path / "run"
    main(["train", "--init-model", str(mace_file), "--freeze-host", "--train", str(dataset["train"]), "--out", str(out), *TRAIN])
    initial = build_model(TrainConfig(init_model=str(mace_file), seed=3, freeze_host=True), [1, 8, 11, 17])
    trained = latent_lr.load(out / "best_model.pt")
    host = latent_lr.load_host(mace_file).state_dict()
    assert changed(host, trained.backbone.host.state_dict()) == set()
    # the head learned (parameters only: the sign convention may flip its charge_sign buffer without any training)
    assert changed(dict(initial.long_range.named_parameters()), dict(trained.long_range.named_parameters()))
    assert torch.equal(trained.reference_energy, torch.zeros_like(trained.reference_energy))  # the host's E0s stay the baseline
    molecules = ase.io.read(dataset["test"], ":")
    for atoms in molecules:  # open boundaries: predict writes the dipole
        atoms.pbc, atoms.cell = False, None
    ase.io.write(tmp_path / "molecules.xyz", molecules)
    written = tmp_path / "predicted.xyz"
    main(["predict", str(out / "best_model.pt"), str(tmp_path / "molecules.xyz"), str(written), "--no-progress"])
    frames = ase.io.read(written, ":")
    assert len(frames) == 3
    for atoms in frames:
        bec = atoms.arrays["bec"].reshape(len(atoms), 3, 3)
        dipole = atoms.get_dipole_moment()  # ASE reads the written "dipole" into its calculator results
        charges = atoms.arrays["latent_charges"]
        np.testing.assert_allclose(dipole, charges @ atoms.positions, atol=1e-6)  # μ = Σ q r (extxyz keeps 8 decimals)
        assert np.isfinite(bec).all() and np.abs(bec).max() > 0


def test_partial_freeze_trains_only_the_named_host_parameters(mace_file, dataset, tmp_path):
    out = tmp_path / "run"
    main(["train", "--init-model", str(mace_file), "--freeze-host", "--trainable-host-parameters", "readouts.*",
          "--train", str(dataset["train"]), "--out", str(out), *TRAIN])
    host = latent_lr.load_host(mace_file).state_dict()
    moved = changed(host, latent_lr.load(out / "best_model.pt").backbone.host.state_dict())
    assert moved and all(key.startswith("readouts.") for key in moved)


def test_partial_freeze_patterns_must_match(mace_file):
    with pytest.raises(ValueError, match="match no parameter of the host"):
        build_model(TrainConfig(init_model=str(mace_file), freeze_host=True, trainable_host_parameters=["no_such_block.*"]), [1])
    with pytest.raises(ValueError, match="needs freeze_host"):
        build_model(TrainConfig(init_model=str(mace_file), trainable_host_parameters=["readouts.*"]), [1])
