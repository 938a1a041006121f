"""The CACE adapter, tested against ``tests/cace_contract.py``.

CACE cannot be installed here, so the host is ``CaceContractModel``: a module
that reproduces CACE's documented input dict, representation output
(5-D ``node_feats``), output-module chain and ``NodeEncoder`` quirks, not its
physics.  These tests check the adapter's side of that contract: geometry
rebuilt from the (strained) cell, derivatives of the total energy, symmetry,
locality, save/load and element checks.

References: CACE's own forward (energy, forces, stress of the stand-in),
finite differences (ASE), rotations, the acoustic sum rule.
"""

import copy
import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from cace_contract import Atomwise, CaceContractModel, Forces, cace_feature_dim, make_cace_batch
from scipy.spatial.transform import Rotation
from torch import nn

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.backbone import isolated_global_state

ZS = [1, 6, 7, 8, 11, 17]
CUTOFF = 3.5
SETTINGS = dict(
    zs=ZS, cutoff=CUTOFF, n_atom_basis=2, n_radial_basis=4, max_l=2, max_nu=3,
    num_message_passing=1, n_hidden=8, calc_stress=True,
)


def make_host(**overrides):
    return CaceContractModel(**{**SETTINGS, **overrides}).double()


@pytest.fixture(scope="module")
def host():
    return make_host()


@pytest.fixture(scope="module")
def model(host):
    torch.manual_seed(0)  # the long-range head's initial weights
    return latent_lr.wrap(host, backbone="cace").eval()


def rattled_salt():
    crystal = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    crystal.cell[0, 1] = 0.5  # triclinic
    crystal.rattle(0.1, seed=3)
    return crystal


def cace_forward(host, structures):
    """The stand-in's own CACE-style forward, in float64 as CACE expects."""
    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        batch = make_cace_batch(structures, host.representation.cutoff, dtype=torch.float64, backend="vesin")
        return host(batch)


def test_wrap_is_one_line_and_host_energy_is_caces_own(model, host):
    structures = [molecule("CH3CH2OH"), rattled_salt()]
    default_dtype = torch.get_default_dtype()
    out = model(AtomsBatch.from_atoms(structures))
    assert torch.get_default_dtype() == default_dtype
    assert model.backbone.energy_key == "CACE_energy"
    assert model.backbone.feature_dim == cace_feature_dim(host.representation)
    assert model.backbone.cutoff == CUTOFF
    assert torch.allclose(out["energy"], out["host_energy"] + out["long_range_energy"])
    assert (out["long_range_energy"].abs() > 0).all()
    reference = cace_forward(host, structures)
    assert torch.allclose(out["host_energy"], reference["CACE_energy"], rtol=0, atol=1e-12)
    short = latent_lr.wrap(host, backbone="cace", long_range=False).eval()
    twin = short(AtomsBatch.from_atoms(structures), compute_stress=True)
    assert torch.allclose(twin["forces"], reference["CACE_forces"], rtol=0, atol=1e-12)
    assert torch.allclose(twin["stress"][1], reference["CACE_stress"][1], rtol=0, atol=1e-12)


def test_host_dtype_is_the_default_dtype_inside_the_call(host):
    # CACE builds its element one-hot in the default dtype: calling the float64
    # host directly under a float32 default fails; through the adapter it works.
    with isolated_global_state():
        torch.set_default_dtype(torch.float32)
        with pytest.raises(RuntimeError):
            host(make_cace_batch(molecule("H2O"), CUTOFF, dtype=torch.float64, backend="vesin"))
        model = latent_lr.wrap(host, backbone="cace").eval()
        model(AtomsBatch.from_atoms(molecule("H2O")))
        assert torch.get_default_dtype() == torch.float32
    single = latent_lr.wrap(copy.deepcopy(host).float(), backbone="cace").eval()
    a = single(AtomsBatch.from_atoms(molecule("CH3CH2OH")))["host_energy"]
    b = cace_forward(host, [molecule("CH3CH2OH")])["CACE_energy"]
    assert a.dtype == torch.float32 and abs(a.item() - b.item()) < 1e-4


@pytest.mark.parametrize("atoms", [molecule("CH3CH2OH"), rattled_salt()], ids=["molecule", "triclinic"])
def test_forces_match_finite_differences(model, atoms):
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_forces(), calculate_numerical_forces(atoms, 1e-4), atol=1e-7)


