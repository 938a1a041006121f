"""User errors in the CLI: one line `latent-lr: error: ...`, exit status 2, file and frame named; --debug traces."""

import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

from latent_lr.cli import main
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer

TINY = ["--backbone", "radial", "--host-options", '{"cutoff": 4.0, "hidden_dim": 8}', "--no-progress", "--epochs", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("errors"), n_train=30, n_test=6, seed=5)


@pytest.fixture(scope="module")
def model_file(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    Trainer(TrainConfig(train=str(data["train"]), out=str(out), epochs=1, progress=False,
                        host_options={"cutoff": 4.0, "hidden_dim": 8})).fit()
    return out / "best_model.pt"


def _with_nan(source, target, frame: int) -> None:
    structures = ase.io.read(source, index=":")
    structures[frame].positions[1, 2] = np.nan
    ase.io.write(target, structures, format="extxyz")


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("latent-lr: error: ") and "Traceback" not in captured.err
    return lines[0]


def test_nan_position_names_file_and_frame_of_the_users_file(data, tmp_path, capsys):
    bad = tmp_path / "train.xyz"
    _with_nan(data["train"], bad, frame=17)
    assert main(["train", "--train", str(bad), "--out", str(tmp_path / "run"), *TINY]) == 2
    error = _one_line_error(capsys)
    assert f"{bad}, frame 17 (0-based)" in error and "NaN" in error


def test_nan_in_validation_file_names_that_file(data, tmp_path, capsys):
    bad = tmp_path / "valid.xyz"
    _with_nan(data["test"], bad, frame=2)
    assert main(["train", "--train", str(data["train"]), "--valid", str(bad), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert f"{bad}, frame 2 (0-based)" in _one_line_error(capsys)


@pytest.mark.parametrize("content", ["this is not\nan xyz file\n", "2\ncomment\nNa 0 0 0\n"])
def test_not_extended_xyz(tmp_path, capsys, content):
    bad = tmp_path / "bad.xyz"
    bad.write_text(content)
    assert main(["train", "--train", str(bad), "--out", str(tmp_path / "run"), *TINY]) == 2
    error = _one_line_error(capsys)
    assert f"{bad}, frame 0 (0-based)" in error and "extended-XYZ" in error


def test_missing_input_file(tmp_path, capsys):
    assert main(["train", "--train", str(tmp_path / "absent.xyz"), "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "absent.xyz does not exist" in _one_line_error(capsys)


def test_missing_energy_key_names_the_key(data, tmp_path, capsys):
    assert main(["train", "--train", str(data["train"]), "--energy-key", "E_dft", "--out", str(tmp_path), *TINY]) == 2
    error = _one_line_error(capsys)
    assert "'E_dft'" in error and "--energy-key" in error and str(data["train"]) in error


@pytest.mark.parametrize("name, text", [("bad.toml", "epochs = = 3\n"), ("bad.json", '{"epochs": 1, "no_such_setting": 2}')])
def test_bad_config_file(tmp_path, capsys, name, text):
    config = tmp_path / name
    config.write_text(text)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    error = _one_line_error(capsys)
    assert (str(config) in error) if name.endswith("toml") else ("no_such_setting" in error)


def test_unknown_element_for_the_model_names_file_and_frame(data, model_file, tmp_path, capsys):
    structures = ase.io.read(data["test"], index=":")
    structures[3] = Atoms("FeO", positions=[[0, 0, 0], [0, 0, 1.8]])
    bad = tmp_path / "with_iron.xyz"
    ase.io.write(bad, structures, format="extxyz")
    assert main(["predict", str(model_file), str(bad), str(tmp_path / "out.xyz"), "--no-progress"]) == 2
    error = _one_line_error(capsys)
    assert f"{bad}, frame 3 (0-based)" in error and "26" in error


def test_init_model_with_unknown_element_names_file_and_frame(data, model_file, tmp_path, capsys):
    structures = ase.io.read(data["train"], index=":")
    structures[5] = Atoms("FeO", positions=[[0, 0, 0], [0, 0, 1.8]], info={"energy": 0.0})
    structures[5].arrays["forces"] = np.zeros((2, 3))
    bad = tmp_path / "train.xyz"
    ase.io.write(bad, structures, format="extxyz")
    status = main(["train", "--train", str(bad), "--init-model", str(model_file), "--out", str(tmp_path / "run"), *TINY])
    assert status == 2
    assert f"{bad}, frame 5 (0-based)" in _one_line_error(capsys)


def test_files_that_are_not_models(data, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    other = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    for path in (text, other, tmp_path / "absent.pt"):
        assert main(["predict", str(path), str(data["test"]), str(tmp_path / "out.xyz")]) == 2
        error = _one_line_error(capsys)
        assert str(path) in error and ("not a latent-lr model" in error or "does not exist" in error)


def test_unavailable_device_is_a_user_error(data, model_file, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")  # the CPU-only path is what CI checks
    assert main(["predict", str(model_file), str(data["test"]), str(tmp_path / "o.xyz"), "--device", "cuda"]) == 2
    assert "--device cpu" in _one_line_error(capsys)


def test_programming_errors_keep_their_traceback(data, model_file, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("latent_lr.cli.predict_file", broken)
    with pytest.raises(KeyError):
        main(["predict", str(model_file), str(data["test"]), str(tmp_path / "o.xyz")])


def test_subprocess_one_line_and_debug_traceback(data, tmp_path):
    bad = tmp_path / "train.xyz"
    _with_nan(data["train"], bad, frame=17)
    command = [sys.executable, "-m", "latent_lr.cli", "train", "--train", str(bad), "--out", str(tmp_path / "r"), *TINY]
    plain = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == [plain.stderr.strip()]
    assert plain.stderr.startswith("latent-lr: error: ") and "frame 17 (0-based)" in plain.stderr
    debug = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UserInputError" in debug.stderr
    assert "frame 17 (0-based)" in debug.stderr
