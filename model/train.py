"""Train a CIFAR ResNet: `python -m model.train --data PATH`.

`main()` tells the run top to bottom (set-up, data, model and optimisation, the loop,
finish); the steps it names (`set_up`, `prepare_data`, `build_model`, `start_training`,
`train_one_epoch`, `finish`) follow it. `Recipe` holds everything that
determines the weights, `RunOptions` the rest. The defaults are chosen for accuracy per
hour of compute (docs/training.md, "The recipe", gives the reasoning, the model card
weights/MODEL_CARD.md the measurements):
SGD with Nesterov momentum, weight decay on conv/linear weights only, a cosine schedule
with linear warm-up, label smoothing 0.1, an EMA of the weights evaluated alongside,
bf16 autocast and channels_last on the CPU, fp16 + GradScaler on CUDA, and torch.compile
(`--no-compile` runs eager). The length is `--epochs`, or `--time-budget`, which fits the
epoch count to the wall time; `--init-from` starts from existing weights; torchrun runs it
on several processes (DistributedDataParallel).

`--optimizer adam --schedule step --epochs 200 --label-smoothing 0 --ema-decay 0`
reproduces the Keras CIFAR-10 ResNet example's recipe.

Outputs: a checkpoint every epoch (atomic; `--resume` continues a killed run), a JSON-lines
metrics log and a PNG of the curves under `--run-dir`, and, for the best epoch by
validation accuracy, the weights (`--output`, safetensors) and a model card beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from model.data import Dataset, augment, load_dataset, stratified_split
from model.devices import DeviceUnavailableError, autocast_dtype, resolve_device
from model.evaluate import evaluate_model
from model.files import write_atomically
from model.preprocessing import CIFAR10_MEAN, CIFAR10_STD, normalize
from model.resnet import Shortcut, count_parameters, resnet
from model.weights import (
    Accuracy,
    Architecture,
    Cycle,
    Lineage,
    ModelCard,
    Preprocessing,
    Validation,
    WeightsError,
    load_checked,
    save_checked,
    save_tensors,
)

T = TypeVar("T")

# --- Configuration -----------------------------------------------------------------------

CUDA_DEFAULT_EPOCHS = 200  # the published recipes' length (He et al.: 164; Keras: 200)
CPU_DEFAULT_BUDGET = "2h30m"  # what one working period of a 2-core machine affords
DATA_ENV = "CIFAR10_DATA"
DEFAULT_DATA_DIR = Path("data/cifar10")


# torch.compile's modes; the CUDA-graph ones ("reduce-overhead", "max-autotune") record
# graphs only on CUDA and behave like their "-no-cudagraphs" forms elsewhere.
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[CompileMode, ...] = get_args(CompileMode)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the weights; the card stores it as `recipe`.

    Each field is a flag of the same name (`--batch-size` for batch_size). Units: learning
    rates per optimiser step; decays per step; sizes in pixels; the time budget in seconds.
    """

    # Architecture (model/resnet.py)
    depth: int = 56  # 6n+2 for v1, 9n+2 for v2
    version: int = 1  # 1: He et al. 2015; 2: pre-activation, He et al. 2016
    shortcut: Shortcut = "projection"  # or "padding" (the paper's option A)
    # Data
    val_size: int = 5000  # stratified validation images held out (0: none)
    limit: int = 0  # train on only this many images (0: all)
    seed: int = 0  # split, initialisation, shuffling, augmentation
    # Length: one of the two (neither: the device's default, see main)
    epochs: int | None = None
    time_budget: float | None = None  # seconds of wall time for the whole run
    init_from: str | None = None  # weights to start from (None: random initialisation)
    # Optimisation
    batch_size: int = 128  # the global batch, over all torchrun processes
    optimizer: str = "sgd"  # or "adam"
    lr: float | None = None  # peak; None: 0.1 for SGD, 1e-3 for Adam (filled in)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_bn_and_bias: bool = False
    schedule: str = "cosine"  # or "onecycle", "step" (the Keras example's)
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    ema_decay: float = 0.999  # 0: no EMA
    # Augmentation (model/data.py), on whole batches
    crop_padding: int = 4
    no_flip: bool = False
    cutout: int = 0  # square side (0: off)
    precision: str = "auto"  # auto: bf16 autocast on the CPU, fp16 on CUDA; or fp32, bf16, fp16

    def __post_init__(self) -> None:
        if self.lr is None:  # frozen: the optimiser-dependent default is set once, here
            object.__setattr__(self, "lr", 1e-3 if self.optimizer == "adam" else 0.1)

    @property
    def peak_lr(self) -> float:
        assert self.lr is not None  # __post_init__ filled it
        return self.lr


@dataclass(frozen=True)
class RunOptions:
    """How and where a run goes, none of which changes the weights it ends with."""

    data: str | None = None
    data_description: str = ""
    download: bool = False
    cache_dir: Path | None = None
    run_dir: Path = Path("runs/resnet56")
    output: Path = Path("runs/resnet56/resnet56.safetensors")
    resume: bool = False
    device: str | None = None
    threads: int = 0
    channels_last: bool = True
    compile: bool = True
    compile_mode: CompileMode = "default"  # torch.compile's mode
    fused_optimizer: bool = False  # torch.optim's fused implementation of the same update
    no_progress: bool = False

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def parse_args(argv: list[str] | None = None) -> tuple[Recipe, RunOptions]:
    """The command line as a recipe and run options; exits with status 2 on bad flags.

    The flags come in groups (shown so by --help): the recipe's (data, architecture,
    length, optimisation, augmentation and precision), then the run options'."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_flags(parser)
    add_architecture_flags(parser)
    add_length_flags(parser)
    add_optimisation_flags(parser)
    add_augmentation_flags(parser)
    add_run_flags(parser)
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = args.run_dir / f"resnet{args.depth}.safetensors"
    if args.init_from is not None:
        args.init_from = str(args.init_from)
    if args.time_budget is not None and args.schedule == "step":
        parser.error(
            "--time-budget needs --schedule cosine or onecycle: the step schedule is fixed"
        )
    values = vars(args)
    recipe = Recipe(**{field.name: values[field.name] for field in fields(Recipe)})
    run = RunOptions(**{field.name: values[field.name] for field in fields(RunOptions)})
    return recipe, run


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """Where the images come from (run options) and which of them train (recipe)."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=None,
        help="cifar-10-batches-py folder, class-folder tree, or .tar/.tar.gz "
        f"(default: ${DATA_ENV}, else {DEFAULT_DATA_DIR}/, fetched there with torchvision "
        "where there is internet)",
    )
    group.add_argument(
        "--data-description",
        default="",
        help="what the data is and where it comes from, for the model card",
    )
    group.add_argument(
        "--download", action="store_true", help="fetch torchvision's CIFAR-10 into --data first"
    )
    group.add_argument(
        "--val-size", type=int, default=5000, help="stratified validation images held out (0: none)"
    )
    group.add_argument(
        "--limit", type=int, default=0, help="use only this many training images (0: all)"
    )
    group.add_argument(
        "--seed", type=int, default=0, help="split, initialisation, shuffling, augmentation"
    )
    group.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="decoded-image cache (default ~/.cache/resnet-cifar10)",
    )


