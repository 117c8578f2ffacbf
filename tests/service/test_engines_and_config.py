"""The engine factory, the torch engine on the CPU, and the settings sources."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model.preprocessing import normalize
from model.weights import load_checked
from service.config import PROJECT_ROOT, Settings
from service.engines import (
    Engine,
    EngineOptions,
    EngineUnavailableError,
    check_engine,
    create_engine,
    engine_class,
    resolve_engine_name,
)
from service.engines.torch_engine import TorchEngine


def _images(n: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def test_torch_engine_on_cpu_gives_the_models_logits(weights_file: Path) -> None:
    model, card = load_checked(weights_file)
    engine = create_engine("torch", model, card, EngineOptions(device="auto"))
    assert isinstance(engine, TorchEngine)
    assert engine.device == "cpu"  # no accelerator on the test machines
    assert engine.describe()["precision"] == "fp32"
    images = _images(5)
    with torch.inference_mode():
        expected = load_checked(weights_file)[0](normalize(images))
    logits = engine.run(images)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    engine.warm_up([1, 2, 3])  # runs without error for each size


def test_unknown_or_missing_engines_are_refused_with_a_reason() -> None:
    with pytest.raises(EngineUnavailableError, match="unknown engine 'tensorrt'"):
        engine_class("tensorrt")
    for name in ("onnxruntime", "openvino"):
        try:
            cls = engine_class(name)
        except EngineUnavailableError as error:
            assert name in str(error)  # its library or module is not installed here
        else:
            assert issubclass(cls, Engine)


def test_torch_engine_refuses_int8(weights_file: Path) -> None:
    model, card = load_checked(weights_file)
    with pytest.raises(ValueError, match="int8 is the openvino engine's"):
        create_engine("torch", model, card, EngineOptions(device="cpu", precision="int8"))


def test_asking_for_cuda_without_one_fails_clearly(weights_file: Path) -> None:
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    model, card = load_checked(weights_file)
    with pytest.raises(RuntimeError, match="no accelerator"):
        create_engine("torch", model, card, EngineOptions(device="cuda"))


def test_padded_buckets_return_only_the_real_rows(weights_file: Path) -> None:
    """With compile or graphs, batches are padded to power-of-two sizes; the padding rows
    must never leak into the answer. (Checked on the CPU path, which pads the same way.)"""
    model, card = load_checked(weights_file)
    engine = TorchEngine(model, card, EngineOptions(device="cpu"))
    plain = engine.run(_images(3))
    engine._use_graphs, engine._max_bucket = True, 8  # bucketing on, graphs not captured
    assert [engine._bucket(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    padded = engine.run(_images(3))
    assert padded.shape == (3, 10)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)


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


def test_auto_picks_the_fastest_installed_cpu_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"openvino", "onnxruntime", "onnx", "onnxscript"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if name in installed else None
    )
    cpu = EngineOptions(device="cpu")
    assert resolve_engine_name("auto", cpu) == "openvino"
    installed.discard("openvino")
    assert resolve_engine_name("auto", cpu) == "onnxruntime"
    assert resolve_engine_name("auto", EngineOptions(device="cpu", precision="bf16")) == "torch"
    installed.discard("onnxruntime")
    assert resolve_engine_name("auto", cpu) == "torch"
    assert resolve_engine_name("onnxruntime", cpu) == "onnxruntime"  # an explicit name stays
    int8 = EngineOptions(device="auto", precision="int8")
    assert resolve_engine_name("auto", int8) == "openvino"  # the one engine that runs int8


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


def test_check_engine_names_what_int8_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    shipped = EngineOptions(device="cpu", precision="int8")
    if importlib.util.find_spec("nncf") is not None:
        assert check_engine("auto", shipped).name == "openvino"
    missing = EngineOptions(precision="int8", calibration_path=tmp_path / "none.safetensors")
    with pytest.raises(EngineUnavailableError, match=r"none\.safetensors not found: make one"):
        check_engine("openvino", missing)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "nncf" else real_find_spec(name)
    )
    with pytest.raises(EngineUnavailableError, match="pip install nncf"):
        check_engine("openvino", shipped)
    assert check_engine("openvino", EngineOptions(precision="fp32")).name == "openvino"
