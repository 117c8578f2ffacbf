"""LitServe serving the same model as the service: the peer baseline of the load benchmark.

    python -m benchmarks.litserve_server --port 8001                   # as the service would
    python -m benchmarks.load --compare litserve --no-mirror-tta       # both, side by side

LitServe (Lightning AI, `pip install -e '.[bench]'`) is a FastAPI-based serving framework
with dynamic batching in a separate inference worker process. This server gives it the
same work as `python -m service`, so that the load benchmark compares the serving code and
not the model:
- the same weights, checked by `model.weights.load_checked`, and the same engine built by
  `model.engines.create_engine` with the same options (`--engine auto` is OpenVINO on a
  CPU host; the same cached IR, at the same precision, int8 included);
- the same request: `POST /predict` with one multipart image in the field `file`, decoded
  by PIL and `model.preprocessing.image_to_tensor` (the service's resize rule);
- the same batching limits (LitServe's `max_batch_size` and `batch_timeout`, from
  `--max-batch-size` and `--max-wait-ms`), and mirror TTA when asked (`--mirror-tta`,
  the service's default; `--no-mirror-tta` for one forward pass per image);
- an answer with the label, its probability and every class's probability.
What it leaves out, as a minimal LitServe app does: the service's upload and pixel limits,
deadlines, queue limit, error envelopes, metrics, request logs and draining. Bad input
gets LitServe's own error answer.

`GET /health` is LitServe's readiness check (200 once the worker has loaded the model),
which the load benchmark waits for.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException
from PIL import Image

from model.inference import class_probabilities
from model.preprocessing import image_to_tensor

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ClassifierAPI(ls.LitAPI):
    """One image in, its class probabilities out; LitServe batches between the two.

    A module-level class: LitServe pickles the API into its inference worker process."""

    def __init__(self, options: argparse.Namespace) -> None:
        super().__init__(
            max_batch_size=options.max_batch_size, batch_timeout=options.max_wait_ms / 1000.0
        )
        self.options = options

    def setup(self, device: str) -> None:
        from model.engines import EngineOptions, create_engine
        from model.weights import load_checked

        options = self.options
        model, card = load_checked(options.weights_path)
        engine_options = EngineOptions(
            device=options.device,
            precision=options.precision,
            cache_dir=options.cache_dir.expanduser(),
            threads=options.threads,
        )
        self.engine = create_engine(options.engine, model, card, engine_options)
        # Every batch size may occur, as in the service's warm-up.
        self.engine.warm_up(range(1, options.max_batch_size + 1))
        self.classes = card.classes

    # `request` is left unannotated on purpose: LitServe reads this annotation to choose how
    # to parse the body, and none means "the form (multipart) or JSON as it came".
    def decode_request(self, request, **kwargs: Any) -> torch.Tensor:  # type: ignore[no-untyped-def,unused-ignore]
        upload = request.get("file") if hasattr(request, "get") else None
        if upload is None or not hasattr(upload, "file"):
            raise HTTPException(400, "send one image as the multipart field 'file'")
        try:
            with Image.open(io.BytesIO(upload.file.read())) as image:
                return image_to_tensor(image)
        except (OSError, ValueError) as error:  # PIL's errors for undecodable bytes
            raise HTTPException(400, f"not a decodable image: {error}") from None

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.ndim == 3:  # max_batch_size 1: LitServe passes the one image unbatched
            return self.predict(x[None], **kwargs)[0]
        return class_probabilities(self.engine.run, x, mirror_tta=self.options.mirror_tta)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output)

    def encode_response(self, output: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        probabilities = dict(zip(self.classes, output.tolist(), strict=True))
        label = max(probabilities, key=probabilities.__getitem__)
        return {"label": label, "probability": probabilities[label], "probabilities": probabilities}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The service's flag names, so the load benchmark passes both servers the same flags.
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--weights-path", type=Path, default=PROJECT_ROOT / "weights/resnet56.safetensors"
    )
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--mirror-tta", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("~/.cache/resnet-cifar10/engines"))
    parser.add_argument("--log-level", default="warning")
    parser.add_argument(
        "--fast-queue",
        action="store_true",
        help="LitServe's ZeroMQ response queue (LitServer(fast_queue=True))",
    )
    args = parser.parse_args(argv)

    server = ls.LitServer(
        ClassifierAPI(args),
        accelerator="cpu",
        devices=1,
        workers_per_device=1,  # one inference worker, as the service's one inference thread
        fast_queue=args.fast_queue,
    )
    server.run(
        host=args.host,
        port=args.port,
        num_api_servers=1,
        log_level=args.log_level,
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
