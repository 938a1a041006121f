"""Command-line interface: ``latent-lr train | ablate | predict | prepare-data | demo | engine-demo``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import LongRangeConfig
from .demo import DEMO_OPTIONS, run_ablation_demo, run_engine_demo
from .errors import UserInputError
from .serialization import load
from .training import TrainConfig, distributed, predict_file, run_ablation, train
from .training.config import SCHEDULERS
from .training.dataset import LabelKeys
from .training.defaults import AUTO
from .training.store import prepare_data

#: Source directory of the package: a ValueError raised here is our own validation (a user error).
PACKAGE_DIR = Path(__file__).resolve().parent


def _add_long_range_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~latent_lr.config.LongRangeConfig` option (``--charge-model``, ``--smearing``, ...)."""
    group = parser.add_argument_group("long-range settings (override --long-range-options)")
    for option in dataclasses.fields(LongRangeConfig):
        converters: dict[str, Callable[[str], object]] = {"bool": _on_off, "int": int, "float": float, "Optional[int]": int,
                                                       "Optional[float]": float}
        kind = converters.get(str(option.type), str)
        group.add_argument(
            "--" + option.name.replace("_", "-"), type=kind, choices=option.metadata["choices"],
            default=None, dest="long_range." + option.name, metavar=None if option.metadata["choices"] else "VALUE",
            help=option.metadata["help"] + ("" if option.default is None else f" (default {option.default})"),
        )


def _long_range_flags(args: argparse.Namespace) -> dict[str, object]:
    """The long-range settings given as flags."""
    prefix = "long_range."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


#: Help of the settings that default to "auto" (latent_lr.training.defaults).
AUTO_HELP = "default auto: chosen from the training set's size and charges, printed at the start"


def _number_or_auto(kind: Callable[[str], float]) -> Callable[[str], object]:
    """An argparse type: ``auto`` or a number of type ``kind``."""
    def convert(value: str) -> object:
        if value == AUTO:
            return value
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or auto, got {value!r}") from None
    return convert


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _add_training_arguments(parser: argparse.ArgumentParser, with_long_range: bool) -> None:
    parser.add_argument("--config", help="JSON or TOML file with any of these settings (flags override it)")
    parser.add_argument("--backbone", choices=["mace", "nequip", "chgnet", "cace", "radial"])
    data = "extended XYZ or prepared HDF5 (latent-lr prepare-data); several files, shard folders or globs allowed"
    parser.add_argument("--train", nargs="+", metavar="FILE", help=f"training data: {data}")
    parser.add_argument("--valid", nargs="+", metavar="FILE", help="validation data (default: split --valid-fraction off --train)")
    parser.add_argument("--valid-fraction", type=float)
    parser.add_argument("--test", nargs="+", metavar="FILE", help="test data for the final evaluation")
    _add_label_key_arguments(parser)
    parser.add_argument("--energy-weight", type=_number_or_auto(float), metavar="W|auto", help=f"{AUTO_HELP}, per-atom energy MSE")
    parser.add_argument("--forces-weight", type=_number_or_auto(float), metavar="W|auto", help=f"{AUTO_HELP}, force MSE")
    parser.add_argument("--dipole-weight", type=float)
    parser.add_argument("--charges-weight", type=float)
    parser.add_argument("--charge-excess-weight", type=float, metavar="W",
                        help="fragment-aware charges: weight of the mean squared total-charge excess of the raw latent charges (default 1)")
    if with_long_range:
        parser.add_argument("--long-range", type=_on_off, help="on|off (default on)")
    parser.add_argument("--init-model", help="start from this model: a latent-lr file, a backbone's own file (MACE .model, "
                        "NequIP .ckpt or package, CHGNet weights, CACE pickle) or a pretrained name (CHGNet: 'pretrained')")
    parser.add_argument("--trust-pickle", action="store_true", default=None,
                        help="allow --init-model files whose loading runs code from them (only for files you trust)")
    parser.add_argument("--freeze-host", action="store_true", default=None,
                        help="train only the long-range head; the host's energy stays the baseline")
    parser.add_argument("--trainable-host-parameters", nargs="+", metavar="PATTERN",
                        help="with --freeze-host: host parameters that still train, as glob patterns of their names "
                        "(e.g. 'readouts.*' for MACE's read-out)")
    parser.add_argument("--host-options", type=json.loads, help='backbone hyper-parameters as JSON, e.g. \'{"cutoff": 5.0}\'')
    parser.add_argument("--long-range-options", type=json.loads, help='e.g. \'{"smearing": 1.0}\'')
    _add_long_range_arguments(parser)
    parser.add_argument("--epochs", type=_number_or_auto(int), metavar="N|auto", help=AUTO_HELP)
    parser.add_argument("--batch-size", type=int, help="structures per batch (default 8; ignored with a budget below)")
    parser.add_argument("--max-atoms-per-batch", type=int, help="size-balanced batches: at most this many atoms per batch")
    parser.add_argument("--max-edges-per-batch", type=int, help="size-balanced batches: at most this many directed edges within the cut-off per batch")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--patience", type=_number_or_auto(int), metavar="N|auto", help=f"early-stopping patience, epochs; {AUTO_HELP}")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dtype", choices=["float32", "float64"], help="training precision (default float64)")
    parser.add_argument("--eval-dtype", choices=["float32", "float64"], help="validation/evaluation precision (default: --dtype)")
    parser.add_argument("--device", help="cpu (default), cuda or cuda:N; under --distributed cuda is each rank's local GPU")
    parser.add_argument(
        "--distributed", action="store_true", default=None,
        help="data-parallel over the processes torchrun or SLURM srun started (gloo on CPU, NCCL on CUDA); --batch-size is per rank",
    )
    parser.add_argument("--out", help="output directory")
    _add_recipe_arguments(parser)
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument(
        "--sign-convention", type=_on_off, metavar="on|off",
        help="on|off (default on): after training, make the mean latent charge of the most electronegative "
        "element negative unless total charges, a field or trained-on labels fix the sign",
    )


