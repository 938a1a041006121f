"""Lint and static types are part of the test command: ruff and mypy report no errors on ``latent_lr/``.

Both run with the configuration in ``pyproject.toml`` ([tool.ruff], [tool.mypy]),
from the repository root, with the interpreter running the tests (so the tools
installed by the ``test`` extra are the ones used).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m <command>`` in the repository root; stdout and stderr together."""
    return subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )


@pytest.mark.parametrize(
    "command",
    [("ruff", "check", "latent_lr"), ("mypy", "latent_lr")],
    ids=["ruff", "mypy"],
)
def test_tool_reports_no_errors(command: tuple[str, ...]) -> None:
    result = _run(*command)
    assert result.returncode == 0, (
        f"`{' '.join(command)}` failed (exit {result.returncode}); fix these or run it yourself:\n{result.stdout}"
    )
