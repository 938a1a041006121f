"""Data-parallel training: the process group, this process's rank and device, and reductions over ranks.

A run is distributed when it is started by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or by SLURM's
``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; ``MASTER_ADDR``
must then be exported by the job script, ``MASTER_PORT`` defaults to 29500) and
``distributed`` is asked for.  The backend is NCCL on CUDA and gloo on the CPU;
each rank uses the GPU of its local rank.  Without ``distributed`` every helper
here is the identity, so one code path serves one process and many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from ..errors import UserInputError
from .devices import resolve_device

DEFAULT_MASTER_PORT = "29500"


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the run: ``rank`` of ``world_size`` (0 of 1 without distribution)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files and prints (rank 0)."""
        return self.rank == 0


def launcher_ranks(environment: Mapping[str, str]) -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment variables; None if neither set them."""
    if "RANK" in environment and "WORLD_SIZE" in environment:
        rank, world = int(environment["RANK"]), int(environment["WORLD_SIZE"])
        return rank, world, int(environment.get("LOCAL_RANK", rank))
    if "SLURM_PROCID" in environment and "SLURM_NTASKS" in environment:
        rank, world = int(environment["SLURM_PROCID"]), int(environment["SLURM_NTASKS"])
        return rank, world, int(environment.get("SLURM_LOCALID", rank))
    return None


def start(device: str, distributed: bool) -> Ranks:
    """This process's :class:`Ranks`, joining (or creating) the process group when ``distributed``.

    ``device`` is ``cpu``, ``cuda`` or ``cuda:N``; under distribution ``cuda`` means
    the GPU of this process's local rank.  Raises :class:`UserInputError` when
    ``distributed`` is asked for outside a launcher, when torchrun started several
    processes without it, or when a CUDA device is absent.
    """
    target = resolve_device(device)
    if not distributed:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            raise UserInputError(
                f"this process is one of {os.environ['WORLD_SIZE']} that torchrun started, but --distributed is not set: "
                "every process would train the same model and write the same files; add --distributed."
            )
        return Ranks(device=target)
    launched = launcher_ranks(os.environ)
    if launched is None:
        raise UserInputError(
            "--distributed needs a launcher: run `torchrun --nproc_per_node N -m latent_lr.cli train ... --distributed` "
            "(or srun under SLURM with MASTER_ADDR exported); no RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS is set."
        )
    rank, world, local = launched
    if target.type == "cuda":
        target = torch.device("cuda", local)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
        if "MASTER_ADDR" not in os.environ:
            raise UserInputError(
                "--distributed: MASTER_ADDR is not set; export the first node's host name, e.g. "
                "`export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)`."
            )
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return Ranks(rank=rank, world_size=world, local_rank=local, device=target)


def stop() -> None:
    """Leave the process group (if any) once every rank got here."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """``values`` summed element-wise over all ranks (in place, and returned); unchanged in one process."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_over_ranks(value: float, ranks: Ranks) -> list[float]:
    """One float from each rank, in rank order (a list of one in a single process)."""
    values = torch.zeros(ranks.world_size, dtype=torch.float64, device=ranks.device)
    values[ranks.rank] = value
    return sum_over_ranks(values).tolist()


def barrier() -> None:
    """Wait until every rank got here (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()
