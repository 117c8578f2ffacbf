"""Weights on disk: a safetensors file plus its model card (JSON) beside it.

The pair is one contract, as torchvision's `Weights(url, transforms, meta)` keeps a file,
its preprocessing and its measured accuracy together (torchvision/models/_api.py), and as a
model card documents a model (Mitchell et al. 2019, "Model Cards for Model Reporting"):

- `ModelCard` is the card's typed, frozen form. The code reads its fields as attributes;
  keys it does not know (older or newer writers) are kept and written back unchanged.
- `save_checked` is the one writer: it refuses tensors that do not fit the card's
  architecture, writes the safetensors file and then the card, each atomically, and sets
  the card's SHA-256 from the file it wrote.
- `load_checked` is the one reader: it refuses a file whose SHA-256 does not match its
  card, or whose tensors do not fit the architecture the card names.

The safetensors header carries no metadata of ours: the card is the one place that
describes the weights (older files carry an unread `architecture` entry there; it is
ignored, and the card's SHA-256 covers it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from model.files import write_atomically
from model.resnet import ResNet, Shortcut, resnet

SHA256_PATTERN = r"^([0-9a-f]{64})?$"  # hex, or empty until save_checked fills it in


class WeightsError(RuntimeError):
    """The weights cannot be used; the message says why in one line and what to do."""


class _CardSection(BaseModel):
    """A part of the card: immutable, and keeps keys this code does not know (extra)."""

    model_config = ConfigDict(frozen=True, extra="allow")


class Architecture(_CardSection):
    """The network `model.resnet.resnet(depth, version, num_classes, shortcut)` builds."""

    family: str | None = None  # in words, e.g. "ResNet for CIFAR (He et al. 2015)"
    depth: int
    version: int  # 1: basic blocks (He et al. 2015); 2: pre-activation (He et al. 2016)
    shortcut: Shortcut = "projection"  # cards written before the option existed
    num_classes: int
    input: tuple[int, int, int] | None = None  # (channels, height, width) the network takes


class Preprocessing(_CardSection):
    """What turns an image into the network's input (`model.preprocessing`)."""

    mean: tuple[float, float, float]  # per RGB channel, of pixels scaled to [0, 1]
    std: tuple[float, float, float]
    rule: str  # in words


class Accuracy(_CardSection):
    """Top-1 accuracy (fraction in [0, 1]) overall and per class, in `classes` order."""

    accuracy: float
    per_class: tuple[float, ...]


class Validation(Accuracy):
    """Figures on the validation split, computed in `precision` (e.g. "fp32")."""

    precision: str
    mirror_tta: Accuracy | None = None  # each image averaged with its mirror image


class Cycle(_CardSection):
    """One training run in the weights' lineage; `init` is "random" or the parent's SHA-256."""

    sha256: str = Field(default="", pattern=SHA256_PATTERN)  # of the weights it produced
    init: str
    epochs: int | None
    peak_lr: float | None
    time_budget_seconds: float | None
    wall_seconds: float | None
    device: str | None
    validation_accuracy: float | None
    validation_accuracy_mirror_tta: float | None
    git_commit: str | None


class Lineage(_CardSection):
    """The training cycles that made the weights, oldest first (`--init-from` chains them)."""

    parent_sha256: str | None
    cumulative_epochs: int
    cycles: tuple[Cycle, ...]


class ModelCard(_CardSection):
    """The model card (JSON) beside a weights file, typed; frozen.

    Fields the code reads are typed; the rest of what `model.train` records (`recipe`,
    `data`) stays a JSON mapping, and any key not declared here is kept in `model_extra`
    and written back, so loading and saving a card loses nothing. Only `name`,
    `architecture`, `classes` and (on disk) `sha256` are required: the tests' and
    benchmarks' cards have no training record. `sha256`, `weights_file` and the last
    lineage cycle's `sha256` are empty until `save_checked` sets them from the file.

    Raises pydantic.ValidationError when built from values that do not fit, e.g. a class
    list whose length is not `architecture.num_classes`.
    """

    name: str  # the served model name, e.g. "resnet56"
    architecture: Architecture
    parameters: int | None = None  # trainable parameters
    classes: tuple[str, ...]  # the network's outputs, in order
    preprocessing: Preprocessing | None = None
    recipe: dict[str, Any] | None = None  # model.train's Recipe, as written (asdict)
    data: dict[str, Any] | None = None  # the training data: source, SHA-256, split sizes
    epochs: int | None = None
    best_epoch: int | None = None
    best_weights: str | None = None  # "model" or "ema": which copy was kept
    validation: Validation | None = None  # None when trained without a validation split
    lineage: Lineage | None = None  # absent from cards written before it was recorded
    training_time_seconds: float | None = None
    device: str | None = None
    torch_threads: int | None = None
    torch: str | None = None  # torch.__version__ of the training run
    python: str | None = None
    seed: int | None = None
    git_commit: str | None = None
    weights_file: str | None = None  # the file name the card was saved beside
    sha256: str = Field(default="", pattern=SHA256_PATTERN)  # of the weights file, hex

    @model_validator(mode="after")
    def _one_name_per_output(self) -> Self:
        if len(self.classes) != self.architecture.num_classes:
            raise ValueError(
                f"classes names {len(self.classes)} classes but architecture.num_classes is "
                f"{self.architecture.num_classes}: give one class name per output"
            )
        return self

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        """Parse a card's JSON text; raises ValueError (pydantic.ValidationError)."""
        return cls.model_validate_json(text)

    def to_json(self) -> str:
        """The card as written to disk: 2-space indented JSON and a newline, keys in the
        order read (declared fields first, then unknown ones), absent keys left absent."""
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=2) + "\n"

    def with_file(self, weights_file: str, sha256: str) -> ModelCard:
        """This card bound to a written weights file: `weights_file`, `sha256` and, when
        there is a lineage, the last cycle's `sha256` (that cycle made these weights)."""
        update: dict[str, Any] = {"weights_file": weights_file, "sha256": sha256}
        if self.lineage is not None and self.lineage.cycles:
            *older, last = self.lineage.cycles
            cycles = (*older, last.model_copy(update={"sha256": sha256}))
            update["lineage"] = self.lineage.model_copy(update={"cycles": cycles})
        return self.model_copy(update=update)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (weights, archives)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def card_path(weights_path: Path) -> Path:
    """The card's path: the weights' path with the suffix .json."""
    return Path(weights_path).with_suffix(".json")


