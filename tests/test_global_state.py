"""Tests must not leak global torch state into each other (nequip, mace side effects)."""

import os

import pytest
import torch

from latent_lr.backbone import isolated_global_state


@pytest.fixture(autouse=True)
def _restore_global_state():
    with isolated_global_state():
        yield


def test_isolated_global_state_restores_dtype_and_precision_switches():
    before = torch.get_default_dtype()
    precision = torch.get_float32_matmul_precision()
    with isolated_global_state():
        torch.set_default_dtype(torch.float64 if before == torch.float32 else torch.float32)
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
    assert torch.get_default_dtype() == before
    assert torch.get_float32_matmul_precision() == precision


def test_isolated_global_state_keeps_the_variable_mace_sets_on_import(monkeypatch):
    """``import mace`` sets it and mace's own loaders rely on it (test_host_tools_interference runs the import orders)."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with isolated_global_state():
        os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
