"""Short-range vs long-range ablations on the public DFT sets in ../shared/data.

    python benchmarks/real_data.py prepare --data ../shared/data --out runs/real
    python benchmarks/real_data.py run --out runs/real --backbones mace nequip --sets dimers dipeptides carbon_chain alaumgo [latent-lr ablate flags]

``prepare`` writes train/test splits (seeded, no data committed):

* dimers: all six dimer types, separations ≤ 9 Å for training, 9–12 Å per dimer
  type for testing.  The 30 Å boxes are treated as open boundaries (isolated
  dimers); total charge = chargeA + chargeB.  In id 4 (charged–polar) the files'
  chargeA/chargeB are swapped relative to ``indexB``: the atoms from indexB on are
  the acetate anion although chargeB = 0 (RESULTS §13.5); the total is unaffected,
  and the per-molecule rows print the files' label.
* dipeptides: the given train/val files (val carries dipoles and BECs; neither is
  ever used in training).
* carbon_chain, alaumgo: 80/20 seeded random splits; total charge from
  ``total_charge``; Hirshfeld charges only for evaluation.

``run`` calls ``latent-lr ablate`` with the same budget for both twins (by default
latent-lr's "auto" settings), once per ``--seeds`` seed, and prints a Markdown table
of the test errors; for dimers also per dimer type, mean ± std over the seeds.
``run --twins long_range`` (or ``short_range``) trains one twin only, so the
twins and seeds can run as separate processes; ``table`` re-reads the finished
runs (both twins done) and prints the same tables, training nothing.

``charge-models`` trains long-range models with the same seed and budget,
differing only in how the total charge enters (carbon_chain, alaumgo):

* ``none``: latent charges with no total-charge input (LES);
* ``fukui``: learned positive per-atom weights redistribute to the total charge;
* ``qeq``: charge equilibration with learned electronegativities and hardnesses;
* ``qeq_dipoles``: charges and induced dipoles equilibrated together (issue 15's joint model);
* ``fukui_polar``: Fukui charges plus self-consistent latent polarisabilities.

It reports energy and force RMSE (overall and per total charge), the Pearson
r of the latent charges against Hirshfeld charges, which are never trained on,
and for the models with induced dipoles their mean magnitude |p| (e·Å) on the
test split, so one sees that the dipoles are used.

``dipeptide-seeds`` trains the short-range and long-range twins (``latent-lr
ablate``) on a seeded subset of the dipeptide training file for several training
seeds and reports, on the val file, E/F RMSE and dipole and BEC MAE and R²
against DFT, raw and after the best scalar scale s, as mean ± std over seeds,
beside the published CACE-LR anchors.

``--recipe new`` (both subcommands) trains with the recipe of the training issue
(``new`` in benchmarks/bench_recipe.py: EMA 0.99, one warm-up epoch, cosine to a
tenth of the rate, stage two from 75 % of the epochs with the energy weight ×10
at a tenth of the rate); ``plain`` is the trainer's default recipe.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import ase.io
import numpy as np
from bench_recipe import recipes
from dipeptide_data import dipeptide_folder

if TYPE_CHECKING:
    from latent_lr.training.dataset import LabelKeys

#: Dimer types by ``dimer_id``, read from the structures' chargeA/chargeB (the shared README swaps ids 3 and 4:
#: id 3 is two neutral molecules, a polar and an apolar one; id 4 is an anion with a neutral polar molecule).
DIMER_LABELS = {0: "charged–charged", 2: "charged–apolar", 3: "polar–apolar", 4: "charged–polar", 5: "polar–polar", 6: "apolar–apolar"}

SETS = {
    "dimers": dict(train="dimers/train.xyz", test="dimers/test.xyz", keys=["--total-charge-key", "total_charge"]),
    "dipeptides": dict(
        train="dipeptides/train.xyz", test="dipeptides/test.xyz",
        keys=["--forces-key", "force", "--dipole-key", "dipole", "--dipole-weight", "0", "--bec-key", "bec"],
    ),
    "carbon_chain": dict(
        train="carbon_chain/train.xyz", test="carbon_chain/test.xyz",
        keys=["--total-charge-key", "total_charge", "--charges-key", "hirshfeld_charges", "--charges-weight", "0"],
    ),
    "alaumgo": dict(
        train="alaumgo/train.xyz", test="alaumgo/test.xyz",
        keys=["--total-charge-key", "total_charge", "--charges-key", "hirshfeld_charges", "--charges-weight", "0"],
    ),
}


def _split(frames, fraction, seed=0):
    order = np.random.default_rng(seed).permutation(len(frames))
    n_test = max(1, int(round(fraction * len(frames))))
    return [frames[i] for i in order[n_test:]], [frames[i] for i in order[:n_test]]


def prepare(data: Path, out: Path) -> None:
    (out / "dimers").mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for dimer_id in DIMER_LABELS:
        for atoms in ase.io.read(data / "charged_dimers" / f"train-id{dimer_id}.xyz", index=":"):
            atoms.pbc = False
            atoms.info["total_charge"] = float(atoms.info["chargeA"]) + float(atoms.info["chargeB"])
            (train if atoms.info["distance"] <= 9.0 else test).append(atoms)
    ase.io.write(out / "dimers/train.xyz", train)
    ase.io.write(out / "dimers/test.xyz", test)
    for dimer_id in DIMER_LABELS:
        ase.io.write(out / f"dimers/test-id{dimer_id}.xyz", [a for a in test if a.info["dimer_id"] == dimer_id])
    (out / "dipeptides").mkdir(exist_ok=True)
    dipeptides = dipeptide_folder(data)
    ase.io.write(out / "dipeptides/train.xyz", ase.io.read(dipeptides / "spice-dipep-dipolar_train.xyz", index=":"))
    ase.io.write(out / "dipeptides/test.xyz", ase.io.read(dipeptides / "spice-dipep-dipolar_val.xyz", index=":"))
    for name, path in [("carbon_chain", "hdnnp4g/Carbon_chain_4G/Carbon_chain_4G.extxyz"), ("alaumgo", "hdnnp4g/AlAuMgO_4G/AlAuMgO_4G.extxyz")]:
        (out / name).mkdir(exist_ok=True)
        frames = ase.io.read(data / path, index=":")
        train_frames, test_frames = _split(frames, 0.2)
        ase.io.write(out / name / "train.xyz", train_frames)
        ase.io.write(out / name / "test.xyz", test_frames)
    print(f"prepared splits under {out}: {len(train)} dimer training / {len(test)} test structures")


def run(
    out: Path, backbones: list[str], sets: list[str], epochs: str, seeds: list[int], extra: list[str], twins: list[str],
) -> None:
    """Ablate every set with every backbone and seed (a finished run is reused: delete its 'finished' file to redo it).

    With both ``twins`` one ``latent-lr ablate`` call trains them; with one (``--twins long_range``) that twin alone
    is trained (``latent-lr train``, the same flags) into ``<run>/<twin>``, so the twins of a seed can train in
    separate processes; ``table`` assembles the runs whose twins have both finished.
    """
    for backbone in backbones:
        for name in sets:
            spec = SETS[name]
            for seed in seeds:
                target = run_folder(out, name, backbone, seed)
                common = [
                    "--backbone", backbone, "--train", str(out / spec["train"]), "--test", str(out / spec["test"]),
                    "--epochs", epochs, "--seed", str(seed), "--no-progress", *spec["keys"], *extra,
                ]
                if sorted(twins) == sorted(TWIN_FLAGS):
                    run_once([sys.executable, "-m", "latent_lr.cli", "ablate", *common, "--out", str(target)], target)
                    continue
                for twin in twins:
                    command = [sys.executable, "-m", "latent_lr.cli", "train", *common, "--out", str(target / twin),
                               "--long-range", TWIN_FLAGS[twin]]
                    if (target / f"{twin}.finished").exists():
                        print(f"reusing {target / twin} (delete {twin}.finished to retrain)", flush=True)
                        continue
                    print("$", " ".join(command[1:]), flush=True)
                    subprocess.run(command, check=True)
                    (target / f"{twin}.finished").write_text(" ".join(command[1:]))
    table(out, backbones, sets, seeds)


#: ``--long-range`` value of each twin of ``latent-lr ablate``.
TWIN_FLAGS = {"short_range": "off", "long_range": "on"}


def run_folder(out: Path, name: str, backbone: str, seed: int) -> Path:
    """Folder of one ablation (``<set>-<backbone>`` for seed 0 where an older run left it there)."""
    legacy = out / f"{name}-{backbone}"
    return legacy if seed == 0 and (legacy / "finished").exists() else out / f"{name}-{backbone}-seed{seed}"


def twin_results(out: Path, name: str, target: Path) -> Optional[dict]:
    """``results.json`` of ``target``, assembled (as ``latent-lr ablate`` writes it) from twins trained separately.

    None while a twin has not finished.
    """
    if (target / "results.json").exists() and (target / "finished").exists():
        return json.loads((target / "results.json").read_text())
    if not all((target / f"{twin}.finished").exists() for twin in TWIN_FLAGS):
        return None
    from latent_lr import load
    from latent_lr.training.dataset import read_frames
    from latent_lr.training.metrics import error_metrics, predict_frames

    frames = read_frames(out / SETS[name]["test"], test_keys(name))
    results = {}
    for twin in TWIN_FLAGS:
        model = load(target / twin / "best_model.pt").double()
        metrics = error_metrics(frames, predict_frames(model, frames))
        log = json.loads((target / twin / "log.json").read_text())
        results[twin] = {**metrics, "n_test_structures": len(frames), "epochs_run": len(log),
                         "n_parameters": sum(p.numel() for p in model.parameters())}
    (target / "results.json").write_text(json.dumps(results, indent=2))
    return results


def test_keys(name: str) -> "LabelKeys":
    """Label keys of set ``name``'s test file, from its ``latent-lr`` key flags."""
    from latent_lr.training.dataset import LabelKeys

    flags = SETS[name]["keys"]
    given = {flag[2:-4].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2]) if flag.endswith("-key")}
    return LabelKeys(**given)


