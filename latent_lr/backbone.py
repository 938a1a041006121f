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
import os
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from .data import AtomsBatch

#: backbone name -> "module:class" of its adapter.
ADAPTERS: dict[str, str] = {
    "mace": "latent_lr.adapters.mace:MaceBackbone",
    "nequip": "latent_lr.adapters.nequip:NequipBackbone",
    "chgnet": "latent_lr.adapters.chgnet:ChgnetBackbone",
    "cace": "latent_lr.adapters.cace:CaceBackbone",
    "radial": "latent_lr.radial_backbone:RadialBackbone",
}


class Backbone(nn.Module):
    """Base class of adapters.

    Subclasses set :attr:`name`, wrap the host model as ``self.host`` and
    implement :meth:`forward`, :meth:`recognises`, :meth:`host_config` and
    :meth:`build_host`.  ``forward`` must compute every geometric quantity from
    ``data.positions`` and ``data.cell`` (which may be strained and carry
    gradients), never from cached Cartesian shifts, so that forces and stress
    reach both the host and the long-range energy.
    """

    name: ClassVar[str] = ""

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

    def forward(self, data: AtomsBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the host energy (B,) in eV and invariant features (N, F)."""
        raise NotImplementedError

    def check_elements(self, numbers: torch.Tensor) -> None:
        """Raise ValueError if the host cannot handle some atomic numbers."""

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        """Whether ``model`` is a host model of this backbone."""
        return type(model).__module__.split(".")[0] == cls.name

    def host_config(self) -> dict[str, Any]:
        """JSON-serialisable settings that, with the state_dict, rebuild the host."""
        raise NotImplementedError

    @classmethod
    def build_host(cls, config: dict[str, Any]) -> nn.Module:
        """A freshly initialised host from :meth:`host_config`'s output."""
        raise NotImplementedError

    @classmethod
    def default_host(cls, species: list[int], **options: Any) -> nn.Module:
        """A small, randomly initialised host for training from scratch.

        Args:
            species: atomic numbers the model must handle.
            **options: backbone hyper-parameters overriding the small defaults.
        """
        raise NotImplementedError(f"the {cls.name} adapter cannot build a host from scratch.")


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
    """Name of the backbone whose package defines ``model``'s class."""
    package = type(model).__module__.split(".")[0]
    for name in ADAPTERS:
        if package == name:
            return name
    if isinstance(model, Backbone):
        return model.name
    from .radial_backbone import RadialPotential

    if isinstance(model, RadialPotential):
        return "radial"
    raise ValueError(
        f"cannot tell which backbone {type(model).__module__}.{type(model).__name__} is; "
        f"pass backbone= one of {sorted(ADAPTERS)}, or wrap it in a latent_lr.Backbone subclass."
    )


@contextlib.contextmanager
def isolated_global_state() -> Iterator[None]:
    """Undo process-wide changes backbone packages make on import or construction.

    Restores torch's default dtype (nequip switches it to float64), the
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` variable (set by ``import mace``) and
    torch's TF32 / matmul-precision switches.
    """
    dtype = torch.get_default_dtype()
    env_key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    env_value = os.environ.get(env_key)
    matmul_precision = torch.get_float32_matmul_precision()
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        if env_value is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = env_value
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
