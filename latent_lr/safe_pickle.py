"""Reading whole-model pickles (``torch.save(model, path)``) without running code from the file.

A whole-model pickle names the classes and functions to rebuild the model
with, and ``torch.load(weights_only=False)`` calls whatever it names.
:func:`load_module_pickle` instead runs torch's weights-only unpickler with an
allow-list built from the names the file asks for:

* module classes of the allowed packages (a backbone's own, e.g. ``mace`` and
  ``e3nn``) and of ``torch.nn``: the unpickler gets a stand-in subclass that
  can only be created empty and filled with its saved attributes (the class's
  own ``__init__`` and ``__setstate__`` never run; e3nn's ``__setstate__`` would
  unpickle embedded bytes without any allow-list).  After loading, each module
  gets its real class back;
* tuple-like value classes of those packages without a ``__setstate__``
  (e3nn's ``Irreps``, named tuples), as they are; any other class (say
  ``mace.calculators.MACECalculator``, which would load a file when called)
  refuses the file;
* functions of the allowed packages: an inert reference that cannot be called
  while loading, replaced by the real function afterwards; activation functions
  of ``torch.nn.functional`` as they are;
* torch.fx graph modules (generated Python source that loading would ``exec``):
  an empty placeholder module, recorded in :attr:`LoadedPickle.dropped`.  The
  code is not run: the adapter rebuilds the host from its settings instead.

Any other name (``os.system``, ``builtins.exec``, a package outside the
allow-list) refuses the file; the caller then asks for an explicit opt-in
(``trust_pickle=True``).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .errors import UserInputError

#: ``module.qualname`` of torch.fx's graph-module rebuild function (it exec's stored source code).
FX_REBUILD = "torch.fx.graph_module.reduce_graph_module"
#: ``module.qualname`` of the storage rebuild of plain pickles (it calls torch.load with weights_only=False).
STORAGE_FROM_BYTES = "torch.storage._load_from_bytes"
#: Non-module classes of torch that graph modules' saved attributes name (harmless when rebuilt empty).
TORCH_VALUE_CLASSES = ("torch.fx._symbolic_trace.Tracer",)
#: torch functions and classes e3nn's generated-code pickles name besides the two replaced above (plain rebuilds).
GENERATED_CODE_TORCH_GLOBALS = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "collections.OrderedDict")
#: Builtins a module pickle may use.
BUILTINS = ("builtins.slice", "builtins.set", "builtins.frozenset", "builtins.complex")


class UnsafePickleError(ValueError):
    """The file names something outside the allow-list (:attr:`names`)."""

    def __init__(self, path: Path, names: Sequence[str]):
        self.names = list(names)
        shown = ", ".join(self.names[:3]) + (", ..." if len(self.names) > 3 else "")
        super().__init__(f"{path} asks to run {shown}, which is not on the allow-list")


class DroppedGeneratedCode(nn.Module):
    """Stands where a torch.fx graph module (generated code) was in the file: its saved tensors, no code, no forward.

    Args:
        body: the graph module's saved attributes; its buffers and tensor
            attributes (e3nn's Wigner-3j constants) become buffers here, so a
            host rebuilt by its own constructor can take the file's values.
    """

    def __init__(self, body: Optional[dict] = None):
        super().__init__()
        body = body if isinstance(body, dict) else {}
        tensors = {**{k: v for k, v in body.items() if isinstance(v, torch.Tensor)}, **dict(body.get("_buffers") or {})}
        for name, tensor in tensors.items():
            if isinstance(tensor, torch.Tensor):
                self.register_buffer(name, tensor)


@dataclasses.dataclass
class LoadedPickle:
    """What :func:`load_module_pickle` read.

    Attributes:
        model: the unpickled object, modules with their real classes.
        dropped: dotted paths (from ``model``) of submodules whose generated
            code was not loaded (e3nn code generation, fx graph modules); the
            model cannot run until these are rebuilt.
    """

    model: Any
    dropped: list[str]


class _InertFunction:
    """A package function named by the file: not callable while loading, swapped for the real one after."""

    def __init__(self, function: Callable[..., Any]):
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise UnsafePickleError(Path("the file"), [f"{self.function.__module__}.{self.function.__qualname__}"])


def _refuse_construction(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise UnsafePickleError(Path("the file"), [f"{type(self).__mro__[1].__module__}.{type(self).__name__}(...)"])


def _saved_attributes_only(self: nn.Module, state: Any) -> None:
    """``__setstate__`` of stand-ins: the saved attributes, minus generated code (kept aside, not unpickled)."""
    if not isinstance(state, dict):
        raise UnsafePickleError(Path("the file"), [f"a {type(self).__name__} state of type {type(state).__name__}"])
    state = dict(state)
    generated = state.pop("__codegen__", None)
    nn.Module.__setstate__(self, state)
    generated = generated if isinstance(generated, dict) else {}
    for name, saved in generated.items():
        self._modules[str(name)] = _generated_code_tensors(saved)
    self.__dict__["_latent_lr_dropped_codegen"] = sorted(str(name) for name in generated)


class _GeneratedCodeUnpickler(pickle.Unpickler):
    """Reads e3nn's embedded fx pickles (protocol 4, which torch's weights-only unpickler does not parse).

    Only names of :data:`GENERATED_CODE_GLOBALS` resolve (Python's documented
    way of restricting an unpickler): the graph module becomes a placeholder
    holding its tensors, storages are read weights-only.
    """

    def find_class(self, module: str, name: str) -> Any:
        value = _generated_code_globals().get(f"{module}.{name}")
        if value is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in generated code")
        return value


def _generated_code_globals() -> dict[str, Any]:
    names = {name: _resolve(name) for name in (*TORCH_VALUE_CLASSES, *GENERATED_CODE_TORCH_GLOBALS)}
    return {**names, FX_REBUILD: _graph_module_placeholder, STORAGE_FROM_BYTES: _load_bytes_weights_only}


def _load_bytes_weights_only(data: bytes) -> Any:
    """Stand-in for ``torch.storage._load_from_bytes`` (which loads with ``weights_only=False``)."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _generated_code_tensors(saved: Any) -> DroppedGeneratedCode:
    """The tensors of an e3nn generated-code entry ``(kind, bytes)``, read weights-only (its code is not loaded)."""
    kind, data = saved if isinstance(saved, tuple) and len(saved) == 2 else (None, None)
    if kind != "fx" or not isinstance(data, bytes):
        return DroppedGeneratedCode()
    try:
        placeholder = _GeneratedCodeUnpickler(io.BytesIO(data)).load()
    except Exception:  # anything the weights-only unpickler refuses: keep no tensors, the host regenerates them
        return DroppedGeneratedCode()
    return placeholder if isinstance(placeholder, DroppedGeneratedCode) else DroppedGeneratedCode()