def table(out: Path, backbones: list[str], sets: list[str], seeds: list[int]) -> None:
    """Print the tables of the finished runs (training nothing); a seed still training is left out and named."""
    summary = {}
    per_dimer: dict[str, list[dict]] = {}
    done: dict[str, list[int]] = {}
    for backbone in backbones:
        for name in sets:
            for seed in seeds:
                target = run_folder(out, name, backbone, seed)
                results = twin_results(out, name, target)
                if results is None:
                    print(f"{target}: not finished, left out", flush=True)
                    continue
                if name == "dimers":
                    results = _dimer_results(out, target, results)
                    per_dimer.setdefault(backbone, []).append(results)
                    done.setdefault(backbone, []).append(seed)
                summary[f"{name}/{backbone}/seed{seed}"] = results
    (out / f"summary-{'-'.join(sets)}-{'-'.join(backbones)}.json").write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    if per_dimer:
        print(dimer_table(per_dimer, done))


def _dimer_results(out: Path, target: Path, results: dict) -> dict:
    """``results`` with each twin's energy and force RMSE per dimer type added (written to results_by_dimer.json)."""
    from latent_lr import load
    from latent_lr.training.dataset import LabelKeys, read_frames
    from latent_lr.training.metrics import error_metrics, predict_frames

    if (target / "results_by_dimer.json").exists():
        return json.loads((target / "results_by_dimer.json").read_text())
    keys = LabelKeys(total_charge="total_charge")
    for dimer_id, label in DIMER_LABELS.items():
        frames = read_frames(out / f"dimers/test-id{dimer_id}.xyz", keys)
        for twin in ("short_range", "long_range"):
            model = load(target / twin / "best_model.pt")
            predictions = predict_frames(model, frames)
            metrics = error_metrics(frames, predictions)
            results[twin][f"{label} E RMSE meV/atom"] = metrics["energy_rmse_meV_per_atom"]
            results[twin][f"{label} F RMSE meV/Å"] = metrics["forces_rmse_meV_per_A"]
            if "charges" in predictions:  # latent charge on molecules A and B (atoms from indexB on), e
                partner = [float(q[int(f.info["indexB"]):].sum()) for f, q in zip(frames, predictions["charges"])]
                first = [float(q[: int(f.info["indexB"])].sum()) for f, q in zip(frames, predictions["charges"])]
                results[twin][f"{label} net latent charge of B (chargeB {frames[0].info['chargeB']:+d}) e"] = float(np.mean(partner))
                results[twin][f"{label} net latent charge of A {frames[0].atoms[: int(frames[0].info['indexB'])].get_chemical_formula()}, "
                              f"B {frames[0].atoms[int(frames[0].info['indexB']):].get_chemical_formula()}: A, e"] = float(np.mean(first))
    (target / "results_by_dimer.json").write_text(json.dumps(results, indent=2))
    return results


