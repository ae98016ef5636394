"use strict";
// The playground. The form is built from the server's own model schema (GET /api/v3/models,
// generated from the field table the validator uses), so it lists exactly the fields the server
// accepts, with their ranges and defaults; the server validates, and its message is shown.

const KEY_STORE = "wan-vace.api-key";
const TERMINAL = new Set(["completed", "failed", "cancelled", "timeout", "deleted"]);
const ACTIVE = new Set(["created", "processing"]);
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);
const state = { modelId: null, schema: null, controls: [], watching: null, shown: null, uploads: 0, jobsTimer: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (typeof v === "function") node[k] = v;
    else if (v === true) {
      // Both: the attribute is what the markup means (autoplay needs `muted` at load), the
      // property what the element does now.
      node.setAttribute(k, "");
      if (k in node) node[k] = true;
    } else node.setAttribute(k, String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showError(box, message) {
  box.textContent = message || "";
  box.hidden = !message;
}

// --- the API ----------------------------------------------------------------------------------

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

// Every answer is WaveSpeed's envelope {code, message, data}; a refusal's message is the reason.
async function readEnvelope(res) {
  let env = null;
  try {
    env = await res.json();
  } catch (_) {
    // not JSON: a proxy's error page, say
  }
  if (!res.ok || !env || env.code !== 200) {
    const err = new Error((env && env.message) || `HTTP ${res.status} ${res.statusText}`);
    err.status = res.status;
    throw err;
  }
  return env.data;
}

async function api(method, path, body) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new Error(`The server did not answer (${e.message})`);
  }
  return readEnvelope(res);
}

// The two-step upload the SDKs use: a ticket, then a PUT of the bytes that needs no key.
async function upload(file) {
  const ticket = await api("POST", "api/v3/media/uploads", {
    filename: file.name, size: file.size, content_type: file.type || "",
  });
  const up = ticket.upload;
  let res;
  try {
    res = await fetch(up.url, { method: up.method || "PUT", headers: up.headers || {}, body: file });
  } catch (e) {
    throw new Error(`The upload did not reach the server (${e.message})`);
  }
  const done = await readEnvelope(res);
  return done.download_url || ticket.download_url;
}

// --- the form ---------------------------------------------------------------------------------

// How to render a schema property. Media fields follow WaveSpeed's naming (`*image`, `*video`,
// `images`), as its own apps read the schema; anything unknown (a new list kind, say) is a JSON box.
function kindOf(name, prop) {
  const n = name.toLowerCase();
  const items = prop.items || {};
  if (prop["x-ui-component"] === "uploader") return prop.type === "array" ? "media_list" : "media";
  if (prop.enum) return "enum";
  if (prop.type === "string" && /(image|video)$/.test(n)) return "media";
  if (prop.type === "array" && items.type === "string" && !items.enum && /(images|videos)$/.test(n)) return "media_list";
  if (prop.type === "array" && Array.isArray(items.enum)) return "enum_list";
  if (["string", "integer", "number", "boolean"].includes(prop.type)) return prop.type;
  return "json";
}

function acceptOf(name, prop) {
  return prop["x-accept"] || (/video/i.test(name) ? "video/*" : "image/*");
}

function hintOf(kind, prop) {
  const parts = [];
  const lo = prop.minimum, hi = prop.maximum;
  if (lo !== undefined && hi !== undefined) parts.push(`${lo} to ${hi}`);
  else if (lo !== undefined) parts.push(`at least ${lo}`);
  else if (hi !== undefined) parts.push(`at most ${hi}`);
  if (prop.maxItems !== undefined && kind !== "json") parts.push(`up to ${prop.maxItems}`);
  if (prop.minItems !== undefined) parts.push(`at least ${prop.minItems} item${prop.minItems === 1 ? "" : "s"}`);
  if (prop.default !== undefined) parts.push(`default ${JSON.stringify(prop.default)}`);
  const head = parts.join(" · ");
  return [head, prop.description || ""].filter(Boolean).join(" · ");
}

