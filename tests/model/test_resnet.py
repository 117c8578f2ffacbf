"""The CIFAR ResNet builders: sizes from the papers, valid depths, shapes, the summary CLI."""

from __future__ import annotations

import pytest
import torch

from model import resnet as resnet_module
from model.resnet import (
    PaddingShortcut,
    Shortcut,
    count_parameters,
    resnet,
    resnet20,
    resnet56,
    resnet110,
)

# He et al. 2015, Table 6 (v1, CIFAR-10).
V1_PAPER_PARAMETERS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}
# He et al. 2016 ("Identity Mappings"), Table 2: pre-activation bottleneck ResNets.
V2_PAPER_PARAMETERS = {164: 1.7e6, 1001: 10.2e6}


def assert_within(actual: int, expected: float, tolerance: float = 0.03) -> None:
    assert abs(actual - expected) <= tolerance * expected, (
        f"{actual:,} parameters is not within {tolerance:.0%} of {expected:,.0f}"
    )


@pytest.mark.parametrize("shortcut", ["projection", "padding"])
@pytest.mark.parametrize("depth", sorted(V1_PAPER_PARAMETERS))
def test_v1_parameter_counts_match_the_paper(depth: int, shortcut: Shortcut) -> None:
    model = resnet(depth, version=1, shortcut=shortcut)
    assert_within(count_parameters(model), V1_PAPER_PARAMETERS[depth])


@pytest.mark.parametrize("depth", sorted(V2_PAPER_PARAMETERS))
def test_v2_parameter_counts_match_the_paper(depth: int) -> None:
    assert_within(count_parameters(resnet(depth, version=2)), V2_PAPER_PARAMETERS[depth])


def test_named_builders_build_the_named_depth() -> None:
    for builder, depth in ((resnet20, 20), (resnet56, 56), (resnet110, 110)):
        assert count_parameters(builder()) == count_parameters(resnet(depth))
    assert count_parameters(resnet56(version=1, shortcut="padding")) == count_parameters(
        resnet(56, shortcut="padding")
    )


def test_padding_shortcut_has_no_parameters() -> None:
    # Option A differs from option B by exactly the two 1x1 projections (+ their BN).
    projection = count_parameters(resnet(20, shortcut="projection"))
    padding = count_parameters(resnet(20, shortcut="padding"))
    assert projection - padding == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_padding_shortcut_subsamples_and_zero_pads_channels() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PaddingShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    # The original channels sit in the middle, the 16 new ones (8 each side) are zero.
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


@pytest.mark.parametrize(
    ("depth", "version", "blocks"), [(8, 1, 1), (20, 1, 3), (56, 1, 9), (11, 2, 1), (29, 2, 3)]
)
def test_depth_sets_blocks_per_stage(depth: int, version: int, blocks: int) -> None:
    model = resnet(depth, version=version)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3)] == [blocks] * 3


@pytest.mark.parametrize(("version", "form"), [(1, "6n+2"), (2, "9n+2")])
@pytest.mark.parametrize("depth", [0, 2, 19, 21, 57, -4])
def test_bad_depth_raises_naming_the_valid_form(depth: int, version: int, form: str) -> None:
    with pytest.raises(ValueError, match=form.replace("+", r"\+")):
        resnet(depth, version=version)


def test_valid_depth_of_the_other_version_is_rejected() -> None:
    # 32 = 6*5+2 is a v1 depth but not 9n+2; 29 = 9*3+2 is a v2 depth but not 6n+2.
    with pytest.raises(ValueError, match=r"9n\+2"):
        resnet(32, version=2)
    with pytest.raises(ValueError, match=r"6n\+2"):
        resnet(29, version=1)


def test_bad_version_and_shortcut_raise() -> None:
    with pytest.raises(ValueError, match="version"):
        resnet(20, version=3)
    with pytest.raises(ValueError, match="shortcut"):
        resnet(20, shortcut="identity")  # type: ignore[arg-type]  # refused at run time too


@pytest.mark.parametrize(
    ("depth", "version", "shortcut"),
    [(8, 1, "projection"), (8, 1, "padding"), (11, 2, "projection")],
)
def test_forward_gives_one_logit_per_class_and_trains(
    depth: int, version: int, shortcut: Shortcut
) -> None:
    torch.manual_seed(0)
    model = resnet(depth, version=version, num_classes=7, shortcut=shortcut)
    images = torch.randn(4, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (4, 7)
    # Every parameter receives a gradient: no block is accidentally left out of forward().
    logits.sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing


def test_summary_cli_prints_each_stage(capsys: pytest.CaptureFixture[str]) -> None:
    resnet_module.main(["--depth", "56"])
    out = capsys.readouterr().out
    assert "ResNet56 v1" in out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert list(rows) == ["stem", "layer1", "layer2", "layer3", "head", "total"]
    # Each stage halves the feature map and doubles the width (He et al. 2015 §4.2).
    assert "(16, 32, 32)" in rows["stem"] and "(16, 32, 32)" in rows["layer1"]
    assert "(32, 16, 16)" in rows["layer2"] and "(64, 8, 8)" in rows["layer3"]

    def count(row: str) -> int:
        return int(row.split()[-1].replace(",", ""))

    total = count_parameters(resnet(56))
    assert count(rows["total"]) == total
    # The per-stage counts account for every parameter.
    assert sum(count(rows[name]) for name in ("stem", "layer1", "layer2", "layer3", "head")) == (
        total
    )
