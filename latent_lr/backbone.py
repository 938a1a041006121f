"""What an adapter must provide, how adapters are found, and side-effect isolation.

An adapter turns one backbone package's model into a :class:`Backbone`: a
module that maps an :class:`~latent_lr.data.AtomsBatch` to the host's energy per
structure and per-atom invariant features.  Adapters live in
``latent_lr.adapters`` and are the only modules that import backbone packages;
they are imported lazily, when a model of theirs is wrapped or loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import nn

from .data import AtomsBatch
from .errors import UserInputError

#: backbone name -> "module:class" of its adapter.
ADAPTERS: dict[str, str] = {
    "mace": "latent_lr.adapters.mace:MaceBackbone",
    "nequip": "latent_lr.adapters.nequip:NequipBackbone",
    "chgnet": "latent_lr.adapters.chgnet:ChgnetBackbone",
    "cace": "latent_lr.adapters.cace:CaceBackbone",
    "radial": "latent_lr.adapters.radial:RadialBackbone",
}


class Backbone(nn.Module):
    """Base class of adapters.

    Subclasses set :attr:`name` (and :attr:`label`, the name in messages), wrap
    the host model as ``self.host`` and implement :meth:`forward`,
    :meth:`host_config` and :meth:`build_host`; they override
    :attr:`known_elements`, :meth:`recognises`, :meth:`options`,
    :meth:`default_host` and :meth:`pretrained_host` where the defaults do not
    fit.  ``forward`` must compute every geometric quantity from
    ``data.positions`` and ``data.cell`` (which may be strained and carry
    gradients), never from cached Cartesian shifts, so that forces and stress
    reach both the host and the long-range energy.

    Saving and loading: :func:`latent_lr.save` stores :meth:`host_config` and
    :meth:`options`; :func:`latent_lr.load` calls :meth:`from_config` with
    ``{"host": host_config, "options": options}`` and loads the state_dict.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""

    def __init__(self, host: nn.Module):
        super().__init__()
        self.host = host

    @property
    def feature_dim(self) -> int:
        """Width F of the invariant features."""
        raise NotImplementedError

    @property
    def cutoff(self) -> float:
        """Host's interaction cut-off, Å."""
        raise NotImplementedError

    @property
    def known_elements(self) -> Optional[list[int]]:
        """Atomic numbers the host handles (sorted); None: no restriction."""
        return None

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the host energy (B,) in eV and invariant features (N, F)."""
        raise NotImplementedError

    @property
    def receptive_field(self) -> Optional[float]:
        """Distance, Å, beyond which an atom's energy and features do not depend on other atoms
        (message-passing layers × cut-off); None where the adapter does not state it."""
        return None

    def per_atom_energies(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-atom host energies (N,) eV (summing to :meth:`forward`'s energy) and features (N, F).

        Optional: domain decomposition (``latent_lr.lammps`` on several MPI
        ranks) needs it; adapters that do not provide it raise NotImplementedError.
        """
        raise NotImplementedError(
            f"the {self.label or self.name} backbone does not provide per-atom energies, which runs "
            "on several MPI ranks need; run LAMMPS on one rank."
        )

    def check_elements(self, numbers: torch.Tensor) -> None:
        """Raise ValueError if some atomic numbers are not in :attr:`known_elements`."""
        known = self.known_elements
        if known is not None:
            reject_unknown_elements(numbers, known, self.label or self.name)

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        """Whether ``model`` is a host model of this backbone (default: its class's top package is :attr:`name`)."""
        return type(model).__module__.split(".")[0] == cls.name

    def options(self) -> dict[str, Any]:
        """JSON-serialisable adapter options (the constructor's keyword arguments besides ``host``)."""
        return {}

    def host_config(self) -> dict[str, Any]:
        """JSON-serialisable settings that, with the state_dict, rebuild the host."""
        raise NotImplementedError

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        """A freshly initialised host from :meth:`host_config`'s output."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Backbone":
        """Rebuild an adapter from ``{"host": host_config(), "options": options()}`` (weights not loaded)."""
        return cls(cls.build_host(config["host"]), **(config.get("options") or {}))

    @classmethod
    def default_host(cls, species: list[int], **options: Any) -> nn.Module:
        """A small, randomly initialised host for training from scratch.

        Args:
            species: atomic numbers the model must handle.
            **options: backbone hyper-parameters overriding the small defaults.
        """
        raise NotImplementedError(f"the {cls.name} adapter cannot build a host from scratch.")

    @classmethod
    def pretrained_host(cls, name: str) -> nn.Module:
        """A pretrained host model by name (``latent-lr train --init-model NAME``)."""
        raise ValueError(
            f"the {cls.name} adapter has no pretrained models ({name!r} is neither one nor an existing "
            "file); pass --init-model a latent-lr model file, or leave it out to train from scratch."
        )


    @classmethod
    def load_host_file(cls, path: Path, trust_pickle: bool = False, payload: Optional[object] = None) -> nn.Module:
        """The host model in one of this backbone's own files (:func:`latent_lr.load_host` calls it).

        Args:
            path: the file (already identified as this backbone's).
            trust_pickle: the caller allows loading that runs code from the file.
            payload: the file's weights-only contents when identification already loaded them
                (use them instead of reading the file again); None otherwise.
        """
        raise UserInputError(f"the {cls.name} adapter reads no model files of its backbone ({path}); build the host in Python and wrap it.")


def reject_unknown_elements(numbers: torch.Tensor, known: list[int], model_name: str) -> None:
    """Raise ValueError naming the atomic numbers in ``numbers`` that are not in ``known``."""
    unknown = sorted(set(numbers.tolist()) - set(known))
    if unknown:
        raise ValueError(
            f"elements with atomic numbers {unknown} are unknown to this {model_name} model "
            f"(it knows {known}); retrain or fine-tune with them."
        )


def adapter_class(name: str) -> type[Backbone]:
    """Import and return the adapter class for a backbone name."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {sorted(ADAPTERS)}.")
    module_name, class_name = ADAPTERS[name].split(":")
    try:
        with isolated_global_state():
            module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"the {name} backbone needs its package: pip install 'latent-lr[{name}]' "
            f"({error})."
        ) from error
    return getattr(module, class_name)


