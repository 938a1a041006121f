"""The training loss as sums over a batch divided by counts, so that it can be normalised over a global batch.

Loss = energy_weight·Σ_s ((E_s − E_s^ref)/N_s)² / S + forces_weight·Σ_iα (F_iα − F_iα^ref)² / (3 N)
+ dipole_weight·Σ_sα (μ_sα − μ_sα^ref)² / (3 S) + charges_weight·Σ_i (q_i − q_i^ref)² / N,
with S structures and N atoms; a model that reports ``raw_charge_excess`` (fragment-aware latent
charges) adds charge_excess_weight·Σ_s (Q_s − Σ_i q̃_i)² / S (:func:`charge_excess_penalty`).  In one process S and N are the batch's; under
data-parallel training they are the *global* batch's (all ranks' shards of a step),
so that N ranks with batch b give exactly the gradient of one process with batch N·b.
Units: eV, eV/Å, e·Å, e.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .config import TrainConfig
from .dataset import Frame

#: Loss terms, in the order their sums are packed for reductions over ranks.
TERMS = ("energy", "forces", "dipole", "charges")


def common_labels(masks: Mapping[str, np.ndarray]) -> set[str]:
    """The labels every structure of a batch carries (``masks``: term -> (S,) bool per structure).

    A term is in a batch's loss only if all its structures have the label, as :func:`~latent_lr.training.dataset.collate` does.
    """
    return {term for term, mask in masks.items() if bool(np.all(mask))}


def label_counts(n_atoms: np.ndarray) -> dict[str, int]:
    """How many values each term averages over in a batch of structures with ``n_atoms`` (S,) atoms:
    S, 3·N, 3·S and N (N = Σ n_atoms)."""
    structures, atoms = len(n_atoms), int(np.sum(n_atoms))
    return {"energy": structures, "forces": 3 * atoms, "dipole": 3 * structures, "charges": atoms}


def _weight(config: TrainConfig, term: str) -> float:
    value = getattr(config, f"{term}_weight")
    if isinstance(value, str):
        raise ValueError(f"{term}_weight is {value!r}: resolve the 'auto' settings first (Trainer.config holds the chosen values).")
    return float(value)


def squared_error_sums(
    config: TrainConfig, out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], n_atoms: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per term with a label, a non-zero weight and a prediction: the sum of squared errors (0-d tensors).

    ``n_atoms`` (B,) atoms per structure, in the energies' dtype (per-atom energy errors).
    """
    sums: dict[str, torch.Tensor] = {}
    for term in TERMS:
        if term not in targets or term not in out or not _weight(config, term):
            continue
        error = out[term] - targets[term]
        if term == "energy":
            error = error / n_atoms
        sums[term] = (error**2).sum()
    return sums


def weighted_loss(config: TrainConfig, sums: Mapping[str, torch.Tensor], counts: Mapping[str, int], like: torch.Tensor) -> torch.Tensor:
    """Σ_term weight · sum / count (see the module docstring); zero (like ``like``) without terms."""
    loss = like.new_zeros(())
    for term, total in sums.items():
        loss = loss + _weight(config, term) * total / counts[term]
    return loss


def charge_excess_penalty(config: TrainConfig, out: Mapping[str, torch.Tensor], n_structures: int) -> torch.Tensor:
    """charge_excess_weight · Σ_s (Q_s − Σ_i q̃_i)² / S: the raw latent charges should carry each structure's total
    charge themselves, so that a molecule's net charge is its own (the same in every structure it appears in)
    rather than a share of the excess; 0 for models without ``raw_charge_excess``.  ``n_structures``: S."""
    if "raw_charge_excess" not in out or not config.charge_excess_weight:
        return out["energy"].new_zeros(())
    return config.charge_excess_weight * (out["raw_charge_excess"] ** 2).sum() / n_structures


def loss_function(config: TrainConfig, out: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], frames: Sequence[Frame]) -> torch.Tensor:
    """The loss of one batch of ``frames`` in one process (counts are the batch's own)."""
    sizes = np.array([len(frame.atoms) for frame in frames])
    loss = weighted_loss(config, squared_error_sums(config, out, targets, out["energy"].new_tensor(sizes)), label_counts(sizes), out["energy"])
    return loss + charge_excess_penalty(config, out, len(frames))
