"""Energy + forces of periodic water-like boxes: latent-lr Ewald and PME vs torch-pme PME vs
a LES-style reciprocal-only sum, all checked against one converged reference.

    python benchmarks/bench_engine_scaling.py --sizes 192 384 768 1536 3072 6144 12288

Point charges (SPC/E-like: O -0.8476 e, H +0.4238 e) at liquid-water density,
float64, 2 threads.  Timings are medians of ``--repeats`` runs of energy +
forces and include neighbour lists (vesin) in both ours and torch-pme's; torch-pme's
parameter tuning (``tune_pme``) is not timed.

* reference: latent-lr at accuracy 1e-8 (cross-checked against torch-pme's
  Ewald with tight hand-chosen parameters on the smallest box);
* ours: ``latent_lr.coulomb_energy(accuracy=--accuracy, method="ewald")``, forces by
  autograd;
* ours PME: the same with ``method="pme"`` (smooth particle-mesh Ewald);
* torch-pme: ``tune_pme(accuracy=--accuracy)`` at each cut-off of ``--pme-cutoffs``,
  then ``PMECalculator``; the fastest setting whose measured force error meets
  the request is reported (errors are measured, not assumed);
* LES-style: k_e (2π/V) Σ_{0<|k|<2π/dl} exp(-σ²k²/2)/k² |S(k)|² with σ = 1 Å,
  dl = 2 Å (LES's defaults), O(N·K) with K ∝ V, analytic forces, chunked over k.
  Its reference is latent-lr with smearing 1 Å at 1e-8, since its kernel is
  smeared; forces are compared (energies differ by the constant self term).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

import latent_lr
from latent_lr.electrostatics import EngineState
from latent_lr.demo import water_like_box
from latent_lr.units import COULOMB_CONSTANT


def timed(function, repeats):
    result = function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


#: One engine state for the whole benchmark, as a model or calculator holds one per run (MD at a fixed cell
#: reuses the PME influence function).
RUN_STATE = EngineState()


def ours(positions, charges, cell, accuracy, smearing=0.0, method="ewald", state=RUN_STATE):
    pos = positions.detach().clone().requires_grad_(True)
    energy = latent_lr.coulomb_energy(
        pos, charges, cell=cell, pbc=True, accuracy=accuracy, smearing=smearing, method=method, state=state
    )
    (gradient,) = torch.autograd.grad(energy.sum(), pos)
    return energy.item(), -gradient


def torchpme_setup(positions, charges, cell, accuracy, cutoff):
    """torch-pme's PMECalculator with parameters from its own ``tune_pme``."""
    import vesin
    from torchpme.tuning import tune_pme

    nl = vesin.NeighborList(cutoff=cutoff, full_list=False)
    i, j, d = nl.compute(positions.detach().numpy(), cell.numpy(), True, "ijd")
    index, distance = torch.from_numpy(np.stack([i, j], 1).astype(np.int64)), torch.from_numpy(d)
    # tune_pme returns (smearing, parameters, timing); the real-space cut-off is ours to choose.
    smearing, parameters, _ = tune_pme(
        charges.unsqueeze(1), cell, positions, cutoff, index, distance, accuracy=accuracy
    )
    return torchpme_runner(positions, charges, cell, cutoff, smearing, parameters)


def torchpme_runner(positions, charges, cell, cutoff, smearing, parameters):
    """A closure timing torch-pme PME energy + forces (neighbour list included) at given parameters."""
    import torchpme
    import vesin

    q = charges.unsqueeze(1)
    calculator = torchpme.PMECalculator(torchpme.CoulombPotential(smearing=smearing, prefactor=COULOMB_CONSTANT), **parameters)
    calculator.to(dtype=positions.dtype)

    def run():
        pos = positions.detach().clone().requires_grad_(True)
        nl = vesin.NeighborList(cutoff=cutoff, full_list=False)
        i, j, S = nl.compute(pos.detach().numpy(), cell.numpy(), True, "ijS")
        pairs = torch.from_numpy(np.stack([i, j], 1).astype(np.int64))
        shifts = torch.from_numpy(S).to(pos.dtype) @ cell
        dist = (pos[pairs[:, 1]] - pos[pairs[:, 0]] + shifts).norm(dim=1)
        potential = calculator(q, cell, pos, pairs, dist)
        energy = (q * potential).sum()
        (gradient,) = torch.autograd.grad(energy, pos)
        return energy.item(), -gradient

    return run, dict(smearing=smearing, cutoff=cutoff, **parameters)


