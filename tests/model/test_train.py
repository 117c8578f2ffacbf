"""Training end to end on tiny generated data: it learns, it writes what the service loads,
and a killed run resumed from its checkpoint ends exactly where an uninterrupted one does."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model import evaluate, train
from model.resnet import count_parameters, resnet
from model.weights import ModelCard, load_checked, read_card, sha256_of
from tests.model.test_data import write_class_tree

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("red", "green", "blue", "yellow")  # PALETTE's first four colours


def trained(argv: list[str]) -> ModelCard:
    """`train.main(argv)` in this process: the card it wrote (one process is rank 0)."""
    card = train.main(argv)
    assert card is not None
    return card


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """`--threads` sets torch's process-wide thread count; give later tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def colour_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four classes of noisy solid colours, 50 images each: easy to learn, fast to train."""
    root = tmp_path_factory.mktemp("colours") / "tree"
    write_class_tree(root, CLASSES, per_class=50)
    return root


def tiny_run(data: Path, out: Path, *extra: str) -> list[str]:
    """Arguments for a seconds-long ResNet8 run that keeps every file under `out`."""
    return [
        "--data", str(data),
        "--depth", "8",
        "--batch-size", "16",
        "--warmup-epochs", "1",
        "--ema-decay", "0.9",  # the default 0.999 barely moves in a few dozen steps
        "--val-size", "40",
        "--cache-dir", str(out / "cache"),
        "--run-dir", str(out / "run"),
        "--output", str(out / "weights" / "tiny.safetensors"),
        "--no-progress",
        "--no-compile",  # compiling takes longer than these runs; one test below compiles
        *extra,
    ]  # fmt: skip


# --- A short run learns and writes weights, card, log and plot ----------------------------


def test_tiny_run_learns_and_writes_a_matching_card(colour_tree: Path, tmp_path: Path) -> None:
    card = trained(tiny_run(colour_tree, tmp_path, "--epochs", "3"))
    weights = tmp_path / "weights" / "tiny.safetensors"

    # Far above chance (0.25) on held-out images, measured in fp32 on the kept weights.
    assert card.validation is not None and card.validation.mirror_tta is not None
    assert card.validation.accuracy >= 0.9
    assert card.validation.precision == "fp32"
    per_class = card.validation.per_class
    assert len(per_class) == len(CLASSES) and min(per_class) > 0.5  # every class, not most

    # The card on disk is the one returned, and its checksum is the weights file's.
    assert read_card(weights) == card
    assert card.sha256 == sha256_of(weights)
    assert card.weights_file == weights.name
    assert list(card.classes) == sorted(CLASSES)  # not CIFAR-10 names: alphabetical
    assert card.architecture.depth == 8 and card.architecture.num_classes == 4
    assert card.parameters == count_parameters(resnet(8, num_classes=4))
    assert card.data is not None
    assert card.data["train_images"] == 160 and card.data["validation_images"] == 40

    # The service's loader accepts the pair: checksum, architecture and tensors agree.
    model, loaded_card = load_checked(weights)
    assert loaded_card == card
    assert all(
        t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point()
    )

    # One log row per epoch, and the curves.
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    # The kept weights are the log's best validation score, plain model or EMA: the first
    # epoch to reach it, and the plain model on a tie.
    scores = [(row["val_accuracy"], row["ema_val_accuracy"]) for row in rows]
    top = max(max(pair) for pair in scores)
    epoch = next(e for e, pair in enumerate(scores, 1) if top in pair)
    kept = "model" if scores[epoch - 1][0] == top else "ema"
    assert (card.best_epoch, card.best_weights) == (epoch, kept)
    assert (tmp_path / "weights" / "tiny_training.png").stat().st_size > 0

    # `model.evaluate --val-size N --seed S` re-measures exactly the card's validation figure.
    result = evaluate.main(
        ["--weights", str(weights), "--data", str(colour_tree), "--val-size", "40",
         "--seed", "0", "--json", "--cache-dir", str(tmp_path / "cache"),
         "--plot", str(tmp_path / "confusion.png")]
    )  # fmt: skip
    assert result["images"] == 40
    assert result["accuracy"] == card.validation.accuracy
    assert tuple(result["per_class"].values()) == card.validation.per_class
    # ... and `--tta` the mirror-averaged figure the service serves by default.
    mirrored = evaluate.main(
        ["--weights", str(weights), "--data", str(colour_tree), "--val-size", "40",
         "--seed", "0", "--json", "--tta", "--cache-dir", str(tmp_path / "cache"),
         "--plot", str(tmp_path / "confusion.png")]
    )  # fmt: skip
    assert mirrored["accuracy"] == card.validation.mirror_tta.accuracy
    assert tuple(mirrored["per_class"].values()) == card.validation.mirror_tta.per_class


