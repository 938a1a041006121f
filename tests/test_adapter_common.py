"""The shared adapter helpers and the Backbone contract, against independent references."""

import ast
import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.neighborlist import neighbor_list

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.adapters import common
from latent_lr.adapters.radial import RadialBackbone
from latent_lr.backbone import Backbone, detect_backbone

PACKAGE = Path(latent_lr.__file__).parent


def test_edge_shifts_give_ase_distance_vectors_in_a_triclinic_cell():
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    atoms.cell[0, 1], atoms.cell[2, 0] = 0.5, -0.3
    atoms.rattle(0.1, seed=2)
    i, j, shifts, vectors = neighbor_list("ijSD", atoms, 4.0)
    positions = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array)[None].repeat(2, 1, 1)
    structure = torch.ones(len(i), dtype=torch.long)  # every edge in structure 1 of 2 copies
    got = positions[j] - positions[i] + common.edge_shifts(torch.tensor(shifts), cell, structure)
    np.testing.assert_allclose(got.numpy(), vectors, atol=1e-12)


def test_scalar_slices_pick_only_even_scalars():
    Irrep = namedtuple("Irrep", "l p dim")
    scalar, odd_scalar, vector = Irrep(0, 1, 1), Irrep(0, -1, 1), Irrep(1, -1, 3)
    layout = [(2, scalar), (1, vector), (3, scalar), (1, odd_scalar)]  # widths 2, 3, 3, 1
    assert common.scalar_slices(layout) == [slice(0, 2), slice(5, 8)]
    # two concatenated blocks of width 9 each
    assert common.scalar_index([layout, layout]).tolist() == [0, 1, 5, 6, 7, 9, 10, 14, 15, 16]


def test_scalar_slices_of_real_e3nn_irreps():
    o3 = pytest.importorskip("e3nn.o3")
    irreps = o3.Irreps("4x0e + 2x1o + 1x0o + 3x0e + 1x2e")
    features = irreps.randn(5, -1)
    parts = common.scalar_slices(irreps)
    invariant = torch.cat([features[:, part] for part in parts], dim=1)
    rotation = o3.rand_matrix()
    turned = features @ irreps.D_from_matrix(-rotation).T  # a rotation with reflection
    np.testing.assert_allclose(torch.cat([turned[:, p] for p in parts], 1).numpy(), invariant.numpy(), atol=1e-6)
    assert invariant.shape[1] == 7


def test_species_lookup_and_element_table():
    table = common.species_lookup([8, 1, 6])
    assert table.shape == (119,) and table[[8, 1, 6]].tolist() == [0, 1, 2]
    assert int((table >= 0).sum()) == 3 and table[2].item() == -1
    assert common.species_lookup([11, 17], [4, 2])[[11, 17]].tolist() == [4, 2]
    assert common.chemical_symbol(17) == "Cl" and common.atomic_number("Na") == 11
    assert common.is_element_symbol("Og") and not common.is_element_symbol("X")
    with pytest.raises(ValueError, match="not an element"):
        common.chemical_symbol(119)
    with pytest.raises(ValueError, match="not elements"):
        common.species_lookup([0])


def test_captured_output_collects_and_removes_its_hook():
    layer = torch.nn.Linear(3, 2)
    model = torch.nn.Sequential(layer, torch.nn.Tanh())
    x = torch.randn(4, 3)
    with common.captured_output(layer) as outputs:
        model(x)
    assert len(outputs) == 1 and torch.equal(outputs[0], x @ layer.weight.T + layer.bias)
    model(x)
    assert len(outputs) == 1 and not layer._forward_hooks


def test_to_json_writes_constructor_arguments_as_json():
    value = {"act": torch.nn.functional.silu, "cls": torch.nn.Linear, "e0": np.array([1.5, 2.0]),
             "t": torch.tensor([3]), "n": np.int64(4), "tup": (1, (2, np.float32(0.5)))}
    converted = common.to_json(value)
    assert json.loads(json.dumps(converted)) == {
        "act": "silu", "cls": "Linear", "e0": [1.5, 2.0], "t": [3], "n": 4, "tup": [1, [2, 0.5]]
    }
    assert common.to_json(("a", "b"), as_string=(tuple,)) == "('a', 'b')"
    with pytest.raises(ValueError, match="must be JSON values"):
        common.require_json({"x": object()}, "options")


def test_contract_defaults():
    host = latent_lr.RadialPotential([1, 8])
    adapter = RadialBackbone(host)
    assert adapter.options() == {} and adapter.known_elements == [1, 8]
    with pytest.raises(ValueError, match=r"\[6\] are unknown to this built-in radial model"):
        adapter.check_elements(torch.tensor([1, 6, 8]))
    with pytest.raises(ValueError, match="the radial adapter has no pretrained models"):
        RadialBackbone.pretrained_host("anything")
    rebuilt = RadialBackbone.from_config({"host": adapter.host_config(), "options": adapter.options()})
    assert isinstance(rebuilt, RadialBackbone) and rebuilt.host_config() == adapter.host_config()
    assert Backbone(host).known_elements is None  # no restriction by default
    Backbone(host).check_elements(torch.tensor([118]))


def test_file_without_adapter_options_still_loads(tmp_path):
    """Files written before ``adapter_options`` was saved load as before."""
    torch.manual_seed(0)
    model = latent_lr.wrap(latent_lr.RadialPotential([1, 8]).double()).eval()
    latent_lr.save(model, tmp_path / "new.pt")
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    assert payload["config"]["adapter_options"] == {}
    del payload["config"]["adapter_options"]
    torch.save(payload, tmp_path / "old.pt")
    from ase.build import molecule

    data = AtomsBatch.from_atoms(molecule("H2O"))
    assert torch.equal(latent_lr.load(tmp_path / "old.pt").eval()(data)["energy"], model(data)["energy"])


def test_detect_backbone_asks_recognises_and_imports_no_backbone_package():
    code = (
        "import sys, latent_lr\n"
        "from latent_lr.backbone import detect_backbone\n"
        "assert detect_backbone(latent_lr.RadialPotential([1])) == 'radial'\n"
        "try:\n"
        "    detect_backbone(__import__('torch').nn.Linear(1, 1))\n"
        "except ValueError as error:\n"
        "    assert 'cannot tell which backbone' in str(error)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "imported = [n for n in ('mace', 'nequip', 'chgnet', 'cace', 'e3nn') if n in sys.modules]\n"
        "assert not imported, imported\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _function_level_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.level or (inner.module or "").startswith("latent_lr")):
                    found.append(f"{path.name}:{inner.lineno}")
    return found


def test_no_hidden_import_cycle_between_core_and_adapters():
    """Adapters import the core at top level; core modules never import adapters."""
    adapters = sorted((PACKAGE / "adapters").glob("*.py"))
    assert not [hit for path in [PACKAGE / "backbone.py", *adapters] for hit in _function_level_imports(path)]
    for path in PACKAGE.glob("*.py"):
        if path.name == "__init__.py":
            continue  # the package namespace re-exports RadialPotential
        tree = ast.parse(path.read_text())
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if "adapters" in n or "radial" in n], path.name
