"""Start a benchmark's worker in one plain process or in W gloo processes under torchrun (shared by the DDP benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

WORKER_FLAG = "--worker"


def run_as_worker(worker: Callable[[Path], None]) -> bool:
    """If this process was started as ``SCRIPT --worker SPEC``, run ``worker(SPEC)`` and return True."""
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        worker(Path(sys.argv[2]))
        return True
    return False


def launch(script: Path, spec: Path, world: int, quiet_errors: bool = False) -> None:
    """Run ``script --worker spec``: directly when ``world`` is 1, else ``torchrun --standalone --nproc_per_node world``."""
    prefix = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    subprocess.run([*prefix, str(script), WORKER_FLAG, str(spec)], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if quiet_errors else None)