def _graph_module_placeholder(body: Any, import_block: Any = None) -> DroppedGeneratedCode:
    """Stand-in for ``reduce_graph_module``: keeps the attribute names, never runs the code."""
    return DroppedGeneratedCode(body if isinstance(body, dict) else None)


def _resolve(name: str) -> Any:
    """The object ``module.qualname`` names (imports the module: only called for allowed packages)."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute)
        return value
    raise ImportError(name)


def _allowed(name: str, packages: Sequence[str]) -> bool:
    top = name.split(".")[0]
    return top in packages or name.startswith(("torch.nn.modules.", "torch.nn.functional.")) or name in BUILTINS


def _stand_in(name: str, packages: Sequence[str]) -> Any:
    """What the unpickler gets for ``name`` (see the module docstring); UnsafePickleError if not allowed."""
    if name == FX_REBUILD:
        return _graph_module_placeholder
    if name in TORCH_VALUE_CLASSES:
        return _resolve(name)
    if not _allowed(name, packages):
        raise UnsafePickleError(Path("the file"), [name])
    value = _resolve(name)
    if name in BUILTINS:
        return value
    if inspect.isclass(value) and issubclass(value, nn.Module):
        attributes = {"__setstate__": _saved_attributes_only, "__init__": _refuse_construction,
                      "__module__": value.__module__, "__qualname__": value.__qualname__, "_latent_lr_real_class": value}
        return type(value.__name__, (value,), attributes)
    if inspect.isclass(value):
        # value types only (e3nn's Irreps, named tuples): other classes could do anything when called with the file's arguments
        if not issubclass(value, tuple) or hasattr(value, "__setstate__"):
            raise UnsafePickleError(Path("the file"), [name])
        return value
    if callable(value):
        return value if name.startswith("torch.nn.functional.") else _InertFunction(value)
    raise UnsafePickleError(Path("the file"), [name])


def _restore(model: Any) -> list[str]:
    """Give stand-in modules their real classes and swap inert function references; return dropped paths."""
    dropped: list[str] = []
    if not isinstance(model, nn.Module):
        return dropped
    for path, module in model.named_modules(remove_duplicate=False):
        real = getattr(type(module), "_latent_lr_real_class", None)
        if real is not None:
            module.__class__ = real
        for key, value in list(vars(module).items()):
            if isinstance(value, _InertFunction):
                module.__dict__[key] = value.function
            elif isinstance(value, (list, tuple)) and any(isinstance(v, _InertFunction) for v in value):
                module.__dict__[key] = type(value)(v.function if isinstance(v, _InertFunction) else v for v in value)
        prefix = f"{path}." if path else ""
        dropped.extend(prefix + name for name in module.__dict__.pop("_latent_lr_dropped_codegen", []))
        if isinstance(module, DroppedGeneratedCode):
            dropped.append(path)
    return sorted(set(dropped))


def unsafe_globals(path: Union[str, Path]) -> list[str]:
    """``module.qualname`` of everything beyond tensors and containers the pickle in ``path`` names (nothing is run)."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))


