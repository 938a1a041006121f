"""Building NequIP hosts without nequip's process-wide set-up (used by the NequIP adapter).

nequip's model builders refuse to run before
``nequip.utils.global_state.set_global_state()``, which reseeds Python's,
NumPy's and torch's generators and sets the default dtype, environment
variables, TorchScript, e3nn and multiprocessing settings for the whole
process.  :func:`build_host` instead marks nequip's global state initialised
(with the e3nn settings nequip would apply) while a builder runs and puts
both back; the builder itself seeds inside an RNG-isolating context.  Configs
are nequip's own model configs (``_target_`` plus builder arguments); only
``nequip.*`` targets are accepted, as hydra would import and call any other.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from latent_lr.backbone import isolated_global_state

from .common import chemical_symbol, require_json, restored_environment

with isolated_global_state(), restored_environment():
    import e3nn
    import nequip.model
    from nequip.utils import global_state as _nequip_global_state

#: attribute recording, on hosts built here, the config that rebuilds them (nequip keeps none).
RECIPE_ATTRIBUTE = "_latent_lr_config"

#: nequip model builders build_host may call (config "_target_").
BUILDERS = {f"nequip.model.{n}": getattr(nequip.model, n) for n in ("NequIPGNNModel", "PresetNequIPGNNModel", "FullNequIPGNNModel")}

#: default_host's small model (nequip.model.NequIPGNNModel arguments).
DEFAULT_OPTIONS = dict(
    model_dtype="float64", r_max=5.0, num_layers=2, l_max=1, parity=False, num_features=16,
    radial_mlp_depth=1, radial_mlp_width=32, num_bessels=8, polynomial_cutoff_p=6,
    avg_num_neighbors=20.0, per_type_energy_scales=1.0, per_type_energy_shifts=0.0,
)

#: e3nn settings nequip's set_global_state applies (torch >= 2.10).
_E3NN_SETTINGS = dict(specialized_code=True, optimize_einsums=True, jit_mode="eager")


@contextlib.contextmanager
def _nequip_builder_state() -> Iterator[None]:
    """Let nequip's model builders run without nequip's process-wide set-up (see module doc)."""
    with isolated_global_state(), restored_environment():
        was_initialised = _nequip_global_state._GLOBAL_STATE_INITIALIZED
        e3nn_settings = e3nn.get_optimization_defaults()
        try:
            if not was_initialised:
                e3nn.set_optimization_defaults(**_E3NN_SETTINGS)
                _nequip_global_state._GLOBAL_STATE_INITIALIZED = True
            yield
        finally:
            _nequip_global_state._GLOBAL_STATE_INITIALIZED = was_initialised
            e3nn.set_optimization_defaults(**e3nn_settings)


def _check_targets(value: Any, where: str = "config") -> None:
    """Refuse non-nequip ``_target_`` entries (hydra would import and call them)."""
    target = value.get("_target_") if isinstance(value, dict) else None
    if target is not None and not str(target).startswith("nequip."):
        raise ValueError(f"{where} names _target_ {target!r}; only nequip classes are allowed.")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        _check_targets(item, f"{where}[{key!r}]")


def build_host(config: dict[str, Any]) -> nn.Module:
    """A nequip ``GraphModel`` from ``{"model": <nequip model config>, "chemical_species_to_atom_type_map": ...}``."""
    model_config = dict(config["model"])
    _check_targets(model_config)
    target = model_config.pop("_target_", None)
    if target not in BUILDERS:
        raise ValueError(f"unsupported nequip model builder {target!r}; supported: {sorted(BUILDERS)}.")
    model_config.pop("compile_mode", None)  # the adapter runs the eager modules
    with _nequip_builder_state():
        host = BUILDERS[target](**model_config)
    setattr(host, RECIPE_ATTRIBUTE, copy.deepcopy(dict(config)))
    return host


def default_config(species: Sequence[int], **options: Any) -> dict[str, Any]:
    """:func:`build_host`'s config of a small ``NequIPGNNModel`` for ``species``; ``options`` override its arguments.

    ``seed`` defaults to a draw from torch's global generator (``torch.manual_seed`` makes it reproducible).
    """
    symbols = [chemical_symbol(z) for z in sorted({int(z) for z in species})]
    settings = dict(DEFAULT_OPTIONS, **options, type_names=symbols)
    if "seed" not in settings:  # drawn only when not given
        settings["seed"] = int(torch.randint(0, 2**31 - 1, ()).item())
    model = {"_target_": "nequip.model.NequIPGNNModel", **settings}
    require_json(model, "NequIP host options")
    return {"model": model, "chemical_species_to_atom_type_map": {s: s for s in symbols}}
