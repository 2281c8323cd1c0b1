"""The online side: index, store, policies, position bias and experiments (plain Python).

Nothing here imports Dagster: the service (``adrec_assets.serve``) runs without the
orchestrator, and the Dagster assets that build an index or analyse experiments wrap
these modules rather than the other way round.
"""