def test_compiled_training_learns(colour_tree: Path, tmp_path: Path) -> None:
    """torch.compile is the default: the compiled step (Inductor's kernels, and a second
    static graph for the epoch's shorter last batch) must learn what eager learns."""
    args = tiny_run(colour_tree, tmp_path, "--epochs", "3", "--limit", "150", "--compile")
    card = trained(args)
    assert card.validation is not None and card.validation.accuracy >= 0.9


def test_compile_without_a_cpp_compiler_names_the_fix(
    colour_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(SystemExit, match=r"no-such-c\+\+-compiler.*--no-compile"):
        train.main(tiny_run(colour_tree, tmp_path, "--epochs", "1", "--compile"))


def test_run_without_validation_keeps_the_last_epoch(colour_tree: Path, tmp_path: Path) -> None:
    args = tiny_run(colour_tree, tmp_path, "--epochs", "2", "--limit", "48")
    args[args.index("--val-size") + 1] = "0"
    card = trained(args)
    assert card.validation is None and card.data is not None
    assert card.data["validation_images"] == 0 and card.data["train_images"] == 48
    assert card.best_epoch == 2
    state = load_file(tmp_path / "weights" / "tiny.safetensors")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    # With nothing to select on, the weights written are the final model's.
    for name, tensor in checkpoint["model"].items():
        assert torch.equal(state[name], tensor.float() if tensor.is_floating_point() else tensor)


# --- Which weights are kept -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_score", "ema_score", "kept"), [(0.9, 0.8, "model"), (0.7, 0.8, "ema")]
)
def test_the_better_of_model_and_ema_is_written(
    tmp_path: Path, model_score: float, ema_score: float, kept: str
) -> None:
    torch.manual_seed(0)
    candidates: dict[str, torch.nn.Module] = {
        "model": resnet(8, num_classes=4),
        "ema": resnet(8, num_classes=4),
    }
    row = {"epoch": 3, "val_accuracy": model_score, "ema_val_accuracy": ema_score}
    output = tmp_path / "kept.safetensors"
    best = train.keep_if_best(row, candidates, {"val_accuracy": 0.5}, output)
    assert best == {"val_accuracy": max(model_score, ema_score), "epoch": 3, "weights": kept}
    written = load_file(output)
    expected = candidates[kept].state_dict()
    assert all(torch.equal(written[name], expected[name].float()) for name in written)


def test_an_epoch_that_does_not_beat_the_best_writes_nothing(tmp_path: Path) -> None:
    candidates: dict[str, torch.nn.Module] = {
        "model": resnet(8, num_classes=4),
        "ema": resnet(8, num_classes=4),
    }
    row = {"epoch": 4, "val_accuracy": 0.8, "ema_val_accuracy": 0.85}
    best = {"val_accuracy": 0.85, "epoch": 2, "weights": "ema"}
    output = tmp_path / "kept.safetensors"
    assert train.keep_if_best(row, candidates, best, output) == best
    assert not output.exists()


# --- Resume --------------------------------------------------------------------------------


