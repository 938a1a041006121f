"""Every kind of bad input to coulomb_energy raises a clear error, never a NaN."""

import warnings

import pytest
import torch

from latent_lr import coulomb_energy

F64 = torch.float64


def water():
    positions = torch.tensor([[0.0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], dtype=F64)
    return positions, torch.tensor([-0.8, 0.4, 0.4], dtype=F64)


CASES = {
    "nan positions": (lambda p, q: (p.index_fill(0, torch.tensor([1]), float("nan")), q, {}), "NaN"),
    "inf charges": (lambda p, q: (p, q.index_fill(0, torch.tensor([0]), float("inf")), {}), "NaN or inf"),
    "charges shape": (lambda p, q: (p, q[:2], {}), "shape"),
    "positions shape": (lambda p, q: (p[:, :2], q, {}), "shape"),
    "integer positions": (lambda p, q: (p.long(), q, {}), "dtype"),
    "mixed dtypes": (lambda p, q: (p, q.float(), {}), "dtype"),
    "unsorted batch": (lambda p, q: (p, q, {"batch": torch.tensor([1, 0, 0])}), "sorted"),
    "gap in batch": (lambda p, q: (p, q, {"batch": torch.tensor([0, 0, 2]), "cell": torch.eye(3, dtype=F64).repeat(3, 1, 1) * 10, "pbc": True}), "zero atoms"),
    "empty structure via cell count": (lambda p, q: (p, q, {"cell": torch.eye(3, dtype=F64).repeat(2, 1, 1) * 10, "pbc": True}), "zero atoms"),
    "no atoms": (lambda p, q: (p[:0], q[:0], {}), "zero atoms"),
    "singular cell": (lambda p, q: (p, q, {"cell": torch.tensor([[5.0, 0, 0], [10.0, 0, 0], [0, 0, 5.0]], dtype=F64), "pbc": True}), "singular"),
    "tiny cell": (lambda p, q: (p * 0.01, q, {"cell": torch.eye(3, dtype=F64) * 0.1, "pbc": True}), "too small"),
    "direct on periodic": (lambda p, q: (p, q, {"cell": torch.eye(3, dtype=F64) * 10, "pbc": True, "method": "direct"}), "open-boundary"),
    "ewald on open": (lambda p, q: (p, q, {"method": "ewald"}), "periodic"),
    "unknown method": (lambda p, q: (p, q, {"method": "p3m"}), "method"),
    "overlapping atoms": (lambda p, q: (p.index_copy(0, torch.tensor([1]), p[:1]), q, {}), "overlap"),
    "overlapping periodic image": (lambda p, q: (p.index_copy(0, torch.tensor([1]), p[:1] + 10.0), q, {"cell": torch.eye(3, dtype=F64) * 10, "pbc": True}), "overlap"),
    "negative smearing": (lambda p, q: (p, q, {"smearing": -1.0}), "smearing"),
    "bad accuracy": (lambda p, q: (p, q, {"cell": torch.eye(3, dtype=F64) * 10, "pbc": True, "accuracy": 2.0}), "accuracy"),
    "pbc shape": (lambda p, q: (p, q, {"pbc": torch.tensor([True, True])}), "pbc"),
    "cell shape": (lambda p, q: (p, q, {"cell": torch.eye(2, dtype=F64), "pbc": True}), "cell"),
    "batch shape": (lambda p, q: (p, q, {"batch": torch.tensor([0, 0])}), "batch"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_value_error_naming_the_problem(case):
    make, pattern = CASES[case]
    positions, charges, options = make(*water())
    with pytest.raises(ValueError, match=pattern):
        coulomb_energy(positions, charges, **options)


def test_periodicity_along_one_axis_says_it_is_not_supported():
    positions, charges = water()
    with pytest.raises(NotImplementedError, match="partial periodicity is not supported"):
        coulomb_energy(positions, charges, cell=torch.eye(3, dtype=F64) * 10, pbc=torch.tensor([True, False, False]))


def test_smeared_close_atoms_give_finite_energy_and_forces():
    positions, charges = water()
    positions = positions.clone()
    positions[1] = positions[0] + 1e-3
    positions.requires_grad_(True)
    energy = coulomb_energy(positions, charges, smearing=1.0)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    assert torch.isfinite(energy).all() and torch.isfinite(gradient).all()


def test_float32_with_an_unreachable_accuracy_warns():
    cell = torch.eye(3, dtype=torch.float32) * 6.0
    positions = torch.tensor([[0.0, 0.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float32)
    charges = torch.tensor([1.0, -1.0], dtype=torch.float32)
    with pytest.warns(UserWarning, match="round-off"):
        coulomb_energy(positions, charges, cell=cell, pbc=True, accuracy=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coulomb_energy(positions, charges, cell=cell, pbc=True, accuracy=1e-4)
        coulomb_energy(positions.double(), charges.double(), cell=cell.double(), pbc=True, accuracy=1e-6)
