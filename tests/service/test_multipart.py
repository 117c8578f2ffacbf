"""A malformed multipart body is `invalid_multipart` (400) wherever it breaks; only a
well-formed body without the file field is `missing_file` (issue 14, kind 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.images import png

CASES = Path(__file__).parent / "cases"
BOUNDARY = b"bnd9"


def _post(client: TestClient, body: bytes, route: str = "/predict") -> tuple[int, str]:
    response = client.post(
        route,
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"},
    )
    return response.status_code, response.json()["error"]["code"]


def _part(name: str, data: bytes, filename: str = "a.png") -> bytes:
    return (
        b"--" + BOUNDARY + b"\r\n"
        b'Content-Disposition: form-data; name="' + name.encode() + b'"; filename="'
        b"" + filename.encode() + b'"\r\n'
        b"Content-Type: image/png\r\n\r\n" + data + b"\r\n"
    )


CLOSE = b"--" + BOUNDARY + b"--\r\n"


def test_the_shared_case_with_an_unclosed_file_part_is_invalid_multipart(
    client: TestClient,
) -> None:
    body = (CASES / "multipart_no_closing_boundary.bin").read_bytes()
    assert _post(client, body) == (400, "invalid_multipart")
    # The same body, closed, is a valid upload of a valid PNG.
    response = client.post(
        "/predict",
        content=body + b"\r\n" + CLOSE,
        headers={"content-type": "multipart/form-data; boundary=bnd9"},
    )
    assert response.status_code == 200, response.text


def _broken_bodies() -> dict[str, bytes]:
    whole = _part("file", png(1)) + CLOSE
    header_end = whole.index(b"\r\n\r\n") + 4
    return {
        "empty body": b"",
        "only the opening boundary": b"--" + BOUNDARY,
        "opening boundary and its line break": b"--" + BOUNDARY + b"\r\n",
        "cut inside a header name": whole[:20],
        "cut inside the part headers": whole[: header_end - 10],
        "cut right after the part headers": whole[:header_end],
        "cut inside the file data": whole[: header_end + 50],
        "file data, no closing boundary": _part("file", png(1)),
        "closing boundary without its final dashes": _part("file", png(1))
        + b"--"
        + BOUNDARY
        + b"\r\n",
        "closing boundary cut short": _part("file", png(1)) + CLOSE[:5],
        "another field, then cut": _part("other", b"x") + whole[:header_end],
        "text where the first boundary belongs": b"hello\r\n" + whole,
    }


@pytest.mark.parametrize("label", list(_broken_bodies()))
def test_a_body_broken_anywhere_is_invalid_multipart(client: TestClient, label: str) -> None:
    body = _broken_bodies()[label]
    assert _post(client, body) == (400, "invalid_multipart")
    assert _post(client, body.replace(b'name="file"', b'name="files"'), "/predict/batch") == (
        400,
        "invalid_multipart",
    )


def test_a_well_formed_body_without_the_field_is_missing_file(client: TestClient) -> None:
    assert _post(client, _part("other", png(1)) + CLOSE) == (400, "missing_file")
    assert _post(client, CLOSE) == (400, "missing_file")  # a body with no parts at all
    # An epilogue after the closing boundary is allowed (RFC 2046 section 5.1.1).
    response = client.post(
        "/predict",
        content=_part("file", png(2)) + CLOSE + b"epilogue",
        headers={"content-type": "multipart/form-data; boundary=bnd9"},
    )
    assert response.status_code == 200, response.text
