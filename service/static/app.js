// The demo page: send the chosen, dropped or pasted images to the service's own API and show
// what it answers. Plain browser JavaScript, no build step, no other origin.
"use strict";

const MODEL_SIZE = 32; // the model's input is 32x32 RGB (model/preprocessing.py)
const MAX_ATTEMPTS = 5; // tries of one request while the service answers 429/503 + Retry-After
const LONGEST_WAIT_S = 30; // cap on a Retry-After we honour

// One message per error code the service answers (service/errors.py, service/images.py,
// service/runtime.py, service/routes.py), written for the person at the browser.
// `detail` is the service's own message, which may carry a limit or a reason.
const MESSAGES = {
  not_an_image: () =>
    "That file is not an image. Choose a photo or picture: PNG, JPEG, BMP, WebP, GIF or TIFF.",
  unsupported_format: (detail) =>
    `This kind of image is not supported (${detail}). Save it as PNG or JPEG and try again.`,
  empty_file: () => "That file is empty: it has no bytes at all. Choose another one.",
  corrupt_image: () =>
    "The image is damaged or cut short, so it could not be read. Try saving it again.",
  too_many_pixels: () =>
    "The image has too many pixels for this service. Scale it down and try again.",
  upload_too_large: () =>
    "The upload is too large for this service. Choose a smaller file, or fewer at once.",
  too_many_files: (detail) => {
    const limit = /at most (\d+)/.exec(detail);
    return limit
      ? `Too many images at once: the service takes at most ${limit[1]} per batch.`
      : "Too many images at once. Choose fewer.";
  },
  missing_file: () => "No file reached the service. Choose an image and try again.",
  not_multipart: () =>
    "The page sent the image in a form the service does not read. Reload the page.",
  invalid_multipart: () =>
    "The upload arrived garbled (a malformed form). Reload the page and try again.",
  invalid_request: () => "The service could not understand the request. Reload the page.",
  bad_request: () => "The service refused the request as malformed. Reload the page.",
  overloaded: () =>
    "The service is busy with other images and kept refusing new ones. Try again in a minute.",
  not_ready: () => "The service is still starting up. Try again in a few seconds.",
  shutting_down: () => "The service is shutting down or restarting. Try again in a moment.",
  timeout: () => "The service took too long to answer. Try again, perhaps with fewer images.",
  inference_failed: () =>
    "The model failed while classifying these images. Try again; if it keeps failing, " +
    "tell whoever runs the service.",
  internal_error: () =>
    "The service hit an internal error (it was logged). Try again later.",
  client_closed_request: () => "The request was cancelled before the service answered.",
  not_found: () =>
    "The service has no such address: this page does not match its API version. Reload it.",
  method_not_allowed: () => "The service refused the request method. Reload the page.",
  unsupported_media_type: () =>
    "The service does not take uploads of this content type. Reload the page.",
};

const $ = (id) => document.getElementById(id);

// A small DOM builder: el("p", {class: "x"}, "text", child, ...).
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
}

// Python's round(): halves go to the even neighbour (the service sizes images with it).
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

// What the model saw: the rule of model/preprocessing.py, done by the browser. Transparency
// over white; the short side resized to 32 px keeping the aspect ratio (high-quality
// smoothing; the service uses antialiased bicubic, so pixel values may differ slightly);
// then the centre 32x32 square.
function drawAsTheModelSaw(image, canvas) {
  const width = image.naturalWidth;
  const height = image.naturalHeight;
  const scale = MODEL_SIZE / Math.min(width, height);
  const resizedWidth = Math.max(MODEL_SIZE, roundHalfEven(width * scale));
  const resizedHeight = Math.max(MODEL_SIZE, roundHalfEven(height * scale));
  const left = Math.floor((resizedWidth - MODEL_SIZE) / 2);
  const top = Math.floor((resizedHeight - MODEL_SIZE) / 2);
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, MODEL_SIZE, MODEL_SIZE);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(image, -left, -top, resizedWidth, resizedHeight);
}

