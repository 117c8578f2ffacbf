"""service/config.py: `Settings` (its sources and the validators that refuse bad values),
and the engine tables behind them, which refuse every engine x device x precision
combination an engine cannot serve before the server starts, with exit status 2 and one line
naming the fix (README: "Exit status").

The static refusals (known from the settings alone) come from `Settings`; those that depend
on this machine (no GPU, onnxruntime without its GPU build, a CPU without native bf16) from
`check_engine`, which `python -m service` runs before uvicorn. The expected sets below are
written out by hand from what each engine runs (model/engines/*.py), not derived from the
tables in model/engines/__init__.py, so a wrong table fails here. That a real `python -m service`
process exits 2 on a refused setting is tests/service/test_process.py's
test_bad_weights_exit_nonzero_with_a_one_line_reason; CORS origins are test_cors.py's.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import service.__main__ as service_main
from service.config import PROJECT_ROOT, Settings

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
DEVICES = ("auto", "cpu", "cuda", "cuda:1")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
GPUS = ("cuda", "cuda:1")

# (engine, device, precision) -> the words the one error line must contain.
# Refused by the precision field's validator (python -m service: "setting precision: ...").
PRECISION_REFUSED: dict[tuple[str, str, str], str] = {
    # torch: no int8 anywhere (on a GPU, int8's own rule speaks first).
    **{("torch", d, "int8"): "torch engine cannot run int8" for d in ("auto", "cpu")},
    **{("torch", d, "int8"): "int8 runs on the CPU" for d in GPUS},
    # onnxruntime: fp32 only.
    **{
        ("onnxruntime", d, p): f"onnxruntime engine cannot run {p}"
        for d in ("auto", "cpu")
        for p in ("bf16", "fp16", "int8")
    },
    **{
        ("onnxruntime", d, p): f"onnxruntime engine cannot run {p}"
        for d in GPUS
        for p in ("bf16", "fp16")
    },
    **{("onnxruntime", d, "int8"): "int8 runs on the CPU" for d in GPUS},
    # openvino: int8 on the CPU only.
    **{("openvino", d, "int8"): "int8 runs on the CPU" for d in GPUS},
    # auto: int8 picks openvino, which runs on the CPU only.
    **{("auto", d, "int8"): "int8 runs on the CPU" for d in GPUS},
}
# Refused by the model validator: the combination has no one field to name
# (python -m service: "setting engine and device: ...").
DEVICE_REFUSED: dict[tuple[str, str, str], str] = {
    ("openvino", d, p): "openvino engine runs on cpu only"
    for d in GPUS
    for p in ("auto", "fp32", "bf16", "fp16")
}
REFUSED = {**PRECISION_REFUSED, **DEVICE_REFUSED}
ALL = list(itertools.product(ENGINES, DEVICES, PRECISIONS))
RunMain = Callable[[list[str]], tuple[int, str]]


def _flags(engine: str, device: str, precision: str) -> list[str]:
    return ["--engine", engine, "--device", device, "--precision", precision]


@pytest.fixture
def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> RunMain:
    """`python -m service`'s main in this process: (exit status, stderr). Its logging set-up
    is skipped, since it would replace pytest's log handlers for the rest of the session."""
    monkeypatch.setattr(service_main, "configure_logging", lambda level: None)

    def run(argv: list[str]) -> tuple[int, str]:
        status = service_main.main(argv)
        return status, capsys.readouterr().err

    return run


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# --- Settings: defaults, environment, flags -----------------------------------------------