def test_stress_matches_finite_strain_on_a_triclinic_cell(model):
    atoms = rattled_salt()
    atoms.calc = latent_lr.Calculator(model)
    np.testing.assert_allclose(atoms.get_stress(), calculate_numerical_stress(atoms, 1e-5), atol=1e-8)
    short = latent_lr.wrap(model.backbone, long_range=False).eval()
    host_stress = latent_lr.Calculator(short).get_stress(atoms)
    assert np.abs(atoms.get_stress() - host_stress).max() > 1e-7  # long range reaches the virial


def rotated(atoms, rotation):
    atoms = atoms.copy()
    atoms.positions = atoms.positions @ rotation.T
    if atoms.pbc.any():
        atoms.set_cell(atoms.cell.array @ rotation.T, scale_atoms=False)
    return atoms


@pytest.mark.parametrize("periodic", [False, True])
def test_rotation_invariance_and_equivariance(model, periodic):
    atoms = rattled_salt() if periodic else molecule("CH3CH2OH")
    rotation = Rotation.random(random_state=7).as_matrix()
    calc = latent_lr.Calculator(model)
    props = ["energy", "forces", "dipole", "bec", "charges"]
    calc.calculate(atoms, props)
    a = dict(calc.results)
    calc.reset()
    calc.calculate(rotated(atoms, rotation), props)
    b = dict(calc.results)
    assert b["energy"] == pytest.approx(a["energy"], abs=1e-9)
    np.testing.assert_allclose(b["charges"], a["charges"], atol=1e-10)
    np.testing.assert_allclose(b["forces"], a["forces"] @ rotation.T, atol=1e-9)
    np.testing.assert_allclose(b["dipole"], rotation @ a["dipole"], atol=1e-9)
    np.testing.assert_allclose(b["bec"], rotation @ a["bec"] @ rotation.T, atol=1e-9)


@pytest.mark.parametrize("charge", [0.0, 1.0])
def test_bec_acoustic_sum_rule_for_a_molecule(model, charge):
    atoms = molecule("CH3CH2OH")
    atoms.info["charge"] = charge
    out = model(AtomsBatch.from_atoms(atoms), compute_bec=True)
    assert out["charges"].sum().item() == pytest.approx(charge, abs=1e-10)
    np.testing.assert_allclose(out["bec"].sum(0).numpy(), charge * np.eye(3), atol=1e-10)


def test_long_range_reaches_beyond_the_host_cutoff(model):
    def pair(distance):
        atoms = molecule("H2O") + molecule("NH3")
        atoms.positions[3:] += [distance, 0.0, 0.0]
        return model(AtomsBatch.from_atoms(atoms), compute_forces=False)

    near, far = pair(3 * CUTOFF), pair(6 * CUTOFF)
    assert near["host_energy"].item() == pytest.approx(far["host_energy"].item(), abs=1e-10)
    assert abs(near["energy"].item() - far["energy"].item()) > 1e-6


def test_save_load_round_trip_is_exact(host, tmp_path):
    model = latent_lr.wrap(host, backbone="cace", adapter_options={"atomic_energies": {z: -z / 3 for z in ZS}})
    model.eval()
    path = tmp_path / "model.pt"
    latent_lr.save(model, path)
    config = model.config()["host"]
    assert json.loads(json.dumps(config)) == config
    assert config["kind"] == "class" and config["class"].endswith(":CaceContractModel")
    loaded = latent_lr.load(path).eval()
    assert isinstance(loaded.backbone.host, CaceContractModel)
    assert loaded.backbone.atomic_energies == model.backbone.atomic_energies
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()])
    a, b = model(data), loaded(data)
    assert torch.equal(a["energy"], b["energy"])
    assert torch.equal(a["forces"], b["forces"])
    assert torch.equal(a["stress"], b["stress"])


def test_unknown_element_is_a_clear_error(model, host):
    fluorine = molecule("CH3CH2OH")
    fluorine.numbers[0] = 9  # below max(zs): CACE itself raises a bare "out of range" error ...
    with pytest.raises(ValueError, match="out of range"):
        cace_forward(host, [fluorine])
    for atoms in (fluorine, Atoms("Au2", positions=[[0, 0, 0], [2.5, 0, 0]])):
        with pytest.raises(ValueError, match="unknown to this CACE model"):  # ... the adapter names them
            model(AtomsBatch.from_atoms(atoms))


def test_batched_prediction_equals_single(model):
    structures = [molecule("CH3CH2OH"), rattled_salt(), molecule("H2O")]
    batched = model(AtomsBatch.from_atoms(structures))
    singles = [model(AtomsBatch.from_atoms(s)) for s in structures]
    assert torch.allclose(batched["energy"], torch.cat([s["energy"] for s in singles]), atol=1e-10)
    assert torch.allclose(batched["forces"], torch.cat([s["forces"] for s in singles]), atol=1e-10)


