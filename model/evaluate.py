"""Evaluate weights: `python -m model.evaluate --weights PATH --data PATH`.

Prints top-1 accuracy, per-class accuracy and the confusion matrix, and with `--plot PATH`
writes the matrix as a PNG. With no split flags every image in the source is evaluated;
`--val-size N --seed S` evaluates exactly the validation split that `model.train` held
out with the same flags. `--tta` averages the logits of each image and its mirror image.
`--json` prints one JSON object instead of the text report.

`--engine torch|onnxruntime|openvino --precision fp32|bf16|fp16|int8` evaluates through the
service's inference engine instead of the plain torch model, on the CPU unless `--device`
says otherwise: the same exported (or quantized) model, from the same cache
(`--engine-cache-dir`), that `python -m service` would serve with those flags. That is how
the model card's INT8 accuracy (weights/MODEL_CARD.md) is measured:

    python -m model.evaluate --data ../shared/data/cifar10-train-jpeg.tar.gz \\
        --val-size 5000 --seed 0 --engine openvino --precision int8 [--tta]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn

from model import inference
from model.data import Dataset, load_dataset, stratified_split
from model.devices import DeviceUnavailableError, resolve_device
from model.preprocessing import normalize
from model.weights import ModelCard, WeightsError, load_checked

if TYPE_CHECKING:
    from model.engines.base import Engine


@torch.inference_mode()
def evaluate_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    *,
    batch_size: int = 500,
    tta: bool = False,
    amp_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix of `model` on uint8 images."""
    was_training = model.training
    model.eval()
    head = getattr(model, "fc", None)
    num_classes = head.out_features if isinstance(head, nn.Linear) else int(labels.max()) + 1
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = 0.0
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    )
    with autocast:
        for start in range(0, len(labels), batch_size):
            batch = normalize(images[start : start + batch_size].to(device))
            batch = batch.contiguous(memory_format=memory_format)
            target = labels[start : start + batch_size].to(device)
            logits = inference.logits(model, batch, mirror_tta=tta)
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            predicted = logits.argmax(1)
            confusion += torch.bincount(
                (target * num_classes + predicted).cpu(), minlength=num_classes**2
            ).view(num_classes, num_classes)
    model.train(was_training)
    return _summary(confusion, loss_sum)


@torch.inference_mode()
def evaluate_engine(
    run: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int = 500,
    tta: bool = False,
) -> dict[str, Any]:
    """`evaluate_model`'s figures for an inference engine: `run` is an `Engine.run`
    (model.engines), uint8 images (N, 3, 32, 32) on the CPU -> float32 logits
    (N, num_classes), normalising inside. With `tta`, as the service's mirror TTA does, the
    logits of each image and its mirror image are averaged."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    loss_sum = 0.0
    for start in range(0, len(labels), batch_size):
        batch = images[start : start + batch_size]
        target = labels[start : start + batch_size]
        logits = inference.logits(run, batch, mirror_tta=tta)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        confusion += torch.bincount(
            target * num_classes + logits.argmax(1), minlength=num_classes**2
        ).view(num_classes, num_classes)
    return _summary(confusion, loss_sum)


def _summary(confusion: torch.Tensor, loss_sum: float) -> dict[str, Any]:
    images = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    return {
        "images": images,
        "loss": loss_sum / max(1, images),
        "accuracy": confusion.diag().sum().item() / max(1, images),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(confusion, dtype=torch.float64)
    rates = matrix / matrix.sum(1, keepdim=True).clamp(min=1)
    fig, axis = plt.subplots(figsize=(7.5, 6.5))
    # A NumPy array: matplotlib's np.array(..., copy=...) warns on a torch tensor.
    shown = axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            value = int(matrix[i, j])
            if value:
                axis.text(
                    j,
                    i,
                    str(value),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.colorbar(shown, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_report(result: dict[str, Any], classes: list[str]) -> str:
    lines = [
        f"images: {result['images']}",
        f"top-1 accuracy: {result['accuracy']:.4f}",
        "",
        "per class:",
    ]
    lines += [
        f"  {name:<12}{accuracy:.4f}"
        for name, accuracy in zip(classes, result["per_class"], strict=True)
    ]
    lines += ["", "confusion matrix (rows: true, columns: predicted):"]
    lines.append(" " * 12 + "".join(f"{name[:6]:>7}" for name in classes))
    for name, row in zip(classes, result["confusion_matrix"], strict=True):
        lines.append(f"{name:<12}" + "".join(f"{value:>7}" for value in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate as the flags say: print the report (text, or one JSON object with --json) and
    return it. Exits with status 2 and the reason in one line on stderr for flags, weights,
    a device, an engine or data it cannot use."""
    args = parse_args(argv)

    # Weights (checked against their card), the device, and the service engine if asked for.
    model, card = load_weights(args.weights)
    device = choose_device(args.device)
    engine = build_engine(args, model, card) if args.engine else None

    # Data: every image in --data, or the validation split model.train held out.
    dataset = load_data(args, list(card.classes))

    # Evaluate: through the engine, or the plain torch model; --tta in either.
    result = run_evaluation(args, dataset, model, device, engine)

    # Report: printed (text or JSON), and the confusion matrix as a PNG with --plot.
    if args.plot:  # only on request: evaluating must never overwrite shipped files
        plot_confusion(
            result["confusion_matrix"],
            result["classes"],
            args.plot,
            f"{args.weights.name}: accuracy {result['accuracy']:.4f} ({result['images']} images)",
        )
    print_report(result, args, engine)
    return result


