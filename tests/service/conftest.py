from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.support import settings_for, wait_ready_sync


@pytest.fixture(scope="module")
def client(weights_file: Path) -> Iterator[TestClient]:
    """One started app per test module (warm-up is the slow part), with small limits so
    the limit tests need no big uploads."""
    settings = settings_for(
        weights_file, max_upload_bytes=500_000, max_pixels=1_000_000, max_files=4
    )
    with TestClient(create_app(settings)) as test_client:
        wait_ready_sync(test_client)
        yield test_client