def dimer_table(per_dimer: dict[str, list[dict]], seeds: dict[str, list[int]]) -> str:
    """Markdown: test energy RMSE per dimer type, mean ± std over seeds, SR/LR ratio of the means (and per-seed ratios)."""
    backbones = list(per_dimer)
    lines = [f"\n#### Dimers, test energy RMSE (meV/atom), mean ± std over seeds {seeds}; ratio = SR/LR of the means [per seed]\n"]
    lines.append("| dimer type | " + " | ".join(f"{b} SR | {b} LR | {b} SR/LR" for b in backbones) + " |")
    lines.append("|---" * (1 + 3 * len(backbones)) + "|")
    keys = [f"{label} E RMSE meV/atom" for label in DIMER_LABELS.values()] + ["energy_rmse_meV_per_atom", "forces_rmse_meV_per_A"]
    names = [*DIMER_LABELS.values(), "all test dimers", "all test dimers, forces (meV/Å)"]
    for key, label in zip(keys, names):
        cells = []
        for backbone in backbones:
            short = np.array([r["short_range"][key] for r in per_dimer[backbone]])
            long = np.array([r["long_range"][key] for r in per_dimer[backbone]])
            ratios = short / long
            cells += [f"{short.mean():.3g} ± {short.std():.2g}", f"{long.mean():.3g} ± {long.std():.2g}",
                      f"**{short.mean() / long.mean():.2g}×** [{' / '.join(f'{r:.2g}' for r in ratios)}]"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("\n| long-range twin: net latent charge on molecule B, e (mean over test dimers; mean ± std over seeds) | "
                 + " | ".join(backbones) + " |")
    lines.append("|---" * (1 + len(backbones)) + "|")
    for key in [k for k in per_dimer[backbones[0]][0]["long_range"] if "net latent charge of" in k]:
        cells = []
        for backbone in backbones:
            values = np.array([r["long_range"].get(key, np.nan) for r in per_dimer[backbone]])
            cells.append(f"{values.mean():+.3f} ± {values.std():.2g}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    epochs = {b: [f"{r['short_range'].get('epochs_run', 0):.0f}/{r['long_range'].get('epochs_run', 0):.0f}" for r in per_dimer[b]]
              for b in backbones}
    lines.append("\nepochs run (SR/LR) per seed: " + "; ".join(f"{b} {', '.join(e)}" for b, e in epochs.items()))
    return "\n".join(lines)


#: ``--long-range-options`` of each charge model of ``charge-models``.
CHARGE_MODELS = {
    "none": {"charge_redistribution": "none"},
    "fukui": {"charge_redistribution": "learned"},
    "qeq": {"charge_model": "qeq"},
    "qeq_dipoles": {"charge_model": "qeq_dipoles"},
    "fukui_polar": {"charge_redistribution": "learned", "polarizability": "self_consistent"},
}


def recipe_flags(recipe: str, epochs: int, learning_rate: float, energy_weight: float) -> list[str]:
    """``latent-lr`` flags of ``recipe`` (``plain`` or ``new``, as in bench_recipe.py), with the rate and energy weight."""
    settings = {"learning_rate": learning_rate, "energy_weight": energy_weight}
    if recipe == "new":
        settings.update(recipes(epochs, learning_rate, energy_weight, ema_decay=0.99)["new"])
    return [item for key, value in settings.items() for item in (f"--{key.replace('_', '-')}", str(value))]


def run_once(command: list[str], target: Path) -> None:
    """Run ``command`` unless ``target/finished`` says it already ran; then write that file."""
    if (target / "finished").exists():
        print(f"reusing {target} (delete its 'finished' file to retrain)", flush=True)
        return
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    (target / "finished").write_text(" ".join(command[1:]))


def sign_decision(run: Path) -> str:
    """The sign convention's decision for the best model of training folder ``run``, in a few words."""
    decision = json.loads((run / "sign_convention.json").read_text())["best_model"]
    mean = decision.get("mean_charge")
    words = f"s = {decision['sign']:+.0f} ({'flipped' if decision['flipped'] else 'kept'}, rule {decision['rule']}"
    if mean is not None:
        words += f", mean q({decision['element']}) = {mean:+.3f} e"
    return words + (f", CONFLICT: {decision['conflict']}" if decision.get("conflict") else "") + ")"


def charge_models(
    out: Path, backbones: list[str], sets: list[str], epochs: int, models: list[str], seeds: list[int],
    options: dict, extra: list[str],
) -> None:
    from latent_lr import load
    from latent_lr.training.dataset import LabelKeys, read_frames
    from latent_lr.training.metrics import error_metrics, predict_frames

    summary: dict[str, dict[str, dict[str, float]]] = {}
    signs: dict[str, list[str]] = {}
    for backbone in backbones:
        for name in sets:
            spec = SETS[name]
            keys = LabelKeys(total_charge="total_charge", charges="hirshfeld_charges")
            frames = read_frames(out / spec["test"], keys)
            groups: dict[str, list[int]] = {}
            for index, frame in enumerate(frames):
                label = f"Q={frame.total_charge + 0.0:+g} {frame.atoms.get_chemical_formula()}"
                groups.setdefault(label, []).append(index)
            rows = summary.setdefault(f"{name}/{backbone}", {})
            for model_name in models:
                per_seed = []
                for seed in seeds:
                    target = out / f"charge-models/{name}-{backbone}-{model_name}-seed{seed}"
                    command = [
                        sys.executable, "-m", "latent_lr.cli", "train", "--backbone", backbone,
                        "--train", str(out / spec["train"]), "--epochs", str(epochs), "--out", str(target),
                        "--seed", str(seed), "--no-progress",
                        "--long-range-options", json.dumps({**options, **CHARGE_MODELS[model_name]}), *spec["keys"], *extra,
                    ]
                    run_once(command, target)
                    model = load(target / "best_model.pt")
                    predictions = predict_frames(model, frames)
                    metrics = error_metrics(frames, predictions)
                    row = {
                        "E RMSE": metrics["energy_rmse_meV_per_atom"],
                        "F RMSE": metrics["forces_rmse_meV_per_A"],
                        "Hirshfeld r": metrics.get("charges_pearson_r", float("nan")),
                    }
                    if "induced_dipoles" in predictions:
                        dipoles = np.concatenate(predictions["induced_dipoles"])
                        row["mean |p| (e·Å)"] = float(np.linalg.norm(dipoles, axis=1).mean())
                    log = json.loads((target / "log.json").read_text())
                    row["epochs run"] = float(len(log))
                    row["s per epoch"] = float(np.median([epoch["seconds"] for epoch in log]))
                    for label, indices in sorted(groups.items()):
                        subset = {key: [values[i] for i in indices] for key, values in predictions.items()}
                        sub = error_metrics([frames[i] for i in indices], subset)
                        row[f"E RMSE {label} ({len(indices)})"] = sub["energy_rmse_meV_per_atom"]
                        row[f"F RMSE {label} ({len(indices)})"] = sub["forces_rmse_meV_per_A"]
                    per_seed.append(row)
                    signs.setdefault(f"{name}/{backbone}/{model_name}", []).append(
                        f"seed {seed}: Hirshfeld r {row['Hirshfeld r']:+.2f}, {sign_decision(target)}"
                    )
                    print(json.dumps({f"{model_name} seed {seed}": row}, indent=1), flush=True)
                rows[model_name] = {
                    key: [float(np.mean([r[key] for r in per_seed])), float(np.std([r[key] for r in per_seed]))]
                    for key in per_seed[0]
                }
    (out / f"charge-models-{'-'.join(sets)}-{'-'.join(backbones)}.json").write_text(json.dumps(summary, indent=2))
    for run_name, rows in summary.items():
        names = list(rows)
        print(f"\n#### {run_name} (E meV/atom, F meV/Å)\n\n| metric | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        for key in dict.fromkeys(key for name in names for key in rows[name]):
            cells = [f"{rows[n][key][0]:.3g} ± {rows[n][key][1]:.2g}" if key in rows[n] else "" for n in names]
            print(f"| {key} | " + " | ".join(cells) + " |")
        print(f"(mean ± std over seeds {seeds})")
    for run_name, lines in signs.items():
        print(f"{run_name}: " + "; ".join(lines))


#: Published CACE-LR (r_c 4 Å) errors on these dipeptides (Cheng et al., LES papers): E meV/atom, F meV/Å, R² vs DFT.
CACE_LR_ANCHORS = {
    "test E / F RMSE, long range": "1.88 / 61.1",
    "test E / F RMSE, short range": "2.35 / 72.4",
    "val E / F RMSE, long range": "1.29 / 53.1",
    "val E / F RMSE, short range": "1.97 / 58.8",
    "dipole R²": "0.991",
    "BEC R²": "0.952",
}

#: (results.json key, row label, format) of the dipeptide-seeds table.
DIPEPTIDE_ROWS = [
    ("energy_rmse_meV_per_atom", "E RMSE (meV/atom)", "{:.2f}"),
    ("forces_rmse_meV_per_A", "F RMSE (meV/Å)", "{:.1f}"),
    ("dipole_mae_eA", "dipole MAE raw (e·Å)", "{:.3f}"),
    ("dipole_r2", "dipole R² raw", "{:.3f}"),
    ("dipole_best_scale", "dipole best scale s", "{:+.2f}"),
    ("dipole_scaled_mae_eA", "dipole MAE after s (e·Å)", "{:.3f}"),
    ("dipole_scaled_r2", "dipole R² after s", "{:.3f}"),
    ("bec_mae_e", "BEC MAE raw (e)", "{:.3f}"),
    ("bec_r2", "BEC R² raw", "{:.3f}"),
    ("bec_best_scale", "BEC best scale s", "{:+.2f}"),
    ("bec_scaled_mae_e", "BEC MAE after s (e)", "{:.3f}"),
    ("bec_scaled_r2", "BEC R² after s", "{:.3f}"),
    ("epochs_run", "epochs run", "{:.0f}"),
    ("wall_s", "wall time per twin (s)", "{:.0f}"),
]


def dipeptide_subset(out: Path, n_train: int, n_valid: int, seed: int) -> tuple[Path, Path]:
    """Seeded train/valid subsets of the prepared dipeptide training file (``prepare`` first)."""
    folder = out / f"dipeptides/subset-{n_train}-{n_valid}-seed{seed}"
    if (folder / "valid.xyz").exists():
        return folder / "train.xyz", folder / "valid.xyz"
    frames = ase.io.read(out / SETS["dipeptides"]["train"], index=":")
    if n_train + n_valid > len(frames):
        raise SystemExit(f"--n-train + --n-valid = {n_train + n_valid} exceeds the {len(frames)} dipeptide training frames.")
    order = np.random.default_rng(seed).permutation(len(frames))
    folder.mkdir(parents=True, exist_ok=True)
    ase.io.write(folder / "train.xyz", [frames[i] for i in order[:n_train]])
    ase.io.write(folder / "valid.xyz", [frames[i] for i in order[n_train : n_train + n_valid]])
    return folder / "train.xyz", folder / "valid.xyz"


def dipeptide_seeds(
    out: Path, backbone: str, n_train: int, n_valid: int, seeds: list[int], epochs: int, recipe: list[str], extra: list[str],
) -> None:
    """Short- vs long-range twins for each seed on one seeded subset; val-file table as mean ± std over seeds."""
    train, valid = dipeptide_subset(out, n_train, n_valid, seed=0)
    per_seed: dict[str, list[dict[str, float]]] = {"short_range": [], "long_range": []}
    signs = []
    for seed in seeds:
        target = out / f"dipeptide-seeds/{backbone}-{n_train}-{n_valid}-seed{seed}"
        command = [
            sys.executable, "-m", "latent_lr.cli", "ablate", "--backbone", backbone, "--train", str(train), "--valid", str(valid),
            "--test", str(out / SETS["dipeptides"]["test"]), "--epochs", str(epochs), "--seed", str(seed), "--out", str(target),
            "--no-progress", *SETS["dipeptides"]["keys"], *recipe, *extra,
        ]
        run_once(command, target)
        results = json.loads((target / "results.json").read_text())
        for twin, rows in per_seed.items():
            log = json.loads((target / twin / "log.json").read_text())
            rows.append({**results[twin], "wall_s": float(sum(epoch["seconds"] for epoch in log))})
        signs.append(f"seed {seed}: {sign_decision(target / 'long_range')}")
    summary = {"per_seed": per_seed, "sign_convention": signs, "anchors": CACE_LR_ANCHORS}
    (out / f"dipeptide-seeds-{backbone}-{n_train}-{n_valid}.json").write_text(json.dumps(summary, indent=2))
    print(f"\n#### dipeptides/{backbone}, {n_train} train + {n_valid} valid frames, val file (55), seeds {seeds}\n")
    print("| metric | short range (mean ± std) | long range (mean ± std) | long range per seed |\n|---|---|---|---|")
    for key, label, form in DIPEPTIDE_ROWS:
        cells = []
        for twin in ("short_range", "long_range"):
            values = [row[key] for row in per_seed[twin] if key in row]
            spread = form.replace("+", "").format(np.std(values)) if values else ""
            cells.append(f"{form.format(np.mean(values))} ± {spread}" if values else "–")
        cells.append(" / ".join(form.format(row[key]) for row in per_seed["long_range"] if key in row))
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nsign convention (long-range best model): " + "; ".join(signs))
    print("\npublished CACE-LR, r_c 4 Å (Cheng et al.): " + "; ".join(f"{k} {v}" for k, v in CACE_LR_ANCHORS.items()))


def markdown(summary: dict) -> str:
    lines = []
    for run_name, results in summary.items():
        lines.append(f"\n#### {run_name}\n\n| metric | short-range | long-range |\n|---|---|---|")
        for key in results["long_range"]:
            if key in ("n_parameters", "n_test_structures", "epochs_run") or key.startswith("mean_abs_host"):
                continue
            short = results["short_range"].get(key, float("nan"))
            lines.append(f"| {key} | {short:.4g} | {results['long_range'][key]:.4g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("--data", type=Path, default=Path("../shared/data"))
    prep.add_argument("--out", type=Path, default=Path("runs/real"))
    go = commands.add_parser("run")
    go.add_argument("--out", type=Path, default=Path("runs/real"))
    go.add_argument("--backbones", nargs="+", default=["mace", "nequip"])
    go.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    go.add_argument("--epochs", default="auto", help="epochs of each twin, or auto (latent-lr's default: chosen from the data)")
    go.add_argument("--seeds", type=int, nargs="+", default=[0], help="one ablation per seed (dimers: a table of mean ± std over seeds)")
    go.add_argument("--twins", nargs="+", default=list(TWIN_FLAGS), choices=list(TWIN_FLAGS),
                    help="train only these twins (one per process; `table` combines them)")
    tab = commands.add_parser("table", help="print the tables of finished `run` folders, training nothing")
    tab.add_argument("--out", type=Path, default=Path("runs/real"))
    tab.add_argument("--backbones", nargs="+", default=["mace", "nequip"])
    tab.add_argument("--sets", nargs="+", default=["dimers"], choices=list(SETS))
    tab.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    charge = commands.add_parser("charge-models")
    charge.add_argument("--out", type=Path, default=Path("runs/real"))
    charge.add_argument("--backbones", nargs="+", default=["mace"])
    charge.add_argument("--sets", nargs="+", default=["carbon_chain", "alaumgo"], choices=["carbon_chain", "alaumgo"])
    charge.add_argument("--models", nargs="+", default=list(CHARGE_MODELS), choices=list(CHARGE_MODELS))
    charge.add_argument("--epochs", type=int, default=100)
    charge.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    charge.add_argument("--options", type=json.loads, default={}, help="further long-range options (JSON) for all models")
    seeded = commands.add_parser("dipeptide-seeds")
    seeded.add_argument("--out", type=Path, default=Path("runs/real"))
    seeded.add_argument("--backbone", default="mace")
    seeded.add_argument("--n-train", type=int, default=200)
    seeded.add_argument("--n-valid", type=int, default=25)
    seeded.add_argument("--epochs", type=int, default=12)
    seeded.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    for sub, rate in ((charge, 3e-3), (seeded, 1e-2)):
        sub.add_argument("--recipe", choices=["plain", "new"], default="plain", help="training recipe (see the module docstring)")
        sub.add_argument("--learning-rate", type=float, default=rate)
        sub.add_argument("--energy-weight", type=float, default=1.0)
    args, extra = parser.parse_known_args()
    args.extra = extra  # further latent-lr ablate flags, passed through
    if args.command in ("charge-models", "dipeptide-seeds"):
        args.extra = [*recipe_flags(args.recipe, args.epochs, args.learning_rate, args.energy_weight), *extra]
    if args.command == "prepare":
        prepare(args.data, args.out)
    elif args.command == "dipeptide-seeds":
        dipeptide_seeds(args.out, args.backbone, args.n_train, args.n_valid, args.seeds, args.epochs, [], args.extra)
    elif args.command == "charge-models":
        charge_models(args.out, args.backbones, args.sets, args.epochs, args.models, args.seeds, args.options, args.extra)
    elif args.command == "table":
        table(args.out, args.backbones, args.sets, args.seeds)
    else:
        run(args.out, args.backbones, args.sets, args.epochs, args.seeds, args.extra, args.twins)


if __name__ == "__main__":
    main()
