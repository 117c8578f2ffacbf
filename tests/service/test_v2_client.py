"""The Open Inference Protocol (/v2) as Triton's own client sees it: tritonclient.http against
the service on a real socket. The client is not this project's code; it is what users run.

Each input form travels both ways the protocol allows (binary tensor data and JSON) and must
give exactly what /predict gives the same image (one engine, torch fp32, in both cases)."""

from __future__ import annotations

import base64
import functools
import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from model.preprocessing import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, image_to_tensor
from model.weights import sha256_of
from service.app import create_app
from tests.support.images import image_bytes, noise_image
from tests.support.reference import reference_probabilities
from tests.support.server import serving
from tests.support.service import settings_for

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat.png"
MAX_FILES = 4


@pytest.fixture(scope="module")
def server(weights_file: Path) -> Iterator[str]:
    settings = settings_for(weights_file, max_files=MAX_FILES, max_upload_bytes=2_000_000)
    with serving(create_app(settings)) as address:
        yield address


@pytest.fixture
def client(server: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(server) as triton_client:
        yield triton_client


@pytest.fixture(scope="module")
def model(weights_file: Path) -> tuple[str, str]:
    """The model's name and version, as the model card and the weights' bytes say."""
    return weights_file.stem, sha256_of(weights_file)[:12]


def _predict(server: str, data: bytes) -> list[float]:
    """What /predict answers for the same file, from the same server."""
    response = httpx.post(f"http://{server}/predict", files={"file": ("x.png", data)}, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json()["probabilities"].values())


def _images(count: int) -> list[Image.Image]:
    return [noise_image(40 + i, 36, seed=300 + i) for i in range(count)]


def _bytes_input(files: list[bytes], *, binary: bool) -> triton.InferInput:
    """Encoded files as the BYTES input: raw in binary form, base64 text in JSON."""
    tensor = triton.InferInput("image", [len(files)], "BYTES")
    elements = files if binary else [base64.b64encode(f) for f in files]
    tensor.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    return tensor


def _pixels(images: list[Image.Image]) -> np.ndarray:
    """uint8 [N, 32, 32, 3]: each image preprocessed as the service would, HWC."""
    return np.stack([image_to_tensor(im).permute(1, 2, 0).numpy() for im in images])


def _normalized(pixels: np.ndarray) -> np.ndarray:
    """float32 [N, 3, 32, 32], (x / 255 - mean) / std, as torchvision's Normalize makes it."""
    chw = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255
    mean = np.array(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return (chw - mean) / std


def _error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


# --- health and metadata -----------------------------------------------------------------


def test_health_server_metadata_and_model_readiness(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    name, version = model
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(name)
    assert client.is_model_ready(name, version)
    assert not client.is_model_ready(name, "0" * 12)
    assert not client.is_model_ready("resnet1000")
    metadata = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(metadata["extensions"])
    assert metadata["name"] and metadata["version"]


def test_model_metadata_states_inputs_outputs_version_and_normalisation(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    name, version = model
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name
    assert metadata["versions"] == [version]
    tensors = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert tensors == {
        "image": ("BYTES", [-1]),
        "pixels": ("UINT8", [-1, 32, 32, 3]),
        "normalized_pixels": ("FP32", [-1, 3, 32, 32]),
    }
    [output] = metadata["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [-1, 10],
    )
    descriptions = {t["name"]: t["parameters"]["description"] for t in metadata["inputs"]}
    assert str(list(CIFAR10_MEAN)) in descriptions["normalized_pixels"]
    assert str(list(CIFAR10_STD)) in descriptions["normalized_pixels"]
    assert "base64" in descriptions["image"]
    assert metadata["parameters"]["classes"] == ",".join(CIFAR10_CLASSES)
    assert client.get_model_metadata(name, version) == metadata


# --- inference: every input form, binary and JSON ------------------------------------------


def test_cat_round_trip_matches_predict(
    client: triton.InferenceServerClient, server: str, model: tuple[str, str]
) -> None:
    """The bar: Triton's client on examples/cat.png answers what /predict answers."""
    data = CAT.read_bytes()
    result = client.infer(model[0], [_bytes_input([data], binary=True)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (1, 10)
    np.testing.assert_allclose(probabilities[0], _predict(server, data), rtol=0, atol=1e-5)
    response = result.get_response()
    assert (response["model_name"], response["model_version"]) == model


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary-input", "json-input"])
@pytest.mark.parametrize("binary_output", [True, False], ids=["binary-output", "json-output"])
def test_encoded_images_give_what_predict_gives(
    client: triton.InferenceServerClient,
    server: str,
    model: tuple[str, str],
    binary_input: bool,
    binary_output: bool,
) -> None:
    files = [image_bytes(im, "PNG") for im in _images(2)] + [
        image_bytes(_images(3)[2], "JPEG", quality=90)
    ]
    result = client.infer(
        model[0],
        [_bytes_input(files, binary=binary_input)],
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=binary_output)],
        request_id="r-17",
    )
    assert result.get_response()["id"] == "r-17"
    has_binary = "parameters" in result.get_output("probabilities")
    assert has_binary == binary_output
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    for row, data in zip(probabilities, files, strict=True):
        np.testing.assert_allclose(row, _predict(server, data), rtol=0, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_pixel_tensors_give_what_the_model_gives_those_pixels(
    client: triton.InferenceServerClient, weights_file: Path, model: tuple[str, str], binary: bool
) -> None:
    images = _images(3)
    expected = reference_probabilities(weights_file, images)
    pixels = _pixels(images)
    uint8 = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    uint8.set_data_from_numpy(pixels, binary_data=binary)
    normalized = _normalized(pixels)
    fp32 = triton.InferInput("normalized_pixels", list(normalized.shape), "FP32")
    fp32.set_data_from_numpy(normalized, binary_data=binary)
    answers = [
        client.infer(model[0], [tensor]).as_numpy("probabilities") for tensor in (uint8, fp32)
    ]
    for answer in answers:
        np.testing.assert_allclose(answer, expected, rtol=1e-4, atol=1e-6)
    # The same pixels as UINT8 or as normalised FP32 reach the engine as the same batch.
    np.testing.assert_array_equal(answers[0], answers[1])


def test_classification_extension_gives_top_k_score_index_label(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    files = [image_bytes(im, "PNG") for im in _images(2)]
    for binary in (True, False):
        result = client.infer(
            model[0],
            [_bytes_input(files, binary=True)],
            outputs=[triton.InferRequestedOutput("probabilities", binary, class_count=3)],
        )
        top = result.as_numpy("probabilities")
        assert top.shape == (2, 3)
        plain = client.infer(model[0], [_bytes_input(files, binary=True)]).as_numpy("probabilities")
        for row, probabilities in zip(top, plain, strict=True):
            entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in row]
            indices = [int(index) for _, index, _ in entries]
            assert indices == list(np.argsort(-probabilities, kind="stable")[:3])
            for score, index, label in entries:
                assert label == CIFAR10_CLASSES[int(index)]
                assert np.float32(score) == probabilities[int(index)]


def test_a_request_by_version(client: triton.InferenceServerClient, model: tuple[str, str]) -> None:
    name, version = model
    files = [CAT.read_bytes()]
    by_version = client.infer(name, [_bytes_input(files, binary=True)], model_version=version)
    assert by_version.get_response()["model_version"] == version
    latest = client.infer(name, [_bytes_input(files, binary=True)])
    np.testing.assert_array_equal(
        by_version.as_numpy("probabilities"), latest.as_numpy("probabilities")
    )


# --- errors, as the client reports them -----------------------------------------------------


def test_unknown_model_and_version_are_404(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    name, version = model
    tensor = _bytes_input([CAT.read_bytes()], binary=True)
    error = _error(lambda: client.infer("resnet1000", [tensor]))
    assert error.status() == "404" and "unknown model 'resnet1000'" in error.message()
    error = _error(lambda: client.infer(name, [tensor], model_version="abc"))
    assert error.status() == "404" and "no version 'abc'" in error.message()
    assert version in error.message()
    error = _error(lambda: client.get_model_metadata("resnet1000"))
    assert error.status() == "404"


def test_wrong_datatype_shape_and_input_name_are_400(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    pixels = _pixels(_images(1))
    cases = {
        "has datatype UINT8, not 'FP32'": ("pixels", pixels.astype(np.float32)),
        "has shape [N, 32, 32, 3], not [1, 32, 32, 4]": (
            "pixels",
            np.concatenate([pixels, pixels[..., :1]], axis=3),
        ),
        "has shape [N, 3, 32, 32], not [1, 32, 32, 3]": (
            "normalized_pixels",
            pixels.astype(np.float32),
        ),
        "the model has no input 'images'": ("images", pixels),
    }
    for expected, (name, array) in cases.items():
        datatype = "FP32" if array.dtype == np.float32 else "UINT8"
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        error = _error(functools.partial(client.infer, model[0], [tensor]))
        assert error.status() == "400", error
        assert expected in error.message(), error.message()


def test_more_than_max_files_images_is_400(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    files = [image_bytes(im, "PNG") for im in _images(MAX_FILES + 1)]
    error = _error(lambda: client.infer(model[0], [_bytes_input(files, binary=True)]))
    assert error.status() == "400"
    assert f"at most {MAX_FILES} images" in error.message()


def test_undecodable_image_gets_the_predict_status_and_names_the_element(
    client: triton.InferenceServerClient, model: tuple[str, str]
) -> None:
    files = [CAT.read_bytes(), b"this is no image"]
    error = _error(lambda: client.infer(model[0], [_bytes_input(files, binary=True)]))
    assert error.status() == "415"  # what /predict answers for the same bytes
    assert error.message().startswith("image[1]: the file is not an image")
    # In JSON a BYTES element is text: an image must come as base64, not as it is.
    text = triton.InferInput("image", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"<svg>a cat</svg>"], dtype=np.object_), binary_data=False)
    error = _error(lambda: client.infer(model[0], [text]))
    assert error.status() == "400" and "image[0]: not base64" in error.message()


def test_bad_binary_lengths_are_400(server: str, model: tuple[str, str]) -> None:
    """The client's own body with its binary part cut short or its header length wrong."""
    pixels = _pixels(_images(1))
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor])
    url = f"http://{server}/v2/models/{model[0]}/infer"
    for content, header, expected in [
        (body[:-5], json_size, "bytes after the JSON object"),
        (body, len(body) + 1, "Inference-Header-Content-Length"),
        (body, "twelve", "Inference-Header-Content-Length"),
    ]:
        response = httpx.post(
            url, content=content, headers={"Inference-Header-Content-Length": str(header)}
        )
        assert response.status_code == 400
        assert expected in response.json()["error"]
    header = json.loads(body[:json_size])
    header["inputs"][0]["parameters"]["binary_data_size"] = pixels.nbytes - 1
    edited = json.dumps(header).encode()
    response = httpx.post(
        url,
        content=edited + pixels.tobytes()[:-1],
        headers={"Inference-Header-Content-Length": str(len(edited))},
    )
    assert response.status_code == 400
    assert "the shape and datatype need 3072" in response.json()["error"]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_undone_within_the_size_limit(
    client: triton.InferenceServerClient, server: str, model: tuple[str, str], algorithm: str
) -> None:
    data = CAT.read_bytes()
    result = client.infer(
        model[0], [_bytes_input([data], binary=True)], request_compression_algorithm=algorithm
    )
    np.testing.assert_allclose(
        result.as_numpy("probabilities")[0], _predict(server, data), atol=1e-5
    )
    # 3 MB of zeros compress to a few kB, but expand past max_upload_bytes (2 MB): refused.
    bomb = gzip.compress(b"{" + b" " * 3_000_000 + b"}")
    url = f"http://{server}/v2/models/{model[0]}/infer"
    response = httpx.post(url, content=bomb, headers={"Content-Encoding": "gzip"})
    assert response.status_code == 413 and "decompressed" in response.json()["error"]
    response = httpx.post(url, content=b"{}", headers={"Content-Encoding": "br"})
    assert response.status_code == 415
