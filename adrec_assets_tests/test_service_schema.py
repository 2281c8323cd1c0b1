"""schemathesis against the service's own OpenAPI document: generated valid and invalid requests
for every operation must never get a 5xx, and every response must match the documented
status codes, content types and schemas.

The operations are driven with plain hypothesis ``@given`` over schemathesis' strategies
(its pytest plugin does not load under pytest 9)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis (the `dev` extra) is not installed: `make setup`"
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from adrec_assets.online.api import create_app  # noqa: E402
from adrec_assets_tests.pipeline_fixtures import id_key  # noqa: E402
from adrec_assets_tests.test_service import make_service  # noqa: E402

EXAMPLES_PER_OPERATION = 30


@pytest.fixture(scope="module")
def api_schema(default_pipeline, tmp_path_factory):
    base, result, _ = default_pipeline
    assert result.success
    service = make_service(base, tmp_path_factory.mktemp("schema"), load_encoder=True)
    with id_key():
        service.start(background=False)
        service._load_encoder()  # synchronously: POST /v1/ads must not answer 503 because it is still loading
        yield schemathesis.openapi.from_asgi("/openapi.json", create_app(service, start=False))


def test_no_generated_request_gets_a_5xx_or_an_undocumented_response(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 7
    checked: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
        def call(case) -> None:
            with id_key():
                # every check but "schema-valid data is accepted": an event naming a request that was
                # never served, or bytes that are no image, are schema-valid yet rightly refused (4xx)
                case.call_and_validate(excluded_checks=[positive_data_acceptance])
            checked[operation.label] = checked.get(operation.label, 0) + 1  # noqa: B023 - call() runs at once

        call()
    assert len(checked) == len(operations) and min(checked.values()) >= 1, checked  # parameterless ones: 1
