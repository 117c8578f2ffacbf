"""The Open Inference Protocol's JSON objects (KServe "Predict Protocol - Version 2", REST).

Names and shapes follow the specification (kserve/kserve docs/predict-api/v2/required_api.md)
and Triton's binary tensor data and classification extensions. They parse inference requests
and document every /v2 route at /docs; responses are written from them too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# "$parameter = $string : $string | $number | $boolean". Strict types keep true a boolean
# and 1 an integer (lax parsing would turn true into 1 and 1 into true).
ParameterValue = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = dict[str, ParameterValue]


class ServerMetadata(BaseModel):
    """$metadata_server_response."""

    name: str = Field(description="A descriptive name for the server.")
    version: str = Field(description="The server version.")
    extensions: list[str] = Field(
        description="Protocol extensions supported: binary_tensor_data, classification."
    )


class MetadataTensor(BaseModel):
    """$metadata_tensor, with a description in `parameters` (an addition the protocol's
    JSON allows; clients that do not know it ignore it)."""

    name: str
    datatype: str = Field(description="Tensor data type: BYTES, UINT8, FP32, ...")
    shape: list[int] = Field(description="Dimensions; -1 for the batch (variable) dimension.")
    parameters: Parameters | None = None


class ModelMetadata(BaseModel):
    """$metadata_model_response. A request sends exactly one of the `inputs`."""

    name: str
    versions: list[str] = Field(description="First 12 hex digits of the weights' SHA-256.")
    platform: str = Field(description="<framework>_<format> of the engine that runs the model.")
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters | None = None


class RequestInput(BaseModel):
    """$request_input: the data comes in `data` (JSON) or, with the binary tensor data
    extension, as `parameters.binary_data_size` bytes after the JSON object."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = Field(
        None,
        description="Row-major elements, flat or nested. BYTES elements are strings: for "
        "the `image` input, each is a base64-encoded image file.",
    )


class RequestOutput(BaseModel):
    """$request_output: `binary_data` (bool) asks for the binary form; `classification`
    (integer k) asks for the top-k "score:index:label" strings instead of the tensor."""

    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    """$inference_request. `parameters.binary_data_output` (bool) asks for every output in
    the binary form unless an output says otherwise. Other parameters are ignored."""

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    """$response_output; with the binary form, `parameters.binary_data_size` replaces
    `data` and the bytes follow the JSON object."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    """$inference_response."""

    model_name: str
    model_version: str | None = None
    id: str | None = Field(None, description="The request's id, when it gave one.")
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class InferenceErrorResponse(BaseModel):
    """$inference_error_response (and the metadata error objects), with this service's
    machine-readable `code` beside the protocol's `error` message."""

    error: str = Field(description="What went wrong, for people.")
    code: str = Field(description="Stable, machine-readable reason.", examples=["not_an_image"])
