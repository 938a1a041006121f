"""Side by side: MACELES (``mace_run_train --model MACELES``) and latent-lr on the SPICE dipeptides.

    OMP_NUM_THREADS=1 python benchmarks/bench_vs_maceles.py --data ../shared/data --out runs/vs_maceles \
        --n-train 150 --n-valid 15 --epochs 4

Both codes train the same MACE architecture (hidden irreps 16x0e+16x1o, max_ell 2,
correlation 3, 2 interactions, 8 Bessel functions, polynomial cut-off 5, r_max 5 Å,
the same average number of neighbours, measured on the training frames), in float64
on the same frames (a seeded subset of the dipeptide training file, with a seeded
validation subset for early-stopping/model selection), with the same loss
(per-atom-energy MSE + 10 × force MSE), epochs, seed, batch size and learning rate,
and per-element reference energies fitted by least squares (MACE: ``--E0s average``;
latent-lr: its default fit).  MACE runs with ``--scaling no_scaling`` so its host is
the plain one latent-lr wraps.  Remaining differences, not aligned: optimiser
(MACE: Adam with AMSGrad, weight decay 5e-7; latent-lr: AdamW, no weight decay) and
plateau scheduler settings (they rarely act within a few epochs), and the charge
readout (MACE's readout copied for charges vs latent-lr's MLP head with Fukui-style
redistribution).

Both are evaluated here, by this script, on the dipeptide validation file (frames
never used in training; it carries DFT ``dipole`` and ``bec``): energy and force
RMSE, dipole and BEC MAE / R², raw and after the best single scale factor, with
latent-lr's own metric functions applied to both models' predictions.  MACELES's
dipole is Σ (q_i − q̄) r_i, the moment its BEC differentiates; its BECs come from its
own ``compute_bec``.  Time per epoch: median of the per-epoch wall times each code
logs (training plus validation of one epoch).

MACELES needs the ``les`` package (ChengUCB/les; not on PyPI, CC BY-NC 4.0): install
it from source with ``pip install --no-deps -e path/to/les`` to measure with it; it is
never a dependency of latent-lr.  Without it, the MACELES side is skipped with a message.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
from dipeptide_data import dipeptide_folder

from latent_lr.serialization import load
from latent_lr.training.dataset import LabelKeys, read_frames
from latent_lr.training.metrics import error_metrics, predict_frames

#: The shared MACE architecture (latent-lr ``--host-options`` names; MACE CLI flags below).
ARCHITECTURE = dict(
    r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2, num_interactions=2,
    hidden_irreps="16x0e + 16x1o", MLP_irreps="16x0e", correlation=3,
    interaction="RealAgnosticResidualInteractionBlock",
)

ROWS = [
    ("seconds_per_epoch", "time / epoch (s)", "{:.1f}"),
    ("wall_seconds", "wall time of the run (s)", "{:.0f}"),
    ("energy_rmse_meV_per_atom", "E RMSE (meV/atom)", "{:.2f}"),
    ("forces_rmse_meV_per_A", "F RMSE (meV/Å)", "{:.1f}"),
    ("dipole_mae_eA", "dipole MAE raw (e·Å)", "{:.3f}"),
    ("dipole_r2", "dipole R² raw", "{:.3f}"),
    ("dipole_best_scale", "dipole best scale s", "{:+.3f}"),
    ("dipole_scaled_mae_eA", "dipole MAE after s (e·Å)", "{:.3f}"),
    ("dipole_scaled_r2", "dipole R² after s", "{:.3f}"),
    ("bec_mae_e", "BEC MAE raw (e)", "{:.3f}"),
    ("bec_r2", "BEC R² raw", "{:.3f}"),
    ("bec_best_scale", "BEC best scale s", "{:+.3f}"),
    ("bec_scaled_mae_e", "BEC MAE after s (e)", "{:.3f}"),
    ("bec_scaled_r2", "BEC R² after s", "{:.3f}"),
]

KEYS = LabelKeys(energy="REF_energy", forces="REF_forces", dipole="REF_dipole", bec="REF_bec")


def prepare(data: Path, out: Path, n_train: int, n_valid: int, seed: int) -> dict[str, Path]:
    """Seeded train/valid subsets of the dipeptide training file, and its val file as the test set.

    Labels are renamed REF_energy (eV), REF_forces (eV/Å), REF_dipole (e·Å), REF_bec (N×9, e)
    so that neither code reads a calculator ASE attached.
    """
    source = dipeptide_folder(data)
    frames = ase.io.read(source / "spice-dipep-dipolar_train.xyz", index=":")
    if n_train + n_valid > len(frames):
        raise SystemExit(f"--n-train + --n-valid = {n_train + n_valid} > {len(frames)} training frames.")
    order = np.random.default_rng(seed).permutation(len(frames))
    subsets = {
        "train": [frames[i] for i in order[:n_train]],
        "valid": [frames[i] for i in order[n_train : n_train + n_valid]],
        "test": ase.io.read(source / "spice-dipep-dipolar_val.xyz", index=":"),
    }
    return write_subsets(subsets, out)


def write_subsets(subsets: dict[str, list], out: Path) -> dict[str, Path]:
    """Write each named list of structures to ``out/NAME.xyz`` with REF_ labels; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, atoms_list in subsets.items():
        paths[name] = out / f"{name}.xyz"
        ase.io.write(paths[name], [_relabelled(atoms) for atoms in atoms_list], format="extxyz")
    return paths


