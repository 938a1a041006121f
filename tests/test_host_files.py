"""Hosts from their own files (latent_lr.load_host, wrap(path), --init-model) against the backbones' own loaders.

References: each backbone's own loader and calculator (mace's MACECalculator on
the file, nequip's ModelFromCheckpoint and NequIPCalculator, CHGNet.load and
predict_structure, the unpickled CACE object), and bit-equality of weights.
"""

import os
import pickle

import numpy as np
import pytest
import torch
from adapter_checks import triclinic_salt
from ase.build import molecule

import latent_lr
from latent_lr import AtomsBatch
from latent_lr.backbone import isolated_global_state
from latent_lr.errors import UserInputError
from latent_lr.host_files import identify
from latent_lr.training import TrainConfig
from latent_lr.training.trainer import build_model

SPECIES = [1, 6, 8, 11, 17]
FLAG = "latent_lr_pickle_ran"


def mace_own(path, atoms):
    """Energy, forces, stress from mace's own ASE calculator loading the file."""
    from mace.calculators import MACECalculator

    with isolated_global_state():
        calc = MACECalculator(model_paths=str(path), device="cpu", default_dtype="float64")
        calc.calculate(atoms.copy(), ["energy", "forces", "stress"])
    return calc.results


def assert_twin_equals(model, reference, atoms):
    calc = latent_lr.Calculator(model.eval())
    assert calc.get_potential_energy(atoms) == pytest.approx(float(reference["energy"]), abs=1e-10)
    np.testing.assert_allclose(calc.get_forces(atoms), reference["forces"], atol=1e-10, rtol=0)
    np.testing.assert_allclose(calc.get_stress(atoms), reference["stress"], atol=1e-10, rtol=0)


def test_mace_file_loads_safely_and_equals_mace_own_calculator(mace_file):
    atoms = triclinic_salt()
    reference = mace_own(mace_file, atoms)
    assert identify(mace_file) == "mace"
    host = latent_lr.load_host(mace_file)
    unpickled = torch.load(mace_file, weights_only=False)
    assert type(host) is type(unpickled)
    ours, theirs = host.state_dict(), unpickled.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in set(ours) & set(theirs))
    assert_twin_equals(latent_lr.wrap(host, long_range=False), reference, atoms)
    assert_twin_equals(latent_lr.wrap(str(mace_file), long_range=False), reference, atoms)
    init = build_model(TrainConfig(init_model=str(mace_file), long_range=False), SPECIES)  # --init-model
    assert_twin_equals(init, reference, atoms)
    assert np.abs(reference["stress"]).max() > 1e-5 and np.abs(reference["forces"]).max() > 1e-3  # not trivially zero


def test_mace_trusted_load_equals_safe_load(mace_file):
    data = AtomsBatch.from_atoms([triclinic_salt(), molecule("CH3CH2OH")])
    safe = latent_lr.wrap(latent_lr.load_host(mace_file), long_range=False).eval()
    trusted = latent_lr.wrap(latent_lr.load_host(mace_file, trust_pickle=True), long_range=False).eval()
    assert torch.equal(safe(data)["energy"], trusted(data)["energy"])


class RunsCode:
    """Pickles as a call of os.system: loading such a file would run a shell command."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def test_pickle_outside_the_allow_list_is_refused_without_trust(mace_file, tmp_path):
    host = torch.load(mace_file, weights_only=False)
    host.payload = RunsCode(tmp_path / FLAG)
    path = tmp_path / "evil.model"
    torch.save(host, path)
    with pytest.raises(UserInputError, match=r"os\.system|posix\.system.*trust_pickle=True"):
        latent_lr.load_host(path)
    with pytest.raises(UserInputError, match="trust_pickle"):
        build_model(TrainConfig(init_model=str(path)), SPECIES)
    assert not (tmp_path / FLAG).exists()


class LoadsAFile:
    """Pickles as a call of mace's MACECalculator (a class of an allowed package that is not a module: it loads a file)."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        from mace.calculators import MACECalculator

        return (MACECalculator, (str(self.target),))


def test_non_module_classes_of_allowed_packages_are_refused(mace_file, tmp_path):
    host = torch.load(mace_file, weights_only=False)
    host.payload = LoadsAFile(tmp_path / "other.model")
    path = tmp_path / "calls_a_class.model"
    torch.save(host, path)
    with pytest.raises(UserInputError, match=r"mace\.calculators\.mace\.MACECalculator.*trust_pickle"):
        latent_lr.load_host(path)


def test_generated_code_bytes_are_never_unpickled(mace_file, tmp_path, monkeypatch):
    calls = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda *args, **kwargs: calls.append(1) or real_loads(*args, **kwargs))
    latent_lr.load_host(mace_file)
    assert calls == []  # e3nn's __setstate__ would call pickle.loads on the embedded code


