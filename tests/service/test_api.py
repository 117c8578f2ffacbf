"""Every endpoint through the in-process app: answers, health, metrics, request ids, docs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from model.preprocessing import CIFAR10_CLASSES
from model.weights import sha256_of
from service.app import create_app
from tests.support.images import image_bytes, noise_image, png
from tests.support.reference import reference_probabilities
from tests.support.service import metric, running, settings_for


def test_predict_answers_label_probabilities_version_size_and_timings(
    client: TestClient, weights_file: Path
) -> None:
    image = noise_image(50, 40, seed=21)
    response = client.post("/predict", files={"file": ("cat.png", image_bytes(image, "PNG"))})
    assert response.status_code == 200
    body = response.json()
    assert list(body["probabilities"]) == list(CIFAR10_CLASSES)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["probability"] == body["probabilities"][body["label"]]
    assert body["model_version"] == sha256_of(weights_file)[:12]
    assert body["image"] == {
        "filename": "cat.png",
        "format": "PNG",
        "mode": "RGB",
        "width": 50,
        "height": 40,
    }
    timings = body["timings"]
    assert timings["batch_size"] == 1  # the only request in flight
    assert timings["decode_ms"] > 0 and timings["inference_ms"] > 0 and timings["queue_ms"] >= 0
    [expected] = reference_probabilities(weights_file, [image])
    np.testing.assert_allclose(list(body["probabilities"].values()), expected, rtol=1e-4)


def test_predict_batch_answers_in_upload_order(client: TestClient, weights_file: Path) -> None:
    images = [noise_image(30 + i, 34, seed=100 + i) for i in range(4)]
    files = [("files", (f"{i}.png", image_bytes(im, "PNG"))) for i, im in enumerate(images)]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["image"]["filename"] for p in predictions] == ["0.png", "1.png", "2.png", "3.png"]
    expected = reference_probabilities(weights_file, images)
    for prediction, row in zip(predictions, expected, strict=True):
        np.testing.assert_allclose(list(prediction["probabilities"].values()), row, rtol=1e-4)


def test_an_image_and_its_mirror_image_get_the_same_answer(
    client: TestClient, weights_file: Path
) -> None:
    """mirror_tta is on by default: each image is averaged with its mirror image."""
    image = noise_image(32, 32, seed=5)
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    answers = [
        client.post("/predict", files={"file": ("a.png", image_bytes(im, "PNG"))}).json()
        for im in (image, mirror)
    ]
    np.testing.assert_allclose(
        list(answers[0]["probabilities"].values()),
        list(answers[1]["probabilities"].values()),
        rtol=1e-5,
    )
    # The model alone tells the two apart, so the check above can fail.
    plain = reference_probabilities(weights_file, [image, mirror], mirror_tta=False)
    assert not np.allclose(plain[0], plain[1], rtol=1e-3)
    assert client.get("/health").json()["mirror_tta"] is True


def test_without_mirror_tta_the_plain_model_answers(weights_file: Path) -> None:
    image = noise_image(40, 36, seed=6)

    async def scenario() -> None:
        async with running(create_app(settings_for(weights_file, mirror_tta=False))) as client:
            assert (await client.get("/health")).json()["mirror_tta"] is False
            files = {"file": ("a.png", image_bytes(image, "PNG"))}
            body = (await client.post("/predict", files=files)).json()
        [plain] = reference_probabilities(weights_file, [image], mirror_tta=False)
        [mirrored] = reference_probabilities(weights_file, [image])
        np.testing.assert_allclose(list(body["probabilities"].values()), plain, rtol=1e-4)
        assert not np.allclose(plain, mirrored, rtol=1e-3)

    asyncio.run(scenario())


def test_batch_without_files(client: TestClient) -> None:
    response = client.post("/predict/batch", files={"file": ("a.png", png())})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "missing_file"


def test_health_reports_ready_with_model_and_batch_settings(
    client: TestClient, weights_file: Path
) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["model_version"] == sha256_of(weights_file)[:12]
    assert body["model_name"] == "resnet8"
    assert (body["engine"], body["device"], body["precision"]) == ("torch", "cpu", "fp32")
    assert (body["max_batch_size"], body["max_wait_ms"]) == (8, 20)
    assert client.get("/health/live").json() == {"status": "alive"}
    engine = {"engine": "torch", "device": "cpu", "precision": "fp32"}
    assert metric(client.get("/metrics").text, "inference_engine_info", **engine) == 1


def test_unknown_route_and_wrong_method_use_the_error_shape(client: TestClient) -> None:
    assert client.get("/nope").json()["error"]["code"] == "not_found"
    response = client.get("/predict")
    assert (response.status_code, response.json()["error"]["code"]) == (405, "method_not_allowed")


def test_request_id_is_echoed_or_created(client: TestClient) -> None:
    echoed = client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    created = client.get("/health/live")
    assert len(created.headers["x-request-id"]) == 32
    forged = client.get("/health/live", headers={"X-Request-ID": 'x" status=200 evil'})
    assert forged.headers["x-request-id"] != 'x" status=200 evil'
    errors = client.post("/predict", files={"file": ("a", b"")})
    assert "x-request-id" in errors.headers


def test_one_structured_log_line_per_request(client: TestClient, caplog) -> None:
    with caplog.at_level("INFO", logger="service.access"):
        client.get("/health/live", headers={"X-Request-ID": "log-me"})
    [record] = [r for r in caplog.records if r.name == "service.access"]
    fields = record.fields
    assert fields["request_id"] == "log-me"
    assert (fields["status"], fields["route"], fields["method"]) == (200, "/health/live", "GET")
    assert fields["latency_ms"] >= 0
    json.dumps(fields)  # serialisable as one JSON line


def test_metrics_move_as_requests_are_served(client: TestClient) -> None:
    before = client.get("/metrics").text
    for seed in range(3):
        assert client.post("/predict", files={"file": ("a.png", png(seed))}).status_code == 200
    assert client.post("/predict", files={"file": ("a", b"")}).status_code == 400
    after = client.get("/metrics").text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    ok = {"route": "/predict", "method": "POST", "status": "200"}
    assert grew("http_requests_total", **ok) == 3
    assert grew("http_requests_total", route="/predict", method="POST", status="400") == 1
    assert grew("http_request_duration_seconds_count", route="/predict") == 4
    assert grew("inference_queue_wait_seconds_count") == 3
    assert grew("inference_batch_size_sum") == 3
    # One request at a time (each waits for its answer): one batch each.
    assert grew("inference_batch_size_count") == 3
    assert grew("inference_batch_duration_seconds_count") == 3
    assert "inference_queue_depth 0.0" in after
    assert "inference_pending_images 0.0" in after
    assert "process_resident_memory_bytes" in after


def test_openapi_documents_routes_and_models(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Prediction"
    }
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert {"/predict", "/predict/batch", "/health", "/health/live", "/metrics"} <= set(
        spec["paths"]
    )


def test_draining_turns_health_503_and_refuses_new_predictions(weights_file: Path) -> None:
    async def scenario() -> None:
        app = create_app(settings_for(weights_file, max_batch_size=2))
        async with running(app) as client:
            assert (await client.get("/health")).status_code == 200
            assert await app.state.service.drain(timeout_s=5)
            health = await client.get("/health")
            assert (health.status_code, health.json()["status"]) == (503, "draining")
            refused = await client.post("/predict", files={"file": ("a.png", png())})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["retry-after"] == "1"
            assert (await client.get("/health/live")).status_code == 200

    asyncio.run(scenario())
