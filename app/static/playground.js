// The playground: a client of this fleet's public API, nothing more. It lists the models
// (GET /v1/models), submits a job (POST /v1/jobs) and follows it over Server-Sent Events
// (GET /v1/jobs/<id>/events), read with fetch() because EventSource cannot send the
// Authorization header. No build step, nothing loaded from anywhere but this fleet.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELED"]);
let models = {};

function headers() {
  return { Authorization: `Bearer ${$("key").value.trim()}`, "Content-Type": "application/json" };
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  const body = response.headers.get("Content-Type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const error = body?.error ?? { message: response.statusText, field: null };
    throw new Error(error.field ? `${error.message} (field: ${error.field})` : error.message);
  }
  return body;
}

// The models and their state; ``keepForm``: only their state, the person's choices kept.
async function loadModels(keepForm = false) {
  if (!$("key").value.trim()) return;
  try {
    const listed = await api("v1/models");
    models = Object.fromEntries(listed.data.map((m) => [m.id, m]));
    if (keepForm && models[$("model").value]) return showState(models[$("model").value]);
    const select = $("model");
    select.replaceChildren(...listed.data.map((m) => new Option(m.default ? `${m.id} (default)` : m.id, m.id, m.default, m.default)));
    showModel();
  } catch (error) {
    $("error").textContent = `Could not list the models: ${error.message}`;
  }
}

function showState(model) {
  const workers = model.state.workers;
  const queued = model.state.queues.reduce((sum, q) => sum + q.queued, 0);
  $("model-about").textContent =
    `${model.description || model.id}: ${workers} live worker${workers === 1 ? "" : "s"}, ${queued} queued; ` +
    `steps ${model.min_steps}-${model.max_steps}, ${model.dtype}${model.quantize === "none" ? "" : ", " + model.quantize}`;
}

// The chosen model's state, and its defaults and bounds in the form.
function showModel() {
  const model = models[$("model").value];
  if (!model) return;
  showState(model);
  const steps = $("steps");
  Object.assign(steps, { min: model.min_steps, max: model.max_steps, value: model.steps });
  $("guidance").value = model.guidance_scale;
  $("width").value = model.width;
  $("height").value = model.height;
  $("scheduler").replaceChildren(new Option("the model's own", ""), ...model.schedulers.map((s) => new Option(s, s)));
  showAdapters(model);
}

// A checkbox and a scale (-2 to 2) per LoRA adapter of the model.
function showAdapters(model) {
  const rows = model.loras.map((name) => {
    const use = Object.assign(document.createElement("input"), { type: "checkbox", name: "lora", value: name, id: `lora-${name}` });
    const scale = Object.assign(document.createElement("input"), {
      type: "number", min: -2, max: 2, step: 0.1, value: 1, id: `lora-${name}-scale`, title: `${name}: scale`,
    });
    const label = document.createElement("label");
    label.append(use, ` ${name} `, scale);
    return label;
  });
  const none = Object.assign(document.createElement("p"), { textContent: "This model has none." });
  $("adapters").replaceChildren($("adapters").querySelector("legend"), ...(rows.length ? rows : [none]));
}

function chosenAdapters() {
  const checked = [...document.querySelectorAll('input[name="lora"]:checked')];
  return checked.length ? checked.map((box) => ({ name: box.value, scale: Number($(`lora-${box.value}-scale`).value) })) : undefined;
}

function request() {
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const body = {
    prompt: $("prompt").value,
    model: $("model").value || undefined,
    negative_prompt: $("negative").value || undefined,
    scheduler: $("scheduler").value || undefined,
    loras: chosenAdapters(),
    steps: number("steps"),
    guidance_scale: number("guidance"),
    width: number("width"),
    height: number("height"),
    num_images: number("count"),
    seed: number("seed"),
  };
  return JSON.stringify(body);
}

function showJob(job) {
  let line = `Job ${job.id}: ${job.state}`;
  if (job.state === "QUEUED" && job.place_in_line) {
    const place = job.place_in_line;
    line += `, ${place.position} ahead in line`;
    if (place.estimated_start_at) line += `, starts about ${new Date(place.estimated_start_at).toLocaleTimeString()}`;
    else line += ", waiting for a worker of this model";
  }
  if (job.state === "FAILED") $("error").textContent = job.error ?? "failed";
  $("state").textContent = line;
  if (job.state === "SUCCEEDED") {
    $("progress").value = $("progress").max;
    $("images").replaceChildren(...job.images.map((image, i) => figure(job, image, i)));
  }
}

function figure(job, image, index) {
  const img = Object.assign(document.createElement("img"), { src: image.url, alt: `image ${index} of job ${job.id}` });
  const link = Object.assign(document.createElement("a"), { href: image.url, download: `${job.id}-${index}.png`, textContent: "download" });
  const caption = document.createElement("figcaption");
  caption.append(`seed ${job.request.seed + index} `, link);
  const wrapper = document.createElement("figure");
  wrapper.append(img, caption);
  return wrapper;
}

// One Server-Sent Events stream, parsed as it arrives; resolves with the last event's id
// and whether the job ended.
async function follow(jobId, lastEventId) {
  const extra = lastEventId ? { "Last-Event-ID": lastEventId } : {};
  const response = await fetch(`v1/jobs/${jobId}/events`, { headers: { ...headers(), ...extra } });
  if (!response.ok) throw new Error(`the event stream answered ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", ended = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return { lastEventId, ended };
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = { event: "message", data: "" };
      for (const line of buffer.slice(0, cut).split("\n")) {
        const colon = line.indexOf(":");
        if (colon <= 0) continue;
        const [field, text] = [line.slice(0, colon), line.slice(colon + 1).replace(/^ /, "")];
        if (field === "data") event.data += text;
        else event[field] = text;
      }
      buffer = buffer.slice(cut + 2);
      if (event.id) lastEventId = event.id;
      const data = event.data ? JSON.parse(event.data) : null;
      if (event.event === "state") {
        showJob(data);
        ended = TERMINAL.has(data.state);
      } else if (event.event === "progress") {
        Object.assign($("progress"), { max: data.total, value: data.step });
        $("state").textContent = `Job ${jobId}: RUNNING, step ${data.step} of ${data.total}`;
      } else if (event.event === "error") {
        $("error").textContent = data.error?.message ?? "the stream failed";
      }
    }
  }
}

async function submit(event) {
  event.preventDefault();
  $("error").textContent = "";
  $("images").replaceChildren();
  $("progress").value = 0;
  $("submit").disabled = true;
  try {
    const job = await api("v1/jobs", { method: "POST", body: request() });
    showJob(job);
    let followed = { lastEventId: null, ended: TERMINAL.has(job.state) };
    for (let tries = 0; !followed.ended && tries < 5; tries++) {
      followed = await follow(job.id, followed.lastEventId);
    }
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    $("submit").disabled = false;
    loadModels(true); // the models' state (queued, workers) after this job
  }
}

$("key").value = localStorage.getItem("fleet-api-key") ?? "";
$("key").addEventListener("change", () => {
  const key = $("key").value.trim();
  if (key === (localStorage.getItem("fleet-api-key") ?? "")) return; // listed already
  localStorage.setItem("fleet-api-key", key);
  $("error").textContent = "";
  loadModels();
});
$("model").addEventListener("change", showModel);
$("job").addEventListener("submit", submit);
loadModels();
