"""Training, resume, ablation and predict on a tiny synthetic dataset."""

import json
import os
import signal
import subprocess
import sys
import time

import ase.io
import numpy as np
import pytest
import torch

import latent_lr
from latent_lr.cli import main
from latent_lr.synthetic import reference_energy_forces, write_dataset
from latent_lr.training import TrainConfig, Trainer, run_ablation

TINY = ["--backbone", "radial", "--host-options", '{"cutoff": 4.0, "hidden_dim": 12}', "--no-progress", "--batch-size", "8"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=80, n_test=20, seed=1)


def test_synthetic_labels_are_consistent_gradients(dataset):
    atoms = ase.io.read(dataset["train"], index=0)
    energy, forces = reference_energy_forces(atoms)
    step = 1e-5
    numerical = np.zeros_like(forces)
    for i in range(len(atoms)):
        for a in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, a] += step
            minus.positions[i, a] -= step
            numerical[i, a] = -(reference_energy_forces(plus)[0] - reference_energy_forces(minus)[0]) / (2 * step)
    np.testing.assert_allclose(forces, numerical, atol=1e-6)
    assert atoms.get_potential_energy() == pytest.approx(energy)


def test_train_cli_round_trip(dataset, tmp_path):
    out = tmp_path / "run"
    main(["train", "--train", str(dataset["train"]), "--test", str(dataset["test"]), "--epochs", "2", "--out", str(out), *TINY])
    assert (out / "best_model.pt").exists() and (out / "checkpoint.pt").exists()
    assert len((out / "log.csv").read_text().strip().splitlines()) == 3
    model = latent_lr.load(out / "best_model.pt")
    assert model.long_range is not None
    assert json.loads((out / "config.json").read_text())["epochs"] == 2


def test_config_file_sets_options(dataset, tmp_path):
    config_file = tmp_path / "settings.toml"
    config_file.write_text(f'train = "{dataset["train"]}"\nepochs = 1\nlong_range = false\nprogress = false\n[host_options]\ncutoff = 3.0\nhidden_dim = 8\n')
    out = tmp_path / "run"
    main(["train", "--config", str(config_file), "--out", str(out)])
    model = latent_lr.load(out / "best_model.pt")
    assert model.long_range is None and model.backbone.cutoff == 3.0


def test_resume_continues_exactly_where_it_stopped(dataset, tmp_path):
    base = TrainConfig(train=str(dataset["train"]), backbone="radial", host_options={"cutoff": 4.0, "hidden_dim": 12}, progress=False)
    straight = Trainer(base.updated({"epochs": 3, "out": str(tmp_path / "a")}))
    straight.fit()
    Trainer(base.updated({"epochs": 2, "out": str(tmp_path / "b")})).fit()
    resumed = Trainer(base.updated({"epochs": 3, "out": str(tmp_path / "b")}))
    assert resumed.resume() and resumed.epoch == 2
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-12), name


def test_killed_run_loses_at_most_one_epoch(dataset, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "latent_lr.cli", "train", "--train", str(dataset["train"]), "--epochs", "200", "--out", str(out), *TINY]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out / "log.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(json.loads(log.read_text() or "[]")) >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before_kill = len(json.loads(log.read_text()))
    assert done_before_kill >= 2
    trainer = Trainer(TrainConfig(train=str(dataset["train"]), epochs=done_before_kill + 1, out=str(out), backbone="radial", host_options={"cutoff": 4.0, "hidden_dim": 12}, progress=False))
    assert trainer.resume()
    assert trainer.epoch >= done_before_kill - 1
    trainer.fit()
    epochs = [row["epoch"] for row in json.loads(log.read_text())]
    assert epochs == list(range(1, done_before_kill + 2))


def test_ablation_writes_results_and_long_range_wins(dataset, tmp_path):
    config = TrainConfig(
        train=str(dataset["train"]), test=str(dataset["test"]), out=str(tmp_path / "ablate"), backbone="radial",
        host_options={"cutoff": 4.0, "hidden_dim": 16}, epochs=25, learning_rate=5e-3, progress=False,
        dipole_key="ref_dipole", charges_key="ref_charges", dipole_weight=0.0, charges_weight=0.0,
    )
    results = run_ablation(config)
    saved = json.loads((tmp_path / "ablate" / "results.json").read_text())
    assert set(saved) == {"short_range", "long_range"}
    for twin in saved.values():
        assert {"energy_rmse_meV_per_atom", "forces_rmse_meV_per_A", "mean_abs_long_range_energy_meV_per_atom"} <= set(twin)
    assert "dipole_mae_eA" in saved["long_range"]
    assert (tmp_path / "ablate" / "parity.png").exists()
    assert (tmp_path / "ablate" / "energy_vs_distance.png").exists()
    # Test separations (8-12 Å) lie beyond the 4 Å cut-off: only the long-range twin sees the ions interact.
    assert results["long_range"]["energy_rmse_meV_per_atom"] < 0.5 * results["short_range"]["energy_rmse_meV_per_atom"]


def test_predict_writes_charges_dipoles_and_becs(dataset, tmp_path):
    out = tmp_path / "run"
    main(["train", "--train", str(dataset["train"]), "--epochs", "1", "--out", str(out), *TINY])
    target = tmp_path / "predicted.xyz"
    main(["predict", str(out / "best_model.pt"), str(dataset["test"]), str(target)])
    frames = ase.io.read(target, index=":")
    assert len(frames) == 20
    for atoms in frames:
        assert atoms.arrays["latent_charges"].shape == (len(atoms),)
        assert atoms.arrays["bec"].shape == (len(atoms), 9)
        assert atoms.get_dipole_moment().shape == (3,)  # ASE reads the dipole key into the calculator
        assert abs(atoms.arrays["latent_charges"].sum()) < 1e-6
        np.testing.assert_allclose(atoms.arrays["bec"].reshape(-1, 3, 3).sum(0), 0.0, atol=1e-6)  # extxyz writes 8 decimals


def test_missing_label_key_is_a_clear_error(dataset, tmp_path, capsys):
    status = main(["train", "--train", str(dataset["train"]), "--forces-key", "force", "--epochs", "1", "--out", str(tmp_path), *TINY])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("latent-lr: error:") and "forces-key" in error and "\n" not in error
