"""The ML core of adrec: encoders, models, losses, samplers, training loops and metrics.

Everything under this package is plain Python / numpy / torch and must never import
Dagster: the Dagster assets in :mod:`adrec_assets.assets` are a thin shell over it, so
the algorithms can be unit-tested, benchmarked and reused without an orchestrator.
"""
