// The playground: the same /v1 API any client uses, with the key the person pasted (localStorage only).
// n = 1 streams generations and edits (progress bar, partial previews); n > 1 waits for the whole answer.
// "Two pictures and a slider" asks /v1/images/interpolations or /v1/images/text-diffs for all frames at once,
// then the slider shows them one at a time (no further requests).
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLING = ["prior_num_inference_steps", "prior_guidance_scale", "decoder_num_inference_steps",
  "decoder_guidance_scale", "prior_num_candidates"];
const KEY_STORE = "unclip.apiKey";
let stageSizes = [];  // the cascade's stage sizes, for the progress bar
let editing = null;  // the gallery item being edited: {b64, size}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function failure(response) {
  try {
    const body = await response.json();
    const e = body.error || {};
    return `${response.status}: ${e.message || response.statusText}` + (e.param ? ` (${e.param})` : "");
  } catch (_) {
    return `${response.status}: ${response.statusText}`;
  }
}

// The options the request carries beyond prompt: n, size, seed and the sampling fields that are filled in.
function options() {
  const body = { n: Number($("n").value || 1), size: $("size").value };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  for (const name of SAMPLING) if ($(name).value !== "") body[name] = Number($(name).value);
  const superRes = $("super_res_num_inference_steps").value;
  if (superRes !== "") body.super_res_num_inference_steps = [Number(superRes)];
  return body;
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) return status("cannot list the model: " + (await failure(response)), true);
  const model = (await response.json()).data[0];
  stageSizes = model.unclip_stage_sizes || [];
  $("size").innerHTML = "";
  for (const size of model.unclip_sizes || []) $("size").add(new Option(size, size));
  $("size").selectedIndex = $("size").options.length - 1;
  status(`model ${model.id}`);
}

// ---- generate -------------------------------------------------------------------------------------------

function denoisingStages(size) {
  const side = Number(size.split("x")[0]);
  const upsamplers = Math.max(0, stageSizes.findIndex((s) => s >= side));
  return ["prior", "decoder", ...["super_res", "super_res_2"].slice(0, upsamplers)];
}

function onProgress(event, stages) {
  if (event.event !== "step") return;
  const index = stages.indexOf(event.stage);
  if (index < 0) return;
  $("progress").value = (index + event.step / event.total) / stages.length;
  status(`${event.stage}: step ${event.step} of ${event.total}`);
}

function addPreview(b64) {
  const img = new Image();
  img.src = "data:image/png;base64," + b64;
  $("previews").appendChild(img);
  $("previews").dataset.count = String($("previews").children.length);
}

async function readStream(response, body, how = "generated") {
  const stages = denoisingStages(body.size);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const line = block.split("\n").find((l) => l.startsWith("data: "));
      if (!line) continue;
      const event = JSON.parse(line.slice(6));
      if (event.type === "unclip.progress") onProgress(event, stages);
      // image_generation.* or image_edit.*: the same events
      else if (event.type.endsWith(".partial_image")) addPreview(event.b64_json);
      else if (event.type.endsWith(".completed")) addToGallery([{ b64_json: event.b64_json, seed: event.seed }], body.size, how);
      else if (event.type === "error") throw new Error(event.error.message);
    }
  }
}

async function generate(submit) {
  submit.preventDefault();
  const body = { prompt: $("prompt").value, response_format: "b64_json", ...options() };
  const stream = body.n === 1;
  if (stream) Object.assign(body, { stream: true, partial_images: 3, unclip_progress: true });
  $("previews").innerHTML = "";
  $("previews").dataset.count = "0";
  stream ? ($("progress").value = 0) : $("progress").removeAttribute("value");
  status(stream ? "starting" : `drawing ${body.n} images`);
  await withProgress($("generate"), async () => {
    const response = await postJson("/v1/images/generations", body);
    if (stream) await readStream(response, body);
    else addToGallery((await response.json()).data, body.size, "generated");
  });
}

// POSTs `body` as JSON with the key; an answer that is not 2xx throws its message.
async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json", ...headers() }, body: JSON.stringify(body),
  });
  if (!response.ok) throw new Error(await failure(response));
  return response;
}