def _relabelled(atoms):
    """A copy with REF_ labels and no calculator."""
    clean = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    clean.info["REF_energy"] = float(atoms.info.get("energy", atoms.get_potential_energy() if atoms.calc else np.nan))
    forces = atoms.arrays.get("force")
    clean.arrays["REF_forces"] = np.asarray(forces if forces is not None else atoms.get_forces(), dtype=float)
    results = atoms.calc.results if atoms.calc is not None else {}
    dipole = atoms.info.get("dipole", results.get("dipole"))
    if dipole is not None:
        clean.info["REF_dipole"] = np.asarray(dipole, dtype=float).reshape(3)
    if "bec" in atoms.arrays:
        clean.arrays["REF_bec"] = np.asarray(atoms.arrays["bec"], dtype=float).reshape(len(atoms), 9)
    return clean


def average_neighbours(path: Path, cutoff: float) -> float:
    """Mean number of neighbours within ``cutoff`` (Å) per atom over the structures of ``path`` (open boundaries)."""
    counts = []
    for atoms in ase.io.read(path, index=":"):
        distances = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
        counts.append(((distances < cutoff).sum(axis=1) - 1).mean())
    return float(np.mean(counts))


def run_latent_lr(paths: dict[str, Path], out: Path, args: argparse.Namespace, neighbours: float) -> dict:
    """Train with ``latent-lr train`` (subprocess) and evaluate the best model here."""
    run_dir = out / "latent_lr"
    shutil.rmtree(run_dir, ignore_errors=True)
    host = dict(ARCHITECTURE, avg_num_neighbors=neighbours)
    command = [
        sys.executable, "-m", "latent_lr.cli", "train", "--backbone", "mace", "--host-options", json.dumps(host),
        "--train", str(paths["train"]), "--valid", str(paths["valid"]),
        "--energy-key", "REF_energy", "--forces-key", "REF_forces",
        "--energy-weight", "1", "--forces-weight", "10", "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--learning-rate", str(args.lr), "--seed", str(args.seed),
        "--patience", str(10 * args.epochs + 10), "--dtype", "float64", "--out", str(run_dir), "--no-progress",
    ]
    wall = _run(command, run_dir / "stdout.txt")
    history = json.loads((run_dir / "log.json").read_text())
    frames = read_frames(paths["test"], KEYS)
    model = load(run_dir / "best_model.pt")
    predictions = predict_frames(model, frames, args.batch_size, compute_bec=True)
    metrics = error_metrics(frames, predictions)
    metrics["seconds_per_epoch"] = statistics.median(row["seconds"] for row in history)
    metrics["wall_seconds"] = wall
    sign_file = run_dir / "sign_convention.json"
    if sign_file.exists():
        metrics["sign_convention"] = json.loads(sign_file.read_text())["best_model"]["reason"]
    return metrics


