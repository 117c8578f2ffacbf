"""The PyTorch engine: eager mode by default, with torch.compile and graphs as options.

On every device each BatchNorm that follows a convolution is folded into it, and the model
runs in channels_last: on the CPU the two together make a forward pass cheaper (fewer passes
over the activations; oneDNN's NHWC kernels), and cuDNN needs NHWC for its tensor-core
kernels.

On CUDA (any accelerator torch knows, through the device-agnostic `torch.accelerator` API):
images go to pinned host memory and are copied without blocking, the model runs under fp16
autocast (bf16 if asked), and optionally as torch.compile'd code or
replayed accelerator graphs, one per padded batch size.

On the CPU it runs fp32 by default: a plain CPU has no fast fp16 kernels, bf16 only pays
off with AMX/AVX512-BF16 (ask for it with precision=bf16 where the CPU has them), and this
small network is memory-light anyway, so fp32 costs nothing and matches training (up to
the float rounding of the folded BatchNorms, ~1e-7 relative).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx.experimental.optimization as fx_optimization

from model.devices import PRECISION_DTYPES, autocast_dtype, resolve_device
from model.engines.base import Engine, EngineOptions
from model.preprocessing import normalize
from model.weights import ModelCard

logger = logging.getLogger("service")


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of an eval-mode model with each conv->BatchNorm pair merged into one conv (the
    same function: BN's affine map is folded into the conv's weights and bias)."""
    try:
        return fx_optimization.fuse(model.eval())
    except Exception as error:  # a model FX cannot trace still runs, unfused
        logger.warning("BatchNorm folding skipped (%s): running the model as it is", error)
        return model


def _next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: torch.nn.Module, card: ModelCard, options: EngineOptions) -> None:
        super().__init__(model, card, options)
        if options.threads > 0:
            # Called from the inference thread (the service builds engines there), so the
            # OpenMP team it sizes is the one that runs every batch.
            torch.set_num_threads(options.threads)
        self.check(options)
        self._device = resolve_device(options.device)
        precision = options.precision
        if precision == "auto":
            # fp32 on the CPU (see the module docstring), fp16 autocast on an accelerator.
            precision = "fp32" if self._device.type == "cpu" else "fp16"
        self.precision = precision
        self._autocast_dtype = autocast_dtype(precision)
        # Two calls: torch's typed overloads of Module.to take memory_format only alone.
        self._model = fold_batch_norms(model).to(self._device).to(memory_format=torch.channels_last)
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self._model
        if options.compile:
            # dynamic=False: one specialised kernel set per batch size; sizes are padded to
            # powers of two (see _bucket) so only a handful get compiled during warm-up.
            self._forward = torch.compile(self._model, dynamic=False)
        self._use_graphs = options.cuda_graphs and self._device.type != "cpu"
        self._graphs: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._max_bucket = 0

    @classmethod
    def check(cls, options: EngineOptions) -> None:
        resolve_device(options.device)  # DeviceUnavailableError (a RuntimeError) if absent
        if options.precision not in ("auto", *PRECISION_DTYPES):
            raise ValueError(
                f"the torch engine runs fp32, bf16 or fp16, not {options.precision!r}: int8 is "
                "the openvino engine's"
            )

    @property
    def device(self) -> str:
        return str(self._device)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": self.device,
            "precision": self.precision,
            "compile": self.options.compile,
            "graphs": self._use_graphs,
        }

    def _compute(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images already on the device -> float32 logits on the device."""
        x = normalize(images).contiguous(memory_format=torch.channels_last)
        if self._autocast_dtype is None:
            return self._forward(x).float()
        # The autocast weight cache must be off while a graph is being captured.
        with torch.autocast(
            self._device.type, dtype=self._autocast_dtype, cache_enabled=not self._use_graphs
        ):
            return self._forward(x).float()

    def _bucket(self, n: int) -> int:
        """The batch size actually run: n itself in eager mode; with compiled code or graphs,
        the next power of two (at most the largest warmed-up size), so that only a few
        shapes ever need compiling or capturing."""
        if not (self.options.compile or self._use_graphs) or self._max_bucket == 0:
            return n
        return max(n, min(_next_power_of_two(n), self._max_bucket))

    @torch.inference_mode()
    def run(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        size = self._bucket(n)
        if size > n:
            padding = images.new_zeros((size - n, *images.shape[1:]))
            images = torch.cat([images, padding])
        if self._device.type == "cpu":
            return self._compute(images)[:n]
        # Pinned memory lets the host-to-device copy run asynchronously; the caching host
        # allocator reuses the pinned blocks, so this is not an allocation per batch.
        host = images.pin_memory()
        graph = self._graphs.get(size)
        if graph is not None:
            captured, static_input, static_output = graph
            static_input.copy_(host, non_blocking=True)
            captured.replay()
            return static_output[:n].cpu()
        logits = self._compute(host.to(self._device, non_blocking=True))
        return logits[:n].cpu()  # .cpu() waits for the device, so the result is complete

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        sizes = sorted(set(batch_sizes))
        if not sizes:
            return
        # Eager mode runs every size as it comes, so every size is warmed once (oneDNN and
        # cuDNN pick and cache kernels per shape on first use). Compiled code and graphs
        # pad to a few bucket sizes; those get two runs each, the first one compiling.
        runs = 1
        if self.options.compile or self._use_graphs:
            self._max_bucket = sizes[-1]
            sizes = sorted({self._bucket(n) for n in sizes})
            runs = 2
        for size in sizes:
            for _ in range(runs):
                self.run(torch.zeros(size, 3, 32, 32, dtype=torch.uint8))
        if self._use_graphs:
            for size in sizes:
                self._capture(size)

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        """Record one forward pass of `size` images as a replayable accelerator graph."""
        static_input = torch.zeros(size, 3, 32, 32, dtype=torch.uint8, device=self._device)
        stream = torch.Stream(self._device)
        # Graphs are captured on a side stream after warm-up runs on it (the documented
        # recipe: capture must not see first-use allocations or lazy initialisation).
        stream.wait_stream(torch.accelerator.current_stream(self._device))
        with stream:
            for _ in range(3):
                self._compute(static_input)
        torch.accelerator.current_stream(self._device).wait_stream(stream)
        pool = next(iter(self._graphs.values()))[0].pool() if self._graphs else None
        graph = torch.accelerator.Graph(pool=pool)
        with stream, graph:
            static_output = self._compute(static_input)
        torch.accelerator.synchronize(self._device)
        self._graphs[size] = (graph, static_input, static_output)
