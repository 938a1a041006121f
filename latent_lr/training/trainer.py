"""Training loop: seeded, checkpointed every epoch, resumable, early-stopped, guarded against non-finite steps, data-parallel."""

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
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.futures import Future
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..backbone import adapter_class
from ..errors import UserInputError
from ..host_files import LATENT_LR_FILE, identify_file, load_host
from ..info_keys import InfoKeys
from ..model import LongRangeModel
from ..neighbors import edge_count
from ..serialization import load, save
from ..sign_convention import MAX_STRUCTURES as SIGN_STRUCTURES
from ..sign_convention import apply_sign_convention
from ..wrap import wrap
from . import distributed
from .config import TrainConfig
from .data_files import open_frames
from .dataset import Frame, LabelKeys, check_frame_elements, collate
from .defaults import DataSummary, is_charged, resolve_auto_settings
from .frame_sets import BatchReader, FrameList, FrameSet, FrameSubset
from .loss import (
    TERMS,
    charge_excess_penalty,
    common_labels,
    label_counts,
    loss_function,
    squared_error_sums,
    weighted_loss,
)
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
from .sampler import EpochPlan, oversized_structures, plan_epoch

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
        total_spin=config.total_spin_key,
        multiplicity=config.multiplicity_key,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_frames(config: TrainConfig) -> tuple[FrameSet, FrameSet]:
    """Training and validation frames; a seeded split when no --valid file is given.

    Prepared (HDF5) files stay on disk: the sets read frames when asked for.
    """
    keys = label_keys(config)
    frames = open_frames(config.train, keys)
    if config.valid:
        return frames, open_frames(config.valid, keys)
    order = np.random.default_rng(config.seed).permutation(len(frames))
    n_valid = max(1, int(round(config.valid_fraction * len(frames))))
    if n_valid >= len(frames):
        raise ValueError(f"{config.train} has too few structures ({len(frames)}) to split off a validation set.")
    return FrameSubset(frames, order[n_valid:]), FrameSubset(frames, order[:n_valid])


def build_model(config: TrainConfig, species: Sequence[int]) -> LongRangeModel:
    """A fresh (or fine-tuned) model as the config asks, seeded.

    ``init_model``: a latent-lr file continues as saved; a backbone's own file
    (or pretrained name) is read by :func:`~latent_lr.host_files.load_host` and
    wrapped, its own reference energies (E0s) kept as the baseline.
    """
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(config.seed)
    source = config.init_model
    identified = identify_file(source) if source and Path(source).is_file() else None  # the one read of the file
    if source and identified is not None and identified.kind == LATENT_LR_FILE:
        model = load_model_file(source, payload=identified.payload)
        if config.long_range and model.long_range is None:
            raise ValueError(f"{source} has no long-range module; train with --long-range off.")
    else:
        if source:
            named = None if identified is not None else config.backbone
            host = load_host(source, backbone=named, trust_pickle=config.trust_pickle, identified=identified)
        else:
            host = adapter_class(config.backbone).default_host(list(species), **config.host_options)
        model = wrap(host, long_range=config.long_range, config=config.long_range_options,
                     backbone=None if source else config.backbone)
    if config.freeze_host:
        model.freeze_host(trainable=config.trainable_host_parameters)
    model.info_keys = InfoKeys.of_training(config.total_charge_key, config.total_spin_key, config.multiplicity_key)
    return model.to(dtype)


def _atomic_write(payload: dict, path: Path) -> None:
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


class BucketClock:
    """When DDP last handed a gradient bucket to the all-reduce: the end of this rank's own backward work.

    The state of :func:`timed_allreduce`, DDP's communication hook, so that a step's
    busy time (this rank's work) and its wait (for the slowest rank and the
    reduction) can be told apart.
    """

    def __init__(self) -> None:
        self.last_bucket = 0.0


def timed_allreduce(clock: BucketClock, bucket: torch.distributed.GradBucket) -> Future[torch.Tensor]:
    """DDP's default all-reduce (mean over ranks) of one gradient bucket, time-stamped in ``clock``."""
    clock.last_bucket = time.perf_counter()
    return allreduce_hook(None, bucket)  # type: ignore[arg-type]  # None: the default process group


# DDP checks a hook's annotations as objects; this module's are strings (postponed evaluation).
timed_allreduce.__annotations__.update(bucket=torch.distributed.GradBucket, clock=BucketClock)
timed_allreduce.__annotations__["return"] = Future[torch.Tensor]


