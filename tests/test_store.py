"""On-disk data (latent_lr.training.store): prepare-data round trip, lazy reading, training from it, errors."""

from __future__ import annotations

import multiprocessing
import pickle

import ase.io
import h5py
import numpy as np
import pytest
import torch
from ase import Atoms

from latent_lr.cli import main
from latent_lr.errors import UserInputError
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer
from latent_lr.training.data_files import open_frames
from latent_lr.training.dataset import Frame, LabelKeys, read_frames
from latent_lr.training.store import FrameStore, prepare_data

ALL_KEYS = LabelKeys(energy="energy", forces="forces", dipole="dipole", charges="charges", total_charge="charge", bec="bec")
TINY = {"cutoff": 4.0, "hidden_dim": 8}


def _labelled_structures(count: int, seed: int) -> list[Atoms]:
    """Molecules and periodic boxes of 2-9 atoms with every kind of label; some frames lack some labels."""
    rng = np.random.default_rng(seed)
    structures = []
    for index in range(count):
        n = int(rng.integers(2, 10))
        atoms = Atoms(rng.choice([1, 6, 8, 11, 17], size=n), positions=rng.uniform(0, 6, size=(n, 3)))
        if index % 3 == 1:
            atoms.cell = np.diag(rng.uniform(6, 8, 3)) + rng.uniform(-0.5, 0.5, (3, 3))
            atoms.pbc = True
        elif index % 3 == 2:
            atoms.cell = np.diag([7.0, 7.0, 20.0])
            atoms.pbc = [True, True, False]
        atoms.info["energy"] = float(rng.normal(-10, 3))
        atoms.info["charge"] = float(rng.integers(-1, 2))
        atoms.info["tag"] = f"s{index}"
        atoms.info["step"] = index
        atoms.info["weight"] = float(rng.uniform())
        if index % 4 != 3:
            atoms.info["dipole"] = rng.normal(size=3)
            atoms.arrays["bec"] = rng.normal(size=(n, 9))
        atoms.arrays["forces"] = rng.normal(size=(n, 3))
        atoms.arrays["charges"] = rng.normal(size=n)
        structures.append(atoms)
    return structures


