"""`python -m model.evaluate`: its figures are the model's own predictions, counted right,
on exactly the images asked for (all of them, or the split training held out)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model import evaluate
from model.data import load_dataset, stratified_split
from model.preprocessing import CIFAR10_CLASSES, normalize
from model.resnet import resnet
from model.weights import (
    Architecture,
    ModelCard,
    card_path,
    load_checked,
    read_card,
    save_checked,
)
from tests.model.test_data import PALETTE, class_pixels, write_cifar_batches

PER_CLASS = 8


@pytest.fixture(scope="module")
def mixed_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 class folders whose images have random colours, so that what a model
    predicts varies from image to image, not just from class to class."""
    root = tmp_path_factory.mktemp("mixed") / "tree"
    rng = np.random.default_rng(0)
    for name in CIFAR10_CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            colour = int(rng.integers(len(PALETTE)))
            Image.fromarray(class_pixels(colour, rng)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def probe_weights(tmp_path_factory: pytest.TempPathFactory, mixed_tree: Path) -> Path:
    """A random ResNet8 whose linear head is centred on these images' features.

    A freshly initialised network's logits are dominated by the head's bias, so it
    predicts one class for everything and a miscounted confusion matrix would go
    unnoticed. Centring makes the prediction depend on the image.
    """
    torch.manual_seed(0)
    model = resnet(8).eval()
    images = load_dataset(mixed_tree, cache_dir=tmp_path_factory.mktemp("cache")).images
    features: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda _m, inputs, _o: features.append(inputs[0]))
    with torch.no_grad():
        model(normalize(images))
        hook.remove()
        torch.nn.init.normal_(model.fc.weight)
        model.fc.bias.copy_(-(features[0].mean(0) @ model.fc.weight.T))
    path = tmp_path_factory.mktemp("probe") / "probe.safetensors"
    card = ModelCard(
        name="probe",
        architecture=Architecture(depth=8, version=1, num_classes=10),
        classes=CIFAR10_CLASSES,
    )
    save_checked(model, path, card)
    return path