def test_settings_from_defaults_environment_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().weights_path == PROJECT_ROOT / "weights" / "resnet56.safetensors"
    monkeypatch.setenv("SERVICE_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("SERVICE_DEVICE", "cpu")
    assert (Settings().max_batch_size, Settings().device) == (12, "cpu")
    # A flag wins over the environment (SERVICE_MAX_BATCH_SIZE is still 12).
    flags = Settings(_cli_parse_args=["--max-batch-size", "3", "--max-wait-ms", "7", "--compile"])
    assert (flags.max_batch_size, flags.max_wait_ms, flags.compile) == (3, 7.0, True)


def test_the_default_calibration_images_are_shipped() -> None:
    """int8's default --calibration-path is a file in the repository (beside the weights)."""
    assert Settings(engine="openvino", device="cpu", precision="int8").calibration_path.is_file()


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
    ids=lambda bad: next(iter(bad)),
)
def test_a_bad_value_is_refused_naming_its_setting(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as error:
        Settings(**bad)
    assert [problem["loc"] for problem in error.value.errors()] == [tuple(bad)]


# --- The engine tables: engine x device x precision -----------------------------------------


@pytest.mark.parametrize(("engine", "device", "precision"), ALL, ids=map("-".join, ALL))
def test_settings_accept_exactly_what_the_engines_can_serve(
    engine: str, device: str, precision: str
) -> None:
    """The whole product: each refused combination is refused with its reason, and every
    other one is accepted (a valid setting must never be blocked)."""
    expected = REFUSED.get((engine, device, precision))
    if expected is None:
        settings = Settings(engine=engine, device=device, precision=precision)
        assert (settings.engine, settings.device, settings.precision) == (
            engine,
            device,
            precision,
        )
        return
    with pytest.raises(ValidationError, match=expected) as error:
        Settings(engine=engine, device=device, precision=precision)
    assert len(error.value.errors()) == 1  # one reason, so one line


@pytest.mark.parametrize(
    ("engine", "device", "precision"), sorted(REFUSED), ids=map("-".join, sorted(REFUSED))
)
def test_python_m_service_exits_2_with_one_line_naming_the_setting_and_the_fix(
    run_main: RunMain, engine: str, device: str, precision: str
) -> None:
    status, stderr = run_main(_flags(engine, device, precision))
    assert status == 2
    line = _one_error_line(stderr)
    setting = "engine and device" if (engine, device, precision) in DEVICE_REFUSED else "precision"
    assert line.startswith(f"error: setting {setting}: ")
    assert REFUSED[(engine, device, precision)] in line
    assert "set --" in line  # it names the fix


# --- What this machine cannot serve: check_engine, before the server starts ---------------


@pytest.mark.parametrize("engine", ["auto", "torch", "onnxruntime"])
def test_a_gpu_this_machine_lacks_is_refused_not_replaced_by_the_cpu(
    run_main: RunMain, weights_file: Path, engine: str
) -> None:
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    if engine == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    argv = ["--weights-path", str(weights_file), *_flags(engine, "cuda", "auto")]
    status, stderr = run_main(argv)
    assert status == 2
    assert "device 'cuda' was asked for but there is no accelerator" in _one_error_line(stderr)


def test_onnxruntime_on_a_gpu_without_its_gpu_build_is_refused(
    run_main: RunMain, weights_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    # A GPU as torch sees it; this onnxruntime (the CPU build) still cannot use it.
    monkeypatch.setattr(
        torch.accelerator, "current_accelerator", lambda check_available=False: torch.device("cuda")
    )
    argv = ["--weights-path", str(weights_file), *_flags("onnxruntime", "cuda", "fp32")]
    status, stderr = run_main(argv)
    assert status == 2
    assert "needs onnxruntime-gpu" in _one_error_line(stderr)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_openvino_precision_this_cpu_lacks_is_refused_before_loading(
    run_main: RunMain, weights_file: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    openvino = pytest.importorskip("openvino")

    class Fp32OnlyCpu:
        """ov.Core on a CPU whose plugin reports no native bf16 or fp16."""

        def get_property(self, device: str, name: object) -> list[str]:
            return ["FP32", "INT8"]

    monkeypatch.setattr(openvino, "Core", Fp32OnlyCpu)
    argv = ["--weights-path", str(weights_file), *_flags("openvino", "cpu", precision)]
    status, stderr = run_main(argv)
    assert status == 2
    assert f"this CPU cannot run {precision} natively" in _one_error_line(stderr)