def raw_sign_metrics(out: Path, args: argparse.Namespace) -> dict:
    """latent-lr's errors with the sign the training left (the convention undone), same model file."""
    model = load(out / "latent_lr" / "best_model.pt")
    assert model.long_range is not None
    model.long_range.charge_sign.neg_()
    frames = read_frames(out / "test.xyz", KEYS)
    return error_metrics(frames, predict_frames(model, frames, args.batch_size, compute_bec=True))


def run_maceles(paths: dict[str, Path], out: Path, args: argparse.Namespace, neighbours: float) -> dict:
    """Train with ``mace_run_train --model MACELES`` (subprocess) and evaluate the model here."""
    run_dir = out / "maceles"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "les.yaml").write_text("use_atomwise: false\n")
    hidden = ARCHITECTURE["hidden_irreps"]
    channels = int(str(hidden).split("x")[0])
    command = [
        _mace_run_train(), "--name", "maceles", "--model", "MACELES",
        "--les_arguments", str(run_dir / "les.yaml"), "--work_dir", str(run_dir),
        "--train_file", str(paths["train"]), "--valid_file", str(paths["valid"]),
        "--energy_key", "REF_energy", "--forces_key", "REF_forces", "--E0s", "average",
        "--num_channels", str(channels), "--max_L", "1", "--max_ell", str(ARCHITECTURE["max_ell"]),
        "--correlation", str(ARCHITECTURE["correlation"]), "--r_max", str(ARCHITECTURE["r_max"]),
        "--num_interactions", str(ARCHITECTURE["num_interactions"]),
        "--num_radial_basis", str(ARCHITECTURE["num_bessel"]),
        "--num_cutoff_basis", str(ARCHITECTURE["num_polynomial_cutoff"]),
        "--MLP_irreps", str(ARCHITECTURE["MLP_irreps"]), "--interaction", str(ARCHITECTURE["interaction"]),
        "--interaction_first", str(ARCHITECTURE["interaction"]),
        "--compute_avg_num_neighbors", "False", "--avg_num_neighbors", str(neighbours),
        "--scaling", "no_scaling", "--loss", "weighted", "--energy_weight", "1", "--forces_weight", "10",
        "--batch_size", str(args.batch_size), "--valid_batch_size", str(args.batch_size),
        "--lr", str(args.lr), "--max_num_epochs", str(args.epochs), "--seed", str(args.seed),
        "--patience", str(10 * args.epochs + 10), "--default_dtype", "float64", "--device", "cpu",
        "--error_table", "PerAtomRMSE", "--eval_interval", "1",
    ]
    wall = _run(command, run_dir / "stdout.txt")
    frames = read_frames(paths["test"], KEYS)
    predictions = _maceles_predictions(run_dir / "maceles.model", paths["test"], args.batch_size)
    metrics = error_metrics(frames, predictions)
    metrics["seconds_per_epoch"] = _mace_epoch_seconds(run_dir)
    metrics["wall_seconds"] = wall
    return metrics


def _maceles_predictions(model_path: Path, test_path: Path, batch_size: int) -> dict[str, list[np.ndarray]]:
    """Energies, forces, latent charges, dipoles Σ (q − q̄) r and BECs of a MACELES model, per frame."""
    import torch
    from mace import data as mace_data
    from mace.tools import torch_geometric, torch_tools, utils

    torch_tools.set_default_dtype("float64")
    model = torch.load(model_path, map_location="cpu", weights_only=False)
    for parameter in model.parameters():
        parameter.requires_grad = False
    atoms_list = ase.io.read(test_path, index=":")
    z_table = utils.AtomicNumberTable([int(z) for z in model.atomic_numbers])
    dataset = [
        mace_data.AtomicData.from_config(
            mace_data.config_from_atoms(atoms), z_table=z_table, cutoff=float(model.r_max), heads=model.heads
        )
        for atoms in atoms_list
    ]
    loader = torch_geometric.dataloader.DataLoader(dataset=dataset, batch_size=batch_size, shuffle=False, drop_last=False)
    results: dict[str, list[np.ndarray]] = {k: [] for k in ("energy", "host_energy", "long_range_energy", "forces", "charges", "dipole", "bec")}
    for batch in loader:
        batch_dict = batch.to_dict()
        out = model(batch_dict, compute_stress=False, compute_bec=True)
        counts = torch.bincount(batch_dict["batch"]).tolist()
        splits = np.cumsum(counts)[:-1]
        charges = np.split(out["latent_charges"].detach().numpy().reshape(-1), splits)
        positions = np.split(batch_dict["positions"].detach().numpy(), splits)
        results["energy"].extend(out["energy"].detach().numpy())
        results["long_range_energy"].extend(out["les_energy"].detach().numpy())
        results["host_energy"].extend((out["energy"] - out["les_energy"]).detach().numpy())
        results["forces"].extend(np.split(out["forces"].detach().numpy(), splits))
        results["charges"].extend(charges)
        results["dipole"].extend((q - q.mean()) @ r for q, r in zip(charges, positions))
        results["bec"].extend(np.split(out["BEC"].detach().numpy(), splits))
    return results