def add_architecture_flags(parser: argparse.ArgumentParser) -> None:
    """The network (model/resnet.py), and weights to start it from."""
    group = parser.add_argument_group("architecture")
    group.add_argument("--depth", type=int, default=56)
    group.add_argument("--version", type=int, default=1, choices=(1, 2))
    group.add_argument("--shortcut", default="projection", choices=("projection", "padding"))
    group.add_argument(
        "--init-from",
        default=None,
        metavar="WEIGHTS",
        help="start from these weights (checked against their card) with a fresh optimiser "
        "and schedule, instead of random initialisation; the card records the lineage",
    )


def add_length_flags(parser: argparse.ArgumentParser) -> None:
    """How long the run is: a number of epochs or a wall-time budget, not both."""
    group = parser.add_argument_group("length").add_mutually_exclusive_group()
    group.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs in the schedule (default: {CUDA_DEFAULT_EPOCHS} on CUDA; "
        f"on other devices a time budget of {CPU_DEFAULT_BUDGET})",
    )
    group.add_argument(
        "--time-budget",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="wall time for the whole run, e.g. 2h15m, 90m, 600s: the epoch count is fitted to "
        "it from measured epoch times, so that lr reaches 0 and the weights are written in time",
    )


def add_optimisation_flags(parser: argparse.ArgumentParser) -> None:
    """Optimiser, weight decay, schedule, loss and weight averaging."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--batch-size", type=int, default=128)
    group.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    group.add_argument(
        "--lr",
        type=float,
        default=None,
        help="peak learning rate (default: 0.1 for sgd, 1e-3 for adam)",
    )
    group.add_argument("--momentum", type=float, default=0.9)
    group.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--weight-decay", type=float, default=5e-4)
    group.add_argument(
        "--decay-bn-and-bias", action="store_true", help="also apply weight decay to BN and biases"
    )
    group.add_argument("--schedule", default="cosine", choices=("cosine", "onecycle", "step"))
    group.add_argument("--warmup-epochs", type=float, default=2.0)
    group.add_argument("--label-smoothing", type=float, default=0.1)
    group.add_argument(
        "--ema-decay", type=float, default=0.999, help="per-step EMA decay (0: no EMA)"
    )


def add_augmentation_flags(parser: argparse.ArgumentParser) -> None:
    """Batch augmentation (model/data.py) and the training precision."""
    group = parser.add_argument_group("augmentation and precision")
    group.add_argument("--crop-padding", type=int, default=4)
    group.add_argument("--no-flip", action="store_true")
    group.add_argument(
        "--cutout", type=int, default=0, help="cutout square size in pixels (0: off)"
    )
    group.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16 on CPU, fp16 on CUDA, fp32 elsewhere",
    )


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """How and where the run goes (RunOptions): none of these changes the weights."""
    group = parser.add_argument_group("run (not part of the recipe)")
    group.add_argument(
        "--device",
        default=None,
        help="auto (the accelerator when present, else the CPU; the default), cpu, cuda, "
        "cuda:N, mps, ...",
    )
    group.add_argument(
        "--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)"
    )
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the model (needs a C++ compiler on the CPU; the first steps wait)",
    )
    group.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile's mode (max-autotune tries more kernels and compiles longer)",
    )
    group.add_argument(
        "--fused-optimizer",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="torch.optim's fused implementation (fused=True) of the same update, instead "
        "of torch's default (a loop over the parameters on the CPU, for-each on CUDA)",
    )
    group.add_argument(
        "--run-dir", type=Path, default=Path("runs/resnet56"), help="checkpoints, log, plots"
    )
    group.add_argument(
        "--output",
        type=Path,
        default=None,
        help="weights file, with its card and curves beside it (default: in --run-dir; "
        "nothing is written into weights/ unless this names it)",
    )
    group.add_argument(
        "--resume", action="store_true", help="continue from --run-dir/checkpoint.pt"
    )
    group.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs only)")


def parse_duration(text: str) -> float:
    """Seconds in "2h15m", "90m", "1h", "45s", "1h0m30s" or a bare number of seconds.

    Raises argparse.ArgumentTypeError for anything else, or for zero.
    """
    match = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 2h15m, 90m or 600s")
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a time budget must be positive")
    return total


def training_autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--precision` on `device` (None: plain fp32). "auto" is bf16 on
    the CPU (AMX and AVX-512 BF16 run bf16 matmuls natively), fp16 on CUDA (with GradScaler),
    fp32 elsewhere; the names map to dtypes in model.devices."""
    if precision == "auto":
        precision = {"cpu": "bf16", "cuda": "fp16"}.get(device.type, "fp32")
    return autocast_dtype(precision)


def compile_for_training(
    model: nn.Module, device: torch.device, mode: CompileMode = "default"
) -> nn.Module:
    """`model` wrapped by torch.compile in `mode` (it shares the model's parameters).

    Why it pays (benchmarks/train_throughput.py measures by how much): Inductor fuses each
    BatchNorm with its ReLU (and residual addition) into one pass over memory, and on the
    CPU those memory-bound passes are a large part of an eager step. Compiling takes
    minutes, once per process.
    dynamic=False: the shorter last batch of an epoch gets its own static graph instead of
    making the batch dimension symbolic for every step.
    """
    if device.type == "cpu":
        # Inductor builds its CPU kernels with $CXX, g++ when unset (torch._inductor.config).
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise SystemExit(
                f"error: torch.compile on the CPU needs a C++ compiler and {compiler!r} is not "
                "installed: install one (e.g. apt install g++) or train with --no-compile"
            )
    return cast(nn.Module, torch.compile(model, mode=mode, dynamic=False))


