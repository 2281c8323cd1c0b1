"""One module per asset; each is a thin Dagster wrapper over ``adrec_assets.ml``."""