// Runs `work` with `button` (if any) disabled; the progress bar and status line end as "done" or with the error.
async function withProgress(button, work) {
  if (button) button.disabled = true;
  try {
    await work();
    $("progress").value = 1;
    status("done");
  } catch (error) {
    $("progress").value = 0;
    status(String(error.message || error), true);
  } finally {
    if (button) button.disabled = false;
  }
}

// ---- the gallery: seed, download, variations, edit ------------------------------------------------------

function b64ToBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function addToGallery(items, size, how) {
  for (const item of items) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.seed = String(item.seed);
    card.dataset.how = how;
    const img = new Image();
    img.src = "data:image/png;base64," + item.b64_json;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = `${how} · ${size} · seed ${item.seed}`;
    const reuse = button("use seed", "reuse", () => { $("seed").value = item.seed; });
    const vary = button("variations of this", "vary", () => variations(item.b64_json, size));
    const edit = button("edit", "edit", () => openEditor(item.b64_json, size));
    const download = document.createElement("a");
    download.className = "download";
    download.textContent = "download";
    download.href = img.src;
    download.download = `unclip-${item.seed}.png`;
    const asStart = button("as start", "as-start", () => setEnd("start", item.b64_json));
    const asEnd = button("as end", "as-end", () => setEnd("end", item.b64_json));
    const asDiff = button("text diff", "as-diff", () => { setEnd("diff", item.b64_json); setMode("text-diff"); });
    card.append(img, meta, reuse, vary, edit, " ", download, document.createElement("br"), asStart, asEnd, asDiff);
    $("gallery").prepend(card);
  }
}

function button(text, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function formOf(fields) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (Array.isArray(value)) value.forEach((v) => form.append(name + "[]", String(v)));
    else if (value instanceof Blob) form.append(name, value, name + ".png");
    else form.append(name, String(value));
  }
  return form;
}

async function postForm(path, fields, size, how) {
  const stream = how === "edit" && fields.n === 1;  // edits stream as generations do (variations cannot)
  if (stream) {
    Object.assign(fields, { stream: true, partial_images: 3, unclip_progress: true });
    $("previews").innerHTML = "";
    $("previews").dataset.count = "0";
  }
  stream ? ($("progress").value = 0) : $("progress").removeAttribute("value");
  status(how === "variation" ? "drawing variations" : "editing");
  await withProgress(null, async () => {
    const response = await fetch(path, { method: "POST", headers: headers(), body: formOf(fields) });
    if (!response.ok) throw new Error(await failure(response));
    if (stream) await readStream(response, fields, how);
    else addToGallery((await response.json()).data, size, how);
  });
}

function variations(b64, size) {
  const { prior_num_inference_steps, prior_guidance_scale, prior_num_candidates, ...rest } = options();
  return postForm("/v1/images/variations", { ...rest, size, image: b64ToBlob(b64), response_format: "b64_json" },
    size, "variation");
}

// ---- edit: paint the mask (painted = transparent = regenerate) ------------------------------------------

function openEditor(b64, size) {
  editing = { b64, size };
  const canvas = $("mask-canvas");
  const img = new Image();
  img.onload = () => {
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.globalCompositeOperation = "source-over";
    ctx.drawImage(img, 0, 0);
    $("editor").style.display = "block";
    $("editor").dataset.ready = "1";
  };
  img.src = "data:image/png;base64," + b64;
}

function paintAt(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.globalCompositeOperation = "destination-out";
  ctx.beginPath();
  ctx.arc(x, y, Math.max(2, canvas.width / 12), 0, 2 * Math.PI);
  ctx.fill();
}

let painting = false;
function setUpEditor() {
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (e) => { painting = true; paintAt(e); });
  canvas.addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
  window.addEventListener("pointerup", () => { painting = false; });
  $("edit-cancel").addEventListener("click", () => { $("editor").style.display = "none"; });
  $("edit-submit").addEventListener("click", () => {
    $("mask-canvas").toBlob((mask) => {
      const fields = { ...options(), size: editing.size, image: b64ToBlob(editing.b64), mask,
        prompt: $("edit-prompt").value, response_format: "b64_json" };
      $("editor").style.display = "none";
      postForm("/v1/images/edits", fields, editing.size, "edit");
    }, "image/png");
  });
}