def detect_backbone(model: nn.Module) -> str:
    """Name of the backbone whose adapter :meth:`~Backbone.recognises` ``model``.

    Only adapters whose module or backbone package is already imported are
    asked (a host of a package was made by that package, so nothing new is
    imported).
    """
    if isinstance(model, Backbone):
        return model.name
    for name, target in ADAPTERS.items():
        module_name = target.split(":")[0]
        if module_name not in sys.modules and name not in sys.modules:
            continue
        try:
            adapter = adapter_class(name)
        except ImportError:
            continue
        if adapter.recognises(model):
            return name
    raise ValueError(
        f"cannot tell which backbone {type(model).__module__}.{type(model).__name__} is; "
        f"pass backbone= one of {sorted(ADAPTERS)}, or wrap it in a latent_lr.Backbone subclass."
    )


@contextlib.contextmanager
def isolated_global_state() -> Iterator[None]:
    """Undo process-wide torch changes backbone packages make on import or construction.

    Restores torch's default dtype (nequip switches it to float64) and torch's
    TF32 / matmul-precision switches.  Environment variables are left alone:
    ``import mace`` sets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``, which mace's own
    loaders (``MACECalculator``) rely on, so removing it would break them when
    mace is first imported here.  It changes only ``torch.load`` calls without
    an explicit ``weights_only``; latent-lr always passes ``weights_only=True``.
    """
    dtype = torch.get_default_dtype()
    matmul_precision = torch.get_float32_matmul_precision()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
