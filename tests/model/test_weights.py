"""The weights file and its model card: one typed contract, written by `save_checked`, read
by `load_checked`, and files replaced atomically (`model.files`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from model.files import write_atomically
from model.preprocessing import CIFAR10_CLASSES
from model.resnet import resnet
from model.train import lineage_cycles
from model.weights import (
    Architecture,
    ModelCard,
    WeightsError,
    card_path,
    load_checked,
    read_card,
    save_checked,
    sha256_of,
)

SHIPPED = Path(__file__).resolve().parents[2] / "weights" / "resnet56.safetensors"


def small_card(**changes: object) -> ModelCard:
    """A ResNet8 card as the tests and benchmarks write them (no training record)."""
    fields: dict[str, object] = {
        "name": "resnet8",
        "architecture": Architecture(depth=8, version=1, num_classes=10),
        "classes": CIFAR10_CLASSES,
    }
    return ModelCard.model_validate(fields | changes)


# --- The shipped card and older cards are read as written ------------------------------------


def test_the_shipped_card_round_trips_byte_for_byte() -> None:
    text = card_path(SHIPPED).read_text()
    card = ModelCard.from_json(text)
    assert card.to_json() == text
    # What the code reads comes out typed.
    assert card.name == "resnet56" and card.architecture.depth == 56
    assert card.classes == CIFAR10_CLASSES
    assert card.validation is not None and card.validation.mirror_tta is not None
    assert card.lineage is not None and card.lineage.cycles[-1].sha256 == card.sha256


def test_the_shipped_weights_load_with_their_card() -> None:
    """Written by the trainer before this module changed: its safetensors header still holds
    an `architecture` entry, which nothing reads; the card's SHA-256 covers the whole file."""
    model, card = load_checked(SHIPPED)
    assert card == read_card(SHIPPED)
    assert card.sha256 == sha256_of(SHIPPED)
    assert sum(p.numel() for p in model.parameters()) == card.parameters


def test_a_card_from_before_the_lineage_still_reads_as_one_random_cycle(tmp_path: Path) -> None:
    shipped = json.loads(card_path(SHIPPED).read_text())
    older = {key: value for key, value in shipped.items() if key != "lineage"}
    card = ModelCard.model_validate(older)
    assert card.lineage is None
    assert json.loads(card.to_json()) == older  # no "lineage": null appears on writing

    [cycle] = lineage_cycles(card)
    assert cycle.sha256 == card.sha256 and cycle.init == "random"
    assert cycle.epochs == card.epochs and cycle.peak_lr == shipped["recipe"]["lr"]
    assert card.validation is not None and card.validation.mirror_tta is not None
    assert cycle.validation_accuracy == card.validation.accuracy
    assert cycle.validation_accuracy_mirror_tta == card.validation.mirror_tta.accuracy


# --- save_checked / load_checked round trip ---------------------------------------------------


def test_save_checked_then_load_checked_gives_back_the_weights_and_card(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet(8)
    path = tmp_path / "resnet8.safetensors"

    written = save_checked(model, path, small_card())

    assert written.sha256 == sha256_of(path) and written.weights_file == path.name
    loaded_model, loaded_card = load_checked(path)
    assert loaded_card == written
    expected = model.state_dict()
    for name, tensor in loaded_model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # The card is the one description: the weights file's header carries none of its own.
    with safe_open(path, "pt") as handle:
        assert not handle.metadata()


def test_a_state_dict_saves_like_its_module_and_as_float32(tmp_path: Path) -> None:
    model = resnet(8)
    half = {name: tensor.half() if tensor.is_floating_point() else tensor
            for name, tensor in model.state_dict().items()}  # fmt: skip
    save_checked(half, tmp_path / "w.safetensors", small_card())
    stored = load_file(tmp_path / "w.safetensors")
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float32}
    assert stored.keys() == model.state_dict().keys()


