"""Joint equilibration of charges and induced dipoles: one quadratic functional, one constrained solve.

For each structure with total charge Q the charges q_i (e) and induced point
dipoles p_i (e·Å) minimise::

    E(q, p) = Σ χ_i q_i + ½ Σ J_i q_i² + Σ |p_i|²/(2α_i) + E_elec(q, p) − (Σ q_i r_i + Σ p_i)·E_ext,
    subject to Σ_i q_i = Q,

with χ (eV/e) the electronegativities, J > 0 (eV/e²) the hardnesses beyond the
Gaussian self-energy, α ≥ 0 (e·Å²/V) the polarisabilities and E_ext (V/Å) a
uniform applied field.  E_elec is the electrostatic energy of Gaussian charges
and Gaussian dipoles of one width σ (the engine's pair kernel ψ(r) = erf(ar)/r,
a = 1/(√2σ)), self-energies of the charges included::

    E_elec = E_coul(q) + ½ k_e √(2/π)/σ Σ q_i² − Σ_i p_i·F_i(q) − ½ Σ_{i≠j} p_iᵀ T_ij p_j,

where F(q) = G q is the field of the charges and T the Gaussian-damped dipole
tensor (:mod:`.dipole_tensor`, :mod:`.dipole_ewald`).  G is built from T's pair
tensors and k-vectors (:class:`_ChargeDipoleCoupling`), so it is the gradient of
the same sums of which −T is the Hessian: for open boundaries and Ewald it equals
:func:`.field.electric_field` to round-off.  From :data:`~.coulomb.PME_MIN_ATOMS`
atoms per periodic structure (``method="auto"``, as the engine) T and G are summed
on T's particle mesh (:meth:`.dipole_mesh.DipoleMesh.charge_field`, O(N log N) per
product instead of Ewald's O(N K)); E_coul, G and T then agree with their Ewald
forms at the engine accuracy.
Periodic structures use tin-foil sums for all three terms.  Slabs
(pbc = (True, True, False)) use the engine's slab approach for all three
(:mod:`.slab`): tin-foil sums in the vacuum-extended cell plus the
Yeh–Berkowitz/Ballenegger correction of the total density, whose part linear
in the dipoles gives the coupling F_i += −(4π k_e/V) n̂ Σ_j q_j (z_j − z_i)
(:meth:`_ChargeDipoleCoupling.slab_field`); its charge–charge part is the
engine's and its dipole–dipole part the slab dipole tensor's
(:mod:`.dipole_ewald`).

The unknowns are solved for together: with S = diag √α and p = S x, the
stationarity conditions are the KKT system of the symmetric matrix (N + 3N)::

    H = [[diag(J) + K,  −G S        ],     b = [−χ + r·E_ext],
         [−S Gᵀ,        I − S T S   ]],         [ S E_ext    ],

K the Coulomb matrix of the Gaussian charges and G the charge-to-field matrix
(F = G q).  E_elec is the energy of a smooth charge density, so the
electrostatic block is positive semi-definite once the dipole self-energy
½ c|p|² (c = k_e 4a³/(3√π)) is counted, and H is positive definite when J > 0
and every α < 1/c (:func:`.dipole_tensor.catastrophe_free_polarizability`).
The scaled unknown x makes α = 0 exact (p = 0: plain Qeq).  H is applied
matrix-free and the system solved by the shared batched CG
(:func:`.linear_solve.solve_spd`, constraint on the charge column only,
implicit first and second derivatives).

Special cases: α → 0 gives Qeq (:mod:`.qeq`); J → ∞ with χ = −J q⁰ fixes the
charges at q⁰ and gives the self-consistent induced dipoles of q⁰
(:func:`.induction.self_consistent_induction`).

The returned energy is E(q*, p*) + (Σ q_i* r_i)·E_ext, i.e. without the charges'
field term, which the model adds itself (as for Qeq); −Σ p_i·E_ext is
included (as in the induction energy).  Because E is stationary at (q*, p*),
μ = Σ q r + Σ p = −∂E/∂E_ext and the polarisability ∂μ/∂E_ext = −∂²E/∂E_ext²
is symmetric positive semi-definite.

MD and inference (``deferred=True``, the head in eval mode): the same stationarity gives the forces
by Hellmann–Feynman, ∂E/∂r at the fixed solution, so the forward pass solves once without a graph
and no adjoint solve follows (:class:`_DeferredJoint`); each CG product then spreads charges and
dipoles into one mesh density (:class:`.dipole_mesh.FrozenJointMesh`), in float32 at loose
tolerances (:data:`.qeq.SINGLE_PRECISION_RTOL`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from ..units import COULOMB_CONSTANT
from .block_preconditioner import joint_near_field_preconditioner
from .coulomb import PME_MIN_ATOMS
from .coulomb_operator import mesh_parameters_of
from .deferred_qeq import _aliases, _scatter, _wanted, multiplier_gradient
from .dipole_ewald import DIPOLE_METHODS, DipoleOperator, dipole_operator
from .dipole_mesh import FrozenJointMesh, SeparableJointMesh
from .dipole_tensor import catastrophe_free_polarizability
from .induction import per_structure
from .kernels import screened_pair_kernel
from .kspace_preconditioner import kspace_preconditioner
from .linear_solve import Preconditioner, SolveStatistics, lazy_operator, solve_spd
from .mesh_parameters import MeshParameters
from .preconditioner_memory import kept_preconditioner
from .qeq import REFINEMENT_ACCURACY, _Geometry, gaussian_self_hardness, product_precision
from .state import EngineState

#: Most entries B (4 n_max)² of the dense joint matrices of an open batch in frozen (CG) products
#: (2²⁵: 256 MiB in float64; a single open structure up to ~1,400 atoms).
DENSE_OPEN_ENTRIES = 2**25

#: Accepted ``preconditioner`` values of :func:`equilibrate_charges_and_dipoles`.
JOINT_PRECONDITIONERS = ("kspace", "jacobi", "blocks")


def _joint_preconditioner(
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor, diagonal: torch.Tensor,
    scale: torch.Tensor, smearing: torch.Tensor, precision: Optional[torch.dtype] = None, blocks: bool = False,
) -> Preconditioner:
    """P⁻¹ of the (N, 4) unknowns: the Qeq k-space preconditioner on the charge column and Jacobi on the scaled
    dipoles (diagonal (N, 4) of H), with ``blocks`` inside the joint charge–dipole near-field blocks of
    :func:`.block_preconditioner.joint_near_field_preconditioner` (scale (N,) = √α).  SPD, as its parts are."""
    charge_inverse = kspace_preconditioner(positions, cell, pbc, batch, diagonal[:, 0], smearing, precision=precision)
    dipole_diagonal = diagonal[:, 1:]

    def apply(residual: torch.Tensor) -> torch.Tensor:
        return torch.cat([charge_inverse(residual[:, 0])[:, None], residual[:, 1:] / dipole_diagonal], 1)

    if blocks:
        return joint_near_field_preconditioner(
            positions, cell, pbc, batch, diagonal, scale, float(smearing.detach()), apply
        ) or apply
    return apply


class _ChargeDipoleCoupling:
    """The charge-to-field matrix G (F = G q, V/Å per e) and its transpose, from the dipole tensor's sums.

    The field of a Gaussian charge is −k_e ∇ψ, whose radial factor k_e ψ'(r)/r is the
    transverse eigenvalue of the pair tensor k_e ∇∇ψ = k_e[(ψ'/r) I + (ψ'' − ψ'/r) R̂R̂ᵀ]:
    ½(tr T_p − R̂ᵀT_pR̂).  So G uses the pairs, tensors and k-vectors of
    :class:`.dipole_ewald.DipoleOperator` (open pairs, periodic real-space pairs with
    images, tin-foil reciprocal sum with the engine's Ewald parameters): it is the
    gradient of the same Ewald energy of which −T is the Hessian.
    """

    def __init__(self, operator: DipoleOperator, positions: torch.Tensor, cell: torch.Tensor):
        self.operator = operator
        pair_cell = cell if operator.pair_cell is None else operator.pair_cell  # slabs: the vacuum-extended cell
        vectors = operator.pairs.vectors(positions, pair_cell)  # r_second − r_first (+ image shift)
        along = torch.einsum("pa,pab,pb->p", vectors, operator.tensors, vectors) / (vectors * vectors).sum(1)
        transverse = 0.5 * (torch.einsum("paa->p", operator.tensors) - along)
        self.pair_field = transverse[:, None] * vectors  # field at `first` of a unit charge at `second`
        # Slabs: heights z_i = r_i·n̂ (0 outside slabs), for the correction's charge–dipole part.
        self.heights = None if operator.slab_normals is None else (positions * operator.slab_normals).sum(1)
        self.n_structures = operator.n_structures

    def _slab_sums(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) Σ_{j in i's structure} values_j, for values (N,)."""
        batch = self.operator.batch
        assert batch is not None
        return per_structure(values, batch, self.n_structures)[batch]

    def slab_field(self, charges: torch.Tensor) -> torch.Tensor:
        """(N, 3) slab-correction field −(4π k_e/V) n̂ (Σ_j q_j z_j − Q z_i) of charges (N,) e; zeros outside slabs.

        The part of the Yeh–Berkowitz/Ballenegger energy (2π k_e/V)(M_z² − Q Σ ρ z² − …) of the
        total density (charges q_j at z_j, dipoles p_i, which add p_i·n̂ to M_z and 2 z_i p_i·n̂ to
        Σ ρ z²) that is linear in the dipoles is −Σ_i p_i·(this field).
        """
        if self.heights is None:
            return charges.new_zeros(charges.shape[0], 3)
        operator, z = self.operator, self.heights
        assert operator.slab_weight is not None and operator.slab_normals is not None
        amplitude = self._slab_sums(charges * z) - self._slab_sums(charges) * z
        return -(operator.slab_weight * amplitude)[:, None] * operator.slab_normals

    def slab_potential(self, dipoles: torch.Tensor) -> torch.Tensor:
        """(N,) transpose of :meth:`slab_field`: −(4π k_e/V)(z_j Σ_i p_i·n̂ − Σ_i z_i p_i·n̂) at every atom j, V."""
        if self.heights is None:
            return dipoles.new_zeros(dipoles.shape[0])
        operator, z = self.operator, self.heights
        assert operator.slab_weight is not None and operator.slab_normals is not None
        along = (dipoles * operator.slab_normals).sum(1)
        return -operator.slab_weight * (z * self._slab_sums(along) - self._slab_sums(z * along))

    def field(self, charges: torch.Tensor) -> torch.Tensor:
        """(N, 3) field G q of charges (N,) e at every atom, V/Å (own charge excluded)."""
        pairs, pair_field = self.operator.pairs, self.pair_field
        field = self.slab_field(charges)
        field = field.index_add(0, pairs.first, pair_field * charges[pairs.second, None])
        field = field.index_add(0, pairs.second, -pair_field * charges[pairs.first, None])
        for g in self.operator.groups:  # F_i = Σ_k W(k) k [sin(k·r_i) C(k) − cos(k·r_i) S(k)]
            padded = (charges[g.atoms] * g.mask)[:, None, :]  # (R, 1, S)
            cos_sum = torch.bmm(padded, g.cos).transpose(1, 2) * g.weight[..., None]  # (R, K, 1)
            sin_sum = torch.bmm(padded, g.sin).transpose(1, 2) * g.weight[..., None]
            group_field = torch.bmm(g.sin, cos_sum * g.k_vectors) - torch.bmm(g.cos, sin_sum * g.k_vectors)
            field = field.index_add(0, g.atoms[g.mask], group_field[g.mask])
        for mesh in self.operator.meshes:  # PME structures: the same mesh as T (dipole_mesh)
            field = field.index_add(0, mesh.atoms, mesh.charge_field(charges[mesh.atoms]))
        return field

    def potential(self, dipoles: torch.Tensor) -> torch.Tensor:
        """(N,) Gᵀp: the potential of dipoles (N, 3) e·Å at every atom, V (own dipole excluded)."""
        pairs, pair_field = self.operator.pairs, self.pair_field
        potential = self.slab_potential(dipoles)
        potential = potential.index_add(0, pairs.second, (pair_field * dipoles[pairs.first]).sum(1))
        potential = potential.index_add(0, pairs.first, -(pair_field * dipoles[pairs.second]).sum(1))
        for g in self.operator.groups:  # φ_j = Σ_k W(k) [cos(k·r_j) A(k) − sin(k·r_j) B(k)]
            padded = dipoles[g.atoms] * g.mask[..., None]  # (R, S, 3)
            sin_sum = (torch.bmm(g.sin.transpose(1, 2), padded) * g.k_vectors).sum(-1, keepdim=True)  # A: (R, K, 1)
            cos_sum = (torch.bmm(g.cos.transpose(1, 2), padded) * g.k_vectors).sum(-1, keepdim=True)  # B
            weight = g.weight[..., None]
            group_potential = (torch.bmm(g.cos, weight * sin_sum) - torch.bmm(g.sin, weight * cos_sum))[..., 0]
            potential = potential.index_add(0, g.atoms[g.mask], group_potential[g.mask])
        for mesh in self.operator.meshes:
            potential = potential.index_add(0, mesh.atoms, mesh.dipole_potential(dipoles[mesh.atoms]))
        return potential


class _JointOperator:
    """H of the scaled unknowns y = (q, x) packed as (N, 4), the matvec of :func:`solve_spd`.

    Operator tensors: positions (N, 3) Å, cell (B, 3, 3) Å, σ (Å), J (N,) eV/e², √α (N,).
    """

    def __init__(
        self, pbc: torch.Tensor, batch: torch.Tensor, n_structures: int, accuracy: float,
        state: Optional[EngineState] = None, method: str = "auto",
    ):
        self.charges = _Geometry(pbc, batch, n_structures, accuracy, state)
        self.method = method  # reciprocal sums of T and G (:data:`.dipole_ewald.DIPOLE_METHODS`)
        # False: the meshes' (n, p³, 3) arrays are built on first use only (deferred MD solves never need
        # them with a graph: the frozen product builds its own, the energy uses the separable factors).
        self.eager_mesh = True
        self.periodic = pbc.all(dim=1)
        self.slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
        # Issue 15 (reuse): the operator of one call, built once (see :meth:`prepare`).
        self._built: Optional[tuple[tuple[torch.Tensor, ...], DipoleOperator, _ChargeDipoleCoupling]] = None
        self._frozen: Optional[tuple[tuple, tuple[torch.Tensor, ...], Callable[[torch.Tensor], torch.Tensor]]] = None

    def prepare(self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor) -> None:
        """Build T and G once (with the current autograd mode) for every later product at these tensors.

        The residual and the energy (graph'd products at the same tensor objects) reuse the operator
        itself, the forward and adjoint CG solves (detached views of the same storage) its detached copy.
        Products at other tensors, e.g. the fresh aliases of a second-derivative backward, rebuild.
        """
        operator = self.dipoles(positions, cell, smearing)
        self._built = ((positions, cell, smearing), operator, _coupling(operator, positions, cell))

    def _operator(
        self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor
    ) -> tuple[DipoleOperator, Optional[_ChargeDipoleCoupling]]:
        """The prepared operator when called at the prepared tensors themselves, else a fresh one."""
        if self._built is not None and all(a is b for a, b in zip(self._built[0], (positions, cell, smearing))):
            return self._built[1], self._built[2]
        return self.dipoles(positions, cell, smearing), None

    def dipoles(self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor) -> DipoleOperator:
        """The dipole field tensor T of the batch (:class:`.dipole_ewald.DipoleOperator`), slabs included."""
        geometry = self.charges
        return dipole_operator(
            positions, cell, self.periodic, geometry.batch, smearing, geometry.accuracy, self.slab, method=self.method,
            eager_mesh=self.eager_mesh, state=geometry.state,
        )

    def _shares_meshes(self, operator: DipoleOperator, cell: torch.Tensor, smearing: torch.Tensor) -> bool:
        """True when every periodic structure is summed on a mesh by both the engine (PME) and the dipole
        operator, and its Coulomb mesh (the engine's choice with the state) is its dipole mesh (same α, shape
        and order; the usual case)."""
        geometry = self.charges
        if not operator.meshes or len(operator.meshes) != int(self.periodic.sum()):
            return False
        counts = torch.bincount(geometry.batch, minlength=geometry.n_structures)
        if bool((counts[self.periodic] < PME_MIN_ATOMS).any()):  # the engine sums those by Ewald
            return False
        sigma = float(smearing.detach())
        kept = mesh_parameters_of(cell.detach(), self.periodic, counts, sigma, geometry.accuracy, geometry.state)
        fresh = mesh_parameters_of(cell.detach(), self.periodic, counts, sigma, geometry.accuracy)
        alpha_smear = 1.0 / (math.sqrt(2.0) * sigma)
        return all(_same_mesh(kept[i], fresh[i], alpha_smear) for i in kept)

    def _folded_meshes(
        self, operator: DipoleOperator, cell: torch.Tensor, smearing: torch.Tensor
    ) -> Optional[list[FrozenJointMesh | SeparableJointMesh]]:
        """One-density meshes (:class:`.dipole_mesh.FrozenJointMesh`) when every periodic structure's Coulomb
        mesh is its dipole mesh (the usual case: both follow the engine's parameter choice); else None."""
        if not self._shares_meshes(operator, cell, smearing):
            return None
        geometry = self.charges
        precision = geometry.product_precision or cell.dtype
        if geometry.refinement_pays(cell.detach(), smearing):  # a few exact residuals only: no CSR set-up
            return [SeparableJointMesh(mesh, precision) for mesh in operator.meshes]
        return [FrozenJointMesh(mesh, precision) for mesh in operator.meshes]

    def __call__(
        self, v: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor,
        hardness: torch.Tensor, scale: torch.Tensor,
    ) -> torch.Tensor:
        """H v, (N, 4): charge rows eV/e, dipole rows in the scaled units; differentiable in all tensors."""
        operator, coupling = self._operator(positions, cell, smearing)
        charge_product = self.charges(v[:, 0], positions, cell, smearing, hardness)
        return self._product(v, charge_product, operator, positions, cell, scale, coupling)

    def _sum_product(
        self, operator: DipoleOperator, coupling: _ChargeDipoleCoupling, positions: torch.Tensor,
        cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor, scale: torch.Tensor,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ H v from the pair, Ewald and mesh sums: the one-density meshes (:meth:`_folded_meshes`) where
        the Coulomb operator's mesh is the dipoles' one, else the separate products of :meth:`_product`."""
        folded = self._folded_meshes(operator, cell, smearing)
        outside = None if folded is None else self.charges.frozen(positions, cell, smearing, hardness, include_mesh=False)
        if folded is None or outside is None:  # no shared mesh, or no explicit Coulomb operator
            charge_apply = self.charges.frozen(positions, cell, smearing, hardness)
            assert charge_apply is not None

            def separate(v: torch.Tensor) -> torch.Tensor:
                return self._product(v, charge_apply(v[:, 0]), operator, positions, cell, scale, coupling)

            return separate
        meshes, outside_mesh = folded, outside

        def one_density(v: torch.Tensor) -> torch.Tensor:
            q, x = v[:, 0], v[:, 1:]
            p = scale[:, None] * x
            charge_rows = outside_mesh(q) - coupling.potential(p)
            field = coupling.field(q) + coupling.operator.apply(p)
            for mesh in meshes:
                mesh_field, mesh_potential = mesh.products(q[mesh.atoms], p[mesh.atoms])
                field = field.index_add(0, mesh.atoms, mesh_field)
                charge_rows = charge_rows.index_add(0, mesh.atoms, mesh_potential)
            return torch.cat([charge_rows[:, None], x - scale[:, None] * field], dim=1)

        return one_density

    def _dense_open(
        self, coupling: _ChargeDipoleCoupling, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor,
        hardness: torch.Tensor, scale: torch.Tensor,
    ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """v ↦ H v for a batch of open structures by one batched dense product, (B, 4m, 4m) with m the
        largest structure: the pair sums assembled once per call instead of scattered in every product
        (a 1,000-atom cluster: ~10 ms per product instead of ~0.16 s).  None above
        :data:`DENSE_OPEN_ENTRIES` matrix entries (the pair product is used then)."""
        geometry = self.charges
        batch, n_structures = geometry.batch, geometry.n_structures
        counts = torch.bincount(batch, minlength=n_structures)
        size = int(counts.max())
        if n_structures * (4 * size) ** 2 > DENSE_OPEN_ENTRIES:
            return None
        dtype = geometry.product_precision or positions.dtype
        local = torch.arange(len(batch), device=batch.device) - (torch.cumsum(counts, 0) - counts)[batch]
        pairs = coupling.operator.pairs
        first, second = pairs.first, pairs.second
        owner, row, column = batch[first], local[first], local[second]
        matrix = positions.new_zeros(n_structures, size, 4, size, 4)
        alpha_smear = 1.0 / (math.sqrt(2.0) * smearing)
        distance = pairs.vectors(positions, cell).norm(dim=1)
        kernel = COULOMB_CONSTANT * screened_pair_kernel(distance, torch.zeros_like(distance), alpha_smear)
        field = coupling.pair_field  # field at `first` of a unit charge at `second`
        both = (scale[first] * scale[second])[:, None, None] * coupling.operator.tensors
        matrix[owner, row, 0, column, 0] = kernel
        matrix[owner, column, 0, row, 0] = kernel
        matrix[owner, row, 0, column, 1:] = scale[second][:, None] * field  # −Gᵀ S: the dipoles' potential
        matrix[owner, column, 0, row, 1:] = -scale[first][:, None] * field
        matrix[owner, row, 1:, column, 0] = -scale[first][:, None] * field  # −S G: the charges' field
        matrix[owner, column, 1:, row, 0] = scale[second][:, None] * field
        matrix[owner, row, 1:, column, 1:] = -both  # I − S T S
        matrix[owner, column, 1:, row, 1:] = -both.transpose(1, 2)
        matrix[batch, local, 0, local, 0] = hardness + gaussian_self_hardness(smearing)
        eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        matrix[batch, local, 1:, local, 1:] = eye * (1.0 - scale**2 * coupling.operator.self_coefficient)[:, None, None]
        matrix = matrix.reshape(n_structures, 4 * size, 4 * size).to(dtype)

        def apply(v: torch.Tensor) -> torch.Tensor:
            padded = v.new_zeros(n_structures, size, 4, dtype=dtype).index_put((batch, local), v.to(dtype))
            product = torch.bmm(matrix, padded.reshape(n_structures, 4 * size, 1)).reshape(n_structures, size, 4)
            return product[batch, local].to(v.dtype)

        return apply

    def half_quadratic(
        self, y: torch.Tensor, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor,
        hardness: torch.Tensor, scale: torch.Tensor,
    ) -> torch.Tensor:
        """½ yᵀHy per structure (B,), eV, differentiable in all tensors, without forming H y:

            ½ yᵀHy = ½ Σ (J + k_e√(2/π)/σ) q² + E_coul(q) − ½ (pᵀF + qᵀΦ) + ½ |x|²,

        F = G q + T p the field and Φ = Gᵀp the dipoles' potential at the atoms (p = √α x), their mesh part
        as one reciprocal energy (:meth:`.dipole_mesh.DipoleMesh.dipole_energy`; with E_coul's own mesh part in
        it, :meth:`~.dipole_mesh.DipoleMesh.density_energy`, where the meshes are shared).  E_coul is one engine
        energy, so its derivatives need no differentiation through ∂E_coul/∂q (H y would).
        """
        operator, coupling = self._operator(positions, cell, smearing)
        coupling = _coupling(operator, positions, cell) if coupling is None else coupling
        q, x = y[:, 0], y[:, 1:]
        p = scale[:, None] * x
        potential, field = coupling.potential(p), coupling.field(q) + coupling.operator.apply(p)
        diagonal = hardness + gaussian_self_hardness(smearing)
        atom = 0.5 * diagonal * q**2 - 0.5 * ((p * field).sum(1) + q * potential) + 0.5 * (x * x).sum(1)
        geometry = self.charges
        per_structure_energy = positions.new_zeros(geometry.n_structures).index_add(0, geometry.batch, atom)
        # One mesh energy of charges and dipoles together where the engine's Coulomb mesh is the dipoles' one
        # (the engine's energy then leaves its own mesh part out); else E_coul plus the dipoles' increment.
        shared = not bool(self.slab.any()) and self._shares_meshes(operator, cell, smearing)
        for mesh in operator.meshes:  # −pᵀG_rec q − ½pᵀT_rec p (+ ½qᵀK_rec q where shared) of the mesh structures
            energy_of = mesh.density_energy if shared else mesh.dipole_energy
            mesh_energy = energy_of(q[mesh.atoms], p[mesh.atoms])
            per_structure_energy = per_structure_energy.index_add(0, geometry.batch[mesh.atoms[:1]], mesh_energy[None])
        return per_structure_energy + geometry.coulomb(positions, q, cell, smearing, include_mesh=not shared)

    @staticmethod
    def _product(
        v: torch.Tensor, charge_product: torch.Tensor, operator: DipoleOperator, positions: torch.Tensor,
        cell: torch.Tensor, scale: torch.Tensor, coupling: Optional[_ChargeDipoleCoupling] = None,
    ) -> torch.Tensor:
        """H v from the Coulomb product (J + K) q and the dipole tensor.

        Mesh (PME) structures get their reciprocal G q, T p and Gᵀp from one joint mesh pass
        (:meth:`.dipole_mesh.DipoleMesh.joint_products`); the rest from the pair and Ewald sums.
        """
        coupling = _coupling(operator, positions, cell) if coupling is None else coupling
        rest = coupling.operator
        q, x = v[:, 0], v[:, 1:]
        p = scale[:, None] * x
        potential, field = coupling.potential(p), coupling.field(q) + rest.apply(p)
        for mesh in operator.meshes:
            mesh_field, mesh_potential = mesh.joint_products(q[mesh.atoms], p[mesh.atoms])
            field = field.index_add(0, mesh.atoms, mesh_field)
            potential = potential.index_add(0, mesh.atoms, mesh_potential)
        charge_rows = charge_product - potential
        dipole_rows = x - scale[:, None] * field
        return torch.cat([charge_rows[:, None], dipole_rows], dim=1)

    def approximate(
        self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor,
        scale: torch.Tensor,
    ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """v ↦ H̃ v: H with the meshes and sums chosen for :data:`.qeq.REFINEMENT_ACCURACY`, single precision.

        The cheap operator of :func:`~.linear_solve.solve_spd`'s iterative refinement, as
        :meth:`.qeq._Geometry.approximate` (built on first use); None where it would not be cheaper (see
        ``refinement_pays``).
        """
        geometry = self.charges
        if not geometry.refinement_pays(cell, smearing):
            return None

        def build() -> Callable[[torch.Tensor], torch.Tensor]:
            cheap = _JointOperator(
                geometry.pbc, geometry.batch, geometry.n_structures, REFINEMENT_ACCURACY, geometry.state, self.method
            )
            cheap.eager_mesh = False
            cheap.charges.product_precision = torch.float32
            return cheap.frozen(positions, cell, smearing, hardness, scale)

        return lazy_operator(build)

    def frozen(
        self, positions: torch.Tensor, cell: torch.Tensor, smearing: torch.Tensor, hardness: torch.Tensor,
        scale: torch.Tensor,
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """v ↦ H v at fixed geometry: the Coulomb graph, pair tensors and k-vectors are built once.

        Detached views of the prepared tensors (same storage and version) reuse the prepared operator,
        and the forward and adjoint solves of one call share one frozen product.
        """
        tensors = (positions, cell, smearing, hardness, scale)
        key = tuple(_storage_key(t) for t in tensors)
        if self._frozen is not None and self._frozen[0] == key:
            return self._frozen[2]
        built = self._built
        if built is not None and all(_storage_key(a) == _storage_key(b) for a, b in zip(built[0], (positions, cell, smearing))):
            operator = built[1].detach()
        else:
            operator = self.dipoles(positions, cell, smearing)
        coupling = _coupling(operator, positions, cell)
        apply = None
        if not bool(self.periodic.any()) and not bool(self.slab.any()):
            apply = self._dense_open(coupling, positions, cell, smearing, hardness, scale)
        if apply is None:
            apply = self._sum_product(operator, coupling, positions, cell, smearing, hardness, scale)
        self._frozen = (key, tensors, apply)  # the tensors keep their storage (the key) alive
        return apply


def _same_mesh(first: MeshParameters, second: MeshParameters, alpha_smear: float) -> bool:
    """Whether two PME parameter sets give one mesh sum (α at the smearing cap where r_cut = 0)."""
    alphas = [alpha_smear if p.r_cut == 0.0 else p.alpha for p in (first, second)]
    return first.mesh == second.mesh and first.order == second.order and math.isclose(*alphas, rel_tol=1e-12)


def _coupling(operator: DipoleOperator, positions: torch.Tensor, cell: torch.Tensor) -> _ChargeDipoleCoupling:
    """G of the pair and Ewald sums; the mesh structures' part is left to the joint mesh pass of ``_product``."""
    return _ChargeDipoleCoupling(replace(operator, meshes=()) if operator.meshes else operator, positions, cell)


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor's values: storage, layout and in-place version (shared by its detached views)."""
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor._version, tensor.dtype, tensor.device)


def equilibrate_charges_and_dipoles(
    electronegativity: torch.Tensor,
    hardness: torch.Tensor,
    polarizability: torch.Tensor,
    positions: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, batch: torch.Tensor,
    total_charge: torch.Tensor,
    smearing: torch.Tensor,
    external_field: Optional[torch.Tensor] = None,
    *,
    accuracy: float = 1e-6,
    rtol: Optional[float] = None,
    max_iter: int = 1000,
    state: Optional[EngineState] = None,
    initial: Optional[torch.Tensor] = None,
    preconditioner: str = "kspace",
    statistics: Optional[SolveStatistics] = None,
    method: str = "auto",
    deferred: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q*, p*) = argmin E(q, p) subject to Σ_{i∈b} q_i = Q_b, and the energy (module docstring).

    Args:
        electronegativity: χ (N,) eV/e, without the field shift (the field is ``external_field``).
        hardness: J (N,) eV/e², > 0.
        polarizability: α (N,) e·Å²/V, 0 ≤ α < 1/c (below :func:`catastrophe_free_polarizability`).
        positions: (N, 3) Å; cell: (B, 3, 3) Å; pbc: (B, 3) bool, each structure open, fully
            periodic or a slab (True, True, False; third cell vector normal to the plane, see
            :mod:`.slab`); batch: (N,) sorted structure index.
        total_charge: Q (B,) e.
        smearing: σ (scalar tensor), Å, > 0.
        external_field: E_ext (B, 3) V/Å or None (no field).
        accuracy: Ewald accuracy of the engine and of the periodic dipole tensor.
        rtol, max_iter: CG tolerance and iteration cap (:func:`solve_spd`).
        state: the run's :class:`~.state.EngineState` for the engine calls.
        initial: (N, 4) starting guess (q, p) of the forward CG solve, e and e·Å (a warm start, e.g. the
            last MD step's solution); None: cold start.  Changes iterations only, not the result.
        preconditioner: ``"kspace"`` (default: the Qeq k-space preconditioner of
            :mod:`.kspace_preconditioner` on the charge block of periodic structures, Jacobi elsewhere),
            ``"blocks"`` (that within the joint charge–dipole near-field blocks of
            :func:`.block_preconditioner.joint_near_field_preconditioner`, also for open structures; the
            model default) or ``"jacobi"`` (diagonal only).  With a ``state`` the preconditioner is kept for
            later solves at nearly the same geometry (:mod:`.preconditioner_memory`).
        statistics: records the CG iteration counts (forward, then adjoint solves).
        method: reciprocal sums of T and G for periodic structures and slabs: ``"ewald"``, ``"pme"`` or
            ``"auto"`` (PME from :data:`~.coulomb.PME_MIN_ATOMS` atoms per structure, as the engine).
        deferred: MD and inference: solve without a graph and differentiate the energy by
            Hellmann–Feynman (no adjoint solve for forces); charge and dipole derivatives, and second
            derivatives, are computed exactly when a backward pass asks for them (:class:`_DeferredJoint`).
            Results equal the default path's to the CG tolerance.

    Returns:
        charges (N,) e, induced dipoles (N, 3) e·Å and energies (B,) eV,
        E(q*, p*) + (Σ q_i* r_i)·E_ext.  Differentiable (first and second
        derivatives) in χ, J, α, positions, cell, σ, Q and E_ext.

    Raises:
        ValueError: J ≤ 0, α outside [0, 1/c), σ ≤ 0.
        NotImplementedError: a partly periodic structure other than a slab.
    """
    smearing = torch.as_tensor(smearing, dtype=positions.dtype, device=positions.device)
    if not float(smearing.detach()) > 0:
        raise ValueError(f"joint charge-dipole equilibration needs Gaussian charges: smearing must be > 0 Å, got {float(smearing)}.")
    if not bool((hardness > 0).all()):
        raise ValueError("hardness J must be > 0 eV/e² for every atom (the energy must be convex).")
    bound = float(catastrophe_free_polarizability(smearing.detach()))
    if not bool(((polarizability >= 0) & (polarizability < bound)).all()):
        raise ValueError(
            f"polarisabilities must lie in [0, {bound:.4g}) e·Å²/V (below 1/c at σ = {float(smearing):.3g} Å, "
            "or the dipoles diverge); lower α or raise the smearing."
        )
    slab = pbc[:, 0] & pbc[:, 1] & ~pbc[:, 2]
    partial = pbc.any(dim=1) & ~pbc.all(dim=1) & ~slab
    if bool(partial.any()):
        raise NotImplementedError(
            f"joint charge-dipole equilibration supports open, fully periodic and slab (pbc = (True, True, False)) "
            f"structures; got pbc = {pbc[partial][0].tolist()}. Put the open direction third (a slab) or make the "
            "structure open or fully periodic."
        )
    if preconditioner not in JOINT_PRECONDITIONERS:
        raise ValueError(f"joint equilibration preconditioner must be one of {JOINT_PRECONDITIONERS}, got {preconditioner!r}.")
    if method not in DIPOLE_METHODS:
        raise ValueError(f"joint equilibration method must be one of {DIPOLE_METHODS}, got {method!r}.")
    if initial is not None and initial.shape != (positions.shape[0], 4):
        raise ValueError(f"initial must be (N, 4) charges and dipoles, got shape {tuple(initial.shape)}.")
    field = positions.new_zeros(cell.shape[0], 3) if external_field is None else external_field.to(positions.dtype)
    settings = _JointSettings(pbc, batch, accuracy, rtol, max_iter, state, preconditioner, statistics, method)
    inputs = (electronegativity, hardness, polarizability, positions, cell, smearing, total_charge, field)
    if deferred:
        packed, energy = _DeferredJoint.apply(settings, None if initial is None else initial.detach(), *inputs)
        # The charges' field term is not stationary in q: added here, it differentiates through the charges.
        field_term = packed[:, 0] * (positions * field[batch]).sum(1)
        return packed[:, 0], packed[:, 1:], energy + energy.new_zeros(energy.shape).index_add(0, batch, field_term)
    problem = settings.problem(inputs)
    solution = settings.solve(problem, inputs, initial)
    charges, dipoles, energy = settings.energy(problem, solution, inputs)
    return charges, dipoles, energy


class _Problem:
    """The scaled KKT system of one call: operator, right-hand side and the tensors H depends on."""

    def __init__(self, settings: "_JointSettings", inputs: tuple[torch.Tensor, ...], eager_mesh: bool = True):
        chi, hardness, alpha, positions, cell, smearing, total_charge, field = inputs
        n_structures = cell.shape[0]
        self.scale = alpha.clamp_min(1e-30).sqrt()  # finite gradients at α = 0
        self.operator = _JointOperator(settings.pbc, settings.batch, n_structures, settings.accuracy, settings.state,
                                       settings.method)
        self.operator.charges.product_precision = product_precision(positions.dtype, settings.rtol)
        self.operator.eager_mesh = eager_mesh
        self.operator.prepare(positions, cell, smearing)
        self.atom_field = field[settings.batch]
        self.rhs = torch.cat(
            [(-chi + (positions * self.atom_field).sum(1))[:, None], self.scale[:, None] * self.atom_field], 1
        )
        self.diagonal = torch.cat(
            [(hardness + gaussian_self_hardness(smearing))[:, None], torch.ones_like(self.atom_field)], 1
        )
        self.total = torch.cat([total_charge.to(positions.dtype)[:, None], positions.new_zeros(n_structures, 3)], 1)
        self.operators = (positions, cell, smearing, hardness, self.scale)


@dataclass(frozen=True)
class _JointSettings:
    """The non-tensor arguments of one joint solve."""

    pbc: torch.Tensor
    batch: torch.Tensor
    accuracy: float
    rtol: Optional[float]
    max_iter: int
    state: Optional[EngineState]
    preconditioner: str
    statistics: Optional[SolveStatistics]
    method: str

    def problem(self, inputs: tuple[torch.Tensor, ...], eager_mesh: bool = True) -> _Problem:
        return _Problem(self, inputs, eager_mesh)

    def solve(self, problem: _Problem, inputs: tuple[torch.Tensor, ...], initial: Optional[torch.Tensor]) -> torch.Tensor:
        """The scaled solution y = (q, p/√α), (N, 4), with implicit derivatives where the inputs carry gradients."""
        positions, cell, smearing = inputs[3], inputs[4], inputs[5]
        inverse = None
        if self.preconditioner == "blocks" or (self.preconditioner == "kspace" and bool(self.pbc.all(dim=1).any())):
            precision = problem.operator.charges.product_precision
            inverse = kept_preconditioner(
                f"joint/{self.preconditioner}/{precision}", self.state, positions, cell, self.pbc, self.batch,
                torch.cat([problem.diagonal, problem.scale[:, None]], 1), smearing, lambda: _joint_preconditioner(
                    positions, cell, self.pbc, self.batch, problem.diagonal.detach(), problem.scale.detach(), smearing,
                    precision, blocks=self.preconditioner == "blocks",
                ),
            )
        start = None
        if initial is not None:
            start = initial.detach().to(problem.rhs.dtype)
            scale = problem.scale.detach()
            unscaled = torch.where(scale > 1e-12, 1.0 / scale, torch.zeros_like(scale))
            start = torch.cat([start[:, :1], unscaled[:, None] * start[:, 1:]], 1)  # p -> x = p/√α
        constrained = torch.tensor([True, False, False, False], device=positions.device)
        return solve_spd(
            problem.operator, problem.rhs, problem.operators, batch=self.batch, total=problem.total,
            diagonal=problem.diagonal.detach(), rtol=self.rtol, max_iter=self.max_iter, constrained=constrained,
            initial=start, preconditioner=inverse, statistics=self.statistics,
        )

    def energy(
        self, problem: _Problem, solution: torch.Tensor, inputs: tuple[torch.Tensor, ...], stationary: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(charges (N,), dipoles (N, 3), energy (B,)) of the scaled solution: the module docstring's energy,
        or with ``stationary`` the minimised E(q*, p*) itself (the charges' field term not added back)."""
        positions = inputs[3]
        # Variational form ½ yᵀHy − bᵀy: solver errors enter the energy at second order only.
        atom_energy = -(solution * problem.rhs).sum(1)
        charges = solution[:, 0]
        if not stationary:
            atom_energy = atom_energy + charges * (positions * problem.atom_field).sum(1)
        energy = problem.operator.half_quadratic(solution, *problem.operators).index_add(0, self.batch, atom_energy)
        return charges, problem.scale[:, None] * solution[:, 1:], energy


class _DeferredJoint(torch.autograd.Function):
    """(q, p) packed (N, 4) and the minimised E(q*, p*) (B,), derivatives deferred to the backward pass.

    Forward: one CG solve without a graph and E at the fixed solution y with the graph of H(θ) only.
    Because E is stationary in y on the constraint set, a first-order backward of E alone (forces) is
    the Hellmann–Feynman derivative ∂E/∂θ at fixed y plus −μ dQ/dθ (μ the multiplier): no residual
    product, no adjoint solve.  A backward that builds a graph (Hessians) or that reaches the charges or
    dipoles (Born charges, dipole losses) re-runs the exact implicit path from y (0 CG iterations).
    """

    @staticmethod
    def forward(ctx: Any, settings: _JointSettings, initial: Optional[torch.Tensor], *inputs: torch.Tensor):
        ctx.settings = settings
        ctx.set_materialize_grads(False)
        needs = tuple(ctx.needs_input_grad[2:])
        aliases = _aliases(inputs, needs)
        total_index = _JOINT_INPUTS.index("total_charge")
        with torch.enable_grad():
            problem = settings.problem(aliases, eager_mesh=False)
        with torch.no_grad():
            solution = settings.solve(problem, tuple(t.detach() for t in aliases), initial)
        fixed = solution.detach().clone().requires_grad_(needs[total_index])
        with torch.enable_grad() if any(needs) else torch.no_grad():
            charges, dipoles, energy = settings.energy(problem, fixed, aliases, stationary=True)
        ctx.recorded = (energy, aliases, fixed) if any(needs) else None
        packed = torch.cat([charges[:, None], dipoles], 1).detach()
        ctx.save_for_backward(packed, *inputs)
        return packed, energy.detach()

    @staticmethod
    def backward(ctx: Any, grad_solution: Optional[torch.Tensor], grad_energy: Optional[torch.Tensor]):
        settings: _JointSettings = ctx.settings
        solution, *saved = ctx.saved_tensors
        inputs, needs = tuple(saved), tuple(ctx.needs_input_grad[2:])
        none: tuple[None, ...] = (None, None)
        if not any(needs):
            return (*none, *([None] * len(inputs)))
        create = torch.is_grad_enabled()
        charges_needed = grad_solution is not None and (grad_solution.requires_grad or bool(grad_solution.any()))
        if create or charges_needed or ctx.recorded is None:
            if not create:  # a graph of its own: the caller's graph is not traversed (or freed) here
                inputs = _aliases(inputs, needs)
            with torch.enable_grad():
                problem = settings.problem(inputs)
                exact = settings.solve(problem, inputs, solution)  # from the forward's (q, p): 0 CG iterations
                charges, dipoles, energy = settings.energy(problem, exact, inputs, stationary=True)
                outputs, grads_out = [], []
                if grad_energy is not None:
                    outputs.append(energy)
                    grads_out.append(grad_energy)
                if grad_solution is not None:
                    outputs.append(torch.cat([charges[:, None], dipoles], 1))
                    grads_out.append(grad_solution)
                grads = torch.autograd.grad(
                    outputs, _wanted(inputs, needs), grads_out, create_graph=create, allow_unused=True
                )
            return (*none, *_scatter(grads, needs))
        energy, aliases, fixed = ctx.recorded
        if grad_energy is None:
            return (*none, *([None] * len(inputs)))
        total_index = _JOINT_INPUTS.index("total_charge")
        wanted = _wanted(aliases, needs) + ([fixed] if needs[total_index] else [])
        with torch.enable_grad():
            found_grads = list(torch.autograd.grad(energy, wanted, grad_energy, allow_unused=True, retain_graph=True))
        charge_gradient = found_grads.pop() if needs[total_index] else None
        by_input = _scatter(tuple(found_grads), needs)
        if charge_gradient is not None:
            per_structure_gradient = multiplier_gradient(charge_gradient[:, 0], settings.batch, inputs[total_index])
            direct = by_input[total_index]
            by_input[total_index] = per_structure_gradient if direct is None else direct + per_structure_gradient
        return (*none, *by_input)


#: The differentiable inputs of :class:`_DeferredJoint`, in order.
_JOINT_INPUTS = ("electronegativity", "hardness", "polarizability", "positions", "cell", "smearing", "total_charge",
                 "external_field")
