"""`latent-lr predict`: same numbers as the Python API frame by frame, checkpoints, streaming."""

import ase.io
import numpy as np
import pytest
import torch

import latent_lr
from latent_lr.cli import main
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch tiny long-range run (its directory) and a 10-frame input file."""
    root = tmp_path_factory.mktemp("predict")
    paths = write_dataset(root / "data", n_train=24, n_test=10, seed=3)
    config = TrainConfig(train=str(paths["train"]), out=str(root / "run"), epochs=1, progress=False,
                         backbone="radial", host_options={"cutoff": 4.0, "hidden_dim": 8})
    Trainer(config).fit()
    return root / "run", paths["test"]


def _calculator_reference(model, structures):
    """Charges (e), BECs (e) and dipoles (e·Å) frame by frame through the ASE calculator."""
    reference = []
    for atoms in structures:
        atoms.calc = latent_lr.Calculator(model)
        reference.append((atoms.calc.get_property("charges", atoms), atoms.calc.get_property("bec", atoms),
                          atoms.get_dipole_moment()))
    return reference


@pytest.mark.parametrize("model_file", ["best_model.pt", "checkpoint.pt"])
def test_batched_predict_matches_calculator_frame_by_frame(run, tmp_path, model_file):
    directory, structures_file = run
    target = tmp_path / "out.xyz"
    status = main(["predict", str(directory / model_file), str(structures_file), str(target), "--batch-size", "3",
                   "--device", "cpu", "--no-progress"])
    assert status == 0
    written = ase.io.read(target, index=":")
    inputs = ase.io.read(structures_file, index=":")
    assert len(written) == len(inputs) == 10
    reference = _calculator_reference(latent_lr.load(directory / "best_model.pt"), inputs)
    for atoms, source, (charges, bec, dipole) in zip(written, inputs, reference):
        np.testing.assert_allclose(atoms.positions, source.positions, atol=1e-7)
        np.testing.assert_allclose(atoms.arrays["latent_charges"], charges, atol=1e-7)  # extxyz keeps 8 decimals
        np.testing.assert_allclose(atoms.arrays["bec"], bec.reshape(-1, 9), atol=1e-7)
        np.testing.assert_allclose(atoms.get_dipole_moment(), dipole, atol=1e-7)


def test_checkpoint_without_architecture_uses_best_model_beside_it(run, tmp_path):
    directory, structures_file = run
    old = torch.load(directory / "checkpoint.pt", weights_only=True)
    del old["model_config"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint.pt")
    assert main(["predict", str(tmp_path / "old" / "checkpoint.pt"), str(structures_file), str(tmp_path / "a.xyz")]) == 2
    (tmp_path / "old" / "best_model.pt").write_bytes((directory / "best_model.pt").read_bytes())
    assert main(["predict", str(tmp_path / "old" / "checkpoint.pt"), str(structures_file), str(tmp_path / "a.xyz")]) == 0
    main(["predict", str(directory / "best_model.pt"), str(structures_file), str(tmp_path / "b.xyz")])
    for a, b in zip(ase.io.read(tmp_path / "a.xyz", index=":"), ase.io.read(tmp_path / "b.xyz", index=":")):
        np.testing.assert_array_equal(a.arrays["bec"], b.arrays["bec"])


def test_predict_streams_frames_batch_by_batch(run, tmp_path, monkeypatch):
    """The reader is consumed lazily: at each write at most one batch (+1 look-ahead) has been read."""
    directory, structures_file = run
    many = tmp_path / "many.xyz"
    ase.io.write(many, ase.io.read(structures_file, index=":") * 5, format="extxyz")  # 50 frames
    read_so_far = []
    real_iread, real_write = ase.io.iread, ase.io.write

    def counting_iread(*args, **kwargs):
        for atoms in real_iread(*args, **kwargs):
            read_so_far.append(1)
            yield atoms

    held_at_write = []

    def recording_write(handle, images, **kwargs):
        held_at_write.append(len(read_so_far) - sum(len(batch) for batch in written))
        written.append(list(images))
        return real_write(handle, images, **kwargs)

    written: list = []
    monkeypatch.setattr(ase.io, "iread", counting_iread)
    monkeypatch.setattr(ase.io, "write", recording_write)
    assert main(["predict", str(directory / "best_model.pt"), str(many), str(tmp_path / "out.xyz"),
                 "--batch-size", "4"]) == 0
    assert len(written) == 13 and sum(len(batch) for batch in written) == 50
    assert max(held_at_write) <= 4 + 1


def test_predict_gives_polarization_for_periodic_frames(run, tmp_path):
    directory, structures_file = run
    atoms = ase.io.read(structures_file, index=0)
    atoms.cell, atoms.pbc = np.eye(3) * 12.0, True
    ase.io.write(tmp_path / "box.xyz", atoms, format="extxyz")
    assert main(["predict", str(directory / "checkpoint.pt"), str(tmp_path / "box.xyz"), str(tmp_path / "out.xyz")]) == 0
    written = ase.io.read(tmp_path / "out.xyz")
    expected = latent_lr.Calculator(latent_lr.load(directory / "best_model.pt"))
    atoms.calc = expected
    polarization = written.calc.results["polarization"]  # ASE moves the key into a calculator, e/Å²
    np.testing.assert_allclose(polarization * atoms.get_volume(), atoms.get_dipole_moment(), atol=1e-6)