def load_module_pickle(path: Union[str, Path], packages: Sequence[str]) -> LoadedPickle:
    """Unpickle a whole-model file with the allow-list of the module docstring; nothing from the file runs.

    Args:
        path: a file written by ``torch.save(model, path)``.
        packages: top-level packages whose classes may appear (e.g. ``("mace", "e3nn")``).

    Raises:
        UnsafePickleError: the file names something not on the allow-list.
    """
    path = Path(path)
    names = unsafe_globals(path)
    refused: list[str] = []
    allowed: list[Any] = [(_graph_module_placeholder, FX_REBUILD), *(_resolve(name) for name in TORCH_VALUE_CLASSES)]
    for name in names:
        try:
            allowed.append((_stand_in(name, packages), name))
        except (UnsafePickleError, ImportError, AttributeError):
            refused.append(name)
    if refused:
        raise UnsafePickleError(path, refused)
    try:
        with torch.serialization.safe_globals(allowed):
            model = torch.load(path, map_location="cpu", weights_only=True)
    except UnsafePickleError as error:
        raise UnsafePickleError(path, error.names) from error
    except Exception as error:  # torch's weights-only unpickler raises UnpicklingError/RuntimeError subtypes
        raise UnsafePickleError(path, [f"something torch's weights-only loader refused ({str(error).splitlines()[0]})"]) from error
    return LoadedPickle(model, _restore(model))


def needs_trust(path: Union[str, Path], why: str) -> UserInputError:
    """The error for a file that only loads by running code from it (``why``: what in it needs that)."""
    return UserInputError(
        f"{path}: {why}, so loading it runs code stored in the file; if you trust where the file comes from, "
        "pass trust_pickle=True (CLI: --trust-pickle)."
    )


def load_trusted(path: Union[str, Path]) -> Any:
    """``torch.load(path, weights_only=False)`` on the CPU (runs code from the file: only after an explicit opt-in)."""
    return torch.load(path, map_location="cpu", weights_only=False)


def allow_listed(path: Union[str, Path], packages: Sequence[str], label: str) -> LoadedPickle:
    """:func:`load_module_pickle`, with a refusal as the :func:`needs_trust` error naming ``label``'s allow-list."""
    try:
        return load_module_pickle(path, packages)
    except UnsafePickleError as error:
        raise needs_trust(path, f"it names {', '.join(error.names[:3])}, which latent-lr's allow-list for {label} files "
                          f"({', '.join(packages)} and torch.nn classes) does not hold") from error


def load_whole_model(path: Union[str, Path], packages: Sequence[str], label: str, trust_pickle: bool) -> Any:
    """A whole-model pickle whose modules run as loaded (no generated code): allow-listed, or trusted on request."""
    if trust_pickle:
        return load_trusted(path)
    loaded = allow_listed(path, packages, label)
    if loaded.dropped:
        raise needs_trust(path, f"it holds generated code ({loaded.dropped[0]}, ...) that latent-lr does not rebuild for {label}")
    return loaded.model


def is_torch_package(names: Sequence[str]) -> bool:
    """True for the member names of a torch.package archive (such as a nequip-package): it lists its extern modules."""
    return any(name.endswith(".data/extern_modules") for name in names)