def _add_label_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--energy-key", help="info key of energies, eV (default energy)")
    parser.add_argument("--forces-key", help="arrays key of forces, eV/Å (default forces; SPICE: force)")
    parser.add_argument("--dipole-key", help="info key of dipoles, e·Å (adds a dipole loss)")
    parser.add_argument("--charges-key", help="arrays key of reference charges, e (adds a charge loss)")
    parser.add_argument("--total-charge-key", help="info key of each structure's net charge, e")
    parser.add_argument("--bec-key", help="arrays key of reference BECs (N×9), e, for evaluation")
    parser.add_argument("--total-spin-key", help="info key of each structure's total spin 2S_z = N↑ − N↓ (spin channel)")
    parser.add_argument("--multiplicity-key", help="info key of each structure's spin multiplicity 2S + 1 (spin channel)")


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimiser, schedule, weight average, second stage and limits (TrainConfig's recipe settings)."""
    group = parser.add_argument_group("training recipe")
    group.add_argument("--amsgrad", type=_on_off, help="on|off: AMSGrad variant of AdamW (default off)")
    group.add_argument("--gradient-clip", type=float, metavar="NORM", help="clip the gradient 2-norm to NORM (default 10; 0: off)")
    group.add_argument("--scheduler", choices=list(SCHEDULERS), help="learning rate after warm-up: halve on validation plateaus (default), cosine to --min-learning-rate, or constant")
    group.add_argument("--warmup-epochs", type=int, help="epochs of linear warm-up from --warmup-start-factor x the rate (default 0)")
    group.add_argument("--warmup-start-factor", type=float, help="rate factor of the first warm-up epoch (default 0.1)")
    group.add_argument("--plateau-factor", type=float, help="rate factor on a plateau (default 0.5)")
    group.add_argument("--plateau-patience", type=int, help="epochs without improvement before the rate drops (default patience // 4)")
    group.add_argument("--min-learning-rate", type=float, help="end of the cosine schedule (default 0)")
    group.add_argument("--ema-decay", type=float, help="keep an exponential moving average of the weights with this decay per step, e.g. 0.99; it is validated and saved (default off)")
    group.add_argument("--stage-two-start", type=float, help="start of the second stage: a fraction of --epochs (< 1) or an epoch (default: no second stage)")
    group.add_argument("--stage-two-energy-weight", type=float, help="energy weight in stage two (default unchanged)")
    group.add_argument("--stage-two-forces-weight", type=float, help="forces weight in stage two (default unchanged)")
    group.add_argument("--stage-two-learning-rate", type=float, help="constant rate in stage two (default: the schedule goes on)")
    group.add_argument("--nonfinite-lr-factor", type=float, help="rate factor after a skipped non-finite step or a roll-back (default 0.5)")
    group.add_argument("--time-budget", metavar="DURATION", help="stop at this wall-clock limit with the best model saved: seconds, or e.g. 30m, 1.5h (default none)")


def _config_from(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    names = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in names}
    for name in ("train", "valid", "test"):  # one file stays a plain path (as config.json has always shown it)
        if isinstance(values.get(name), list) and len(values[name]) == 1:
            values[name] = values[name][0]
    config = config.updated(values)
    flags = _long_range_flags(args)
    if flags:
        config = config.updated({"long_range_options": flags})
    return config


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latent-lr", description="Learned long-range electrostatics for ML potentials.")
    debug_help = "show the full Python traceback of errors (default: one line)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a wrapped backbone on extended-XYZ data")
    _add_training_arguments(train_parser, with_long_range=True)
    train_parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ablate_parser = commands.add_parser("ablate", help="train short- and long-range twins and compare them")
    _add_training_arguments(ablate_parser, with_long_range=False)
    ablate_parser.add_argument("--resume", action="store_true", help="continue both twins from their checkpoints")
    predict_parser = commands.add_parser("predict", help="write latent charges, dipoles and BECs to extended XYZ")
    predict_parser.add_argument("model", help="best_model.pt or checkpoint.pt of a training run")
    predict_parser.add_argument("input", help="structures, extended XYZ (read lazily: any size)")
    predict_parser.add_argument("output", help="extended XYZ to write, batch by batch")
    predict_parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (cuda:N)")
    predict_parser.add_argument("--batch-size", type=int, default=16, help="structures per forward pass (default 16)")
    stored = "default: the key the model's training read (older files: %s)"
    predict_parser.add_argument("--total-charge-key", help=f"info key of net charges, e ({stored % 'charge'})")
    predict_parser.add_argument("--total-spin-key", help=f"info key of total spins 2S_z ({stored % 'spin'})")
    predict_parser.add_argument("--multiplicity-key", help=f"info key of multiplicities 2S + 1 ({stored % 'multiplicity'})")
    predict_parser.add_argument("--no-progress", dest="progress", action="store_false")
    prepare_parser = commands.add_parser("prepare-data", help="convert extended XYZ to the on-disk HDF5 format, read lazily by train")
    prepare_parser.add_argument("paths", nargs="+", metavar="PATH", help="IN.xyz [IN2.xyz ...] OUT (OUT: a .h5 file, or a folder with --shard-size)")
    prepare_parser.add_argument("--shard-size", type=int, help="structures per shard: OUT becomes a folder of shard-NNNNN.h5")
    _add_label_key_arguments(prepare_parser)
    prepare_parser.add_argument("--no-progress", dest="progress", action="store_false")
    predict_parser.add_argument(
        "--sign-reference", help="extended XYZ (e.g. the training set) on which to decide the charges' sign "
        "convention now (default: the sign stored in the model; for files without one, decided on the input)",
    )
    demo_parser = commands.add_parser("demo", help="ablation on a built-in synthetic long-range dataset")
    demo_parser.add_argument("--out", default="runs/demo")
    demo_parser.add_argument("--epochs", type=int, default=DEMO_OPTIONS["epochs"])
    demo_parser.add_argument("--no-progress", dest="progress", action="store_false")
    engine_parser = commands.add_parser("engine-demo", help="Madelung constants and a water box from the engine")
    for sub in (train_parser, ablate_parser, predict_parser, prepare_parser, demo_parser, engine_parser):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    return parser