class Trainer:
    """Train one model as ``config`` says; every artefact goes to ``config.out``.

    Files: ``checkpoint.pt`` (after every epoch: model weights and architecture, the weight
    average, optimiser, schedule, stage-two and guard state, epoch, best score), ``best_model.pt``
    (read it with :func:`latent_lr.load`; the weight average when ``ema_decay`` is set),
    ``log.csv`` and ``log.json`` (per-epoch losses, learning rate, stage, non-finite events,
    throughput and, under DDP, each rank's busy share), ``config.json``.  A killed run
    restarted with ``resume=True`` continues from the last completed epoch, with the same
    data order.  The recipe's pieces live in :mod:`latent_lr.training.recipe`.

    With ``config.distributed`` (a launcher started several processes) the model is
    wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`; each rank trains on
    its shard of every step's global batch, the loss is normalised over the global
    batch, validation sums are all-reduced (so the schedule and early stopping decide
    alike everywhere), as are each step's loss, its finiteness and the time-budget flag
    (so every rank skips, rolls back or stops together), and rank 0 alone writes files.
    """

    def __init__(self, config: TrainConfig):
        if not config.train:
            raise ValueError("no training data: set train (--train FILE).")
        self.config = config
        self.ranks = distributed.start(config.device, config.distributed)
        self.out = Path(config.out)
        if self.ranks.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        self.train_frames, self.valid_frames = split_frames(config)
        self.test_frames: FrameSet = open_frames(config.test, label_keys(config)) if config.test else FrameList([])
        frame_sets = (self.train_frames, self.valid_frames, self.test_frames)
        self.species = sorted(set().union(*(part.species() for part in frame_sets)))
        self.charged = is_charged(self.train_frames, config.total_charge_key)
        self._resolve_charge_redistribution()
        self.model = build_model(self.config, self.species)
        if config.init_model:
            for part in frame_sets:
                check_frame_elements(self.model.backbone.check_elements, part)
        self._sizes: dict[int, tuple[np.ndarray, Optional[np.ndarray]]] = {}
        self._batch_sizes(self.train_frames)
        self._resolve_auto_settings()
        config = self.config  # resolved: from here on every "auto" setting is a number
        self._train_labels = {term: self.train_frames.label_mask(term) for term in TERMS}
        if not config.init_model:
            self._set_reference_energies()
        self.model.to(self.ranks.device)
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None if config.ema_decay is None else WeightAverage(self.model, config.ema_decay)
        self.network: torch.nn.Module = self.model
        self.clock = BucketClock()
        self.waited = 0.0  # seconds this rank waited for the others in the current epoch (DDP)
        if self.ranks.distributed:
            self.network = DistributedDataParallel(
                self.model, device_ids=[self.ranks.device.index] if self.ranks.device.type == "cuda" else None,
                forward_sync_buffers=False,  # buffers (reference energies) are equal: synced once, at start
                find_unused_parameters=self._has_unused_parameters(),
            )
            self.network.register_comm_hook(self.clock, timed_allreduce)
        self.optimiser = build_optimiser(self.trainable_parameters, config)
        self.stage_two = StageTwo(config)
        main_epochs = int(self.config.epochs) if self.stage_two.start is None else self.stage_two.start
        self.scheduler = LearningRateSchedule(self.optimiser, config, main_epochs)
        self.guard = NonFiniteGuard(self.optimiser, config.nonfinite_lr_factor)
        self.budget = TimeBudget(None if config.time_budget is None else float(config.time_budget))
        self.validation_seconds = 0.0
        self.epoch = 0
        self.best = float("inf")
        self.stale_epochs = 0
        self.history: list[dict] = []
        if self.ranks.is_main:
            (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    def _resolve_auto_settings(self) -> None:
        """Replace the ``"auto"`` settings of ``self.config`` by values chosen from the training set (see
        :mod:`~latent_lr.training.defaults`) and print them; ``config.json`` then stores the resolved values."""
        data = DataSummary(len(self.train_frames), len(self.epoch_plan(0)[0]), self.charged)
        self.config, message = resolve_auto_settings(self.config, data)
        if message:
            self._say(message)

    def _resolve_charge_redistribution(self) -> None:
        """``charge_redistribution="auto"``: fragments for charged training data, else learned (printed, and
        stored in ``config.json`` and the model file)."""
        options = self.config.long_range_options
        resolved = options.resolved_for(self.charged)
        if self.config.long_range and resolved != options:
            self.config = self.config.updated({"long_range_options": resolved.to_dict()})
            self._say(f"auto settings: charge redistribution {resolved.charge_redistribution} "
                      f"(because: {'charged' if self.charged else 'neutral'} training data)")

    def _has_unused_parameters(self) -> bool:
        """Whether some trainable parameter gets no gradient from the loss (e.g. CHGNet's magnetic-moment head).

        Probed by one forward and backward pass on this rank's first training batch
        (no optimiser step; the gradients are dropped) and agreed over ranks: DDP must
        then search the graph for unused parameters every step, which it otherwise skips.
        """
        self.model.train()
        chunk = self.train_frames.frames(self.epoch_plan(0)[self.ranks.rank][0])
        data, targets = collate(chunk, self.model.dtype, self.ranks.device)
        out = self.model(data, compute_forces="forces" in targets, compute_stress=False, check_inputs=False)
        loss_function(self.config, out, targets, chunk).backward()
        unused = any(parameter.grad is None for parameter in self.trainable_parameters)
        self.model.zero_grad(set_to_none=True)
        flags = torch.tensor(float(unused), dtype=torch.float64, device=self.ranks.device)
        return float(distributed.sum_over_ranks(flags)) > 0.0

    @property
    def eval_dtype(self) -> torch.dtype:
        """Precision of validation and evaluation (``config.eval_dtype``, default the training dtype)."""
        return getattr(torch, self.config.eval_dtype or self.config.dtype)

    def _set_reference_energies(self) -> None:
        """Per-element reference energies, fitted on the whole training set.

        Every rank holds every training frame and fits the same least-squares
        problem; DDP's start-up broadcast of rank 0's buffers then makes them equal bit for bit.
        """
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
        """Load ``checkpoint.pt`` if present (every rank reads rank 0's file); True when resumed."""
        path = self.out / CHECKPOINT
        distributed.barrier()
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.ranks.device, weights_only=False)
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
        torch.set_rng_state(state["torch_rng"].cpu())
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

    def _batch_sizes(self, frames: FrameSet) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(S,) atoms and, with an edge budget, (S,) directed edges per structure of ``frames`` (computed once)."""
        key = id(frames)
        if key not in self._sizes:
            n_atoms = frames.n_atoms
            n_edges = None
            if self.config.max_edges_per_batch is not None:
                cutoff = self.model.backbone.cutoff
                n_edges = np.array([edge_count(frame.atoms, cutoff) for frame in frames], dtype=np.int64)
            too_big = oversized_structures(n_atoms, n_edges, self.config.max_atoms_per_batch, self.config.max_edges_per_batch)
            if too_big:
                frame = frames[too_big[0]]
                edges = "" if n_edges is None else f", {n_edges[too_big[0]]} edges"
                raise UserInputError(
                    f"{frame.location}: {len(frame.atoms)} atoms{edges} exceed the per-batch budget "
                    f"({len(too_big)} structures do); raise --max-atoms-per-batch / --max-edges-per-batch."
                )
            self._sizes[key] = (n_atoms, n_edges)
        return self._sizes[key]

    def _plan(self, frames: FrameSet, epoch: Optional[int], world_size: int) -> EpochPlan:
        """``plan[rank][step]``: indices into ``frames`` of each rank's batches, shuffled for epoch ``epoch``, in order when None.

        Fixed ``batch_size`` or an atom/edge budget, as the config says (:func:`~latent_lr.training.sampler.plan_epoch`).
        """
        n_atoms, n_edges = self._batch_sizes(frames)
        budget = self.config.max_atoms_per_batch is not None or self.config.max_edges_per_batch is not None
        return plan_epoch(
            n_atoms, n_edges, batch_size=None if budget else self.config.batch_size,
            max_atoms=self.config.max_atoms_per_batch, max_edges=self.config.max_edges_per_batch,
            world_size=world_size, seed=self.config.seed, epoch=epoch or 0, shuffle=epoch is not None,
        )

    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The training plan of ``epoch`` for this run's ranks (every rank computes the same)."""
        return self._plan(self.train_frames, epoch, self.ranks.world_size)

    def _batches(self, frames: FrameSet, epoch: Optional[int], rank: int = 0, world_size: int = 1) -> BatchReader:
        """Rank ``rank``'s batches of ``frames`` (see :meth:`_plan`); a batch's frames are read when the iteration reaches it."""
        return BatchReader(frames, self._plan(frames, epoch, world_size)[rank])

    def _step(self, chunk: Sequence[Frame], step: np.ndarray, loss_config: TrainConfig, stop_requested: bool) -> tuple[float, bool, bool]:
        """One guarded optimiser step on this rank's ``chunk`` of the global batch (training-frame indices ``step``).

        The loss is normalised by the global batch's counts (atom counts and label masks
        known on every rank, no communication) and multiplied by the number of ranks,
        because DDP averages the gradients over ranks: the gradient is that of one
        process with the whole batch.  The ranks' loss shares and ``stop_requested``
        flags are summed in one all-reduce, read with one host sync: every rank sees
        the global batch's loss, skips a non-finite step (no optimiser or average
        update, rate lowered) and stops for the time budget alike.

        Returns (the global batch's loss, whether the step was taken, whether any rank asked to
        stop); adds this step's waiting time (s) to ``self.waited``: from the last gradient bucket
        handed to DDP's all-reduce to the end of the backward pass, and the flags' all-reduce.
        """
        labels = common_labels({term: mask[step] for term, mask in self._train_labels.items()})
        data, targets = collate(chunk, self.model.dtype, self.ranks.device)
        targets = {name: value for name, value in targets.items() if name in labels}
        self.optimiser.zero_grad(set_to_none=True)
        out = self.network(data, compute_forces="forces" in labels, compute_stress=False, check_inputs=False)
        n_atoms = torch.tensor([len(f.atoms) for f in chunk], dtype=out["energy"].dtype, device=self.ranks.device)
        sums = squared_error_sums(loss_config, out, targets, n_atoms)
        loss = weighted_loss(loss_config, sums, label_counts(self.train_frames.n_atoms[step]), out["energy"])
        loss = loss + charge_excess_penalty(loss_config, out, len(self.train_frames.n_atoms[step]))
        (loss * self.ranks.world_size).backward()
        backward_done = time.perf_counter()
        gradient_norm = clip_gradients(self.trainable_parameters, self.config.gradient_clip)  # equal on all ranks (after DDP)
        shared = torch.stack([loss.detach().to(torch.float64), gradient_norm.detach().to(torch.float64).reshape(()),
                              torch.tensor(float(stop_requested), dtype=torch.float64, device=self.ranks.device)])
        reduce_started = time.perf_counter()
        loss_value, norm_sum, stops = distributed.sum_over_ranks(shared).tolist()
        if self.ranks.distributed:
            self.waited += (backward_done - self.clock.last_bucket) + (time.perf_counter() - reduce_started)
        finite = self.guard.finite(loss_value, norm_sum)
        if finite:
            self.optimiser.step()
            if self.ema is not None:
                self.ema.update(self.model)
        else:
            self.optimiser.zero_grad(set_to_none=True)
        return loss_value, finite, stops > 0

    def _run_epoch(self) -> tuple[float, bool]:
        """Train one epoch: the mean loss per structure of its finite steps (NaN if none) and whether it
        ran to its end (False: the time budget ran out on some rank, keeping time for one validation
        pass).  Sets ``self.epoch_report`` (throughput, ranks' busy shares)."""
        self.network.train()
        loss_config = self.stage_two.loss_config(self.epoch)
        plan = self.epoch_plan(self.epoch)
        mine = plan[self.ranks.rank]
        total, count = 0.0, 0
        processed_structures = processed_atoms = 0
        self.waited = 0.0
        started = time.perf_counter()
        complete = True
        batches = BatchReader(self.train_frames, mine)
        bar = tqdm(batches, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False, disable=not (self.config.progress and self.ranks.is_main))
        for index, chunk in enumerate(bar):
            step = np.concatenate([shard[index] for shard in plan]).astype(np.int64)
            stop_requested = index + 1 < len(mine) and self.budget.expired(reserve=self.validation_seconds)
            loss_value, finite, stop = self._step(chunk, step, loss_config, stop_requested)
            processed_structures += len(step)
            processed_atoms += int(self.train_frames.n_atoms[step].sum())
            if finite:
                total += loss_value * len(step)
                count += len(step)
            else:
                frames = ", ".join(frame.location for frame in chunk)
                self.guard.skipped(f"epoch {self.epoch + 1}, batch {index + 1} (rank {self.ranks.rank}: {frames})", loss_value)
            bar.set_postfix(loss=f"{loss_value:.3g}")
            if stop:
                complete = False
                break
        seconds = time.perf_counter() - started
        self.epoch_report = {
            "train_seconds": seconds, "structures_per_s": processed_structures / seconds, "atoms_per_s": processed_atoms / seconds,
        }
        if self.ranks.distributed:
            shares = distributed.gather_over_ranks(1.0 - self.waited / seconds, self.ranks)
            self.epoch_report.update({f"rank{rank}_busy_fraction": share for rank, share in enumerate(shares)})
            self.epoch_report["idle_fraction"] = 1.0 - sum(shares) / len(shares)
        return (total / count if count else float("nan")), complete

    def validation_loss(self) -> float:
        """The loss (see :mod:`~latent_lr.training.loss`) over all validation frames, of
        :attr:`evaluated_model` in ``eval_dtype``, with this epoch's loss weights.

        Each rank takes its share of the frames (in order); the sums and counts are
        all-reduced, so every rank gets the same value.
        """
        model = self.evaluated_model
        model = model if self.eval_dtype == model.dtype else copy.deepcopy(model).to(self.eval_dtype)
        model.eval()
        loss_config = self.stage_two.loss_config(self.epoch)
        sums = torch.zeros(2 * len(TERMS), dtype=torch.float64, device=self.ranks.device)
        for chunk in self._batches(self.valid_frames, None, self.ranks.rank, self.ranks.world_size):
            data, targets = collate(chunk, model.dtype, self.ranks.device)
            out = model(data, compute_forces="forces" in targets, compute_stress=False, check_inputs=False)
            n_atoms = torch.tensor([len(f.atoms) for f in chunk], dtype=out["energy"].dtype, device=self.ranks.device)
            counts = label_counts(np.array([len(f.atoms) for f in chunk]))
            for term, total in squared_error_sums(loss_config, out, targets, n_atoms).items():
                index = TERMS.index(term)
                sums[index] += total.detach().to(torch.float64)
                sums[len(TERMS) + index] += counts[term]
        totals = distributed.sum_over_ranks(sums).tolist()
        loss = 0.0
        for index, term in enumerate(TERMS):
            if totals[len(TERMS) + index]:
                loss += getattr(loss_config, f"{term}_weight") * totals[index] / totals[len(TERMS) + index]
        return loss

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
        """True when the weights (and their average) are finite on every rank."""
        finite = parameters_finite(self.model) and (self.ema is None or parameters_finite(self.ema.model()))
        flags = torch.tensor(0.0 if finite else 1.0, dtype=torch.float64, device=self.ranks.device)
        return float(distributed.sum_over_ranks(flags)) == 0.0

    def _begin_stage_two(self) -> None:
        """Switch the loss weights (and the rate, if given); scores of stage one are not comparable, so forget them."""
        self.scheduler.begin_stage_two(self.config.stage_two_learning_rate)
        self.best, self.stale_epochs = float("inf"), 0
        weights = self.stage_two.loss_config(self.epoch)
        self._say(f"stage two from epoch {self.epoch + 1}: energy weight {weights.energy_weight}, forces weight {weights.forces_weight}, "
                  f"learning rate {self.optimiser.param_groups[0]['lr']:.3g}")

    def _say(self, message: str) -> None:
        """Print ``message`` once (on rank 0)."""
        if self.ranks.is_main:
            print(message)

    def _save_if_best(self, valid_loss: float) -> bool:
        """Write ``best_model.pt`` (rank 0) when ``valid_loss`` beats the best so far (or no best model exists yet); True if it did."""
        improved = valid_loss < self.best
        if self.ranks.is_main and (improved or not (self.out / BEST_MODEL).exists()):
            save(self.evaluated_model, self.out / BEST_MODEL)
        if improved:
            self.best = valid_loss
        return improved

    def _budget_expired(self) -> bool:
        """The time budget ran out on some rank (all ranks get the same answer)."""
        flags = torch.tensor(float(self.budget.expired()), dtype=torch.float64, device=self.ranks.device)
        return float(distributed.sum_over_ranks(flags)) > 0.0

    def fit(self) -> LongRangeModel:
        """Train until ``epochs``, early stopping or the time budget; return the best model (in ``eval_dtype``).

        Early stopping during stage one starts stage two instead (when one is set).  When the
        time budget runs out mid-epoch, the partial epoch is validated and may become the best
        model, but is not checkpointed (``--resume`` repeats it): the live state returns to the
        end of the last completed epoch.  Weights that turn non-finite
        are rolled back to the end of the previous epoch before anything is saved.
        """
        self.budget.start()
        last_good = self._training_state()
        start_epoch = self.epoch
        epochs = int(self.config.epochs)
        bar = tqdm(range(start_epoch, epochs), desc="training", initial=start_epoch, total=epochs, disable=not (self.config.progress and self.ranks.is_main))
        for _ in bar:
            if self.stale_epochs >= int(self.config.patience):
                if not self.stage_two.start_now(self.epoch):
                    break
                self._say(f"no improvement for {self.stale_epochs} epochs: stage two starts early")
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
                self._restore(last_good)  # the live state is again the checkpointed one; --resume repeats this epoch
                self._say(f"time budget of {self.config.time_budget:g} s reached during epoch {self.epoch + 1} "
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
                **self.epoch_report,
            }
            self.history.append(row)
            if self.ranks.is_main:
                self._write_logs()
                self._checkpoint()
            last_good = self._training_state()
            bar.set_postfix(train=f"{train_loss:.3g}", valid=f"{valid_loss:.3g}")
            if self._budget_expired():
                self._say(f"time budget of {self.config.time_budget:g} s reached after epoch {self.epoch}; best model: {self.out / BEST_MODEL}")
                break
        self.apply_sign_convention()
        distributed.barrier()
        return load(self.out / BEST_MODEL).to(self.ranks.device, self.eval_dtype)

    def apply_sign_convention(self) -> None:
        """Fix the sign of the latent charges of ``best_model.pt`` and of the checkpoint's model.

        Decided on the training frames (see :mod:`latent_lr.sign_convention`); writes
        ``sign_convention.json`` and prints the decision.
        """
        if not self.config.sign_convention or self.model.long_range is None:
            return
        frames = self.train_frames[:SIGN_STRUCTURES]  # the convention reads no more than these
        labels = {"dipole": [f.dipole for f in frames], "charges": [f.charges for f in frames]}
        weights = {"dipole": self.config.dipole_weight, "charges": self.config.charges_weight}
        trained_on = [name for name, values in labels.items() if weights[name] and any(v is not None for v in values)]
        structures = [f.atoms for f in frames]
        # every rank flips its own copies alike (same weights, same frames), so the ranks stay identical
        checkpoint_decision = apply_sign_convention(self.model, structures, labels, trained_on)
        if self.ema is not None:
            apply_sign_convention(self.ema.model(), structures, labels, trained_on)
        if not self.ranks.is_main:
            return
        best = load(self.out / BEST_MODEL)
        decisions = {"best_model": apply_sign_convention(best, structures, labels, trained_on), "checkpoint": checkpoint_decision}
        save(best, self.out / BEST_MODEL)
        if (self.out / CHECKPOINT).exists():  # a run stopped inside its first epoch has none
            self._checkpoint()
        (self.out / "sign_convention.json").write_text(json.dumps({k: d.to_dict() for k, d in decisions.items()}, indent=1))
        print(decisions["best_model"].summary())

    def _write_logs(self) -> None:
        names = list(dict.fromkeys(name for row in self.history for name in row))  # rows of older runs lack newer columns
        with open(self.out / LOG_CSV, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=names, restval="")
            writer.writeheader()
            writer.writerows(self.history)
        (self.out / "log.json").write_text(json.dumps(self.history, indent=1))

    def evaluate(self, model: LongRangeModel, frames: Sequence[Frame]) -> tuple[dict[str, float], dict]:
        """Errors on ``frames`` plus the raw predictions (the model cast to ``eval_dtype``)."""
        want_bec = any(f.bec is not None for f in frames)
        model = model.to(self.ranks.device, self.eval_dtype)
        predictions = predict_frames(model, frames, self.config.batch_size, compute_bec=want_bec)
        return error_metrics(frames, predictions), predictions


def train(config: TrainConfig, resume: bool = False) -> Trainer:
    """Train (or resume) as ``config`` says; return the trainer (``.model`` is the last state)."""
    trainer = Trainer(config)
    if resume and trainer.resume() and trainer.ranks.is_main:
        print(f"resumed from {trainer.out / CHECKPOINT} after epoch {trainer.epoch}")
    trainer.fit()
    return trainer
