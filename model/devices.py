"""One home for the device and the floating-point precision, for training and serving alike.

Device policy (the same for `model.train`, `model.evaluate`, the benchmarks and the
service's torch and ONNX Runtime engines):

- "auto" (or None): the accelerator torch finds (`torch.accelerator`: CUDA, ROCm, XPU,
  MPS, ...) as its device 0; the CPU when there is none.
- "cpu": the CPU.
- anything else ("cuda", "cuda:1", "mps", ...): exactly that device, index 0 when none is
  given; `DeviceUnavailableError` when no accelerator of that type is present. Nothing
  falls back to the CPU silently: a run or a replica that asked for a GPU and would get a
  CPU is an error an operator needs to see, not a 10x slowdown to discover later.

Precisions are named as on the command line: "fp32", "bf16", "fp16" (torch.float32,
torch.bfloat16, torch.float16); fp32 means no autocast. "auto" is resolved by each caller,
because training and inference choose differently (see `model.train` and
`model.engines.torch_engine`); "int8" is not a torch dtype (OpenVINO quantization).
"""

from __future__ import annotations

import torch

# The floating-point precisions torch runs, by their command-line names.
PRECISION_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class DeviceUnavailableError(RuntimeError):
    """A device was asked for by name that this machine does not have."""


def resolve_device(requested: str | None = "auto") -> torch.device:
    """The torch device for `requested` ("auto" or None, "cpu", "cuda", "cuda:N", "mps", ...),
    by the module's one policy; an accelerator always gets an index ("cuda" -> cuda:0).

    Raises DeviceUnavailableError when `requested` names an accelerator type that is not
    present, and RuntimeError (torch's) for a name torch does not know.
    """
    if requested in (None, "auto"):
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        return torch.device("cpu") if accelerator is None else torch.device(accelerator.type, 0)
    device = torch.device(requested)
    if device.type == "cpu":
        return device
    present = torch.accelerator.current_accelerator(check_available=True)
    if present is None or present.type != device.type:
        found = "there is no accelerator here" if present is None else f"this has {present.type}"
        raise DeviceUnavailableError(
            f"device {requested!r} was asked for but {found}: use --device auto or cpu"
        )
    return device if device.index is not None else torch.device(device.type, 0)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype for a concrete precision: None for "fp32" (run plain fp32),
    torch.bfloat16 for "bf16", torch.float16 for "fp16".

    Raises ValueError for anything else ("auto" must be resolved by the caller first).
    """
    if precision not in PRECISION_DTYPES:
        raise ValueError(
            f"precision {precision!r} is not one torch runs: use one of "
            f"{', '.join(PRECISION_DTYPES)}"
        )
    dtype = PRECISION_DTYPES[precision]
    return None if dtype == torch.float32 else dtype