# --- The command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits with status 2 on bad flags (argparse's usage error).

    The flags come in groups (shown so by --help): what to evaluate, how, through which
    engine, and the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_input_flags(parser)
    add_evaluation_flags(parser)
    add_engine_flags(parser)
    add_report_flags(parser)
    args = parser.parse_args(argv)
    if args.precision != "auto" and args.engine is None:
        parser.error("--precision needs --engine (the plain torch model runs fp32)")
    return args


def add_input_flags(parser: argparse.ArgumentParser) -> None:
    """The weights, and the images to evaluate them on (model.data's sources)."""
    group = parser.add_argument_group("weights and data")
    group.add_argument("--weights", type=Path, default=Path("weights/resnet56.safetensors"))
    group.add_argument("--data", required=True)
    group.add_argument(
        "--cifar-split",
        default="train",
        choices=("train", "test"),
        help="for a cifar-10-batches-py folder: data_batch_* or test_batch",
    )
    group.add_argument("--download", action="store_true")
    group.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="decoded-image cache, as in model.train (default ~/.cache/resnet-cifar10)",
    )
    group.add_argument(
        "--val-size",
        type=int,
        default=0,
        help="evaluate only the validation split of this size",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of that split (as in training)")


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """How the plain torch model (or the engine) runs."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--tta", action="store_true", help="average with horizontally flipped images"
    )
    group.add_argument("--device", default=None)
    group.add_argument("--batch-size", type=int, default=500)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """A service engine (model/engines) to evaluate through, as `python -m service` would
    serve it."""
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--engine",
        choices=("torch", "onnxruntime", "openvino"),
        default=None,
        help="evaluate through this service engine (default: the plain torch model)",
    )
    group.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        default="auto",
        help="the engine's precision, as `python -m service --precision` (needs --engine)",
    )
    group.add_argument(
        "--engine-cache-dir",
        type=Path,
        default=Path("~/.cache/resnet-cifar10/engines"),
        help="where engines keep exported models (the service's --cache-dir)",
    )
    group.add_argument(
        "--calibration-path",
        type=Path,
        default=None,
        help="calibration images for --precision int8 (default: the shipped ones)",
    )


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """What the report looks like and where it goes."""
    group = parser.add_argument_group("report")
    group.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the confusion matrix as a PNG here (default: no file is written)",
    )
    group.add_argument("--json", action="store_true", help="print one JSON object")


# --- The steps of main --------------------------------------------------------------------


def load_weights(path: Path) -> tuple[nn.Module, ModelCard]:
    """The model and its card (model.weights.load_checked), or exit 2 with the reason."""
    try:
        return load_checked(path)
    except WeightsError as error:
        _refuse(str(error))


def choose_device(requested: str | None) -> torch.device:
    """model.devices' policy: the accelerator when present, else the CPU; or exit 2 when the
    device asked for is not on this machine."""
    try:
        return resolve_device(requested)
    except DeviceUnavailableError as error:
        _refuse(str(error))


def build_engine(args: argparse.Namespace, model: nn.Module, card: ModelCard) -> Engine:
    """The service engine args ask for, or exit 2 with the reason in one line."""
    from model.calibration import DEFAULT_PATH
    from model.engines import (
        EngineOptions,
        EngineUnavailableError,
        check_engine,
        engine_device_problem,
        engine_precision_problem,
    )

    device = args.device or "cpu"
    # The service's own refusals (service/config.py), so both refuse the same combinations.
    problem = engine_device_problem(args.engine, device) or engine_precision_problem(
        args.engine, device, args.precision
    )
    if problem is not None:
        _refuse(problem)
    options = EngineOptions(
        device=device,
        precision=args.precision,
        cache_dir=args.engine_cache_dir.expanduser(),
        calibration_path=args.calibration_path or DEFAULT_PATH,
    )
    try:
        return check_engine(args.engine, options)(model, card, options)
    except (EngineUnavailableError, ValueError, RuntimeError) as error:
        _refuse(str(error))


def load_data(args: argparse.Namespace, classes: list[str]) -> Dataset:
    """The images to evaluate: all of --data, or with --val-size the stratified validation
    split that model.train held out with the same --val-size and --seed. Exits 2 when the
    data's classes are not the model's `classes`."""
    dataset = load_dataset(
        args.data,
        cifar_split=args.cifar_split,
        download=args.download,
        cache_dir=args.cache_dir,
    )
    if args.val_size:
        _, val_idx = stratified_split(dataset.labels, args.val_size, args.seed)
        dataset = dataset.subset(val_idx)
    if list(dataset.classes) != classes:
        _refuse(f"the data's classes {list(dataset.classes)} differ from the model's {classes}")
    return dataset


def run_evaluation(
    args: argparse.Namespace,
    dataset: Dataset,
    model: nn.Module,
    device: torch.device,
    engine: Engine | None,
) -> dict[str, Any]:
    """`evaluate_engine` through `engine`, else `evaluate_model` on `device`, labelled for the
    report: per-class accuracy keyed by class name, the classes, the weights, --tta."""
    classes = list(dataset.classes)
    if engine is not None:
        result = evaluate_engine(
            engine.run,
            dataset.images,
            dataset.labels,
            len(classes),
            batch_size=args.batch_size,
            tta=args.tta,
        )
        result["engine"] = engine.describe()
    else:
        result = evaluate_model(
            model.to(device),
            dataset.images,
            dataset.labels,
            device,
            batch_size=args.batch_size,
            tta=args.tta,
        )
    result["classes"] = classes
    result["per_class"] = dict(zip(classes, result["per_class"], strict=True))
    result["weights"] = str(args.weights)
    result["tta"] = args.tta
    return result


def print_report(result: dict[str, Any], args: argparse.Namespace, engine: Engine | None) -> None:
    """The result as one JSON object (--json), else as `format_report`'s text, headed by the
    engine when there is one."""
    if args.json:
        print(json.dumps(result))
        return
    if engine is not None:
        described = result["engine"]
        print(f"engine: {described['engine']} {described['precision']} on {engine.device}")
    report = dict(result, per_class=list(result["per_class"].values()))
    print(format_report(report, result["classes"]))
    if args.plot:
        print(f"\nconfusion matrix plot: {args.plot}")


def _refuse(reason: str) -> NoReturn:
    """Exit with status 2, a usage error as argparse's own (SystemExit with a message would
    exit 1), and the reason in one line on stderr."""
    print(f"error: {reason}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
