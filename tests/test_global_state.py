"""Tests must not leak global torch state into each other (nequip, mace side effects)."""

import os

import pytest
import torch

from latent_lr.backbone import isolated_global_state


@pytest.fixture(autouse=True)
def _restore_global_state():
    with isolated_global_state():
        yield


def test_isolated_global_state_restores_dtype_and_env():
    before = torch.get_default_dtype()
    had = os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    with isolated_global_state():
        torch.set_default_dtype(torch.float64 if before == torch.float32 else torch.float32)
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    assert torch.get_default_dtype() == before
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == had