def _mace_epoch_seconds(run_dir: Path) -> float:
    """Median time between consecutive validation log lines ("Initial", "Epoch N") of MACE's log."""
    stamps = []
    for log in sorted((run_dir / "logs").glob("*.log")):
        for line in log.read_text().splitlines():
            match = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+) INFO: (Initial|Epoch \d+): head", line)
            if match:
                stamps.append(datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S.%f"))
    gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def _mace_run_train() -> str:
    """mace-torch's training script: beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / "mace_run_train"
    return str(beside) if beside.exists() else (shutil.which("mace_run_train") or "mace_run_train")


def _run(command: list[str], log: Path) -> float:
    """Run ``command`` with one thread, output to ``log``; return its wall time, s."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} {command[1]} ... failed (exit {result.returncode}); see {log}")
    return time.perf_counter() - started


def les_available() -> bool:
    try:
        import les  # noqa: F401
    except ImportError:
        return False
    return True


def format_table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = [f"| quantity | {' | '.join(names)} |", "|---|" + "---|" * len(names)]
    for key, label, pattern in ROWS:
        cells = [pattern.format(results[n][key]) if key in results[n] else "–" for n in names]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def budget_parser(description: str, out: str, n_train: int, n_valid: int, epochs: int) -> argparse.ArgumentParser:
    """The options every dipeptide benchmark shares: data, output, frames, epochs, batch, lr, seed."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="the folder that holds dipeptides/")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--n-train", type=int, default=n_train)
    parser.add_argument("--n-valid", type=int, default=n_valid)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> None:
    parser = budget_parser(__doc__.splitlines()[0], "runs/vs_maceles", n_train=150, n_valid=15, epochs=4)
    parser.add_argument("--only", choices=["latent-lr", "maceles"], help="run one side only")
    args = parser.parse_args()
    paths = prepare(args.data, args.out, args.n_train, args.n_valid, args.seed)
    neighbours = average_neighbours(paths["train"], ARCHITECTURE["r_max"])
    print(f"{args.n_train} train / {args.n_valid} valid frames, test: {paths['test']} ; "
          f"avg_num_neighbors {neighbours:.3f}; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    results: dict[str, dict] = {}
    if args.only != "latent-lr":
        if les_available():
            results["MACELES (mace_run_train)"] = run_maceles(paths, args.out, args, neighbours)
        else:
            print("MACELES skipped: the `les` package is not importable; install ChengUCB/les from its source "
                  "(pip install --no-deps -e path/to/les; CC BY-NC 4.0, for measurement only) to compare.")
    if args.only != "maceles":
        results["latent-lr"] = run_latent_lr(paths, args.out, args, neighbours)
        decision = json.loads((args.out / "latent_lr" / "sign_convention.json").read_text())["best_model"]
        if decision["flipped"]:  # also show what the run gave before the convention
            results["latent-lr, raw sign (convention undone)"] = raw_sign_metrics(args.out, args)
    if not results:
        return
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    print(format_table(results))
    for name, metrics in results.items():
        if "sign_convention" in metrics:
            print(f"{name}: {metrics['sign_convention']}")


if __name__ == "__main__":
    main()
