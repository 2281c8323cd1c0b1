"""adrec: privacy-first ad recommendations as Dagster assets.

``adrec_assets.ml`` and ``adrec_assets.sources`` are the plain-Python core; the Dagster
shell lives in ``assets/``, ``io_managers.py``, ``resources.py`` and ``definitions.py``.
"""