def les_style(positions, charges, cell, sigma=1.0, dl=2.0, chunk=2048):
    """Reciprocal-only smeared sum with analytic forces (not LES's code; its formula)."""
    volume = abs(float(torch.linalg.det(cell)))
    k_cut = 2 * math.pi / dl
    reciprocal = 2 * math.pi * torch.linalg.inv(cell).T
    n_max = [int(k_cut * float(cell[a].norm()) / (2 * math.pi)) + 1 for a in range(3)]
    grid = torch.stack(torch.meshgrid(*[torch.arange(-m, m + 1, dtype=cell.dtype) for m in n_max], indexing="ij"), -1).reshape(-1, 3)
    k = grid @ reciprocal
    k2 = (k * k).sum(1)
    keep = (k2 > 0) & (k2 < k_cut**2)
    k, k2 = k[keep], k2[keep]
    weight = COULOMB_CONSTANT * 2 * math.pi / volume * torch.exp(-0.5 * sigma**2 * k2) / k2
    energy, forces = 0.0, torch.zeros_like(positions)
    for start in range(0, len(k), chunk):
        kc, wc = k[start : start + chunk], weight[start : start + chunk]
        phase = positions @ kc.T
        cos, sin = torch.cos(phase), torch.sin(phase)
        c, s = charges @ cos, charges @ sin
        energy += float((wc * (c * c + s * s)).sum())
        forces += 2 * charges[:, None] * ((sin * c - cos * s) * wc) @ kc
    self_term = COULOMB_CONSTANT * float((charges**2).sum()) / (math.sqrt(2 * math.pi) * sigma)
    return energy - self_term, forces


def errors(energy, forces, reference):
    ref_energy, ref_forces = reference
    rel_force = float((forces - ref_forces).pow(2).mean().sqrt() / ref_forces.pow(2).mean().sqrt())
    return abs(energy - ref_energy) / abs(ref_energy), rel_force


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[192, 384, 768, 1536, 3072, 6144, 12288])
    parser.add_argument("--accuracy", type=float, default=1e-4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--no-torchpme", action="store_true")
    parser.add_argument("--pme-cutoffs", nargs="+", type=float, default=[6.0, 8.0, 10.0], help="torch-pme real-space cut-offs to try, Å")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, accuracy {args.accuracy:g}")
    header = (f"{'N':>6} | {'ours ms':>8} {'E err':>8} {'F err':>8} | {'PME ms':>8} {'E err':>8} {'F err':>8} | "
              f"{'t-pme ms':>8} {'E err':>8} {'F err':>8} | {'LES ms':>8} {'F err':>8} | {'ours/pme':>8} {'ours/LES':>8} "
              f"{'PME/t-pme':>9}")
    print(header)
    print("-" * len(header))
    for n_atoms in args.sizes:
        positions, charges, cell = (t.to(dtype) for t in water_like_box(n_atoms // 3, seed=1))
        reference = ours(positions.double(), charges.double(), cell.double(), 1e-8)
        smeared_reference = ours(positions.double(), charges.double(), cell.double(), 1e-8, smearing=1.0)
        repeats = args.repeats if n_atoms <= 3072 else 1
        t_ours, (e, f) = timed(lambda: ours(positions, charges, cell, args.accuracy), repeats)
        ours_err = errors(e, f.double(), reference)
        t_mesh, (e, f) = timed(lambda: ours(positions, charges, cell, args.accuracy, method="pme"), repeats)
        mesh_err = errors(e, f.double(), reference)
        if args.no_torchpme:
            t_pme, pme_err = float("nan"), (float("nan"), float("nan"))
        else:
            # Try several real-space cut-offs; keep the fastest whose measured force error meets
            # the request (or, if none does, the most accurate).
            candidates = []
            for cutoff in args.pme_cutoffs:
                run, _ = torchpme_setup(positions, charges, cell, args.accuracy, cutoff)
                t, (e, f) = timed(run, repeats)
                candidates.append((errors(e, f.double(), reference)[1] > args.accuracy, t, errors(e, f.double(), reference)))
            _, t_pme, pme_err = min(candidates, key=lambda c: (c[0], c[1] if not c[0] else c[2][1]))
        t_les, (e, f) = timed(lambda: les_style(positions, charges, cell), repeats)
        les_err = errors(e, f.double(), smeared_reference)
        print(
            f"{n_atoms:>6} | {1e3 * t_ours:>8.1f} {ours_err[0]:>8.1e} {ours_err[1]:>8.1e} | "
            f"{1e3 * t_mesh:>8.1f} {mesh_err[0]:>8.1e} {mesh_err[1]:>8.1e} | "
            f"{1e3 * t_pme:>8.1f} {pme_err[0]:>8.1e} {pme_err[1]:>8.1e} | {1e3 * t_les:>8.1f} {les_err[1]:>8.1e} | "
            f"{t_ours / t_pme:>8.2f} {t_ours / t_les:>8.2f} {t_mesh / t_pme:>9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
