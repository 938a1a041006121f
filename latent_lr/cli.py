"""Command-line interface: ``latent-lr train | ablate | predict | demo | engine-demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

DEMO_OPTIONS = dict(
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


#: Flags that are long-range options (merged into ``long_range_options``, overriding it).
CHARGE_FLAGS = ("charge_model", "charge_redistribution", "qeq_solver")


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _add_training_arguments(parser: argparse.ArgumentParser, with_long_range: bool) -> None:
    parser.add_argument("--config", help="JSON or TOML file with any of these settings (flags override it)")
    parser.add_argument("--backbone", choices=["mace", "nequip", "chgnet", "cace", "radial"])
    parser.add_argument("--train", help="training data, extended XYZ")
    parser.add_argument("--valid", help="validation data (default: split --valid-fraction off --train)")
    parser.add_argument("--valid-fraction", type=float)
    parser.add_argument("--test", help="test data for the final evaluation")
    parser.add_argument("--energy-key", help="info key of energies, eV (default energy)")
    parser.add_argument("--forces-key", help="arrays key of forces, eV/Å (default forces; SPICE: force)")
    parser.add_argument("--dipole-key", help="info key of dipoles, e·Å (adds a dipole loss)")
    parser.add_argument("--charges-key", help="arrays key of reference charges, e (adds a charge loss)")
    parser.add_argument("--total-charge-key", help="info key of each structure's net charge, e")
    parser.add_argument("--bec-key", help="arrays key of reference BECs (N×9), e, for evaluation")
    parser.add_argument("--energy-weight", type=float)
    parser.add_argument("--forces-weight", type=float)
    parser.add_argument("--dipole-weight", type=float)
    parser.add_argument("--charges-weight", type=float)
    if with_long_range:
        parser.add_argument("--long-range", type=_on_off, help="on|off (default on)")
    parser.add_argument("--init-model", help="latent-lr model file, or 'pretrained' for CHGNet's own weights")
    parser.add_argument("--freeze-host", action="store_true", default=None)
    parser.add_argument("--host-options", type=json.loads, help='backbone hyper-parameters as JSON, e.g. \'{"cutoff": 5.0}\'')
    parser.add_argument("--long-range-options", type=json.loads, help='e.g. \'{"smearing": 1.0}\'')
    parser.add_argument(
        "--charge-model", choices=["latent", "qeq"],
        help="latent (MLP charges, default) or qeq (charge equilibration with learned χ and J)",
    )
    parser.add_argument(
        "--charge-redistribution", choices=["learned", "uniform", "none"],
        help="latent charges: how the total charge is imposed (none: not at all, LES baseline)",
    )
    parser.add_argument("--qeq-solver", choices=["auto", "dense", "cg"], help="Qeq linear solver (default auto)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--patience", type=int, help="early-stopping patience, epochs")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--dtype", choices=["float32", "float64"])
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _config_from(args: argparse.Namespace):
    from .training import TrainConfig

    config = TrainConfig.from_file(args.config) if args.config else TrainConfig()
    names = set(TrainConfig.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in names}
    config = config.updated(values)
    charge_flags = {k: getattr(args, k, None) for k in CHARGE_FLAGS}
    charge_flags = {k: v for k, v in charge_flags.items() if v is not None}
    if charge_flags:
        config = config.updated({"long_range_options": {**config.long_range_options, **charge_flags}})
    return config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="latent-lr", description="Learned long-range electrostatics for ML potentials.")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train a wrapped backbone on extended-XYZ data")
    _add_training_arguments(train_parser, with_long_range=True)
    train_parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    ablate_parser = commands.add_parser("ablate", help="train short- and long-range twins and compare them")
    _add_training_arguments(ablate_parser, with_long_range=False)
    ablate_parser.add_argument("--resume", action="store_true", help="continue both twins from their checkpoints")
    predict_parser = commands.add_parser("predict", help="write latent charges, dipoles and BECs to extended XYZ")
    predict_parser.add_argument("model")
    predict_parser.add_argument("input")
    predict_parser.add_argument("output")
    demo_parser = commands.add_parser("demo", help="ablation on a built-in synthetic long-range dataset")
    demo_parser.add_argument("--out", default="runs/demo")
    demo_parser.add_argument("--epochs", type=int, default=DEMO_OPTIONS["epochs"])
    demo_parser.add_argument("--no-progress", dest="progress", action="store_false")
    commands.add_parser("engine-demo", help="Madelung constants and a water box from the engine")
    args = parser.parse_args(argv)

    if args.command == "train":
        from .training import train

        trainer = train(_config_from(args), resume=args.resume)
        print(f"best model: {trainer.out / 'best_model.pt'}")
        if trainer.test_frames:
            from .serialization import load

            metrics, _ = trainer.evaluate(load(trainer.out / "best_model.pt"), trainer.test_frames)
            print(json.dumps(metrics, indent=1))
    elif args.command == "ablate":
        from .training import run_ablation

        run_ablation(_config_from(args), resume=args.resume)
    elif args.command == "predict":
        from .training import predict_file

        count = predict_file(args.model, args.input, args.output)
        print(f"wrote {count} structures to {args.output}")
    elif args.command == "demo":
        from .demo import run_ablation_demo

        run_ablation_demo(args.out, epochs=args.epochs, progress=args.progress)
    elif args.command == "engine-demo":
        from .demo import run_engine_demo

        run_engine_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
