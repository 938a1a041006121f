"""Training loop: seeded, checkpointed every epoch, resumable, early-stopped, guarded against non-finite steps."""

from __future__ import annotations

import copy
import csv
import json
import os
import random
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbone import adapter_class
from ..model import LongRangeModel
from ..serialization import load, save
from ..wrap import wrap
from .config import TrainConfig
from .dataset import Frame, LabelKeys, check_frame_elements, collate, read_frames
from .metrics import error_metrics, predict_frames
from .model_files import CHECKPOINT_EMA, CHECKPOINT_MODEL_CONFIG, load_model_file
from .recipe import (
    LearningRateSchedule,
    NonFiniteGuard,
    StageTwo,
    TimeBudget,
    WeightAverage,
    build_optimiser,
    clip_gradients,
    parameters_finite,
)
from .references import fit_reference_energies

CHECKPOINT = "checkpoint.pt"
BEST_MODEL = "best_model.pt"
LOG_CSV = "log.csv"


def label_keys(config: TrainConfig) -> LabelKeys:
    return LabelKeys(
        energy=config.energy_key,
        forces=config.forces_key,
        dipole=config.dipole_key,
        charges=config.charges_key,
        total_charge=config.total_charge_key,
        bec=config.bec_key,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_frames(config: TrainConfig) -> tuple[list[Frame], list[Frame]]:
    """Training and validation frames; a seeded split when no --valid file is given."""
    keys = label_keys(config)
    frames = read_frames(config.train, keys)
    if config.valid:
        return frames, read_frames(config.valid, keys)
    order = np.random.default_rng(config.seed).permutation(len(frames))
    n_valid = max(1, int(round(config.valid_fraction * len(frames))))
    if n_valid >= len(frames):
        raise ValueError(f"{config.train} has too few structures ({len(frames)}) to split off a validation set.")
    return [frames[i] for i in order[n_valid:]], [frames[i] for i in order[:n_valid]]


def build_model(config: TrainConfig, species: Sequence[int]) -> LongRangeModel:
    """A fresh (or fine-tuned) model as the config asks, seeded."""
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(config.seed)
    if config.init_model:
        model = load_model_file(config.init_model) if Path(config.init_model).exists() else None
        if model is None:
            host = adapter_class(config.backbone).pretrained_host(config.init_model)
            model = wrap(host, backbone=config.backbone, long_range=config.long_range, config=config.long_range_options)
        elif config.long_range and model.long_range is None:
            raise ValueError(f"{config.init_model} has no long-range module; train with --long-range off.")
    else:
        host = adapter_class(config.backbone).default_host(list(species), **config.host_options)
        model = wrap(host, backbone=config.backbone, long_range=config.long_range, config=config.long_range_options)
    if config.freeze_host:
        model.freeze_host()
    return model.to(dtype)


def loss_function(config: TrainConfig, out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], n_atoms: torch.Tensor) -> torch.Tensor:
    loss = out["energy"].new_zeros(())
    if "energy" in targets and config.energy_weight:
        loss = loss + config.energy_weight * (((out["energy"] - targets["energy"]) / n_atoms) ** 2).mean()
    if "forces" in targets and config.forces_weight:
        loss = loss + config.forces_weight * ((out["forces"] - targets["forces"]) ** 2).mean()
    if "dipole" in targets and config.dipole_weight and "dipole" in out:
        loss = loss + config.dipole_weight * ((out["dipole"] - targets["dipole"]) ** 2).mean()
    if "charges" in targets and config.charges_weight and "charges" in out:
        loss = loss + config.charges_weight * ((out["charges"] - targets["charges"]) ** 2).mean()
    return loss