// ---- two pictures and a slider: interpolations and text diffs --------------------------------------------

const ends = { start: null, end: null, diff: null };  // gallery images (base64 PNGs) chosen as ends
let frames = [];  // the last answer's frames, in order: [{b64_json, theta, index, seed}]
let framesSize = "";  // their size, "WxH"

function setEnd(which, b64) {
  ends[which] = b64;
  const box = $(which + "-end");
  box.classList.toggle("has-image", b64 !== null);
  box.querySelector("img").src = b64 ? "data:image/png;base64," + b64 : "";
}

function setMode(mode) {
  $("manipulate").className = mode;
  $(mode === "interpolate" ? "mode-interpolate" : "mode-text-diff").checked = true;
  $("manip-run").textContent = mode === "interpolate" ? "Interpolate" : "Text diff";
}

// The request: an end is its gallery image when one was picked, else its prompt.
function manipulation() {
  const { n, ...shared } = options();
  const body = { ...shared, frames: Number($("frames").value || 5), response_format: "b64_json", animation: "gif" };
  if ($("manipulate").className === "interpolate") {
    for (const which of ["start", "end"]) {
      if (ends[which]) body[which + "_image"] = ends[which];
      else body[which + "_prompt"] = $(which + "-prompt").value;
    }
    body.noise = $("noise").value;
    return ["/v1/images/interpolations", body];
  }
  if (ends.diff) body.image = ends.diff;
  Object.assign(body, { from_caption: $("from-caption").value, to_caption: $("to-caption").value });
  if ($("max-theta").value !== "") body.max_theta = Number($("max-theta").value);
  return ["/v1/images/text-diffs", body];
}

async function manipulate() {
  const [path, body] = manipulation();
  $("progress").removeAttribute("value");
  status(`drawing ${body.frames} frames`);
  await withProgress($("manip-run"), async () => showFrames(await (await postJson(path, body)).json()));
}

function showFrames(answer) {
  frames = answer.data;
  framesSize = answer.size;
  const slider = $("frame-slider");
  slider.max = String(frames.length - 1);
  slider.value = "0";
  showFrame(0);
  $("slider-view").dataset.count = String(frames.length);
  $("slider-view").classList.add("ready");
  const animation = $("animation");
  animation.style.display = answer.animation ? "" : "none";
  if (answer.animation) {
    animation.href = `data:image/${answer.animation.format};base64,${answer.animation.b64_json}`;
    animation.download = `unclip-${answer.seed}.${answer.animation.format}`;
  }
}

function showFrame(k) {
  const frame = frames[k];
  $("frame").src = "data:image/png;base64," + frame.b64_json;
  $("frame").dataset.index = String(k);
  $("frame-label").textContent = `frame ${k + 1} of ${frames.length} · θ ${frame.theta.toFixed(2)} · seed ${frame.seed}`;
}

function setUpSlider() {
  $("mode-interpolate").addEventListener("change", () => setMode("interpolate"));
  $("mode-text-diff").addEventListener("change", () => setMode("text-diff"));
  for (const which of ["start", "end", "diff"]) {
    $(which + "-end").querySelector("button.clear").addEventListener("click", () => setEnd(which, null));
  }
  $("manip-run").addEventListener("click", manipulate);
  $("frame-slider").addEventListener("input", (e) => showFrame(Number(e.target.value)));
  // The shown frame into the gallery: from there it can be an end, a text diff's image, varied or edited.
  $("keep-frame").addEventListener("click", () => {
    addToGallery([frames[Number($("frame-slider").value)]], framesSize, "frame");
  });
}

// ---- start ------------------------------------------------------------------------------------------------

$("api-key").value = localStorage.getItem(KEY_STORE) || "";
$("save-key").addEventListener("click", () => {
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  loadModel();
});
$("generate-form").addEventListener("submit", generate);
setUpEditor();
setUpSlider();
loadModel();
