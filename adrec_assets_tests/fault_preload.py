"""Imported once by the fault-injection tests' fork server, so each child it forks starts with
dagster, torch, faiss and adrec imported. Only imports: nothing here may start an OpenMP thread
pool (loading the encoder does), because a child forked after that deadlocks in its first
parallel region (GNU OpenMP is not fork-safe); each child loads the encoder itself."""

import os

os.environ.setdefault("ADREC_ENCODER", "offline")
os.environ.setdefault("ADREC_ALLOW_DEV_KEY", "1")

import adrec_assets.definitions  # noqa: E402,F401
import adrec_assets_tests.pipeline_fixtures  # noqa: E402,F401