function preview(box, urls, accept) {
  box.replaceChildren();
  for (const url of urls) {
    if (!/^(https?:|data:|blob:|\/)/.test(url)) continue;
    box.append(accept.startsWith("video")
      ? el("video", { src: url, muted: true, preload: "metadata", title: url })
      : el("img", { src: url, alt: "", title: url }));
  }
}

function mediaControl(name, prop, kind, id, status) {
  const many = kind === "media_list";
  const accept = acceptOf(name, prop);
  const text = many
    ? el("textarea", { id, rows: 2, placeholder: "one URL per line", spellcheck: "false" })
    : el("input", { id, type: "url", placeholder: "a URL, or upload a file", spellcheck: "false" });
  const pickerId = `${id}-file`;
  const picker = el("input", {
    id: pickerId, type: "file", accept, multiple: many, class: "visually-hidden", "aria-label": `Upload ${accept.split("/")[0]} for ${name}`,
  });
  const pick = el("label", { for: pickerId, class: "button small", text: many ? "Upload files…" : "Upload file…" });
  const box = el("div", { class: "preview" });
  const urls = () => text.value.split(/\s*\n\s*/).map((s) => s.trim()).filter(Boolean);
  const refresh = () => preview(box, urls(), accept);
  text.addEventListener("change", refresh);
  picker.addEventListener("change", async () => {
    const files = [...picker.files];
    picker.value = "";  // picking the same file again must fire `change` again
    for (const file of files) {
      state.uploads += 1;
      updateSubmit();
      status.className = "upload-status muted";
      status.textContent = `Uploading ${file.name}…`;
      try {
        const url = await upload(file);
        text.value = many ? [...urls(), url].join("\n") : url;
        status.textContent = `Uploaded ${file.name}`;
        refresh();
      } catch (e) {
        status.className = "upload-status error-text";
        status.textContent = `${file.name}: ${e.message}`;
      } finally {
        state.uploads -= 1;
        updateSubmit();
      }
    }
  });
  const control = el("div", { class: "media" }, el("div", { class: "media-row" }, text, pick, picker), box);
  return {
    node: control,
    get: () => (many ? urls() : text.value.trim() || undefined),
    set: (v) => {
      text.value = many ? (v || []).join("\n") : v || "";
      refresh();
    },
  };
}

function basicControl(name, prop, kind, id) {
  if (kind === "boolean") {
    const box = el("input", { id, type: "checkbox" });
    return { node: box, get: () => box.checked, set: (v) => { box.checked = !!v; }, inline: true };
  }
  if (kind === "enum") {
    const sel = el("select", { id });
    if (prop.default === undefined) sel.append(el("option", { value: "", text: "(none)" }));
    for (const c of prop.enum) sel.append(el("option", { value: String(c), text: String(c) }));
    return { node: sel, get: () => sel.value || undefined, set: (v) => { sel.value = v === undefined ? "" : String(v); } };
  }
  if (kind === "enum_list") {
    const group = el("span", { class: "checks", role: "group", "aria-labelledby": `${id}-label` });
    const boxes = prop.items.enum.map((c) => {
      const b = el("input", { id: `${id}-${c}`, type: "checkbox", value: String(c) });
      group.append(el("label", { class: "check" }, b, ` ${c}`));
      return b;
    });
    return {
      node: group,
      get: () => boxes.filter((b) => b.checked).map((b) => b.value),
      set: (v) => boxes.forEach((b) => { b.checked = (v || []).includes(b.value); }),
    };
  }
  if (kind === "integer" || kind === "number") {
    const input = el("input", {
      id, type: "number", inputmode: kind === "integer" ? "numeric" : "decimal",
      step: kind === "integer" ? "1" : "any", min: prop.minimum, max: prop.maximum,
    });
    return {
      node: input,
      // Sent as typed: the server's validator owns the rules and says what is wrong.
      get: () => (input.value.trim() === "" ? undefined : Number(input.value)),
      set: (v) => { input.value = v === undefined ? "" : String(v); },
    };
  }
  if (kind === "string") {
    const long = /prompt/.test(name);
    const input = long
      ? el("textarea", { id, rows: name === "prompt" ? 3 : 2 })
      : el("input", { id, type: "text", spellcheck: "false" });
    return { node: input, get: () => (input.value === "" ? undefined : input.value), set: (v) => { input.value = v || ""; } };
  }
  const input = el("input", { id, type: "text", spellcheck: "false", class: "json", placeholder: "JSON, e.g. [[0, 0, 64, 64]]" });
  return {
    node: input,
    get: () => {
      const raw = input.value.trim();
      if (raw === "") return undefined;
      try {
        return JSON.parse(raw);
      } catch (_) {
        throw new Error(`${name}: not valid JSON (${raw})`);
      }
    },
    set: (v) => { input.value = v === undefined ? "" : JSON.stringify(v); },
  };
}

