"""Backbone adapters (:mod:`latent_lr.adapters`).

Each adapter module (``mace``, ``nequip``, ``chgnet``, ``cace``, ``radial``) is
the only place that imports its backbone package; helper modules
(``nequip_host``, ``chgnet_graph``, ``cace_config``) hold what is particular to
one backbone but not to running it, and :mod:`latent_lr.adapters.common` the
helpers all adapters share.  Adapters import the core (``latent_lr.backbone``,
``latent_lr.data``, ``latent_lr.neighbors``) at top level; the core never
imports adapters (``latent_lr.backbone.adapter_class`` imports them by name).
"""
