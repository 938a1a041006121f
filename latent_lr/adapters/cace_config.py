"""Saving and rebuilding CACE hosts as JSON settings, and a small default host.

Used by :class:`latent_lr.adapters.cace.CaceBackbone`:

* :func:`describe_host` writes a host's architecture as JSON: for a host from
  the ``cace`` package, the constructor arguments of ``Cace`` (``zs``,
  ``n_atom_basis``, ``cutoff``, ``max_l``, ``max_nu``, ``num_message_passing``,
  ``type_message_passing``, ``args_message_passing`` (``Bchi`` MLP settings),
  ``embed_receiver_nodes``, ``n_radial_basis``, ``avg_num_neighbors``), of the
  radial basis (``BesselRBF``, ``GaussianRBF``, ``GaussianRBFCentered``,
  ``ExponentialDecayRBF``), of the cut-off function (``CosineCutoff``,
  ``PolynomialCutoff``, ``MollifierCutoff``, ``SwitchFunction``) and of the
  output modules ``Atomwise``, ``Forces`` and ``FeatureAdd``.  Other modules
  (CACE's Ewald, LES, polarisation, custom encoders, post-processing
  callables) make it raise: keep such hosts with CACE's own ``torch.save``.
  For any other host class exposing a JSON-able ``config`` dict of its
  constructor arguments (the test stand-in does), it writes the class's import
  path ``"module:QualName"`` and that dict; loading imports that module, so
  load only files you trust.
* :func:`build_host` rebuilds a freshly initialised host from that JSON,
  under a float32 default dtype (CACE's ``GaussianRBF`` calls
  ``torch.FloatTensor`` on a default-dtype tensor, which fails under float64)
  and with the global RNG state restored, then casts it to the saved dtype.
* :func:`default_host` builds a small CACE model the way CACE's example
  scripts do (``Cace`` with a Bessel radial basis and polynomial cut-off,
  an ``Atomwise`` energy read-out and a ``Forces`` module).

Checked against the cace package at commit 19ae23c (github.com/BingqingCheng/cace).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from latent_lr.adapters.common import require_json
from latent_lr.backbone import isolated_global_state

#: Settings of :func:`default_host` (each can be overridden by a keyword of the same name).
DEFAULT_HOST_SETTINGS: dict[str, Any] = {
    "cutoff": 5.0, "n_atom_basis": 3, "n_radial_basis": 8, "n_rbf": 6,  # cutoff in Å
    "max_l": 2, "max_nu": 3, "num_message_passing": 1, "avg_num_neighbors": 10.0,
    "n_hidden": [32, 16], "n_layers": 3,  # Atomwise read-out MLP
}


def _number(value: Any) -> float:
    """A Python float from a number or a (possibly trainable) one-element tensor, without autograd warnings."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().reshape(-1)[0])
    return float(value)


def _is_cace_package_model(host: nn.Module) -> bool:
    return type(host).__module__.split(".")[0] == "cace"


def describe_host(host: nn.Module) -> dict[str, Any]:
    """JSON description of ``host``'s architecture (no weights); ValueError if it cannot be described."""
    dtype = next((t.dtype for t in host.parameters() if t.dtype.is_floating_point), torch.get_default_dtype())
    if _is_cace_package_model(host):
        spec = _describe_cace_host(host)
    else:
        settings = getattr(host, "config", None)
        if not isinstance(settings, dict):
            raise ValueError(
                f"cannot save a CACE host of class {type(host).__module__}.{type(host).__qualname__}: it is "
                "neither from the cace package nor exposes a `config` dict of its constructor arguments."
            )
        cls = type(host)
        spec = {"kind": "class", "class": f"{cls.__module__}:{cls.__qualname__}", "kwargs": dict(settings)}
    spec["dtype"] = str(dtype).removeprefix("torch.")
    require_json(spec, "the CACE host's settings")
    return spec


