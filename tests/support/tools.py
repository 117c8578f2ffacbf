"""Helpers for the deployment tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def require_tool(*names: str, fix: str) -> str:
    """The first of `names` on PATH. Missing: a skip on a developer's machine, a failure in
    CI (CI=true), where .ci/run and the dev extra install every tool these tests use."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' or '.join(names)} not found: {fix}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
