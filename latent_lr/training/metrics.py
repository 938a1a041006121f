"""Evaluation of a model on labelled frames: errors, and predictions for plots."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..model import LongRangeModel
from .dataset import Frame, collate


def predict_frames(
    model: LongRangeModel, frames: Sequence[Frame], batch_size: int = 16, compute_bec: bool = False
) -> dict[str, list[np.ndarray]]:
    """Run the model on frames; per-frame numpy predictions."""
    model.eval()
    per_atom = ("forces", "charges", "bec", "spins", "induced_dipoles")
    keys = ["energy", "host_energy", "long_range_energy", "dipole", "polarization", *per_atom]
    results: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(frames), batch_size):
        chunk = frames[start : start + batch_size]
        data, _ = collate(chunk, model.dtype, model.device)
        out = model(data, compute_bec=compute_bec and model.long_range is not None, compute_stress=False)
        counts = data.n_atoms.tolist()
        for key in keys:
            if key not in out:
                continue
            value = out[key].detach().cpu().numpy()
            if value.shape[0] == len(chunk) and key not in per_atom:
                results[key].extend(list(value))
            else:
                results[key].extend(np.split(value, np.cumsum(counts)[:-1]))
    return {k: v for k, v in results.items() if v}


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def _r2(prediction: np.ndarray, reference: np.ndarray) -> float:
    residual = np.sum((prediction - reference) ** 2)
    total = np.sum((reference - reference.mean()) ** 2)
    return float(1.0 - residual / total) if total > 0 else float("nan")


def error_metrics(frames: Sequence[Frame], predictions: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Energy (meV/atom), forces (meV/Å), dipole (e·Å), charges (e), BEC (e) errors.

    Dipole and BEC errors are reported both as they are and after the best
    single scale factor (latent charges are defined up to the dielectric
    screening of the host, so a scale is expected); signs are not changed.
    """
    metrics: dict[str, float] = {}
    n_atoms = np.array([len(f.atoms) for f in frames])
    if all(f.energy is not None for f in frames):
        reference = np.array([f.energy for f in frames]) / n_atoms
        predicted = np.array(predictions["energy"]) / n_atoms
        metrics["energy_rmse_meV_per_atom"] = 1e3 * _rmse(predicted, reference)
        metrics["energy_mae_meV_per_atom"] = 1e3 * float(np.mean(np.abs(predicted - reference)))
    if all(f.forces is not None for f in frames):
        reference = np.concatenate([f.forces for f in frames])
        predicted = np.concatenate(predictions["forces"])
        metrics["forces_rmse_meV_per_A"] = 1e3 * _rmse(predicted, reference)
        metrics["forces_mae_meV_per_A"] = 1e3 * float(np.mean(np.abs(predicted - reference)))
    host = np.array(predictions["host_energy"]) / n_atoms
    long_range = np.array(predictions["long_range_energy"]) / n_atoms
    metrics["mean_abs_host_energy_eV_per_atom"] = float(np.mean(np.abs(host)))
    metrics["mean_abs_long_range_energy_meV_per_atom"] = 1e3 * float(np.mean(np.abs(long_range)))
    if "dipole" in predictions and all(f.dipole is not None for f in frames):
        reference = np.stack([f.dipole for f in frames if f.dipole is not None])  # all are, checked above
        predicted = np.stack(predictions["dipole"])
        metrics.update(_vector_metrics("dipole", predicted, reference, "eA"))
    if "charges" in predictions and all(f.charges is not None for f in frames):
        reference = np.concatenate([f.charges for f in frames])
        predicted = np.concatenate(predictions["charges"])
        metrics["charges_rmse_e"] = _rmse(predicted, reference)
        metrics["charges_pearson_r"] = float(np.corrcoef(predicted, reference)[0, 1])
    if "bec" in predictions and all(f.bec is not None for f in frames):
        reference = np.concatenate([f.bec for f in frames]).reshape(-1)
        predicted = np.concatenate(predictions["bec"]).reshape(-1)
        metrics.update(_vector_metrics("bec", predicted, reference, "e"))
    return metrics


def _vector_metrics(name: str, predicted: np.ndarray, reference: np.ndarray, unit: str) -> dict[str, float]:
    predicted, reference = predicted.reshape(-1), reference.reshape(-1)
    scale = float(predicted @ reference / max(predicted @ predicted, 1e-300))
    return {
        f"{name}_mae_{unit}": float(np.mean(np.abs(predicted - reference))),
        f"{name}_r2": _r2(predicted, reference),
        f"{name}_best_scale": scale,
        f"{name}_scaled_mae_{unit}": float(np.mean(np.abs(scale * predicted - reference))),
        f"{name}_scaled_r2": _r2(scale * predicted, reference),
    }
