"""The interface every inference engine implements.

The service (service/runtime.py) builds the engine, calls `warm_up` once at start-up and
`run` once per batch (twice with mirror TTA, see model/inference.py), always from the
batcher's one long-lived inference thread (see service/batcher.py: OpenMP thread teams
created per thread fight over the cores, so one thread does all inference).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.calibration import DEFAULT_PATH as DEFAULT_CALIBRATION_PATH
from model.weights import ModelCard


@dataclass(frozen=True)
class EngineOptions:
    """What any engine may need besides the model; fields not relevant to one are ignored."""

    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto", "fp32", "bf16", "fp16", "int8" (openvino only)
    cache_dir: Path = Path(
        "~/.cache/resnet-cifar10/engines"
    )  # exported models, keyed by weights SHA-256
    # uint8 calibration images for int8 (model.calibration), read when quantizing
    calibration_path: Path = DEFAULT_CALIBRATION_PATH
    compile: bool = False  # torch.compile (torch engine)
    cuda_graphs: bool = False  # capture CUDA graphs per batch size (torch engine on CUDA)
    threads: int = 0  # CPU threads for the engine (0: library default)


class Engine(ABC):
    """A loaded model that turns a uint8 image batch into logits.

    Subclasses set `name` and build everything in `__init__` from the torch model that
    `model.weights.load_checked` produced from the safetensors file (the one source of
    truth) and its model card.
    """

    name: str = "abstract"
    precision: str = "fp32"  # what the engine actually runs ("auto" resolved), for /health

    def __init__(self, model: torch.nn.Module, card: ModelCard, options: EngineOptions) -> None:
        self.card = card
        self.options = options

    @classmethod  # noqa: B027 (not abstract: an engine with nothing to refuse inherits this)
    def check(cls, options: EngineOptions) -> None:
        """Raise ValueError (one sentence naming the fix) when this engine cannot serve
        `options` on this machine: a device or precision it lacks. Cheap, loads no model:
        `python -m service` calls it (through check_engine) before the server starts."""

    @property
    @abstractmethod
    def device(self) -> str:
        """Where inference runs, for /health: e.g. "cpu", "cuda:0"."""

    @abstractmethod
    def run(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, 3, 32, 32) on the CPU -> float32 logits (N, num_classes) on the CPU.

        Normalisation (model.preprocessing.normalize) happens inside, on the engine's device.
        """

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every batch size once so the first real request pays no one-off costs."""
        for size in batch_sizes:
            self.run(torch.zeros(size, 3, 32, 32, dtype=torch.uint8))

    def describe(self) -> dict[str, Any]:
        """Facts for /health and logs."""
        return {"engine": self.name, "device": self.device, "precision": self.precision}