# --- Optimiser and schedule ------------------------------------------------------------------


def parameter_groups(
    model: nn.Module, weight_decay: float, decay_all: bool
) -> list[dict[str, Any]]:
    """Decay conv and linear weights only: decaying BN scales and biases only hurts
    (Goyal et al. 2017, "Accurate, Large Minibatch SGD", §5.1; also used by timm)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for parameter in model.parameters():
        (decay if parameter.ndim > 1 or decay_all else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class LrSchedule:
    """The learning rate at each optimiser step.

    Linear warm-up to `peak` over `warmup_steps` (Goyal et al. 2017), then cosine
    (Loshchilov & Hutter 2017, SGDR without restarts) or linear ("onecycle") decay to 0 at
    `total_steps`; or the Keras CIFAR-10 example's steps (x0.1 after epoch 80, x0.01 after
    120, 1e-3 after 160, 5e-4 after 180).

    The decay follows `progress` (0 when warm-up ends, 1 at lr 0) rather than the step
    count, so that `total_steps` may move while the run goes: a time budget shortens or
    lengthens the run when epochs turn out slower or faster, and the learning rate stays
    continuous, reaching 0 at the new end. With `total_steps` fixed, `progress` is exactly
    (step - warmup_steps) / (total_steps - warmup_steps).
    """

    kind: str  # "cosine", "onecycle" or "step"
    peak: float
    warmup_steps: int
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    progress: float = 0.0

    def factor(self) -> float:
        """The learning rate at `step` as a fraction of `peak`, in [0, 1]."""
        if self.kind == "step":
            epoch = self.step // self.steps_per_epoch
            for boundary, factor in ((180, 5e-4), (160, 1e-3), (120, 1e-2), (80, 1e-1)):
                if epoch >= boundary:
                    return factor
            return 1.0
        if self.step < self.warmup_steps:
            return (self.step + 1) / self.warmup_steps
        if self.kind == "onecycle":
            return max(0.0, 1.0 - self.progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, self.progress)))

    def lr(self) -> float:
        return self.peak * self.factor()

    def advance(self) -> None:
        """Count one optimiser step; what is left of `progress` is spread over the steps left."""
        if self.step >= self.warmup_steps:
            steps_left = max(1, self.total_steps - self.step)
            self.progress += (1.0 - self.progress) / steps_left
        self.step += 1


# --- One training step ---------------------------------------------------------------------


@dataclass
class Optimization:
    """Everything a training step updates besides the model itself."""

    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None


def build_optimization(
    model: nn.Module,
    recipe: Recipe,
    steps_per_epoch: int,
    epochs: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    fused: bool = False,
) -> Optimization:
    """Optimiser (decay on conv/linear weights only), per-step schedule, scaler, EMA.
    `fused`: torch.optim's fused implementation of the same update.

    The EMA starts as a copy of `model`'s weights: build this after loading any initial ones.
    """
    groups = parameter_groups(model, recipe.weight_decay, recipe.decay_bn_and_bias)
    # fused=None (not False) leaves torch its own choice between its for-each and per-tensor
    # implementations.
    fused_or_default = True if fused else None
    if recipe.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups,
            lr=recipe.peak_lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            fused=fused_or_default,
        )
    else:
        optimizer = torch.optim.Adam(groups, lr=recipe.peak_lr, fused=fused_or_default)
    schedule = LrSchedule(
        kind=recipe.schedule,
        peak=recipe.peak_lr,
        warmup_steps=max(1, round(recipe.warmup_epochs * steps_per_epoch)),
        total_steps=epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
    )
    # fp16 needs loss scaling against underflow; bf16 has fp32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = None
    if recipe.ema_decay > 0:  # buffers too: the EMA model carries its own BN statistics
        ema_fn = get_ema_multi_avg_fn(recipe.ema_decay)
        ema = AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=True)
    return Optimization(optimizer, schedule, scaler, ema)


def autocast(device: torch.device, amp_dtype: torch.dtype | None) -> AbstractContextManager[None]:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    opt: Optimization,
    recipe: Recipe,
    augment_gen: torch.Generator,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a uint8 batch on its device, forward, backward, step; returns (loss, logits).

    `model` may be the torch.compile wrapper: it shares the original's parameters.
    """
    images = augment(
        images,
        augment_gen,
        crop_padding=recipe.crop_padding,
        flip=not recipe.no_flip,
        cutout_size=recipe.cutout,
    )
    images = normalize(images).contiguous(memory_format=memory_format)
    with autocast(images.device, amp_dtype):
        logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=recipe.label_smoothing)
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    for group in opt.optimizer.param_groups:
        group["lr"] = opt.schedule.lr()
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.schedule.advance()
    if opt.ema is not None:
        opt.ema.update_parameters(model)
    return loss, logits


# --- Checkpoints ------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    *,
    progress: dict[str, Any],
    model: nn.Module,
    opt: Optimization,
    shuffle_gen: torch.Generator,
    augment_states: list[torch.Tensor],
) -> None:
    """Everything `load_checkpoint` needs to continue the run as if it had not stopped.

    `progress`: epoch, planned_epochs, best, elapsed_seconds, wall_seconds.
    `augment_states`: each rank's augmentation generator state, by rank.
    """
    state = {
        **progress,
        "model": model.state_dict(),
        "ema": opt.ema.state_dict() if opt.ema is not None else {},
        "optimizer": opt.optimizer.state_dict(),
        "schedule": asdict(opt.schedule),
        "scaler": opt.scaler.state_dict(),
        "shuffle_rng": shuffle_gen.get_state(),
        "augment_rng": augment_states,
        "torch_rng": torch.get_rng_state(),
    }
    # A kill mid-write leaves the previous checkpoint whole.
    write_atomically(path, lambda temporary: torch.save(state, temporary))


