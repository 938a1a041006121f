"""Fixtures shared by the host-file tests: a MACE model file as ``mace_run_train`` writes it."""

import numpy as np
import pytest
import torch

from latent_lr.backbone import isolated_global_state

#: Elements of the test hosts (H, C, O, Na, Cl).
SPECIES = [1, 6, 8, 11, 17]


def build_mace_like_mace_run_train():
    """A small ScaleShiftMACE built as mace_run_train builds one (float64 default dtype, E0s, scale and shift)."""
    import mace.modules
    from e3nn import o3

    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        torch.manual_seed(1)
        return mace.modules.ScaleShiftMACE(
            r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=mace.modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=mace.modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=len(SPECIES), hidden_irreps=o3.Irreps("16x0e + 16x1o"),
            MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.array([-13.6, -1030.0, -2040.0, -4400.0, -12500.0]),
            avg_num_neighbors=12.0, atomic_numbers=SPECIES, correlation=2, gate=torch.nn.functional.silu,
            atomic_inter_scale=1.3, atomic_inter_shift=-0.2,
        )


@pytest.fixture(scope="module")
def mace_file(tmp_path_factory):
    """``torch.save(model, path)`` of a small ScaleShiftMACE, what mace_run_train does with its model."""
    pytest.importorskip("mace")
    path = tmp_path_factory.mktemp("mace") / "host.model"
    torch.save(build_mace_like_mace_run_train(), path)  # what mace_run_train does with its model
    return path
