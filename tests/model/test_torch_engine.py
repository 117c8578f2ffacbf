"""model.engines.torch_engine: the torch engine on the CPU (the model's own logits, padded
buckets that never leak) and what it refuses (int8, an accelerator that is not there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.engines import EngineOptions, create_engine
from model.engines.torch_engine import TorchEngine
from model.preprocessing import normalize
from model.weights import load_checked


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
