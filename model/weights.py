"""Weights on disk: a safetensors file plus its model card (JSON) beside it.

Training writes both; evaluation, export and the service read them through
`load_checked`, which refuses a file whose SHA-256 does not match its card, or whose
tensors do not fit the architecture the card names.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from model.resnet import ResNet, resnet


class WeightsError(RuntimeError):
    """The weights cannot be used; the message says why in one line and what to do."""


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (weights, archives)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def card_path(weights_path: Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def write_card(weights_path: Path, card: dict[str, Any]) -> None:
    path = card_path(weights_path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(card, indent=2) + "\n")
    os.replace(temporary, path)


def read_card(weights_path: Path) -> dict[str, Any]:
    path = card_path(weights_path)
    if not path.is_file():
        raise WeightsError(
            f"model card {path} is missing: it must sit beside the weights (written by model.train)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise WeightsError(f"model card {path} is not valid JSON: {error}") from error


def load_checked(
    weights_path: Path, *, verify_checksum: bool = True
) -> tuple[ResNet, dict[str, Any]]:
    """Build the model the card describes and load the weights into it, or raise WeightsError."""
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise WeightsError(
            f"weights file {weights_path} not found: train with `python -m model.train` "
            "or set the weights path"
        )
    card = read_card(weights_path)
    if verify_checksum:
        actual = sha256_of(weights_path)
        if actual != card.get("sha256"):
            raise WeightsError(
                f"weights file {weights_path} has SHA-256 {actual[:12]}… but its card says "
                f"{str(card.get('sha256'))[:12]}…: the file is corrupt or not the one "
                "the card describes"
            )
    arch = card.get("architecture", {})
    try:
        model = resnet(
            int(arch["depth"]),
            int(arch["version"]),
            int(arch["num_classes"]),
            arch.get("shortcut", "projection"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"model card {card_path(weights_path)} has no usable architecture: {error}"
        ) from error
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise WeightsError(
            f"weights file {weights_path} is not a readable safetensors file: {error}"
        ) from error
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = (
            str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else str(error)
        )
        raise WeightsError(
            f"weights file {weights_path} does not fit "
            f"ResNet{arch['depth']} v{arch['version']}: {first}"
        ) from error
    return model.eval(), card