def test_unknown_keys_survive_loading_and_saving_again(tmp_path: Path) -> None:
    """Keys a newer (or older) writer added, at the top and inside sections, are kept."""
    path = tmp_path / "resnet8.safetensors"
    save_checked(resnet(8), path, small_card())
    on_disk = json.loads(card_path(path).read_text())
    on_disk["architecture"]["width_multiplier"] = 1
    on_disk["intended_use"] = {"in_scope": "32x32 photos of the ten CIFAR-10 classes"}
    card_path(path).write_text(json.dumps(on_disk))

    model, card = load_checked(path)
    assert card.model_extra == {"intended_use": on_disk["intended_use"]}
    copy = tmp_path / "copy.safetensors"
    save_checked(model, copy, card)

    again = json.loads(card_path(copy).read_text())
    assert again == on_disk | {"weights_file": copy.name}  # same tensors: same SHA-256


def test_the_shipped_weights_saved_again_are_the_same_files(tmp_path: Path) -> None:
    """Loading the shipped weights and saving them with their card writes the same tensors
    file (same SHA-256) and the same card, every key and every cycle kept."""
    model, card = load_checked(SHIPPED)
    path = tmp_path / SHIPPED.name
    written = save_checked(model, path, card)

    before = json.loads(card_path(SHIPPED).read_text())
    after = json.loads(card_path(path).read_text())
    assert written.sha256 == sha256_of(path) == sha256_of(SHIPPED) == before["sha256"]
    assert list(after) == list(before)
    assert after == before


# --- What load_checked and save_checked refuse ------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "resnet8.safetensors"
    save_checked(resnet(8), path, small_card())
    return path


def test_weights_whose_sha256_differs_from_the_card_are_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit in a tensor
    saved.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"SHA-256 .* but its card says"):
        load_checked(saved)


def test_weights_that_do_not_fit_the_card_architecture_are_refused(saved: Path) -> None:
    card = read_card(saved)
    wrong = card.model_copy(
        update={"architecture": Architecture(depth=20, version=1, num_classes=10)}
    )
    card_path(saved).write_text(wrong.to_json())
    with pytest.raises(WeightsError, match="does not fit ResNet20 v1"):
        load_checked(saved)


def test_save_checked_refuses_tensors_that_do_not_fit_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "resnet8.safetensors"
    card = small_card(architecture=Architecture(depth=20, version=1, num_classes=10))
    with pytest.raises(WeightsError, match="does not fit ResNet20 v1"):
        save_checked(resnet(8), path, card)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda card: card.pop("name"), r"name: Field required"),
        (lambda card: card.update(classes=["cat", "dog"]), r"one class name per output"),
        (lambda card: card["architecture"].update(depth="deep"), r"architecture\.depth"),
        (lambda card: card.update(sha256="not hex"), r"sha256: String should match"),
    ],
    ids=["no name", "classes and outputs disagree", "depth not a number", "sha256 not hex"],
)
def test_an_invalid_card_is_refused_with_what_is_wrong(
    saved: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    card = json.loads(card_path(saved).read_text())
    edit(card)
    card_path(saved).write_text(json.dumps(card))
    with pytest.raises(WeightsError, match=message):
        load_checked(saved)


def test_a_missing_card_is_refused(saved: Path) -> None:
    card_path(saved).unlink()
    with pytest.raises(WeightsError, match=r"model card .* is missing"):
        load_checked(saved)


# --- Atomic replacement -----------------------------------------------------------------------


def test_a_failed_write_leaves_the_old_file_intact_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    write_atomically(path, b"old content")

    def write_half_then_fail(temporary: Path) -> None:
        temporary.write_bytes(b"new con")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, write_half_then_fail)
    assert path.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]

    write_atomically(path, lambda temporary: temporary.write_bytes(b"new content"))
    assert path.read_bytes() == b"new content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_a_save_checked_that_fails_half_way_is_refused_not_served(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is replaced whole, the weights first. If writing the card then fails, the
    new weights no longer match the old card, and load_checked refuses them."""
    card_before = card_path(saved).read_text()
    torch.manual_seed(1)
    other = resnet(8)

    def refuse(_: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "to_json", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_checked(other, saved, small_card())
    monkeypatch.undo()
    assert card_path(saved).read_text() == card_before
    with pytest.raises(WeightsError, match="SHA-256"):
        load_checked(saved)
    assert sorted(p.name for p in saved.parent.iterdir()) == sorted(
        [saved.name, card_path(saved).name]
    )