def test_training_on_forces_reaches_the_cace_host():
    torch.manual_seed(1)
    model = latent_lr.wrap(make_host(), backbone="cace").train()
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()])
    model(data)["forces"].pow(2).mean().backward()  # double backward through the host
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ("representation.sender_embedding", "representation.receiver_embedding",
                 "output_modules.0.outnet.0.weight", "output_modules.0.outnet.1.weight"):
        assert grads[f"backbone.host.{name}"].abs().sum() > 0, name  # (the energy bias has no force)
    assert grads["long_range.charge_head.mlp.0.weight"].abs().sum() > 0


def test_atomic_energies_are_added_per_atom(host):
    atoms = molecule("CH3CH2OH")
    e0 = {1: -0.5, 6: -10.0, 7: -14.0, 8: -20.0, 11: -1.0, 17: -3.0}
    plain = latent_lr.wrap(host, backbone="cace").eval()
    shifted = latent_lr.wrap(host, backbone="cace", adapter_options={"atomic_energies": e0}).eval()
    data = AtomsBatch.from_atoms(atoms)
    difference = shifted(data)["host_energy"] - plain(data)["host_energy"]
    assert difference.item() == pytest.approx(sum(e0[z] for z in atoms.numbers), abs=1e-10)
    with pytest.raises(ValueError, match="no reference energy"):
        latent_lr.wrap(host, backbone="cace", adapter_options={"atomic_energies": {1: 0.0}})


class EwaldPotential(nn.Module):
    """Stands for CACE's own Ewald module; the adapter must never call it."""

    def __init__(self, feature_key="q", output_key="ewald_potential"):
        super().__init__()
        self.feature_key, self.output_key, self.model_outputs = feature_key, output_key, [output_key]

    def forward(self, data, **kwargs):
        raise AssertionError("CACE's Ewald branch must be skipped")


class FeatureAdd(nn.Module):
    """Stands for CACE's FeatureAdd (sums energies); here it reads the skipped Ewald output."""

    def __init__(self, feature_keys, output_key):
        super().__init__()
        self.feature_keys, self.output_key, self.model_outputs = feature_keys, output_key, [output_key]

    def forward(self, data, **kwargs):
        raise AssertionError("a module reading the Ewald output must be skipped")


def test_cace_long_range_branch_is_skipped_and_short_range_energy_found():
    host = make_host()
    width = host.representation.feature_dim
    short_range = Atomwise(width, n_hidden=8, output_key="SR_energy").double()
    charges = Atomwise(width, n_hidden=8, output_key="tot_q", per_atom_output_key="q").double()
    host.output_modules = nn.ModuleList([
        short_range,
        charges,
        EwaldPotential(),
        FeatureAdd(["SR_energy", "ewald_potential"], "CACE_energy"),
        Forces(energy_key="CACE_energy"),
    ])
    model = latent_lr.wrap(host, backbone="cace").eval()
    assert model.backbone.energy_key == "SR_energy"
    assert len(model.backbone.skipped_modules) == 3
    atoms = molecule("CH3CH2OH")
    out = model(AtomsBatch.from_atoms(atoms))
    with isolated_global_state():
        torch.set_default_dtype(torch.float64)
        features = host.representation(make_cace_batch(atoms, CUTOFF, dtype=torch.float64, backend="vesin"))
        expected = short_range(features)["SR_energy"]
    assert torch.allclose(out["host_energy"], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="not produced"):
        latent_lr.wrap(host, backbone="cace", adapter_options={"energy_key": "CACE_energy"})


def test_lazy_layers_are_built_by_a_dry_run_without_touching_the_rng():
    host = make_host()
    host.output_modules = nn.ModuleList([Atomwise(n_hidden=[6, 4], n_layers=3, output_key="CACE_energy",
                                                  add_linear_nn=True)])
    state = torch.random.get_rng_state()
    model = latent_lr.wrap(host, backbone="cace", long_range=False)  # the head would draw from the RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [layer.weight.dtype for layer in host.output_modules[0].outnet] == [torch.float64] * 3
    assert any(name.endswith("linear_nn.weight") for name, _ in model.named_parameters())


def test_combine_potential_and_unknown_hosts_get_clear_errors(host):
    class CombinePotential(nn.Module):
        def __init__(self, models):
            super().__init__()
            self.models = nn.ModuleList(models)

    with pytest.raises(ValueError, match="models\\[i\\]"):
        latent_lr.wrap(CombinePotential([host]), backbone="cace")
    with pytest.raises(ValueError, match="cannot tell which backbone"):
        latent_lr.wrap(host)  # the stand-in is not in a `cace` package: backbone= is needed


