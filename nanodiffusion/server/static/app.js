// The page: POST the form to /api/jobs (the A1111 txt2img body) or /api/jobs/img2img (with an init image and
// a painted mask), poll GET /api/jobs/{id} for progress, previews and images, show each image as it finishes
// with its parameters and a download link. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
const MIN_SHOWN = 256;          // images smaller than this are drawn enlarged (pixelated), at their aspect
let currentJob = null;
let maxSize = 2048;
let painted = false;            // whether the mask canvas holds paint

async function init() {
  const [info, samplers, schedulers] = await Promise.all(
    [getJson("/api/info"), getJson("/sdapi/v1/samplers"), getJson("/sdapi/v1/schedulers")]);
  $("model").textContent = `${info.model} [${info.model_hash}] · ${info.dtype} on ${info.device}`;
  maxSize = info.max_size;
  for (const id of ["width", "height"]) {
    $(id).value = info.native_size;
    $(id).max = info.max_size;
  }
  $("steps").max = info.max_steps;
  $("num-images").replaceChildren(...range(1, info.max_images).map((n) => new Option(n, n)));
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  $("scheduler").replaceChildren(...schedulers.map((s) => new Option(s.label, s.label)));
  showDefaults(info.defaults, samplers, schedulers);
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
  });
  $("cancel").addEventListener("click", cancel);
  initEditing();
}

function showDefaults(defaults, samplers, schedulers) {
  // the model's own defaults (its generation_defaults.json): what the API uses when a field is left out
  $("steps").value = defaults.steps;
  $("guidance").value = defaults.cfg_scale;
  const sampler = samplers.find((s) => s.aliases.includes(defaults.sampler));
  if (sampler) $("sampler").value = sampler.name;
  const name = defaults.schedule === "default" ? "automatic" : defaults.schedule;     // A1111's names
  const schedule = schedulers.find((s) => s.name === name);
  if (schedule) $("scheduler").value = schedule.label;
  $("strength").value = defaults.denoising_strength;
  $("strength-value").textContent = defaults.denoising_strength;
}

function range(first, last) {
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    let message = body.message || (typeof body.detail === "string" ? body.detail : response.statusText);
    const retry = response.headers.get("Retry-After");
    if (response.status === 429) message += ` (HTTP 429, retry after ${retry} s)`;
    throw new Error(message);
  }
  return body;
}

function settings() {
  const random = $("seed-random").checked || $("seed").value === "";
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    batch_size: Number($("num-images").value),
    steps: Number($("steps").value),
    cfg_scale: Number($("guidance").value),
    seed: random ? -1 : Number($("seed").value),
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    width: Number($("width").value),
    height: Number($("height").value),
  };
}

function editSettings() {
  // img2img: the whole image is redrawn; with paint, only the painted area (A1111's inpainting fields)
  if ($("canvas-box").hidden) return null;
  const body = {
    init_images: [$("init-canvas").toDataURL("image/png")],
    denoising_strength: Number($("strength").value),
  };
  if (painted) {
    // the paint is opaque on a transparent canvas: the server reads a transparent mask's alpha channel
    Object.assign(body, { mask: $("mask-canvas").toDataURL("image/png"), inpaint_full_res: false,
                          inpainting_fill: 1, mask_blur: 2 });
  }
  return body;
}

async function generate() {
  if (currentJob || !$("form").reportValidity()) return;
  showError(null);
  setBusy(true);
  try {
    const edit = editSettings();
    let job = await getJson(edit ? "/api/jobs/img2img" : "/api/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...settings(), ...(edit || {}) }),
    });
    currentJob = job.id;
    const figures = newResultGroup();
    const started = performance.now();
    while (true) {
      showProgress(job);
      addImages(figures, job);
      if (["done", "failed", "cancelled"].includes(job.state)) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      job = await getJson(`/api/jobs/${job.id}`);
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (job.state === "failed") showError(`generation failed: ${job.error}`);
    $("status").textContent = job.state === "done" ? `done in ${seconds} s` : job.state;
  } catch (error) {
    showError(error.message);
    $("status").textContent = "";
  } finally {
    currentJob = null;
    showPreview(null);
    setBusy(false);
  }
}

async function cancel() {
  if (currentJob) await getJson(`/api/jobs/${currentJob}`, { method: "DELETE" }).catch(showErrorOf);
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy;
  $("progress").hidden = !busy;
  $("progress").value = 0;
}

