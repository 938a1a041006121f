"""The training recipe: weight average, AMSGrad, warm-up/cosine schedule, second stage,
non-finite guard, time budget and resume — on a tiny radial model and synthetic data."""

import json
import math
import time

import pytest
import torch

import latent_lr
from latent_lr.cli import _build_parser, _config_from, main
from latent_lr.synthetic import write_dataset
from latent_lr.training import TrainConfig, Trainer
from latent_lr.training import trainer as trainer_module
from latent_lr.training.config import parse_duration
from latent_lr.training.dataset import collate
from latent_lr.training.loss import loss_function
from latent_lr.training.model_files import load_model_file
from latent_lr.training.recipe import LearningRateSchedule

HOST = {"cutoff": 4.0, "hidden_dim": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n_train=40, n_test=4, seed=3)


def tiny(dataset, out, **values) -> TrainConfig:
    """A fast run: 36 training and 4 validation structures, batches of 8 (5 steps per epoch), the plain loss weights."""
    base = TrainConfig(train=str(dataset["train"]), backbone="radial", host_options=HOST, progress=False, out=str(out), batch_size=8,
                       energy_weight=1.0, forces_weight=10.0)
    return base.updated(values)


def all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_weight_average_equals_hand_computed_average(dataset, tmp_path):
    decay = 0.4  # reached at step 6 (6/15): steps 2-5 use the warm-up, 6-10 the cap
    trainer = Trainer(tiny(dataset, tmp_path, epochs=2, ema_decay=decay))
    snapshots: list[list[torch.Tensor]] = []
    trainer.optimiser.register_step_post_hook(lambda *_: snapshots.append([p.detach().clone() for p in trainer.model.parameters()]))
    trainer.fit()
    assert len(snapshots) == 10  # 2 epochs x 5 steps
    average = [t.clone() for t in snapshots[0]]  # the average starts at the weights after the first step
    epoch_end_averages = []
    for step, snapshot in enumerate(snapshots[1:], start=2):
        d = min(decay, step / (step + 9))  # the decay warms up: 2/11, 3/12, ... until it reaches `decay`
        average = [d * a + (1 - d) * w for a, w in zip(average, snapshot)]
        if step % 5 == 0:
            epoch_end_averages.append(average)
    valid_losses = [row["valid_loss"] for row in trainer.history]
    best_average = epoch_end_averages[valid_losses.index(min(valid_losses))]  # best_model.pt is the best epoch's average
    names = [name for name, _ in trainer.model.named_parameters()]
    for name, expected, live in zip(names, average, trainer.model.parameters()):
        torch.testing.assert_close(dict(trainer.ema.model().named_parameters())[name], expected, rtol=0, atol=1e-13)
        assert not torch.allclose(live, expected), name  # the average is not the last weights
    # best_model.pt and the checkpoint (as predict reads it) hold the average; the checkpoint also the live weights.
    best = latent_lr.load(tmp_path / "best_model.pt").state_dict()
    from_checkpoint = load_model_file(tmp_path / "checkpoint.pt").state_dict()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for name, expected, expected_best in zip(names, average, best_average):
        torch.testing.assert_close(from_checkpoint[name], expected, rtol=0, atol=1e-13)
        torch.testing.assert_close(checkpoint["model"][name], dict(trainer.model.named_parameters())[name], rtol=0, atol=0)
        torch.testing.assert_close(best[name], expected_best, rtol=0, atol=1e-13)
    # Validation scored the average: recompute the last validation loss with a model holding the hand average.
    model = latent_lr.load(tmp_path / "best_model.pt")
    with torch.no_grad():
        for parameter, expected in zip(model.parameters(), average):
            parameter.copy_(expected)
    frames = list(trainer.valid_frames)  # the validation loss is averaged over the whole set (one batch here)
    data, targets = collate(frames, model.dtype)
    out = model.eval()(data, compute_forces=True, compute_stress=False)
    expected_loss = loss_function(trainer.config, out, targets, frames).item()
    assert trainer.history[-1]["valid_loss"] == pytest.approx(expected_loss, rel=1e-10)


def test_amsgrad_flag_reaches_the_optimiser(dataset, tmp_path):
    args = _build_parser().parse_args(["train", "--train", str(dataset["train"]), "--amsgrad", "on", "--epochs", "1"])
    config = _config_from(args).updated({"backbone": "radial", "host_options": HOST, "progress": False, "out": str(tmp_path)})
    assert config.amsgrad is True and TrainConfig().amsgrad is False
    trainer = Trainer(config)
    assert all(group["amsgrad"] for group in trainer.optimiser.param_groups)
    trainer.fit()
    state = next(iter(trainer.optimiser.state.values()))
    assert "max_exp_avg_sq" in state  # AdamW kept the running maximum of the second moment
    assert not Trainer(config.updated({"amsgrad": False, "out": str(tmp_path / "b")})).optimiser.param_groups[0]["amsgrad"]


