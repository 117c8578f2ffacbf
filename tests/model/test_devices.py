"""model/devices.py: the one device policy and the precision names, for training and serving."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.devices import DeviceUnavailableError, autocast_dtype, resolve_device
from model.train import main as train_main
from model.train import training_autocast_dtype


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Pretend this machine has a CUDA accelerator (no test machine has one); nothing is
    allocated on it, only the device is named."""
    monkeypatch.setattr(
        torch.accelerator,
        "current_accelerator",
        lambda check_available=False: torch.device("cuda"),
    )
    return monkeypatch


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(
        torch.accelerator, "current_accelerator", lambda check_available=False: None
    )
    return monkeypatch


@pytest.mark.usefixtures("no_accelerator")
def test_without_an_accelerator_auto_is_the_cpu_and_a_named_gpu_is_refused() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")  # model.train's --device default
    assert resolve_device("cpu") == torch.device("cpu")
    for requested in ("cuda", "cuda:1", "mps"):
        with pytest.raises(DeviceUnavailableError, match=f"'{requested}'.*no accelerator"):
            resolve_device(requested)


@pytest.mark.usefixtures("accelerator")
def test_with_an_accelerator_auto_is_its_first_device() -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)  # always with an index
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: no accelerator used
    with pytest.raises(DeviceUnavailableError, match=r"'mps'.*this has cuda"):
        resolve_device("mps")


def test_precision_names_map_to_autocast_dtypes() -> None:
    assert autocast_dtype("fp32") is None  # plain fp32: no autocast
    assert autocast_dtype("bf16") == torch.bfloat16
    assert autocast_dtype("fp16") == torch.float16
    for unresolved in ("auto", "int8", "float16"):
        with pytest.raises(ValueError, match="use one of fp32, bf16, fp16"):
            autocast_dtype(unresolved)


def test_training_auto_precision_follows_the_device() -> None:
    """--precision auto trains in bf16 autocast on the CPU and fp16 (with GradScaler) on
    CUDA, fp32 elsewhere; an explicit precision is taken as asked on any device."""
    assert training_autocast_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert training_autocast_dtype("auto", torch.device("cuda", 0)) == torch.float16
    assert training_autocast_dtype("auto", torch.device("mps")) is None
    assert training_autocast_dtype("fp32", torch.device("cuda", 0)) is None
    assert training_autocast_dtype("fp16", torch.device("cpu")) == torch.float16


@pytest.mark.usefixtures("no_accelerator")
def test_training_on_a_gpu_this_machine_lacks_stops_in_one_line(tmp_path: Path) -> None:
    argv = ["--device", "cuda", "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"^error: device 'cuda' was asked for but there is no"):
        train_main(argv)
    assert not any(tmp_path.iterdir())  # stopped before anything was written
