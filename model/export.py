"""Export weights for the fast inference engines: ONNX and OpenVINO IR.

    python -m model.export --weights weights/resnet56.safetensors --format onnx|openvino|all

writes `resnet56.onnx` (dynamic batch axis) and/or `resnet56.xml` + `resnet56.bin` beside the
weights (or in `--output-dir`), then checks every file against torch fp32 on a seeded random
batch and prints the largest absolute logit difference and the top-1 agreement. The exit
status is 1 when an fp32 check fails (bf16 figures, where the CPU has bf16, are printed too).

The exported graph takes what the service holds, uint8 pixels (N, 3, 32, 32), and returns
float32 logits (N, classes): `model.preprocessing.normalize` is traced into it, so the
normalisation constants still have one home and the runtimes need no torch op per batch
(torch's OpenMP threads would otherwise wake up between inferences and compete with the
runtime's own threads for the cores).

The safetensors weights stay the one source of truth: the service never needs these files.
Its engines call `cached_onnx` / `cached_openvino` / `cached_openvino_int8` at start-up,
which export from the torch model (and, for INT8, quantize the OpenVINO IR with NNCF on the
calibration images of `model.calibration`) into a cache folder keyed by the weights'
SHA-256 and reuse the result on the next start.

ONNX comes from `torch.onnx.export(dynamo=True)`, the torch.export-based exporter: it is the
default since torch 2.9 and the maintained one, while the TorchScript exporter is deprecated
(it warns that it "will be removed"). For this model it gives a clean opset-20 graph with the
BatchNorms folded into the convolutions and a symbolic `batch` dimension. The OpenVINO IR is
converted from that ONNX file, so both engines run the same exported graph.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from model.files import staging_path, write_atomically
from model.preprocessing import IMAGE_SIZE, normalize

if TYPE_CHECKING:
    import openvino as ov

INPUT_NAME = "images"
OUTPUT_NAME = "logits"

# Largest |logit difference| allowed, as a fraction of the largest |torch logit|. fp32
# runtimes only reorder sums and fold BatchNorm into the convolutions: a few ulps per layer.
# bf16 keeps 8 significant bits (rounding error 2^-9 = 0.2%) of the activations and weights of
# every layer while accumulating in fp32: rounding across the layers stays well below 5%, so
# 5% flags a broken graph, not rounding. fp16 keeps 11 bits, hence a tighter bound.
# The differences measured: weights/MODEL_CARD.md (engine parity).
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 1e-2}
MIN_AGREEMENT = 0.995  # the parity bar for top-1 predictions
# Bump when quantize_openvino changes what it makes: the cache key of quantized models.
INT8_RECIPE_VERSION = 2


# --- Export ---------------------------------------------------------------------------------


class ImageClassifier(nn.Module):
    """uint8 images -> logits: `normalize` followed by the network, the graph we export."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(normalize(images))


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Write `model` (eval mode), behind `normalize`, as one self-contained ONNX file with a
    dynamic batch axis: uint8 "images" (batch, 3, 32, 32) -> float32 "logits" (batch, classes).

    The file appears atomically: it is written under a temporary name and renamed, so a
    process that starts while another exports never reads half a file.
    """
    path = Path(path)
    device = next(model.parameters()).device
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 0 or 1.
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8, device=device)
    return write_atomically(
        path,
        lambda staging: torch.onnx.export(
            ImageClassifier(model).eval(),
            (example,),
            staging,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,  # weights inline: one file to cache, rename and ship
            verbose=False,
        ),
    )


def export_openvino(source: nn.Module | Path, path: Path) -> Path:
    """Write OpenVINO IR (`path` ending in .xml, weights in the .bin beside it).

    `source` is a torch model (exported to ONNX on the way) or an ONNX file. Weights stay
    fp32 in the IR (compress_to_fp16=False): the CPU plugin's inference precision hint picks
    bf16 or fp32 at load time, so one IR serves both. The .bin is moved into place before the
    .xml, so a reader that finds the .xml also finds its complete .bin.
    """
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"OpenVINO IR path must end in .xml, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as staging:
        if isinstance(source, nn.Module):
            source = export_onnx(source, Path(staging) / "model.onnx")
        ir_model = ov.convert_model(source)
        # The ONNX file already has a symbolic batch; reshaping states it for any source.
        ir_model.reshape({0: ov.PartialShape([-1, 3, IMAGE_SIZE, IMAGE_SIZE])})
        ov.save_model(ir_model, Path(staging) / "model.xml", compress_to_fp16=False)
        os.replace(Path(staging) / "model.bin", path.with_suffix(".bin"))
        os.replace(Path(staging) / "model.xml", path)
    return path


def calibration_samples(images: torch.Tensor) -> list[np.ndarray]:
    """What NNCF calibrates on: each uint8 image (3, H, W) of `images` as a batch of one,
    then each mirror image (flipped along the width) the same way, 2N arrays in all."""
    return [image[None].numpy() for image in torch.cat([images, images.flip(3)])]


def stem_convolution(fp32: ov.Model) -> str:
    """The name of the network's first convolution (topological order) in an OpenVINO model."""
    return next(
        op.get_friendly_name()
        for op in fp32.get_ordered_ops()
        if op.get_type_name() == "Convolution"
    )


