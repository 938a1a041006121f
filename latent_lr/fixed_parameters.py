"""Physics mode: give a long-range module known per-element parameters instead of learned ones.

:func:`fix_element_parameters` zeroes the output layers of the selected heads'
MLPs (so the environment no longer enters) and sets their per-element
baselines so that every atom of element Z gets exactly the given latent charge,
Qeq electronegativity χ and hardness J, or polarisability volume α'.  The
module then is a classical model (point charges, Qeq, or polarisable sites)
driven by the same solvers as the trained model, for checks against analytic
physics (tests/test_conductors_insulators.py) or as a baseline.  The sign gauge
``charge_sign`` is set to +1 so the values mean what they say.

Units: charges e, χ eV/e, J eV/e² (beyond the Gaussian self-energy, above
:data:`latent_lr.qeq.HARDNESS_FLOOR`), α' Å³ (α = α'/k_e in e·Å²/V; the
self-consistent model still applies its smooth cap α_max tanh(α/α_max), read
the used values from the ``polarizabilities`` output).
Elements not given keep their baseline, without the (zeroed) MLP term.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
from torch import nn

from .charges import ChargeHead
from .long_range import LongRangeModule
from .model import LongRangeModel
from .qeq import QeqChargeHead
from .spin_channel import SpinChargeHead


def _inverse_softplus(value: float) -> float:
    return value + math.log(-math.expm1(-value))


def _zero_output_layer(mlp: nn.Module) -> None:
    layer = mlp[-1] if isinstance(mlp, nn.Sequential) else mlp
    assert isinstance(layer, nn.Linear), "feature_mlp ends with a Linear layer"
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def _set_baseline(baseline: Optional[nn.Embedding], values: Mapping[int, float], what: str) -> None:
    if baseline is None:
        raise ValueError(f"fixing {what} needs per-element baselines: build the module with element_baseline=True.")
    for number, value in values.items():
        if not 0 <= int(number) < baseline.num_embeddings:
            raise ValueError(f"{what}: atomic number {number} is outside 0..{baseline.num_embeddings - 1}.")
        baseline.weight[int(number)] = value


def fix_element_parameters(
    module: LongRangeModule | LongRangeModel,
    *,
    charges: Optional[Mapping[int, float]] = None,
    electronegativity: Optional[Mapping[int, float]] = None,
    hardness: Optional[Mapping[int, float]] = None,
    polarizability: Optional[Mapping[int, float]] = None,
) -> LongRangeModule:
    """Replace learned per-atom parameters by fixed per-element values (in place; returns the module).

    Args:
        module: a :class:`LongRangeModule` or a model holding one (``model.long_range``).
        charges: {Z: q (e)} raw latent charges (``charge_model="latent"``; the total-charge
            constraint still applies).
        electronegativity: {Z: χ (eV/e)} and hardness: {Z: J (eV/e²)} (``charge_model="qeq"``).
        polarizability: {Z: α' (Å³)} (``polarizability`` other than ``"none"``).
    """
    long_range = module.long_range if isinstance(module, LongRangeModel) else module
    if long_range is None:
        raise ValueError("this model has no long-range module (short-range only): nothing to fix.")
    head = long_range.charge_head
    with torch.no_grad():
        long_range.charge_sign.fill_(1.0)
        if charges is not None:
            if not isinstance(head, ChargeHead):
                raise ValueError("charges= fixes latent charges; this module uses charge_model='qeq' (give electronegativity=/hardness=).")
            if isinstance(head, SpinChargeHead):
                raise ValueError(
                    "charges= cannot fix the charges of a spin_channel module (its learned spin weights still move "
                    "them); build the module with spin_channel=False."
                )
            _zero_output_layer(head.mlp)
            _set_baseline(head.element_baseline, charges, "charges")
        if electronegativity is not None or hardness is not None:
            if not isinstance(head, QeqChargeHead):
                raise ValueError("electronegativity=/hardness= need charge_model='qeq'; this module uses latent charges.")
            if electronegativity is not None:
                _zero_output_layer(head.electronegativity_net)
                _set_baseline(head.electronegativity_baseline, electronegativity, "electronegativity")
            if hardness is not None:
                low = {z: j for z, j in hardness.items() if not j > head.hardness_floor}
                if low:
                    raise ValueError(
                        f"hardness must exceed the head's floor {head.hardness_floor} eV/e², got {low}; "
                        "J → floor is the conductor limit; a hardness just above the floor (e.g. 0.2) is already metallic."
                    )
                _zero_output_layer(head.hardness_net)
                raw = {z: _inverse_softplus(j - head.hardness_floor) for z, j in hardness.items()}
                _set_baseline(head.hardness_baseline, raw, "hardness")
        if polarizability is not None:
            polar = long_range.polarizability_head
            if polar is None:
                raise ValueError("polarizability= needs a module built with polarizability='one_step' or 'self_consistent'.")
            small = {z: a for z, a in polarizability.items() if not a > 0}
            if small:
                raise ValueError(f"polarisability volumes must be > 0 Å³, got {small}.")
            _zero_output_layer(polar.mlp)
            _set_baseline(polar.element_baseline, {z: _inverse_softplus(a) for z, a in polarizability.items()}, "polarizability")
    return long_range
