"""Training throughput: the project's training step against a plain fp32 eager loop.

    python -m benchmarks.train_throughput [--depth 56] [--steps 20] [--data PATH]

Both loops train the same ResNet on batches of 128, one after the other in this process:

plain loop   how CIFAR ResNets are usually trained in PyTorch (the PyTorch CIFAR-10
             tutorial's DataLoader, with the augmentation of kuangliu/pytorch-cifar and
             He et al. 2015): a torchvision-style dataset that returns PIL images,
             RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize per
             image in DataLoader workers, fp32, the default memory format, SGD (momentum
             0.9, weight decay 5e-4) and nn.CrossEntropyLoss.
project      the step model/train.py runs, with its default flags: the images stay a
             uint8 tensor, augmented a whole batch at a time on the device; bf16 autocast
             on the CPU (fp16 on CUDA), channels_last, torch.compile, SGD with Nesterov
             momentum, label smoothing, the per-step learning-rate schedule and the EMA
             update. Compiling happens once per training run; it is timed and printed
             apart, before any timing round.

Two figures for each: end to end, data pipeline included (what an epoch costs, the
headline), and the step alone on one fixed batch (the project's includes its on-device
augmentation, which is part of its step). Each is timed `--rounds` times
after `--warmup` steps, alternating the loops, and the best round is kept (as timeit does:
background load only ever slows a round down). The ratio is project / plain.

`--variant NAME` (repeatable) adds the project's step with one run option or recipe
field changed, timed in the same rounds, to find what wins on this machine before it
becomes a default: `fused` (torch.optim's fused SGD), `max-autotune` (torch.compile's
max-autotune-no-cudagraphs mode), `contiguous` (the default memory format instead of
channels_last), `batch-256` (batches of 256; a recipe change, since the learning rate
then needs retuning), `eager` (without torch.compile: model.train's `--no-compile`).

Real images (`--data`, any source model.train accepts, loaded from its decoded cache)
and random ones cost the same per step; random uint8 images are the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from model import train
from model.data import load_dataset
from model.devices import resolve_device
from model.preprocessing import CIFAR10_MEAN, CIFAR10_STD
from model.resnet import resnet

EPOCH_IMAGES = 45_000  # CIFAR-10's training set less the 5,000-image validation split

Step = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of the project's step: model.train's run options and batch size."""

    run: train.RunOptions
    batch_size: int


# --variant NAME -> what it changes from model.train's defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "fused": {"fused_optimizer": True},
    "max-autotune": {"compile_mode": "max-autotune-no-cudagraphs"},
    "contiguous": {"channels_last": False},
    "batch-256": {"batch_size": 256},
    "eager": {"compile": False},
}


def variant(args: argparse.Namespace, name: str | None) -> Variant:
    """model.train's defaults (`--no-compile` honoured), changed as VARIANTS[name] says."""
    changes = dict(VARIANTS[name]) if name else {}
    batch_size = int(changes.pop("batch_size", args.batch_size))
    run = dataclasses.replace(train.RunOptions(compile=not args.no_compile), **changes)
    return Variant(run, batch_size)


# --- (a) The plain loop ------------------------------------------------------------------


