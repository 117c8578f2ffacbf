"""CORS: `--cors-origins` lets pages on other origins call the API; off by default.

The browser's side of it (a real cross-origin fetch) is in tests/web/test_page.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from tests.support.images import png
from tests.support.service import settings_for, wait_ready_sync

FRONT_END = "https://front.example"

# /v2/... is answered by the middleware before any route, so it is covered whatever routes
# exist (the KServe v2 protocol's inference path is the one a front-end would call).
PATHS = ["/predict", "/predict/batch", "/health", "/v2/models/resnet56/infer"]


def _preflight(client: TestClient, path: str, origin: str) -> dict[str, str]:
    response = client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-request-id",
        },
    )
    return {"status": str(response.status_code), **response.headers}


@pytest.fixture(scope="module")
def cors_client(weights_file: Path) -> Iterator[TestClient]:
    settings = settings_for(weights_file, cors_origins=(FRONT_END, "http://localhost:5173"))
    with TestClient(create_app(settings)) as client:
        wait_ready_sync(client)  # the model loads after the port opens
        yield client


@pytest.mark.parametrize("path", PATHS)
def test_preflight_from_a_listed_origin_is_allowed(cors_client: TestClient, path: str) -> None:
    headers = _preflight(cors_client, path, FRONT_END)
    assert headers["status"] == "200"
    assert headers["access-control-allow-origin"] == FRONT_END
    assert "POST" in headers["access-control-allow-methods"]
    allowed = headers["access-control-allow-headers"].lower()
    assert "content-type" in allowed and "x-request-id" in allowed
    assert "Origin" in headers["vary"]  # caches must not hand this answer to other origins


@pytest.mark.parametrize("path", PATHS)
def test_preflight_from_another_origin_is_refused(cors_client: TestClient, path: str) -> None:
    headers = _preflight(cors_client, path, "https://evil.example")
    assert headers["status"] == "400"
    assert "access-control-allow-origin" not in headers


def test_a_prediction_from_a_listed_origin_can_be_read_by_its_page(
    cors_client: TestClient,
) -> None:
    response = cors_client.post(
        "/predict", files={"file": ("a.png", png())}, headers={"Origin": FRONT_END}
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == FRONT_END
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed and "x-request-id" in exposed
    # An error is readable by the page too, so it can show the message.
    refused = cors_client.post(
        "/predict", files={"file": ("a.txt", b"hello")}, headers={"Origin": FRONT_END}
    )
    assert refused.status_code == 415
    assert refused.headers["access-control-allow-origin"] == FRONT_END


def test_without_cors_origins_no_other_origin_is_allowed(weights_file: Path) -> None:
    settings = settings_for(weights_file)
    assert settings.cors_origins == ()
    with TestClient(create_app(settings)) as client:
        wait_ready_sync(client)
        preflight = _preflight(client, "/predict", FRONT_END)
        assert "access-control-allow-origin" not in preflight
        assert preflight["status"] == "405"  # no CORS layer: OPTIONS is just not a route
        response = client.post(
            "/predict", files={"file": ("a.png", png())}, headers={"Origin": FRONT_END}
        )
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


def test_any_origin_with_a_star(weights_file: Path) -> None:
    client = TestClient(create_app(settings_for(weights_file, cors_origins=("*",))))
    headers = _preflight(client, "/v2/models/resnet56/infer", "https://anyone.example")
    assert headers["status"] == "200"
    assert headers["access-control-allow-origin"] == "*"


def test_origins_from_the_flag_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    listed = Settings(_cli_parse_args=["--cors-origins", "https://a.example,http://b:8080"])
    assert listed.cors_origins == ("https://a.example", "http://b:8080")
    repeated = ["--cors-origins", "https://a.example", "--cors-origins=http://b:8080"]
    assert Settings(_cli_parse_args=repeated).cors_origins == listed.cors_origins
    monkeypatch.setenv("SERVICE_CORS_ORIGINS", "https://a.example, http://[::1]:3000")
    assert Settings().cors_origins == ("https://a.example", "http://[::1]:3000")


@pytest.mark.parametrize(
    ("origins", "fix"),
    [
        ("https://a.example/", "no path or trailing slash"),
        ("https://a.example/app", "no path or trailing slash"),
        ("a.example", "scheme://host[:port]"),
        ("https://A.example", "lower case"),
        ("*,https://a.example", "list no other origin"),
    ],
)
def test_an_origin_no_browser_would_send_is_refused(origins: str, fix: str) -> None:
    # Origins are compared as exact strings: these would silently match nothing.
    with pytest.raises(ValidationError, match=r"cors_origins") as error:
        Settings(_cli_parse_args=["--cors-origins", origins])
    assert fix in str(error.value)
