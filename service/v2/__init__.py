"""The Open Inference Protocol (KServe v2 REST, as Triton, KServe, MLServer and OpenVINO
Model Server speak it), beside /predict: health, server and model metadata, and inference
with the binary tensor data and classification extensions. See service.v2.tensors for the
model's inputs and outputs."""

from service.v2.routes import router

__all__ = ["router"]
