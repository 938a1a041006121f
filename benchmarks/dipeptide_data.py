"""Where the SPICE dipeptide files are: every benchmark's ``--data`` is the folder that holds the data.

That folder (``../shared/data`` from the repository root) contains ``dipeptides/``
with ``spice-dipep-dipolar_train.xyz`` and ``spice-dipep-dipolar_val.xyz``, as
``real_data.py`` reads it.
"""

from __future__ import annotations

from pathlib import Path

FILES = ("spice-dipep-dipolar_train.xyz", "spice-dipep-dipolar_val.xyz")


def dipeptide_folder(data: Path) -> Path:
    """``data / "dipeptides"``, after checking that it holds :data:`FILES`.

    Raises:
        SystemExit: a one-line message when ``data`` is the dipeptides folder itself or holds no such files.
    """
    folder = Path(data) / "dipeptides"
    if all((folder / name).is_file() for name in FILES):
        return folder
    if all((Path(data) / name).is_file() for name in FILES):
        raise SystemExit(
            f"--data {data} is the dipeptides folder itself; give the folder that holds it (--data {Path(data).parent})."
        )
    raise SystemExit(
        f"--data {data} holds no dipeptides/{FILES[0]} and dipeptides/{FILES[1]}; give the folder that holds "
        "the data (e.g. --data ../shared/data)."
    )
