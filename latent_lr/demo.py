"""`latent-lr demo` and `latent-lr engine-demo`.

``engine-demo`` prints Madelung constants computed by
:func:`latent_lr.coulomb_energy` next to literature values, then the energy and
forces of a small periodic water-like box with point and smeared charges.
``demo`` runs the short- versus long-range ablation on a synthetic dataset.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .crystals import MADELUNG_CONSTANTS, ionic_crystal, nearest_neighbour_distance
from .electrostatics import coulomb_energy
from .synthetic import write_dataset
from .training import TrainConfig, run_ablation
from .units import COULOMB_CONSTANT

#: Training settings of ``latent-lr demo`` (a small radial backbone; labels for evaluation only).
DEMO_OPTIONS: dict[str, Any] = dict(
    backbone="radial",
    host_options={"cutoff": 4.0, "hidden_dim": 24, "n_layers": 2},
    epochs=120,
    batch_size=8,
    learning_rate=5e-3,
    patience=40,
    dipole_key="ref_dipole",
    charges_key="ref_charges",
    dipole_weight=0.0,
    charges_weight=0.0,
)


def water_like_box(n_molecules: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random rigid SPC/E-like charges at liquid-water density (positions, charges, cell)."""
    rng = np.random.default_rng(seed)
    length = (n_molecules / 0.0334) ** (1.0 / 3.0)
    per_side = int(np.ceil(n_molecules ** (1.0 / 3.0)))
    grid = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centres = (grid[:n_molecules] + 0.5) * length / per_side
    geometry = np.array([[0.0, 0.0, 0.0], [0.8165, 0.5774, 0.0], [-0.8165, 0.5774, 0.0]])
    positions = []
    for centre in centres:
        rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        positions.append(centre + geometry @ rotation.T)
    charges = np.tile([-0.8476, 0.4238, 0.4238], n_molecules)
    return (
        torch.tensor(np.concatenate(positions)),
        torch.tensor(charges),
        torch.eye(3, dtype=torch.float64) * length,
    )


def run_engine_demo() -> None:
    """Print Madelung constants and a small water box's energy and forces."""
    print("Madelung constants from latent_lr.coulomb_energy (float64, accuracy 1e-8)")
    print(f"{'crystal':<20}{'cell':<12}{'computed':>16}{'literature':>16}{'rel. error':>12}")
    for name, (kind, reference) in MADELUNG_CONSTANTS.items():
        for cubic in (False, True):
            atoms = ionic_crystal(kind, a=5.0, cubic=cubic)
            energy = coulomb_energy(
                torch.tensor(atoms.positions),
                torch.tensor(atoms.get_initial_charges()),
                cell=torch.tensor(atoms.cell.array),
                pbc=True,
                accuracy=1e-8,
            )
            pairs = len(atoms) / 2
            madelung = -energy.item() / pairs * nearest_neighbour_distance(atoms) / COULOMB_CONSTANT
            label = "conventional" if cubic else "primitive"
            print(
                f"{name:<20}{label:<12}{madelung:>16.10f}{reference:>16.10f}"
                f"{abs(madelung / reference - 1):>12.1e}"
            )

    positions, charges, cell = water_like_box()
    print(f"\nWater-like box: {len(charges)} atoms, L = {cell[0, 0]:.2f} Å, tin-foil Ewald")
    for smearing in (0.0, 1.0):
        positions.requires_grad_(True)
        start = time.perf_counter()
        energy = coulomb_energy(positions, charges, cell=cell, pbc=True, smearing=smearing)
        (gradient,) = torch.autograd.grad(energy.sum(), positions)
        elapsed = time.perf_counter() - start
        forces = -gradient
        print(
            f"  sigma = {smearing:.1f} Å: E = {energy.item():.6f} eV, "
            f"|F|max = {forces.norm(dim=1).max():.4f} eV/Å, "
            f"ΣF = {forces.sum(0).norm():.1e} eV/Å, {1e3 * elapsed:.1f} ms"
        )


def run_ablation_demo(out: str = "runs/demo", epochs: int = 120, progress: bool = True) -> dict:
    """Generate the synthetic ion-pair + water dataset and run the ablation on it.

    Both twins train on energies and forces only; the reference charges and
    dipoles are used for evaluation, never in the loss (weights 0).
    """
    paths = write_dataset(Path(out) / "data")
    print(f"synthetic data: {paths['train']} (ions 2.4–6 Å apart), {paths['test']} (8–12 Å apart)")
    options = dict(DEMO_OPTIONS, epochs=epochs, progress=progress)
    config = TrainConfig(train=str(paths["train"]), test=str(paths["test"]), out=out, **options)
    results = run_ablation(config)
    ratio = results["short_range"]["energy_rmse_meV_per_atom"] / results["long_range"]["energy_rmse_meV_per_atom"]
    print(f"\nlong-range twin: {ratio:.1f}x lower energy RMSE on separations beyond the training range")
    print(f"results: {out}/results.json, plots: {out}/parity.png, {out}/energy_vs_distance.png")
    return results
