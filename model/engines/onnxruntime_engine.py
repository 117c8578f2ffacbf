"""ONNX Runtime engine: the exported ONNX graph on ONNX Runtime's CPU (or CUDA) provider.

At start-up the torch model is exported once to `cache_dir/<weights sha256>.onnx` (see
`model.export.cached_onnx`); later starts load that file. The graph takes the uint8 images
as they are and normalises inside, so `run` is one `session.run` call.

It is faster than torch eager fp32 on the CPU, and OpenVINO (bf16 on CPUs with native bf16)
faster still, so `auto` prefers OpenVINO (`python -m benchmarks.engines` measures all three;
benchmarks/README.md gives the figures).
"""

from __future__ import annotations

from typing import Any

import torch

from model.devices import resolve_device
from model.engines.base import Engine, EngineOptions
from model.export import INPUT_NAME, OUTPUT_NAME, cached_onnx
from model.weights import ModelCard

CUDA_PROVIDER = "CUDAExecutionProvider"


def _pick_device(requested: str, providers: list[str]) -> str:
    """ "cpu" or "cuda:N" for the option, by model.devices' policy; "auto" falls back to the
    CPU where this onnxruntime build has no CUDA provider (an explicit cuda is refused)."""
    if requested == "auto":
        device = resolve_device("auto")
        return str(device) if device.type == "cuda" and CUDA_PROVIDER in providers else "cpu"
    device = resolve_device(requested)  # DeviceUnavailableError when the GPU is absent
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda" or CUDA_PROVIDER not in providers:
        raise ValueError(
            f"device {requested!r} needs onnxruntime-gpu and a visible GPU; this onnxruntime "
            f"offers {providers}"
        )
    return str(device)


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, model: torch.nn.Module, card: ModelCard, options: EngineOptions) -> None:
        super().__init__(model, card, options)
        import onnxruntime as ort

        self.check(options)
        self._device = _pick_device(options.device, ort.get_available_providers())
        self.model_path = cached_onnx(model, card.sha256, options.cache_dir)

        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # 0 means one thread per physical core, ONNX Runtime's own default. The batcher calls
        # `run` from one thread and the graph is a chain, so one inter-op thread is enough.
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
        providers: list[Any] = ["CPUExecutionProvider"]
        if self._device.startswith("cuda"):
            device_id = int(self._device.partition(":")[2] or 0)
            providers.insert(0, (CUDA_PROVIDER, {"device_id": device_id}))
        self.session = ort.InferenceSession(
            str(self.model_path), session_options, providers=providers
        )

    @classmethod
    def check(cls, options: EngineOptions) -> None:
        import onnxruntime as ort

        if options.precision not in ("auto", "fp32"):
            raise ValueError(
                f"the onnxruntime engine runs fp32 only, not {options.precision!r}: set the "
                "precision to auto or fp32 (the openvino engine runs bf16 and int8 on the CPU)"
            )
        _pick_device(options.device, ort.get_available_providers())

    @property
    def device(self) -> str:
        return self._device

    def run(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(logits)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "threads": self.options.threads or "one per physical core",
            "providers": self.session.get_providers(),
            "model_file": str(self.model_path),
        }
