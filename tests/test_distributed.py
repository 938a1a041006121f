"""Data-parallel training (2 gloo ranks started by torchrun) against one process, devices, precision, shard plans."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.singlepoint import SinglePointCalculator

import latent_lr
from latent_lr.cli import main
from latent_lr.errors import UserInputError
from latent_lr.synthetic import make_structure, reference_energy_forces
from latent_lr.training import TrainConfig, Trainer, distributed
from latent_lr.training.dataset import collate
from latent_lr.training.loss import loss_function

WORKER = Path(__file__).with_name("ddp_worker.py")
TINY_HOST = {"cutoff": 4.0, "hidden_dim": 8}
#: Variants trained for 1 epoch (5 optimiser steps) by 2 ranks and by one process.
VARIANTS = {
    "short_range": {"long_range": False},
    "long_range": {},
    "qeq": {"long_range_options": {"hidden_dim": 8, "charge_model": "qeq"}},
    "polarizable": {"long_range_options": {"hidden_dim": 8, "polarizability": "one_step"}},
}


#: Recipe pieces that must decide alike on every rank: a weight average, AMSGrad, and a NaN label in one frame.
GUARDED = {"ema_decay": 0.9, "amsgrad": True}
POISONED = 7


def _mixed_sizes(path: Path, n_frames: int, seed: int) -> Path:
    """Ion pair + water (5 atoms, analytic labels); every third frame two of them 12 Å apart (10 atoms,
    labelled with the sum of the parts' energies and their forces: the sizes, not the physics, matter here)."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(n_frames):
        parts = [make_structure(rng, rng.uniform(2.4, 6.0)) for _ in range(2 if index % 3 == 0 else 1)]
        labels = [reference_energy_forces(part) for part in parts]
        atoms = parts[0]
        if len(parts) == 2:
            parts[1].positions += [12.0, 0.0, 0.0]
            atoms = parts[0] + parts[1]
        energy = sum(label[0] for label in labels)
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.concatenate([label[1] for label in labels]))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    return path


def _config(data: Path, out: Path, **changes) -> dict:
    settings = {
        "train": str(data), "backbone": "radial", "host_options": TINY_HOST, "long_range_options": {"hidden_dim": 8},
        "epochs": 1, "batch_size": 4, "progress": False, "out": str(out),
    }
    settings.update(changes)
    return settings


def _torchrun(arguments: list[str], cwd: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    source = str(Path(latent_lr.__file__).resolve().parents[1])  # the latent_lr under test, in the ranks too
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch: every variant 1 epoch, and a 3-epoch run uninterrupted and stopped after 2 then resumed."""
    work = tmp_path_factory.mktemp("ddp")
    data = _mixed_sizes(work / "mixed.xyz", 40, seed=3)  # 36 training frames: steps of 2 x 4 structures, the last 2 x 2
    jobs = [{"config": _config(data, work / name, **changes), "result": str(work / name)} for name, changes in VARIANTS.items()]
    jobs.append({"config": _config(data, work / "straight", epochs=3), "result": str(work / "straight")})
    jobs.append({"config": _config(data, work / "stopped", epochs=2), "result": str(work / "stopped_first")})
    jobs.append({"config": _config(data, work / "stopped", epochs=3), "resume": True, "result": str(work / "stopped")})
    jobs.append({"config": _config(data, work / "guarded", epochs=2, **GUARDED), "poison": POISONED, "result": str(work / "guarded")})
    flags = ["--backbone", "radial", "--host-options", json.dumps(TINY_HOST), "--long-range-options", '{"hidden_dim": 8}']
    jobs.append({"cli": ["train", "--train", str(data), "--epochs", "1", "--batch-size", "4", "--out", str(work / "cli"),
                         "--no-progress", "--device", "cpu", "--distributed", *flags]})
    (work / "spec.json").write_text(json.dumps(jobs))
    _torchrun([str(WORKER), str(work / "spec.json")], work)
    return work, data


def _rank_results(prefix: Path) -> list[dict]:
    return [torch.load(f"{prefix}.rank{rank}.pt", weights_only=False) for rank in range(2)]


def _assert_same_weights(expected: dict, actual: dict, tolerance: float) -> None:
    for name, value in expected.items():
        assert torch.allclose(value, actual[name], rtol=0.0, atol=tolerance), (name, float((value - actual[name]).abs().max()))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_equal_one_process_with_the_combined_batch(two_ranks, variant, tmp_path):
    work, data = two_ranks
    ranks = _rank_results(work / variant)
    single = Trainer(TrainConfig().updated(_config(data, tmp_path, batch_size=8, **VARIANTS[variant])))
    single.fit()
    assert len(single.epoch_plan(0)[0]) == 5  # k = 5 optimiser steps, batches of 10-20 atoms of mixed sizes
    _assert_same_weights(single.model.state_dict(), ranks[0]["state"], 1e-10)
    _assert_same_weights(ranks[0]["state"], ranks[1]["state"], 0.0)  # DDP keeps the ranks identical
    for one, other in zip(single.history, ranks[0]["history"]):
        assert other["valid_loss"] == pytest.approx(one["valid_loss"], rel=1e-10)  # all-reduced validation
        assert other["train_loss"] == pytest.approx(one["train_loss"], rel=1e-10)
    assert ranks[0]["history"][0]["valid_loss"] == ranks[1]["history"][0]["valid_loss"]


def test_weight_average_and_non_finite_guard_agree_across_ranks(two_ranks, tmp_path):
    """A NaN energy in one rank's batch: both ranks skip that step (the finiteness is all-reduced), like one process."""
    work, data = two_ranks
    ranks = _rank_results(work / "guarded")
    single = Trainer(TrainConfig().updated(_config(data, tmp_path, batch_size=8, epochs=2, **GUARDED)))
    single.train_frames[POISONED].energy = float("nan")
    single.fit()
    assert [row["nonfinite_steps"] for row in single.history] == [1, 1]
    for rank in ranks:
        assert [row["nonfinite_steps"] for row in rank["history"]] == [1, 1]
        _assert_same_weights(single.model.state_dict(), rank["state"], 1e-10)
        _assert_same_weights(single.ema.model().state_dict(), rank["ema"], 1e-10)
    assert all(torch.isfinite(value).all() for value in latent_lr.load(work / "guarded" / "best_model.pt").state_dict().values())


def test_every_rank_decides_alike_and_the_log_reports_throughput(two_ranks):
    work, _ = two_ranks
    first, second = _rank_results(work / "straight")
    for row, other in zip(first["history"], second["history"]):
        assert (row["valid_loss"], row["learning_rate"]) == (other["valid_loss"], other["learning_rate"])
    log = json.loads((work / "straight" / "log.json").read_text())
    assert len(log) == 3
    row = log[-1]
    assert row["structures_per_s"] == pytest.approx(36 / row["train_seconds"])
    atoms = sum(len(a) for a in ase.io.read(work / "mixed.xyz", index=":")) - 0  # training atoms are a subset
    assert 0 < row["atoms_per_s"] * row["train_seconds"] < atoms
    assert 0 < row["rank0_busy_fraction"] <= 1 and 0 < row["rank1_busy_fraction"] <= 1
    assert row["idle_fraction"] == pytest.approx(1 - (row["rank0_busy_fraction"] + row["rank1_busy_fraction"]) / 2)


def test_resume_under_two_ranks_equals_an_uninterrupted_run(two_ranks):
    work, _ = two_ranks
    straight, resumed = _rank_results(work / "straight")[0], _rank_results(work / "stopped")
    assert [row["epoch"] for row in resumed[0]["history"]] == [1, 2, 3]
    _assert_same_weights(straight["state"], resumed[0]["state"], 1e-12)
    _assert_same_weights(straight["state"], resumed[1]["state"], 1e-12)
    for row, other in zip(straight["history"], resumed[0]["history"]):
        assert row["valid_loss"] == pytest.approx(other["valid_loss"], rel=1e-12)


def test_cli_torchrun_distributed_train_writes_once_and_matches_one_process(two_ranks, tmp_path):
    """`torchrun ... latent_lr.cli train --distributed --device cpu`: rank 0 writes; the weights are one process's."""
    work, data = two_ranks
    out = work / "cli"
    assert sorted(p.name for p in out.iterdir()) == ["best_model.pt", "checkpoint.pt", "config.json", "log.csv", "log.json", "sign_convention.json"]
    single = Trainer(TrainConfig().updated(_config(data, tmp_path / "single", batch_size=8)))
    single.fit()
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    _assert_same_weights(single.model.state_dict(), saved, 1e-10)


def test_launcher_environments_torchrun_and_slurm():
    assert distributed.launcher_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1)
    assert distributed.launcher_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    assert distributed.launcher_ranks({"SLURM_JOB_ID": "1"}) is None