def int8_recipe(fp32: ov.Model) -> dict[str, Any]:
    """`nncf.quantize`'s keyword arguments for the fp32 OpenVINO model `fp32`, besides the
    data: recipe INT8_RECIPE_VERSION, as `quantize_openvino` describes it. The linear layer
    is the graph's one MatMul."""
    import nncf

    return {
        "target_device": nncf.TargetDevice.CPU,
        "fast_bias_correction": False,
        "ignored_scope": nncf.IgnoredScope(names=[stem_convolution(fp32)], types=["MatMul"]),
    }


def quantize_openvino(source: Path, images: torch.Tensor, path: Path) -> Path:
    """Write the INT8 OpenVINO IR of the fp32 IR `source` to `path` (.xml, .bin beside it).

    NNCF's post-training quantization (`nncf.quantize` for the CPU: symmetric 8-bit
    activations with ranges taken from the calibration images, per-channel symmetric 8-bit
    weights) inserts FakeQuantize operations that the CPU plugin runs as INT8 kernels (VNNI,
    AMX where present). `images` are calibration inputs exactly as the graph takes them,
    uint8 (N, 3, 32, 32); each is fed as a batch of one, as NNCF expects, and so is its
    mirror image, because the service runs mirror images too (mirror TTA) and training
    showed the network both. Bias correction is NNCF's full one (`fast_bias_correction=
    False`), which re-fits each layer's bias on the quantized network's own activations.
    The first convolution (the normalised image in, 3 channels) and the final linear layer
    (the pooled 64 features in) stay in floating point (`nncf.IgnoredScope`): they carry
    under 1% of the multiply-adds, and keeping them cut the accuracy INT8 costs
    (`python -m benchmarks.int8_recipes` compares the variants; weights/MODEL_CARD.md has
    the figures). The input and the in-graph
    normalisation stay as they are, so the IR is a drop-in replacement for the fp32 one.
    Files appear atomically, as in `export_openvino`. Raises ValueError for a wrong path or
    images that are not uint8 NCHW.
    """
    import nncf
    import openvino as ov

    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"OpenVINO IR path must end in .xml, got {path}")
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be uint8 (N, 3, H, W), got {images.shape}")
    samples = calibration_samples(images)
    fp32 = ov.Core().read_model(source)
    quantized = nncf.quantize(
        fp32, nncf.Dataset(samples), subset_size=len(samples), **int8_recipe(fp32)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.stem}.") as staging:
        ov.save_model(quantized, Path(staging) / "model.xml", compress_to_fp16=False)
        os.replace(Path(staging) / "model.bin", path.with_suffix(".bin"))
        os.replace(Path(staging) / "model.xml", path)
    return path


