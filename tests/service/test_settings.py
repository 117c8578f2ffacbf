"""service.config.Settings: its sources (defaults, environment, flags) and the validators
that refuse bad values and combinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.config import PROJECT_ROOT, Settings


def test_settings_from_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().weights_path == PROJECT_ROOT / "weights" / "resnet56.safetensors"
    monkeypatch.setenv("SERVICE_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("SERVICE_DEVICE", "cpu")
    assert (Settings().max_batch_size, Settings().device) == (12, "cpu")
    flags = Settings(_cli_parse_args=["--max-batch-size", "3", "--max-wait-ms", "7", "--compile"])
    assert (flags.max_batch_size, flags.max_wait_ms, flags.compile) == (3, 7.0, True)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_batch_size": 0},
        {"device": "gpu"},
        {"engine": "tensorrt"},
        {"precision": "int4"},
        {"port": 70000},
        {"request_timeout_s": 0},
    ],
)
def test_invalid_settings_are_rejected(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(**bad)


@pytest.mark.parametrize(
    ("engine", "device", "precision", "message"),
    [
        ("torch", "auto", "int8", "the torch engine cannot run int8"),
        ("onnxruntime", "cpu", "int8", "set --engine openvino or auto"),
        ("onnxruntime", "auto", "bf16", "the onnxruntime engine cannot run bf16"),
        ("auto", "cuda", "int8", "int8 runs on the CPU"),
        ("openvino", "cuda:1", "int8", "int8 runs on the CPU"),
    ],
)
def test_settings_refuse_a_precision_the_engine_cannot_run(
    engine: str, device: str, precision: str, message: str
) -> None:
    with pytest.raises(ValidationError, match=message) as error:
        Settings(engine=engine, device=device, precision=precision)
    assert error.value.errors()[0]["loc"] == ("precision",)


def test_int8_settings_accepted_for_openvino_and_auto() -> None:
    for engine in ("openvino", "auto"):
        settings = Settings(engine=engine, device="cpu", precision="int8")
        assert settings.calibration_path.is_file()  # shipped beside the weights