# ----------------------------------------------------------------------------
# Code path for hosts from the `cace` package, exercised with a throwaway stub
# ----------------------------------------------------------------------------


def install_stub_cace_package(monkeypatch):
    """Put a tiny fake ``cace`` package into ``sys.modules`` for one test.

    It has CACE's module paths, class names, constructor signatures and the
    attributes the adapter reads (``mp_norm_factor``, ``message_passing_list``,
    lazy ``Atomwise``/``MessageBchi``), with the stand-in's numerics underneath.
    It only exercises the adapter's branch for package hosts (recognition,
    ``host_config``/``build_host``, dry run); it says nothing about real CACE.
    """
    import math
    import sys
    import types

    import cace_contract

    names = ["cace", "cace.modules", "cace.models", "cace.models.atomistic",
             "cace.representations", "cace.representations.cace_representation"]
    stub = {name: types.ModuleType(name) for name in names}
    for name, module in stub.items():
        monkeypatch.setitem(sys.modules, name, module)

    def place(module_name, cls):
        cls.__module__ = module_name
        setattr(stub[module_name], cls.__name__, cls)
        return cls

    @lambda cls: place("cace.modules", cls)
    class BesselRBF(nn.Module):
        def __init__(self, cutoff, n_rbf=8, trainable=False):
            super().__init__()
            self.n_rbf = n_rbf
            weights = math.pi / cutoff * torch.linspace(1.0, n_rbf, n_rbf)
            if trainable:
                self.bessel_weights = nn.Parameter(weights)
            else:
                self.register_buffer("bessel_weights", weights)
            self.register_buffer("cutoff", torch.tensor(cutoff))

    @lambda cls: place("cace.modules", cls)
    class PolynomialCutoff(nn.Module):
        def __init__(self, cutoff, p=6):
            super().__init__()
            self.register_buffer("p", torch.tensor(float(p)))
            self.register_buffer("cutoff", torch.tensor(cutoff))

    @lambda cls: place("cace.modules", cls)
    class MessageBchi(nn.Module):
        def __init__(self, n_in=None, n_hidden=None, n_layers=1, activation=torch.nn.functional.silu,
                     residual=False, use_batchnorm=False, lxlylz_index=None):
            super().__init__()
            self.n_in, self.n_hidden, self.n_layers, self.activation = n_in, n_hidden, n_layers, activation
            self.residual, self.use_batchnorm = residual, use_batchnorm
            self.hnet = None if n_in is None else nn.Linear(n_in, 1)

    place("cace.modules", type("Atomwise", (cace_contract.Atomwise,), {}))
    place("cace.modules", type("Forces", (cace_contract.Forces,), {}))
    place("cace.modules", type("Preprocess", (cace_contract.Preprocess,), {}))

    @lambda cls: place("cace.representations.cace_representation", cls)
    class Cace(cace_contract.CaceContractRepresentation):
        def __init__(self, zs, n_atom_basis, cutoff, radial_basis, cutoff_fn, max_l, max_nu,
                     num_message_passing, type_message_passing=("M", "Ar", "Bchi"), args_message_passing=None,
                     embed_receiver_nodes=False, atom_embedding_random_seed=(42, 42), n_radial_basis=None,
                     avg_num_neighbors=10.0, device=None, timeit=False):
            super().__init__(zs, n_atom_basis=n_atom_basis, cutoff=cutoff,
                             n_radial_basis=n_radial_basis or radial_basis.n_rbf, max_l=max_l, max_nu=max_nu,
                             num_message_passing=num_message_passing, avg_num_neighbors=avg_num_neighbors)
            torch.manual_seed(atom_embedding_random_seed[0])  # CACE reseeds the global RNG here
            self.radial_basis, self.cutoff_fn = radial_basis, cutoff_fn
            self.mp_norm_factor = 1.0 / avg_num_neighbors**0.5
            self.node_embedding_sender = nn.Linear(len(zs), n_atom_basis, bias=False)
            self.node_embedding_receiver = (
                nn.Linear(len(zs), n_atom_basis, bias=False) if embed_receiver_nodes else self.node_embedding_sender
            )
            bchi = (args_message_passing or {}).get("Bchi", {})
            self.message_passing_list = nn.ModuleList(
                nn.ModuleList([None, None, MessageBchi(**bchi) if "Bchi" in type_message_passing else None])
                for _ in range(num_message_passing)
            )

    stub["cace.representations"].Cace = Cace

    @lambda cls: place("cace.models.atomistic", cls)
    class NeuralNetworkPotential(nn.Module):
        def __init__(self, representation=None, input_modules=None, output_modules=None,
                     postprocessors=None, do_postprocessing=False):
            super().__init__()
            self.representation = representation
            if input_modules is None:
                input_modules = [stub["cace.modules"].Preprocess()]
            self.input_modules = nn.ModuleList(input_modules)
            self.output_modules = nn.ModuleList(output_modules)
            self.postprocessors = nn.ModuleList(postprocessors or [])
            self.do_postprocessing = do_postprocessing

    return stub


