"""Inference engines: the model behind a small interface (load, warm up, run a batch).

They run the network `model.weights` loads, through torch or an exported graph
(`model.export`), so they live with the model; the service (`service.runtime`) and
`model.evaluate --engine` both use them, and they import nothing from `service/`.
`create_engine` is the one way to build an engine. Engines other than torch are
imported only when asked for, so their libraries stay optional.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from model.devices import DeviceUnavailableError, resolve_device
from model.engines.base import Engine, EngineOptions
from model.weights import ModelCard

# What each engine can serve, beyond "auto" (whether this CPU or GPU is present and has
# native bf16 or fp16 is checked before the server starts, by `check_engine` below).
# int8 is NNCF-quantized OpenVINO IR, which runs on the CPU only. "cuda" stands for cuda:N.
ENGINE_PRECISIONS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32",),
    "openvino": ("fp32", "bf16", "fp16", "int8"),
}
ENGINE_DEVICES: dict[str, tuple[str, ...]] = {
    "torch": ("cpu", "cuda"),
    "onnxruntime": ("cpu", "cuda"),  # cuda with the onnxruntime-gpu package
    "openvino": ("cpu",),
}


def engine_device_problem(engine: str, device: str) -> str | None:
    """Why `engine` cannot run on `device` (a sentence naming the fix), or None when it can.
    "auto" on either side is always servable: auto picks what fits."""
    supported = ENGINE_DEVICES.get(engine)
    device_type = device.partition(":")[0]
    if device == "auto" or supported is None or device_type in supported:
        return None
    others = [name for name, ok in ENGINE_DEVICES.items() if device_type in ok]
    return (
        f"the {engine} engine runs on {' or '.join(supported)} only, not on {device}: set "
        f"--device {' or '.join(supported)} or auto, or --engine {' or '.join(others)} or auto"
    )


def engine_precision_problem(engine: str, device: str, precision: str) -> str | None:
    """Why `engine` on `device` cannot run `precision` (a sentence naming the fix), or None.
    int8 needs the CPU whatever the engine; otherwise ENGINE_PRECISIONS decides."""
    if precision == "int8" and device not in ("auto", "cpu"):
        return (
            f"int8 runs on the CPU (the openvino engine), not on {device}: set --device cpu "
            "or auto, or another precision"
        )
    supported = ENGINE_PRECISIONS.get(engine)
    if precision == "auto" or supported is None or precision in supported:
        return None
    engines = [name for name, ok in ENGINE_PRECISIONS.items() if precision in ok]
    return (
        f"the {engine} engine cannot run {precision} (it runs auto, {', '.join(supported)}): "
        f"set --engine {' or '.join(engines)} or auto, or another precision"
    )


ENGINE_NAMES: tuple[str, ...] = ("auto", "torch", "onnxruntime", "openvino")

# name -> (module, class), imported lazily.
_ENGINES: dict[str, tuple[str, str]] = {
    "torch": ("model.engines.torch_engine", "TorchEngine"),
    "onnxruntime": ("model.engines.onnxruntime_engine", "OnnxRuntimeEngine"),
    "openvino": ("model.engines.openvino_engine", "OpenVinoEngine"),
}


# On the CPU, fastest first, as benchmarks/engines.py ranks them on ResNet56 (model only; the
# figures are in benchmarks/README.md): each engine and the packages it needs (its runtime
# plus onnx and onnxscript, to export the model).
_CPU_ENGINES: dict[str, tuple[str, ...]] = {
    "openvino": ("openvino", "onnx", "onnxscript"),
    "onnxruntime": ("onnxruntime", "onnx", "onnxscript"),
}


class EngineUnavailableError(RuntimeError):
    """The engine asked for cannot be used here (library missing, unknown name)."""


def engine_class(name: str) -> type[Engine]:
    """The Engine subclass for a concrete engine name, imported on first use.

    Raises EngineUnavailableError for an unknown name, and for an engine whose packages are
    not installed (naming the pip command): its module imports them only when an engine is
    built, which would otherwise fail later, after the model has loaded."""
    if name not in _ENGINES:
        raise EngineUnavailableError(
            f"unknown engine {name!r}: choose one of {', '.join(ENGINE_NAMES)}"
        )
    for package in _CPU_ENGINES.get(name, ()):
        if importlib.util.find_spec(package) is None:
            raise EngineUnavailableError(
                f"engine {name!r} needs the {package} package, not installed here: "
                f"pip install {package}"
            )
    module_name, class_name = _ENGINES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EngineUnavailableError(f"engine {name!r} is not available: {error}") from error
    return getattr(module, class_name)


def resolve_engine_name(name: str, options: EngineOptions) -> str:
    """Map "auto" to a concrete engine: openvino for int8 (the one engine that runs it);
    torch on an accelerator; on the CPU the fastest engine that is installed and can run
    the requested precision, else torch."""
    if name != "auto":
        return name
    if options.precision == "int8":
        return "openvino"
    if resolve_device(options.device).type != "cpu":
        return "torch"
    for engine, packages in _CPU_ENGINES.items():
        if engine_precision_problem(engine, "cpu", options.precision) is not None:
            continue  # e.g. bf16 asked for: ONNX Runtime's CPU provider runs fp32 only
        if all(importlib.util.find_spec(package) is not None for package in packages):
            return engine
    return "torch"


def check_engine(name: str, options: EngineOptions) -> type[Engine]:
    """The Engine subclass `name` resolves to, once it is known to be usable here for
    `options`: raises EngineUnavailableError (one line, with the fix) when its library is
    missing, the device is not on this machine (model.devices.resolve_device), the engine
    cannot serve the device or precision here (`Engine.check`: onnxruntime without its GPU
    build, a CPU without native bf16 or fp16 for openvino), or, for int8, when NNCF or the
    calibration images are. Cheap: it imports the engine's module but loads no model, so
    `python -m service` runs it before the server starts."""
    try:
        engine = engine_class(resolve_engine_name(name, options))
        engine.check(options)
    except (DeviceUnavailableError, ValueError) as error:
        raise EngineUnavailableError(str(error)) from None
    if options.precision == "int8":
        from model.calibration import CalibrationError, calibration_sha256

        if importlib.util.find_spec("nncf") is None:
            raise EngineUnavailableError(
                "precision int8 needs NNCF to quantize the model: pip install nncf"
            )
        try:
            calibration_sha256(options.calibration_path)
        except CalibrationError as error:
            raise EngineUnavailableError(f"precision int8: {error}") from None
    return engine


def create_engine(
    name: str, model: torch.nn.Module, card: ModelCard, options: EngineOptions
) -> Engine:
    """Build the engine `name` ("auto", "torch", "onnxruntime", "openvino") for `model`.

    Engines raise ValueError for an option they cannot honour (device, precision)."""
    return engine_class(resolve_engine_name(name, options))(model, card, options)


__all__ = [
    "ENGINE_DEVICES",
    "ENGINE_NAMES",
    "ENGINE_PRECISIONS",
    "Engine",
    "EngineOptions",
    "EngineUnavailableError",
    "check_engine",
    "create_engine",
    "engine_class",
    "engine_device_problem",
    "engine_precision_problem",
    "resolve_engine_name",
]
