"""Fragment-aware total charge (issue 13 item 2): bond-graph fragments and the excess shared among them."""

from __future__ import annotations

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms

import latent_lr
from latent_lr.charges import FragmentChargeRedistribution, LearnedChargeRedistribution, redistribute_by_fragment
from latent_lr.config import LongRangeConfig
from latent_lr.fragments import Fragments, find_fragments
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer

WATER = np.array([[0.0, 0.0, 0.0], [0.757, 0.586, 0.0], [-0.757, 0.586, 0.0]])


def _ion_and_water(distance: float, charge: float = 1.0) -> Atoms:
    """Na (charged structure: total ``charge``) and a water whose O is ``distance`` Å away, open boundaries."""
    atoms = Atoms("NaOH2", positions=np.vstack([[[-distance, 0.1, 0.2]], WATER]))
    atoms.info["charge"] = charge
    return atoms


def _fragment_model(seed: int = 0) -> latent_lr.LongRangeModel:
    torch.manual_seed(seed)
    host = latent_lr.RadialPotential([1, 8, 11], cutoff=4.0, hidden_dim=8, n_layers=1)
    return latent_lr.wrap(host, charge_redistribution="fragments").double().eval()


def test_fragments_are_molecules_and_see_periodic_images() -> None:
    """Two waters 6 Å apart are two fragments; a water cut by the cell boundary is one (its O–H bond
    is an image bond); an ion 2 Å from O is bonded at factor 1.2 (1.2 (1.66 + 0.66) Å = 2.78 Å)."""
    two = Atoms("OH2OH2", positions=np.vstack([WATER, WATER + [6.0, 0.0, 0.0]]))
    wrapped = Atoms("OH2", positions=WATER + [0.3, 3.0, 3.0], cell=[6.0, 6.0, 6.0], pbc=True)
    wrapped.wrap()
    assert wrapped.positions[:, 0].max() - wrapped.positions[:, 0].min() > 4.0  # really cut by the boundary
    batch = latent_lr.AtomsBatch.from_atoms([two, wrapped, _ion_and_water(2.0), _ion_and_water(8.0)])
    fragments = find_fragments(batch, bond_factor=1.2)
    assert fragments.index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 5, 5, 5]
    assert fragments.structure.tolist() == [0, 0, 1, 2, 3, 3]
    assert find_fragments(batch, bond_factor=0.5).structure.shape[0] == 17  # nothing bonded: one atom each


def _inputs(seed: int = 0, n_atoms: int = 9, n_features: int = 5):
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(n_atoms, generator=generator, dtype=torch.float64)
    features = torch.randn(n_atoms, n_features, generator=generator, dtype=torch.float64)
    return raw, features


def test_one_fragment_is_the_learned_redistribution_exactly() -> None:
    """Same Fukui weights, one fragment per structure: bit-identical to LearnedChargeRedistribution."""
    raw, features = _inputs()
    batch, total = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1]), torch.tensor([1.0, -2.0], dtype=torch.float64)
    fragment = FragmentChargeRedistribution(5).double()
    learned = LearnedChargeRedistribution(5).double()
    learned.load_state_dict(fragment.fukui.state_dict())
    whole = Fragments.whole_structures(batch, 2)
    assert torch.equal(fragment(raw, features, batch, total, whole), learned(raw, features, batch, total))
    assert torch.equal(fragment(raw, features, batch, total), learned(raw, features, batch, total))