function buildForm(schema) {
  const props = schema.properties || {};
  const required = new Set(schema.required || []);
  const order = schema["x-order-properties"] || Object.keys(props);
  const names = [...order, ...Object.keys(props).filter((n) => !order.includes(n))].filter((n) => props[n]);
  const main = el("div", { class: "fields" });
  const extFields = el("div", { class: "fields" });
  const ext = el("details", { class: "extensions" },
    el("summary", { text: "Extensions" }),
    el("p", { class: "muted", text: "Fields only this server has (x-extension); WaveSpeed's API ignores them." }),
    extFields);
  state.controls = [];
  for (const name of names) {
    const prop = props[name];
    const kind = kindOf(name, prop);
    const id = `f-${name}`;
    const hintId = `${id}-hint`;
    const status = el("span", { class: "upload-status muted", "aria-live": "polite" });
    const c = kind.startsWith("media") ? mediaControl(name, prop, kind, id, status) : basicControl(name, prop, kind, id);
    const target = c.node.matches("input, select, textarea") ? c.node : c.node.querySelector("input, textarea");
    if (target && kind !== "enum_list") target.setAttribute("aria-describedby", hintId);
    const labelAttrs = kind === "enum_list" ? { id: `${id}-label` } : { for: id };
    const label = el(kind === "enum_list" ? "span" : "label", { ...labelAttrs, class: "label" },
      el("code", { text: name }), required.has(name) ? el("span", { class: "req", text: " required" }) : null);
    const hint = el("small", { id: hintId, class: "hint", text: hintOf(kind, prop) });
    const row = el("div", { class: `field kind-${kind}${c.inline ? " inline" : ""}`, "data-field": name },
      c.inline ? el("div", { class: "inline-row" }, c.node, label) : label,
      c.inline ? null : c.node, hint, status);
    (prop["x-extension"] ? extFields : main).append(row);
    state.controls.push({ name, prop, kind, required: required.has(name), ...c });
  }
  const root = $("fields");
  root.replaceChildren(main);
  if (extFields.childElementCount) root.append(ext);
  setDefaults();
}

function setDefaults() {
  for (const c of state.controls) c.set(c.prop.default);
}

// The body: what the user set, leaving out what equals the default (the server fills those in).
function payload() {
  const body = {};
  for (const c of state.controls) {
    const v = c.get();
    if (v === undefined) continue;
    const dflt = c.prop.default !== undefined ? c.prop.default : (c.prop.type === "array" ? [] : undefined);
    if (!c.required && JSON.stringify(v) === JSON.stringify(dflt)) continue;
    body[c.name] = v;
  }
  return body;
}

function updateSubmit() {
  const btn = $("submit");
  btn.disabled = !state.schema || state.uploads > 0;
  btn.textContent = state.uploads > 0 ? "Uploading…" : "Generate";
}

