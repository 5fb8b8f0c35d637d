// The generation page: submits a job, follows its event stream, shows the edge map, previews and result.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
let currentJob = null;

keyInput.value = localStorage.getItem("apiKey") || "";
keyInput.addEventListener("change", () => localStorage.setItem("apiKey", keyInput.value));
$("sensitivity").addEventListener("input", (event) => {
  $("sensitivity-value").textContent = Number(event.target.value).toFixed(2);
});
$("generate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  generate().catch((error) => showError(error.message));
});
$("cancel").addEventListener("click", () => {
  if (currentJob) call(`/jobs/${currentJob}`, { method: "DELETE" }).catch((error) => showError(error.message));
});

async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: { "x-api-key": keyInput.value } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function generate() {
  localStorage.setItem("apiKey", keyInput.value);
  showError(null);
  for (const id of ["edges", "preview", "result"]) $(id).removeAttribute("src");
  $("download").hidden = true;
  const form = new FormData($("generate-form"));
  const edgesForm = new FormData();
  edgesForm.append("image", form.get("image"));
  call("/preprocess", { method: "POST", body: edgesForm })
    .then(async (response) => { $("edges").src = URL.createObjectURL(await response.blob()); })
    .catch((error) => showError(error.message));

  $("submit").disabled = true;
  try {
    const job = await (await call("/jobs", { method: "POST", body: form })).json();
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
  const where = job.status === "queued" && job.queue_position !== undefined ? ` (position ${job.queue_position + 1})` : "";
  $("status").textContent = total ? `${job.status}${where}: step ${step} of ${total}` : `${job.status}${where}`;
}

function showError(message) {
  $("error").hidden = !message;
  $("error").textContent = message || "";
}