def test_sum_rule_is_exact_and_a_low_score_fragment_gets_almost_no_excess() -> None:
    """Σ q = Q per structure to round-off for any fragments.  Fragment scores 0 and −s: the low one gets the
    share e^{−s}/(1 + e^{−s}) of the excess (s = 12: 6e-6), where the all-atom scheme gives it W_f / W."""
    raw, features = _inputs(1)
    weights = torch.rand(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
    fragments = Fragments(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]), torch.tensor([0, 0, 1]))
    total = torch.tensor([1.0, -1.0], dtype=torch.float64)
    scores = torch.tensor([0.0, 0.0, 0.0, -6.0, -6.0, 0.3, -1.0, 2.0, 0.0], dtype=torch.float64)
    charges = redistribute_by_fragment(raw, weights, scores, fragments, total)
    sums = torch.zeros(2, dtype=torch.float64).index_add(0, fragments.structure[fragments.index], charges)
    torch.testing.assert_close(sums, total, rtol=0, atol=1e-14)
    excess = float(total[0] - raw[:5].sum())
    received = float(charges[3:5].sum() - raw[3:5].sum())
    assert received == pytest.approx(excess * np.exp(-12.0) / (1 + np.exp(-12.0)), rel=1e-9)
    assert abs(received) < 1e-5 * abs(excess)
    assert float(weights[3:5].sum() / weights[:5].sum()) > 0.2  # what the all-atom scheme would have given


def test_neutral_partner_takes_no_excess_when_the_score_net_flags_the_ion() -> None:
    """Na⁺ and a water 10 Å apart (total +1), features = one-hot elements.  Score net = +10 on Na, 0 else:
    the water's net charge equals its own raw sum to within e^{−10}/(1 + e^{−10}) ≈ 4.5e-5 of the excess
    (bound 1e-4 e); with zero scores it takes half of the excess, with the all-atom scheme W_water / W."""
    data = latent_lr.AtomsBatch.from_atoms([_ion_and_water(10.0)]).to(dtype=torch.float64)
    features = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 2]), 3).to(dtype=torch.float64)
    module = FragmentChargeRedistribution(3, hidden_dim=3).double()
    raw = torch.tensor([0.4, -0.7, 0.2, 0.3], dtype=torch.float64)  # the water's own raw sum: −0.2 e
    fragments = module.fragments(data)
    assert fragments.index.tolist() == [0, 1, 1, 1]
    excess = 1.0 - float(raw.sum())
    with torch.no_grad():
        first, last = module.score_net[0], module.score_net[-1]
        first.weight.copy_(torch.eye(3) * 10.0)
        first.bias.zero_()
        last.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        last.bias.zero_()
    with torch.no_grad():
        scored = module(raw, features, data.batch, data.total_charge, fragments)
        scores = module.score_net(features).squeeze(-1)
    assert float(scores[0]) == pytest.approx(10.0, abs=1e-3) and float(scores[1:].abs().max()) == 0.0  # SiLU(10) ≈ 10
    assert float(scored.sum()) == pytest.approx(1.0, abs=1e-14)
    assert abs(float(scored[1:].sum()) - (-0.2)) < 1e-4 * excess
    with torch.no_grad():
        last.weight.zero_()
        even = module(raw, features, data.batch, data.total_charge, fragments)
    assert float(even[1:].sum()) == pytest.approx(-0.2 + excess / 2, rel=1e-12)


def test_forces_are_minus_the_energy_gradient_with_fragments() -> None:
    """Central finite differences (h = 1e-5 Å) of the energy of a charged ion–water pair and a neutral
    water pair match the model's forces to 1e-6 eV/Å: fragments do not change under the small steps."""
    model = _fragment_model(seed=3)
    pair = Atoms("OH2OH2", positions=np.vstack([WATER, WATER + [5.5, 0.4, 0.0]]))
    pair.info["charge"] = 0.0
    structures = [_ion_and_water(6.0), pair]
    forces = model(latent_lr.AtomsBatch.from_atoms(structures).to(dtype=torch.float64))["forces"].detach()
    assert float(forces.abs().max()) > 1e-3
    step = 1e-5
    for atom, axis in [(0, 0), (1, 2), (5, 1), (8, 0)]:
        energies = []
        for sign in (1, -1):
            moved = [a.copy() for a in structures]
            index = atom if atom < 4 else atom - 4
            moved[0 if atom < 4 else 1].positions[index, axis] += sign * step
            data = latent_lr.AtomsBatch.from_atoms(moved).to(dtype=torch.float64)
            energies.append(float(model(data)["energy"].sum()))
        assert -(energies[0] - energies[1]) / (2 * step) == pytest.approx(float(forces[atom, axis]), abs=1e-6)