def test_torchscript_export_is_refused_with_the_file_to_give(mace_file, tmp_path):
    eager = tmp_path / "run.model"
    eager.write_bytes(mace_file.read_bytes())
    compiled = tmp_path / "run_compiled.model"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(compiled))
    with pytest.raises(UserInputError, match=f"TorchScript.*give {eager}"):
        latent_lr.load_host(compiled)


def test_unknown_files_and_mismatches_are_clear_errors(mace_file, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserInputError, match="latent-lr reads a MACE .model file"):
        latent_lr.load_host(tmp_path / "notes.txt")
    with pytest.raises(UserInputError, match="is a mace model file, but backbone 'nequip'"):
        latent_lr.load_host(mace_file, backbone="nequip")
    with pytest.raises(UserInputError, match="not a file"):
        latent_lr.load_host(tmp_path / "missing.model")


# ----------------------------------------------------------------------------- NequIP


def write_nequip_checkpoint(path):
    """A NequIP 0.19 training checkpoint as Lightning writes it (nequip's NequIPLightningModule, its hyper-parameters)."""
    import lightning

    from latent_lr.adapters import nequip_host

    config = nequip_host.default_config(SPECIES, seed=5, per_type_energy_shifts={"H": -1.0, "C": -3.0, "O": -2.5, "Na": -0.5, "Cl": -1.5})
    with nequip_host._nequip_builder_state():
        from nequip.train import NequIPLightningModule
        from nequip.utils import get_current_code_versions

        module = NequIPLightningModule(
            model=config["model"], num_datasets={"train": 1, "val": 0, "test": 0, "predict": 0},
            info_dict={"versions": get_current_code_versions(verbose=False),
                       "training_module": {"_target_": "nequip.train.NequIPLightningModule"}},
        )
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": lightning.__version__,
                "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


@pytest.fixture(scope="module")
def nequip_checkpoint(tmp_path_factory):
    pytest.importorskip("nequip")
    return write_nequip_checkpoint(tmp_path_factory.mktemp("nequip") / "last.ckpt")


def test_nequip_checkpoint_equals_nequip_own_loader_and_calculator(nequip_checkpoint):
    from nequip.model import ModelFromCheckpoint
    from test_adapter_nequip import nequip_own

    from latent_lr.adapters import nequip_host

    with nequip_host._nequip_builder_state():
        own = ModelFromCheckpoint(str(nequip_checkpoint))["sole_model"]
    assert identify(nequip_checkpoint) == "nequip"
    host = latent_lr.load_host(nequip_checkpoint)
    ours, theirs = host.state_dict(), own.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)
    atoms = triclinic_salt()
    reference = nequip_own(own, atoms)
    assert_twin_equals(latent_lr.wrap(host, long_range=False), reference, atoms)
    assert_twin_equals(build_model(TrainConfig(init_model=str(nequip_checkpoint), long_range=False), SPECIES), reference, atoms)


def test_nequip_package_needs_trust(tmp_path):
    import zipfile

    path = tmp_path / "model.nequip.zip"
    with zipfile.ZipFile(path, "w") as archive:  # the layout of a torch.package archive of nequip
        archive.writestr("model/.data/extern_modules", "torch\n")
        archive.writestr("model/nequip/__init__.py", "")
    assert identify(path) == "nequip"
    with pytest.raises(UserInputError, match="nequip-package archive carries its own copy of nequip's code.*trust_pickle"):
        latent_lr.load_host(path)


# ----------------------------------------------------------------------------- CHGNet


def test_chgnet_bundled_weights_equal_chgnet_load_and_its_predictions(tmp_path):
    pytest.importorskip("chgnet")
    from pathlib import Path

    import chgnet
    from test_adapter_chgnet import structure

    from latent_lr.adapters.chgnet import ChgnetBackbone

    weights = next((Path(chgnet.__file__).parent / "pretrained" / "0.3.0").glob("*.pth.tar"))
    assert identify(weights) == "chgnet"
    host = latent_lr.load_host(weights).eval()
    own = ChgnetBackbone.pretrained_host("0.3.0").eval()  # CHGNet.load(model_name="0.3.0")
    ours, theirs = host.state_dict(), own.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[key], theirs[key]) for key in ours)
    atoms = triclinic_salt()
    reference = own.predict_structure(structure(atoms), task="efs")
    twin = latent_lr.wrap(host, long_range=False).eval()
    init = build_model(TrainConfig(init_model=str(weights), long_range=False, dtype="float32"), SPECIES).eval()
    for model in (twin, init):  # CHGNet is a float32 model: its own float32 precision
        out = model(AtomsBatch.from_atoms(atoms))
        assert out["energy"].item() == pytest.approx(float(reference["e"]) * len(atoms), rel=1e-6)
        np.testing.assert_allclose(out["forces"].detach().numpy(), reference["f"], atol=1e-4, rtol=0)
    double = latent_lr.wrap(latent_lr.load_host(weights).double(), long_range=False).eval()
    same = latent_lr.wrap(own.double(), long_range=False).eval()
    data = AtomsBatch.from_atoms(atoms)
    first, second = double(data), same(data)
    assert torch.equal(first["energy"], second["energy"]) and torch.equal(first["stress"], second["stress"])


