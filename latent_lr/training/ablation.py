"""Short-range vs long-range twins: same seed, data, hyper-parameters and budget."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .config import TrainConfig
from .dataset import Frame
from .trainer import Trainer

#: Per twin name: (test frames, predictions by quantity), as :meth:`Trainer.evaluate` returns them.
Evaluations = Mapping[str, tuple[Sequence[Frame], dict]]

TWINS = {"short_range": False, "long_range": True}
TABLE_ROWS = [
    ("energy_rmse_meV_per_atom", "E RMSE (meV/atom)"),
    ("energy_mae_meV_per_atom", "E MAE (meV/atom)"),
    ("forces_rmse_meV_per_A", "F RMSE (meV/Å)"),
    ("forces_mae_meV_per_A", "F MAE (meV/Å)"),
    ("mean_abs_long_range_energy_meV_per_atom", "|E_LR| (meV/atom)"),
    ("dipole_mae_eA", "dipole MAE (e·Å)"),
    ("dipole_r2", "dipole R²"),
    ("dipole_best_scale", "dipole best scale"),
    ("dipole_scaled_r2", "dipole R² (scaled)"),
    ("charges_pearson_r", "charges Pearson r"),
    ("bec_mae_e", "BEC MAE (e)"),
    ("bec_r2", "BEC R²"),
    ("bec_best_scale", "BEC best scale"),
    ("bec_scaled_r2", "BEC R² (scaled)"),
]


def run_ablation(config: TrainConfig, plots: bool = True, resume: bool = False) -> dict[str, dict[str, float]]:
    """Train both twins, evaluate on the test set (or validation set), write results.json.

    With ``resume`` an interrupted ablation continues from each twin's checkpoint.
    Under ``config.distributed`` the twins train data-parallel and rank 0 alone
    evaluates and writes the results.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    evaluations = {}
    is_main = True
    for name, long_range in TWINS.items():
        twin = replace(config, long_range=long_range, out=str(out / name))
        trainer = Trainer(twin)
        if resume:
            trainer.resume()
        model = trainer.fit()
        is_main = trainer.ranks.is_main
        if not is_main:
            continue
        frames = trainer.test_frames or trainer.valid_frames
        metrics, predictions = trainer.evaluate(model, frames)
        metrics["n_test_structures"] = len(frames)
        metrics["n_parameters"] = sum(p.numel() for p in model.parameters())
        metrics["epochs_run"] = trainer.epoch
        results[name] = metrics
        evaluations[name] = (frames, predictions)
    if not is_main:
        return results
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    if plots:
        plot_ablation(evaluations, out)
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """The results as a fixed-width text table."""
    lines = [f"{'metric':<26}{'short-range':>14}{'long-range':>14}"]
    for key, label in TABLE_ROWS:
        if key in results["short_range"] or key in results["long_range"]:
            values = [results[name].get(key, float("nan")) for name in TWINS]
            lines.append(f"{label:<26}{values[0]:>14.4g}{values[1]:>14.4g}")
    return "\n".join(lines)


def plot_ablation(evaluations: Evaluations, out: Path) -> None:
    """Parity plots (energy, forces) and energy vs ``distance`` when frames carry it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 4))
    for name, (frames, predictions) in evaluations.items():
        n = np.array([len(f.atoms) for f in frames])
        reference = np.array([f.energy for f in frames]) / n
        axes[0].scatter(reference, np.array(predictions["energy"]) / n, s=8, label=name.replace("_", "-"))
        if all(f.forces is not None for f in frames):
            axes[1].scatter(
                np.concatenate([f.forces for f in frames]).ravel(),
                np.concatenate(predictions["forces"]).ravel(), s=3, label=name.replace("_", "-"),
            )
    for axis, title in zip(axes, ["energy (eV/atom)", "force components (eV/Å)"]):
        low, high = axis.get_xlim()
        axis.plot([low, high], [low, high], "k--", lw=0.8)
        axis.set_xlabel(f"reference {title}")
        axis.set_ylabel(f"predicted {title}")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "parity.png", dpi=120)
    plt.close(figure)

    frames = next(iter(evaluations.values()))[0]
    if all("distance" in f.info for f in frames):
        _plot_against_distance(plt, evaluations, frames, out)


def _plot_against_distance(plt, evaluations: Evaluations, frames: Sequence[Frame], out: Path) -> None:
    """Energy error vs ``distance`` (any data); also energy vs distance when all
    frames share one composition (otherwise their total energies are not comparable)."""
    distance = np.array([f.info["distance"] for f in frames])
    order = np.argsort(distance)
    reference = np.array([f.energy for f in frames])
    one_system = len({f.atoms.get_chemical_formula() for f in frames}) == 1
    figure, axes = plt.subplots(1, 2 if one_system else 1, figsize=(9 if one_system else 5, 4), squeeze=False)
    error_axis = axes[0, -1]
    for name, (_, predictions) in evaluations.items():
        error = 1e3 * (np.array(predictions["energy"]) - reference)
        error_axis.plot(distance[order], error[order], "o", ms=4, label=name.replace("_", "-"))
    error_axis.axhline(0.0, color="k", lw=0.8)
    error_axis.set_xlabel("distance (Å)")
    error_axis.set_ylabel("predicted − reference energy (meV)")
    error_axis.legend()
    if one_system:
        axis = axes[0, 0]
        axis.plot(distance[order], reference[order], "k.", label="reference")
        for name, (_, predictions) in evaluations.items():
            axis.plot(distance[order], np.array(predictions["energy"])[order], ".", label=name.replace("_", "-"))
        axis.set_xlabel("distance (Å)")
        axis.set_ylabel("energy (eV)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "energy_vs_distance.png", dpi=120)
    plt.close(figure)
