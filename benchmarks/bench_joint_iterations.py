"""CG iterations of one forward solve, Qeq (CG) vs joint charge-dipole equilibration, by size.

    cd benchmarks && python bench_joint_iterations.py --sizes 100 300 1000

Counts the applications of the frozen Coulomb operator (one per CG iteration in
both models; the joint operator applies it once per iteration) on the water
boxes of bench_charge_models.py, open and periodic, without gradients.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from bench_charge_models import FEATURES, batch_of

import latent_lr.electrostatics.qeq as qeq
from latent_lr.long_range import LongRangeModule

MODELS = {"qeq-cg": dict(charge_model="qeq", qeq_solver="cg"), "qeq-dipoles": dict(charge_model="qeq_dipoles")}


def count_frozen_applications() -> dict[str, int]:
    """Patch the Qeq operator's frozen form to count its applications; returns the live counter."""
    counter = {"applications": 0}
    original = qeq._Geometry.frozen

    def frozen(self: qeq._Geometry, *tensors: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        apply = original(self, *tensors)

        def counted(v: torch.Tensor) -> torch.Tensor:
            counter["applications"] += 1
            return apply(v)

        return counted

    qeq._Geometry.frozen = frozen  # type: ignore[method-assign]
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 300, 1000])
    parser.add_argument("--accuracy", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counter = count_frozen_applications()
    print(f"{'geometry':<9}{'N':>7}" + "".join(f"{name:>14}" for name in MODELS))
    for periodic in (False, True):
        for n_atoms in args.sizes:
            data = batch_of(n_atoms, periodic, torch.float64)
            generator = torch.Generator().manual_seed(0)
            features = torch.randn(data.positions.shape[0], FEATURES, generator=generator, dtype=torch.float64)
            counts = []
            for options in MODELS.values():
                torch.manual_seed(0)
                settings: dict[str, Any] = dict(accuracy=args.accuracy, **options)
                module = LongRangeModule(FEATURES, **settings).double()
                counter["applications"] = 0
                with torch.no_grad():
                    module(features, data)
                counts.append(counter["applications"])
            label = "periodic" if periodic else "open"
            print(f"{label:<9}{data.positions.shape[0]:>7}" + "".join(f"{c:>14}" for c in counts), flush=True)


if __name__ == "__main__":
    main()
