"""The ONNX Runtime and OpenVINO engines: parity with torch fp32, the `run` contract, caching.

Parity needs a model whose predictions mean something. A randomly initialised ResNet8 puts
every image in the same class (so any engine would "agree" 100%), so the module trains one
briefly on generated images: ten classes, each a fixed random colour layout, under heavy
pixel noise. Held out at a higher noise level, the images are then classified about 94%
right, close to a ResNet56 on CIFAR-10, with every class predicted and the near-ties between
the top two logits that bf16 rounding can flip (0-4 of 2000 flipped, measured; limit 10).

INT8 (OpenVINO, quantized by NNCF) is calibrated on generated training images, as the
service's is on CIFAR-10 training images (model.calibration).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from model.calibration import save_calibration
from model.engines import Engine, EngineOptions, engine_class
from model.export import MIN_AGREEMENT, TOLERANCE
from model.preprocessing import CIFAR10_CLASSES, normalize
from model.weights import load_checked, read_card, save_checked, sha256_of
from service.app import create_app
from tests.support.images import png
from tests.support.service import metric, settings_for, wait_ready_sync
from tests.support.weights import write_test_weights

# (engine name, which is also its package, precision); bf16 runs only where the CPU has it.
CASES = [
    pytest.param("onnxruntime", "fp32", id="onnxruntime-fp32"),
    pytest.param("openvino", "fp32", id="openvino-fp32"),
    pytest.param("openvino", "bf16", id="openvino-bf16"),
]


def generated_images(
    count: int, seed: int, noise: float = 150.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels: class k is layout k (a 4x4 colour grid smoothly enlarged to
    32x32, the same for every seed) plus Gaussian noise of `noise` grey levels per pixel."""
    layouts = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234)) * 255
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    clean = F.interpolate(layouts[labels], size=32, mode="bilinear", align_corners=False)
    noisy = clean + noise * torch.randn(count, 3, 32, 32, generator=generator)
    return noisy.clamp(0, 255).round().to(torch.uint8), labels


def train_briefly(model: torch.nn.Module, steps: int = 100, batch_size: int = 32) -> None:
    """SGD on fresh generated batches at noise 150, seeded, so every run trains the same."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    threads = torch.get_num_threads()
    # One thread: batches this small gain little from a second one, and two slow to a crawl
    # when another process keeps the cores busy (measured 0.25 s/step with one, 0.6-2.5 s).
    torch.set_num_threads(1)
    try:
        model.train()
        for step in range(steps):
            images, labels = generated_images(batch_size, seed=step)
            loss = F.cross_entropy(model(normalize(images)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A briefly trained ResNet8 saved like model.train saves weights (file + matching card)."""
    path = write_test_weights(tmp_path_factory.mktemp("trained") / "resnet8.safetensors")
    model, card = load_checked(path)
    train_briefly(model)
    save_checked(model, path, card)
    return path


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 images from the training distribution (noise 150, seeds apart from the training
    batches and the held-out images), saved as model.calibration saves CIFAR-10's."""
    images, labels = generated_images(300, seed=5_000)
    path = tmp_path_factory.mktemp("calibration") / "calibration.safetensors"
    return save_calibration(path, images, labels, {"source": "generated"})