# --- The cache the engines build at start-up -------------------------------------------------


def cached_onnx(model: nn.Module, sha256: str, cache_dir: Path) -> Path:
    """`cache_dir/<sha256>.onnx`, exported from `model` when missing.

    Two processes starting together may both export; each renames a complete file into
    place, so either result is read whole.
    """
    path = Path(cache_dir).expanduser() / f"{sha256}.onnx"
    if not path.is_file():
        export_onnx(model, path)
    return path


def cached_openvino(model: nn.Module, sha256: str, cache_dir: Path) -> Path:
    """`cache_dir/<sha256>.openvino/model.xml` (+ model.bin), built from the cached ONNX."""
    cache_dir = Path(cache_dir).expanduser()
    return _cached_ir(
        cache_dir / f"{sha256}.openvino",
        lambda xml: export_openvino(cached_onnx(model, sha256, cache_dir), xml),
    )


def cached_openvino_int8(
    model: nn.Module, sha256: str, cache_dir: Path, calibration_path: Path
) -> Path:
    """`cache_dir/<sha256>.openvino-int8-v<N>-<calibration sha256 [:16]>/model.xml` (+ .bin):
    the cached fp32 IR quantized by `quantize_openvino` on the images of `calibration_path`
    (a `model.calibration` file, read only when the quantized model is not cached yet).
    N is INT8_RECIPE_VERSION, so a changed recipe never reuses an old quantized model.

    Raises model.calibration.CalibrationError when the calibration file is missing or bad.
    """
    from model.calibration import calibration_sha256, load_calibration

    cache_dir = Path(cache_dir).expanduser()
    calibration = calibration_sha256(calibration_path)[:16]
    folder = cache_dir / f"{sha256}.openvino-int8-v{INT8_RECIPE_VERSION}-{calibration}"

    def build(xml: Path) -> None:
        fp32 = cached_openvino(model, sha256, cache_dir)
        quantize_openvino(fp32, load_calibration(calibration_path).images, xml)

    return _cached_ir(folder, build)


def _cached_ir(folder: Path, build: Callable[[Path], object]) -> Path:
    """`folder/model.xml`, made by `build(xml_path)` when missing.

    The .xml and .bin must come from the same export, so they are published together by
    renaming a whole staging folder; if another process published first, its folder is kept
    and ours is dropped.
    """
    xml = folder / "model.xml"
    if xml.is_file():
        return xml
    staging = staging_path(folder)
    staging.mkdir()
    try:
        build(staging / "model.xml")
        if folder.exists() and not xml.is_file():
            shutil.rmtree(folder)  # left damaged by hand; a rename cannot replace it
        try:
            os.rename(staging, folder)
        except OSError:
            if not xml.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return xml


# --- Checking an export against torch --------------------------------------------------------


@dataclass(frozen=True)
class ExportCheck:
    """How an exported file's logits compare with torch fp32 on the same images."""

    runtime: str
    precision: str
    images: int
    max_abs_diff: float
    logit_scale: float  # the largest |torch logit|, to read the difference against
    top1_agreement: float

    @property
    def passed(self) -> bool:
        within = self.max_abs_diff <= TOLERANCE[self.precision] * max(1.0, self.logit_scale)
        return within and self.top1_agreement >= MIN_AGREEMENT

    def __str__(self) -> str:
        return (
            f"{self.runtime} {self.precision} vs torch fp32 on {self.images} seeded random "
            f"images: max |logit diff| {self.max_abs_diff:.2e} (logits up to "
            f"{self.logit_scale:.2f}, tolerance {TOLERANCE[self.precision]:.0e} of that), "
            f"top-1 agreement {self.top1_agreement:.2%}"
        )


def _onnxruntime_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {INPUT_NAME: batch})[0]


def _openvino_runner(path: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov
    import openvino.properties.hint as hints

    element_type = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16, "fp16": ov.Type.f16}[precision]
    compiled = ov.Core().compile_model(path, "CPU", {hints.inference_precision: element_type})
    request = compiled.create_infer_request()
    return lambda batch: request.infer({0: batch}, share_inputs=True)[0]


