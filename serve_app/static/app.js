// genserve playground: a thin client of the public HTTP API (no build step, no framework).
// The key lives in localStorage; every call sends it as a Bearer token.
"use strict";

const KEY_STORAGE = "genserve.apiKey";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, param, retryAfter) {
    super(message);
    this.status = status;
    this.param = param;
    this.retryAfter = retryAfter;
  }
  friendly() {
    if (this.status === 401) return "The API key was rejected. Check it and save it again.";
    if (this.status === 429) return `Rate limited: ${this.message}` + (this.retryAfter ? ` (retry in ${this.retryAfter} s)` : "");
    if (this.status === 0) return "The server is unreachable.";
    return this.message;
  }
}

function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

async function api(method, path, body, { raw = false, signal } = {}) {
  const headers = { Authorization: `Bearer ${apiKey()}` };
  // A FormData body (uploads) sets its own multipart Content-Type with the boundary.
  const form = body instanceof FormData;
  if (body !== undefined && !form) headers["Content-Type"] = "application/json";
  const payload = body === undefined || form ? body : JSON.stringify(body);
  let r;
  try {
    // Relative to the page: the playground also works under a route prefix (`/app/`).
    r = await fetch(path.replace(/^\//, ""), { method, headers, body: payload, signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, String(e));
  }
  if (!r.ok) {
    let err = {};
    try { err = (await r.json()).error || {}; } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, err.message || `${r.status} ${r.statusText}`, err.param, r.headers.get("Retry-After"));
  }
  return raw ? r : r.json();
}

// ---- key, models, templates --------------------------------------------------------------

// `image`: the uploaded image prompt ({id, width, height, filename, thumb}); `adapters`: the LoRA
// adapters this key may use (GET /v1/adapters), by name.
const state = { templates: new Map(), chat: [], renderSeq: 0, renderAbort: null, image: null, adapters: [] };

function setStatus(node, text, kind = "") {
  node.textContent = text;
  node.className = `status ${kind}`;
}

async function loadLists() {
  if (!apiKey()) { setStatus($("key-status"), "Enter your API key to start."); return; }
  try {
    const [models, templates] = await Promise.all([api("GET", "/v1/models"), api("GET", "/v1/templates?limit=200")]);
    fillModels(models.data);
    fillTemplates(templates.data);
    await loadAdapters();
    setStatus($("key-status"), "Key saved and accepted.", "ok");
    schedulePreview();
  } catch (e) {
    setStatus($("key-status"), e.friendly ? e.friendly() : String(e), "error");
  }
}

function fillSelect(select, items, keepFirst) {
  const current = select.value;
  while (select.options.length > (keepFirst ? 1 : 0)) select.remove(select.options.length - 1);
  for (const [value, label] of items) select.append(el("option", { value, text: label }));
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

function fillModels(models) {
  const image = models.filter((m) => m.capability === "image");
  const chat = models.filter((m) => m.capability === "chat");
  fillSelect($("model"), image.map((m) => [m.id, `${m.id} (${m.native_size})`]), true);
  fillSelect($("chat-model"), chat.map((m) => [m.id, m.id]), false);
}

function fillTemplates(templates) {
  state.templates = new Map(templates.map((t) => [t.name, t]));
  fillSelect($("template"), templates.map((t) => [t.name, `${t.name} · ${t.category}`]), true);
  renderTemplateVars();
}

function renderTemplateVars() {
  const t = state.templates.get($("template").value);
  const list = $("template-vars-list");
  list.replaceChildren();
  $("template-vars").hidden = !t;
  if (!t) return;
  list.append(el("p", { class: "hint", text: t.template + (t.defaults ? `  [${t.defaults}]` : "") }));
  // {prompt} is filled from the prompt box, so it gets no input of its own.
  for (const name of t.variables.filter((v) => v !== "prompt")) {
    const id = `var-${name}`;
    const input = el("input", { id, "data-var": name, required: "" });
    input.addEventListener("input", schedulePreview);
    list.append(el("label", { for: id, text: name }), input);
  }
}

// ---- LoRA adapters: GET /v1/adapters, a checkbox and a weight slider each -------------------

async function loadAdapters() {
  const list = $("lora-list");
  let adapters;
  try {
    adapters = (await api("GET", "/v1/adapters")).data.filter((a) => a.kind === "diffusion");
  } catch (e) {
    list.replaceChildren(el("p", { class: "error small", role: "alert", text: `Adapters: ${e.friendly ? e.friendly() : e}` }));
    return;
  }
  const before = new Map(chosenLoras().map((l) => [l.name, l.weight]));  // kept across a reload of the list
  state.adapters = adapters;
  list.replaceChildren();
  if (!adapters.length) {
    list.append(el("p", { class: "muted small", text: "None available to this key." }));
    return;
  }
  adapters.forEach((a, i) => {
    const id = `lora-${i}`;
    const box = el("input", { type: "checkbox", id, "data-lora": a.name });
    const label = el("label", { for: id, class: "check", title: `${a.id} · rank ${a.rank} · ${a.owned_by}` }, box,
                     ` ${a.name} `, el("span", { class: "hint", text: a.base_model }));
    const slider = el("input", { type: "range", id: `${id}-weight`, min: "-2", max: "2", step: "0.05", value: "1",
                                 "aria-label": `${a.name} weight`, "data-lora-weight": a.name, disabled: "" });
    const out = el("output", { for: slider.id, text: "1" });
    if (before.has(a.name)) {
      box.checked = true;
      slider.disabled = false;
      slider.value = String(before.get(a.name));
      out.textContent = slider.value;
    }
    box.addEventListener("change", () => { slider.disabled = !box.checked; schedulePreview(); });
    slider.addEventListener("input", () => { out.textContent = slider.value; schedulePreview(); });
    list.append(el("div", { class: "lora-row" }, label, slider, out));
  });
}

function chosenLoras() {
  return [...document.querySelectorAll("[data-lora]:checked")].map((box) => {
    const slider = document.querySelector(`[data-lora-weight="${CSS.escape(box.dataset.lora)}"]`);
    return { name: box.dataset.lora, weight: Number(slider.value) };
  });
}

// ---- image prompt: drop or choose a file, POST /v1/files, then its id starts the prompt -----

async function useImage(file) {
  if (!file) return;
  const status = $("image-status");
  setStatus(status, `Uploading ${file.name}…`);
  status.setAttribute("role", "status");
  const form = new FormData();
  form.append("file", file, file.name || "image");
  form.append("purpose", "vision");
  let uploaded;
  try {
    uploaded = await api("POST", "/v1/files", form);
  } catch (e) {
    // The server's refusal (413 too large, 422 not an image, ...) as it worded it.
    const where = e.param ? ` (${e.param})` : "";
    setStatus(status, `Upload refused: ${e.friendly ? e.friendly() : e}${where}`, "error");
    status.setAttribute("role", "alert");
    return;
  }
  clearImage();
  state.image = { ...uploaded, thumb: URL.createObjectURL(file) };
  $("image-thumb").src = state.image.thumb;
  $("image-name").textContent = `${uploaded.filename} · ${uploaded.width}×${uploaded.height} · ${uploaded.id}`;
  $("image-chosen").hidden = false;
  setStatus(status, "Uploaded: the prompt starts from this image.", "ok");
  status.setAttribute("role", "status");
  schedulePreview();
}

function clearImage() {
  if (state.image) URL.revokeObjectURL(state.image.thumb);
  state.image = null;
  $("image-chosen").hidden = true;
  $("image-thumb").removeAttribute("src");
  $("image-file").value = "";
}

function initImageDrop() {
  const zone = $("drop-zone");
  $("image-file").addEventListener("change", (e) => useImage(e.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    useImage(e.dataTransfer.files[0]);
  });
  $("image-remove").addEventListener("click", () => {
    // Only the form forgets it: the upload stays in /v1/files (a queued job may still read it).
    clearImage();
    setStatus($("image-status"), "Image removed.");
    schedulePreview();
  });
  $("image-weight").addEventListener("input", () => {
    $("image-weight-value").textContent = $("image-weight").value;
    schedulePreview();
  });
}

// ---- the request both preview and generate send -------------------------------------------

function requestBody() {
  const body = { prompt: $("prompt").value.trim() };
  const model = $("model").value;
  if (model) body.model = model;
  const size = $("size").value.trim();
  if (size) body.size = size;
  const steps = $("steps").value.trim();
  if (steps) body.steps = Number(steps);
  const seed = $("seed").value.trim();
  if (seed) body.seed = Number(seed);
  const template = $("template").value;
  if (template) {
    body.template = template;
    body.variables = {};
    for (const input of document.querySelectorAll("[data-var]")) body.variables[input.dataset.var] = input.value;
    // A request needs prompt text; a template that doesn't use {prompt} ignores it.
    if (!body.prompt) body.prompt = template;
  }
  if (state.image) {
    // Midjourney's form: the image (an upload's id) first, its weight as --iw unless typed already.
    const iw = /(^|\s)--iw(\s|$)/.test(body.prompt) ? "" : ` --iw ${$("image-weight").value}`;
    body.prompt = `${state.image.id} ${body.prompt}${iw}`.trim();
  }
  const loras = chosenLoras();
  if (loras.length) body.loras = loras;
  return body;
}

// ---- live parameter preview (POST /v1/prompts/render, debounced) ---------------------------

let previewTimer = null;
function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(preview, 350);
}

function fmt(v) { return Array.isArray(v) ? v.join(", ") : String(v); }

async function preview() {
  const out = $("parsed");
  const body = requestBody();
  if (!body.prompt || !apiKey()) {
    out.replaceChildren(el("p", { class: "muted", text: "Type a prompt to see its parameters." }));
    return;
  }
  if (state.renderAbort) state.renderAbort.abort();
  state.renderAbort = new AbortController();
  const seq = ++state.renderSeq;
  try {
    const r = await api("POST", "/v1/prompts/render", body, { signal: state.renderAbort.signal });
    if (seq !== state.renderSeq) return;
    const dl = el("dl", { class: "params", id: "parsed-params" });
    const add = (k, v, key) => { dl.append(el("dt", { text: k }), el("dd", { text: v, "data-param": key })); };
    add("text", r.prompt || "—", "prompt");
    add("model", r.model, "model");
    add("size", `${r.width}×${r.height}`, "size");
    const f = r.params;
    if (f.aspect_ratio) add("--ar", `${f.aspect_ratio[0]}:${f.aspect_ratio[1]} → ${r.width}×${r.height}`, "aspect_ratio");
    add("steps", f.quality !== null ? `${r.steps} (--q ${f.quality})` : r.steps, "steps");
    add("guidance", f.stylize !== null ? `${fmt(r.guidance_scale)} (--s ${f.stylize})` : fmt(r.guidance_scale), "guidance");
    if (f.chaos !== null) add("--c", f.chaos, "chaos");
    if (r.negative_prompt) add("--no", r.negative_prompt, "negative");
    // Without a seed the server draws a random one per request: the preview's would mislead.
    if (f.seed !== null) add("--seed", f.seed, "seed");
    else add("seed", body.seed !== undefined ? body.seed : "random", "seed");
    if (r.tile) add("--tile", "on", "tile");
    // A dry run doesn't fetch images: it shows the image prompt as written and its --iw.
    if (f.image_prompts && f.image_prompts.length) {
      add("image", `${f.image_prompts.join(", ")} (--iw ${f.image_weight !== null ? f.image_weight : 1})`, "image_prompts");
    }
    if (r.loras) add("LoRA", r.loras.map((l) => `${l.name} × ${l.weight}`).join(", "), "loras");
    if (r.weighted_prompts.length) {
      const dd = el("dd", { "data-param": "weights" });
      for (const w of r.weighted_prompts) dd.append(el("span", { class: "chip", text: `${w.text} × ${w.weight}` }));
      dl.append(el("dt", { text: "weights" }), dd);
    }
    out.replaceChildren(dl);
  } catch (e) {
    if (e.name === "AbortError" || seq !== state.renderSeq) return;
    const where = e.param ? ` (${e.param})` : "";
    out.replaceChildren(el("p", { class: "error", id: "parsed-error", role: "alert", text: e.friendly() + where }));
  }
}

// ---- generate: POST /v1/jobs, poll, gallery ------------------------------------------------

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function showProgress(fraction, text) {
  const bar = $("progress");
  bar.hidden = false;
  bar.value = Math.round(fraction * 100);
  bar.setAttribute("aria-valuetext", text);
  setStatus($("progress-text"), text);
}

function jobText(job) {
  if (job.status === "queued") {
    const ahead = job.queue_position ? ` (${job.queue_position} ahead)` : "";
    return `Queued${ahead}…`;
  }
  if (job.status === "running") return `Generating… ${Math.round(job.progress * 100)} %`;
  if (job.status === "succeeded") return "Done: 100 %";
  if (job.status === "cancelled") return "Cancelled.";
  return `Failed: ${job.error || "no reason given"}`;
}

// The job's latest partial image (GET /v1/jobs/{id}/preview, 404 until the first one), shown
// while it runs; `state.previewUrl` is the object URL on screen (revoked when replaced).
async function showLivePreview(jobId) {
  let r;
  try {
    r = await api("GET", `/v1/jobs/${jobId}/preview`, undefined, { raw: true });
  } catch (e) {
    if (e.status === 404) return;  // none yet, or the job just ended
    throw e;
  }
  const step = r.headers.get("X-Genserve-Preview-Step"), total = r.headers.get("X-Genserve-Preview-Total");
  const url = URL.createObjectURL(await r.blob());
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = url;
  $("live-preview-img").src = url;
  $("live-preview-img").dataset.step = step;
  $("live-preview-caption").textContent = `Preview at step ${step} of ${total}`;
  $("live-preview").hidden = false;
}

async function submitJob(body) {
  // Partial images need the model's preview decoder: without one (422 naming partial_images) the
  // job is submitted again without them.
  if (!$("live-preview-on").checked) return api("POST", "/v1/jobs", body);
  try {
    return await api("POST", "/v1/jobs", { ...body, partial_images: 3 });
  } catch (e) {
    if (e.status !== 422 || e.param !== "partial_images") throw e;
    $("live-preview-caption").textContent = "This model has no live preview.";
    return api("POST", "/v1/jobs", body);
  }
}

async function generate(ev) {
  ev.preventDefault();
  const button = $("generate");
  const body = requestBody();
  if (!body.prompt) { setStatus($("progress-text"), "Write a prompt first.", "error"); $("prompt").focus(); return; }
  button.disabled = true;
  $("live-preview").hidden = true;
  try {
    showProgress(0, "Submitting…");
    let job = await submitJob(body);
    while (job.status === "queued" || job.status === "running") {
      showProgress(job.progress, jobText(job));
      if (job.status === "running" && $("live-preview-on").checked) await showLivePreview(job.id);
      await sleep(300);
      job = await api("GET", `/v1/jobs/${job.id}`);
    }
    showProgress(job.status === "succeeded" ? 1 : job.progress, jobText(job));
    if (job.status === "succeeded") addToGallery(job);
    else $("progress-text").classList.add("error");
  } catch (e) {
    setStatus($("progress-text"), e.friendly ? e.friendly() : String(e), "error");
  } finally {
    button.disabled = false;
  }
}

function addToGallery(job) {
  const p = job.params || {};
  job.results.forEach((res, i) => {
    const item = el("li", { class: "gen", "data-job": job.id });
    const alt = `Generated image for: ${job.prompt}`;
    item.append(el("img", { src: res.url, alt, width: p.width || "", height: p.height || "" }));
    const meta = el("div", { class: "meta" });
    meta.append(el("p", { text: job.prompt }));
    const g = Array.isArray(p.guidance_scale) ? p.guidance_scale[i] : p.guidance_scale;
    meta.append(el("p", { class: "muted", text: `${job.model} · ${p.width}×${p.height} · ${p.steps} steps · guidance ${g} · seed ${res.seed}` }));
    if (p.negative_prompt) meta.append(el("p", { class: "muted", text: `no: ${p.negative_prompt}` }));
    if (p.init_image) meta.append(el("p", { class: "muted", text: `from image ${p.init_image.source} · strength ${fmt(p.strength)}` }));
    if (p.loras) meta.append(el("p", { class: "muted", text: `LoRA: ${p.loras.map((l) => `${l.name} × ${l.weight}`).join(", ")}` }));
    if (job.generation_id) meta.append(ratingControl(job.generation_id, `${job.id}-${i}`));
    item.append(meta);
    $("gallery").prepend(item);
  });
}

function ratingControl(generationId, uid) {
  const fs = el("fieldset", { class: "rating" });
  fs.append(el("legend", { text: "Rate" }));
  const status = el("span", { class: "status small", role: "status", "aria-live": "polite" });
  const labels = [];
  const paint = (n) => labels.forEach((l, i) => l.classList.toggle("on", i < n));
  for (let n = 1; n <= 5; n++) {
    const id = `rate-${uid}-${n}`;
    const input = el("input", { type: "radio", name: `rate-${uid}`, id, value: String(n) });
    const label = el("label", { for: id, title: `${n} of 5`, text: "★" });
    label.append(el("span", { class: "visually-hidden", text: `${n} of 5` }));
    labels.push(label);
    input.addEventListener("change", async () => {
      paint(n);
      try {
        const g = await api("POST", `/v1/generations/${generationId}/rating`, { rating: n });
        setStatus(status, `rated ${g.rating}/5`, "ok small");
      } catch (e) {
        setStatus(status, e.friendly(), "error small");
      }
    });
    fs.append(input, label);
  }
  fs.append(status);
  return fs;
}

// ---- chat: POST /v1/chat/completions with stream: true, SSE read from the response body ----

async function sendChat(ev) {
  ev.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  state.chat.push({ role: "user", content: text });
  $("chat-log").append(el("li", { class: "user", text }));
  const bubble = el("li", { class: "assistant", "aria-busy": "true" });
  $("chat-log").append(bubble);
  $("chat-send").disabled = true;
  setStatus($("chat-status"), "Streaming…");
  let reply = "";
  try {
    const body = { model: $("chat-model").value, messages: state.chat, stream: true,
                   stream_options: { include_usage: true }, max_tokens: 64 };
    const r = await api("POST", "/v1/chat/completions", body, { raw: true });
    let usage = null;
    for await (const event of sseEvents(r.body)) {
      if (event.error) throw new ApiError(500, event.error.message);
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) { reply += delta.content; bubble.textContent = reply; }
      if (event.usage) usage = event.usage;
    }
    state.chat.push({ role: "assistant", content: reply });
    setStatus($("chat-status"), usage ? `${usage.completion_tokens} tokens` : "Done.", "ok");
  } catch (e) {
    state.chat.pop();
    setStatus($("chat-status"), e.friendly ? e.friendly() : String(e), "error");
    if (!reply) bubble.remove();
  } finally {
    bubble.removeAttribute("aria-busy");
    $("chat-send").disabled = false;
    input.focus();
  }
}

// Yields the JSON of each `data:` event until `data: [DONE]`.
async function* sseEvents(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const raw = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = raw.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---- tabs (arrow keys move between them, as the ARIA tabs pattern asks) --------------------

function selectTab(tab) {
  for (const t of document.querySelectorAll("[role=tab]")) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  tab.focus();
}

function initTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
      if (next === undefined) return;
      e.preventDefault();
      selectTab(tabs[(next + tabs.length) % tabs.length]);
    });
  });
}

// ---- wiring ----------------------------------------------------------------------------------

function init() {
  initTabs();
  initImageDrop();
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    loadLists();
  });
  for (const id of ["prompt", "size", "steps", "seed"]) $(id).addEventListener("input", schedulePreview);
  $("model").addEventListener("change", schedulePreview);
  $("template").addEventListener("change", () => { renderTemplateVars(); schedulePreview(); });
  $("gen-form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("gen-form").requestSubmit();
  });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-clear").addEventListener("click", () => {
    state.chat = [];
    $("chat-log").replaceChildren();
    setStatus($("chat-status"), "New conversation.");
  });
  loadLists();
}

document.addEventListener("DOMContentLoaded", init);