def read_card(weights_path: Path) -> ModelCard:
    """The card beside `weights_path`; raises WeightsError when it is missing or invalid."""
    path = card_path(weights_path)
    if not path.is_file():
        raise WeightsError(
            f"model card {path} is missing: it must sit beside the weights (written by model.train)"
        )
    try:
        return ModelCard.from_json(path.read_bytes())
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, problem['loc'])) or 'card'}: {problem['msg']}"
            for problem in error.errors()[:3]
        )
        raise WeightsError(
            f"model card {path} is not a valid model card ({problems}): "
            "write cards with model.weights.save_checked"
        ) from error


def build_model(card: ModelCard) -> ResNet:
    """The untrained network the card's architecture names; raises WeightsError."""
    arch = card.architecture
    try:
        return resnet(arch.depth, arch.version, arch.num_classes, arch.shortcut)
    except ValueError as error:
        raise WeightsError(
            f"model card of {card.name} has no usable architecture: {error}"
        ) from error


def _describe(card: ModelCard) -> str:
    arch = card.architecture
    return f"ResNet{arch.depth} v{arch.version}"


def _load_state(
    model: ResNet, state: Mapping[str, torch.Tensor], card: ModelCard, source: str
) -> None:
    """`model.load_state_dict(state, strict=True)`, or WeightsError naming the first misfit."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        lines = str(error).splitlines()
        first = lines[1].strip() if len(lines) > 1 else str(error)
        raise WeightsError(f"{source} does not fit {_describe(card)}: {first}") from error


def fp32_tensors(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The tensors as the weights file stores them: floating point as float32 (the
    service's precision choices start from fp32), the rest as they are; contiguous, CPU."""
    state = (
        model_or_state.state_dict()
        if isinstance(model_or_state, torch.nn.Module)
        else model_or_state
    )
    return {
        key: (value.detach().float() if value.is_floating_point() else value.detach())
        .contiguous()
        .cpu()
        for key, value in state.items()
    }


def save_tensors(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: Path) -> None:
    """The weights alone, without a card, atomically: model.train's best-so-far copy
    during a run (resumable after a kill), which the run's end saves with its card
    through `save_checked`. `load_checked` refuses such a file until then."""
    write_atomically(Path(path), serialize(fp32_tensors(model_or_state)))


def save_checked(
    model_or_state: torch.nn.Module | Mapping[str, torch.Tensor], path: Path, card: ModelCard
) -> ModelCard:
    """Write the weights to `path` (safetensors) and `card` beside them; returns the card
    as written, bound to the file (`ModelCard.with_file`: its SHA-256 is the written file's).

    `model_or_state`: a module or its state dict, stored as `fp32_tensors` gives it. Each
    file is written atomically (`model.files.write_atomically`), the weights first, so a
    card whose SHA-256 matches always has its complete weights beside it. Raises
    WeightsError, before writing anything, when the tensors do not fit `card.architecture`.
    """
    path = Path(path)
    tensors = fp32_tensors(model_or_state)
    _load_state(build_model(card), tensors, card, "the weights to save")
    write_atomically(path, serialize(tensors))
    written = card.with_file(path.name, sha256_of(path))
    write_atomically(card_path(path), written.to_json().encode())
    return written


def load_checked(weights_path: Path, *, verify_checksum: bool = True) -> tuple[ResNet, ModelCard]:
    """Build the model the card describes and load the weights into it, in eval mode.

    Returns (model, card). Raises WeightsError when the file or its card is missing or
    unreadable, the file's SHA-256 differs from the card's, or the tensors do not fit
    the card's architecture.
    """
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsError(
            f"weights file {weights_path} not found: train with `python -m model.train` "
            "or set the weights path"
        )
    card = read_card(weights_path)
    if verify_checksum:
        actual = sha256_of(weights_path)
        if actual != card.sha256:
            raise WeightsError(
                f"weights file {weights_path} has SHA-256 {actual[:12]}… but its card says "
                f"{card.sha256[:12] or 'none'}…: the file is corrupt or not the one "
                "the card describes"
            )
    model = build_model(card)
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise WeightsError(
            f"weights file {weights_path} is not a readable safetensors file: {error}"
        ) from error
    _load_state(model, state, card, f"weights file {weights_path}")
    return model.eval(), card
