"""The service's settings: one pydantic-settings class, read from flags and the environment.

Every field can be set as an environment variable with the `SERVICE_` prefix
(`SERVICE_MAX_BATCH_SIZE=32`) or, with `python -m service`, as a kebab-case flag
(`--max-batch-size 32`); a flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.engines import engine_device_problem, engine_precision_problem

# The folder above service/, so the default weights path works from a checkout and from the
# container alike, whatever the working directory.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

EngineName = Literal["auto", "torch", "onnxruntime", "openvino"]
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
LogLevel = Literal["debug", "info", "warning", "error"]

# What a browser sends in its Origin header (RFC 6454): scheme://host[:port], nothing after.
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.-]*://[^/?#\sA-Z]+$")


class Settings(BaseSettings):
    """Everything an operator may tune; the defaults suit one GPU or a small CPU box."""

    model_config = SettingsConfigDict(
        env_prefix="SERVICE_",
        cli_kebab_case=True,
        cli_prog_name="python -m service",
        # Boolean flags read naturally: `--compile` / `--no-compile`.
        cli_implicit_flags=True,
        frozen=True,
    )

    host: str = Field("0.0.0.0", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    weights_path: Path = Field(
        PROJECT_ROOT / "weights" / "resnet56.safetensors",
        description="safetensors weights; the model card (.json) must sit beside them.",
    )
    engine: EngineName = Field(
        "auto", description="Inference engine; auto picks the fastest one installed."
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.",
    )
    precision: Precision = Field(
        "auto",
        description="auto: fp16 on CUDA; on the CPU fp32 (torch, onnxruntime) or the CPU's "
        "native bf16 (openvino on AMX or AVX512-BF16 CPUs); or force fp32, bf16, fp16; int8: "
        "the model quantized by NNCF on the calibration images (openvino engine, CPU).",
    )
    calibration_path: Path = Field(
        PROJECT_ROOT / "weights" / "cifar10-calibration.safetensors",
        description="Calibration images for precision int8 (made by python -m "
        "model.calibration), read on the first start for given weights.",
    )
    max_batch_size: int = Field(
        64, ge=1, le=1024, description="Most images in one forward pass; 1 turns batching off."
    )
    max_wait_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="Longest a batch waits for more images after its first one (only while "
        "more admitted requests are still being read or decoded).",
    )
    queue_size: int = Field(
        256,
        ge=1,
        description="Most images admitted and not yet answered; beyond it requests get 429.",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="Deadline for a request from arrival to answer; then 504."
    )
    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Largest request body accepted; beyond it 413."
    )
    max_pixels: int = Field(
        25_000_000,
        ge=1,
        description="Largest image (width x height, read from its header); beyond it 413.",
    )
    max_files: int = Field(
        64, ge=1, description="Most files in one /predict/batch request, images in one /v2 request."
    )
    mirror_tta: bool = Field(
        True,
        description="Average each image's logits with its mirror image's: two forward passes "
        "per image, for higher accuracy (the model card, weights/MODEL_CARD.md, gives it).",
    )
    decode_threads: int = Field(
        1, ge=1, le=64, description="Threads decoding images larger than thumbnails."
    )
    inline_decode_max_pixels: int = Field(
        4096,
        ge=0,
        le=65_536,
        description="PNGs and JPEGs of at most this many pixels (and 4 bytes a pixel plus "
        "4 KiB) decode on the event loop, where they cost less than the hand-over to a "
        "decode thread; 0: every image goes to the decode threads.",
    )
    threads: int = Field(
        0, ge=0, description="CPU threads for the engine (0: one per core, the library default)."
    )
    compile: bool = Field(False, description="torch.compile the model (torch engine).")
    cuda_graphs: bool = Field(
        False, description="Capture CUDA graphs per batch size (torch engine on CUDA)."
    )
    cache_dir: Path = Field(
        Path("~/.cache/resnet-cifar10/engines"),
        description="Where engines keep exported models, keyed by the weights' SHA-256.",
    )
    shutdown_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait for accepted requests to finish on SIGTERM."
    )
    log_level: LogLevel = Field("info", description="Log level for the service and uvicorn.")
    # NoDecode: the environment variable is read as comma-separated text, like the flag
    # (pydantic-settings would otherwise expect JSON for a list).
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Origins (scheme://host[:port], comma-separated, or * for any) whose "
        "pages may call the API from a browser (CORS); empty: only the service's own page.",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # A repeated flag arrives joined with commas too.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        # The browser's Origin header is compared as an exact string, so a trailing slash
        # or a path would silently match nothing: refuse it instead.
        for origin in origins:
            if origin != "*" and not _ORIGIN.match(origin):
                raise ValueError(
                    f"{origin!r} is not an origin; write scheme://host[:port] in lower case, "
                    "with no path or trailing slash (e.g. https://app.example.com), or *"
                )
        if "*" in origins and len(origins) > 1:
            raise ValueError("* already allows every origin; list no other origin beside it")
        return origins

    @field_validator("precision")
    @classmethod
    def _engine_runs_precision(cls, precision: str, info: ValidationInfo) -> str:
        """Refuse a precision the chosen engine and device cannot run, before anything is
        loaded (`python -m service` then exits with status 2 and this one line)."""
        engine, device = info.data.get("engine", "auto"), info.data.get("device", "auto")
        problem = engine_precision_problem(engine, device, precision)
        if problem is not None:
            raise PydanticCustomError("precision_engine", problem)
        return precision

    @model_validator(mode="after")
    def _engine_runs_on_device(self) -> Settings:
        """Refuse a device the chosen engine cannot run on (openvino on cuda). After the
        fields, so that a precision refused on that device is reported as such first."""
        problem = engine_device_problem(self.engine, self.device)
        if problem is not None:
            raise PydanticCustomError("device_engine", problem)
        return self
