"""Post-hoc long range on a frozen MACE host vs joint training (SPICE dipeptides), equal budget.

    python benchmarks/posthoc_frozen_host.py --data ../shared/data --out runs/posthoc \
        [--host runs/posthoc/mace/dipep_host.model] [--epochs 6] [--train-frames 200]

1. Host: a small MACE trained by ``mace_run_train`` on the first ``--train-frames``
   training frames (next 40 for its validation), energy + forces (``force`` key),
   unless ``--host`` gives an existing ``.model`` file.
2. Two ``latent-lr train --init-model HOST`` runs with the same seed, data and
   epochs: ``--freeze-host`` (only the long-range head trains, the host energy
   is the baseline) and joint (host + head).  Neither sees a dipole or BEC label
   (``--dipole-weight 0``); both are evaluated on the 55 validation frames,
   which carry DFT dipoles and BECs.
3. Prints dipole and BEC R² raw and after the best single scale (signs are not
   changed: the latent-charge sign is arbitrary), energy/force RMSE, and
   whether the frozen run left the host's weights bit-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from dipeptide_data import dipeptide_folder

import latent_lr

MACE_OPTIONS = [
    "--E0s", "average", "--model", "MACE", "--hidden_irreps", "16x0e + 16x1o", "--r_max", "5.0", "--num_interactions", "2",
    "--max_L", "1", "--correlation", "2", "--batch_size", "10", "--valid_batch_size", "20", "--device", "cpu",
    "--default_dtype", "float64", "--num_workers", "0", "--seed", "1",
]
METRICS = ("energy_rmse_meV_per_atom", "forces_rmse_meV_per_A", "dipole_r2", "dipole_scaled_r2", "dipole_best_scale",
           "bec_r2", "bec_scaled_r2", "bec_best_scale")


def frames_text(path: Path) -> list[str]:
    """The frames of an extended-XYZ file as text blocks (copied verbatim, labels untouched)."""
    lines = path.read_text().splitlines(keepends=True)
    blocks, start = [], 0
    while start < len(lines):
        count = int(lines[start])
        blocks.append("".join(lines[start : start + count + 2]))
        start += count + 2
    return blocks


def train_host(data: Path, out: Path, train_frames: int, epochs: int) -> Path:
    blocks = frames_text(data / "spice-dipep-dipolar_train.xyz")
    (out / "train.xyz").write_text("".join(blocks[:train_frames]))
    (out / "valid.xyz").write_text("".join(blocks[train_frames : train_frames + 40]))
    command = [
        str(Path(sys.executable).with_name("mace_run_train")), "--name", "dipep_host", "--train_file", str(out / "train.xyz"),
        "--valid_file", str(out / "valid.xyz"), "--energy_key", "energy", "--forces_key", "force",
        "--max_num_epochs", str(epochs), "--work_dir", str(out / "mace"), *MACE_OPTIONS,
    ]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    return out / "mace" / "dipep_host.model"


def latent_lr_run(host: Path, data: Path, out: Path, name: str, epochs: int, extra: list[str]) -> dict:
    command = [
        sys.executable, "-m", "latent_lr.cli", "train", "--init-model", str(host), "--train", str(out / "train.xyz"),
        "--valid", str(out / "valid.xyz"), "--test", str(data / "spice-dipep-dipolar_val.xyz"), "--forces-key", "force",
        "--dipole-key", "dipole", "--dipole-weight", "0", "--bec-key", "bec", "--epochs", str(epochs), "--seed", "0",
        "--batch-size", "10", "--learning-rate", "3e-3", "--no-progress", "--out", str(out / name), *extra,
    ]
    print(" ".join(command), flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the folder that holds dipeptides/ (e.g. ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/posthoc"))
    parser.add_argument("--host", type=Path, help="an existing MACE .model (default: train one with mace_run_train)")
    parser.add_argument("--train-frames", type=int, default=200)
    parser.add_argument("--host-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6, help="latent-lr epochs of each run (equal budget)")
    parser.add_argument("--table", action="store_true", help="only print the table of OUT/results.json")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads((args.out / "results.json").read_text()))
        return
    args.data = dipeptide_folder(args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    host = args.host or train_host(args.data, args.out, args.train_frames, args.host_epochs)
    if args.host:
        blocks = frames_text(args.data / "spice-dipep-dipolar_train.xyz")
        (args.out / "train.xyz").write_text("".join(blocks[: args.train_frames]))
        (args.out / "valid.xyz").write_text("".join(blocks[args.train_frames : args.train_frames + 40]))
    results = {
        "frozen host": latent_lr_run(host, args.data, args.out, "frozen", args.epochs, ["--freeze-host"]),
        "joint": latent_lr_run(host, args.data, args.out, "joint", args.epochs, []),
    }
    before = latent_lr.load_host(host).state_dict()
    after = latent_lr.load(args.out / "frozen" / "best_model.pt").backbone.host.state_dict()
    results["frozen host"]["host_bit_identical"] = float(all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in before))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    print("| run | " + " | ".join(METRICS) + " | seconds |")
    print("|---" * (len(METRICS) + 2) + "|")
    for name, metrics in results.items():
        print(f"| {name} | " + " | ".join(f"{metrics.get(key, float('nan')):.4g}" for key in METRICS) + f" | {metrics['seconds']:.0f} |")
    print(f"frozen run left the host bit-identical: {bool(results['frozen host']['host_bit_identical'])}")


if __name__ == "__main__":
    main()