def build_host(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised host from :func:`describe_host`'s output, in the saved dtype (default float32)."""
    with isolated_global_state(), torch.random.fork_rng(devices=[]):
        torch.set_default_dtype(torch.float32)
        if spec.get("kind") == "cace":
            host = _build_cace_host(spec)
        elif spec.get("kind") == "class":
            host = _build_class_host(spec)
        else:
            raise ValueError(f"unknown CACE host description kind {spec.get('kind')!r}; the file is damaged or newer.")
    return host.to(getattr(torch, spec.get("dtype", "float32")))


def default_host(species: list[int], **options: Any) -> nn.Module:
    """A small, randomly initialised CACE ``NeuralNetworkPotential`` for ``species`` (atomic numbers).

    Options override :data:`DEFAULT_HOST_SETTINGS`.  The energy is written under
    ``CACE_energy`` (and forces under ``CACE_forces``, as in CACE's examples).
    The ``Atomwise`` read-out is built lazily by CACE on its first call.
    """
    unknown = sorted(set(options) - set(DEFAULT_HOST_SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown CACE host options {unknown}; known: {sorted(DEFAULT_HOST_SETTINGS)}."
        )
    if not species:
        raise ValueError("default_host needs at least one atomic number in species.")
    settings = {**DEFAULT_HOST_SETTINGS, **options}
    import cace.modules as cace_modules
    from cace.models.atomistic import NeuralNetworkPotential
    from cace.representations import Cace

    cutoff = float(settings["cutoff"])
    representation = Cace(
        zs=sorted(int(z) for z in set(species)),
        n_atom_basis=int(settings["n_atom_basis"]),
        embed_receiver_nodes=True,
        cutoff=cutoff,
        cutoff_fn=cace_modules.PolynomialCutoff(cutoff=cutoff),
        radial_basis=cace_modules.BesselRBF(cutoff=cutoff, n_rbf=int(settings["n_rbf"]), trainable=True),
        n_radial_basis=int(settings["n_radial_basis"]),
        max_l=int(settings["max_l"]),
        max_nu=int(settings["max_nu"]),
        num_message_passing=int(settings["num_message_passing"]),
        type_message_passing=["Bchi"],
        avg_num_neighbors=float(settings["avg_num_neighbors"]),
    )
    energy = cace_modules.Atomwise(
        n_layers=int(settings["n_layers"]), output_key="CACE_energy", n_hidden=settings["n_hidden"],
        add_linear_nn=True,
    )
    forces = cace_modules.Forces(energy_key="CACE_energy", forces_key="CACE_forces")
    return NeuralNetworkPotential(input_modules=None, representation=representation, output_modules=[energy, forces])


def _build_class_host(spec: dict[str, Any]) -> nn.Module:
    module_name, _, qualname = spec["class"].partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"{spec['class']} is not a torch.nn.Module class; refusing to build it.")
    return obj(**spec["kwargs"])


def _callable_name(function: Any) -> str:
    """Import path of an activation function/module of torch (for JSON)."""
    if isinstance(function, nn.Module):
        if type(function).__module__.startswith("torch.nn") and not list(function.parameters()):
            return f"torch.nn.{type(function).__name__}()"  # e.g. nn.SiLU(), rebuilt with defaults
    name = getattr(function, "__name__", None)
    for namespace, prefix in ((torch.nn.functional, "torch.nn.functional"), (torch, "torch")):
        if name and getattr(namespace, name, None) is function:
            return f"{prefix}.{name}"
    raise ValueError(f"cannot save activation {function!r}: only torch functions and torch.nn modules are supported.")


def _resolve_callable(name: str) -> Any:
    if name.endswith("()"):
        return getattr(torch.nn, name[len("torch.nn.") : -2])()
    module_name, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _first(attribute: str) -> Any:
    """Reader of a module's number (or the first entry of a tensor) ``attribute``."""
    return lambda module: _number(getattr(module, attribute))


def _trainable(attribute: str) -> Any:
    """Reader of whether ``attribute`` is a trainable parameter."""
    return lambda module: isinstance(getattr(module, attribute), nn.Parameter)


def _n_rbf(module: Any) -> int:
    return int(module.n_rbf)


#: Constructor arguments of CACE's radial bases and cut-off functions, each read from the module.
_PART_SETTINGS: dict[str, dict[str, Any]] = {
    "BesselRBF": {"cutoff": _first("cutoff"), "n_rbf": _n_rbf, "trainable": _trainable("bessel_weights")},
    "GaussianRBF": {"n_rbf": _n_rbf, "cutoff": _first("cutoff"), "start": _first("offsets"),
                    "trainable": _trainable("widths")},
    "GaussianRBFCentered": {"n_rbf": _n_rbf, "cutoff": _first("cutoff"), "start": _first("widths"),
                            "trainable": _trainable("widths")},
    "ExponentialDecayRBF": {"n_rbf": _n_rbf, "cutoff": _first("cutoff"), "prefactor": _first("prefactor"),
                            "trainable": _trainable("r0")},
    "CosineCutoff": {"cutoff": _first("cutoff")},
    "PolynomialCutoff": {"cutoff": _first("cutoff"), "p": _first("p")},
    "MollifierCutoff": {"cutoff": _first("cutoff"), "eps": _first("eps")},
    "SwitchFunction": {"switch_on": _first("switch_on"), "switch_off": _first("switch_off")},
}


def _describe_part(module: Any, what: str, supported: tuple[str, ...]) -> dict[str, Any]:
    """Class name and constructor arguments of a radial basis or cut-off function."""
    name = type(module).__name__
    if name not in supported:
        raise ValueError(f"cannot save CACE {what} {name}; supported: {', '.join(supported)}.")
    return {"class": name, "kwargs": {key: read(module) for key, read in _PART_SETTINGS[name].items()}}


def _describe_output_module(module: Any) -> dict[str, Any]:
    name = type(module).__name__
    if name == "Atomwise":
        if getattr(module, "post_process", None) is not None:
            raise ValueError("cannot save a CACE Atomwise with a post_process callable.")
        kwargs = dict(
            n_in=module.n_in,
            n_out=module.n_out,
            n_hidden=module.n_hidden,
            n_layers=module.n_layers,
            bias=getattr(module, "bias", True),
            activation=_callable_name(module.activation),
            aggregation_mode=module.aggregation_mode,
            feature_key=getattr(module, "feature_key", "node_feats"),
            output_key=module.output_key,
            per_atom_output_key=module.per_atom_output_key,
            descriptor_output_key=getattr(module, "descriptor_output_key", None),
            residual=module.residual,
            use_batchnorm=module.use_batchnorm,
            add_linear_nn=module.add_linear_nn,
        )
    elif name == "Forces":
        kwargs = dict(
            calc_forces=module.calc_forces,
            calc_stress=module.calc_stress,
            energy_key=module.energy_key,
            forces_key=module.forces_key,
            stress_key=module.stress_key,
            virials_key=module.virial_key,
        )
    elif name == "FeatureAdd":
        kwargs = dict(feature_keys=list(module.feature_keys), output_key=module.output_key)
    else:
        raise ValueError(f"cannot save CACE output module {name}; supported: Atomwise, Forces, FeatureAdd "
                         "(save such hosts with torch.save and wrap them after loading).")
    return {"class": name, "kwargs": kwargs}


def _describe_cace_host(host: Any) -> dict[str, Any]:
    if type(host).__name__ != "NeuralNetworkPotential":
        raise ValueError(f"cannot save CACE model class {type(host).__name__}; only NeuralNetworkPotential.")
    rep = host.representation
    if type(rep).__name__ != "Cace":
        raise ValueError(f"cannot save CACE representation {type(rep).__name__}; only Cace.")
    if getattr(host, "do_postprocessing", False) or len(getattr(host, "postprocessors", None) or []):
        raise ValueError("cannot save a CACE model with postprocessors.")
    types, bchi = [], {}
    layers = list(rep.message_passing_list)
    if layers:
        for label, module in zip(("M", "Ar", "Bchi"), list(layers[0])):
            if module is not None:
                types.append(label)
            if label == "Bchi" and module is not None:
                bchi = dict(
                    n_in=module.n_in,
                    n_hidden=module.n_hidden,
                    n_layers=module.n_layers,
                    activation=_callable_name(module.activation),
                    residual=module.residual,
                    use_batchnorm=module.use_batchnorm,
                )
    mp_norm_factor = _number(rep.mp_norm_factor)
    representation = dict(
        zs=[int(z) for z in rep.zs],
        n_atom_basis=int(rep.n_atom_basis),
        cutoff=_number(rep.cutoff),
        max_l=int(rep.max_l),
        max_nu=int(rep.max_nu),
        num_message_passing=int(rep.num_message_passing),
        type_message_passing=types,
        args_message_passing={"Bchi": bchi} if bchi else {},
        embed_receiver_nodes=rep.node_embedding_receiver is not rep.node_embedding_sender,
        n_radial_basis=int(rep.n_radial_basis),
        avg_num_neighbors=1.0 / mp_norm_factor**2,
    )
    return {
        "kind": "cace",
        "representation": representation,
        "mp_norm_factor": mp_norm_factor,  # restored exactly (avg_num_neighbors round-trips inexactly)
        "radial_basis": _describe_part(rep.radial_basis, "radial basis", tuple(_PART_SETTINGS)[:4]),
        "cutoff_fn": _describe_part(rep.cutoff_fn, "cut-off function", tuple(_PART_SETTINGS)[4:]),
        "n_input_modules": len(getattr(host, "input_modules", None) or []),
        "output_modules": [_describe_output_module(m) for m in host.output_modules],
    }


def _call_with_known_arguments(cls: Any, kwargs: dict[str, Any]) -> Any:
    """cls(**kwargs), dropping arguments this cace version does not take if they are unset."""
    parameters = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        unknown = {k: v for k, v in kwargs.items() if k not in parameters}
        if any(v not in (None, False, {}, []) for v in unknown.values()):
            raise ValueError(
                f"the installed cace's {cls.__name__} does not take {sorted(unknown)}, which this "
                "model file needs; install the cace version the model was saved with."
            )
        kwargs = {k: v for k, v in kwargs.items() if k in parameters}
    return cls(**kwargs)


def _build_cace_host(spec: dict[str, Any]) -> nn.Module:
    import cace.modules as cace_modules
    from cace.models.atomistic import NeuralNetworkPotential
    from cace.representations.cace_representation import Cace

    def module(description: dict[str, Any], **overrides: Any) -> nn.Module:
        kwargs = dict(description["kwargs"], **overrides)
        return _call_with_known_arguments(getattr(cace_modules, description["class"]), kwargs)

    representation = dict(spec["representation"])
    bchi = representation["args_message_passing"].get("Bchi")
    if bchi:
        bchi = dict(bchi, activation=_resolve_callable(bchi["activation"]))
        representation["args_message_passing"] = {"Bchi": bchi}
    rep = _call_with_known_arguments(
        Cace,
        dict(
            representation,
            radial_basis=module(spec["radial_basis"]),
            cutoff_fn=module(spec["cutoff_fn"]),
        ),
    )
    rep.mp_norm_factor = spec["mp_norm_factor"]
    outputs = []
    for description in spec["output_modules"]:
        overrides = {}
        if "activation" in description["kwargs"]:
            overrides["activation"] = _resolve_callable(description["kwargs"]["activation"])
        outputs.append(module(description, **overrides))
    inputs = [cace_modules.Preprocess() for _ in range(spec["n_input_modules"])]
    return NeuralNetworkPotential(representation=rep, input_modules=inputs, output_modules=outputs)

