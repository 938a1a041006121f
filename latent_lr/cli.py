"""Command-line interface: ``latent-lr <command>``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="latent-lr", description="Learned long-range electrostatics for ML potentials."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="show the electrostatics engine on built-in crystals")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_engine_demo

        run_engine_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
