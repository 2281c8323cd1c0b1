"""A/B testing of the served policies (plain Python: no Dagster, no torch).

* :mod:`adrec_assets.abtest.stats`: the statistics — ratio moments and the delta method,
  CUPED, contrasts, always-valid mSPRT p-values, the sample-ratio check, power planning.
* :mod:`adrec_assets.abtest.report`: from logged events to a per-user table, the analysis of
  one experiment (:func:`~adrec_assets.abtest.report.analyze_experiment`), its markdown and
  PNG, and the stored ``experiment_report`` artifact.

Nothing here imports :mod:`adrec_assets.online` or :mod:`adrec_assets.assets`: the
experiment_report asset wraps this package, and the online service does not need it.
Import from the submodules; like ``ml`` and ``online``, this file re-exports nothing.
"""
