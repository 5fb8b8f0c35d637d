// The generation page: submits a job, follows its event stream, shows the edge map, previews and result.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
const form = $("generate-form");
let currentJob = null;
let lastSeed = null;
let errorFrom = null;
let edgesTimer = null;

keyInput.value = localStorage.getItem("apiKey") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("apiKey", keyInput.value);
  previewEdgesSoon();
  loadLoras();
  loadModelNote();
});
for (const id of ["sensitivity", "low-threshold", "high-threshold"]) $(id).addEventListener("input", showValues);
$("image").addEventListener("change", previewEdgesSoon);
for (const id of ["resolution", "low-threshold", "high-threshold"]) $(id).addEventListener("input", previewEdgesSoon);
$("reuse-seed").addEventListener("click", () => { $("seed").value = lastSeed; });
form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate().catch((error) => showError(error.message));
});
$("cancel").addEventListener("click", () => {
  if (currentJob) call(`/jobs/${currentJob}`, { method: "DELETE" }).catch((error) => showError(error.message));
});
loadFieldLimits().catch((error) => showError(`Could not read the fields' limits from /openapi.json: ${error.message}`));
loadLoras();
loadModelNote();

// Limits, defaults and choices of the controls come from the OpenAPI document (public), built from
// the same field definitions the server validates with, so the page never disagrees with the API.
async function loadFieldLimits() {
  const response = await fetch("/openapi.json");
  if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
  const fields = (await response.json()).components.schemas.GenerateForm.properties;
  for (const control of form.elements) {
    const field = fields[control.name];
    if (!field || control.type === "file") continue;
    control.title = field.description || "";
    if (control.tagName === "SELECT") {
      control.replaceChildren(...field.enum.map((name) => new Option(name, name, false, name === field.default)));
    } else if (control.type === "checkbox") {
      control.checked = field.default === true;
    } else if (control.type === "number" || control.type === "range") {
      if (field.minimum !== undefined) control.min = field.minimum;
      if (field.maximum !== undefined) control.max = field.maximum;
      if (!control.getAttribute("step")) control.step = field.multipleOf || (field.type === "integer" ? 1 : "any");
      if (field.default !== undefined) control.value = field.default;
    }
  }
  showValues();
  form.dataset.fields = "loaded";
}

// The LoRA picker: one row per LoRA of GET /models (it needs the key), each a checkbox and a weight.
async function loadLoras() {
  if (!keyInput.value) return;
  const note = $("lora-note");
  try {
    const { loras } = await (await call("/models")).json();
    $("lora-list").replaceChildren(...loras.map(loraRow));
    note.textContent = loras.length ? "" : "The server has no LoRAs (its LORA_DIR folder is empty).";
    note.hidden = loras.length > 0;
  } catch (error) {
    note.textContent = `Could not list the LoRAs: ${error.message}`;
    note.hidden = false;
  }
  form.dataset.loras = "loaded";
}

// Whether the server runs random weights (GET /info needs the key), so its noise does not look like a bug.
async function loadModelNote() {
  if (!keyInput.value) return;
  try {
    $("model-note").hidden = !(await (await call("/info")).json()).random_weights;
  } catch (error) {
    if (error.status === 503) setTimeout(loadModelNote, 2000);  // the model is still loading
    else $("model-note").hidden = true;
  }
}

function loraRow(lora) {
  const row = document.createElement("label");
  row.className = "check";
  const chosen = Object.assign(document.createElement("input"), { type: "checkbox", value: lora.name });
  chosen.dataset.lora = lora.name;
  const weight = Object.assign(document.createElement("input"), {
    type: "number", min: -2, max: 2, step: 0.05, value: 1, title: `weight of ${lora.name}`,
  });
  row.append(chosen, ` ${lora.name} `, weight);
  return row;
}

// The checked LoRAs as the loras field takes them: name:weight,name:weight.
function chosenLoras() {
  return [...document.querySelectorAll("[data-lora]")]
    .filter((box) => box.checked)
    .map((box) => `${box.dataset.lora}:${box.parentElement.querySelector("input[type=number]").value || 1}`)
    .join(",");
}

