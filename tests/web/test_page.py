"""The demo page at `/`, used the way a person uses it, in headless chromium."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, FilePayload, Page, Route, expect

from model.preprocessing import CIFAR10_CLASSES, image_to_tensor
from tests.support.tools import PROJECT_ROOT

CAT = PROJECT_ROOT / "examples" / "cat.png"
# Written by every run of test_a_cat_chosen_with_the_keyboard_is_classified; docs/api.md
# shows it, so a change to the page shows up in the picture (commit the new one).
SCREENSHOT = PROJECT_ROOT / "docs" / "demo.png"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _file(name: str, data: bytes, mime: str = "image/png") -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": data}


def _seen_by_the_page(page: Page, index: int) -> np.ndarray:
    """The 32x32 RGB pixels the page drew as "as the model saw it", shape (32, 32, 3)."""
    rgba = page.evaluate(
        """index => {
            const canvas = document.querySelectorAll("article.result canvas")[index];
            return Array.from(canvas.getContext("2d").getImageData(0, 0, 32, 32).data);
        }""",
        index,
    )
    return np.array(rgba, dtype=np.int16).reshape(32, 32, 4)[:, :, :3]


def _seen_by_the_model(data: bytes) -> np.ndarray:
    """What the service feeds the model (model/preprocessing.py), shape (32, 32, 3)."""
    with Image.open(io.BytesIO(data)) as image:
        return image_to_tensor(image).permute(1, 2, 0).numpy().astype(np.int16)


def _wait_until_drawn(page: Page, count: int) -> None:
    # The preview is drawn when the browser has decoded the image, after the card appears.
    page.wait_for_function(
        """count => [...document.querySelectorAll("article.result img")]
            .filter(img => img.complete && img.naturalWidth > 0).length === count""",
        arg=count,
    )


def test_a_cat_chosen_with_the_keyboard_is_classified(page: Page, service_url: str) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    # Registered before anything loads: Playwright turns on the interception of file dialogs
    # when the first handler is added, and a dialog opened before that is never reported.
    page.on("filechooser", lambda chooser: chooser.set_files(CAT))
    page.goto("/")
    expect(page).to_have_title("CIFAR-10 classifier")
    health = httpx.get(f"{service_url}/health").json()
    model = page.locator("#model")
    expect(model).to_contain_text(f"version {health['model_version']}")
    expect(model).to_contain_text(f"{health['engine']} engine on {health['device']}")

    # Keyboard only: the first Tab reaches the labelled file input; Enter opens the dialog,
    # in which the handler above picks the cat.
    page.keyboard.press("Tab")
    expect(page.get_by_label("Choose images")).to_be_focused()
    page.keyboard.press("Enter")

    result = page.locator("article.result")
    expect(result).to_have_count(1)
    expect(result.locator(".label strong")).to_have_text("cat")
    bars = result.get_by_role("meter")
    expect(bars).to_have_count(10)
    expect(page.locator("#status")).to_have_text("Done: cat.")

    # The bars are the API's probabilities, one per class in the model's order.
    answer = httpx.post(
        f"{service_url}/predict", files={"file": ("cat.png", CAT.read_bytes())}
    ).json()
    for bar, name in zip(bars.all(), CIFAR10_CLASSES, strict=True):
        expect(bar).to_have_accessible_name(name)
        expect(bar).to_have_attribute("aria-valuenow", f"{answer['probabilities'][name] * 100:.1f}")
    details = result.locator(".details")
    expect(details).to_contain_text(answer["model_version"])
    expect(details).to_contain_text("PNG RGB, 32\u00d732")
    expect(details).to_contain_text(re.compile(r"Inference\s*\d+\.\d ms \(batch of \d+\)"))

    # A 32x32 upload is exactly what the model saw, pixel for pixel.
    _wait_until_drawn(page, 1)
    assert np.array_equal(_seen_by_the_page(page, 0), _seen_by_the_model(CAT.read_bytes()))

    # Nothing came from anywhere but the service (and the page's own previews).
    assert all(url.startswith((service_url, "blob:")) for url in requested), requested

    page.get_by_label("Choose images").blur()  # no focus ring in the picture
    page.set_viewport_size({"width": 900, "height": 700})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_several_images_go_in_one_batch_request(page: Page, tmp_path: Path) -> None:
    # A wide cat: resized on its short side and centre-cropped, unlike the 32x32 one.
    with Image.open(CAT) as cat:
        wide = _png(cat.resize((150, 64), Image.Resampling.BICUBIC))
    page.goto("/")
    with page.expect_request(re.compile(r"/predict/batch$")) as request:
        page.get_by_label("Choose images").set_input_files(
            [_file("cat.png", CAT.read_bytes()), _file("wide cat.png", wide)]
        )
    assert request.value.method == "POST"
    cards = page.locator("article.result")
    expect(cards).to_have_count(2)
    expect(cards.locator("h3")).to_have_text(["cat.png", "wide cat.png"])
    for card in cards.all():
        expect(card.get_by_role("meter")).to_have_count(10)
    expect(cards.nth(1).locator(".details")).to_contain_text("150\u00d764")

    # The browser's 32x32 crop is the service's, up to the resampling filter (canvas
    # smoothing vs. PIL's antialiased bicubic): within 2 levels of 255 on average (0.5 with
    # chromium 156), where the same crop 3 pixels off is 14 away and no crop at all 29.
    _wait_until_drawn(page, 2)
    drawn = _seen_by_the_page(page, 1)
    assert np.abs(drawn - _seen_by_the_model(wide)).mean() < 2


def test_dropped_and_pasted_images_are_classified(page: Page) -> None:
    page.goto("/")
    cat = base64.b64encode(CAT.read_bytes()).decode()
    holding_a_cat = page.evaluate_handle(
        """b64 => {
            const transfer = new DataTransfer();
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            return transfer;
        }""",
        cat,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": holding_a_cat})
    expect(page.locator("article.result h3")).to_have_text("dropped.png")
    expect(page.locator("article.result .label strong")).to_have_text("cat")

    page.evaluate(
        """transfer => document.dispatchEvent(
            new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true}))""",
        holding_a_cat,
    )
    # A paste starts afresh: the page is cleared, then the one pasted image is shown.
    expect(page.locator("article.result")).to_have_count(1)
    expect(page.locator("article.result .label strong")).to_have_text("cat")


def test_a_text_file_is_refused_with_a_message_for_people(page: Page) -> None:
    page.goto("/")
    chooser = page.get_by_label("Choose images")
    notes = _file("notes.txt", b"shopping: milk, eggs\n", "text/plain")
    chooser.set_input_files([notes])
    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert.locator("p").first).to_have_text(
        "That file is not an image. Choose a photo or picture: PNG, JPEG, BMP, WebP, GIF or TIFF."
    )
    expect(alert).to_contain_text("415 not_an_image")
    expect(page.locator("article.result")).to_have_count(0)

    # In a batch the message names the file: the service refuses the whole request.
    chooser.set_input_files([_file("cat.png", CAT.read_bytes()), notes])
    expect(alert.locator("p").first).to_have_text(
        re.compile(r"^“notes\.txt” \(image 2 of 2\): That file is not an image\.")
    )
    expect(page.locator("article.result")).to_have_count(0)

    # The next good image clears the error.
    chooser.set_input_files(CAT)
    expect(page.locator("article.result .label strong")).to_have_text("cat")
    expect(alert).to_be_hidden()


def _service_error_codes() -> list[str]:
    """Every error code in the service's source: ApiError(status, "code", ...) and the
    codes of errors.py's handlers (a code added later without a message fails the test)."""
    codes: set[str] = set()
    # The page calls /predict and /predict/batch only: /v2's codes (service/v2/) never reach it.
    sources = (PROJECT_ROOT / "service").rglob("*.py")
    for source in (path for path in sources if "v2" not in path.relative_to(PROJECT_ROOT).parts):
        text = source.read_text()
        codes |= set(re.findall(r'(?:ApiError|error_response)\(\s*\d{3},\s*"(\w+)"', text))
        codes |= set(re.findall(r'^\s*\d{3}: "(\w+)",$', text, flags=re.MULTILINE))
    assert {"not_an_image", "overloaded", "not_found", "internal_error"} <= codes, codes
    return sorted(codes)


