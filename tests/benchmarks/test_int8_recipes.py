"""`python -m benchmarks.int8_recipes`: the summary's verdict and ratio, and a small run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import int8_recipes
from benchmarks.int8_recipes import BASELINE, PROJECT, Row, main, summary
from model.preprocessing import CIFAR10_CLASSES


def test_summary_judges_the_projects_mean_over_draws_against_the_bar() -> None:
    rows = [
        Row(BASELINE, 0, 3.0, -0.40, -0.30),
        Row(BASELINE, 1, 2.0, -0.30, -0.20),
        Row(PROJECT, 0, 1.5, -0.20, -0.10),
        Row(PROJECT, 1, 1.0, -0.36, -0.10),  # one draw outside the bar, the mean inside
    ]
    lines, passed = summary(rows)
    assert passed
    project = next(line for line in lines if line.startswith(f"{PROJECT} "))
    assert project.split()[1:] == ["1.25", "-0.28", "-0.10"]
    assert lines[-1].endswith("KL 1.25 vs 2.50 (0.50x)")

    failing = [*rows, Row(PROJECT, 2, 1.0, -0.70, 0.0)]  # one-pass mean -0.42
    lines, passed = summary(failing)
    assert not passed and "FAIL" in lines[-2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Ten class folders of 12 random-colour 32x32 PNGs each."""
    rng = np.random.default_rng(0)
    for name in CIFAR10_CLASSES:
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "tree" / name / f"{i}.png")
    return tmp_path / "tree"


def test_a_small_run_prints_a_row_per_variant_and_draw(
    weights_file: Path,
    tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("nncf", reason="the recipes are NNCF's")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # A random ResNet8 is no test of the bar (the summary's test is); let the run finish.
    monkeypatch.setattr(int8_recipes, "BAR_POINTS", 100.0)
    argv = [
        "--weights", str(weights_file), "--data", str(tree), "--val-size", "20",
        "--pool", "50", "--held-out", "40", "--calibration-size", "10", "--draws", "2",
        "--variants", BASELINE, PROJECT, "--cache-dir", str(tmp_path / "engines"),
    ]  # fmt: skip
    rows = main(argv)
    printed = capsys.readouterr().out
    for draw in (0, 1):
        for name in (BASELINE, PROJECT):
            assert any(line.split()[:2] == [name, str(draw)] for line in printed.splitlines())
    assert "20 validation and 40 held-out training images" in printed
    assert f"against recipe 1 ({BASELINE})" in printed
    assert [(row.variant, row.draw) for row in rows] == [
        (BASELINE, 0), (PROJECT, 0), (BASELINE, 1), (PROJECT, 1)
    ]  # fmt: skip
    assert all(row.kl_milli > 0 for row in rows)  # quantizing moves the probabilities
