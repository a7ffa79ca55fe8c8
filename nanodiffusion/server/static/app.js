// The page: POST the form to /api/jobs (the A1111 txt2img body), poll GET /api/jobs/{id} for progress and
// images, show each image as it finishes with its parameters and a download link. No build step.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
let currentJob = null;

async function init() {
  const [info, samplers] = await Promise.all([getJson("/api/info"), getJson("/sdapi/v1/samplers")]);
  $("model").textContent = `${info.model} [${info.model_hash}] · ${info.dtype} on ${info.device}`;
  for (const id of ["width", "height"]) {
    $(id).value = info.native_size;
    $(id).max = info.max_size;
  }
  $("num-images").replaceChildren(...range(1, info.max_images).map((n) => new Option(n, n)));
  $("sampler").replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  $("sampler").value = "Euler a";
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) generate();
  });
  $("cancel").addEventListener("click", cancel);
}

function range(first, last) {
  return Array.from({ length: last - first + 1 }, (_, i) => first + i);
}

async function getJson(url, options) {
  const response = await fetch(url, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    let message = body.message || (typeof body.detail === "string" ? body.detail : response.statusText);
    if (response.status === 429) message += ` (HTTP 429, retry after ${response.headers.get("Retry-After")} s)`;
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

async function generate() {
  if (currentJob || !$("form").reportValidity()) return;
  showError(null);
  setBusy(true);
  try {
    let job = await getJson("/api/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(settings()),
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
    img.width = image.width;
    img.height = image.height;
    const caption = document.createElement("figcaption");
    const parameters = document.createElement("pre");
    parameters.textContent = image.parameters;
    const download = document.createElement("a");
    download.href = image.url;
    download.download = `${image.seed}.png`;
    download.textContent = `download PNG (seed ${image.seed})`;
    caption.append(parameters, download);
    figure.append(img, caption);
    group.append(figure);
  }
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}

function showErrorOf(error) {
  showError(error.message);
}

init().catch(showErrorOf);