@pytest.fixture(scope="module")
def reference(trained_weights: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out generated images, their labels and torch fp32 logits."""
    model, _ = load_checked(trained_weights)
    images, labels = generated_images(2000, seed=10_000, noise=200.0)
    with torch.inference_mode():
        logits = model(normalize(images))
    return images, labels, logits


@pytest.fixture(scope="module")
def make_engine(
    trained_weights: Path, calibration_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Engine]:
    """Build (once per name and precision) an engine for the trained weights, sharing one
    cache folder, or skip when its package or the CPU support is missing."""
    cache_dir = tmp_path_factory.mktemp("engine-cache")
    built: dict[tuple[str, str], Engine] = {}

    def make(name: str, precision: str = "auto") -> Engine:
        if (name, precision) not in built:
            pytest.importorskip(name, reason=f"the {name} package is not installed")
            if name == "openvino" and precision == "bf16":
                import openvino as ov

                if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                    pytest.skip("this CPU has no native bf16 for OpenVINO")
            model, card = load_checked(trained_weights)
            if precision == "int8":
                pytest.importorskip("nncf", reason="int8 needs NNCF to quantize")
            options = EngineOptions(
                device="cpu",
                precision=precision,
                cache_dir=cache_dir,
                calibration_path=calibration_file,
            )
            built[name, precision] = engine_class(name)(model, card, options)
        return built[name, precision]

    return make


def test_reference_model_makes_varied_confident_predictions(
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Guards the parity test below: agreement means nothing if predictions are constant."""
    _, labels, logits = reference
    predictions = logits.argmax(1)
    assert (predictions == labels).double().mean() > 0.85
    assert torch.bincount(predictions, minlength=10).min() >= 100  # every class, >= 5% each


@pytest.mark.parametrize(("name", "precision"), CASES)
def test_engine_matches_torch_fp32(
    make_engine: Callable[..., Engine],
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    name: str,
    precision: str,
) -> None:
    """The issue's parity bar, top-1 agreement >= 99.5%, and logits within
    model.export.TOLERANCE (fp32: 1e-4 of the logit range, measured ~3e-7; bf16: 5% of it,
    measured ~0.5%; see there for why). Accuracy within 0.1 points is the benchmark's check,
    on the real validation split: on 2000 images 0.1 points is 2 images, which chance decides."""
    engine = make_engine(name, precision)
    images, _, expected = reference
    actual = torch.cat([engine.run(images[i : i + 64]) for i in range(0, len(images), 64)])

    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= TOLERANCE[precision] * max(1.0, scale)
    agreement = (actual.argmax(1) == expected.argmax(1)).double().mean().item()
    assert agreement >= MIN_AGREEMENT


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_run_contract_at_changing_batch_sizes(
    make_engine: Callable[..., Engine],
    trained_weights: Path,
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    name: str,
) -> None:
    """float32 (N, 10) CPU logits for any N, growing and shrinking, from an engine that has
    not run before (its dynamic-shape buffers are sized by the first batch), and results
    that a later run does not overwrite (a runtime may reuse its output buffer)."""
    model, card = load_checked(trained_weights)
    engine = engine_class(name)(model, card, make_engine(name, "fp32").options)  # never run yet
    images, _, expected = reference
    results = {n: engine.run(images[:n]) for n in (1, 64, 3, 33)}
    engine.warm_up([2, 5])
    for n, logits in results.items():
        assert logits.dtype == torch.float32 and logits.device.type == "cpu"
        assert logits.shape == (n, 10)
        torch.testing.assert_close(logits, expected[:n], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_engine_caches_its_export_by_weights_sha256(
    make_engine: Callable[..., Engine], trained_weights: Path, name: str
) -> None:
    engine = make_engine(name, "fp32")
    sha256 = read_card(trained_weights).sha256
    described = engine.describe()
    assert described["engine"] == name and described["device"] == "cpu"
    assert described["precision"] == "fp32"
    cached = Path(described["model_file"])
    assert cached.is_file() and sha256 in str(cached)
    modified = cached.stat().st_mtime_ns
    model, card = load_checked(trained_weights)
    again = engine_class(name)(model, card, engine.options)  # a second start reuses the file
    assert Path(again.describe()["model_file"]) == cached
    assert cached.stat().st_mtime_ns == modified


def test_openvino_auto_precision_is_openvinos_choice(make_engine: Callable[..., Engine]) -> None:
    openvino = pytest.importorskip("openvino")
    engine = make_engine("openvino", "auto")
    default = openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    assert (
        engine.describe()["precision"]
        == {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}[default.to_string()]
    )


def test_onnxruntime_refuses_reduced_precision(trained_weights: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, card = load_checked(trained_weights)
    options = EngineOptions(precision="bf16", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="fp32 only"):
        engine_class("onnxruntime")(model, card, options)


def test_openvino_refuses_gpus_and_unknown_precisions(
    trained_weights: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    model, card = load_checked(trained_weights)
    with pytest.raises(ValueError, match="runs on the CPU"):
        engine_class("openvino")(model, card, EngineOptions(device="cuda", cache_dir=tmp_path))
    with pytest.raises(ValueError, match="unknown precision"):
        engine_class("openvino")(model, card, EngineOptions(precision="int4", cache_dir=tmp_path))


def test_int8_without_calibration_images_names_the_fix(
    trained_weights: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from model.calibration import CalibrationError

    model, card = load_checked(trained_weights)
    missing = tmp_path / "none.safetensors"
    options = EngineOptions(precision="int8", cache_dir=tmp_path, calibration_path=missing)
    with pytest.raises(
        CalibrationError, match=r"not found: make one with `python -m model\.calibr"
    ):
        engine_class("openvino")(model, card, options)
    assert not list(tmp_path.glob("*int8*"))


def test_int8_engine_agrees_with_torch_fp32(
    make_engine: Callable[..., Engine],
    reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """INT8 rounds every activation and weight to 256 levels, so it flips more near-ties than
    bf16: it must still give torch fp32's top-1 class for >= 99% of the held-out images
    (measured 99.65%: 7 of 2000 flipped) and lose at most 0.5 points of accuracy (measured
    0.05). weights/MODEL_CARD.md gives the ResNet56's figures on the validation split."""
    engine = make_engine("openvino", "int8")
    assert engine.describe()["precision"] == "int8"
    images, labels, expected = reference
    actual = torch.cat([engine.run(images[i : i + 64]) for i in range(0, len(images), 64)])
    agreement = (actual.argmax(1) == expected.argmax(1)).double().mean().item()
    accuracy = (actual.argmax(1) == labels).double().mean().item()
    fp32_accuracy = (expected.argmax(1) == labels).double().mean().item()
    assert agreement >= 0.99, f"int8 gives fp32's top-1 class for {agreement:.2%}"
    assert accuracy >= fp32_accuracy - 0.005, (accuracy, fp32_accuracy)


def test_health_and_metrics_say_int8_serves(
    make_engine: Callable[..., Engine], trained_weights: Path
) -> None:
    engine = make_engine("openvino", "int8")
    settings = settings_for(trained_weights, engine="openvino", precision="int8")
    with TestClient(create_app(settings, lambda: engine)) as client:
        wait_ready_sync(client)  # the model loads after the port opens
        health = client.get("/health").json()
        assert (health["engine"], health["precision"]) == ("openvino", "int8")
        labels = {"engine": "openvino", "device": "cpu", "precision": "int8"}
        assert metric(client.get("/metrics").text, "inference_engine_info", **labels) == 1
        answer = client.post("/predict", files={"file": ("a.png", png(), "image/png")})
        assert answer.status_code == 200 and answer.json()["label"] in CIFAR10_CLASSES


def test_int8_model_is_cached_per_weights_and_calibration_sha256(
    make_engine: Callable[..., Engine],
    trained_weights: Path,
    calibration_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second start loads the quantized model (NNCF does not run again, the file is not
    rewritten); other calibration images make another quantized model beside it."""
    from model import export

    engine = make_engine("openvino", "int8")
    cached = Path(engine.describe()["model_file"])
    assert cached.is_file() and cached.with_suffix(".bin").is_file()
    assert cached.parent.name.startswith(f"{read_card(trained_weights).sha256}.openvino-int8")
    assert sha256_of(calibration_file)[:16] in cached.parent.name
    modified = cached.stat().st_mtime_ns
    quantized: list[Path] = []
    quantize = export.quantize_openvino

    def counting_quantize(*args: Any) -> Any:
        quantized.append(args[2])
        return quantize(*args)

    monkeypatch.setattr(export, "quantize_openvino", counting_quantize)

    model, card = load_checked(trained_weights)
    again = engine_class("openvino")(model, card, engine.options)
    assert Path(again.describe()["model_file"]) == cached
    assert cached.stat().st_mtime_ns == modified and quantized == []

    images, labels = generated_images(50, seed=6_000)
    other = save_calibration(tmp_path / "other.safetensors", images, labels, {})
    options = EngineOptions(
        device="cpu", precision="int8", cache_dir=engine.options.cache_dir, calibration_path=other
    )
    recalibrated = engine_class("openvino")(model, card, options)
    new_file = Path(recalibrated.describe()["model_file"])
    assert len(quantized) == 1 and new_file.parent != cached.parent
    assert new_file.parent.parent == cached.parent.parent and cached.is_file()
    assert [p.name for p in new_file.parent.parent.iterdir() if p.name.startswith(".")] == []
