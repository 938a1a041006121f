"""Particle-mesh Ewald parameters chosen from a requested accuracy.

The real-space part is the Ewald one (:mod:`latent_lr.electrostatics.parameters`):
accuracy cut-off ``r_switch = s / alpha`` with ``exp(-s²) ≈ accuracy``, switched
off smoothly up to ``r_cut = (1 + SWITCH_WIDTH) r_switch``, and the Ewald reciprocal
sum would need every wave vector up to ``k_cut = 2 s alpha``.

The mesh adds an interpolation (aliasing) error.  Interpolating exp(i k u) with
cardinal B-splines of order p on a mesh of spacing h reproduces the mode k
together with aliases k + 2πj/h, j ≠ 0, of relative amplitude
(θ / (θ + πj))^p, θ = k h / 2 (Essmann et al., J. Chem. Phys. 103, 8577
(1995), Sec. IV; the same aliasing sums underlie the P3M error functional of
Deserno & Holm, J. Chem. Phys. 109, 7678 (1998)).  A mode's energy weight is
exp(-k²/4α²)/k² (relative to exp(-s²)/k_cut² at the Ewald cut-off), so with
the mesh's Nyquist wave number ``k_N = c k_cut`` and x = k / k_N the worst
relative error per mode is

    max_x  exp(-c² s² x²) / (c x)² · 4 δ_p(π x / 2) / exp(-t²),
    δ_p(θ) = Σ_{j ≠ 0} |θ / (θ + π j)|^p,

(4 = 2 for the spline's normalisation b(m) times 2 for |S|²), with the
threshold t = sqrt(ln(1/accuracy)) + :data:`MESH_S_MARGIN`.  The smallest
``c`` that keeps this below 1 is found by bisection for each order p; the mesh
along lattice vector a_i then has K_i ≥ c k_cut |a_i| / π points, rounded up to
a product of powers of 2 and 3 (fast FFTs, and few distinct shapes in a batch).

Safety of the estimate (measured relative force or energy error / request,
worst case over the PME accuracy tests of tests/test_mesh.py: random, rattled
NaCl and water cells, σ = 0 and 1 Å, accuracy 1e-3, 1e-4, 1e-6): 0.32 at
MESH_S_MARGIN = 0.25 (0.27 with the Ewald margin 0.3, 0.57 at 0.2; 1.13 at 0
with the earlier cost constants);
the rattled NaCl crystal, whose forces are small, is always the worst case.
Outside the tested accuracies the same cells measure 0.42 at 3e-4, 0.25 at 1e-5,
0.09 at 1e-8 and 0.60 at 3e-3 (NaCl, σ = 1 Å: alpha at the smearing cap, an
18³ mesh that the earlier margin and cost constants chose too).  Water boxes
of 1,000-100,000 atoms measure 0.04-0.09x at 1e-4.  A per-mode bound is
not an RMS estimate of the force error (Deserno & Holm), so the margin is
calibrated, not derived.

``alpha`` and p only move work between pairs, spreading and the mesh; they are
chosen by minimising a cost model whose weights were measured on CPU (see
:data:`PAIR_COST`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .parameters import SWITCH_WIDTH, accuracy_to_s, smearing_alpha

#: Spline orders the parameter choice considers (odd orders lose the Nyquist mode).
ORDERS = (4, 6, 8)

#: Margin added to sqrt(ln(1/accuracy)) in the mesh's aliasing threshold
#: exp(-(sqrt(ln(1/accuracy)) + margin)²) (:func:`minimum_mesh`); the wave-vector
#: cut-off k_cut keeps the full :data:`.parameters.S_MARGIN`.
MESH_S_MARGIN = 0.25

#: Relative cost of one real-space pair, one spline term (atom × p³) and one mesh
#: point (spread buffer, FFT and influence function), energy + forces by
#: autograd, float64, 1 thread, fitted (least squares over alpha and p = 4, 6, 8)
#: to whole-call times on 3,000- and 10,000-atom water boxes at accuracy 1e-4
#: once the mesh sum had its own backward: 0.27-0.43 µs per pair, 0.012-0.019 µs
#: per spline term, 0.018-0.038 µs per mesh point (27³-144³ meshes).
PAIR_COST = 1.0
SPLINE_COST = 0.05
MESH_POINT_COST = 0.08


@dataclass(frozen=True)
class MeshParameters:
    """Parameters of one structure's particle-mesh Ewald sum.

    Attributes:
        alpha: splitting parameter, 1/Å.
        r_switch: real-space accuracy cut-off, Å, where the switch-off begins.
        r_cut: real-space cut-off, Å, where pair weights reach zero (0 when the
            real-space sum vanishes).
        mesh: mesh points (K1, K2, K3) along the three lattice vectors.
        order: B-spline order p.
    """

    alpha: float
    r_switch: float
    r_cut: float
    mesh: tuple[int, int, int]
    order: int


def _alias_error(theta: np.ndarray, order: int, terms: int = 64) -> np.ndarray:
    """δ_p(θ) = Σ_{j≠0} |θ / (θ + πj)|^p for θ in (0, π/2]."""
    j = np.concatenate([np.arange(-terms, 0), np.arange(1, terms + 1)])
    return (np.abs(theta[:, None] / (theta[:, None] + math.pi * j[None, :])) ** order).sum(1)


@functools.lru_cache(maxsize=256)
def nyquist_factor(s: float, order: int, tolerance_s: float | None = None) -> float:
    """Smallest c = k_N / k_cut for which the aliasing error of every mode stays below
    exp(-tolerance_s²) / k_cut² (k_cut = 2 s alpha; tolerance_s = s when not given)."""
    tolerance_s = s if tolerance_s is None else tolerance_s
    x = np.linspace(1e-3, 1.0, 400)
    alias = 4.0 * _alias_error(math.pi * x / 2.0, order)

    def worst(c: float) -> float:
        log_error = -(c * s * x) ** 2 + tolerance_s**2 - 2.0 * np.log(c * x) + np.log(alias)
        return float(log_error.max())

    low, high = 0.5, 1.0
    while worst(high) > 0.0:
        high *= 1.5
    for _ in range(40):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if worst(middle) > 0.0 else (low, middle)
    return high


def fft_size(minimum: float) -> int:
    """Smallest 2^a 3^b ≥ ``minimum``."""
    best = 1 << max(0, math.ceil(math.log2(max(minimum, 1.0))))
    power_of_three = 1
    while power_of_three < best:
        size = power_of_three
        while size < minimum:
            size *= 2
        best = min(best, size)
        power_of_three *= 3
    return best


def mesh_parameters(
    n_atoms: int,
    cell_lengths: tuple[float, float, float],
    volume: float,
    accuracy: float,
    smearing: float = 0.0,
) -> MeshParameters:
    """Choose ``alpha``, ``r_cut``, mesh and spline order for one periodic structure.

    The order depends on ``accuracy`` only (:func:`spline_order`), so that all
    structures of one call share it.

    Args:
        n_atoms: number of charges in the cell.
        cell_lengths: lengths |a_i| of the three lattice vectors, Å.
        volume: cell volume, Å³.
        accuracy: target relative error of energy and forces.
        smearing: Gaussian charge width sigma, Å.
    """
    lengths = (float(cell_lengths[0]), float(cell_lengths[1]), float(cell_lengths[2]))
    return _cheapest(int(n_atoms), lengths, float(volume), float(accuracy), float(smearing), spline_order(accuracy))[1]


@functools.lru_cache(maxsize=64)
def spline_order(accuracy: float) -> int:
    """The order of :data:`ORDERS` that is cheapest for a large water-density box."""
    n_atoms, length = 3000, (3000 / 0.1) ** (1.0 / 3.0)
    costs = {
        order: _cheapest(n_atoms, (length,) * 3, length**3, accuracy, 0.0, order)[0]
        for order in ORDERS
    }
    return min(costs, key=costs.__getitem__)


@functools.lru_cache(maxsize=256)
def _cheapest(
    n_atoms: int,
    cell_lengths: tuple[float, float, float],
    volume: float,
    accuracy: float,
    smearing: float,
    order: int,
) -> tuple[float, MeshParameters]:
    """(modelled cost, parameters) minimising the cost over ``alpha`` at a given order."""
    s = accuracy_to_s(accuracy)
    alpha_smear = smearing_alpha(smearing)
    spacing = (volume / n_atoms) ** (1.0 / 3.0)
    candidates = [alpha for alpha in np.geomspace(0.1, 4.0, 40) / spacing if alpha < alpha_smear]
    if alpha_smear < math.inf:
        candidates.append(alpha_smear)

    best = (math.inf, MeshParameters(0.0, 0.0, 0.0, (order,) * 3, order))
    for alpha in candidates:
        alpha = float(alpha)
        r_switch = 0.0 if alpha >= alpha_smear else s / alpha
        r_cut = (1.0 + SWITCH_WIDTH) * r_switch
        n1, n2, n3 = (max(fft_size(minimum_mesh(alpha, length, accuracy, order)), order) for length in cell_lengths)
        parameters = MeshParameters(alpha, r_switch, r_cut, (n1, n2, n3), order)
        cost = mesh_cost(parameters, n_atoms, volume)
        if cost < best[0]:
            best = (cost, parameters)
    return best


def minimum_mesh(alpha: float, length: float, accuracy: float, order: int) -> float:
    """Fewest mesh points (not rounded) along a lattice vector of ``length`` Å that keep
    the aliasing error below ``accuracy``: c k_cut |a| / π with k_cut = 2 s alpha (alpha in 1/Å),
    c = :func:`nyquist_factor` at the threshold margin :data:`MESH_S_MARGIN`."""
    s = accuracy_to_s(accuracy)
    tolerance_s = math.sqrt(-math.log(accuracy)) + MESH_S_MARGIN
    return nyquist_factor(s, order, tolerance_s) * 2.0 * s * alpha * length / math.pi


def mesh_cost(parameters: MeshParameters, n_atoms: int, volume: float) -> float:
    """Modelled cost (:data:`PAIR_COST` units) of ``parameters`` for n_atoms in a cell of ``volume`` Å³."""
    pairs = n_atoms * (n_atoms / volume) * 2.0 * math.pi / 3.0 * parameters.r_cut**3
    points = parameters.mesh[0] * parameters.mesh[1] * parameters.mesh[2]
    return PAIR_COST * pairs + SPLINE_COST * n_atoms * parameters.order**3 + MESH_POINT_COST * points
