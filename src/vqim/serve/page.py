"""The page of `vqim serve`: one HTML file with its style and script inline (vanilla JavaScript, no build step,
nothing fetched from the internet). Kept in a Python module so that it ships with the package."""

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vqim serve</title>
<style>
:root { --fg:#1c2330; --muted:#5d6778; --bg:#f3f4f6; --card:#fff; --line:#dde2e8; --accent:#2d6be0;
        --err:#a8261b; --view:256px; --thumb:128px; }
* { box-sizing:border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header { display:flex; flex-wrap:wrap; align-items:baseline; gap:.4rem 1.2rem; padding:.8rem 1.5rem;
         background:#1c2330; color:#fff; }
header h1 { font-size:1.15rem; margin:0; }
header .sub { color:#b9c3d4; font-size:.88rem; }
main { max-width:1240px; margin:0 auto; padding:1rem 1.5rem 3rem; display:grid; gap:1rem;
       grid-template-columns:minmax(300px, 380px) minmax(0, 1fr); align-items:start; }
@media (max-width:820px) { main { grid-template-columns:minmax(0, 1fr); } }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:1rem 1.2rem; }
.wide { grid-column:1 / -1; }
h2 { font-size:1rem; margin:0 0 .7rem; }
h3 { font-size:.95rem; margin:0 0 .3rem; }
.muted { color:var(--muted); font-size:.88rem; }
#error { display:none; grid-column:1 / -1; background:#fdecea; color:var(--err); border:1px solid #f1b7b1;
         border-radius:8px; padding:.7rem 1rem; white-space:pre-wrap; }
#error.show { display:block; }
.drop { border:2px dashed #a9b3c2; border-radius:10px; padding:1.1rem; text-align:center; color:var(--muted);
        cursor:pointer; }
.drop.over { border-color:var(--accent); background:#edf3ff; }
.drop strong { color:var(--fg); }
.photos { display:flex; flex-wrap:wrap; gap:.35rem; margin-top:.7rem; }
.photos button { padding:0; border:2px solid transparent; border-radius:6px; background:none; cursor:pointer;
                 position:relative; }
.photos button.on { border-color:var(--accent); }
.photos img { width:52px; height:52px; display:block; border-radius:4px; }
.photos button.held::after { content:""; position:absolute; right:3px; top:3px; width:7px; height:7px;
                             border-radius:50%; background:#27a35a; }
#chosen { margin-top:.6rem; }
.pix { image-rendering:pixelated; }
.row { display:flex; flex-wrap:wrap; gap:1rem; align-items:flex-start; }
.compare { position:relative; width:var(--view); height:var(--view); user-select:none; touch-action:none;
           cursor:ew-resize; background:#e9ecf0; border-radius:4px; overflow:hidden; }
.compare img { position:absolute; inset:0; width:100%; height:100%; pointer-events:none; }
.compare .handle { position:absolute; top:0; bottom:0; width:2px; margin-left:-1px; background:#fff;
                   box-shadow:0 0 0 1px rgba(0,0,0,.35); pointer-events:none; }
.compare .tag { position:absolute; top:4px; font-size:.72rem; background:rgba(0,0,0,.55); color:#fff;
                padding:1px 6px; border-radius:3px; pointer-events:none; }
#split { width:var(--view); display:block; margin-top:.3rem; }
figure { margin:0; }
figcaption { font-size:.8rem; color:var(--muted); text-align:center; }
#tokens { width:var(--view); height:var(--view); display:block; border-radius:4px; background:#e9ecf0; }
dl.metrics { display:grid; grid-template-columns:max-content max-content; gap:.15rem 1rem; margin:.2rem 0 0; }
dl.metrics dt { color:var(--muted); }
dl.metrics dd { margin:0; font-variant-numeric:tabular-nums; font-weight:600; }
.settings { display:grid; grid-template-columns:repeat(auto-fill, minmax(150px, 1fr)); gap:.6rem .9rem; }
.settings label { display:flex; flex-direction:column; font-size:.85rem; color:var(--muted); gap:.15rem; }
input, select, button { font:inherit; }
input[type=number], select { padding:.3rem .4rem; border:1px solid #c5ccd6; border-radius:6px; width:100%;
                             background:#fff; }
.seed { display:flex; gap:.3rem; }
button { padding:.4rem .85rem; border-radius:6px; border:1px solid #c5ccd6; background:#fff; cursor:pointer; }
button.primary { background:var(--accent); border-color:var(--accent); color:#fff; }
button:disabled { opacity:.5; cursor:default; }
.actions { display:flex; flex-wrap:wrap; gap:.6rem 1rem; align-items:center; margin:.9rem 0 .6rem; }
.actions .group { display:flex; gap:.5rem; align-items:center; }
progress { width:260px; height:.8rem; vertical-align:middle; }
.gallery { display:flex; flex-wrap:wrap; gap:.5rem; margin-top:.6rem; }
.gallery img { width:var(--thumb); height:var(--thumb); display:block; border-radius:4px; background:#e9ecf0; }
.gallery .context img { outline:2px solid #8a94a6; }
.models { display:grid; grid-template-columns:repeat(auto-fit, minmax(300px, 1fr)); gap:1rem; }
.model .path { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:.8rem; word-break:break-all; }
.model pre { font-size:.75rem; background:#f6f7f9; padding:.5rem; border-radius:6px; max-height:260px;
             overflow:auto; }
.hidden { display:none !important; }
</style>
</head>
<body>
<header>
  <h1>vqim serve</h1>
  <span class="sub" id="summary">loading the models…</span>
</header>
<main>
  <div id="error" role="alert"></div>

  <section class="card" id="input-card">
    <h2>1. An image</h2>
    <div class="drop" id="drop" tabindex="0">
      <strong>Drop an image here</strong>, paste one, or <u>choose a file</u>
      <div class="muted" id="limits"></div>
      <input type="file" id="file" accept="image/*" hidden>
    </div>
    <div class="photos" id="photos" aria-label="built-in photos"></div>
    <div class="muted">Built-in photos (scikit-image); green dot: held out from the demo's training.</div>
    <div id="chosen" class="muted">No image chosen yet.</div>
  </section>

  <section class="card" id="rec-card">
    <h2>2. Reconstruction by the tokenizer</h2>
    <div class="row">
      <figure>
        <div class="compare" id="compare" title="drag to compare">
          <img id="cmp-rec" class="pix" alt="reconstruction">
          <img id="cmp-orig" class="pix" alt="original">
          <span class="tag" style="left:4px">original</span>
          <span class="tag" style="right:4px">reconstruction</span>
          <div class="handle" id="handle"></div>
        </div>
        <input type="range" id="split" min="0" max="100" value="50" aria-label="compare split">
      </figure>
      <figure>
        <img id="tokens" class="pix" alt="token ids">
        <figcaption id="token-caption">token ids (one colour per id)</figcaption>
      </figure>
    </div>
    <dl class="metrics">
      <dt>PSNR</dt><dd id="psnr">–</dd>
      <dt>SSIM</dt><dd id="ssim">–</dd>
      <dt>codes used</dt><dd id="codes">–</dd>
      <dt>time</dt><dd id="rec-time">–</dd>
    </dl>
  </section>

  <section class="card wide hidden" id="gen-card">
    <h2>3. Generation by the prior</h2>
    <div class="settings">
      <label id="f-label">Class <select id="label"></select></label>
      <label>Images <input type="number" id="n" min="1" value="8"></label>
      <label>Temperature <input type="number" id="temperature" min="0" step="0.05" value="1"></label>
      <label>Top-k <input type="number" id="top_k" min="1" step="1" placeholder="all"></label>
      <label>Top-p <input type="number" id="top_p" min="0" max="1" step="0.05" placeholder="off"></label>
      <label id="f-cfg">Guidance scale <input type="number" id="cfg_scale" step="0.25" value="1"></label>
      <label>Seed <span class="seed"><input type="number" id="seed" min="0" step="1" value="0">
        <button type="button" id="reseed" title="a new random seed">↻</button></span></label>
    </div>
    <div class="actions">
      <button class="primary" id="sample">Sample</button>
      <button class="primary" id="condition">Sample from the image as condition</button>
      <span class="group" id="complete-group">
        <button class="primary" id="complete">Complete the image</button>
        <label for="rows">keeping the top</label>
        <input type="range" id="rows" min="0" value="1">
        <output id="rows-out" for="rows"></output>
      </span>
      <button id="stop" disabled>Stop</button>
      <button id="download" disabled>Download PNG</button>
    </div>
    <div><progress id="progress" value="0" max="1"></progress> <span id="status" class="muted"></span></div>
    <div class="gallery" id="gallery"></div>
  </section>

  <section class="card wide" id="models-card">
    <h2>Loaded models</h2>
    <div class="models" id="models"></div>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;        // /api/info
let current = null;     // {file: File} or {photo: name}
let controller = null;  // the running generation's AbortController
let finalImages = [];   // data URLs of the last finished generation

function showError(message) { const e = $("error"); e.textContent = message; e.classList.add("show"); }
function clearError() { const e = $("error"); e.textContent = ""; e.classList.remove("show"); }
function networkMessage(e) {
  return e instanceof TypeError ? "the server cannot be reached (is vqim serve still running?)" : e.message;
}
async function errorOf(response) {
  let text = "";
  try { text = (await response.json()).error || ""; } catch (e) { /* not JSON: say nothing of its body */ }
  return text || `the request failed (${response.status} ${response.statusText})`;
}
function fmtBytes(n) {
  for (const [unit, size] of [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]]) if (n >= size) return `${(n / size).toFixed(1)} ${unit}`;
  return `${n} bytes`;
}
function fmtCount(n) {
  for (const [unit, size] of [["B", 1e9], ["M", 1e6], ["k", 1e3]]) if (n >= size) return `${Number((n / size).toPrecision(3))} ${unit}`;
  return `${n}`;
}
function el(tag, props = {}, children = []) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  for (const c of children) e.append(c);
  return e;
}

// ------------------------------------------------------------------ setup
async function init() {
  try {
    const r = await fetch("/api/info");
    if (!r.ok) throw new Error(await errorOf(r));
    info = await r.json();
  } catch (e) { showError(networkMessage(e)); return; }
  const size = info.image_size;
  const view = size >= 192 ? Math.min(size, 320) : Math.ceil(192 / size) * size;
  const thumb = size >= 128 ? Math.min(size, 192) : Math.ceil(96 / size) * size;
  document.documentElement.style.setProperty("--view", `${view}px`);
  document.documentElement.style.setProperty("--thumb", `${thumb}px`);
  $("summary").textContent = info.models.map((m) => `${m.role}: ${m.path}`).join("  ·  ") + `  ·  ${info.device}`;
  $("limits").textContent = `at most ${fmtBytes(info.limits.max_upload_bytes)} and ${fmtCount(info.limits.max_pixels)} pixels; ` +
    `centre-cropped to ${size}×${size}`;
  for (const p of info.photos) {
    const b = el("button", {type: "button", title: p.name + (p.held_out ? " (held out)" : "")});
    b.dataset.photo = p.name;
    if (p.held_out) b.classList.add("held");
    b.append(el("img", {src: `/api/photos/${encodeURIComponent(p.name)}`, alt: p.name}));
    b.addEventListener("click", () => choose({photo: p.name}));
    $("photos").append(b);
  }
  renderModels();
  if (info.prior) setupPrior(info.prior);
}

function renderModels() {
  for (const m of info.models) {
    const p = m.parameters;
    const parts = Object.entries(p).filter(([k]) => k !== "total").map(([k, v]) => `${k} ${fmtCount(v)}`).join(", ");
    const extra = [];
    if (m.grid) extra.push(`token grid ${m.grid.join("×")}`);
    if (m.condition) extra.push(`condition ${m.condition}`);
    const box = el("div", {className: "model"}, [
      el("h3", {textContent: m.role[0].toUpperCase() + m.role.slice(1)}),
      el("div", {className: "path", textContent: m.path}),
      el("div", {className: "params", textContent: `${fmtCount(p.total)} parameters (${parts})`}),
      el("div", {className: "muted", textContent: [...extra, `fingerprint ${m.fingerprint}`].join(" · ")}),
      el("details", {}, [el("summary", {textContent: "config"}), el("pre", {textContent: JSON.stringify(m.config, null, 2)})]),
    ]);
    box.dataset.role = m.role;
    $("models").append(box);
  }
}

function setupPrior(p) {
  $("gen-card").classList.remove("hidden");
  const [h, w] = p.grid;
  $("n").max = info.limits.max_samples;
  $("n").value = Math.min(8, info.limits.max_samples);
  if (p.conditional) {
    $("label").append(el("option", {value: "all", textContent: "every class"}));
    p.class_names.forEach((name, i) => $("label").append(el("option", {value: String(i), textContent: `${i}: ${name}`})));
  } else {
    $("f-label").classList.add("hidden");
    $("f-cfg").classList.add("hidden");
  }
  $("sample").classList.toggle("hidden", !p.can_sample);
  $("condition").classList.toggle("hidden", !p.spatial);
  if (p.spatial) $("condition").textContent = p.condition_given ? "Sample from the image as condition"
    : `Sample from the image's condition (${p.condition})`;
  $("complete-group").classList.toggle("hidden", !p.can_complete);
  $("rows").max = h - 1;
  $("rows").value = Math.floor(h / 2);
  const showRows = () => { $("rows-out").textContent = `${$("rows").value} of ${h} token rows`; };
  $("rows").addEventListener("input", showRows);
  showRows();
  updateButtons();
}

// ------------------------------------------------------------------ the input image
function choose(src) {
  clearError();
  if (src.file) {
    const limit = info.limits.max_upload_bytes;
    if (src.file.size > limit) {
      const same = fmtBytes(src.file.size) === fmtBytes(limit);
      const [size, most] = same ? [src.file.size, limit].map((n) => `${n.toLocaleString("en")} bytes`) : [fmtBytes(src.file.size), fmtBytes(limit)];
      showError(`${src.file.name} is ${size}; the server accepts images of at most ${most} (vqim serve --max-upload-bytes).`);
      return;
    }
  }
  current = src;
  for (const b of $("photos").children) b.classList.toggle("on", b.dataset.photo === src.photo);
  $("chosen").textContent = src.file ? `Uploaded: ${src.file.name} (${fmtBytes(src.file.size)})` : `Built-in photo: ${src.photo}`;
  updateButtons();
  reconstruct();
}

function inputForm() {
  const fd = new FormData();
  if (current.file) fd.append("image", current.file, current.file.name);
  else fd.append("photo", current.photo);
  return fd;
}

async function reconstruct() {
  const chosen = current;
  $("rec-card").setAttribute("aria-busy", "true");
  $("rec-time").textContent = "encoding…";
  try {
    const r = await fetch("/api/reconstruct", {method: "POST", body: inputForm()});
    if (!r.ok) throw new Error(await errorOf(r));
    const d = await r.json();
    if (chosen !== current) return;  // another image was chosen meanwhile
    $("cmp-orig").src = d.original;
    $("cmp-rec").src = d.reconstruction;
    $("tokens").src = d.tokens;
    $("tokens").dataset.ids = JSON.stringify(d.ids);
    $("psnr").textContent = `${d.psnr.toFixed(2)} dB`;
    $("ssim").textContent = d.ssim.toFixed(3);
    $("codes").textContent = `${d.codes_used} of ${d.codebook_size} (${d.token_count} tokens, ${d.grid.join("×")})`;
    $("rec-time").textContent = `${d.seconds.toFixed(2)} s`;
    $("token-caption").textContent = "token ids (one colour per id)";
  } catch (e) {
    $("rec-time").textContent = "–";
    showError(networkMessage(e));
  } finally {
    $("rec-card").removeAttribute("aria-busy");
  }
}

function setSplit(percent) {
  const p = Math.max(0, Math.min(100, percent));
  $("cmp-orig").style.clipPath = `inset(0 ${100 - p}% 0 0)`;
  $("handle").style.left = `${p}%`;
  $("split").value = p;
}

// ------------------------------------------------------------------ generation
function updateButtons() {
  const running = controller !== null;
  for (const id of ["sample", "condition", "complete"]) $(id).disabled = running || (id !== "sample" && !current);
  $("stop").disabled = !running;
  $("download").disabled = running || finalImages.length === 0;
}

function settingsForm(fd) {
  for (const id of ["n", "temperature", "top_k", "top_p", "cfg_scale", "seed"]) fd.append(id, $(id).value.trim());
  if (info.prior.conditional) fd.append("label", $("label").value);
  return fd;
}

function figure(url, caption, context) {
  const img = el("img", {className: "pix", alt: caption || "sample"});
  if (url) img.src = url;
  const f = el("figure", {className: context ? "context" : "sample"}, [img]);
  if (caption) f.append(el("figcaption", {textContent: caption}));
  return f;
}

function onEvent(ev, state) {
  const g = $("gallery");
  if (ev.type === "queued") {
    $("status").textContent = `waiting: ${ev.ahead} request${ev.ahead > 1 ? "s" : ""} ahead`;
  } else if (ev.type === "start") {
    g.replaceChildren();
    if (ev.input) g.append(figure(ev.input, "input", true));
    if (ev.condition) g.append(figure(ev.condition, "condition", true));
    if (ev.kept) g.append(figure(ev.kept, "kept part", true));
    state.samples = [];
    for (let i = 0; i < ev.n; i++) {
      const f = figure(null, ev.labels[i] === null ? `#${i}` : `class ${ev.labels[i]}`, false);
      state.samples.push(f);
      g.append(f);
    }
    $("status").textContent = `sampling ${ev.total} tokens per image…`;
  } else if (ev.type === "progress") {
    ev.images.forEach((url, i) => { state.samples[i].querySelector("img").src = url; });
    $("progress").value = ev.done / ev.total;
    state.previews += 1;
    $("progress").dataset.previews = String(state.previews);
    $("status").textContent = `${Math.round((100 * ev.done) / ev.total)}% of ${ev.total} tokens`;
  } else if (ev.type === "done") {
    ev.images.forEach((url, i) => {
      const img = state.samples[i].querySelector("img");
      img.src = url;
      const a = el("a", {href: url, download: `sample_${String(i).padStart(2, "0")}.png`, title: "download"});
      img.replaceWith(a);
      a.append(img);
    });
    finalImages = ev.images;
    state.seed = $("seed").value;
    $("progress").value = 1;
    $("status").textContent = `${ev.images.length} image${ev.images.length > 1 ? "s" : ""} in ${ev.seconds.toFixed(2)} s`;
  } else if (ev.type === "error") {
    throw new Error(ev.message);
  }
}

async function generate(kind) {
  clearError();
  if (kind !== "sample" && !current) { showError("Choose an image first."); return; }
  const fd = settingsForm(kind === "sample" ? new FormData() : inputForm());
  if (kind === "complete") fd.append("rows", $("rows").value);
  controller = new AbortController();
  finalImages = [];
  $("progress").value = 0;
  $("progress").dataset.previews = "0";
  $("status").textContent = "starting…";
  $("gallery").dataset.state = "running";
  updateButtons();
  const state = {previews: 0, samples: []};
  try {
    const r = await fetch(`/api/${kind}`, {method: "POST", body: fd, signal: controller.signal});
    if (!r.ok) throw new Error(await errorOf(r));
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let i;
      while ((i = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, i).trim();
        buffer = buffer.slice(i + 1);
        if (line) onEvent(JSON.parse(line), state);
      }
    }
    $("gallery").dataset.state = finalImages.length ? "done" : "stopped";
  } catch (e) {
    $("gallery").dataset.state = "failed";
    if (e.name === "AbortError") $("status").textContent = "stopped";
    else { $("status").textContent = ""; showError(networkMessage(e)); }
  } finally {
    controller = null;
    updateButtons();
  }
}

async function downloadGrid() {
  const images = await Promise.all(finalImages.map((url) => new Promise((ok, fail) => {
    const im = new Image(); im.onload = () => ok(im); im.onerror = fail; im.src = url;
  })));
  const w = images[0].naturalWidth, h = images[0].naturalHeight, pad = 2;
  const cols = Math.min(8, images.length), rows = Math.ceil(images.length / cols);
  const c = el("canvas", {width: cols * (w + pad) + pad, height: rows * (h + pad) + pad});
  const g = c.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, c.width, c.height);
  images.forEach((im, i) => g.drawImage(im, pad + (i % cols) * (w + pad), pad + Math.floor(i / cols) * (h + pad)));
  const blob = await new Promise((ok) => c.toBlob(ok, "image/png"));
  const a = el("a", {href: URL.createObjectURL(blob), download: `vqim-samples-seed${$("seed").value}.png`});
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 30000);
}

// ------------------------------------------------------------------ events
$("drop").addEventListener("click", () => $("file").click());
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("file").addEventListener("change", () => { if ($("file").files[0]) choose({file: $("file").files[0]}); $("file").value = ""; });
for (const name of ["dragenter", "dragover"]) $("drop").addEventListener(name, (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  const f = e.dataTransfer.files[0];
  if (f) choose({file: f});
});
document.addEventListener("paste", (e) => {
  const f = [...(e.clipboardData?.files || [])].find((x) => x.type.startsWith("image/"));
  if (f) choose({file: f});
});
const cmp = $("compare");
const dragTo = (e) => { const r = cmp.getBoundingClientRect(); setSplit((100 * (e.clientX - r.left)) / r.width); };
cmp.addEventListener("pointerdown", (e) => { cmp.setPointerCapture(e.pointerId); dragTo(e); });
cmp.addEventListener("pointermove", (e) => { if (cmp.hasPointerCapture(e.pointerId)) dragTo(e); });
$("split").addEventListener("input", () => setSplit(Number($("split").value)));
$("tokens").addEventListener("mousemove", (e) => {
  const ids = JSON.parse($("tokens").dataset.ids || "null");
  if (!ids) return;
  const r = $("tokens").getBoundingClientRect();
  const i = Math.min(ids.length - 1, Math.floor(((e.clientY - r.top) / r.height) * ids.length));
  const j = Math.min(ids[0].length - 1, Math.floor(((e.clientX - r.left) / r.width) * ids[0].length));
  $("token-caption").textContent = `row ${i}, column ${j}: token ${ids[i][j]}`;
});
$("sample").addEventListener("click", () => generate("sample"));
$("condition").addEventListener("click", () => generate("condition"));
$("complete").addEventListener("click", () => generate("complete"));
$("stop").addEventListener("click", () => controller && controller.abort());
$("download").addEventListener("click", () => downloadGrid().catch((e) => showError(`the download failed: ${e.message}`)));
$("reseed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
setSplit(50);
init();
</script>
</body>
</html>
"""