def check_export(
    model: nn.Module, path: Path, *, precision: str = "fp32", images: int = 256, seed: int = 0
) -> ExportCheck:
    """Run `path` (.onnx with ONNX Runtime, .xml with OpenVINO at `precision`) and torch fp32
    on the same seeded random uint8 images, and compare the logits."""
    path = Path(path)
    if path.suffix == ".onnx":
        if precision != "fp32":
            raise ValueError("ONNX Runtime on the CPU runs fp32 only")
        runtime, run = "onnxruntime", _onnxruntime_runner(path)
    elif path.suffix == ".xml":
        runtime, run = "openvino", _openvino_runner(path, precision)
    else:
        raise ValueError(f"cannot check {path}: expected a .onnx or an OpenVINO .xml file")
    generator = torch.Generator().manual_seed(seed)
    shape = (images, 3, IMAGE_SIZE, IMAGE_SIZE)
    pixels = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    with torch.inference_mode():
        expected = model.eval().cpu()(normalize(pixels))
    actual = torch.from_numpy(np.asarray(run(pixels.numpy())))
    return ExportCheck(
        runtime=runtime,
        precision=precision,
        images=images,
        max_abs_diff=(actual - expected).abs().max().item(),
        logit_scale=expected.abs().max().item(),
        top1_agreement=(actual.argmax(1) == expected.argmax(1)).double().mean().item(),
    )


def _openvino_runs_bf16() -> bool:
    import openvino as ov
    import openvino.properties as props

    return "BF16" in ov.Core().get_property("CPU", props.device.capabilities)


def main(argv: list[str] | None = None) -> list[ExportCheck]:
    from model.weights import WeightsError, load_checked

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", type=Path, default=Path("weights/resnet56.safetensors"))
    parser.add_argument("--format", choices=("onnx", "openvino", "all"), default="all")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("exports"),
        help="where the exported files go (default: exports/; never beside the weights "
        "unless named here)",
    )
    parser.add_argument("--check-images", type=int, default=256)
    args = parser.parse_args(argv)

    try:
        model, _ = load_checked(args.weights)
    except WeightsError as error:
        parser.exit(2, f"error: {error}\n")
    output_dir = args.output_dir
    name = args.weights.stem  # resnet56.safetensors -> resnet56.onnx, resnet56.xml + .bin
    checks: list[ExportCheck] = []

    def report(path: Path, precisions: list[str]) -> None:
        size = sum(p.stat().st_size for p in (path, path.with_suffix(".bin")) if p.is_file())
        print(f"wrote {path} ({size / 1e6:.1f} MB)")
        for precision in precisions:
            check = check_export(model, path, precision=precision, images=args.check_images)
            checks.append(check)
            verdict = "ok" if check.passed else "FAILED"
            print(f"  {check} -> {verdict if precision == 'fp32' else 'reported only'}")

    onnx_path: Path | None = None
    if args.format in ("onnx", "all"):
        onnx_path = export_onnx(model, output_dir / f"{name}.onnx")
        report(onnx_path, ["fp32"])
    if args.format in ("openvino", "all"):
        xml = export_openvino(onnx_path or model, output_dir / f"{name}.xml")
        # fp32 checks the IR itself; bf16 is what the openvino engine runs on AMX or
        # AVX512-BF16 CPUs.
        report(xml, ["fp32", "bf16"] if _openvino_runs_bf16() else ["fp32"])
    if any(check.precision == "bf16" for check in checks):
        print(
            "(bf16 is reported, not judged, here: random pixels are full of near-ties between "
            "classes, which bf16 rounding flips; benchmarks/engines.py measures its parity on "
            "real images)"
        )
    if not all(check.passed for check in checks if check.precision == "fp32"):
        parser.exit(1, "error: an export does not match torch within tolerance\n")
    return checks


if __name__ == "__main__":
    main()