@pytest.fixture(scope="module")
def labelled_xyz(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("labelled")
    paths = []
    for part, seed in (("a", 1), ("b", 2)):
        path = folder / f"{part}.xyz"
        ase.io.write(path, _labelled_structures(11, seed), format="extxyz")
        paths.append(path)
    return paths


def assert_same_frame(expected: Frame, got: Frame) -> None:
    """Every label and the geometry exactly equal (no tolerance)."""
    for name in ("numbers", "positions"):
        assert np.array_equal(getattr(expected.atoms, name), getattr(got.atoms, name)), name
    assert np.array_equal(expected.atoms.cell.array, got.atoms.cell.array)
    assert np.array_equal(expected.atoms.pbc, got.atoms.pbc)
    assert expected.atoms.info == got.atoms.info
    assert expected.energy == got.energy and expected.total_charge == got.total_charge
    for name in ("forces", "dipole", "charges", "bec"):
        want, have = getattr(expected, name), getattr(got, name)
        assert (want is None) == (have is None), name
        if want is not None:
            assert have.shape == want.shape and np.array_equal(want, have), name
    assert expected.info == got.info


def test_round_trip_labels_equal_the_xyz_exactly(labelled_xyz, tmp_path) -> None:
    (written,) = prepare_data(labelled_xyz, tmp_path / "all.h5", ALL_KEYS)
    expected = read_frames(labelled_xyz[0], ALL_KEYS) + read_frames(labelled_xyz[1], ALL_KEYS)
    assert any(f.dipole is None for f in expected) and any(f.dipole is not None for f in expected)
    store = FrameStore(written, ALL_KEYS)
    assert len(store) == len(expected)
    assert np.array_equal(store.n_atoms, [len(f.atoms) for f in expected])
    assert store.species() == {int(z) for f in expected for z in f.atoms.numbers}
    for want, got in zip(expected, store):  # block reads
        assert_same_frame(want, got)
    for index in (5, 0, 21):  # single reads
        assert_same_frame(expected[index], store[index])
    assert store[4].location == f"{written}, frame 4 (0-based)"
    with h5py.File(written) as handle:  # where each structure came from
        assert list(handle["source_file"][:13]) == [0] * 11 + [1, 1] and handle["source_index"][12] == 1


def test_labels_not_asked_for_are_left_out_as_with_xyz(labelled_xyz, tmp_path) -> None:
    (written,) = prepare_data(labelled_xyz[:1], tmp_path / "one.h5", ALL_KEYS)
    plain = LabelKeys()
    for want, got in zip(read_frames(labelled_xyz[0], plain), FrameStore(written, plain)):
        assert_same_frame(want, got)


def test_shards_folders_globs_and_several_files_read_as_one_set(labelled_xyz, tmp_path) -> None:
    written = prepare_data(labelled_xyz, tmp_path / "shards", ALL_KEYS, shard_size=4)
    assert [p.name for p in written] == [f"shard-0000{k}.h5" for k in range(6)]
    expected = read_frames(labelled_xyz[0], ALL_KEYS) + read_frames(labelled_xyz[1], ALL_KEYS)
    for spec in (str(tmp_path / "shards"), str(tmp_path / "shards" / "shard-*.h5"), [str(p) for p in written]):
        frames = open_frames(spec, ALL_KEYS)
        assert len(frames) == 22 and np.array_equal(frames.n_atoms, [len(f.atoms) for f in expected])
        for want, got in zip(expected, frames):  # blocks across shard boundaries
            assert_same_frame(want, got)
        for index, got in zip((13, 0, 21, 4, 13), frames.frames([13, 0, 21, 4, 13])):  # any order, repeats
            assert_same_frame(expected[index], got)
    mixed = open_frames([str(written[0]), str(labelled_xyz[1])], ALL_KEYS)  # a shard and an xyz file
    assert len(mixed) == 15
    assert_same_frame(expected[11], mixed[4])
    prepare_data(labelled_xyz[:1], tmp_path / "shards", ALL_KEYS, shard_size=8)  # a rerun removes stale shards
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["shard-00000.h5", "shard-00001.h5"]


def _energies(store: FrameStore) -> list[float]:
    return [float(f.energy) for f in store]


def test_store_works_in_other_processes_and_holds_no_frames(labelled_xyz, tmp_path) -> None:
    (written,) = prepare_data(labelled_xyz, tmp_path / "all.h5", ALL_KEYS)
    store = FrameStore(written, ALL_KEYS)
    expected = _energies(store)  # the parent has an open handle now
    for method, workers in (("fork", 2), ("spawn", 1)):  # fork: a handle inherited from the parent is replaced
        with multiprocessing.get_context(method).Pool(workers) as pool:
            assert pool.map(_energies, [store] * workers) == [expected] * workers
    # What a store keeps in memory: atom counts and offsets (24 bytes per structure), no coordinates or labels.
    assert len(pickle.dumps(store)) < 24 * len(store) + 2000
    assert not any(isinstance(v, np.ndarray) and v.dtype.kind == "f" for v in vars(store).values())


def test_model_trained_from_the_prepared_file_equals_one_trained_from_xyz(tmp_path) -> None:
    data = write_dataset(tmp_path / "data", n_train=40, n_test=8, seed=3)
    prepare_data([data["train"]], tmp_path / "train.h5", LabelKeys())
    prepare_data([data["test"]], tmp_path / "test.h5", LabelKeys())
    models = []
    for train, test, name in ((data["train"], data["test"], "xyz"), (tmp_path / "train.h5", tmp_path / "test.h5", "h5")):
        config = TrainConfig(train=str(train), test=str(test), host_options=TINY, epochs=2, seed=4, progress=False, out=str(tmp_path / name))
        trainer = Trainer(config)
        trainer.fit()
        models.append(trainer)
    xyz, h5 = models
    assert xyz.history[-1]["train_loss"] == h5.history[-1]["train_loss"]
    for (name, a), b in zip(xyz.model.state_dict().items(), h5.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert xyz.evaluate(xyz.model, xyz.test_frames)[0] == h5.evaluate(h5.model, h5.test_frames)[0]


def test_cli_prepare_then_train_with_an_atom_budget(tmp_path, capsys) -> None:
    data = write_dataset(tmp_path / "data", n_train=30, n_test=5, seed=5)
    assert main(["prepare-data", str(data["train"]), str(tmp_path / "shards"), "--shard-size", "16", "--no-progress"]) == 0
    assert "wrote 2 files" in capsys.readouterr().out
    out = tmp_path / "run"
    args = ["train", "--train", str(tmp_path / "shards"), "--epochs", "1", "--max-atoms-per-batch", "22", "--out", str(out), "--no-progress"]
    assert main([*args, "--host-options", '{"hidden_dim": 8}']) == 0
    assert (out / "best_model.pt").exists()
    trainer = Trainer(TrainConfig(train=str(tmp_path / "shards"), max_atoms_per_batch=22, host_options=TINY, progress=False, out=str(out)))
    batches = list(trainer._batches(trainer.train_frames, 0))
    assert all(sum(len(f.atoms) for f in batch) <= 22 for batch in batches) and max(len(b) for b in batches) == 4


def test_bad_input_is_one_line_naming_file_and_frame(tmp_path, capsys, labelled_xyz) -> None:
    broken = tmp_path / "broken.xyz"
    good = ase.io.read(labelled_xyz[0], index=":2")
    ase.io.write(broken, good, format="extxyz")
    with open(broken, "a") as handle:
        handle.write("3\nProperties=species:S:1:pos:R:3 energy=1.0\nH 0 0 0\nH 1 1\n")
    assert main(["prepare-data", str(broken), str(tmp_path / "out.h5"), "--no-progress"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith(f"latent-lr: error: {broken}, frame 2 (0-based): not a valid extended-XYZ frame") and "\n" not in message
    assert not (tmp_path / "out.h5").exists() and not (tmp_path / "out.h5.partial").exists()

    (written,) = prepare_data(labelled_xyz[:1], tmp_path / "plain.h5", LabelKeys())
    with pytest.raises(UserInputError, match=r"plain.h5 was prepared without dipole labels; .*--dipole-key"):
        FrameStore(written, LabelKeys(dipole="dipole"))
    with pytest.raises(UserInputError, match=r"no energy under info key 'free_energy'"):
        prepare_data(labelled_xyz[:1], tmp_path / "x.h5", LabelKeys(energy="free_energy"))
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["x"] = np.zeros(3)
    with pytest.raises(UserInputError, match="not one written by latent-lr prepare-data"):
        open_frames(str(foreign), LabelKeys())
    with pytest.raises(UserInputError, match="matches no file"):
        open_frames(str(tmp_path / "nothing-*.h5"), LabelKeys())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="folder without .h5 shards"):
        open_frames(str(tmp_path / "empty"), LabelKeys())
    config = TrainConfig(train=str(written), max_atoms_per_batch=5, host_options=TINY, progress=False, out=str(tmp_path / "run"))
    with pytest.raises(UserInputError, match=r"plain.h5, frame \d+ \(0-based\): \d+ atoms exceed the per-batch budget"):
        Trainer(config)