function showProgress(job) {
  $("progress").value = job.progress;
  if (job.state === "queued") {
    const ahead = job.queue_position;
    $("status").textContent = ahead ? `waiting: ${ahead} job${ahead > 1 ? "s" : ""} ahead` : "waiting";
  } else if (job.state === "running") {
    $("status").textContent =
      `image ${job.image_index + 1}/${job.num_images}, step ${job.step}/${job.num_steps}`;
  }
  showPreview(job.state === "running" ? job.preview : null);
}

function showPreview(preview) {
  // the decoded denoised estimate of the image being made, refreshed when a newer step's is there
  const img = $("preview-image");
  if (!preview) {
    $("preview").hidden = true;
    return;
  }
  if (img.dataset.url !== preview.url) {
    img.dataset.url = preview.url;
    img.src = preview.url;
    img.onload = () => sizeImage(img, img.naturalWidth, img.naturalHeight);
  }
  $("preview-caption").textContent = `preview at step ${preview.step}`;
  $("preview").hidden = false;
}

function sizeImage(img, width, height) {
  // drawn at its own aspect ratio; small images enlarged by a whole factor (CSS keeps them pixelated and
  // shrinks wide ones to the column with height: auto)
  const scale = Math.max(1, Math.floor(MIN_SHOWN / Math.max(width, height)));
  img.width = width * scale;
  img.height = height * scale;
}

function newResultGroup() {
  const group = document.createElement("div");
  group.style.display = "contents";
  $("gallery").prepend(group);
  return group;
}

function addImages(group, job) {
  for (const image of job.images.slice(group.children.length)) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = image.parameters.split("\n")[0];
    sizeImage(img, image.width, image.height);
    const caption = document.createElement("figcaption");
    const parameters = document.createElement("pre");
    parameters.textContent = image.parameters;
    const download = document.createElement("a");
    download.href = image.url;
    download.download = image.filename;
    download.textContent = `download ${image.filename}${image.partial ? " (interrupted)" : ""}`;
    caption.append(parameters, download);
    figure.append(img, caption);
    group.append(figure);
  }
}

function initEditing() {
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("init-file").addEventListener("change", () => loadInitImage($("init-file").files[0]));
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-image").addEventListener("click", () => {
    $("canvas-box").hidden = true;
    $("init-file").value = "";
  });
  const mask = $("mask-canvas");
  let drawing = false;
  mask.addEventListener("pointerdown", (event) => {
    drawing = true;
    mask.setPointerCapture(event.pointerId);
    paint(event);
  });
  mask.addEventListener("pointermove", (event) => { if (drawing) paint(event); });
  mask.addEventListener("pointerup", () => { drawing = false; });
}

async function loadInitImage(file) {
  if (!file) return;
  const bitmap = await createImageBitmap(file).catch(() => null);
  if (!bitmap) {
    showError(`${file.name} is not an image this browser can read`);
    return;
  }
  // the request's size follows the image: its sides rounded down to multiples of 8, within the limit
  const fit = Math.min(1, maxSize / Math.max(bitmap.width, bitmap.height));
  const width = Math.max(8, Math.floor((bitmap.width * fit) / 8) * 8);
  const height = Math.max(8, Math.floor((bitmap.height * fit) / 8) * 8);
  for (const canvas of [$("init-canvas"), $("mask-canvas")]) {
    canvas.width = width;
    canvas.height = height;
  }
  $("init-canvas").getContext("2d").drawImage(bitmap, 0, 0, width, height);
  clearMask();
  $("width").value = width;
  $("height").value = height;
  $("canvas-box").hidden = false;
  $("canvas-box").style.aspectRatio = `${width} / ${height}`;
}

function clearMask() {
  const mask = $("mask-canvas");
  mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
  painted = false;
}

function paint(event) {
  const mask = $("mask-canvas");
  const box = mask.getBoundingClientRect();
  const scale = mask.width / box.width;
  const context = mask.getContext("2d");
  context.fillStyle = "rgb(255, 255, 255)";
  context.beginPath();
  context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale,
              Number($("brush").value) * scale, 0, 2 * Math.PI);
  context.fill();
  painted = true;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function showErrorOf(error) {
  showError(error.message);
}

init().catch(showErrorOf);