function showValues() {
  $("sensitivity-value").textContent = Number($("sensitivity").value).toFixed(2);
  $("low-threshold-value").textContent = $("low-threshold").value;
  $("high-threshold-value").textContent = $("high-threshold").value;
}

// The fields to send: an empty one is left out, so the server's default applies.
function filledFields(names) {
  const fields = new FormData(form);
  for (const [name, value] of [...fields.entries()]) {
    if (value === "" || (names && !names.includes(name))) fields.delete(name);
  }
  return fields;
}

function previewEdgesSoon() {
  clearTimeout(edgesTimer);
  edgesTimer = setTimeout(previewEdges, 250);
}

// The edge map /generate will follow, redrawn as the Canny thresholds or the resolution change.
async function previewEdges() {
  if (!$("image").files.length || !keyInput.value) return;
  try {
    const response = await call("/preprocess", {
      method: "POST", body: filledFields(["image", "resolution", "low_threshold", "high_threshold"]),
    });
    const previous = $("edges").src;
    $("edges").src = URL.createObjectURL(await response.blob());
    if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
    if (errorFrom === "edges") showError(null);
  } catch (error) {
    showError(error.message, "edges");
  }
}

async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { "x-api-key": keyInput.value } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    // The server's words are for API clients (a header); a person here typed a key into a field.
    if (response.status === 401) {
      message = keyInput.value ? "The API key is wrong: check the key you typed in the API key field."
        : "Enter the API key in the API key field.";
    }
    throw Object.assign(new Error(message), { status: response.status });
  }
  return response;
}

async function generate() {
  localStorage.setItem("apiKey", keyInput.value);
  showError(null);
  for (const id of ["preview", "result"]) $(id).removeAttribute("src");
  $("download").hidden = true;
  $("result-seed").textContent = "";
  previewEdges();

  $("loras").value = chosenLoras();
  $("submit").disabled = true;
  try {
    const job = await (await call("/jobs", { method: "POST", body: filledFields() })).json();
    currentJob = job.id;
    $("cancel").hidden = false;
    showStatus(job);
    await follow(job);
  } finally {
    $("submit").disabled = false;
    $("cancel").hidden = true;
    currentJob = null;
  }
}

// EventSource cannot send the x-api-key header, so the stream is read through fetch.
async function follow(job) {
  const response = await call(job.events_url);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = job;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event) last = await handle(event, last);
    }
  }
  if (!["succeeded", "failed", "canceled"].includes(last.status)) showError("The event stream ended early; reload the job.");
}

function parseEvent(text) {
  let kind = "message";
  const data = [];
  for (const line of text.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  return data.length ? { kind, data: JSON.parse(data.join("\n")) } : null;
}

async function handle(event, last) {
  if (event.kind === "preview") {
    $("preview").src = event.data.image;
    return last;
  }
  const job = { ...last, ...event.data };
  showStatus(job);
  if (job.status === "succeeded") {
    const blob = await (await call(job.result_url)).blob();
    const url = URL.createObjectURL(blob);
    $("result").src = url;
    $("download").href = url;
    $("download").download = `${job.id}.${blob.type === "image/gif" ? "gif" : "png"}`;
    $("download").hidden = false;
    lastSeed = job.seed;
    $("result-seed").textContent = `(seed ${job.seed})`;
    $("reuse-seed").disabled = false;
  } else if (job.status === "failed" || job.status === "canceled") {
    showError(job.error || `The job was ${job.status}.`);
  }
  return job;
}

function showStatus(job) {
  $("progress-area").hidden = false;
  const { step, total } = job.progress;
  $("progress").max = Math.max(total, 1);
  $("progress").value = step;
  const where = job.status === "queued" && job.queue_position !== null ? ` (position ${job.queue_position + 1})` : "";
  $("status").textContent = total ? `${job.status}${where}: step ${step} of ${total}` : `${job.status}${where}`;
}

function showError(message, from = "generation") {
  errorFrom = message ? from : null;
  $("error").hidden = !message;
  $("error").textContent = message || "";
}