def test_killed_and_resumed_run_matches_an_uninterrupted_one(
    colour_tree: Path, tmp_path: Path, restore_threads: None
) -> None:
    # fp32, contiguous tensors and one thread: the settings under which CPU training is
    # bit-for-bit reproducible, so any state the checkpoint forgets shows up as a difference.
    flags = ["--epochs", "3", "--precision", "fp32", "--no-channels-last", "--threads", "1"]
    straight = tmp_path / "straight"
    train.main(tiny_run(colour_tree, straight, *flags))

    # The same run in its own process, killed with SIGKILL once the first checkpoint exists.
    killed = tmp_path / "killed"
    checkpoint = killed / "run" / "checkpoint.pt"
    process = subprocess.Popen(
        [sys.executable, "-m", "model.train", *tiny_run(colour_tree, killed, *flags)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, (
        f"the run ended on its own before it could be killed:\n{stderr.decode()[-2000:]}"
    )
    epochs_done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= epochs_done < 3

    card = trained(tiny_run(colour_tree, killed, *flags, "--resume"))

    # Same kept weights, bit for bit, and the same final training state.
    assert_same_tensors(
        load_file(killed / "weights" / "tiny.safetensors"),
        load_file(straight / "weights" / "tiny.safetensors"),
    )
    resumed_state = torch.load(checkpoint, weights_only=True)
    straight_state = torch.load(straight / "run" / "checkpoint.pt", weights_only=True)
    assert resumed_state["epoch"] == straight_state["epoch"] == 3
    assert_same_tensors(resumed_state["model"], straight_state["model"])
    assert_same_tensors(resumed_state["ema"], straight_state["ema"])
    assert resumed_state["best"] == straight_state["best"]

    # The log continues rather than restarting, with the same numbers per epoch.
    def log(run: Path) -> list[dict[str, float]]:
        rows = [
            json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        return [{k: row[k] for k in ("epoch", "train_loss", "val_accuracy", "lr")} for row in rows]

    assert log(killed) == log(straight)
    assert card.sha256 == sha256_of(killed / "weights" / "tiny.safetensors")


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"tensors differ after resuming: {different[:5]}"


# --- Continue from weights ------------------------------------------------------------------


def test_init_from_starts_from_the_weights_and_records_the_lineage(
    colour_tree: Path, tmp_path: Path
) -> None:
    parent_card = trained(tiny_run(colour_tree, tmp_path / "parent", "--epochs", "2"))
    parent = tmp_path / "parent" / "weights" / "tiny.safetensors"
    # lr 0 and no EMA: a run that starts from the parent's weights cannot move its conv and
    # linear weights, so the child's file holds exactly the parent's.
    child_args = tiny_run(colour_tree, tmp_path / "child", "--epochs", "1", "--lr", "0")
    child_args[child_args.index("--ema-decay") + 1] = "0"
    card = trained([*child_args, "--init-from", str(parent)])
    parent_state = load_file(parent)
    child_state = load_file(tmp_path / "child" / "weights" / "tiny.safetensors")
    matrices = [name for name, tensor in parent_state.items() if tensor.ndim > 1]
    assert matrices and all(torch.equal(child_state[n], parent_state[n]) for n in matrices)

    lineage = card.lineage
    assert lineage is not None and parent_card.lineage is not None
    assert lineage.parent_sha256 == parent_card.sha256 == sha256_of(parent)
    assert lineage.cumulative_epochs == 2 + 1
    assert [cycle.sha256 for cycle in lineage.cycles] == [parent_card.sha256, card.sha256]
    this_cycle = lineage.cycles[-1]
    assert this_cycle.init == parent_card.sha256
    assert this_cycle.epochs == 1 and this_cycle.peak_lr == 0.0
    assert card.validation is not None
    assert this_cycle.validation_accuracy == card.validation.accuracy
    assert parent_card.lineage.cycles[0].init == "random"


def test_init_from_other_architecture_stops_before_training(
    colour_tree: Path, tmp_path: Path
) -> None:
    train.main(tiny_run(colour_tree, tmp_path / "parent", "--epochs", "1"))
    parent = tmp_path / "parent" / "weights" / "tiny.safetensors"
    child = tmp_path / "child"
    result = subprocess.run(
        [sys.executable, "-m", "model.train",
         *tiny_run(colour_tree, child, "--epochs", "1", "--depth", "14"),
         "--init-from", str(parent)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, result.stderr  # one line, no traceback
    assert "ResNet8 v1" in message[0] and "ResNet14 v1" in message[0]
    assert not (child / "run" / "metrics.jsonl").exists()  # no epoch was trained


def test_init_from_weights_that_fail_their_checksum_stops(
    colour_tree: Path, tmp_path: Path
) -> None:
    train.main(tiny_run(colour_tree, tmp_path / "parent", "--epochs", "1"))
    parent = tmp_path / "parent" / "weights" / "tiny.safetensors"
    parent.write_bytes(parent.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(SystemExit, match="SHA-256"):
        train.main([*tiny_run(colour_tree, tmp_path / "child", "--epochs", "1"),
                    "--init-from", str(parent)])  # fmt: skip


# --- Time budget ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h15m", 8100.0), ("90m", 5400.0), ("45s", 45.0), ("600", 600.0), ("1h0m30s", 3630.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert train.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "2 hours", "h", "0s", "-5m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        train.parse_duration(text)


def test_epochs_and_time_budget_together_are_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--data", "x", "--epochs", "3", "--time-budget", "10m"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def run_log(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]


def test_time_budget_fits_the_epochs_and_ends_at_lr_zero_inside_it(
    colour_tree: Path, tmp_path: Path
) -> None:
    budget = 20.0
    started = time.monotonic()
    card = trained(tiny_run(colour_tree, tmp_path, "--time-budget", f"{budget:.0f}s"))
    wall = time.monotonic() - started
    rows = run_log(tmp_path)
    assert wall <= budget  # the weights and card are written inside the budget
    assert card.lineage is not None and card.recipe is not None
    assert card.epochs == len(rows) == card.lineage.cycles[-1].epochs
    assert len(rows) >= 3
    assert card.recipe["time_budget"] == budget
    assert rows[-1]["lr"] < 0.02 * card.recipe["lr"]  # annealed to (within a step of) zero


def test_time_budget_holds_when_the_trainer_is_paused(colour_tree: Path, tmp_path: Path) -> None:
    """SIGSTOP for a quarter of the budget: the plan shrinks, and the run still ends in time."""
    budget, pause = 40.0, 10.0
    process = subprocess.Popen(
        [sys.executable, "-m", "model.train",
         *tiny_run(colour_tree, tmp_path, "--time-budget", f"{budget:.0f}s")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    started = time.monotonic()
    try:
        log = tmp_path / "run" / "metrics.jsonl"
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert process.poll() is None and time.monotonic() - started < budget
            time.sleep(0.05)
        process.send_signal(signal.SIGSTOP)
        time.sleep(pause)
        process.send_signal(signal.SIGCONT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output[-2000:]
    card = json.loads((tmp_path / "weights" / "tiny.json").read_text())
    # The budget's clock starts in main(), after Python has imported torch.
    assert card["lineage"]["cycles"][-1]["wall_seconds"] <= budget
    assert time.monotonic() - started <= budget + pause
    assert card["epochs"] == len(run_log(tmp_path))
    assert run_log(tmp_path)[-1]["lr"] < 0.02 * card["recipe"]["lr"]
    fitted = [line for line in output.splitlines() if "epochs fit" in line]
    assert len(fitted) >= 2, output  # planned once, then re-planned after the pause


def budget_with(seconds_left: float, epoch_seconds: float = 10.0) -> train.TimeBudget:
    """A 1,000 s budget with `seconds_left` (plus one epoch kept in hand) still to run."""
    used = 1000.0 - seconds_left - epoch_seconds
    return train.TimeBudget(1000.0, time.monotonic() - used, [epoch_seconds] * 4)


def test_time_budget_grows_the_plan_only_while_the_lr_is_not_yet_near_zero() -> None:
    def fit(seconds_left: float, done: int, lr_factor: float) -> int:
        budget = budget_with(seconds_left)
        return budget.epochs_that_fit(done, planned=50, reserve_seconds=0, lr_factor=lr_factor)

    # 495 s left at 10 s an epoch: 49 more epochs fit.
    assert fit(495, done=30, lr_factor=0.2) == 79
    # Under 5% of the peak lr, more epochs would add nothing: the plan stays.
    assert fit(495, done=44, lr_factor=0.04) == 50
    # ...but it still shrinks when time runs short.
    assert fit(15, done=46, lr_factor=0.01) == 47


def test_the_fused_optimizer_makes_the_same_update() -> None:
    """--fused-optimizer changes how the step runs, not the weights it gives."""
    recipe = train.Recipe(depth=8)
    updated = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = resnet(8, num_classes=10)
        opt = train.build_optimization(model, recipe, 10, 2, torch.device("cpu"), None, fused)
        for _ in range(3):
            loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
            opt.optimizer.zero_grad()
            loss.backward()
            opt.optimizer.step()
        updated.append(model.state_dict())
    # Equal up to rounding: the fused kernel may use fused multiply-adds.
    torch.testing.assert_close(updated[1], updated[0], rtol=1e-6, atol=1e-7)


def test_run_option_flags() -> None:
    _, run = train.parse_args(["--compile-mode", "max-autotune", "--fused-optimizer"])
    assert run.compile_mode == "max-autotune" and run.fused_optimizer
    _, run = train.parse_args([])
    assert run.compile_mode == "default" and not run.fused_optimizer


# --- Defaults ------------------------------------------------------------------------------


def test_without_data_flags_the_data_comes_from_the_environment(
    colour_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(train.DATA_ENV, str(colour_tree))
    args = tiny_run(colour_tree, tmp_path, "--epochs", "1")
    del args[args.index("--data") : args.index("--data") + 2]
    card = trained(args)
    assert card.data is not None and card.data["source"] == str(colour_tree)


def test_without_data_or_internet_one_line_says_what_to_pass(tmp_path: Path) -> None:
    """No --data, no $CIFAR10_DATA, no data/cifar10/ and (here) no internet to fetch it."""
    environment = {k: v for k, v in os.environ.items() if k != train.DATA_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "model.train", "--no-compile", "--cache-dir", str(tmp_path)],
        cwd=tmp_path, env={**environment, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if result.returncode == 0 or "epoch=" in result.stdout:
        pytest.skip("this machine reached the internet and fetched CIFAR-10")
    message = result.stderr.strip().splitlines()
    assert len(message) == 1, result.stderr
    assert "--data" in message[0] and train.DATA_ENV in message[0]


# --- Several processes (torchrun) ----------------------------------------------------------


def torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={processes}", "-m", "model.train", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_torchrun_trains_one_model_on_two_processes_and_resumes(
    colour_tree: Path, tmp_path: Path
) -> None:
    flags = ["--precision", "fp32", "--no-channels-last"]
    single = trained(tiny_run(colour_tree, tmp_path / "one", "--epochs", "3", *flags))

    two = tmp_path / "two"
    first = torchrun(2, tiny_run(colour_tree, two, "--epochs", "2", *flags))
    assert first.returncode == 0, first.stderr[-3000:]
    # DDP kept one model: the ranks compare their parameters at the end and say so.
    assert "the 2 ranks hold identical parameters" in first.stdout
    # Rank 0 alone writes: one log line per epoch, not two.
    assert [row["epoch"] for row in run_log(two)] == [1, 2]
    resumed = torchrun(2, [*tiny_run(colour_tree, two, "--epochs", "3", *flags), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "after epoch 2" in resumed.stdout
    card = read_card(two / "weights" / "tiny.safetensors")

    # The same global batch (16 = 2 x 8) learns what one process learns: each rank has its
    # own augmentation, so the figures agree within a tolerance, not exactly.
    assert [row["epoch"] for row in run_log(two)] == [1, 2, 3]
    one_rows, two_rows = run_log(tmp_path / "one"), run_log(two)
    for one_row, two_row in zip(one_rows, two_rows, strict=True):
        assert abs(one_row["train_loss"] - two_row["train_loss"]) < 0.25
    assert card.validation is not None and single.validation is not None
    assert card.validation.accuracy >= 0.9 and single.validation.accuracy >= 0.9
    assert card.data is not None and single.data is not None
    assert card.data["train_images"] == single.data["train_images"]


def test_a_batch_that_does_not_split_over_the_processes_is_refused(
    colour_tree: Path, tmp_path: Path
) -> None:
    args = tiny_run(colour_tree, tmp_path, "--epochs", "1")
    args[args.index("--batch-size") + 1] = "15"
    result = torchrun(2, args)
    assert result.returncode != 0
    assert "--batch-size 15 does not split over 2 processes" in result.stderr


# --- Recipe pieces -------------------------------------------------------------------------


def schedule(kind: str, epochs: int = 10, per_epoch: int = 10) -> train.LrSchedule:
    return train.LrSchedule(
        kind=kind,
        peak=0.1,
        warmup_steps=2 * per_epoch,
        total_steps=epochs * per_epoch,
        steps_per_epoch=per_epoch,
    )


def factors(lr_schedule: train.LrSchedule, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(lr_schedule.factor())
        lr_schedule.advance()
    return out


@pytest.mark.parametrize("kind", ["cosine", "onecycle"])
def test_warmup_then_decay_to_zero(kind: str) -> None:
    lr_schedule = schedule(kind)
    seen = factors(lr_schedule, 100)
    warmup = 20  # 2 epochs of 10 steps
    assert seen[0] == pytest.approx(1 / warmup)
    assert seen[warmup - 1] == pytest.approx(1.0) and seen[warmup] == pytest.approx(1.0)
    assert all(a < b for a, b in itertools.pairwise(seen[:warmup]))
    assert all(a > b for a, b in itertools.pairwise(seen[warmup:]))
    # The last step ends within a step's worth of zero, and the step after it is at zero.
    assert seen[-1] < 0.02
    assert lr_schedule.factor() == pytest.approx(0.0, abs=1e-12)


def test_cosine_is_the_closed_form_when_the_length_is_fixed() -> None:
    seen = factors(schedule("cosine"), 100)
    expected = [0.5 * (1 + math.cos(math.pi * (step - 20) / 80)) for step in range(20, 100)]
    assert seen[20:] == pytest.approx(expected)


def test_moving_the_end_keeps_lr_continuous_and_still_reaches_zero() -> None:
    """What a time budget does when the trainer is paused: the run gets shorter mid-way."""
    lr_schedule = schedule("cosine", epochs=10)
    before = factors(lr_schedule, 50)
    lr_schedule.total_steps = 70  # was 100
    after = factors(lr_schedule, 20)
    jumps = [abs(b - a) for a, b in itertools.pairwise(before[20:] + after)]
    assert max(jumps) < 0.08  # a step's change, never a jump back up or down
    assert all(a > b for a, b in itertools.pairwise(before[20:] + after))
    assert after[-1] < 0.02 and lr_schedule.factor() == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_is_the_keras_examples() -> None:
    lr_schedule = schedule("step", epochs=200, per_epoch=5)

    def at(epoch: int) -> float:
        lr_schedule.step = epoch * 5
        return lr_schedule.factor()

    assert [at(e) for e in (0, 79, 80, 119, 120, 160, 180, 199)] == [
        1.0, 1.0, 0.1, 0.1, 0.01, 1e-3, 5e-4, 5e-4
    ]  # fmt: skip


def test_weight_decay_skips_batchnorm_and_biases() -> None:
    model = resnet(8, num_classes=4)
    decay, no_decay = train.parameter_groups(model, 5e-4, decay_all=False)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    weight_matrices = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear)
    }
    assert decayed == weight_matrices
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    everything = train.parameter_groups(model, 5e-4, decay_all=True)
    assert len(everything[0]["params"]) == len(list(model.parameters()))