class PilDataset(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: an H x W x 3 uint8 array becomes
    a PIL image, then the per-image transform runs."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, length: int, transform: nn.Module):
        self.images, self.labels, self.length, self.transform = images, labels, length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index %= len(self.images)  # cycle, so a short image set still fills every step
        image = Image.fromarray(self.images[index])
        return self.transform(image), int(self.labels[index])


def plain_steps(
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[Step, Step]:
    """(end-to-end step, model-only step) of the usual fp32 eager loop."""
    model = resnet(args.depth, num_classes=10).to(device)
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    steps = args.rounds * (args.warmup + args.steps) + 1
    # torchvision's CIFAR10 keeps one contiguous N x H x W x C uint8 array.
    hwc = np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())
    dataset = PilDataset(hwc, labels.numpy(), steps * args.batch_size, transform)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = iter(loader)

    def train_on(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        inputs, targets = inputs.to(device), targets.to(device)
        optimizer.zero_grad()
        loss = criterion(model(inputs), targets)
        loss.backward()
        optimizer.step()

    def end_to_end() -> None:
        train_on(*next(batches))

    fixed_inputs, fixed_targets = next(batches)  # (a second iter() would reset the workers)

    def model_only() -> None:
        train_on(fixed_inputs, fixed_targets)

    return end_to_end, model_only


# --- (b) The project's step ------------------------------------------------------------------


def project_steps(
    images: torch.Tensor,
    labels: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
    setup: Variant,
) -> tuple[Step, Step, str]:
    """(end-to-end step, model-only step, description): model.train's own `train_step`,
    with the optimiser, schedule, EMA and augmentation built as model.train builds them
    for `setup`'s run options and batch size."""
    recipe = train.Recipe(depth=args.depth, batch_size=setup.batch_size)
    run = setup.run
    amp_dtype = train.training_autocast_dtype(recipe.precision, device)
    memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
    model = resnet(recipe.depth, recipe.version, 10, recipe.shortcut)
    model = model.to(device).to(memory_format=memory_format)  # as model.train does
    steps_per_epoch = math.ceil(EPOCH_IMAGES / recipe.batch_size)
    # The schedule only sets the lr; its length does not change the cost of a step.
    opt = train.build_optimization(
        model, recipe, steps_per_epoch, 100, device, amp_dtype, fused=run.fused_optimizer
    )
    forward = train.compile_for_training(model, device, run.compile_mode) if run.compile else model
    train_images, train_labels = images.to(device), labels.to(device)
    shuffle_gen = torch.Generator().manual_seed(1)
    augment_gen = torch.Generator(device=device).manual_seed(2)

    def step(batch: torch.Tensor) -> None:
        train.train_step(
            forward,
            train_images[batch],
            train_labels[batch],
            opt,
            recipe,
            augment_gen,
            amp_dtype,
            memory_format,
        )

    order = torch.randperm(len(train_images), generator=shuffle_gen).to(device)
    position = 0

    def end_to_end() -> None:
        # model.train slices one seeded permutation per epoch; this one wraps around.
        nonlocal position
        if position + recipe.batch_size > len(order):
            position = 0
        step(order[position : position + recipe.batch_size])
        position += recipe.batch_size

    fixed_batch = torch.arange(recipe.batch_size, device=device) % len(train_images)

    def model_only() -> None:
        # The same batch every time (augmentation included: it is part of the step).
        step(fixed_batch)

    precision = f"{str(amp_dtype or torch.float32).removeprefix('torch.')} autocast"
    layout = str(memory_format).removeprefix("torch.")
    compiled = f"torch.compile ({run.compile_mode})" if run.compile else "eager"
    optimizer = "fused SGD" if run.fused_optimizer else "SGD"
    described = f"{precision}, {layout}, {compiled}, {optimizer}, batch {recipe.batch_size}"
    return end_to_end, model_only, described


# --- Timing --------------------------------------------------------------------------------


def images_per_second(
    step: Step, batch_size: int, args: argparse.Namespace, device: torch.device
) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize()
    return args.steps * batch_size / (time.perf_counter() - start)


def load_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, str]:
    if args.data:
        dataset = load_dataset(args.data, cache_dir=args.cache_dir)
        return dataset.images, dataset.labels, f"{dataset.source} ({len(dataset)} images)"
    generator = torch.Generator().manual_seed(0)
    count = args.random_images
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (count,), generator=generator)
    return images, labels, f"random uint8 ({count} images)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2, help="timings per figure; the best is kept")
    p.add_argument("--workers", type=int, default=2, help="plain loop's DataLoader workers")
    p.add_argument("--data", default=None, help="a source model.train accepts (default: random)")
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache")
    p.add_argument("--random-images", type=int, default=4096, help="without --data")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-compile", action="store_true", help="the project's step without compiling")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        choices=sorted(VARIANTS),
        help="also time the project's step with this change (repeatable; see above)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--min-ratio",
        type=float,
        default=0.0,
        help="exit with status 1 if the end-to-end ratio is below this (the issue asks 2.5)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # model.devices' policy, as model.train
    images, labels, source = load_images(args)
    torch.manual_seed(0)
    # name -> (end-to-end step, model-only step, batch size); "project" is model.train's
    # defaults, each variant one change from them.
    loops: dict[str, tuple[Step, Step, int]] = {}
    loops["plain"] = (*plain_steps(images, labels, args, device), args.batch_size)
    described: dict[str, str] = {}
    first_step: dict[str, float] = {}
    compiles: dict[str, bool] = {}
    for name in ["project", *args.variant]:
        setup = variant(args, None if name == "project" else name)
        compiles[name] = setup.run.compile
        end_to_end, model_only, described[name] = project_steps(images, labels, args, device, setup)
        # The first step compiles the model (once per training run): timed apart.
        start = time.perf_counter()
        end_to_end()
        first_step[name] = time.perf_counter() - start
        loops[name] = (end_to_end, model_only, setup.batch_size)

    best = {f"{name}{kind}": 0.0 for name in loops for kind in ("", "_model")}
    for _ in range(args.rounds):  # alternating, so background load hits every loop alike
        for name, (end_to_end, model_only, batch_size) in loops.items():
            for key, step in ((name, end_to_end), (f"{name}_model", model_only)):
                best[key] = max(best[key], images_per_second(step, batch_size, args, device))

    threads = f"threads={torch.get_num_threads()}" if device.type == "cpu" else str(device)
    print(
        f"ResNet{args.depth}, {device.type} ({threads}), data: {source}\n"
        f"{args.rounds} round(s) of {args.warmup} warm-up + {args.steps} timed steps; best kept\n"
        f"plain: fp32 eager, contiguous, per-image PIL transforms in {args.workers} workers, "
        f"batch {args.batch_size}"
    )
    for name in described:
        print(
            f"{name}: model/train.py's step ({described[name]}, batched augmentation); its "
            f"first step{' (compiling)' if compiles[name] else ''} took {first_step[name]:.1f} s"
        )
    header = f"{'':<34}{'images/s':>10}{f's/epoch ({EPOCH_IMAGES:,})':>20}{'ratio':>8}"
    for title, kind in (("end to end (data pipeline included)", ""), ("step only", "_model")):
        print(f"\n{title}\n{header}")
        for name in loops:
            speed = best[f"{name}{kind}"]
            ratio = speed / best[f"plain{kind}"]
            label = "plain fp32 loop" if name == "plain" else name
            print(f"  {label:<32}{speed:>10.1f}{EPOCH_IMAGES / speed:>20.1f}{ratio:>7.2f}x")

    ratio = best["project"] / best["plain"]
    result = dict(best, ratio=ratio, model_ratio=best["project_model"] / best["plain_model"])
    if args.min_ratio and ratio < args.min_ratio:
        print(f"end-to-end ratio {ratio:.2f}x is below the required {args.min_ratio:.2f}x")
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
