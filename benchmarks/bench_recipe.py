"""Training recipe before/after (issue 12 item 5) on the SPICE dipeptides.

    OMP_NUM_THREADS=1 python benchmarks/bench_recipe.py --data ../shared/data --out runs/bench_recipe \
        --backbone mace --n-train 150 --n-valid 30 --epochs 12

Trains the same model (same seed, data, loss weights and epoch budget) with each recipe:

* ``old``: the recipe before item 5 (AdamW, rate halved on validation plateaus, clip 10);
* ``ema``: old + an exponential moving average of the weights (decay ``--ema-decay``);
* ``new``: EMA + one epoch of linear warm-up + cosine (to a tenth of the rate) until the start
  of stage two (at 75 % of the epochs) + stage two with the energy weight ×10 at a tenth of
  the rate (as MACE's SWA stage);
* ``new_plateau``: as ``new`` with the old plateau schedule instead of the cosine.

Training frames: the first ``--n-train`` + ``--n-valid`` structures of a seeded permutation
of the train file (``--n-valid`` of them for model selection); test: the whole val file
(never seen in training).  Prints, per recipe: median and mean seconds per epoch, the
best validation loss, and the best model's energy (meV/atom) and force (meV/Å) RMSE on the
test file, plus ratios new/old measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ase.io
import numpy as np
import torch
from dipeptide_data import dipeptide_folder

from latent_lr import load
from latent_lr.training import TrainConfig, Trainer


def recipes(epochs: int, learning_rate: float, energy_weight: float, ema_decay: float) -> dict[str, dict]:
    """The compared recipes (TrainConfig settings)."""
    stage_two = {
        "ema_decay": ema_decay, "warmup_epochs": 1, "stage_two_start": max(1, int(round(0.75 * epochs))),
        "stage_two_energy_weight": 10 * energy_weight, "stage_two_learning_rate": learning_rate / 10,
    }
    return {
        "old": {},
        "ema": {"ema_decay": ema_decay},
        "new": {**stage_two, "scheduler": "cosine", "min_learning_rate": learning_rate / 10},
        "new_plateau": {**stage_two, "scheduler": "plateau"},
    }


def write_splits(data: Path, out: Path, n_train: int, n_valid: int, seed: int) -> dict[str, Path]:
    """Seeded train/valid subsets of the train file and the whole val file as the test set."""
    out.mkdir(parents=True, exist_ok=True)
    frames = ase.io.read(data / "spice-dipep-dipolar_train.xyz", index=":")
    order = np.random.default_rng(seed).permutation(len(frames))
    paths = {"train": out / "train.xyz", "valid": out / "valid.xyz", "test": out / "test.xyz"}
    ase.io.write(paths["train"], [frames[i] for i in order[:n_train]])
    ase.io.write(paths["valid"], [frames[i] for i in order[n_train : n_train + n_valid]])
    ase.io.write(paths["test"], ase.io.read(data / "spice-dipep-dipolar_val.xyz", index=":"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder that holds dipeptides/ (e.g. ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_recipe"))
    parser.add_argument("--backbone", default="mace")
    parser.add_argument("--host-options", type=json.loads, default={})
    parser.add_argument("--long-range", choices=["on", "off"], default="on")
    parser.add_argument("--n-train", type=int, default=150)
    parser.add_argument("--n-valid", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--energy-weight", type=float, default=100.0)
    parser.add_argument("--forces-weight", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--recipes", nargs="+", default=["old", "ema", "new"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = write_splits(dipeptide_folder(args.data), args.out / "data", args.n_train, args.n_valid, args.seed)
    common = TrainConfig(
        train=str(paths["train"]), valid=str(paths["valid"]), test=str(paths["test"]), backbone=args.backbone, host_options=args.host_options,
        long_range=args.long_range == "on", forces_key="force", epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, energy_weight=args.energy_weight, forces_weight=args.forces_weight,
        patience=args.epochs, seed=args.seed, progress=False,
    )
    table = recipes(args.epochs, args.learning_rate, args.energy_weight, args.ema_decay)
    results: dict[str, dict[str, float]] = {}
    for name in args.recipes:
        config = common.updated({**table[name], "out": str(args.out / name)})
        started = time.perf_counter()
        trainer = Trainer(config)
        trainer.fit()
        seconds = time.perf_counter() - started
        metrics, _ = trainer.evaluate(load(args.out / name / "best_model.pt"), trainer.test_frames)
        epoch_seconds = [row["seconds"] for row in trainer.history]
        results[name] = {
            "median_s_per_epoch": statistics.median(epoch_seconds),
            "mean_s_per_epoch": statistics.fmean(epoch_seconds),
            "total_s": seconds,
            "epochs": trainer.epoch,
            "best_valid_loss": trainer.best,
            "test_E_rmse_meV_per_atom": metrics["energy_rmse_meV_per_atom"],
            "test_F_rmse_meV_per_A": metrics["forces_rmse_meV_per_A"],
        }
        print(name, json.dumps(results[name]), flush=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))
    columns = list(next(iter(results.values())))
    print("| recipe | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.4g}" for c in columns) + " |")
    if "old" in results:
        for name in results:
            if name != "old":
                ratios = {c: results[name][c] / results["old"][c] for c in columns if results["old"][c]}
                print(f"ratio {name}/old: " + ", ".join(f"{c} {v:.3f}" for c, v in ratios.items()))


if __name__ == "__main__":
    main()