def test_package_host_code_path_with_a_stub_cace_package(monkeypatch, tmp_path):
    stub = install_stub_cace_package(monkeypatch)
    modules = stub["cace.modules"]
    rep = stub["cace.representations.cace_representation"].Cace(
        zs=ZS, n_atom_basis=2, cutoff=CUTOFF, radial_basis=modules.BesselRBF(CUTOFF, n_rbf=4, trainable=True),
        cutoff_fn=modules.PolynomialCutoff(CUTOFF), max_l=2, max_nu=3, num_message_passing=1,
        type_message_passing=["Bchi"], args_message_passing={"Bchi": {"n_hidden": 4}},
        embed_receiver_nodes=True, avg_num_neighbors=7.3,
    )
    host = stub["cace.models.atomistic"].NeuralNetworkPotential(
        representation=rep,
        output_modules=[modules.Atomwise(n_hidden=8, output_key="CACE_energy"),
                        modules.Forces(energy_key="CACE_energy", forces_key="CACE_forces")],
    ).double()
    torch.manual_seed(0)
    model = latent_lr.wrap(host).eval()  # recognised from the package name
    assert model.backbone.name == "cace" and host.output_modules[0].outnet is not None  # dry run built it
    config = model.config()["host"]
    assert config["kind"] == "cace"
    assert config["representation"]["type_message_passing"] == ["Bchi"]
    assert config["representation"]["embed_receiver_nodes"] is True
    assert config["output_modules"][0]["kwargs"]["activation"] == "torch.nn.functional.silu"
    adapter = type(model.backbone)
    state = torch.random.get_rng_state()
    adapter(adapter.build_host(model.backbone.host_config()))  # builds, then dry-runs the lazy layers
    assert torch.equal(torch.random.get_rng_state(), state)  # CACE's reseeding does not leak
    path = tmp_path / "cace.pt"
    latent_lr.save(model, path)
    loaded = latent_lr.load(path).eval()
    assert type(loaded.backbone.host).__module__ == "cace.models.atomistic"
    assert loaded.backbone.host.representation.mp_norm_factor == rep.mp_norm_factor
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()])
    assert torch.equal(model(data)["energy"], loaded(data)["energy"])


def test_default_host_is_built_from_cace_classes_and_trains(monkeypatch):
    install_stub_cace_package(monkeypatch)
    adapter = latent_lr.backbone.adapter_class("cace")
    with pytest.raises(ValueError, match="unknown CACE host options"):
        adapter.default_host(ZS, n_layer=2)
    torch.manual_seed(3)
    host = adapter.default_host(ZS, cutoff=CUTOFF, n_hidden=[8], n_layers=2)
    assert type(host).__module__ == "cace.models.atomistic" and host.representation.zs == sorted(ZS)
    model = latent_lr.wrap(host).double()
    assert model.backbone.energy_key == "CACE_energy" and host.output_modules[0].outnet is not None
    data = AtomsBatch.from_atoms([molecule("CH3CH2OH"), rattled_salt()]).to(dtype=torch.float64)
    out = model.train()(data)
    loss = out["energy"].pow(2).sum() + out["forces"].pow(2).mean()
    loss.backward()  # forces' double backward reaches the read-out
    assert host.output_modules[0].outnet[0].weight.grad.abs().sum() > 0
    crystal = rattled_salt()
    crystal.calc = latent_lr.Calculator(model.eval())
    np.testing.assert_allclose(crystal.get_forces(), calculate_numerical_forces(crystal, 1e-4), atol=1e-7)


def test_files_written_before_adapter_options_still_load(host):
    model = latent_lr.wrap(host, backbone="cace", adapter_options={"atomic_energies": {z: -z / 3 for z in ZS}})
    adapter = type(model.backbone)
    old_layout = {"host": {"host": model.backbone.host_config(), "adapter": model.backbone.options()}, "options": {}}
    rebuilt = adapter.from_config(old_layout)
    rebuilt.load_state_dict(model.backbone.state_dict())
    assert rebuilt.atomic_energies == model.backbone.atomic_energies
    data = AtomsBatch.from_atoms(molecule("CH3CH2OH"))
    assert torch.equal(rebuilt(data)[0], model.backbone(data)[0])