async function loadModel() {
  showError($("form-error"), "");
  try {
    const models = await api("GET", "api/v3/models");
    const model = models[0];
    const run = (model.api_schema.api_schemas || []).find((s) => s.type === "model_run");
    state.modelId = model.model_id;
    state.schema = run.request_schema;
    $("model-name").textContent = `${model.name} · ${model.model_id}`;
    buildForm(state.schema);
    updateSubmit();
    refreshJobs();
  } catch (e) {
    const hint = e.status === 401 ? " Enter the server's API key above (its log prints the key it made at first start)." : "";
    showError($("form-error"), `Could not load the model schema: ${e.message}.${hint}`);
  }
}

async function submit(ev) {
  ev.preventDefault();
  showError($("form-error"), "");
  let body;
  try {
    body = payload();
  } catch (e) {
    showError($("form-error"), e.message);
    return;
  }
  $("submit").disabled = true;
  try {
    const data = await api("POST", `api/v3/${state.modelId}`, body);
    watch(data);
    $("result-title").scrollIntoView({ block: "nearest" });  // one column: the result is below
  } catch (e) {
    showError($("form-error"), e.message);
  } finally {
    updateSubmit();
    refreshJobs();
  }
}

// --- the result -------------------------------------------------------------------------------

function watch(data) {
  state.watching = data.id;
  state.shown = null;
  $("videos").replaceChildren();
  $("result-meta").textContent = "";
  showError($("result-error"), "");
  render(data);
  if (!TERMINAL.has(data.status)) setTimeout(() => poll(data.id), POLL_MS);
}

async function poll(id) {
  if (id !== state.watching) return;
  let data;
  try {
    data = await api("GET", `api/v3/predictions/${encodeURIComponent(id)}/result`);
  } catch (e) {
    showError($("result-error"), e.message);
    // A dropped connection or a busy server passes; a refusal (bad key, unknown id) stays.
    if (!e.status || e.status >= 500 || e.status === 429) setTimeout(() => poll(id), 2 * POLL_MS);
    return;
  }
  if (id !== state.watching) return;
  showError($("result-error"), "");
  render(data);
  if (TERMINAL.has(data.status)) refreshJobs();
  else setTimeout(() => poll(id), POLL_MS);
}

function mediaUrl(value) {
  // A job that asked for base64 outputs answers bare base64 instead of a URL.
  return /^(https?:|data:|blob:|\/)/.test(value) ? value : `data:video/mp4;base64,${value}`;
}

function figure(caption, media, link) {
  return el("figure", {}, media, el("figcaption", {}, caption, link ? " · " : null,
    link ? el("a", { href: link, download: "", text: "download" }) : null));
}

function video(url, label) {
  return el("video", { src: url, controls: true, autoplay: true, muted: true, loop: true, playsInline: true, "aria-label": label });
}

function render(d) {
  const bar = $("progress");
  const text = $("progress-text");
  const pct = (p) => `${Math.round((p || 0) * 100)}%`;
  const short = d.id.slice(0, 8);
  bar.dataset.status = d.status;
  if (d.status === "created") {
    bar.value = 0;
    const ahead = d.queue_position;
    text.textContent = `Job ${short}: queued${ahead === undefined ? "" : ahead === 0 ? ", next in line" : `, ${ahead} ahead`}`;
  } else if (d.status === "processing") {
    bar.value = d.progress || 0;
    text.textContent = `Job ${short}: processing ${pct(d.progress)}`;
  } else if (d.status === "completed") {
    bar.value = 1;
    const secs = d.executionTime ? ` in ${(d.executionTime / 1000).toFixed(1)} s` : "";
    text.textContent = `Job ${short}: completed${secs}`;
  } else {
    text.textContent = `Job ${short}: ${d.status}`;
    if (d.error) showError($("result-error"), d.code ? `${d.error} (code ${d.code})` : d.error);
  }
  if (d.status === "completed" && state.shown !== d.id && d.outputs && d.outputs.length) {
    state.shown = d.id;
    showVideos(d);
  }
}