def _atomic_write(payload: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


class Trainer:
    """Train one model as ``config`` says; every artefact goes to ``config.out``.

    Files: ``checkpoint.pt`` (after every epoch: model weights and architecture, the weight
    average, optimiser, schedule, stage-two and guard state, epoch, best score), ``best_model.pt``
    (read it with :func:`latent_lr.load`; the weight average when ``ema_decay`` is set),
    ``log.csv`` and ``log.json`` (per-epoch losses, learning rate, stage, non-finite events),
    ``config.json``.  A killed run restarted with ``resume=True`` continues
    from the last completed epoch, with the same data order.  The recipe's pieces live in
    :mod:`latent_lr.training.recipe`.
    """

    def __init__(self, config: TrainConfig):
        if not config.train:
            raise ValueError("no training data: set train (--train FILE).")
        self.config = config
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        self.train_frames, self.valid_frames = split_frames(config)
        self.test_frames = read_frames(config.test, label_keys(config)) if config.test else []
        frames = self.train_frames + self.valid_frames + self.test_frames
        self.species = sorted({int(z) for f in frames for z in f.atoms.numbers})
        self.model = build_model(config, self.species)
        if config.init_model:
            check_frame_elements(self.model.backbone.check_elements, frames)
        if not config.init_model:
            self._set_reference_energies()
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimiser = build_optimiser(self.trainable_parameters, config)
        self.stage_two = StageTwo(config)
        main_epochs = config.epochs if self.stage_two.start is None else self.stage_two.start
        self.scheduler = LearningRateSchedule(self.optimiser, config, main_epochs)
        self.ema = None if config.ema_decay is None else WeightAverage(self.model, config.ema_decay)
        self.guard = NonFiniteGuard(self.optimiser, config.nonfinite_lr_factor)
        self.budget = TimeBudget(None if config.time_budget is None else float(config.time_budget))
        self.validation_seconds = 0.0
        self.epoch = 0
        self.best = float("inf")
        self.stale_epochs = 0
        self.history: list[dict] = []
        (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def _set_reference_energies(self) -> None:
        given = self.config.reference_energies
        if given == "fit":
            references = fit_reference_energies(self.train_frames, self.species)
        elif isinstance(given, dict):
            references = {int(z): float(e) for z, e in given.items()}
        else:
            references = {}
        for z, energy in references.items():
            self.model.reference_energy[z] = energy

    @property
    def evaluated_model(self) -> LongRangeModel:
        """The model that validation scores and ``best_model.pt`` holds: the weight average when ``ema_decay`` is set."""
        return self.model if self.ema is None else self.ema.model()

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` if present; True when resumed."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "stage_two" in state:
            self.stage_two.load_state_dict(state["stage_two"])
            self.guard.load_state_dict(state["guard"])
        if self.ema is not None and state.get(CHECKPOINT_EMA) is not None:
            self.ema.load_state_dict(state[CHECKPOINT_EMA])
        elif self.ema is not None:  # a run without a weight average continues with one, started now
            self.ema = WeightAverage(self.model, self.ema.decay)
        self.epoch, self.best, self.stale_epochs = state["epoch"], state["best"], state["stale_epochs"]
        self.history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        return True

    def _checkpoint(self) -> None:
        _atomic_write(
            {
                "model": self.model.state_dict(),
                CHECKPOINT_MODEL_CONFIG: self.model.config(),
                "optimiser": self.optimiser.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                CHECKPOINT_EMA: None if self.ema is None else self.ema.state_dict(),
                "stage_two": self.stage_two.state_dict(),
                "guard": self.guard.state_dict(),
                "epoch": self.epoch,
                "best": self.best,
                "stale_epochs": self.stale_epochs,
                "history": self.history,
                "torch_rng": torch.get_rng_state(),
            },
            self.out / CHECKPOINT,
        )

    def _batches(self, frames: Sequence[Frame], shuffle_seed: Optional[int]):
        order = np.arange(len(frames))
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(len(frames))
        size = self.config.batch_size
        for start in range(0, len(frames), size):
            yield [frames[i] for i in order[start : start + size]]

    def _run_epoch(self) -> tuple[float, bool]:
        """Train one epoch: the mean loss of its finite steps (NaN if none) and whether it ran to
        its end (False: the time budget ran out, keeping time for one validation pass)."""
        self.model.train()
        loss_config = self.stage_two.loss_config(self.epoch)
        total, count = 0.0, 0
        batches = list(self._batches(self.train_frames, self.config.seed * 100_003 + self.epoch))
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False, disable=not self.config.progress)
        for index, chunk in enumerate(bar):
            data, targets = collate(chunk, self.model.dtype, self.model.device)
            self.optimiser.zero_grad(set_to_none=True)
            out = self.model(data, compute_forces="forces" in targets, compute_stress=False)
            loss = loss_function(loss_config, out, targets, data.n_atoms.to(out["energy"].dtype))
            loss.backward()
            gradient_norm = clip_gradients(self.trainable_parameters, self.config.gradient_clip)
            loss_value, finite = self.guard.check(loss, gradient_norm)
            if finite:
                self.optimiser.step()
                if self.ema is not None:
                    self.ema.update(self.model)
                total += loss_value * len(chunk)
                count += len(chunk)
            else:
                frames = ", ".join(frame.location for frame in chunk)
                self.guard.skipped(f"epoch {self.epoch + 1}, batch {index + 1} ({frames})", loss_value)
                self.optimiser.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss_value:.3g}")
            if self.budget.expired(reserve=self.validation_seconds):
                return (total / count if count else float("nan")), False
        return (total / count if count else float("nan")), True

    def validation_loss(self) -> float:
        """Mean loss over the validation frames, of :attr:`evaluated_model`, with this epoch's loss weights."""
        model = self.evaluated_model
        model.eval()
        loss_config = self.stage_two.loss_config(self.epoch)
        total, count = 0.0, 0
        for chunk in self._batches(self.valid_frames, None):
            data, targets = collate(chunk, model.dtype, model.device)
            out = model(data, compute_forces="forces" in targets, compute_stress=False)
            total += loss_function(loss_config, out, targets, data.n_atoms.to(out["energy"].dtype)).item() * len(chunk)
            count += len(chunk)
        return total / max(count, 1)

    def _training_state(self) -> dict[str, Any]:
        """A copy of the weights, optimiser and weight average (what a roll-back restores)."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
        })

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])

    def _weights_finite(self) -> bool:
        return parameters_finite(self.model) and (self.ema is None or parameters_finite(self.ema.model()))

    def _begin_stage_two(self) -> None:
        """Switch the loss weights (and the rate, if given); scores of stage one are not comparable, so forget them."""
        self.scheduler.begin_stage_two(self.config.stage_two_learning_rate)
        self.best, self.stale_epochs = float("inf"), 0
        weights = self.stage_two.loss_config(self.epoch)
        print(f"stage two from epoch {self.epoch + 1}: energy weight {weights.energy_weight}, forces weight {weights.forces_weight}, "
              f"learning rate {self.optimiser.param_groups[0]['lr']:.3g}")

    def _save_if_best(self, valid_loss: float) -> bool:
        """Write ``best_model.pt`` when ``valid_loss`` beats the best so far (or no best model exists yet); True if it did."""
        improved = valid_loss < self.best
        if improved or not (self.out / BEST_MODEL).exists():
            save(self.evaluated_model, self.out / BEST_MODEL)
        if improved:
            self.best = valid_loss
        return improved

    def fit(self) -> LongRangeModel:
        """Train until ``epochs`` or early stopping; return the best model."""
        """Train until ``epochs``, early stopping or the time budget; return the best model.

        Early stopping during stage one starts stage two instead (when one is set).  When the
        time budget runs out mid-epoch, the partial epoch is validated and may become the best
        model, but is not checkpointed (``--resume`` repeats it).  Weights that turn non-finite
        are rolled back to the end of the previous epoch before anything is saved.
        """
        self.budget.start()
        last_good = self._training_state()
        start_epoch = self.epoch
        bar = tqdm(range(start_epoch, self.config.epochs), desc="training", initial=start_epoch, total=self.config.epochs, disable=not self.config.progress)
        for _ in bar:
            if self.stale_epochs >= self.config.patience:
                if not self.stage_two.start_now(self.epoch):
                    break
                print(f"no improvement for {self.stale_epochs} epochs: stage two starts early")
            if self.stage_two.begins(self.epoch):
                self._begin_stage_two()
            started = time.perf_counter()
            skipped, rollbacks = self.guard.skipped_steps, self.guard.rollbacks
            train_loss, complete = self._run_epoch()
            if not self._weights_finite():
                self._restore(last_good)
                self.guard.rolled_back(f"epoch {self.epoch + 1}")
            validation_started = time.perf_counter()
            valid_loss = self.validation_loss()
            self.validation_seconds = time.perf_counter() - validation_started
            if not complete:
                self._save_if_best(valid_loss)
                print(f"time budget of {self.config.time_budget:g} s reached during epoch {self.epoch + 1} "
                      f"(validation loss {valid_loss:.4g}); best model: {self.out / BEST_MODEL}")
                break
            self.scheduler.step(valid_loss)
            stage = 2 if self.stage_two.active(self.epoch) else 1
            self.epoch += 1
            self.stale_epochs = 0 if self._save_if_best(valid_loss) else self.stale_epochs + 1
            row = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "learning_rate": self.optimiser.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
                "stage": stage,
                "nonfinite_steps": self.guard.skipped_steps - skipped,
                "rollbacks": self.guard.rollbacks - rollbacks,
            }
            self.history.append(row)
            self._write_logs()
            self._checkpoint()
            last_good = self._training_state()
            bar.set_postfix(train=f"{train_loss:.3g}", valid=f"{valid_loss:.3g}")
            if self.budget.expired():
                print(f"time budget of {self.config.time_budget:g} s reached after epoch {self.epoch}; best model: {self.out / BEST_MODEL}")
                break
        return load(self.out / BEST_MODEL)

    def _write_logs(self) -> None:
        names = list(dict.fromkeys(name for row in self.history for name in row))  # rows of older runs lack newer columns
        with open(self.out / LOG_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(self.history)
        (self.out / "log.json").write_text(json.dumps(self.history, indent=1))

    def evaluate(self, model: LongRangeModel, frames: Sequence[Frame]) -> tuple[dict[str, float], dict]:
        """Errors on ``frames`` plus the raw predictions."""
        want_bec = any(f.bec is not None for f in frames)
        predictions = predict_frames(model, frames, self.config.batch_size, compute_bec=want_bec)
        return error_metrics(frames, predictions), predictions


def train(config: TrainConfig, resume: bool = False) -> Trainer:
    """Train (or resume) as ``config`` says; return the trainer (``.model`` is the last state)."""
    trainer = Trainer(config)
    if resume and trainer.resume():
        print(f"resumed from {trainer.out / CHECKPOINT} after epoch {trainer.epoch}")
    trainer.fit()
    return trainer