def test_auto_resolves_to_fragments_for_charged_latent_training_data_only() -> None:
    auto = LongRangeConfig()
    assert auto.charge_redistribution == "auto"
    assert auto.resolved_for(charged=True).charge_redistribution == "fragments"
    assert auto.resolved_for(charged=False).charge_redistribution == "learned"
    assert LongRangeConfig(charge_model="qeq").resolved_for(charged=True).charge_redistribution == "learned"
    assert LongRangeConfig(charge_redistribution="uniform").resolved_for(charged=True).charge_redistribution == "uniform"
    with pytest.raises(ValueError, match="fragment_bond_factor must be > 0"):
        LongRangeConfig(fragment_bond_factor=0.0)


def test_saved_and_loaded_model_keeps_fragments(tmp_path) -> None:
    model = _fragment_model(seed=5)
    data = latent_lr.AtomsBatch.from_atoms([_ion_and_water(8.0)]).to(dtype=torch.float64)
    latent_lr.save(model, tmp_path / "model.pt")
    loaded = latent_lr.load(tmp_path / "model.pt").double().eval()
    assert loaded.long_range.config.charge_redistribution == "fragments"
    assert torch.equal(loaded(data)["charges"], model(data)["charges"])


@pytest.mark.parametrize("charge, expected", [(0.0, "learned"), (1.0, "fragments")])
def test_training_resolves_auto_from_the_training_data(tmp_path, charge: float, expected: str) -> None:
    """Charged training structures (total-charge key set): fragments, stored in config.json; neutral: learned."""
    paths = write_dataset(tmp_path / "data", n_train=4, n_test=0)
    frames = ase.io.read(paths["train"], index=":")
    frames[1].info["charge"] = charge
    ase.io.write(paths["train"], frames)
    config = TrainConfig(train=str(paths["train"]), total_charge_key="charge", epochs=1, out=str(tmp_path / "run"),
                         host_options={"cutoff": 4.0, "hidden_dim": 8, "n_layers": 1}, progress=False)
    trainer = Trainer(config)
    assert trainer.config.long_range_options.charge_redistribution == expected
    stored = (tmp_path / "run" / "config.json").read_text()
    assert f'"charge_redistribution": "{expected}"' in stored
    constraint = trainer.model.long_range.charge_head.constraint
    assert isinstance(constraint, FragmentChargeRedistribution if charge else LearnedChargeRedistribution)


def test_charge_excess_penalty_is_the_mean_squared_excess_of_the_raw_charges() -> None:
    """Training adds w Σ_s (Q_s − Σ q̃)² / S for fragment-aware models (their ``raw_charge_excess``), nothing otherwise."""
    from latent_lr.training.loss import charge_excess_penalty

    model = _fragment_model(seed=6)
    structures = [_ion_and_water(9.0), _ion_and_water(7.0, charge=0.0)]
    data = latent_lr.AtomsBatch.from_atoms(structures).to(dtype=torch.float64)
    out = model(data)
    raw = model.long_range.charge_head.raw_charges(_features(model, data), data.numbers)
    expected = ((torch.tensor([1.0, 0.0], dtype=torch.float64) - torch.stack([raw[:4].sum(), raw[4:].sum()])) ** 2).mean()
    penalty = charge_excess_penalty(TrainConfig(charge_excess_weight=2.5), out, 2).detach()
    expected = expected.detach()
    assert float(penalty) == pytest.approx(2.5 * float(expected), rel=1e-12) and float(expected) > 1e-4
    assert float(charge_excess_penalty(TrainConfig(charge_excess_weight=0.0), out, 2)) == 0.0
    learned = latent_lr.wrap(latent_lr.RadialPotential([1, 8, 11], cutoff=4.0, hidden_dim=8, n_layers=1)).double()
    assert float(charge_excess_penalty(TrainConfig(), learned(data), 2)) == 0.0


def _features(model, data):
    return model.backbone(data)[1].to(torch.float64)
