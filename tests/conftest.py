from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.weights import write_test_weights


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ResNet8 weights file and card, shared by the whole test session."""
    return write_test_weights(tmp_path_factory.mktemp("weights") / "resnet8.safetensors")
