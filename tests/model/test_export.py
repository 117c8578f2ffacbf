"""ONNX and OpenVINO export: dynamic batch, uint8 input, fidelity to torch, the on-disk cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model import export
from model.export import (
    INPUT_NAME,
    OUTPUT_NAME,
    TOLERANCE,
    cached_onnx,
    cached_openvino,
    check_export,
    export_onnx,
    export_openvino,
)
from model.preprocessing import normalize
from model.weights import load_checked
from tests.support.weights import write_test_weights

pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")


@pytest.fixture(scope="module")
def model(weights_file: Path) -> torch.nn.Module:
    return load_checked(weights_file)[0]


@pytest.fixture(scope="module")
def onnx_file(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "resnet8.onnx")


@pytest.fixture(scope="module")
def openvino_file(onnx_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("openvino", reason="the openvino package is not installed")
    return export_openvino(onnx_file, tmp_path_factory.mktemp("openvino") / "resnet8.xml")


def images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)


def torch_logits(model: torch.nn.Module, pixels: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(normalize(pixels)).numpy()


def test_onnx_graph_takes_uint8_with_a_symbolic_batch(onnx_file: Path) -> None:
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(onnx_file).graph
    (given,) = graph.input
    (produced,) = graph.output
    assert given.name == INPUT_NAME and produced.name == OUTPUT_NAME
    assert given.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    batch, *rest = given.type.tensor_type.shape.dim
    assert batch.dim_param and not batch.HasField("dim_value")  # symbolic, not fixed
    assert [d.dim_value for d in rest] == [3, 32, 32]
    assert produced.type.tensor_type.shape.dim[0].dim_param == batch.dim_param


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnx_matches_torch_at_any_batch_size(
    model: torch.nn.Module, onnx_file: Path, batch: int
) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    pixels = images(batch)
    (actual,) = session.run(None, {INPUT_NAME: pixels.numpy()})
    expected = torch_logits(model, pixels)
    assert actual.shape == (batch, 10)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE["fp32"])


def test_openvino_ir_keeps_fp32_weights_and_a_dynamic_batch(
    model: torch.nn.Module, openvino_file: Path
) -> None:
    import openvino as ov

    assert openvino_file.with_suffix(".bin").is_file()
    ir = ov.Core().read_model(openvino_file)
    assert ir.inputs[0].partial_shape[0].is_dynamic
    assert ir.inputs[0].element_type == ov.Type.u8
    weights = [op for op in ir.get_ops() if op.get_type_name() == "Constant"]
    assert weights and all(op.get_element_type() != ov.Type.f16 for op in weights)


def test_int8_ir_keeps_the_first_convolution_and_the_linear_layer_in_float(
    openvino_file: Path, tmp_path: Path
) -> None:
    """The body's convolutions run INT8 (a FakeQuantize on their input, int8 weights); the
    stem convolution and the classifier keep float inputs and fp32 weights, the recipe's
    choice that keeps accuracy (weights/MODEL_CARD.md)."""
    pytest.importorskip("nncf", reason="int8 needs NNCF to quantize")
    import openvino as ov

    quantized = export.quantize_openvino(openvino_file, images(20), tmp_path / "int8.xml")
    layers = [
        op
        for op in ov.Core().read_model(quantized).get_ordered_ops()
        if op.get_type_name() in ("Convolution", "MatMul")
    ]

    def producers(op: ov.Node) -> list[str]:
        """The op types feeding `op`, looking through reshapes and dequantizing multiplies."""
        found = []
        for port in op.inputs():
            node = port.get_source_output().get_node()
            while node.get_type_name() in ("Reshape", "Squeeze", "Multiply", "Convert"):
                found.append(node.get_type_name())
                node = node.input(0).get_source_output().get_node()
            found.append(f"{node.get_type_name()}:{node.get_element_type().get_type_name()}")
        return found

    stem, body, classifier = layers[0], layers[1:-1], layers[-1]
    assert classifier.get_type_name() == "MatMul"
    for kept in (stem, classifier):
        assert not any(p.startswith("FakeQuantize") or p == "Constant:i8" for p in producers(kept))
    assert body and all("FakeQuantize:f32" in producers(conv) for conv in body)
    assert all("Constant:i8" in producers(conv) for conv in body)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_check_export_passes_a_faithful_export(
    model: torch.nn.Module, onnx_file: Path, runtime: str, request: pytest.FixtureRequest
) -> None:
    path = onnx_file if runtime == "onnx" else request.getfixturevalue("openvino_file")
    pytest.importorskip("onnxruntime" if runtime == "onnx" else "openvino")
    check = check_export(model, path, images=64)
    assert check.passed, str(check)
    assert check.max_abs_diff < TOLERANCE["fp32"] * max(1.0, check.logit_scale)
    assert "top-1 agreement" in str(check)


def test_check_export_fails_an_export_of_other_weights(onnx_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    other, _ = load_checked(write_test_weights(tmp_path / "other.safetensors", seed=1))
    check = check_export(other, onnx_file, images=64)
    assert not check.passed


def test_cached_onnx_exports_once_and_rebuilds_when_missing(
    model: torch.nn.Module, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exports: list[Path] = []

    def counting_export(network: torch.nn.Module, path: Path) -> Path:
        exports.append(path)
        path.write_bytes(onnx_file.read_bytes())  # the export itself is tested above
        return path

    monkeypatch.setattr(export, "export_onnx", counting_export)
    first = cached_onnx(model, "abc123", tmp_path)
    assert first == tmp_path / "abc123.onnx" and first.is_file()
    assert cached_onnx(model, "abc123", tmp_path) == first
    assert len(exports) == 1
    first.unlink()
    assert cached_onnx(model, "abc123", tmp_path).is_file()
    assert len(exports) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123.onnx"]  # no temp files left


def test_cached_openvino_publishes_xml_and_bin_together(
    model: torch.nn.Module, onnx_file: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openvino")
    (tmp_path / "abc123.onnx").write_bytes(onnx_file.read_bytes())  # skip a second export
    xml = cached_openvino(model, "abc123", tmp_path)
    assert xml == tmp_path / "abc123.openvino" / "model.xml"
    assert sorted(p.name for p in xml.parent.iterdir()) == ["model.bin", "model.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123.onnx", "abc123.openvino"]
    modified = xml.stat().st_mtime_ns
    assert cached_openvino(model, "abc123", tmp_path) == xml
    assert xml.stat().st_mtime_ns == modified


def test_cached_openvino_keeps_the_folder_another_process_published(
    model: torch.nn.Module, onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("openvino")
    (tmp_path / "abc123.onnx").write_bytes(onnx_file.read_bytes())
    real_export = export.export_openvino

    def export_while_another_process_wins(source: Path, path: Path) -> Path:
        winner = tmp_path / "abc123.openvino"
        winner.mkdir()
        real_export(source, winner / "model.xml")
        (winner / "from_the_other_process").touch()
        return real_export(source, path)

    monkeypatch.setattr(export, "export_openvino", export_while_another_process_wins)
    xml = cached_openvino(model, "abc123", tmp_path)
    assert (xml.parent / "from_the_other_process").is_file()  # theirs was kept, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123.onnx", "abc123.openvino"]


def test_cli_exports_both_formats_and_prints_the_checks(
    weights_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    checks = export.main(
        ["--weights", str(weights_file), "--output-dir", str(tmp_path), "--check-images", "32"]
    )
    assert {p.name for p in tmp_path.iterdir()} == {"resnet8.onnx", "resnet8.xml", "resnet8.bin"}
    assert checks and all(check.passed for check in checks if check.precision == "fp32")
    assert {(c.runtime, c.precision) for c in checks} >= {
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
    }
    printed = capsys.readouterr().out
    assert printed.count("max |logit diff|") == len(checks)
    assert printed.count("top-1 agreement") == len(checks)


def test_cli_refuses_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        export.main(["--weights", str(tmp_path / "absent.safetensors"), "--format", "onnx"])
    assert exit_info.value.code == 2
    assert "not found" in capsys.readouterr().err