def test_every_error_code_has_its_own_message(page: Page) -> None:
    """Each code the service can answer, faked at the network layer, gets a message of its
    own rather than the generic one."""
    codes = _service_error_codes()
    current: dict[str, str] = {}

    def answer(route: Route) -> None:
        route.fulfill(
            status=400,
            json={"error": {"code": current["code"], "message": "at most 4 file(s) per request"}},
        )

    page.route(re.compile(r"/predict$"), answer)
    page.goto("/")
    messages: dict[str, str] = {}
    for code in codes:
        current["code"] = code
        page.get_by_label("Choose images").set_input_files(_file("a.png", CAT.read_bytes()))
        expect(page.locator("#error .detail")).to_contain_text(f"400 {code}:")
        messages[code] = page.locator("#error p").first.inner_text()
    generic = "The service answered with an error"
    assert [code for code, text in messages.items() if text.startswith(generic)] == []
    assert len(set(messages.values())) == len(codes), messages
    assert messages["too_many_files"].endswith("at most 4 per batch.")


def test_a_busy_service_is_retried_after_retry_after(page: Page) -> None:
    calls: list[str] = []

    def busy_once(route: Route) -> None:
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(
                status=429,
                headers={"Retry-After": "1"},
                json={"error": {"code": "overloaded", "message": "retry after 1 s"}},
            )
        else:
            route.continue_()

    page.route(re.compile(r"/predict$"), busy_once)
    page.goto("/")
    page.get_by_label("Choose images").set_input_files(CAT)
    expect(page.locator("#status")).to_contain_text("busy; trying again in 1 s (attempt 2 of 5)")
    expect(page.locator("article.result .label strong")).to_have_text("cat")
    assert len(calls) == 2
    expect(page.get_by_role("alert")).to_be_hidden()


