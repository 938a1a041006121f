"""`latent-lr predict`: post-hoc charges, dipoles and BECs into extended XYZ, streamed batch by batch."""

from __future__ import annotations

import sys
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import ase.io
import numpy as np
import torch
from ase import Atoms
from tqdm.auto import tqdm

from ..errors import UserInputError
from ..model import LongRangeModel
from ..sign_convention import MAX_STRUCTURES, apply_sign_convention
from .dataset import Frame, LabelKeys, check_frame_elements, iter_frames
from .devices import resolve_device
from .metrics import predict_frames
from .model_files import load_model_file


def _batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    iterator = iter(frames)
    while chunk := list(islice(iterator, size)):
        yield chunk


def annotated_structures(model: LongRangeModel, frames: list[Frame]) -> list[Atoms]:
    """Copies of ``frames``' structures carrying the model's predictions (see :func:`predict_file`)."""
    predictions = predict_frames(model, frames, len(frames), compute_bec=True)
    written = []
    for index, frame in enumerate(frames):
        atoms = frame.atoms.copy()
        atoms.info.update(frame.info)
        atoms.arrays["latent_charges"] = predictions["charges"][index]
        if "spins" in predictions:
            atoms.arrays["latent_spins"] = predictions["spins"][index]
        atoms.arrays["bec"] = predictions["bec"][index].reshape(len(atoms), 9)
        atoms.arrays["forces"] = predictions["forces"][index]
        atoms.info["energy"] = float(predictions["energy"][index])
        atoms.info["long_range_energy"] = float(predictions["long_range_energy"][index])
        if atoms.pbc.all():
            atoms.info["polarization"] = np.asarray(predictions["polarization"][index])
        else:
            atoms.info["dipole"] = np.asarray(predictions["dipole"][index])
        written.append(atoms)
    return written


def predict_file(
    model_path: Union[str, Path],
    input_path: Union[str, Path],
    output_path: Union[str, Path],
    batch_size: int = 16,
    total_charge_key: Optional[str] = None,
    total_spin_key: Optional[str] = None,
    multiplicity_key: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
    sign_reference: Optional[Union[str, Path]] = None,
) -> int:
    """Write per-atom ``latent_charges`` (e) and ``bec`` (e, 9 columns: xx xy xz yx … zz,
    row α = dipole component, column β = displacement), per-structure ``dipole`` (e·Å,
    open boundary) or ``polarization`` (e/Å², periodic), ``energy`` (eV) and
    ``forces`` (eV/Å); with the spin channel also per-atom ``latent_spins`` (spin
    populations n↑ − n↓, summing to the total spin 2S_z read from ``total_spin_key``
    or ``multiplicity_key``).  Returns the number of structures written.

    The net charge, total spin and multiplicity are read from the info keys given, each
    key left None from the model's stored :attr:`~latent_lr.LongRangeModel.info_keys`
    (those its training read; ``charge``, ``spin``, ``multiplicity`` for older files), see
    :meth:`~latent_lr.info_keys.InfoKeys.overridden`.

    ``model_path`` is ``best_model.pt`` or a training ``checkpoint.pt``.
    ``device`` is ``"cpu"`` or ``"cuda"`` (``"cuda:N"``).  The input is read lazily and each batch
    of ``batch_size`` frames is written as soon as it is predicted, so memory
    does not grow with the number of frames.

    The sign of the charges is the one stored in the model file (chosen after
    training, :mod:`latent_lr.sign_convention`).  For a file written before the
    convention existed, or when ``sign_reference`` (extended XYZ, e.g. the
    training set) is given, the convention is decided here on the first
    structures of ``sign_reference`` (default: of the input) and reported on stderr.
    """
    if batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {batch_size}.")
    target = resolve_device(device) if isinstance(device, str) else device
    if not Path(input_path).is_file():
        raise UserInputError(f"{input_path} does not exist or is not a file; check the path.")
    model = load_model_file(model_path).to(target).eval()
    if model.long_range is None:
        raise UserInputError(f"{model_path} is a short-range model: it has no latent charges to predict from; give a long-range model.")
    model.info_keys = model.info_keys.overridden(total_charge_key, total_spin_key, multiplicity_key)
    spin_keys = model.spin_keys  # a spin-blind model neither reads nor checks the spin keys
    keys = LabelKeys(energy=None, forces=None, total_charge=model.info_keys.total_charge,
                     total_spin=spin_keys[0], multiplicity=spin_keys[1])
    if sign_reference is not None or not model.long_range.charge_sign_stored:
        source = input_path if sign_reference is None else sign_reference
        frames = list(islice(iter_frames(source, keys), MAX_STRUCTURES))
        check_frame_elements(model.backbone.check_elements, frames)
        decision = apply_sign_convention(model, [frame.atoms for frame in frames])
        print(f"{model_path}: {decision.summary()} [decided on {source}]", file=sys.stderr)
    count = 0
    bar = tqdm(desc="predict", unit="frame", disable=not progress)
    with open(output_path, "w") as handle:
        for chunk in _batches(iter_frames(input_path, keys), batch_size):
            check_frame_elements(model.backbone.check_elements, chunk)
            ase.io.write(handle, annotated_structures(model, chunk), format="extxyz")
            handle.flush()
            count += len(chunk)
            bar.update(len(chunk))
    bar.close()
    if count == 0:
        raise UserInputError(f"{input_path} holds no structures; give a non-empty extended-XYZ file.")
    return count
