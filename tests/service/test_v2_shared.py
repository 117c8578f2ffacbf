"""/v2 and /predict share one service: one batcher (a v2 request of N images is N items in
its batches), one queue limit (429 with Retry-After), the drain (503) and the metrics."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.app import create_app
from service.errors import ApiError
from service.v2.tensors import decode_request
from tests.support.images import png
from tests.support.service import gated_factory, metric, running, settings_for

INFER = "/v2/models/resnet8/infer"


def _image_request(*files: bytes) -> tuple[bytes, dict[str, str]]:
    """An inference request for the `image` input in binary form, as tritonclient builds it."""
    raw = b"".join(len(f).to_bytes(4, "little") + f for f in files)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(files)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


async def _post_v2(client: httpx.AsyncClient, *files: bytes) -> httpx.Response:
    body, headers = _image_request(*files)
    return await client.post(INFER, content=body, headers=headers)


async def _wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.01)


def test_v2_images_share_batches_with_predict(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=8, max_wait_ms=200)
    factory, engine = gated_factory(settings)

    async def scenario() -> tuple[list[httpx.Response], str]:
        app = create_app(settings, factory)
        async with running(app) as client:
            engine().gate.clear()
            engine().started.clear()
            blocker = asyncio.create_task(client.post("/predict", files={"file": ("a", png(0))}))
            await asyncio.to_thread(engine().started.wait, 10)  # one batch holds the engine
            engine().batches.clear()
            waiting = [
                asyncio.create_task(_post_v2(client, png(1), png(2), png(3))),
                asyncio.create_task(client.post("/predict", files={"file": ("b", png(4))})),
            ]
            await _wait_until(lambda: app.state.service.batcher.depth == 4)
            engine().gate.set()
            responses = [await blocker, *await asyncio.gather(*waiting)]
            return responses, (await client.get("/metrics")).text

    responses, metrics = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200, 200, 200]
    # The running batch of 1 (and its mirror images), then the three v2 images and the
    # /predict image together in one batch of 4 (twice: itself, then mirrored).
    assert engine().batches == [1, 1, 4, 4]
    assert responses[1].json()["outputs"][0]["shape"] == [3, 10]
    assert metric(metrics, "inference_batch_size_sum") == 5
    assert (
        metric(
            metrics,
            "http_requests_total",
            route=INFER.replace("resnet8", "{model_name}"),
            method="POST",
            status="200",
        )
        == 1
    )


def test_v2_counts_against_the_queue_limit_with_retry_after(weights_file: Path) -> None:
    settings = settings_for(weights_file, max_batch_size=1, queue_size=3)
    factory, engine = gated_factory(settings)

    async def scenario() -> None:
        app = create_app(settings, factory)
        async with running(app) as client:
            engine().gate.clear()
            held = [
                asyncio.create_task(client.post("/predict", files={"file": ("a", png(i))}))
                for i in range(2)
            ]
            await _wait_until(lambda: app.state.service.pending == 2)
            refused = await _post_v2(client, png(5), png(6))  # 2 + 2 images > 3
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["code"] == "overloaded"
            assert "limit 3" in refused.json()["error"]
            engine().gate.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert (await _post_v2(client, png(5), png(6))).status_code == 200
            assert app.state.service.pending == 0  # every place was given back

    asyncio.run(scenario())


def test_draining_refuses_v2_with_503_and_turns_v2_readiness_false(weights_file: Path) -> None:
    async def scenario() -> None:
        app = create_app(settings_for(weights_file))
        async with running(app) as client:
            assert (await client.get("/v2/health/ready")).status_code == 200
            assert (await client.get("/v2/models/resnet8/ready")).status_code == 200
            assert await app.state.service.drain(timeout_s=5)
            ready = await client.get("/v2/health/ready")
            assert (ready.status_code, ready.content) == (400, b"")  # the protocol's "false"
            assert (await client.get("/health")).status_code == 503  # the same truth
            assert (await client.get("/v2/models/resnet8/ready")).status_code == 400
            assert (await client.get("/v2/health/live")).status_code == 200
            refused = await _post_v2(client, png(1))
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["code"] == "shutting_down"

    asyncio.run(scenario())


def test_v2_body_past_max_upload_bytes_is_413_and_protocol_shaped(weights_file: Path) -> None:
    async def scenario() -> None:
        app = create_app(settings_for(weights_file, max_upload_bytes=10_000))
        async with running(app) as client:
            response = await _post_v2(client, png(1, width=200, height=200))
            assert response.status_code == 413
            assert set(response.json()) == {"error", "code"}
            assert "exceeds 10000 bytes" in response.json()["error"]
            unknown = await client.get("/v2/nothing/here")
            assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
            # /predict keeps its own envelope
            predict = await client.post("/predict", files={"file": ("a", b"")})
            assert isinstance(predict.json()["error"], dict)
            assert app.state.service.pending == 0

    asyncio.run(scenario())


def test_json_pixels_out_of_range_and_wrong_types_are_400(weights_file: Path) -> None:
    pixels = np.zeros((1, 32, 32, 3), dtype=np.int64)

    def request(name: str, datatype: str, data: Any, shape: list[int]) -> dict[str, Any]:
        return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}

    async def scenario() -> None:
        app = create_app(settings_for(weights_file))
        async with running(app) as client:
            cases = [
                (request("pixels", "UINT8", (pixels + 256).tolist(), [1, 32, 32, 3]), "0..255"),
                (request("pixels", "UINT8", [0.5] * 3072, [1, 32, 32, 3]), "integers only"),
                (request("pixels", "UINT8", [1] * 10, [1, 32, 32, 3]), "holds 10 elements"),
                (request("pixels", "UINT8", [[1, 2], [3]], [1, 32, 32, 3]), "not a regular"),
                (request("normalized_pixels", "FP32", [9.0] * 3072, [1, 3, 32, 32]), "normalise"),
                (request("image", "BYTES", ["%%%"], [1]), "not base64"),
                (request("image", "BYTES", ["AAAA"], [0]), "at least one image"),
                ({"inputs": []}, "inputs"),
                (
                    {
                        **request("image", "BYTES", ["AAAA"], [1]),
                        "outputs": [
                            {"name": "probabilities", "parameters": {"classification": 11}}
                        ],
                    },
                    "between 1 and 10",
                ),
                (
                    {**request("image", "BYTES", ["AAAA"], [1]), "outputs": [{"name": "logits"}]},
                    "no output 'logits'",
                ),
            ]
            for body, expected in cases:
                response = await client.post(INFER, json=body)
                assert response.status_code == 400, (body, response.text)
                assert expected in response.json()["error"], response.text
            assert app.state.service.pending == 0

    asyncio.run(scenario())


def test_a_non_ascii_header_length_is_400_not_a_crash() -> None:
    """'²' passes str.isdigit() but int() refuses it."""
    with pytest.raises(ApiError) as caught:
        decode_request(b"{}", "\u00b2", max_images=2, num_classes=10)
    assert caught.value.status_code == 400
