"""Host models from the files users already have: `latent_lr.load_host(path)`.

:func:`identify` tells, without running anything from the file, which
backbone wrote it (the names its pickle refers to, or the layout of its
payload); :func:`load_host` hands the file to that adapter's
:meth:`~latent_lr.backbone.Backbone.load_host_file`, so only adapters import
backbone packages.  Formats (:data:`SUPPORTED_FORMATS`): MACE ``.model``
whole-model pickles (as ``mace_run_train`` and the foundation models ship
them), NequIP 0.19 training checkpoints and ``nequip-package`` archives,
CHGNet weight files and named pretrained versions, CACE whole-model pickles.
TorchScript exports (MACE's ``*_compiled.model``) are refused with the file
to give instead.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .backbone import adapter_class
from .errors import UserInputError
from .safe_pickle import is_torch_package, unsafe_globals
from .serialization import FORMAT

#: What :func:`load_host` reads, for messages.
SUPPORTED_FORMATS = (
    "a MACE .model file (torch.save of the model, as mace_run_train writes it)",
    "a NequIP 0.19 training checkpoint (.ckpt) or nequip-package archive",
    "a CHGNet weight file (CHGNet.save, or the bundled .pth.tar) or a pretrained name ('chgnet', '0.3.0', '0.2.0', 'r2scan')",
    "a CACE whole-model pickle (torch.save of the NeuralNetworkPotential)",
)
#: :func:`identify`'s answer for files written by latent-lr itself.
LATENT_LR_FILE = "latent-lr"
#: Backbone packages that write whole-model pickles, by the top-level package their classes live in.
PICKLE_PACKAGES = ("mace", "nequip", "chgnet", "cace")


def _formats() -> str:
    return "; ".join(SUPPORTED_FORMATS)


def _unrecognised(path: Path, detail: str) -> UserInputError:
    return UserInputError(f"{path}: {detail}; latent-lr reads {_formats()}, and its own model files.")


def _torchscript_error(path: Path) -> UserInputError:
    eager = path.with_name(path.name.replace("_compiled", "")) if "_compiled" in path.name else None
    instead = (
        f"give {eager} instead (mace_run_train writes it beside the compiled file)"
        if eager is not None and eager.is_file()
        else "give the eager model file the export was made from (for MACE: the .model without _compiled)"
    )
    return UserInputError(
        f"{path} is a TorchScript export (such as MACE's *_compiled.model, made for LAMMPS/OpenMM): latent-lr reads "
        f"the host's internal features, which an export does not expose; {instead}."
    )


def _payload_kind(path: Path, payload: object) -> str:
    """Which writer a weights-only payload comes from (latent-lr, chgnet or nequip)."""
    if isinstance(payload, dict):
        if payload.get("format") == FORMAT or (isinstance(payload.get("model"), dict) and "optimiser" in payload):
            return LATENT_LR_FILE
        model = payload.get("model")
        if isinstance(model, dict) and "model_args" in model and "state_dict" in model:
            return "chgnet"
        hyper = payload.get("hyper_parameters")
        if isinstance(hyper, dict) and "state_dict" in payload and "info_dict" in hyper:
            return "nequip"
    raise _unrecognised(path, "a torch file of no format latent-lr knows")


@dataclass(frozen=True)
class IdentifiedFile:
    """What :func:`identify_file` found: whose file it is and, when it had to load the file
    weights-only to tell, the loaded contents (so that the file is read once)."""

    kind: str  # a name of latent_lr.backbone.ADAPTERS, or LATENT_LR_FILE
    payload: Optional[object] = None  # the weights-only contents; None when only the pickle opcodes were read


def identify(path: Union[str, Path]) -> str:
    """Which backbone's file ``path`` is (a name of :data:`~latent_lr.backbone.ADAPTERS`), or ``"latent-lr"``.

    Reads the file's pickle opcodes and archive layout only; a payload of plain
    tensors and containers is loaded weights-only to look at its keys.

    Raises:
        UserInputError: a TorchScript export, or no format latent-lr reads.
    """
    return identify_file(path).kind


def identify_file(path: Union[str, Path]) -> IdentifiedFile:
    """:func:`identify`, keeping the contents it loaded (pass them on to the reader of the file)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names):
            raise _torchscript_error(path)
        if is_torch_package(names):
            if any(name.split("/")[1:2] == ["nequip"] or "/nequip/" in name for name in names):
                return IdentifiedFile("nequip")
            raise _unrecognised(path, "a torch.package archive that is not a nequip-package")
        if not any(name.endswith("data.pkl") for name in names):
            raise _unrecognised(path, "a zip archive that is not a torch file")
        packages = sorted({name.split(".")[0] for name in unsafe_globals(path)} & set(PICKLE_PACKAGES))
        if len(packages) == 1:
            return IdentifiedFile(packages[0])
        if packages:
            raise _unrecognised(path, f"a pickle of classes from several backbones ({packages})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for files that are not weights-only torch files
        raise _unrecognised(path, f"not a file torch reads weights-only ({str(error).splitlines()[0][:120]})") from error
    return IdentifiedFile(_payload_kind(path, payload), payload)


def _pretrained(name: str, backbone: Optional[str]) -> nn.Module:
    if backbone is None and name.strip().lower().startswith(("chgnet", "pretrained")):
        backbone = "chgnet"
    if backbone is None:
        raise UserInputError(
            f"{name} is not a file (and no backbone is given to look it up as a pretrained model name); "
            f"give the path of {_formats()}."
        )
    try:
        return adapter_class(backbone).pretrained_host(name)
    except ValueError as error:
        raise UserInputError(str(error)) from error


def load_host(
    path: Union[str, os.PathLike],
    backbone: Optional[str] = None,
    *,
    trust_pickle: bool = False,
    identified: Optional[IdentifiedFile] = None,
) -> nn.Module:
    """The host model in a backbone's own file (or a pretrained model by name).

    Example::

        host = latent_lr.load_host("MACE-model.model")   # then latent_lr.wrap(host)

    Args:
        path: a model file (formats in :data:`SUPPORTED_FORMATS`), or a
            pretrained name the adapter knows (CHGNet: ``"chgnet"``, ``"0.3.0"``, ...).
        backbone: expected backbone name; default: detected from the file.
        trust_pickle: allow loading that runs code from the file (whole-model
            pickles the allow-list cannot read, nequip-package archives).
            Only for files from a source you trust.
        identified: :func:`identify_file`'s answer for ``path`` when the caller has it
            (the file is then not identified, nor its weights-only contents read, again).

    Raises:
        UserInputError: missing file, unknown format, backbone mismatch, or a
            file that needs ``trust_pickle=True`` (the message says why).
    """
    file = Path(path)
    if not file.is_file():
        return _pretrained(str(path), backbone)
    identified = identified or identify_file(file)
    kind = identified.kind
    if kind == LATENT_LR_FILE:
        raise UserInputError(f"{file} is a latent-lr model file, not a host; read it with latent_lr.load({str(file)!r}).")
    if backbone is not None and backbone != kind:
        raise UserInputError(f"{file} is a {kind} model file, but backbone {backbone!r} was asked for; drop the backbone or give a {backbone} file.")
    return adapter_class(kind).load_host_file(file, trust_pickle=trust_pickle, payload=identified.payload)
