"""Engine x device x precision: every combination an engine cannot serve is refused before
the server starts, with exit status 2 and one line naming the fix (README: "Exit status").

The static refusals (known from the settings alone) come from `Settings`; those that depend
on this machine (no GPU, onnxruntime without its GPU build, a CPU without native bf16) from
`check_engine`, which `python -m service` runs before uvicorn. The expected sets below are
written out by hand from what each engine runs (model/engines/*.py), not derived from the
tables in service/config.py, so a wrong table fails here.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

import service.__main__ as service_main
from service.config import Settings
from tests.service.conftest import Spawn

ENGINES = ("auto", "torch", "onnxruntime", "openvino")
DEVICES = ("auto", "cpu", "cuda", "cuda:1")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
GPUS = ("cuda", "cuda:1")

# (engine, device, precision) -> the words the one error line must contain.
REFUSED: dict[tuple[str, str, str], str] = {
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
    # openvino: the CPU only.
    **{
        ("openvino", d, p): "openvino engine runs on cpu only"
        for d in GPUS
        for p in ("auto", "fp32", "bf16", "fp16")
    },
    **{("openvino", d, "int8"): "int8 runs on the CPU" for d in GPUS},
    # auto: int8 picks openvino, which runs on the CPU only.
    **{("auto", d, "int8"): "int8 runs on the CPU" for d in GPUS},
}
RunMain = Callable[[list[str]], tuple[int, str]]
ALL = list(itertools.product(ENGINES, DEVICES, PRECISIONS))


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


@pytest.mark.parametrize(("engine", "device", "precision"), ALL, ids="-".join)
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


@pytest.mark.parametrize(("engine", "device", "precision"), sorted(REFUSED), ids="-".join)
def test_python_m_service_exits_2_with_one_line(
    run_main: RunMain, engine: str, device: str, precision: str
) -> None:
    status, stderr = run_main(_flags(engine, device, precision))
    assert status == 2
    line = _one_error_line(stderr)
    assert REFUSED[(engine, device, precision)] in line
    assert "set --" in line  # it names the fix


def test_engine_device_refusal_names_both_settings(run_main: RunMain) -> None:
    status, stderr = run_main(_flags("openvino", "cuda", "auto"))
    assert status == 2
    assert _one_error_line(stderr).startswith("error: setting engine and device: the openvino")


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


def test_the_real_process_exits_2(spawn: Spawn, weights_file: Path) -> None:
    """The exit status a supervisor sees, from `python -m service` itself."""
    process = spawn(
        [
            *(sys.executable, "-m", "service", "--weights-path", str(weights_file)),
            *_flags("openvino", "cuda", "auto"),
        ]
    )
    _, stderr = process.communicate(timeout=120)  # bounds a hang, not a speed goal
    assert process.returncode == 2
    assert "openvino engine runs on cpu only" in _one_error_line(stderr)
