"""The OpenAPI document is exact: schemathesis fuzzes /predict, /predict/batch and every
/v2 route of a running service from its OpenAPI document, and no answer may be a server
error or break what the document says (status codes, media types, headers, body schemas).
Requests the document calls invalid must be refused (4xx). On /predict and /predict/batch,
requests it calls valid must not be refused as malformed (400): only the image bytes, which
no schema can describe, may be refused (413, 415, 422).

Bounded: at most 25 generated requests per operation (the hypothesis settings below),
against the small test model, so the module takes seconds, not minutes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from service.app import create_app
from tests.support.server import serving
from tests.support.service import settings_for

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# What a well-formed upload may still get: a 2xx, or a refusal of its bytes as no image.
UPLOAD_STATUSES = ["2xx", "413", "415", "422"]
LIMITS: dict[str, Any] = {"max_files": 3, "max_upload_bytes": 200_000}

# The document comes from an app with the served app's limits (building the document loads
# no model), so that the operations are known when pytest collects the tests. schemathesis's
# lazy `from_fixture` loader does not run under pytest 9 (it sets a private node attribute).
schema = schemathesis.openapi.from_dict(
    create_app(settings_for(Path("unused.safetensors"), **LIMITS)).openapi(),
    config=SchemathesisConfig.from_dict(
        {"checks": {"positive_data_acceptance": {"expected-statuses": UPLOAD_STATUSES}}}
    ),
).include(path_regex=r"^/(predict|v2)")


@pytest.fixture(scope="module")
def base_url(weights_file: Path) -> Iterator[str]:
    with serving(create_app(settings_for(weights_file, **LIMITS))) as address:
        yield f"http://{address}"


def test_the_fuzzed_document_is_the_served_one(base_url: str) -> None:
    import httpx

    assert httpx.get(f"{base_url}/openapi.json").json() == schema.raw_schema


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_and_every_answer_as_documented(
    case: schemathesis.Case, base_url: str
) -> None:
    uploads = [positive_data_acceptance] if case.path.startswith("/predict") else []
    case.call_and_validate(base_url=base_url, checks=CHECKS + uploads, timeout=30)


def test_batch_upload_is_documented_as_1_to_max_files_images() -> None:
    body = schema.raw_schema["paths"]["/predict/batch"]["post"]["requestBody"]
    multipart = body["content"]["multipart/form-data"]
    files = multipart["schema"]["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, LIMITS["max_files"])
    assert files["items"]["minLength"] == 1
    assert "image/png" in multipart["encoding"]["files"]["contentType"]
    assert "image/jpeg" in multipart["encoding"]["files"]["contentType"]
