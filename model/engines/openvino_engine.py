"""OpenVINO engine: the exported graph as OpenVINO IR on the CPU plugin.

At start-up the torch model is exported once to `cache_dir/<weights sha256>.openvino/`
(model.xml + model.bin, fp32 weights; see `model.export.cached_openvino`); later starts load
that folder. The graph takes the uint8 images as they are and normalises inside.

Floating-point precision is a load-time choice of the CPU plugin, not of the file: `auto`
keeps OpenVINO's default, which is bf16 on CPUs with native bf16 (AMX or AVX512-BF16) and
fp32 elsewhere; fp32, bf16 and fp16 can be forced. It is the fastest CPU engine on the CPUs
measured, which is why `auto` picks it (`python -m benchmarks.engines`; benchmarks/README.md
gives the figures).

`int8` loads another file: the IR quantized by NNCF post-training quantization, calibrated
on the images of `options.calibration_path` and cached as
`cache_dir/<weights sha256>.openvino-int8-v<recipe>-<calibration sha256>/` (see
`model.export.cached_openvino_int8`; the first start quantizes, later ones load). Its
convolutions and the linear layer run as INT8 kernels; what stays in floating point (the
normalisation, additions, pooling) runs at OpenVINO's default precision, as with `auto`.

The performance hint decides how the cores are split. The batcher calls `run` synchronously
from one thread, so one request is in flight at a time: LATENCY gives that request every
core, while THROUGHPUT splits the cores into streams of which a lone request uses one. The
hint is a constructor argument so that benchmarks/engines.py can compare both.
"""

from __future__ import annotations

from typing import Any

import torch

from model.engines.base import Engine, EngineOptions
from model.export import cached_openvino, cached_openvino_int8
from model.weights import ModelCard

# Options.precision -> the name OpenVINO's CPU plugin reports among its capabilities.
CAPABILITY = {"fp32": "FP32", "bf16": "BF16", "fp16": "FP16"}


class OpenVinoEngine(Engine):
    name = "openvino"

    def __init__(
        self,
        model: torch.nn.Module,
        card: ModelCard,
        options: EngineOptions,
        *,
        performance_hint: str = "LATENCY",
    ) -> None:
        super().__init__(model, card, options)
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        self.check(options)
        core = ov.Core()
        element_types = {"fp32": ov.Type.f32, "bf16": ov.Type.bf16, "fp16": ov.Type.f16}
        default = core.get_property("CPU", hints.inference_precision)
        if options.precision == "auto":
            self.precision = next(k for k, v in element_types.items() if v == default)
        else:
            self.precision = options.precision
        if performance_hint not in ("LATENCY", "THROUGHPUT"):
            raise ValueError(
                f"performance_hint must be LATENCY or THROUGHPUT, not {performance_hint!r}"
            )
        self.performance_hint = performance_hint

        if self.precision == "int8":
            self.model_path = cached_openvino_int8(
                model, card.sha256, options.cache_dir, options.calibration_path
            )
        else:
            self.model_path = cached_openvino(model, card.sha256, options.cache_dir)
        config: dict[str, Any] = {
            hints.performance_mode: getattr(hints.PerformanceMode, performance_hint),
            # int8: the layers left in floating point run at the CPU plugin's default.
            hints.inference_precision: element_types.get(self.precision, default),
        }
        if options.threads:
            config[props.inference_num_threads] = options.threads
        self.compiled = core.compile_model(core.read_model(self.model_path), "CPU", config)
        # One request, reused: `run` is only ever called from the batcher's one thread.
        self.request = self.compiled.create_infer_request()

    @classmethod
    def check(cls, options: EngineOptions) -> None:
        import openvino as ov
        import openvino.properties as props

        if options.device not in ("auto", "cpu"):
            raise ValueError(
                f"the openvino engine runs on the CPU, not {options.device!r}: set the device "
                "to auto or cpu, or use the torch engine on CUDA"
            )
        if options.precision in CAPABILITY:
            capabilities = ov.Core().get_property("CPU", props.device.capabilities)
            if CAPABILITY[options.precision] not in capabilities:
                raise ValueError(
                    f"this CPU cannot run {options.precision} natively (OpenVINO reports "
                    f"{capabilities}): set the precision to auto or fp32"
                )
        elif options.precision not in ("auto", "int8"):
            raise ValueError(
                f"unknown precision {options.precision!r}: use auto, fp32, bf16, fp16 or int8"
            )

    @property
    def device(self) -> str:
        return "cpu"

    def run(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.contiguous().numpy()
        # share_inputs wraps the array instead of copying it into the request's input tensor
        # (safe: infer is synchronous and the array is not touched meanwhile). Outputs are
        # copied (share_outputs=False): the request reuses its output buffer on the next run.
        result = self.request.infer({0: pixels}, share_inputs=True, share_outputs=False)
        return torch.from_numpy(result[0])

    def describe(self) -> dict[str, Any]:
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        float_precision = self.compiled.get_property(hints.inference_precision)
        return super().describe() | {
            "float_precision": float_precision.to_string(),  # of the layers int8 leaves in float
            "performance_hint": self.performance_hint,
            "threads": self.compiled.get_property(props.inference_num_threads),
            "streams": int(self.compiled.get_property(props.num_streams)),
            "openvino": ov.get_version(),
            "model_file": str(self.model_path),
        }
