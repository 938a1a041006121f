"""The training recipe around the step: optimiser, learning-rate schedule, weight average,
second stage, non-finite guard and wall-clock budget.

Each piece is built from :class:`~latent_lr.training.config.TrainConfig` and keeps its own
state (``state_dict`` / ``load_state_dict``) so that ``checkpoint.pt`` and ``--resume``
reproduce an uninterrupted run.  Everything is counted in epochs (the schedule steps once
per completed epoch) except the weight average, which is updated after every optimiser step.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, ReduceLROnPlateau, SequentialLR
from torch.optim.swa_utils import AveragedModel

from ..model import LongRangeModel
from .config import TrainConfig


def build_optimiser(parameters: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW at ``config.learning_rate`` (no weight decay), with AMSGrad when ``config.amsgrad``."""
    return torch.optim.AdamW(list(parameters), lr=config.learning_rate, weight_decay=0.0, amsgrad=config.amsgrad)


def clip_gradients(parameters: Sequence[torch.nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """The total 2-norm of the gradients (a 0-d tensor, no host sync), clipped to ``max_norm`` when it is set and > 0."""
    if max_norm:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


class StageTwo:
    """The second stage (as MACE's SWA stage): from epoch ``start`` (0-based) on, the loss uses
    ``stage_two_energy_weight`` / ``stage_two_forces_weight`` and, when set, the learning rate
    is held at ``stage_two_learning_rate``.

    ``config.stage_two_start`` below 1 is a fraction of ``epochs``, from 1 on an epoch number
    (the first epoch of stage two counts from 0).  Early stopping during stage one starts stage
    two at once (:meth:`start_now`).  ``start`` is None when there is no second stage.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        given = config.stage_two_start
        self.start: Optional[int] = None
        if given is not None:
            self.start = int(round(given * int(config.epochs))) if given < 1 else int(given)

    def active(self, epoch: int) -> bool:
        """True when epoch ``epoch`` (0-based) trains in stage two."""
        return self.start is not None and epoch >= self.start

    def begins(self, epoch: int) -> bool:
        """True when epoch ``epoch`` is the first of stage two."""
        return self.start is not None and epoch == self.start

    def start_now(self, epoch: int) -> bool:
        """Move the start to ``epoch`` if stage two is planned and not yet begun; True if it was moved."""
        if self.start is None or epoch >= self.start:
            return False
        self.start = epoch
        return True

    def loss_config(self, epoch: int) -> TrainConfig:
        """The settings whose loss weights apply in epoch ``epoch``."""
        if not self.active(epoch):
            return self.config
        energy, forces = self.config.stage_two_energy_weight, self.config.stage_two_forces_weight
        return replace(
            self.config,
            energy_weight=self.config.energy_weight if energy is None else energy,
            forces_weight=self.config.forces_weight if forces is None else forces,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = state["start"]


class LearningRateSchedule:
    """Per-epoch learning rate: optional linear warm-up, then ``plateau`` (halve on a validation
    plateau), ``cosine`` (to ``min_learning_rate`` at the start of stage two, or at the end) or
    ``constant``; from stage two on, ``stage_two_learning_rate`` when given.

    Warm-up: epoch e < W trains at lr·(f + (1 − f)·e/W), f = ``warmup_start_factor``,
    W = ``warmup_epochs``.  Cosine: epoch e ≥ W trains at
    η + (lr − η)·(1 + cos(π·(e − W)/T))/2 with η = ``min_learning_rate`` and T the epochs
    from the end of warm-up to the start of stage two (or to ``epochs``), then stays at η.
    Built from torch's LinearLR, SequentialLR, CosineAnnealingLR and ReduceLROnPlateau.
    """

    def __init__(self, optimiser: torch.optim.Optimizer, config: TrainConfig, main_epochs: int):
        self.optimiser = optimiser
        self.kind = config.scheduler
        self.warmup_epochs = config.warmup_epochs
        self.cosine_epochs = max(1, main_epochs - config.warmup_epochs)
        self.completed_epochs = 0
        self.fixed_rate: Optional[float] = None
        warmup = None
        if config.warmup_epochs:
            warmup = LinearLR(optimiser, start_factor=config.warmup_start_factor, end_factor=1.0, total_iters=config.warmup_epochs)
        self.epochwise: Optional[LRScheduler] = warmup
        if self.kind == "cosine":
            cosine = CosineAnnealingLR(optimiser, T_max=self.cosine_epochs, eta_min=config.min_learning_rate)
            self.epochwise = cosine if warmup is None else SequentialLR(optimiser, [warmup, cosine], milestones=[config.warmup_epochs])
        self.plateau: Optional[ReduceLROnPlateau] = None
        if self.kind == "plateau":
            patience = config.plateau_patience if config.plateau_patience is not None else max(1, int(config.patience) // 4)
            self.plateau = ReduceLROnPlateau(optimiser, factor=config.plateau_factor, patience=patience)

    def step(self, valid_loss: float) -> None:
        """Advance by one completed epoch whose validation loss was ``valid_loss``."""
        self.completed_epochs += 1
        if self.fixed_rate is not None:
            return
        if self.completed_epochs <= self.warmup_epochs or (
            self.kind == "cosine" and self.completed_epochs <= self.warmup_epochs + self.cosine_epochs
        ):
            if self.epochwise is not None:
                self.epochwise.step()
        elif self.plateau is not None:
            self.plateau.step(valid_loss)

    def begin_stage_two(self, learning_rate: Optional[float]) -> None:
        """Hold the rate at ``learning_rate`` (when given) and restart the plateau's memory (the loss changed)."""
        if learning_rate is not None:
            self.fixed_rate = learning_rate
            for group in self.optimiser.param_groups:
                group["lr"] = learning_rate
        if self.plateau is not None:
            self.plateau.best = self.plateau.mode_worse
            self.plateau.num_bad_epochs = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "completed_epochs": self.completed_epochs,
            "fixed_rate": self.fixed_rate,
            "epochwise": None if self.epochwise is None else self.epochwise.state_dict(),
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a checkpoint older than this module holds the plateau's state alone."""
        if "completed_epochs" not in state:
            if self.plateau is not None:
                self.plateau.load_state_dict(state)
            return
        self.completed_epochs, self.fixed_rate = state["completed_epochs"], state["fixed_rate"]
        if self.epochwise is not None and state["epochwise"] is not None:
            self.epochwise.load_state_dict(state["epochwise"])
        if self.plateau is not None and state["plateau"] is not None:
            self.plateau.load_state_dict(state["plateau"])


class WeightAverage:
    """Exponential moving average of the weights (torch's AveragedModel; buffers such as the
    reference energies follow the live model).  After the first step the average equals the
    weights; after step k > 1, W̄_k = d_k·W̄_(k−1) + (1 − d_k)·W_k with
    d_k = min(decay, k / (k + 9)) — the usual warm-up of the decay (TensorFlow's and
    torch-ema's ``num_updates`` rule, which MACE's ``--ema`` uses), so that a short run
    is not dominated by its first steps.
    """

    def __init__(self, model: LongRangeModel, decay: float):
        self.decay = decay
        self.updates = 0  # steps folded in so far (kept on the host: no device sync per step)
        self.averaged = AveragedModel(model, multi_avg_fn=self._average, use_buffers=False)

    @torch.no_grad()
    def _average(self, averaged: Union[list[torch.Tensor], tuple[torch.Tensor, ...]], current: Union[list[torch.Tensor], tuple[torch.Tensor, ...]], _: Union[torch.Tensor, int]) -> None:
        """Fold ``current`` (the weights after step ``updates``, ≥ 2) into ``averaged`` in place."""
        weight = 1.0 - min(self.decay, self.updates / (self.updates + 9.0))
        for mean, value in zip(averaged, current):
            mean.lerp_(value, weight)

    def update(self, model: LongRangeModel) -> None:
        """Fold the weights after an optimiser step into the average."""
        self.updates += 1
        self.averaged.update_parameters(model)

    def model(self) -> LongRangeModel:
        """The averaged model (a LongRangeModel sharing the average's tensors)."""
        module = self.averaged.module
        assert isinstance(module, LongRangeModel)
        return module

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.model().state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model().load_state_dict(state["weights"])
        self.updates = state["updates"]
        self.averaged.n_averaged.fill_(self.updates)


def parameters_finite(model: torch.nn.Module) -> bool:
    """True when every parameter of ``model`` is finite (one host sync)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


class NonFiniteGuard:
    """Keeps non-finite losses, gradients and weights out of training and out of saved files.

    A step whose loss or gradient norm is NaN/inf is skipped (no optimiser or average update)
    and the learning rate of every group is multiplied by ``lr_factor``; weights that become
    non-finite are rolled back by the trainer (:meth:`rolled_back`).  Each event prints one
    line to stderr; counts per epoch go to the log (``nonfinite_steps``, ``rollbacks``).
    """

    def __init__(self, optimiser: torch.optim.Optimizer, lr_factor: float):
        self.optimiser = optimiser
        self.lr_factor = lr_factor
        self.skipped_steps = 0
        self.rollbacks = 0

    @staticmethod
    def finite(loss_value: float, gradient_norm: float) -> bool:
        """Whether a step may be taken: its loss and gradient norm (read on the host together,
        one sync, summed over ranks under data-parallel training) are both finite."""
        return math.isfinite(loss_value) and math.isfinite(gradient_norm)

    def _lower_rate(self) -> float:
        for group in self.optimiser.param_groups:
            group["lr"] *= self.lr_factor
        return float(self.optimiser.param_groups[0]["lr"])

    def skipped(self, where: str, loss_value: float) -> None:
        """Record a skipped step at ``where`` (epoch, batch, frames), lower the rate, report it."""
        self.skipped_steps += 1
        rate = self._lower_rate()
        print(f"latent-lr: warning: non-finite loss or gradient ({loss_value}) at {where}; step skipped, learning rate lowered to {rate:.3g}.", file=sys.stderr)

    def rolled_back(self, where: str) -> None:
        """Record a roll-back of non-finite weights to the last good state, lower the rate, report it."""
        self.rollbacks += 1
        rate = self._lower_rate()
        print(f"latent-lr: warning: non-finite weights after {where}; rolled back to the last finite state, learning rate lowered to {rate:.3g}.", file=sys.stderr)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps, self.rollbacks = state["skipped_steps"], state["rollbacks"]


class TimeBudget:
    """A wall-clock limit in seconds (None: none), counted from :meth:`start` (the start of ``fit``)."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.started = time.monotonic()

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def expired(self, reserve: float = 0.0) -> bool:
        """True when less than ``reserve`` seconds (e.g. one validation pass) are left."""
        return self.seconds is not None and self.elapsed() + reserve >= self.seconds