function showVideos(d) {
  const box = $("videos");
  const out = mediaUrl(d.outputs[0]);
  const items = [figure("Output", video(out, "Output video"), out)];
  const cond = d.conditioning || {};
  if (cond.video) items.push(figure("Control video (as fed to the model)", video(cond.video, "Control video"), cond.video));
  if (cond.mask) items.push(figure("Mask (white = generate)", video(cond.mask, "Mask video"), cond.mask));
  for (const [i, url] of (cond.reference_images || []).entries()) {
    items.push(figure(`Reference image ${i + 1}`, el("img", { src: url, alt: `Reference image ${i + 1} as fed to the model` }), null));
  }
  box.replaceChildren(...items);
  const meta = [];
  if (d.seed !== undefined) meta.push(`seed ${d.seed}`);
  if (d.render_size) meta.push(`rendered at ${d.render_size.join("×")}`);
  if (cond.recipe) meta.push(`recipe ${typeof cond.recipe === "string" ? cond.recipe : JSON.stringify(cond.recipe)}`);
  if (d.has_nsfw_contents && d.has_nsfw_contents[0]) meta.push("flagged by the safety checker");
  $("result-meta").textContent = meta.join(" · ");
}

// --- recent jobs ------------------------------------------------------------------------------

async function refreshJobs() {
  clearTimeout(state.jobsTimer);
  loadHealth();
  if (!state.schema) return;
  let page;
  try {
    page = await api("POST", "api/v3/predictions", { page: 1, page_size: 10, include_inputs: true });
    showError($("jobs-error"), "");
  } catch (e) {
    showError($("jobs-error"), e.message);
    return;
  }
  const rows = page.items.map((j) => {
    const prompt = (j.input && j.input.prompt) || "";
    const actions = el("td", { class: "actions-cell" });
    if (ACTIVE.has(j.status)) {
      actions.append(el("button", { type: "button", class: "small", text: "Cancel", "aria-label": `Cancel job ${j.id}`, onclick: () => cancel(j.id) }));
    }
    actions.append(el("button", { type: "button", class: "small secondary", text: "Show", "aria-label": `Show job ${j.id}`, onclick: () => watch(j) }));
    const status = j.status === "processing" ? `processing ${Math.round((j.progress || 0) * 100)}%` : j.status;
    return el("tr", { "data-id": j.id },
      el("td", { text: new Date(j.created_at).toLocaleTimeString(), title: j.created_at }),
      el("td", { class: "prompt", text: prompt, title: prompt }),
      el("td", {}, el("span", { class: `badge ${j.status}`, text: status, title: j.error || "" })),
      actions);
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "muted", text: "No jobs yet." })));
  $("jobs").tBodies[0].replaceChildren(...rows);
  if (page.items.some((j) => ACTIVE.has(j.status))) state.jobsTimer = setTimeout(refreshJobs, 3 * POLL_MS);
}

async function cancel(id) {
  try {
    const d = await api("POST", `api/v3/predictions/${encodeURIComponent(id)}/cancel`);
    if (id === state.watching) render(d);
  } catch (e) {
    showError($("jobs-error"), e.message);
  }
  refreshJobs();
}

async function loadHealth() {
  try {
    const res = await fetch("health");
    const h = await res.json();
    const model = h.model && h.model.name ? ` · model ${h.model.name}` : "";
    $("server-status").textContent =
      `Server ${h.status}${model} · ${h.queue_depth} queued · ${h.running} running · auth: ${h.auth}`;
    $("server-status").dataset.status = h.status;
  } catch (_) {
    $("server-status").textContent = "Server unreachable";
  }
}

// --- start ------------------------------------------------------------------------------------

function start() {
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModel();
  });
  $("request-form").addEventListener("submit", submit);
  $("reset").addEventListener("click", () => {
    if (state.schema) setDefaults();
  });
  $("refresh-jobs").addEventListener("click", refreshJobs);
  loadHealth();
  loadModel();
}

start();