def test_a_service_that_stays_busy_is_given_up_on(page: Page) -> None:
    calls: list[str] = []

    def always_busy(route: Route) -> None:
        calls.append(route.request.url)
        route.fulfill(
            status=429,
            headers={"Retry-After": "0"},
            json={"error": {"code": "overloaded", "message": "retry after 0 s"}},
        )

    page.route(re.compile(r"/predict$"), always_busy)
    page.goto("/")
    page.get_by_label("Choose images").set_input_files(CAT)
    expect(page.get_by_role("alert")).to_contain_text("The service is busy")
    assert len(calls) == 5


def test_the_page_fits_a_phone(browser: Browser, service_url: str) -> None:
    phone = browser.new_context(
        base_url=service_url,
        viewport={"width": 360, "height": 740},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    try:
        page = phone.new_page()
        page.goto("/")
        page.get_by_label("Choose images").set_input_files(CAT)
        expect(page.locator("article.result .label strong")).to_have_text("cat")
        # No sideways scrolling, and every control and bar lies within the screen's width.
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        for target in [
            page.locator("label.button"),
            *page.get_by_role("meter").all(),
            *page.locator("article.result figure").all(),
        ]:
            box = target.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, box
        # The two pictures stay side by side, for comparison.
        first, second = (f.bounding_box() for f in page.locator("article.result figure").all())
        assert first is not None and second is not None and first["y"] == second["y"]
    finally:
        phone.close()


def test_a_page_on_an_allowed_origin_can_call_the_api(
    page: Page, service_url: str, front_end: int, front_end_origin: str
) -> None:
    """CORS as the browser enforces it: a front-end elsewhere posts an image (the custom
    header forces a preflight) and reads the answer and the exposed X-Request-ID."""
    call = """async ([api, b64]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const form = new FormData();
        form.append("file", new Blob([bytes], {type: "image/png"}), "cat.png");
        try {
            const response = await fetch(api + "/predict",
                {method: "POST", body: form, headers: {"X-Request-ID": "front-end-1"}});
            return {label: (await response.json()).label,
                    id: response.headers.get("X-Request-ID")};
        } catch (error) {
            return {error: error.name};
        }
    }"""
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    cat = base64.b64encode(CAT.read_bytes()).decode()
    page.goto(f"{front_end_origin}/")
    assert page.evaluate(call, [service_url, cat]) == {"label": "cat", "id": "front-end-1"}
    # The same page under an origin that is not listed: the browser withholds the answer.
    page.goto(f"http://127.0.0.1:{front_end}/")
    assert page.evaluate(call, [service_url, cat]) == {"error": "TypeError"}
    assert any("No 'Access-Control-Allow-Origin' header" in line for line in console), console


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css"])
def test_the_page_is_served_by_the_service(service_url: str, path: str) -> None:
    response = httpx.get(f"{service_url}{path}")
    assert response.status_code == 200
    assert "default-src 'self'" in response.headers["content-security-policy"]