def rates_per_epoch(config: TrainConfig, main_epochs: int, epochs: int, losses=None) -> list[float]:
    """The learning rate each epoch trains at, stepping a schedule on a one-parameter optimiser."""
    optimiser = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    schedule = LearningRateSchedule(optimiser, config, main_epochs)
    rates = []
    for epoch in range(epochs):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        schedule.step(1.0 if losses is None else losses[epoch])
    return rates


def test_warmup_and_cosine_rates_follow_the_formula():
    lr, floor, f, warmup, main_epochs = 2e-3, 1e-4, 0.1, 3, 10
    config = TrainConfig(learning_rate=lr, scheduler="cosine", warmup_epochs=warmup, warmup_start_factor=f, min_learning_rate=floor)
    rates = rates_per_epoch(config, main_epochs, 14)
    span = main_epochs - warmup
    expected = [lr * (f + (1 - f) * e / warmup) for e in range(warmup)]
    expected += [floor + (lr - floor) * (1 + math.cos(math.pi * (e - warmup) / span)) / 2 for e in range(warmup, main_epochs)]
    expected += [floor] * 4  # held at the floor after the cosine's end
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # Warm-up then plateau: full rate after warm-up, halved after `plateau_patience` + 1 epochs without improvement.
    plateau = TrainConfig(learning_rate=lr, warmup_epochs=2, warmup_start_factor=0.5, plateau_patience=1)
    rates = rates_per_epoch(plateau, 20, 7, losses=[5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    assert rates == pytest.approx([lr * 0.5, lr * 0.75, lr, lr, lr, lr / 2, lr / 2], rel=1e-12)
    # Without a warm-up, cosine starts at the full rate.
    assert rates_per_epoch(TrainConfig(learning_rate=lr, scheduler="cosine"), 4, 2) == pytest.approx([lr, lr * (1 + math.cos(math.pi / 4)) / 2])


def test_stage_two_switches_loss_weights_and_rate_at_its_epoch(dataset, tmp_path, monkeypatch):
    used: list[tuple[int, float, float]] = []
    original = trainer_module.weighted_loss

    def recording(config, *args):
        used.append((trainer.epoch, config.energy_weight, config.forces_weight))
        return original(config, *args)

    monkeypatch.setattr(trainer_module, "weighted_loss", recording)
    config = tiny(dataset, tmp_path, epochs=4, stage_two_start=0.5, stage_two_energy_weight=1000.0, stage_two_learning_rate=1e-4)
    trainer = Trainer(config)
    assert trainer.stage_two.start == 2
    trainer.fit()
    weights_by_epoch = {epoch: {(e, f) for ep, e, f in used if ep == epoch} for epoch in range(4)}
    assert weights_by_epoch == {0: {(1.0, 10.0)}, 1: {(1.0, 10.0)}, 2: {(1000.0, 10.0)}, 3: {(1000.0, 10.0)}}
    assert [row["stage"] for row in trainer.history] == [1, 1, 2, 2]
    assert [row["learning_rate"] for row in trainer.history] == [3e-3, 3e-3, 1e-4, 1e-4]  # rate at the end of each epoch
    # The best model is chosen within stage two (its losses are not comparable with stage one's).
    assert trainer.best == min(row["valid_loss"] for row in trainer.history[2:])
    assert Trainer(config.updated({"stage_two_start": 3, "out": str(tmp_path / "b")})).stage_two.start == 3


def test_nan_batch_is_skipped_and_never_saved(dataset, tmp_path, capsys):
    trainer = Trainer(tiny(dataset, tmp_path, epochs=3, learning_rate=1e-3))
    poisoned = trainer.train_frames[5]
    poisoned.energy = float("nan")
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit()
    assert [row["nonfinite_steps"] for row in trainer.history] == [1, 1, 1]  # one batch per epoch holds the frame
    assert trainer.optimiser.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**3)
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["valid_loss"]) for row in trainer.history)
    error = capsys.readouterr().err
    assert error.count("non-finite loss or gradient") == 3 and poisoned.location in error
    assert all_finite(latent_lr.load(tmp_path / "best_model.pt").state_dict())
    assert all_finite(torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"])
    assert any(not torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters()))  # training went on
    assert "nonfinite_steps" in (tmp_path / "log.csv").read_text().splitlines()[0]


