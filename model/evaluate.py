"""Evaluate weights: `python -m model.evaluate --weights PATH --data PATH`.

Prints top-1 accuracy, per-class accuracy and the confusion matrix, and writes the
matrix as a PNG. With no split flags every image in the source is evaluated;
`--val-size N --seed S` evaluates exactly the validation split that `model.train` held
out with the same flags. `--tta` averages the logits of each image and its mirror image.
`--json` prints one JSON object instead of the text report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model import inference
from model.preprocessing import normalize


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
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    return {
        "images": len(labels),
        "loss": loss_sum / max(1, len(labels)),
        "accuracy": confusion.diag().sum().item() / max(1, len(labels)),
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
    from model.data import load_dataset, stratified_split
    from model.weights import WeightsError, load_checked

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=Path("weights/resnet56.safetensors"))
    parser.add_argument("--data", required=True)
    parser.add_argument(
        "--cifar-split",
        default="train",
        choices=("train", "test"),
        help="for a cifar-10-batches-py folder: data_batch_* or test_batch",
    )
    parser.add_argument("--download", action="store_true")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="decoded-image cache, as in model.train (default ~/.cache/resnet-cifar10)",
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=0,
        help="evaluate only the validation split of this size",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that split (as in training)")
    parser.add_argument(
        "--tta", action="store_true", help="average with horizontally flipped images"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the confusion matrix as a PNG here (default: no file is written)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    try:
        model, card = load_checked(args.weights)
    except WeightsError as error:
        parser.exit(2, f"error: {error}\n")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = load_dataset(
        args.data,
        cifar_split=args.cifar_split,
        download=args.download,
        cache_dir=args.cache_dir,
    )
    if args.val_size:
        _, val_idx = stratified_split(dataset.labels, args.val_size, args.seed)
        dataset = dataset.subset(val_idx)
    classes = list(card.get("classes") or dataset.classes)
    if list(dataset.classes) != classes:
        parser.exit(
            2,
            f"error: the data's classes {list(dataset.classes)} "
            f"differ from the model's {classes}\n",
        )
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
    if args.plot:  # only on request: evaluating must never overwrite shipped files
        plot_confusion(
            result["confusion_matrix"],
            classes,
            args.plot,
            f"{args.weights.name}: accuracy {result['accuracy']:.4f} ({result['images']} images)",
        )
    if args.json:
        print(json.dumps(result))
    else:
        report = dict(result, per_class=list(result["per_class"].values()))
        print(format_report(report, classes))
        if args.plot:
            print(f"\nconfusion matrix plot: {args.plot}")
    return result


if __name__ == "__main__":
    main()