def logits_of(weights: Path, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """The weights' logits, computed here without model.evaluate (TTA: with the mirror
    image, flipped left-right)."""
    model, _ = load_checked(weights)
    with torch.no_grad():
        logits = model(normalize(images))
        if tta:
            logits = (logits + model(normalize(images).flip(3))) / 2
    return logits


def expected_figures(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    confusion = [[0] * 10 for _ in range(10)]
    for truth, guess in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        confusion[truth][guess] += 1
    per_class = {
        name: confusion[i][i] / sum(confusion[i]) for i, name in enumerate(CIFAR10_CLASSES)
    }
    return {
        "confusion_matrix": confusion,
        "per_class": per_class,
        "accuracy": sum(confusion[i][i] for i in range(10)) / len(labels),
        "loss": F.cross_entropy(logits, labels).item(),
    }


def run(weights: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--weights", str(weights),
        "--data", str(data),
        "--cache-dir", str(tmp_path / "cache"),
        "--plot", str(tmp_path / "confusion.png"),
        *extra,
    ]  # fmt: skip


def test_json_report_is_the_models_predictions_counted(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = evaluate.main(run(probe_weights, mixed_tree, tmp_path, "--json"))
    printed = json.loads(capsys.readouterr().out)  # stdout holds exactly one JSON object
    assert printed == json.loads(json.dumps(result))

    dataset = load_dataset(mixed_tree, cache_dir=tmp_path / "cache")
    logits = logits_of(probe_weights, dataset.images)
    assert len(logits.argmax(1).unique()) > 3, "the probe model should not predict one class"
    expected = expected_figures(logits, dataset.labels)
    assert printed["images"] == 10 * PER_CLASS
    assert 0.0 <= printed["accuracy"] <= 1.0  # a fraction, not a percentage
    assert printed["accuracy"] == pytest.approx(expected["accuracy"])
    assert printed["confusion_matrix"] == expected["confusion_matrix"]
    assert printed["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    # Per-class accuracy is keyed by class name, in CIFAR-10's order.
    assert list(printed["per_class"]) == list(CIFAR10_CLASSES)
    assert printed["per_class"] == pytest.approx(expected["per_class"])
    assert printed["classes"] == list(CIFAR10_CLASSES)
    assert (tmp_path / "confusion.png").stat().st_size > 0


def test_val_size_and_seed_select_the_split_training_held_out(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path
) -> None:
    result = evaluate.main(
        run(probe_weights, mixed_tree, tmp_path, "--val-size", "30", "--seed", "4", "--json")
    )
    dataset = load_dataset(mixed_tree, cache_dir=tmp_path / "cache")
    # model.train holds out stratified_split(labels, --val-size, --seed)[1].
    _, held_out = stratified_split(dataset.labels, 30, 4)
    logits = logits_of(probe_weights, dataset.images[held_out])
    expected = expected_figures(logits, dataset.labels[held_out])
    assert result["images"] == 30
    assert [sum(row) for row in result["confusion_matrix"]] == [3] * 10
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-4)

    # Another seed is another split, and the figures follow it: the check above can fail.
    other = evaluate.main(
        run(probe_weights, mixed_tree, tmp_path, "--val-size", "30", "--seed", "5", "--json")
    )
    assert other["confusion_matrix"] != result["confusion_matrix"]


def test_tta_averages_with_the_mirror_image(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path
) -> None:
    plain = evaluate.main(run(probe_weights, mixed_tree, tmp_path, "--json"))
    result = evaluate.main(run(probe_weights, mixed_tree, tmp_path, "--tta", "--json"))
    dataset = load_dataset(mixed_tree, cache_dir=tmp_path / "cache")
    expected = expected_figures(logits_of(probe_weights, dataset.images, tta=True), dataset.labels)
    assert result["tta"] is True and plain["tta"] is False
    assert result["confusion_matrix"] == expected["confusion_matrix"]
    # The loss follows the averaged logits exactly, so a wrong flip axis would show.
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert result["loss"] != pytest.approx(plain["loss"], rel=1e-4)


def test_torchvision_test_split(probe_weights: Path, tmp_path: Path) -> None:
    """--cifar-split test: the figures are those of test_batch's images and labels, not of a
    training batch of the same size."""
    written = write_cifar_batches(tmp_path / "cifar", per_batch=6)
    result = evaluate.main(
        run(probe_weights, tmp_path / "cifar", tmp_path, "--cifar-split", "test", "--json")
    )
    with open(tmp_path / "cifar" / "cifar-10-batches-py" / "test_batch", "rb") as handle:
        labels = torch.tensor(pickle.load(handle)["labels"])
    logits = logits_of(probe_weights, torch.from_numpy(written["test_batch"]).permute(0, 3, 1, 2))
    confusion = [[0] * 10 for _ in range(10)]  # six images: most classes have none
    for truth, guess in zip(labels.tolist(), logits.argmax(1).tolist(), strict=True):
        confusion[truth][guess] += 1
    assert result["images"] == 6
    assert result["confusion_matrix"] == confusion
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)


def test_text_report_writes_nothing_beside_the_weights(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Evaluating shipped weights on other data must not overwrite their plots."""
    weights = tmp_path / "w" / "probe.safetensors"
    weights.parent.mkdir()
    shutil.copy(probe_weights, weights)
    shutil.copy(probe_weights.with_suffix(".json"), weights.with_suffix(".json"))
    before = {path: path.read_bytes() for path in weights.parent.iterdir()}
    result = evaluate.main(
        ["--weights", str(weights), "--data", str(mixed_tree), "--cache-dir", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert f"top-1 accuracy: {result['accuracy']:.4f}" in out
    assert all(name in out for name in CIFAR10_CLASSES)
    assert {path: path.read_bytes() for path in weights.parent.iterdir()} == before


def test_plot_is_written_where_asked(probe_weights: Path, mixed_tree: Path, tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "confusion.png"
    evaluate.main(run(probe_weights, mixed_tree, tmp_path, "--plot", str(plot)))
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_classes_that_differ_from_the_models_are_refused(
    probe_weights: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.fromarray(class_pixels(0, rng)).save(tmp_path / "pets" / name / "0.png")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run(probe_weights, tmp_path / "pets", tmp_path))
    assert exit_info.value.code == 2
    assert "differ" in capsys.readouterr().err


def test_weights_that_fail_their_checksum_are_refused(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / "probe.safetensors"
    shutil.copy(probe_weights, weights)
    card = read_card(probe_weights).model_copy(update={"sha256": "0" * 64})
    card_path(weights).write_text(card.to_json())  # a card that names other weights
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run(weights, mixed_tree, tmp_path))
    assert exit_info.value.code == 2
    assert "SHA-256" in capsys.readouterr().err


def test_engine_torch_gives_the_models_figures(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path
) -> None:
    """Through the service's torch engine (BatchNorm folded, channels_last) the counts are
    the plain model's: the engine path scores the engine's logits, mirror TTA included."""
    for tta in ((), ("--tta",)):
        plain = evaluate.main(run(probe_weights, mixed_tree, tmp_path, *tta, "--json"))
        engine = evaluate.main(
            run(probe_weights, mixed_tree, tmp_path, *tta, "--json", "--engine", "torch")
        )
        assert engine["engine"]["engine"] == "torch" and engine["engine"]["precision"] == "fp32"
        assert engine["confusion_matrix"] == plain["confusion_matrix"]
        assert engine["loss"] == pytest.approx(plain["loss"], rel=1e-4)


def test_engine_int8_counts_the_quantized_models_predictions(
    probe_weights: Path, mixed_tree: Path, tmp_path: Path
) -> None:
    """--engine openvino --precision int8 quantizes (calibration images as given) into
    --engine-cache-dir and scores that model's logits."""
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    from model.calibration import save_calibration
    from model.engines import EngineOptions, engine_class

    dataset = load_dataset(mixed_tree, cache_dir=tmp_path / "cache")
    calibration = save_calibration(
        tmp_path / "calibration.safetensors", dataset.images, dataset.labels, {}
    )
    flags = ("--engine", "openvino", "--precision", "int8", "--calibration-path", calibration)
    engines = tmp_path / "engines"
    result = evaluate.main(
        run(probe_weights, mixed_tree, tmp_path, "--json", "--engine-cache-dir", str(engines),
            *map(str, flags))
    )  # fmt: skip
    assert result["engine"]["precision"] == "int8"
    assert str(engines) in result["engine"]["model_file"]
    model, card = load_checked(probe_weights)
    options = EngineOptions(
        device="cpu", precision="int8", cache_dir=engines, calibration_path=calibration
    )
    logits = engine_class("openvino")(model, card, options).run(dataset.images)
    assert (
        result["confusion_matrix"] == expected_figures(logits, dataset.labels)["confusion_matrix"]
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--precision", "int8"), "--precision needs --engine"),
        (("--engine", "torch", "--precision", "int8"), "torch engine cannot run int8"),
        (("--engine", "onnxruntime", "--precision", "bf16"), "onnxruntime engine cannot run"),
    ],
)
def test_precisions_an_engine_cannot_run_are_refused(
    probe_weights: Path,
    mixed_tree: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: tuple[str, ...],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(run(probe_weights, mixed_tree, tmp_path, *flags))
    assert exit_.value.code == 2  # a usage error, as the README says
    assert message in capsys.readouterr().err
