"""Response models: they shape the JSON answers and document them at /docs."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ImageInfo(BaseModel):
    """What the service read from the upload, before preprocessing."""

    filename: str | None = Field(
        None, description="The upload's file name, if the client sent one."
    )
    format: str = Field(description="Container format as detected from the bytes, e.g. PNG.")
    mode: str = Field(description="Pixel mode before conversion to RGB, e.g. RGBA, P, I;16.")
    width: int = Field(description="Original width in pixels.")
    height: int = Field(description="Original height in pixels.")


class Timings(BaseModel):
    """Where the time went, in milliseconds."""

    decode_ms: float = Field(description="Decoding and preprocessing this image.")
    queue_ms: float = Field(description="Waiting in the queue until its batch started.")
    inference_ms: float = Field(description="The forward pass of the whole batch.")
    batch_size: int = Field(description="How many images shared that forward pass.")


class Prediction(BaseModel):
    label: str = Field(description="The most probable class.", examples=["cat"])
    probability: float = Field(description="Its probability.", examples=[0.93])
    probabilities: dict[str, float] = Field(
        description="Softmax probability of every class, in the model's class order."
    )
    model_version: str = Field(
        description="First 12 hex digits of the weights' SHA-256.", examples=["3f2a9c1b7d4e"]
    )
    image: ImageInfo
    timings: Timings


class BatchPrediction(BaseModel):
    predictions: list[Prediction] = Field(description="One prediction per file, in upload order.")


class Health(BaseModel):
    status: str = Field(
        description='"ready", or with status 503 "starting", "failed" or "draining".'
    )
    model_name: str | None = Field(description="null until the model is loaded.")
    model_version: str | None = Field(description="null until the model is loaded.")
    engine: str | None = Field(description="null until the engine is built.")
    device: str | None = Field(description="null until the engine is built.")
    precision: str | None = Field(
        description="What the engine runs: fp32, bf16, fp16 or int8 (auto resolved); null "
        "until the engine is built.",
        examples=["int8"],
    )
    mirror_tta: bool = Field(description="Each image is averaged with its mirror image.")
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    queue_depth: int = Field(description="Images waiting for a batch right now.")


class Liveness(BaseModel):
    status: str = Field("alive", description='"alive", or "failed" (503) if loading failed.')


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable reason.", examples=["not_an_image"])
    message: str = Field(description="What went wrong, for people.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
