"""No interference: after latent-lr wraps a host from its file, the backbone's own loaders still work, in any import order.

Each order runs in a fresh interpreter (imports happen once per process).  The
reference for the environment is what importing the backbone's own tools does
on its own; latent-lr must add nothing to it, and must leave torch's default
dtype alone.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_host_files import write_nequip_checkpoint

pytest.importorskip("mace")
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS_ONLY_VARIABLE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # set by import mace; mace's loaders rely on it

PRELUDE = """
import json, os, sys
start_env = dict(os.environ)
"""
MACE_CALCULATOR = """
from mace.calculators import MACECalculator
from ase.build import molecule
atoms = molecule("CH3CH2OH")
atoms.calc = MACECalculator(model_paths=sys.argv[1], device="cpu", default_dtype="float64")
result["mace"] = float(atoms.get_potential_energy())
"""
WRAP = """
import latent_lr
from ase.build import molecule
model = latent_lr.wrap(sys.argv[1], long_range=False).eval()
result["ours"] = float(latent_lr.Calculator(model).get_potential_energy(molecule("CH3CH2OH")))
"""
EPILOGUE = """
import torch
result["dtype"] = str(torch.get_default_dtype())
result["env_added"] = sorted(set(os.environ) - set(start_env))
result["env_changed"] = sorted(k for k in start_env if os.environ.get(k) != start_env[k])
print(json.dumps(result))
"""
ORDERS = {
    # the user imports mace's calculator first, then latent-lr wraps, then the calculator loads the file
    "mace first": "import mace.calculators\nresult = {}\n" + WRAP + MACE_CALCULATOR,
    # latent-lr first, the user imports mace themselves before wrapping
    "latent-lr first": "import latent_lr\nimport mace.modules\nresult = {}\n" + WRAP + MACE_CALCULATOR,
    # mace is first imported by latent-lr's adapter (inside its state isolation), then the user's calculator
    "mace first imported by the adapter": "result = {}\n" + WRAP + MACE_CALCULATOR,
    # reference: mace's own tools without latent-lr
    "mace alone": "import mace.calculators\nresult = {}\n",
}


def run(script: str, *args: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != WEIGHTS_ONLY_VARIABLE}  # this process may have imported mace
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(PRELUDE + script + EPILOGUE), *args],
                               capture_output=True, text=True, cwd=ROOT, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def alone():
    return run(ORDERS["mace alone"])


@pytest.mark.parametrize("order", [o for o in ORDERS if o != "mace alone"])
def test_mace_calculator_loads_its_file_after_a_wrap(order, mace_file, alone):
    result = run(ORDERS[order], str(mace_file))
    assert result["mace"] == pytest.approx(result["ours"], abs=1e-10)
    assert result["env_added"] == alone["env_added"] == [WEIGHTS_ONLY_VARIABLE]
    assert result["env_changed"] == alone["env_changed"] == []
    assert result["dtype"] == alone["dtype"] == "torch.float32"


def test_latent_lr_alone_leaks_no_dtype_or_environment(mace_file):
    result = run("result = {}\n" + WRAP, str(mace_file))
    assert result["dtype"] == "torch.float32"
    assert result["env_added"] == [WEIGHTS_ONLY_VARIABLE]  # import mace's own, kept for mace's loaders
    assert result["env_changed"] == []


def test_nequip_and_chgnet_own_loaders_work_after_a_wrap(tmp_path):
    pytest.importorskip("nequip")
    pytest.importorskip("chgnet")
    checkpoint = write_nequip_checkpoint(tmp_path / "last.ckpt")
    script = """
import latent_lr
from ase.build import bulk
result = {}
model = latent_lr.wrap(sys.argv[1]).eval()
latent_lr.Calculator(model).get_potential_energy(bulk("NaCl", "rocksalt", a=5.6))
chgnet_model = latent_lr.wrap("chgnet").eval()
from latent_lr.adapters import nequip_host
from nequip.model import ModelFromCheckpoint
with nequip_host._nequip_builder_state():
    own = ModelFromCheckpoint(sys.argv[1])["sole_model"]
result["nequip_same_weights"] = all(
    (a == b).all().item() for a, b in zip(own.state_dict().values(), model.backbone.host.state_dict().values()))
import contextlib, io
from chgnet.model import CHGNet
from pymatgen.io.ase import AseAtomsAdaptor
with contextlib.redirect_stdout(io.StringIO()):
    chgnet = CHGNet.load(model_name="0.3.0", use_device="cpu", verbose=False)
result["chgnet_energy"] = float(chgnet.predict_structure(AseAtomsAdaptor.get_structure(bulk("NaCl", "rocksalt", a=5.6)))["e"])
"""
    result = run(script, str(checkpoint))
    assert result["nequip_same_weights"] is True
    assert -4.0 < result["chgnet_energy"] < -3.0  # eV/atom of rock salt NaCl from CHGNet 0.3.0
    assert result["dtype"] == "torch.float32" and result["env_changed"] == []