# ----------------------------------------------------------------------------- CACE (stub package in CI)


def test_cace_pickle_loads_through_the_allow_list(monkeypatch, tmp_path):
    from test_adapter_cace import install_stub_cace_package

    stub = install_stub_cace_package(monkeypatch)
    for module in stub.values():  # picklable by name, as the real package's classes are
        for value in vars(module).values():
            if isinstance(value, type):
                value.__qualname__ = value.__name__
    modules = stub["cace.modules"]
    representation = stub["cace.representations"].Cace(
        zs=[1, 8], n_atom_basis=2, cutoff=4.0, radial_basis=modules.BesselRBF(cutoff=4.0, n_rbf=4),
        cutoff_fn=modules.PolynomialCutoff(cutoff=4.0), max_l=2, max_nu=2, num_message_passing=0,
    )
    host = stub["cace.models.atomistic"].NeuralNetworkPotential(
        representation=representation,
        output_modules=[modules.Atomwise(n_in=None, output_key="CACE_energy"), modules.Forces(energy_key="CACE_energy")],
    )
    reference = latent_lr.wrap(host, long_range=False).eval()  # materialises the lazy read-out
    path = tmp_path / "cace.pth"
    torch.save(host, path)
    assert identify(path) == "cace"
    loaded = latent_lr.load_host(path)
    assert type(loaded) is type(host) and type(loaded.output_modules[0]) is modules.Atomwise
    data = AtomsBatch.from_atoms([molecule("H2O"), molecule("H2O2")])
    assert torch.equal(latent_lr.wrap(loaded, long_range=False).eval()(data)["energy"], reference(data)["energy"])
    host.payload = RunsCode(tmp_path / FLAG)
    torch.save(host, path)
    with pytest.raises(UserInputError, match="trust_pickle"):
        latent_lr.load_host(path)
    assert not (tmp_path / FLAG).exists()


# ----------------------------------------------------------------------------- each file is read once


def count_reads(monkeypatch, path):
    """Counts of full ``torch.load`` reads and pickle-opcode scans of ``path`` from here on."""
    reads = {"load": 0, "scan": 0}
    real_load, real_scan = torch.load, torch.serialization.get_unsafe_globals_in_checkpoint

    def load(source, *args, **kwargs):
        reads["load"] += str(source) == str(path)
        return real_load(source, *args, **kwargs)

    def scan(source, *args, **kwargs):
        reads["scan"] += str(source) == str(path)
        return real_scan(source, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", scan)
    return reads


def test_init_model_and_load_host_read_a_file_once(monkeypatch, mace_file, tmp_path):
    from pathlib import Path

    import chgnet

    from latent_lr.training.model_files import load_model_file

    weights = next((Path(chgnet.__file__).parent / "pretrained" / "0.3.0").glob("*.pth.tar"))
    torch.manual_seed(0)
    latent_lr.save(latent_lr.wrap(latent_lr.RadialPotential([1, 8], cutoff=3.0, hidden_dim=8)), tmp_path / "lr.pt")
    cases = [  # (file, how it is read, expected reads); main read them 3, 2, 3, 2, 1 times (scans 2, 1, 1, 0, 3)
        (weights, lambda: build_model(TrainConfig(init_model=str(weights), long_range=False, dtype="float32"), SPECIES),
         {"load": 1, "scan": 1}),
        (weights, lambda: latent_lr.load_host(weights), {"load": 1, "scan": 1}),
        (tmp_path / "lr.pt", lambda: build_model(TrainConfig(init_model=str(tmp_path / "lr.pt")), [1, 8]),
         {"load": 1, "scan": 1}),
        (tmp_path / "lr.pt", lambda: load_model_file(tmp_path / "lr.pt"), {"load": 1, "scan": 0}),
        # a whole-model pickle: its opcodes are scanned to identify it and again by the allow-list, then loaded once
        (mace_file, lambda: build_model(TrainConfig(init_model=str(mace_file), long_range=False), SPECIES),
         {"load": 1, "scan": 2}),
    ]
    for path, read, expected in cases:
        with monkeypatch.context() as patch:
            reads = count_reads(patch, path)
            read()
        assert reads == expected, (path, reads)
