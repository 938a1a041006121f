"""The built wheel ships every module of the source tree and runs on its own.

An editable install hides a package list that forgets a subpackage; these tests
build the wheel the way ``pip install .`` does and import every module from the
unpacked wheel, outside the source checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_modules() -> set[str]:
    """Every ``latent_lr`` module of the source tree, as a path relative to the root."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "latent_lr").rglob("*.py")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("latent_lr-*.whl")
    return path


def test_wheel_holds_every_module(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.endswith(".py")}
    missing = source_modules() - shipped
    assert not missing, f"the wheel lacks {sorted(missing)}"


def test_wheel_metadata_requires_python_311(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert "Requires-Python: >=3.11" in text
    with zipfile.ZipFile(wheel) as archive:
        entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        assert "latent-lr = latent_lr.cli:main" in archive.read(entry_points).decode()


def test_installed_wheel_imports_every_module_and_runs_the_cli(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    modules = sorted(
        m.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for m in source_modules()
    )
    script = (
        "import importlib, sys, latent_lr\n"
        f"assert latent_lr.__file__.startswith({str(site)!r}), latent_lr.__file__\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from latent_lr.cli import main\n"
        "sys.argv = ['latent-lr', '--help']\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train" in result.stdout
