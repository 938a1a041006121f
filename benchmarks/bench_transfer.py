"""Transfer of latent dipoles and BECs to molecules never seen in training (SPICE dipeptides).

    OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py --data ../shared/data --out runs/transfer \
        --n-train 120 --epochs 5 [--variants default no_baseline ...]

The shared dipeptide set holds six molecules (chemical formulas), ~90 conformers
each.  The split leaves molecules out: the two formulas ``--held-out`` (default:
the last two in sorted order) never enter training.  Training frames are a seeded
subset of the other four molecules' frames of the training file; the "seen" test
set is the validation file's frames of those four (other conformers of training
molecules), the "unseen" test set the validation file's frames of the two
held-out molecules (both carry DFT dipoles and BECs, never trained on).
``--train-molecules K`` trains on the first K of the four only (less chemical
diversity at the same number of frames).

Every variant trains latent-lr on the MACE architecture of
``bench_vs_maceles.py`` with the same frames, seed and budget and differs in one
setting of the charge head (flags below); it reports dipole and BEC R², raw and
after the best single scale, on both test sets, and E/F RMSE.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import ase.io
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_maceles import ARCHITECTURE, KEYS, _run, average_neighbours, budget_parser, write_subsets  # noqa: E402
from dipeptide_data import dipeptide_folder  # noqa: E402

from latent_lr.serialization import load  # noqa: E402
from latent_lr.training.dataset import read_frames  # noqa: E402
from latent_lr.training.metrics import error_metrics, predict_frames  # noqa: E402

#: Variant name -> extra ``latent-lr train`` flags (one hypothesis each).
VARIANTS = {
    "default": [],
    "no_baseline": ["--element-baseline", "off"],
    "linear_head": ["--hidden-dim", "0"],
    "smearing_2A": ["--smearing", "2.0"],
    "uniform_shift": ["--charge-redistribution", "uniform"],
    "weak_dipole_0.01": ["--dipole-key", "REF_dipole", "--dipole-weight", "0.01"],
}

COLUMNS = [
    ("seen", "dipole_scaled_r2"), ("unseen", "dipole_scaled_r2"), ("seen", "dipole_r2"), ("unseen", "dipole_r2"),
    ("unseen", "dipole_best_scale"), ("seen", "bec_scaled_r2"), ("unseen", "bec_scaled_r2"),
    ("seen", "energy_rmse_meV_per_atom"), ("seen", "forces_rmse_meV_per_A"), ("unseen", "forces_rmse_meV_per_A"),
]


def prepare(
    data: Path, out: Path, n_train: int, n_valid: int, held_out: list[str], trained: list[str], seed: int
) -> dict[str, Path]:
    """Leave-molecules-out split (see the module docstring); files with REF_ labels.

    ``trained``: the formulas whose frames train (the others that are not held out are unused).
    """
    source = dipeptide_folder(data)
    train_file = ase.io.read(source / "spice-dipep-dipolar_train.xyz", index=":")
    val_file = ase.io.read(source / "spice-dipep-dipolar_val.xyz", index=":")
    pool = [a for a in train_file if a.get_chemical_formula() in trained]
    order = np.random.default_rng(seed).permutation(len(pool))
    subsets = {
        "train": [pool[i] for i in order[:n_train]],
        "valid": [pool[i] for i in order[n_train : n_train + n_valid]],
        "seen": [a for a in val_file if a.get_chemical_formula() in trained],
        "unseen": [a for a in val_file if a.get_chemical_formula() in held_out],
    }
    return write_subsets(subsets, out)


def run_variant(name: str, flags: list[str], paths: dict[str, Path], out: Path, args: argparse.Namespace, neighbours: float) -> dict:
    run_dir = out / name
    host = dict(ARCHITECTURE, avg_num_neighbors=neighbours)
    command = [
        sys.executable, "-m", "latent_lr.cli", "train", "--backbone", "mace", "--host-options", json.dumps(host),
        "--train", str(paths["train"]), "--valid", str(paths["valid"]),
        "--energy-key", "REF_energy", "--forces-key", "REF_forces", "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size), "--learning-rate", str(args.lr), "--seed", str(args.seed),
        "--patience", str(10 * args.epochs + 10), "--out", str(run_dir), "--no-progress", *flags,
    ]
    wall = _run(command, run_dir / "stdout.txt")
    model = load(run_dir / "best_model.pt")
    result: dict = {"wall_seconds": wall, "flags": " ".join(flags)}
    history = json.loads((run_dir / "log.json").read_text())
    result["seconds_per_epoch"] = statistics.median(row["seconds"] for row in history)
    for subset in ("seen", "unseen"):
        frames = read_frames(paths[subset], KEYS)
        result[subset] = error_metrics(frames, predict_frames(model, frames, args.batch_size, compute_bec=True))
        result[subset]["n_frames"] = len(frames)
    return result


def format_table(results: dict[str, dict]) -> str:
    header = " | ".join(f"{subset} {key}" for subset, key in COLUMNS)
    lines = [f"| variant | {header} |", "|---|" + "---|" * len(COLUMNS)]
    for name, result in results.items():
        cells = [f"{result[subset].get(key, float('nan')):.3g}" for subset, key in COLUMNS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    parser = budget_parser(__doc__.splitlines()[0], "runs/transfer", n_train=120, n_valid=12, epochs=5)
    parser.add_argument("--held-out", nargs="*", help="formulas left out of training (default: last two sorted)")
    parser.add_argument("--train-molecules", type=int, help="train on the first K other formulas only (diversity)")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    formulas = sorted({a.get_chemical_formula() for a in ase.io.read(dipeptide_folder(args.data) / "spice-dipep-dipolar_val.xyz", index=":")})
    held_out = args.held_out or formulas[-2:]
    trained = [f for f in formulas if f not in held_out][: args.train_molecules]
    paths = prepare(args.data, args.out, args.n_train, args.n_valid, held_out, trained, args.seed)
    neighbours = average_neighbours(paths["train"], ARCHITECTURE["r_max"])
    print(f"held out: {held_out}; train on {args.n_train} frames of {trained}; "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}", flush=True)
    results = {}
    for name in args.variants:
        results[name] = run_variant(name, VARIANTS[name], paths, args.out, args, neighbours)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        print(f"{name}: done in {results[name]['wall_seconds']:.0f} s", flush=True)
    print(format_table(results))


if __name__ == "__main__":
    main()
