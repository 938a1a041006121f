"""Backbone adapters (installed as :mod:`latent_lr.adapters`).

Each adapter is the only place that imports its backbone package.
"""
