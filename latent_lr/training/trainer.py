"""Training loop: seeded, checkpointed every epoch, resumable, early-stopped."""

from __future__ import annotations

import csv
import json
import os
import random
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbone import adapter_class
from ..model import LongRangeModel
from ..serialization import load, save
from ..sign_convention import apply_sign_convention
from ..wrap import wrap
from .config import TrainConfig
from .dataset import Frame, LabelKeys, check_frame_elements, collate, read_frames
from .metrics import error_metrics, predict_frames
from .model_files import CHECKPOINT_MODEL_CONFIG, load_model_file
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

    Files: ``checkpoint.pt`` (after every epoch: model weights and architecture, optimiser, scheduler,
    epoch, best score), ``best_model.pt`` (read it with :func:`latent_lr.load`),
    ``log.csv`` and ``log.json`` (per-epoch losses and validation errors),
    ``config.json``.  A killed run restarted with ``resume=True`` continues
    from the last completed epoch, with the same data order.
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
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimiser = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimiser, factor=0.5, patience=max(1, config.patience // 4))
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

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` if present; True when resumed."""
        path = self.out / CHECKPOINT
        if not path.exists():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.scheduler.load_state_dict(state["scheduler"])
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

    def _run_epoch(self) -> float:
        self.model.train()
        total, count = 0.0, 0
        batches = list(self._batches(self.train_frames, self.config.seed * 100_003 + self.epoch))
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False, disable=not self.config.progress)
        for chunk in bar:
            data, targets = collate(chunk, self.model.dtype, self.model.device)
            self.optimiser.zero_grad(set_to_none=True)
            out = self.model(data, compute_forces="forces" in targets, compute_stress=False)
            loss = loss_function(self.config, out, targets, data.n_atoms.to(out["energy"].dtype))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.optimiser.step()
            total += loss.item() * len(chunk)
            count += len(chunk)
            bar.set_postfix(loss=f"{loss.item():.3g}")
        return total / max(count, 1)

    def validation_loss(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for chunk in self._batches(self.valid_frames, None):
            data, targets = collate(chunk, self.model.dtype, self.model.device)
            out = self.model(data, compute_forces="forces" in targets, compute_stress=False)
            total += loss_function(self.config, out, targets, data.n_atoms.to(out["energy"].dtype)).item() * len(chunk)
            count += len(chunk)
        return total / max(count, 1)

    def fit(self) -> LongRangeModel:
        """Train until ``epochs`` or early stopping; return the best model."""
        start_epoch = self.epoch
        bar = tqdm(range(start_epoch, self.config.epochs), desc="training", initial=start_epoch, total=self.config.epochs, disable=not self.config.progress)
        for _ in bar:
            if self.stale_epochs >= self.config.patience:
                break
            started = time.perf_counter()
            train_loss = self._run_epoch()
            valid_loss = self.validation_loss()
            self.scheduler.step(valid_loss)
            self.epoch += 1
            improved = valid_loss < self.best
            if improved:
                self.best, self.stale_epochs = valid_loss, 0
                save(self.model, self.out / BEST_MODEL)
            else:
                self.stale_epochs += 1
            row = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                "valid_loss": valid_loss,
                "learning_rate": self.optimiser.param_groups[0]["lr"],
                "seconds": time.perf_counter() - started,
            }
            self.history.append(row)
            self._write_logs()
            self._checkpoint()
            bar.set_postfix(train=f"{train_loss:.3g}", valid=f"{valid_loss:.3g}")
        self.apply_sign_convention()
        return load(self.out / BEST_MODEL)

    def apply_sign_convention(self) -> None:
        """Fix the sign of the latent charges of ``best_model.pt`` and of the checkpoint's model.

        Decided on the training frames (see :mod:`latent_lr.sign_convention`); writes
        ``sign_convention.json`` and prints the decision.
        """
        if not self.config.sign_convention or self.model.long_range is None:
            return
        frames = self.train_frames
        labels = {"dipole": [f.dipole for f in frames], "charges": [f.charges for f in frames]}
        weights = {"dipole": self.config.dipole_weight, "charges": self.config.charges_weight}
        trained_on = [name for name, values in labels.items() if weights[name] and any(v is not None for v in values)]
        structures = [f.atoms for f in frames]
        best = load(self.out / BEST_MODEL)
        decisions = {"best_model": apply_sign_convention(best, structures, labels, trained_on)}
        save(best, self.out / BEST_MODEL)
        decisions["checkpoint"] = apply_sign_convention(self.model, structures, labels, trained_on)
        self._checkpoint()
        (self.out / "sign_convention.json").write_text(json.dumps({k: d.to_dict() for k, d in decisions.items()}, indent=1))
        print(decisions["best_model"].summary())

    def _write_logs(self) -> None:
        with open(self.out / LOG_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.history[0]))
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