function sleep(seconds, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, seconds * 1000);
    const stop = () => {
      clearTimeout(timer);
      reject(signal.reason);
    };
    signal.addEventListener("abort", stop, { once: true });
  });
}

// Seconds to wait, from a Retry-After header (delay-seconds or an HTTP date; RFC 9110).
function retryAfterSeconds(header) {
  if (header === null) return null;
  const seconds = /^\d+$/.test(header.trim())
    ? Number(header)
    : (Date.parse(header) - Date.now()) / 1000;
  return Number.isFinite(seconds) ? Math.min(Math.max(seconds, 0), LONGEST_WAIT_S) : null;
}

// POST the form; while the service says "busy, retry after N s" (429, or 503 while it
// starts), wait and try again, at most MAX_ATTEMPTS times in all.
async function postWithRetry(url, form, signal) {
  for (let attempt = 1; ; attempt++) {
    const response = await fetch(url, { method: "POST", body: form, signal });
    const wait = retryAfterSeconds(response.headers.get("Retry-After"));
    const busy = response.status === 429 || response.status === 503;
    if (!busy || wait === null || attempt === MAX_ATTEMPTS) return response;
    setStatus(
      `The service is busy; trying again in ${Math.ceil(wait)} s ` +
        `(attempt ${attempt + 1} of ${MAX_ATTEMPTS})…`,
    );
    await sleep(wait, signal);
  }
}

function setStatus(text) {
  $("status").textContent = text;
}

function showError(text, detail) {
  const box = $("error");
  box.replaceChildren(el("p", {}, text));
  if (detail) box.append(el("p", { class: "detail" }, `The service said: ${detail}`));
  box.hidden = false;
}

// The message for a failed request; `files` names the culprit of a batch ("files[2]: ...").
function errorMessage(status, body, files) {
  const code = body?.error?.code;
  let detail = body?.error?.message ?? "";
  let culprit = "";
  const index = /^files\[(\d+)\]: /.exec(detail);
  if (index && files[Number(index[1])]) {
    const file = files[Number(index[1])];
    culprit = `“${file.name || "pasted image"}” (image ${Number(index[1]) + 1} of ${files.length}): `;
    detail = detail.slice(index[0].length);
  }
  const message = MESSAGES[code]
    ? MESSAGES[code](detail)
    : `The service answered with an error (HTTP ${status}). Try again.`;
  return { text: culprit + message, detail: code ? `${status} ${code}: ${detail}` : `${status}` };
}

function describeModel(health) {
  const tta = health.mirror_tta ? ", each image averaged with its mirror image" : "";
  return (
    `${health.model_name}, version ${health.model_version}, ` +
    `${health.engine} engine on ${health.device}${tta}.`
  );
}

