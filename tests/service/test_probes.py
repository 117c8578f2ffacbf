"""Health probes: HEAD on every GET route (issue 14, kind 6)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.service.support import metric


def _get_routes(client: TestClient) -> list[str]:
    """Every GET path the app documents, and the documentation pages themselves."""
    spec = client.get("/openapi.json").json()
    paths = [path for path, operations in spec["paths"].items() if "get" in operations]
    paths += ["/openapi.json", "/docs", "/redoc"]
    assert {"/health", "/health/live", "/metrics"} <= set(paths)
    return paths


def test_every_get_route_answers_head_with_the_get_status_and_headers_and_no_body(
    client: TestClient,
) -> None:
    for path in _get_routes(client):
        got = client.get(path)
        head = client.head(path)
        assert head.status_code == got.status_code, path
        assert "{" in path or got.status_code == 200, path  # templated paths may 404
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if path not in ("/metrics",):  # the metrics text changes between the two calls
            assert head.headers["content-length"] == got.headers["content-length"], path


def test_head_on_the_health_endpoints(client: TestClient) -> None:
    for path in ("/health", "/health/live"):
        response = client.head(path, headers={"X-Request-ID": "probe-1"})
        assert response.status_code == 200
        assert response.content == b""
        assert response.headers["x-request-id"] == "probe-1"


def test_head_is_counted_as_head_and_other_methods_are_unchanged(client: TestClient) -> None:
    before = client.get("/metrics").text
    client.head("/health/live")
    after = client.get("/metrics").text
    labels = {"route": "/health/live", "method": "HEAD", "status": "200"}
    assert (
        metric(after, "http_requests_total", **labels)
        - metric(before, "http_requests_total", **labels)
        == 1
    )
    # HEAD where GET is not allowed, or nothing is routed, keeps its error status.
    assert client.head("/predict").status_code == 405
    assert client.head("/predict").headers["allow"] == "POST"
    assert client.head("/no-such-page").status_code == 404