def _training_config(args: argparse.Namespace) -> TrainConfig:
    """:func:`_config_from`, with an unreadable or malformed ``--config`` file as a user error."""
    try:
        return _config_from(args)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        detail = getattr(error, "strerror", None) or str(error)
        raise UserInputError(f"--config {args.config}: cannot read settings ({detail}); give a JSON or TOML file of training settings.") from error


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        trainer = train(_training_config(args), resume=args.resume)
        if trainer.ranks.is_main:
            print(f"best model: {trainer.out / 'best_model.pt'}")
            if trainer.test_frames:
                metrics, _ = trainer.evaluate(load(trainer.out / "best_model.pt"), trainer.test_frames)
                print(json.dumps(metrics, indent=1))
        distributed.stop()
    elif args.command == "ablate":
        run_ablation(_training_config(args), resume=args.resume)
        distributed.stop()
    elif args.command == "predict":
        count = predict_file(
            args.model, args.input, args.output, batch_size=args.batch_size,
            total_charge_key=args.total_charge_key, total_spin_key=args.total_spin_key,
            multiplicity_key=args.multiplicity_key, device=args.device, progress=args.progress,
            sign_reference=args.sign_reference,
        )
        print(f"wrote {count} structures to {args.output}")
    elif args.command == "prepare-data":
        if len(args.paths) < 2:
            raise UserInputError("prepare-data needs IN.xyz [IN2.xyz ...] OUT: at least one input and the output.")
        defaults = TrainConfig()
        keys = LabelKeys(
            energy=args.energy_key or defaults.energy_key, forces=args.forces_key or defaults.forces_key,
            dipole=args.dipole_key, charges=args.charges_key, total_charge=args.total_charge_key, bec=args.bec_key,
            total_spin=args.total_spin_key, multiplicity=args.multiplicity_key,
        )
        written = prepare_data(args.paths[:-1], args.paths[-1], keys, shard_size=args.shard_size, progress=args.progress)
        print(f"wrote {len(written)} file{'s' if len(written) > 1 else ''}: {', '.join(str(p) for p in written)}")
    elif args.command == "demo":
        run_ablation_demo(args.out, epochs=args.epochs, progress=args.progress)
    elif args.command == "engine-demo":
        run_engine_demo()


def _raised_by_latent_lr(error: BaseException) -> bool:
    """True when the innermost frame of ``error``'s traceback is latent-lr's own code (its validation)."""
    trace = error.__traceback__
    if trace is None:
        return False
    while trace.tb_next is not None:
        trace = trace.tb_next
    return Path(trace.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


def user_error_message(error: BaseException) -> Optional[str]:
    """The one-line message of a user error, or None for a programming error (keep its traceback).

    User errors: :class:`UserInputError`, a missing or unreadable file, and a
    ValueError raised by latent-lr's own validation.
    """
    if isinstance(error, (FileNotFoundError, IsADirectoryError, PermissionError)) and error.filename:
        message = f"{error.filename}: {error.strerror}; check the path."
    elif isinstance(error, UserInputError) or (isinstance(error, ValueError) and _raised_by_latent_lr(error)):
        message = str(error)
    else:
        return None
    return " ".join(message.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; user errors print ``latent-lr: error: ...`` (one line) and return 2."""
    args = _build_parser().parse_args(argv)
    try:
        _run(args)
    except Exception as error:
        message = user_error_message(error)
        if message is None or args.debug:
            raise
        print(f"latent-lr: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