def test_distributed_outside_a_launcher_and_a_launcher_without_distributed_are_user_errors(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserInputError, match="needs a launcher: run `torchrun"):
        distributed.start("cpu", True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserInputError, match="one of 2 that torchrun started, but --distributed is not set"):
        distributed.start("cpu", False)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]


@pytest.mark.parametrize("device", DEVICES)
def test_train_and_predict_on_a_device(device, tmp_path):
    data = _mixed_sizes(tmp_path / "mixed.xyz", 20, seed=4)
    out = tmp_path / "run"
    flags = ["--backbone", "radial", "--host-options", json.dumps(TINY_HOST), "--no-progress", "--batch-size", "4"]
    assert main(["train", "--train", str(data), "--epochs", "2", "--out", str(out), "--device", device, *flags]) == 0
    target = tmp_path / "predicted.xyz"
    assert main(["predict", str(out / "best_model.pt"), str(data), str(target), "--device", device, "--no-progress"]) == 0
    predicted = ase.io.read(target, index=":")
    model = latent_lr.load(out / "best_model.pt").eval()  # on the CPU: an independent evaluation
    for atoms in predicted[:3]:
        reference = model(latent_lr.AtomsBatch.from_atoms([atoms]), compute_stress=False)
        assert atoms.get_potential_energy() == pytest.approx(float(reference["energy"][0]), abs=1e-6)
        np.testing.assert_allclose(atoms.arrays["latent_charges"], reference["charges"].numpy(), atol=1e-6)


def test_float32_training_with_float64_evaluation(tmp_path):
    data = _mixed_sizes(tmp_path / "mixed.xyz", 30, seed=5)
    config = TrainConfig().updated(_config(data, tmp_path / "run", epochs=2, dtype="float32", eval_dtype="float64"))
    trainer = Trainer(config)
    best = trainer.fit()
    assert trainer.model.dtype == torch.float32 and best.dtype == torch.float64
    assert latent_lr.load(tmp_path / "run" / "best_model.pt").dtype == torch.float32  # saved as trained
    # The logged validation loss is the float64 loss of the float32 weights, computed here independently in one batch.
    weights = latent_lr.load(tmp_path / "run" / "best_model.pt").double().eval()
    batch, targets = collate(trainer.valid_frames, torch.float64)
    out = weights(batch, compute_stress=False)
    expected = float(loss_function(trainer.config, out, targets, trainer.valid_frames))  # resolved "auto" weights
    assert min(row["valid_loss"] for row in trainer.history) == pytest.approx(expected, rel=1e-12)