def load_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    opt: Optimization,
    shuffle_gen: torch.Generator,
    augment_gen: torch.Generator,
    rank: int,
    device: torch.device,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into these objects; returns the progress dict.

    Under torchrun every rank reads the file (on several nodes it must be on shared storage).
    """
    state = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    if opt.ema is not None:
        opt.ema.load_state_dict(state["ema"])
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.schedule = LrSchedule(**state["schedule"])
    opt.scaler.load_state_dict(state["scaler"])
    shuffle_gen.set_state(state["shuffle_rng"])
    augment_states = state["augment_rng"]
    if isinstance(augment_states, torch.Tensor):  # written by a single-process run
        augment_states = [augment_states]
    if rank < len(augment_states):
        augment_gen.set_state(augment_states[rank].to(augment_gen.get_state().device))
    torch.set_rng_state(state["torch_rng"])
    keys = ("epoch", "planned_epochs", "best", "elapsed_seconds", "wall_seconds")
    return {key: state[key] for key in keys}


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when files differ from it ("unknown" outside git)."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot_curves(log_path: Path, png_path: Path) -> None:
    """Loss and accuracy per epoch from the JSON-lines log, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    epochs = [row["epoch"] for row in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot(epochs, [row["train_loss"] for row in rows], label="train")
    if rows and rows[0].get("val_loss") is not None:
        loss_ax.plot(epochs, [row["val_loss"] for row in rows], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    acc_ax.plot(epochs, [row["train_accuracy"] for row in rows], label="train (augmented)")
    if rows and rows[0].get("val_accuracy") is not None:
        acc_ax.plot(epochs, [row["val_accuracy"] for row in rows], label="validation")
        if rows[0].get("ema_val_accuracy") is not None:
            acc_ax.plot(
                epochs,
                [row["ema_val_accuracy"] for row in rows],
                label="validation (EMA)",
            )
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy")
    for axis in (loss_ax, acc_ax):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


# --- Where a run starts: data, initial weights, length -------------------------------------


def resolve_data(run: RunOptions) -> tuple[str, bool]:
    """(source, download): --data, else $CIFAR10_DATA, else data/cifar10/ fetched if missing."""
    if run.data:
        return run.data, run.download
    if os.environ.get(DATA_ENV):
        return os.environ[DATA_ENV], run.download
    return str(DEFAULT_DATA_DIR), True


def load_data(source: str, download: bool, cache_dir: Path | None) -> Dataset:
    """`load_dataset`, with one line naming what to pass when there is no data to be had."""
    try:
        return load_dataset(source, download=download, cache_dir=cache_dir)
    except (OSError, RuntimeError) as error:  # URLError is an OSError: no internet
        raise SystemExit(
            f"error: no training data at {source!r} ({type(error).__name__}: {error}); pass "
            f"--data PATH or set ${DATA_ENV} (a cifar-10-batches-py folder, a folder with one "
            "sub-folder per class, or a .tar.gz of one)"
        ) from None


def describe_architecture(depth: int, version: int, shortcut: str) -> str:
    return f"ResNet{depth} v{version} with {shortcut} shortcuts"


def load_initial_weights(path: Path, recipe: Recipe) -> tuple[dict[str, torch.Tensor], ModelCard]:
    """The state dict and card of `--init-from`, or SystemExit in one line before any training.

    `load_checked` verifies the SHA-256 and that the tensors fit the card's architecture;
    this adds that the architecture is the one this run builds.
    """
    try:
        parent, card = load_checked(path)
    except WeightsError as error:
        raise SystemExit(f"error: --init-from: {error}") from None
    arch = card.architecture
    theirs = describe_architecture(arch.depth, arch.version, arch.shortcut)
    ours = describe_architecture(recipe.depth, recipe.version, recipe.shortcut)
    if theirs != ours:
        raise SystemExit(
            f"error: --init-from {path} holds {theirs} but this run builds {ours}: "
            "pass the matching --depth/--version/--shortcut, or other weights"
        )
    return parent.state_dict(), card


# A time-budgeted plan grows (when epochs speed up) only while the learning rate is at least
# this share of its peak: near the end of the anneal more epochs would change nothing.
GROW_MIN_LR_FACTOR = 0.05


@dataclass
class TimeBudget:
    """Fits a run's epoch count to a wall-clock budget, from the epochs' measured wall times.

    Wall time, not CPU time: an epoch during which the trainer was paused (SIGSTOP) or
    slowed by other work counts as long as it took, so the plan shrinks to keep the end
    inside the budget. The first epoch of a process compiles and is only used until
    steadier ones are measured.
    """

    seconds: float
    started: float  # time.monotonic() when the run's clock started (earlier processes included)
    epoch_seconds: list[float] = field(default_factory=list)

    def epochs_that_fit(
        self, epochs_done: int, planned: int, reserve_seconds: float, lr_factor: float
    ) -> int:
        """Epochs in all: those done, plus as many as the time left holds after `reserve`
        and one epoch kept in hand, so that a pause or slowdown near the end still lets the
        schedule finish inside the budget.

        Once the learning rate is under GROW_MIN_LR_FACTOR of its peak (`lr_factor`: the
        schedule's current share) the plan only shrinks: a longer plan would raise the
        rate again for epochs that change nothing."""
        steady = self.epoch_seconds[1:][-3:] or self.epoch_seconds[-1:]
        per_epoch = statistics.median(steady)
        left = self.seconds - (time.monotonic() - self.started) - reserve_seconds - per_epoch
        fitted = epochs_done + max(0, int(left // per_epoch))
        if lr_factor < GROW_MIN_LR_FACTOR:
            return min(fitted, planned)
        return fitted


def format_duration(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# --- Several processes (torchrun) ------------------------------------------------------------


@dataclass(frozen=True)
class Ranks:
    """This process's place among torchrun's processes; a plain run is rank 0 of 1.

    Data parallelism (DistributedDataParallel; Goyal et al. 2017): every rank trains on its
    share of each global batch and the gradients are averaged, so `--batch-size` stays the
    global batch of the recipe. Rank 0 alone validates and writes files.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start_ranks(requested_device: str | None) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when torchrun started us: NCCL on CUDA, gloo on the CPU.
    The device follows model.devices' one policy; a missing one stops the run in one line."""
    try:
        device = resolve_device(requested_device)
    except DeviceUnavailableError as error:
        raise SystemExit(f"error: {error}") from None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Ranks(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def from_main_rank(value: T, ranks: Ranks) -> T:
    """`value` as rank 0 has it, on every rank: for decisions all ranks must share."""
    if ranks.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_ranks(value: T, ranks: Ranks) -> list[T]:
    """Every rank's `value`, by rank."""
    if ranks.world_size == 1:
        return [value]
    values: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


def check_ranks_agree(model: nn.Module, ranks: Ranks) -> None:
    """Raise if the ranks' parameters differ: data parallelism must keep one model."""
    if ranks.world_size == 1:
        return
    fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    fingerprints = gather_from_ranks(fingerprint, ranks)
    spread = max(float((f - fingerprints[0]).abs().max()) for f in fingerprints)
    if spread != 0.0:
        raise RuntimeError(f"ranks hold different parameters (largest difference {spread})")
    if ranks.is_main:
        print(f"ranks: the {ranks.world_size} ranks hold identical parameters", flush=True)


# --- One epoch, one validation -----------------------------------------------------------------


def run_epoch(
    forward: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    order: torch.Tensor,
    opt: Optimization,
    recipe: Recipe,
    augment_gen: torch.Generator,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    ranks: Ranks,
    description: str | None,
) -> dict[str, float]:
    """Train on the images in `order`, a global batch (`--batch-size`) at a time, of which
    this rank takes every world_size-th image. Returns lr, train loss and accuracy (over all
    ranks) and images/s. `description` labels a progress bar (None: no bar)."""
    images, labels = data
    started = time.perf_counter()
    device = images.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    seen = torch.zeros((), device=device)
    steps = math.ceil(len(order) / recipe.batch_size)
    bar = tqdm(
        range(steps),
        desc=description,
        disable=description is None,
        leave=False,
        dynamic_ncols=True,
    )
    for step in bar:
        batch = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
        batch = batch[ranks.rank :: ranks.world_size]
        batch_labels = labels[batch]
        loss, logits = train_step(
            forward, images[batch], batch_labels, opt, recipe, augment_gen, amp_dtype, memory_format
        )
        loss_sum += loss.detach() * len(batch)
        correct += (logits.argmax(1) == batch_labels).sum()
        seen += len(batch)
        if step % 20 == 0 or step == steps - 1:  # .item() syncs: not every step
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen.item():.3f}",
                acc=f"{correct.item() / seen.item():.3f}",
                img_s=f"{seen.item() / (time.perf_counter() - started):.0f}",
            )
    bar.close()
    totals = torch.stack([loss_sum, correct, seen])
    if ranks.world_size > 1:
        dist.all_reduce(totals)
    loss_total, correct_total, seen_total = totals.tolist()
    return {
        "lr": opt.optimizer.param_groups[0]["lr"],  # of the epoch's last step
        "train_loss": loss_total / seen_total,
        "train_accuracy": correct_total / seen_total,
        "images_per_second": seen_total / (time.perf_counter() - started),
    }


def validate(
    candidates: dict[str, nn.Module],
    val_set: Dataset,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    memory_format: torch.memory_format,
) -> dict[str, float]:
    """Validation loss and accuracy of each candidate ("model", "ema"), in the training
    precision for speed (the card's final figures are recomputed in fp32)."""
    row = {}
    for name, candidate in candidates.items():
        result = evaluate_model(
            candidate,
            val_set.images,
            val_set.labels,
            device,
            amp_dtype=amp_dtype,
            memory_format=memory_format,
        )
        prefix = "" if name == "model" else "ema_"
        row[prefix + "val_loss"] = result["loss"]
        row[prefix + "val_accuracy"] = result["accuracy"]
    return row


# --- The training run --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> ModelCard | None:
    """Train as the flags say; returns the model card as written (None on ranks other than 0)."""
    started = time.monotonic()
    recipe, run = parse_args(argv)
    commit = git_commit()  # of the code that runs, not of the checkout when the run ends

    # Set-up: processes, device, length, initial weights, precision, seed.
    place = set_up(recipe, run)
    recipe = with_default_length(recipe, place)
    initial_state, parent_card = (
        load_initial_weights(Path(recipe.init_from), recipe) if recipe.init_from else (None, None)
    )
    torch.manual_seed(recipe.seed)

    # Data: decoded once into a uint8 tensor cache, then kept whole on the training device.
    splits = prepare_data(recipe, run, place, parent_card)

    # Model (random or --init-from), EMA, optimiser, schedule; or all of them from --resume.
    model = build_model(recipe, len(splits.dataset.classes), initial_state, parent_card, place)
    training = start_training(model, recipe, run, place, splits, started)

    # The loop: train an epoch, validate, keep the best weights, fit the plan, checkpoint.
    while training.epoch < training.planned_epochs:
        train_one_epoch(training, recipe, run, place, splits)

    # Finish: the ranks agree, then rank 0 evaluates the kept weights and writes the card.
    check_ranks_agree(model, place.ranks)
    if place.ranks.world_size > 1:
        dist.destroy_process_group()
    if not place.ranks.is_main:
        return None
    recipe = replace(recipe, epochs=training.epoch)  # what ran (a time budget chose it)
    return finish(
        recipe, run, splits.dataset, splits.train_set, splits.val_set, training.progress,
        run.log_path, place.device, place.amp_dtype, parent_card, commit,
        wall_seconds=lambda: time.monotonic() - training.started,
    )  # fmt: skip


@dataclass(frozen=True)
class Place:
    """Where and in what numerics this process trains."""

    ranks: Ranks
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype; None: fp32
    memory_format: torch.memory_format

    def say(self, *values: object, flush: bool = False) -> None:
        """print, on rank 0 only (the other ranks would repeat it)."""
        if self.ranks.is_main:
            print(*values, flush=flush)


def set_up(recipe: Recipe, run: RunOptions) -> Place:
    """Threads, torchrun's processes and the device, and the numerics they train in."""
    if run.threads:
        torch.set_num_threads(run.threads)
    ranks, device = start_ranks(run.device)
    if recipe.batch_size % ranks.world_size:
        raise SystemExit(
            f"error: --batch-size {recipe.batch_size} does not split over {ranks.world_size} "
            "processes: pass a multiple of --nproc_per_node"
        )
    return Place(
        ranks,
        device,
        amp_dtype=training_autocast_dtype(recipe.precision, device),
        memory_format=torch.channels_last if run.channels_last else torch.contiguous_format,
    )


def with_default_length(recipe: Recipe, place: Place) -> Recipe:
    """`recipe` with the device's default length when it names none: the published epoch
    count on CUDA, a time budget elsewhere."""
    if recipe.epochs is not None or recipe.time_budget is not None:
        return recipe
    if place.device.type == "cuda":
        recipe = replace(recipe, epochs=CUDA_DEFAULT_EPOCHS)
    else:
        recipe = replace(recipe, time_budget=parse_duration(CPU_DEFAULT_BUDGET))
    place.say(f"length: {recipe.epochs or CPU_DEFAULT_BUDGET} (the default on {place.device.type})")
    return recipe


@dataclass(frozen=True)
class Splits:
    """The data set, its training and validation parts, and the training part on the device."""

    dataset: Dataset
    train_set: Dataset
    val_set: Dataset | None
    train_data: tuple[torch.Tensor, torch.Tensor]  # uint8 images (N, 3, 32, 32), int64 labels


def prepare_data(
    recipe: Recipe, run: RunOptions, place: Place, parent_card: ModelCard | None
) -> Splits:
    """Load the images, check them against `--init-from`'s classes, hold out the stratified
    validation split, and move the training images to the device."""
    dataset = load_data(*resolve_data(run), run.cache_dir)
    if parent_card is not None and parent_card.classes != tuple(dataset.classes):
        raise SystemExit(
            f"error: --init-from {recipe.init_from} was trained on classes "
            f"{list(parent_card.classes)}"
            f" but the data has {list(dataset.classes)}"
        )
    train_idx, val_idx = stratified_split(dataset.labels, recipe.val_size, recipe.seed)
    if recipe.limit:
        train_idx = train_idx[: recipe.limit]
    train_set = dataset.subset(train_idx)
    val_set = dataset.subset(val_idx) if recipe.val_size else None
    train_data = (train_set.images.to(place.device), train_set.labels.to(place.device))
    place.say(
        f"data: {dataset.source} ({len(dataset)} images, sha256 {dataset.checksum[:12]}), "
        f"train {len(train_set)}, validation {len(val_set) if val_set else 0}; device "
        f"{place.device} x {place.ranks.world_size} process(es), "
        f"precision {place.amp_dtype or torch.float32}"
    )
    return Splits(dataset, train_set, val_set, train_data)


def build_model(
    recipe: Recipe,
    num_classes: int,
    initial_state: dict[str, torch.Tensor] | None,
    parent_card: ModelCard | None,
    place: Place,
) -> nn.Module:
    """The recipe's ResNet on the device, randomly initialised (seeded) or from `--init-from`
    (`initial_state`, with its card)."""
    model = resnet(recipe.depth, recipe.version, num_classes, recipe.shortcut)
    if initial_state is not None and parent_card is not None:
        model.load_state_dict(initial_state)
        place.say(f"init: {recipe.init_from} (sha256 {parent_card.sha256[:12]})")
    return model.to(place.device).to(memory_format=place.memory_format)


@dataclass
class Training:
    """What the loop advances: the model and its optimisation, the random generators, the
    epoch and the plan, and the progress a checkpoint stores."""

    model: nn.Module
    forward: nn.Module  # the model as trained: DDP- and torch.compile-wrapped as asked
    opt: Optimization
    shuffle_gen: torch.Generator
    augment_gen: torch.Generator
    steps_per_epoch: int
    planned_epochs: int
    progress: dict[str, Any]  # epoch, planned_epochs, best, elapsed_seconds, wall_seconds
    started: float  # time.monotonic() of the run's start, earlier processes included
    budget: TimeBudget | None
    epoch: int = 0


def start_training(
    model: nn.Module,
    recipe: Recipe,
    run: RunOptions,
    place: Place,
    splits: Splits,
    started: float,
) -> Training:
    """The optimisation of `model` from its first step, or where `--resume`'s checkpoint
    left it; a fresh log (a resumed one keeps its checkpointed rows); the wrapped forward."""
    steps_per_epoch = math.ceil(len(splits.train_set) / recipe.batch_size)
    # With a time budget the length is unknown until an epoch is measured: plan "very long"
    # (warm-up, then lr near the peak) and fit the plan after each epoch.
    planned_epochs = recipe.epochs or 1_000_000
    opt = build_optimization(
        model, recipe, steps_per_epoch, planned_epochs, place.device, place.amp_dtype,
        fused=run.fused_optimizer,
    )  # fmt: skip
    # Explicit generators make shuffling and augmentation reproducible and resumable; the
    # permutation is shared by all ranks, the augmentation differs per rank.
    shuffle_gen = torch.Generator().manual_seed(recipe.seed + 1)
    augment_gen = torch.Generator(device=place.device)
    augment_gen.manual_seed(recipe.seed + 2 + 1000 * place.ranks.rank)
    progress: dict[str, Any] = {"epoch": 0, "best": {"val_accuracy": -1.0}, "elapsed_seconds": 0.0}
    if run.resume and run.checkpoint_path.is_file():
        progress = load_checkpoint(
            run.checkpoint_path, model=model, opt=opt, shuffle_gen=shuffle_gen,
            augment_gen=augment_gen, rank=place.ranks.rank, device=place.device,
        )  # fmt: skip
        planned_epochs = recipe.epochs or progress["planned_epochs"]
        opt.schedule.total_steps = planned_epochs * steps_per_epoch
        started -= progress["wall_seconds"]  # a time budget covers the earlier processes too
        place.say(f"resumed from {run.checkpoint_path} after epoch {progress['epoch']}")
    elif run.resume:
        place.say(f"--resume: no checkpoint at {run.checkpoint_path}, starting afresh")
    if place.ranks.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        keep_log_rows(run.log_path, up_to_epoch=progress["epoch"])
    # DDP averages the gradients over ranks (and broadcasts rank 0's weights at the start).
    trained = DistributedDataParallel(model) if place.ranks.world_size > 1 else model
    forward = (
        compile_for_training(trained, place.device, run.compile_mode) if run.compile else trained
    )
    budget = TimeBudget(recipe.time_budget, started) if recipe.time_budget else None
    return Training(
        model, forward, opt, shuffle_gen, augment_gen, steps_per_epoch, planned_epochs,
        progress, started, budget, epoch=progress["epoch"],
    )  # fmt: skip


def train_one_epoch(
    training: Training, recipe: Recipe, run: RunOptions, place: Place, splits: Splits
) -> None:
    """One epoch: train; on rank 0 validate, log, keep the best weights and fit the plan to
    a time budget; share the plan with every rank; checkpoint."""
    epoch_start = time.perf_counter()
    row = {"epoch": training.epoch + 1} | train_epoch(training, recipe, run, place, splits)
    training.epoch += 1
    augment_states = gather_from_ranks(training.augment_gen.get_state(), place.ranks)
    if place.ranks.is_main:
        validation_seconds = record_epoch(row, training, recipe, run, place, splits, epoch_start)
        if training.budget is not None:
            fit_plan(training, place, epoch_start, validation_seconds)
    training.planned_epochs = from_main_rank(training.planned_epochs, place.ranks)
    training.opt.schedule.total_steps = training.planned_epochs * training.steps_per_epoch
    if place.ranks.is_main:
        training.progress |= {
            "epoch": training.epoch,
            "planned_epochs": training.planned_epochs,
            "wall_seconds": time.monotonic() - training.started,
        }
        save_checkpoint(
            run.checkpoint_path, progress=training.progress, model=training.model,
            opt=training.opt, shuffle_gen=training.shuffle_gen, augment_states=augment_states,
        )  # fmt: skip


def train_epoch(
    training: Training, recipe: Recipe, run: RunOptions, place: Place, splits: Splits
) -> dict[str, float]:
    """`run_epoch` over this epoch's shuffled order, with a progress bar on rank 0."""
    training.model.train()
    order = torch.randperm(len(splits.train_set), generator=training.shuffle_gen)
    # Under a time budget the first epoch's total is not known yet.
    shown = training.planned_epochs if training.budget is None or training.epoch else "?"
    description = f"epoch {training.epoch + 1}/{shown}"
    return run_epoch(
        training.forward, splits.train_data, order.to(place.device), training.opt, recipe,
        training.augment_gen, place.amp_dtype, place.memory_format, place.ranks,
        description=None if run.no_progress or not place.ranks.is_main else description,
    )  # fmt: skip


def record_epoch(
    row: dict[str, Any],
    training: Training,
    recipe: Recipe,
    run: RunOptions,
    place: Place,
    splits: Splits,
    epoch_start: float,
) -> float:
    """Validate the model and its EMA, log the epoch's row and write the weights when they
    are the best yet. Returns the seconds validation took."""
    candidates = {"model": training.model}
    if training.opt.ema is not None:
        candidates["ema"] = training.opt.ema.module
    validation_start = time.perf_counter()
    if splits.val_set is not None:
        row |= validate(
            candidates, splits.val_set, place.device, place.amp_dtype, place.memory_format
        )
    validation_seconds = time.perf_counter() - validation_start
    training.progress["elapsed_seconds"] += time.perf_counter() - epoch_start
    row["elapsed_seconds"] = training.progress["elapsed_seconds"]
    log_epoch(run.log_path, row)
    best = training.progress["best"]
    training.progress["best"] = keep_if_best(row, candidates, best, run.output)
    return validation_seconds


def fit_plan(
    training: Training, place: Place, epoch_start: float, validation_seconds: float
) -> None:
    """Fit the planned epochs to the time budget from the epochs measured so far, keeping
    the final evaluation (fp32, plain and mirrored: about four validations) in reserve."""
    budget = training.budget
    assert budget is not None  # only called under a time budget
    budget.epoch_seconds.append(time.perf_counter() - epoch_start)
    fitted = budget.epochs_that_fit(
        training.epoch,
        training.planned_epochs,
        reserve_seconds=4 * validation_seconds + 2,
        lr_factor=training.opt.schedule.factor(),
    )
    if fitted != training.planned_epochs:
        place.say(
            f"time budget {format_duration(budget.seconds)}: {fitted} epochs fit "
            f"(about {budget.epoch_seconds[-1]:.0f} s each, "
            f"{format_duration(time.monotonic() - budget.started)} used)",
            flush=True,
        )
        training.planned_epochs = fitted


def keep_log_rows(log_path: Path, up_to_epoch: int) -> None:
    """A fresh run starts a fresh log; a resumed one drops rows of any epoch that was logged
    but not checkpointed before the kill (it is about to be run again)."""
    if log_path.exists():
        rows = [line for line in log_path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if json.loads(line)["epoch"] <= up_to_epoch]
        log_path.write_text("".join(line + "\n" for line in kept))


def log_epoch(log_path: Path, row: dict[str, Any]) -> None:
    """One JSON line in the log, and the same figures on stdout."""
    with open(log_path, "a") as log:
        log.write(json.dumps(row) + "\n")
    print(
        " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
        flush=True,
    )


def keep_if_best(
    row: dict[str, Any],
    candidates: dict[str, nn.Module],
    best: dict[str, Any],
    output: Path,
) -> dict[str, Any]:
    """Write the weights of the better candidate (model or EMA) when it beats `best` on
    validation accuracy; with no validation split, the latest model is the best known.
    The card follows at the end of the run (`finish`)."""
    if "val_accuracy" not in row:
        save_tensors(candidates["model"], output)
        return {"val_accuracy": -1.0, "epoch": row["epoch"], "weights": "model"}
    scores = {
        name: row[("" if name == "model" else "ema_") + "val_accuracy"] for name in candidates
    }
    name = max(scores, key=lambda candidate: scores[candidate])
    if scores[name] <= best["val_accuracy"]:
        return best
    save_tensors(candidates[name], output)
    return {"val_accuracy": float(scores[name]), "epoch": row["epoch"], "weights": name}


def finish(
    recipe: Recipe,
    run: RunOptions,
    dataset: Dataset,
    train_set: Dataset,
    val_set: Dataset | None,
    progress: dict[str, Any],
    log_path: Path,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    parent_card: ModelCard | None,
    commit: str,
    wall_seconds: Callable[[], float],
) -> ModelCard:
    """The kept weights' final fp32 figures (plain and mirrored), the curves and the card."""
    # Beside the weights, so the plot ships with them (weights/MODEL_CARD.md shows it).
    plot_curves(log_path, run.output.with_name(f"{run.output.stem}_training.png"))
    from safetensors.torch import load_file

    kept = resnet(recipe.depth, recipe.version, len(dataset.classes), recipe.shortcut)
    kept.load_state_dict(load_file(run.output))
    evaluation = None
    if val_set is not None:
        evaluation = evaluate_model(kept, val_set.images, val_set.labels, device)
        # The service averages each image with its mirror image by default (--tta in
        # model.evaluate), so the card gives that figure too.
        evaluation["mirror_tta"] = evaluate_model(
            kept, val_set.images, val_set.labels, device, tta=True
        )
    best = progress["best"]
    card = build_card(
        recipe, run, dataset, train_set, val_set, kept, best, evaluation,
        progress["elapsed_seconds"],
        wall_seconds(), device, amp_dtype, parent_card, commit,
    )  # fmt: skip
    card = save_checked(kept, run.output, card)  # the same tensors, now with their card
    print(
        f"wrote {run.output} and {run.output.with_suffix('.json')}: "
        f"{recipe.epochs} epochs, best epoch {best.get('epoch')} ({best.get('weights')}), "
        f"validation accuracy {evaluation['accuracy'] if evaluation else 'n/a'}, "
        f"wall time {format_duration(wall_seconds())}"
    )
    return card


def build_card(
    recipe: Recipe,
    run: RunOptions,
    dataset: Dataset,
    train_set: Dataset,
    val_set: Dataset | None,
    model: nn.Module,
    best: dict[str, Any],
    evaluation: dict[str, Any] | None,
    elapsed: float,
    wall_seconds: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    parent_card: ModelCard | None,
    commit: str,
) -> ModelCard:
    """The run's model card; `save_checked` adds the SHA-256 of the weights it writes (to
    `sha256` and to this run's lineage cycle)."""
    device_name = f"{device.type}: " + (
        torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    )
    this_cycle = Cycle(
        init=parent_card.sha256 if parent_card else "random",
        epochs=recipe.epochs,
        peak_lr=recipe.peak_lr,
        time_budget_seconds=recipe.time_budget,
        wall_seconds=round(wall_seconds, 1),
        device=device_name,
        validation_accuracy=evaluation["accuracy"] if evaluation else None,
        validation_accuracy_mirror_tta=evaluation["mirror_tta"]["accuracy"] if evaluation else None,
        git_commit=commit,
    )
    return ModelCard(
        name=f"resnet{recipe.depth}",
        architecture=card_architecture(recipe, len(dataset.classes)),
        parameters=count_parameters(model),
        classes=tuple(dataset.classes),
        preprocessing=Preprocessing(
            mean=CIFAR10_MEAN,
            std=CIFAR10_STD,
            rule="RGB; resize short side to 32 (bicubic, antialiased); centre crop; normalise",
        ),
        recipe=asdict(recipe),
        data=card_data(run, dataset, train_set, val_set, recipe.seed),
        epochs=recipe.epochs,
        best_epoch=best.get("epoch"),
        best_weights=best.get("weights"),  # "model" or "ema"
        validation=card_validation(evaluation) if evaluation else None,
        lineage=card_lineage(parent_card, this_cycle),
        training_time_seconds=round(elapsed, 1),
        device=device_name,
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=sys.version.split()[0],
        seed=recipe.seed,
        git_commit=commit,
        weights_file=run.output.name,
    )


def card_architecture(recipe: Recipe, num_classes: int) -> Architecture:
    """The card's description of the network the recipe builds."""
    family = (
        "ResNet for CIFAR (He et al. 2015)"
        if recipe.version == 1
        else "pre-activation ResNet (He et al. 2016)"
    )
    return Architecture(
        family=family,
        depth=recipe.depth,
        version=recipe.version,
        shortcut=recipe.shortcut,
        num_classes=num_classes,
        input=(3, 32, 32),
    )


def card_data(
    run: RunOptions, dataset: Dataset, train_set: Dataset, val_set: Dataset | None, seed: int
) -> dict[str, Any]:
    """The card's record of the training data: where it came from and how it was split."""
    return {
        "description": run.data_description,
        "source": dataset.source,
        "sha256": dataset.checksum,
        "images": len(dataset),
        "train_images": len(train_set),
        "validation_images": len(val_set) if val_set else 0,
        "validation_split": f"stratified, seed {seed}"
        if val_set
        else "none (trained on all images)",
    }


def card_validation(evaluation: dict[str, Any]) -> Validation:
    """`evaluate_model`'s fp32 figures (with its mirror-TTA figures) as the card states them."""
    mirrored = evaluation["mirror_tta"]
    return Validation(
        accuracy=evaluation["accuracy"],
        per_class=evaluation["per_class"],
        precision="fp32",
        mirror_tta=Accuracy(accuracy=mirrored["accuracy"], per_class=mirrored["per_class"]),
    )


def card_lineage(parent_card: ModelCard | None, this_cycle: Cycle) -> Lineage:
    """The parent's cycles (from `--init-from`) followed by this run's."""
    cycles = [*lineage_cycles(parent_card), this_cycle] if parent_card else [this_cycle]
    return Lineage(
        parent_sha256=parent_card.sha256 if parent_card else None,
        cumulative_epochs=sum(cycle.epochs or 0 for cycle in cycles),
        cycles=tuple(cycles),
    )


def lineage_cycles(card: ModelCard) -> list[Cycle]:
    """The training cycles that made the weights of `card`, oldest first.

    Cards written before lineage was recorded describe one cycle from random initialisation;
    cards not written by model.train (tests, benchmarks) leave its figures unknown (None).
    """
    if card.lineage is not None:
        return list(card.lineage.cycles)
    validation = card.validation
    mirrored = validation.mirror_tta if validation else None
    return [
        Cycle(
            sha256=card.sha256,
            init="random",
            epochs=card.epochs,
            peak_lr=card.recipe["lr"] if card.recipe else None,
            time_budget_seconds=None,
            wall_seconds=card.training_time_seconds,
            device=card.device,
            validation_accuracy=validation.accuracy if validation else None,
            validation_accuracy_mirror_tta=mirrored.accuracy if mirrored else None,
            git_commit=card.git_commit,
        )
    ]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, with the matrix/bf16 extensions that set
    training speed (AMX, AVX-512 BF16); platform.machine() where there is no /proc."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    flags = set(fields.get("flags", "").split())
    extensions = (("amx_tile", "AMX"), ("avx512_bf16", "AVX-512 BF16"))
    extras = [label for flag, label in extensions if flag in flags]
    name = fields.get("model name") or platform.machine()
    return name + (f" ({', '.join(extras)})" if extras else "")


if __name__ == "__main__":
    main()
