"""Fine-tune your own MACE model with latent long range, against fine-tuning the short-range host alone.

    python examples/finetune_mace.py --model my_mace.model --data train.xyz [--test test.xyz] \
        [--forces-key force] [--dipole-key dipole] [--epochs 3] [--frames 60] [--out runs/finetune]

Both runs start from the same ``.model`` file (as ``mace_run_train`` writes it,
read safely by ``latent_lr.load_host``), with the same seed, data and budget:

* ``host + long range``: ``latent_lr.wrap(model_file)``; host and latent-charge
  head train together;
* ``host alone``: the short-range twin (``long_range=False``), the ablation.

The host keeps its own E0s (no reference energies are refitted).  Printed:
test energy and force RMSE of both, and, with ``--dipole-key``, the R² of the
latent dipoles (never trained on; raw and after the best single scale), which
the short-range host cannot predict at all.  For post-hoc dipoles/BECs on a
model you cannot retrain, use ``latent-lr train --init-model FILE --freeze-host``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ase.io

import latent_lr
from latent_lr.training import TrainConfig, train


def subset(source: Path, target: Path, frames: int, start: int = 0) -> Path:
    """The frames ``start .. start + frames`` of ``source`` written to ``target`` (labels kept as they are read)."""
    ase.io.write(target, ase.io.read(source, f"{start}:{start + frames}"), format="extxyz")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a MACE .model file (mace_run_train output or a foundation model)")
    parser.add_argument("--data", type=Path, required=True, help="training data, extended XYZ with energies and forces")
    parser.add_argument("--test", type=Path, help="test data (default: frames after the training frames of --data)")
    parser.add_argument("--forces-key", default="forces")
    parser.add_argument("--dipole-key", help="evaluate latent dipoles against this label (never trained on)")
    parser.add_argument("--frames", type=int, default=60, help="training frames (small default budget)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trust-pickle", action="store_true", help="for model files the safe loader refuses")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_file = subset(args.data, args.out / "train.xyz", args.frames)
    test_file = args.test or subset(args.data, args.out / "test.xyz", max(10, args.frames // 4), start=args.frames)
    common = dict(
        train=str(train_file), test=str(test_file), init_model=args.model, trust_pickle=args.trust_pickle,
        forces_key=args.forces_key, dipole_key=args.dipole_key, dipole_weight=0.0, epochs=args.epochs,
        batch_size=4, learning_rate=1e-3, seed=0, progress=False,
    )
    results = {}
    for name, long_range in (("host + long range", True), ("host alone", False)):
        out = args.out / name.replace(" ", "_")
        trainer = train(TrainConfig(**common, long_range=long_range, out=str(out)))
        metrics, _ = trainer.evaluate(latent_lr.load(out / "best_model.pt"), trainer.test_frames)
        results[name] = metrics
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    keys = ["energy_rmse_meV_per_atom", "forces_rmse_meV_per_A", "dipole_r2", "dipole_scaled_r2"]
    print(f"{'run':<20}" + "".join(f"{key:>28}" for key in keys))
    for name, metrics in results.items():
        print(f"{name:<20}" + "".join(f"{metrics.get(key, float('nan')):>28.4g}" for key in keys))


if __name__ == "__main__":
    main()
