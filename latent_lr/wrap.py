"""`latent_lr.wrap`: give any supported host model a learned long-range term."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

from torch import nn

from .backbone import Backbone, adapter_class, detect_backbone
from .config import LongRangeConfig
from .host_files import load_host
from .long_range import LongRangeModule
from .model import LongRangeModel


def wrap(
    host_model: Union[nn.Module, str, os.PathLike],
    backbone: Optional[str] = None,
    *,
    long_range: bool = True,
    freeze_host: bool = False,
    trust_pickle: bool = False,
    adapter_options: Optional[dict[str, Any]] = None,
    config: Optional[LongRangeConfig] = None,
    **long_range_options: Any,
) -> LongRangeModel:
    """Wrap a host model (MACE, NequIP, CHGNet, CACE or built-in) with latent Ewald.

    Example::

        model = latent_lr.wrap(host_model)
        model = latent_lr.wrap("MACE.model")   # a backbone's own file (see latent_lr.load_host)

    Args:
        host_model: the short-range model (its class decides the adapter unless
            ``backbone`` is given), or the path of its file, read by
            :func:`latent_lr.load_host`.
        backbone: ``"mace"``, ``"nequip"``, ``"chgnet"``, ``"cace"`` or ``"radial"``.
        long_range: False builds the short-range twin (same host, no charges).
        freeze_host: train only the long-range head (post-hoc dipoles/BECs).
        trust_pickle: for a path: allow loading that runs code from the file
            (see :func:`latent_lr.load_host`).
        adapter_options: backbone-specific settings passed to the adapter.
        config: long-range settings (:class:`~latent_lr.config.LongRangeConfig`).
        **long_range_options: shortcut for single :class:`~latent_lr.config.LongRangeConfig`
            settings, applied on top of ``config``, e.g. ``wrap(host, smearing=0.8,
            charge_model="qeq")``.
    """
    config = (config or LongRangeConfig()).replace(**long_range_options)
    if isinstance(host_model, (str, os.PathLike)):
        host_model = load_host(host_model, backbone, trust_pickle=trust_pickle)
    if isinstance(host_model, Backbone):
        adapter = host_model
    else:
        name = backbone or detect_backbone(host_model)
        adapter = adapter_class(name)(host_model, **(adapter_options or {}))
    module = LongRangeModule(adapter.feature_dim, config) if long_range else None
    dtype = next((p.dtype for p in adapter.parameters() if p.dtype.is_floating_point), None)
    model = LongRangeModel(adapter, module)
    if dtype is not None and module is not None:
        module.to(dtype)
    if freeze_host:
        model.freeze_host()
    return model