async function loadModelInfo() {
  for (;;) {
    try {
      const response = await fetch("/health");
      const health = await response.json();
      if (response.ok) {
        $("model").textContent = `Model: ${describeModel(health)}`;
        return;
      }
      $("model").textContent = `The service is ${health.status ?? "not ready"}; waiting…`;
    } catch {
      $("model").textContent = "Cannot reach the service; trying again…";
    }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function bars(probabilities, label) {
  const list = el("ol", { class: "bars" });
  for (const [name, p] of Object.entries(probabilities)) {
    const fill = el("span", { class: "fill" });
    fill.style.width = percent(p);
    const bar = el(
      "span",
      {
        class: "bar",
        role: "meter",
        "aria-label": name,
        "aria-valuemin": "0",
        "aria-valuemax": "100",
        "aria-valuenow": (p * 100).toFixed(1),
      },
      fill,
    );
    const row = el(
      "li",
      name === label ? { class: "top" } : {},
      el("span", { class: "name" }, name),
      bar,
      el("span", { class: "value" }, percent(p)),
    );
    list.append(row);
  }
  return list;
}

function details(prediction, roundTripMs) {
  const { image, timings } = prediction;
  const rows = [
    ["Model version", prediction.model_version],
    ["Uploaded", `${image.format} ${image.mode}, ${image.width}×${image.height}`],
    ["Decode", `${timings.decode_ms.toFixed(1)} ms`],
    ["Queue", `${timings.queue_ms.toFixed(1)} ms`],
    ["Inference", `${timings.inference_ms.toFixed(1)} ms (batch of ${timings.batch_size})`],
    ["Round trip (browser)", `${roundTripMs.toFixed(0)} ms`],
  ];
  const list = el("dl", { class: "details" });
  for (const [term, value] of rows) list.append(el("dt", {}, term), el("dd", {}, value));
  return list;
}

function resultCard(file, prediction, previewUrl, roundTripMs) {
  const name = file.name || "pasted image";
  const original = el("img", { alt: `The uploaded image ${name}`, src: previewUrl });
  const seen = el("canvas", {
    width: String(MODEL_SIZE),
    height: String(MODEL_SIZE),
    role: "img",
    "aria-label": `${name} as the model saw it, 32 by 32 pixels`,
  });
  const originalCaption = el("figcaption", {}, "Original");
  original.addEventListener("load", () => drawAsTheModelSaw(original, seen), { once: true });
  original.addEventListener(
    "error",
    () => {
      originalCaption.textContent = `No preview: this browser cannot show ${prediction.image.format}`;
      seen.hidden = true;
    },
    { once: true },
  );
  return el(
    "article",
    { class: "result" },
    el("h3", {}, name),
    el(
      "div",
      { class: "pictures" },
      el("figure", {}, original, originalCaption),
      el("figure", {}, seen, el("figcaption", {}, "As the model saw it (32×32)")),
    ),
    el(
      "p",
      { class: "label" },
      el("strong", {}, prediction.label),
      ` ${percent(prediction.probability)}`,
    ),
    bars(prediction.probabilities, prediction.label),
    details(prediction, roundTripMs),
  );
}

const state = { controller: null, previewUrls: [] };

function clearResults() {
  for (const url of state.previewUrls) URL.revokeObjectURL(url);
  state.previewUrls = [];
  $("results").replaceChildren();
  $("error").hidden = true;
}

async function classify(files) {
  if (files.length === 0) return;
  state.controller?.abort(); // a newer choice replaces a request still in flight
  const controller = new AbortController();
  state.controller = controller;
  clearResults();
  const single = files.length === 1;
  const form = new FormData();
  for (const file of files) form.append(single ? "file" : "files", file, file.name || "pasted.png");
  setStatus(single ? "Classifying the image…" : `Classifying ${files.length} images…`);
  const started = performance.now();
  let response;
  let body = null;
  try {
    response = await postWithRetry(single ? "/predict" : "/predict/batch", form, controller.signal);
    body = await response.json().catch(() => null);
  } catch (error) {
    if (controller.signal.aborted) return;
    setStatus("");
    showError("Cannot reach the service. Check that it is running, then try again.", String(error));
    return;
  }
  if (controller.signal.aborted) return;
  const roundTripMs = performance.now() - started;
  if (!response.ok) {
    setStatus("");
    const { text, detail } = errorMessage(response.status, body, files);
    showError(text, detail);
    return;
  }
  const predictions = single ? [body] : body.predictions;
  const cards = predictions.map((prediction, i) => {
    const url = URL.createObjectURL(files[i]);
    state.previewUrls.push(url);
    return resultCard(files[i], prediction, url, roundTripMs);
  });
  $("results").replaceChildren(...cards);
  setStatus(
    single
      ? `Done: ${predictions[0].label}.`
      : `Done: ${predictions.map((p) => p.label).join(", ")}.`,
  );
}

function setUp() {
  const input = $("files");
  input.addEventListener("change", () => {
    classify([...input.files]);
    input.value = ""; // choosing the same file again should classify it again
  });

  // Dropping works anywhere on the page; the drop zone lights up while something is held.
  const zone = $("drop");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    classify([...(event.dataTransfer?.files ?? [])]);
  });

  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (files.length > 0) {
      event.preventDefault();
      classify(files);
    }
  });

  loadModelInfo();
}

setUp();
