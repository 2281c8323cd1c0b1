"""Shared test setup: never reach a model hub; the offline encoder ships its weights."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The suite pins the offline encoder: on a machine that has Jina CLIP v2 weights, `auto`
# would pick Jina and every expected encoder id would change.
os.environ["ADREC_ENCODER"] = "offline"
# Tests that run without ADREC_ID_KEY use the public dev key, as `make run` does; the
# refusal of a missing key is tested with this flag removed.
os.environ.setdefault("ADREC_ALLOW_DEV_KEY", "1")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# Hermetic encoding cache: nothing the suite materializes (in process or in the Dagster
# subprocesses, which inherit this environment) may write to the checkout's data/cache/.
# One throw-away folder per session; tests that count cache hits pass their own folder.
_ENCODER_CACHE_DIR = tempfile.mkdtemp(prefix="adrec-test-encoder-cache-")
os.environ["ADREC_ENCODER_CACHE_DIR"] = _ENCODER_CACHE_DIR
atexit.register(shutil.rmtree, _ENCODER_CACHE_DIR, ignore_errors=True)

# Hermetic sources and artifacts: whatever `make run`, `make serve` or `make demo` left in the
# checkout's data/ (a served click file pseudonymized with another key, a snapshot of an older
# run) is never read by a test. Tests that need a source or artifact folder make their own;
# the defaults point at empty throw-away folders (inherited by Dagster subprocesses).
_HERMETIC_DATA = tempfile.mkdtemp(prefix="adrec-test-data-")
os.symlink(
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "catalog"),
    os.path.join(_HERMETIC_DATA, "catalog"),
)  # the built-in catalogue is read-only input
os.environ["ADREC_DATA_DIR"] = _HERMETIC_DATA  # the online store's default path, among others
os.environ["ADREC_SOURCES_DIR"] = os.path.join(_HERMETIC_DATA, "sources")
os.environ["ADREC_ARTIFACTS_DIR"] = os.path.join(_HERMETIC_DATA, "artifacts")
atexit.register(shutil.rmtree, _HERMETIC_DATA, ignore_errors=True)

from collections.abc import Iterator  # noqa: E402

import dagster as dg  # noqa: E402
import pytest  # noqa: E402

from adrec_assets_tests.pipeline_fixtures import load_artifact, materialize_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (and thrash on a busy 2-core box)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def single_blas_thread() -> Iterator[None]:
    """Small matrices: BLAS threads only add overhead (and thrash on a busy 2-core box)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        yield


@pytest.fixture(scope="module")
def encoder(single_torch_thread):
    """The real offline encoder, loaded once (pipeline runs in the same process share it
    through the resource's cache)."""
    from adrec_assets.resources import EncoderResource

    return EncoderResource().get()


@pytest.fixture(scope="session")
def default_pipeline(tmp_path_factory) -> Iterator[tuple]:
    """One default materialization of the synthetic partition, shared by the whole session
    (it trains both models, so it is the expensive part of the suite)."""
    base = tmp_path_factory.mktemp("artifacts")
    with dg.instance_for_test() as instance:
        result = materialize_pipeline(instance, base)
        yield base, result, instance


@pytest.fixture(scope="session")
def pipeline_artifacts(default_pipeline) -> tuple:
    base, result, _ = default_pipeline
    assert result.success
    return base, load_artifact


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Dagster keeps the current instance's definitions-state storage in a ContextVar that an
    instance sets on ``__enter__`` and resets on ``__exit__``; when instances of fixtures of
    different scopes (the session's ``default_pipeline``, a module's, a test's) exit out of
    order, the variable can be left naming the storage of an instance already collected, and the
    next ``Definitions`` load fails with "Attempted to resolve undefined DagsterInstance weakref"
    (seen once in a full run, never in a file alone). A dead storage is useless to anyone, so it
    is cleared before each test (``None`` is what Dagster has outside any instance)."""
    from dagster._core.storage.defs_state.base import _current_storage

    storage = _current_storage.get()
    ref = getattr(storage, "_instance_weakref", None)
    if storage is not None and ref is not None and ref() is None:
        _current_storage.set(None)
