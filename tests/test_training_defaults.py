"""The "auto" training defaults: the rule, explicit values winning, and a long-range win with no tuning flags."""

from __future__ import annotations

import json

import pytest

from latent_lr.cli import _build_parser, _config_from
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, run_ablation
from latent_lr.training.defaults import DataSummary, auto_values, resolve_auto_settings

#: A small radial host (an architecture choice, not a training setting): the ablation stays quick.
TINY_HOST = {"cutoff": 4.0, "hidden_dim": 16, "n_layers": 1}


@pytest.mark.parametrize(
    "data, expected",
    [
        (DataSummary(41, 5, charged=True), {"energy_weight": 1000.0, "forces_weight": 1.0, "epochs": 300, "patience": 50}),
        (DataSummary(150, 19, charged=False), {"energy_weight": 1000.0, "forces_weight": 1.0, "epochs": 100, "patience": 20}),
        (DataSummary(500, 8, charged=True), {"energy_weight": 100.0, "forces_weight": 1.0, "epochs": 188, "patience": 31}),
        (DataSummary(5000, 600, charged=False), {"energy_weight": 1.0, "forces_weight": 10.0, "epochs": 100, "patience": 20}),
    ],
)
def test_rule(data: DataSummary, expected: dict) -> None:
    """Weights by size and charge; epochs ≈ 1500 steps clamped to [100, 300]; patience max(epochs // 6, 20)."""
    assert auto_values(data) == expected


def test_explicit_values_override_auto() -> None:
    """Flags given on the command line are kept; only the settings left at 'auto' are chosen, and the line names them alone."""
    args = _build_parser().parse_args(["ablate", "--train", "x.xyz", "--epochs", "7", "--energy-weight", "2.5"])
    config = _config_from(args)
    assert (config.epochs, config.energy_weight, config.forces_weight, config.patience) == (7, 2.5, "auto", "auto")
    resolved, message = resolve_auto_settings(config, DataSummary(41, 5, charged=True))
    assert (resolved.epochs, resolved.energy_weight, resolved.forces_weight, resolved.patience) == (7, 2.5, 1.0, 50)
    assert message.startswith("auto settings: forces weight 1, patience 50 (because: 41 structures, charged")
    nothing_auto = config.updated({"forces_weight": 1.0, "patience": 9})
    assert resolve_auto_settings(nothing_auto, DataSummary(41, 5, charged=True)) == (nothing_auto, "")


def test_bad_values_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1 or 'auto'"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="energy_weight must be a number or 'auto'"):
        TrainConfig(energy_weight="high")
    with pytest.raises(SystemExit):
        _build_parser().parse_args(["train", "--train", "x.xyz", "--patience", "soon"])


def test_default_ablation_wins_beyond_the_training_range(tmp_path, capsys) -> None:
    """No tuning flags: Na⁺/Cl⁻/water with analytic Coulomb labels, ions 2.4–6 Å apart in training and
    8–12 Å in the test set (beyond the 4 Å cut-off).  The long-range twin's energy RMSE there must be
    below half the short-range twin's; the chosen settings are printed and stored in config.json."""
    paths = write_dataset(tmp_path / "data", n_train=12, n_test=8, seed=1)  # 11 train, 1 validation: 2 steps per epoch
    config = TrainConfig(
        train=str(paths["train"]), test=str(paths["test"]), host_options=TINY_HOST,
        long_range_options={"hidden_dim": 8}, out=str(tmp_path / "run"), progress=False,
    )
    results = run_ablation(config, plots=False)
    printed = capsys.readouterr().out
    assert "auto settings: energy weight 1000, forces weight 1, 300 epochs, patience 50 (because: 11 structures, neutral, 2 steps per epoch)" in printed
    stored = json.loads((tmp_path / "run" / "long_range" / "config.json").read_text())
    assert (stored["energy_weight"], stored["forces_weight"], stored["epochs"], stored["patience"]) == (1000.0, 1.0, 300, 50)
    ratio = results["short_range"]["energy_rmse_meV_per_atom"] / results["long_range"]["energy_rmse_meV_per_atom"]
    assert ratio > 2.0, f"long-range twin only {ratio:.2f}x better than the short-range one"
