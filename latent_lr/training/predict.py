"""`latent-lr predict`: post-hoc charges, dipoles and BECs into extended XYZ."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import ase.io
import numpy as np

from ..serialization import load
from .dataset import LabelKeys, read_frames
from .metrics import predict_frames


def predict_file(model_path: Union[str, Path], input_path: Union[str, Path], output_path: Union[str, Path], batch_size: int = 16, total_charge_key: str = "charge") -> int:
    """Write per-atom ``latent_charges`` (e) and ``bec`` (e, 9 columns: xx xy xz yx … zz,
    row α = dipole component, column β = displacement), per-structure ``dipole`` (e·Å,
    open boundary) or ``polarization`` (e/Å², periodic), ``energy`` (eV) and
    ``forces`` (eV/Å).  Returns the number of structures written."""
    model = load(model_path).eval()
    if model.long_range is None:
        raise ValueError(f"{model_path} is a short-range model: it has no latent charges to predict from.")
    keys = LabelKeys(energy=None, forces=None, total_charge=total_charge_key)  # type: ignore[arg-type]
    frames = read_frames(input_path, keys)
    predictions = predict_frames(model, frames, batch_size, compute_bec=True)
    written = []
    for index, frame in enumerate(frames):
        atoms = frame.atoms.copy()
        atoms.info.update(frame.info)
        atoms.arrays["latent_charges"] = predictions["charges"][index]
        atoms.arrays["bec"] = predictions["bec"][index].reshape(len(atoms), 9)
        atoms.arrays["forces"] = predictions["forces"][index]
        atoms.info["energy"] = float(predictions["energy"][index])
        atoms.info["long_range_energy"] = float(predictions["long_range_energy"][index])
        if atoms.pbc.all():
            atoms.info["polarization"] = np.asarray(predictions["polarization"][index])
        else:
            atoms.info["dipole"] = np.asarray(predictions["dipole"][index])
        written.append(atoms)
    ase.io.write(output_path, written, format="extxyz")
    return len(written)