def test_non_finite_weights_are_rolled_back(dataset, tmp_path, capsys):
    trainer = Trainer(tiny(dataset, tmp_path, epochs=3, ema_decay=0.5))
    saved_states = []
    checkpoint = trainer._checkpoint
    trainer._checkpoint = lambda: (checkpoint(), saved_states.append({k: v.clone() for k, v in trainer.model.state_dict().items()}))
    steps = []

    def poison(*_):  # the 7th step (epoch 2) writes a NaN into the weights
        steps.append(1)
        if len(steps) == 7:
            with torch.no_grad():
                next(trainer.model.parameters())[0] = float("nan")

    trainer.optimiser.register_step_post_hook(poison)
    trainer.fit()
    assert [row["rollbacks"] for row in trainer.history] == [0, 1, 0]
    assert "rolled back" in capsys.readouterr().err
    for name, value in saved_states[1].items():  # epoch 2 ended with the weights of epoch 1
        assert torch.equal(value, saved_states[0][name]), name
    assert all_finite(trainer.model.state_dict()) and all_finite(trainer.ema.model().state_dict())
    assert all_finite(latent_lr.load(tmp_path / "best_model.pt").state_dict())


def test_time_budget_stops_early_with_the_best_model_saved(dataset, tmp_path):
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("ten minutes")
    out = tmp_path / "budget"
    started = time.monotonic()
    arguments = ["train", "--train", str(dataset["train"]), "--epochs", "100000", "--patience", "100000", "--out", str(out),
                 "--backbone", "radial", "--host-options", json.dumps(HOST), "--no-progress", "--time-budget", "0.05m"]
    assert main(arguments) == 0
    assert time.monotonic() - started < 3.0 + 20.0  # 3 s of budget plus start-up and one batch and validation
    history = json.loads((out / "log.json").read_text())
    assert 1 <= len(history) < 100000
    assert all_finite(latent_lr.load(out / "best_model.pt").state_dict())
    # A budget that runs out during the first epoch still leaves a best model (the partial epoch's).
    tight = Trainer(tiny(dataset, tmp_path / "tight", epochs=5, time_budget=1e-3))
    tight.fit()
    assert tight.epoch == 0 and not (tmp_path / "tight" / "checkpoint.pt").exists()
    assert all_finite(latent_lr.load(tmp_path / "tight" / "best_model.pt").state_dict())
    assert main([*arguments[:-1], "soon"]) == 2


def test_time_budget_inside_a_later_epoch_keeps_the_checkpoint_of_the_last_complete_epoch(dataset, tmp_path, monkeypatch):
    stopped = Trainer(tiny(dataset, tmp_path / "stopped", epochs=5, time_budget=3600.0))
    # the budget runs out after the first batch of epoch 2 (only the in-epoch check passes a reserve)
    monkeypatch.setattr(stopped.budget, "expired", lambda reserve=None: reserve is not None and stopped.epoch >= 1)
    stopped.fit()
    one_epoch = Trainer(tiny(dataset, tmp_path / "one", epochs=1))
    one_epoch.fit()
    kept = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    reference = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert kept["epoch"] == reference["epoch"] == 1
    for name, value in reference["model"].items():
        assert torch.equal(kept["model"][name], value), name


def test_resume_with_weight_average_equals_uninterrupted(dataset, tmp_path):
    recipe = {"ema_decay": 0.8, "scheduler": "cosine", "warmup_epochs": 1, "stage_two_start": 3,
              "stage_two_energy_weight": 100.0, "amsgrad": True}
    straight = Trainer(tiny(dataset, tmp_path / "a", epochs=4, **recipe))
    straight.fit()
    Trainer(tiny(dataset, tmp_path / "b", epochs=2, **recipe)).fit()
    resumed = Trainer(tiny(dataset, tmp_path / "b", epochs=4, **recipe))
    assert resumed.resume() and resumed.epoch == 2
    resumed.fit()
    for a, b in [(straight.model, resumed.model), (straight.ema.model(), resumed.ema.model())]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(x, y, rtol=0, atol=1e-12), name
    assert [row["learning_rate"] for row in straight.history] == pytest.approx([row["learning_rate"] for row in resumed.history], rel=1e-14)
    assert [row["valid_loss"] for row in straight.history] == pytest.approx([row["valid_loss"] for row in resumed.history], rel=1e-10)
    best_a = latent_lr.load(tmp_path / "a" / "best_model.pt").state_dict()
    best_b = latent_lr.load(tmp_path / "b" / "best_model.pt").state_dict()
    assert all(torch.allclose(best_a[k], best_b[k], rtol=0, atol=1e-12) for k in best_a)
