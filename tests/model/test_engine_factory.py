"""model.engines (the factory): which engine a name means, what "auto" picks, and the
one-line refusal, with its fix, when an engine cannot run here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from model.engines import (
    Engine,
    EngineOptions,
    EngineUnavailableError,
    check_engine,
    engine_class,
    resolve_engine_name,
)

# What each optional engine needs installed: its runtime, and onnx + onnxscript to export.
NEEDS = {
    "onnxruntime": ("onnxruntime", "onnx", "onnxscript"),
    "openvino": ("openvino", "onnx", "onnxscript"),
}


def test_an_unknown_engine_is_refused_with_the_names_to_choose_from() -> None:
    with pytest.raises(
        EngineUnavailableError,
        match="unknown engine 'tensorrt': choose one of auto, torch, onnxruntime, openvino",
    ):
        engine_class("tensorrt")


@pytest.mark.parametrize(
    ("name", "class_name"), [("onnxruntime", "OnnxRuntimeEngine"), ("openvino", "OpenVinoEngine")]
)
def test_an_installed_engine_is_its_class(
    name: str, class_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packages are reported installed whatever this machine has: the class is imported
    without them (each engine imports its runtime when it is built)."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda package: object())
    cls = engine_class(name)
    assert issubclass(cls, Engine) and cls.__name__ == class_name and cls.name == name


@pytest.mark.parametrize(
    ("name", "package"), [(name, package) for name, needs in NEEDS.items() for package in needs]
)
def test_an_engine_whose_library_is_missing_is_refused_with_the_pip_command(
    name: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused before any model is loaded (`python -m service` checks first), naming what
    to install: not an ImportError later, from a background thread."""
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda wanted: None if wanted == package else object()
    )
    with pytest.raises(EngineUnavailableError, match=f"pip install {package}$"):
        engine_class(name)
    with pytest.raises(EngineUnavailableError, match=f"pip install {package}$"):
        check_engine(name, EngineOptions(device="cpu"))


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
