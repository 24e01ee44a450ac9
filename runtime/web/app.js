// slotpack's page: runs model.onnx (self-decoding: it regenerates its weights from the seed and
// the packed indices when the session is created) in onnxruntime-web's wasm backend, on a digit
// drawn on the pad or an image dropped on the page. Everything is loaded from this folder.
//
// Test hook: ?pixels=FILE&report=URL fetches FILE (uint8 pixels, [C, H, W] order) from this
// origin (or ?image=FILE: an image file, read as a dropped one is), classifies it, and POSTs the
// result (float32 bits of the input and the logits, and the
// SHA-256 of every output) as JSON to URL, which must be on this origin too; &model=FILE loads
// that ONNX file instead of model.json's (a graph that also outputs its decoded weights); &again=N
// creates the session N more times and reports how long each took (the first creation also
// starts the wasm backend).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, session: null, busy: false, pending: null };

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

// (pixel / 255 - mean) / std per channel, each step rounded to float32: the same float32
// operations as training and as slotpack.runtime's normalize, so the bits agree with Python.
function normalise(pixels) {
  const [c, h, w] = state.config.input_shape;
  const out = new Float32Array(c * h * w);
  for (let ch = 0; ch < c; ch++) {
    const mean = Math.fround(state.config.mean[ch]);
    const std = Math.fround(state.config.std[ch]);
    for (let i = ch * h * w; i < (ch + 1) * h * w; i++) {
      out[i] = Math.fround(Math.fround(Math.fround(pixels[i] / 255) - mean) / std);
    }
  }
  return out;
}

async function classify(pixels) {
  const [c, h, w] = state.config.input_shape;
  const input = normalise(pixels);
  const feeds = { [state.session.inputNames[0]]: new ort.Tensor("float32", input, [1, c, h, w]) };
  const t0 = performance.now();
  const result = await state.session.run(feeds);
  const runMs = performance.now() - t0;
  const logits = Float32Array.from(result[state.session.outputNames[0]].data);
  state.lastOutputs = result;
  const top = Math.max(...logits);
  const exps = Array.from(logits, (v) => Math.exp(v - top));
  const total = exps.reduce((a, b) => a + b, 0);
  return {
    input,
    logits,
    prediction: logits.indexOf(top),
    probabilities: exps.map((e) => e / total),
    runMs,
  };
}

function show(pixels, out) {
  const names = state.config.classes;
  $("prediction").textContent = `${names[out.prediction]} (${(100 * out.probabilities[out.prediction]).toFixed(1)}%)`;
  const bars = $("bars");
  bars.textContent = "";
  out.probabilities.forEach((p, i) => {
    const row = document.createElement("div");
    if (i === out.prediction) row.className = "top";
    row.innerHTML = '<span class="label"></span><span class="bar"></span><span class="p"></span>';
    row.children[0].textContent = names[i];
    row.children[1].style.width = `${Math.max(1, Math.round(160 * p))}px`;
    row.children[2].textContent = `${(100 * p).toFixed(1)}%`;
    bars.appendChild(row);
  });
  $("timing").textContent =
    `session created in ${state.createMs.toFixed(0)} ms; this prediction took ${out.runMs.toFixed(1)} ms`;
  showSeen(pixels);
}

function showSeen(pixels) {
  const [c, h, w] = state.config.input_shape;
  const seen = $("seen");
  seen.width = w;
  seen.height = h;
  const ctx = seen.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    for (let k = 0; k < 3; k++) img.data[4 * i + k] = pixels[(c === 3 ? k : 0) * h * w + i];
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

// One classification at a time; the newest request waits, older waiting ones are dropped.
async function submit(pixels) {
  if (state.busy) {
    state.pending = pixels;
    return;
  }
  state.busy = true;
  try {
    show(pixels, await classify(pixels));
  } catch (err) {
    status(`Could not run the model: ${err.message || err}`, true);
  } finally {
    state.busy = false;
  }
  if (state.pending) {
    const next = state.pending;
    state.pending = null;
    submit(next);
  }
}

// RGBA canvas pixels -> uint8 [C, H, W] (grayscale by luma for one-channel models).
function toPixels(rgba, h, w, c) {
  const out = new Uint8Array(c * h * w);
  for (let i = 0; i < h * w; i++) {
    const [r, g, b] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2]];
    if (c === 1) out[i] = Math.round(0.299 * r + 0.587 * g + 0.114 * b);
    else for (let k = 0; k < 3; k++) out[k * h * w + i] = rgba[4 * i + k];
  }
  return out;
}

function canvas(w, h) {
  const el = document.createElement("canvas");
  el.width = w;
  el.height = h;
  return el;
}

// The pad as MNIST's digits were made: the ink's bounding box scaled to fit 20/28 of the
// image, then placed so its centre of mass is the image's centre.
function padPixels(pad) {
  const [c, h, w] = state.config.input_shape;
  const data = pad.getContext("2d").getImageData(0, 0, pad.width, pad.height).data;
  let [x0, y0, x1, y1] = [pad.width, pad.height, -1, -1];
  for (let y = 0; y < pad.height; y++) {
    for (let x = 0; x < pad.width; x++) {
      if (data[4 * (y * pad.width + x)] > 0) {
        x0 = Math.min(x0, x);
        x1 = Math.max(x1, x);
        y0 = Math.min(y0, y);
        y1 = Math.max(y1, y);
      }
    }
  }
  if (x1 < 0) return null;
  const box = Math.round((20 / 28) * Math.min(h, w));
  const scale = box / Math.max(x1 - x0 + 1, y1 - y0 + 1);
  const bw = Math.max(1, Math.round((x1 - x0 + 1) * scale));
  const bh = Math.max(1, Math.round((y1 - y0 + 1) * scale));
  const small = canvas(bw, bh);
  const sctx = small.getContext("2d");
  sctx.imageSmoothingQuality = "high";
  sctx.drawImage(pad, x0, y0, x1 - x0 + 1, y1 - y0 + 1, 0, 0, bw, bh);
  const ink = sctx.getImageData(0, 0, bw, bh).data;
  let [mass, mx, my] = [0, 0, 0];
  for (let y = 0; y < bh; y++) {
    for (let x = 0; x < bw; x++) {
      const v = ink[4 * (y * bw + x)];
      mass += v;
      mx += v * (x + 0.5);
      my += v * (y + 0.5);
    }
  }
  const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
  const ox = clamp(Math.round(w / 2 - (mass ? mx / mass : bw / 2)), w - bw);
  const oy = clamp(Math.round(h / 2 - (mass ? my / mass : bh / 2)), h - bh);
  const out = canvas(w, h);
  const octx = out.getContext("2d");
  octx.fillStyle = "#000";
  octx.fillRect(0, 0, w, h);
  octx.drawImage(small, ox, oy);
  return toPixels(octx.getImageData(0, 0, w, h).data, h, w, c);
}

function setUpPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
  };
  clear();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = ctx.lineJoin = "round";
  let last = null;
  const at = (e) => {
    const r = pad.getBoundingClientRect();
    return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
  };
  const update = () => {
    const pixels = padPixels(pad);
    if (pixels) submit(pixels);
  };
  pad.addEventListener("pointerdown", (e) => {
    try {
      pad.setPointerCapture(e.pointerId); // keep the stroke when it leaves the pad
    } catch {
      // a pointer the browser does not track (synthetic events): draw without capture
    }
    last = at(e);
    ctx.beginPath();
    ctx.arc(last[0], last[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fillStyle = "#fff";
    ctx.fill();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = at(e);
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...p);
    ctx.stroke();
    last = p;
    update();
  });
  const end = () => {
    if (last) update();
    last = null;
  };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  $("clear").addEventListener("click", () => {
    clear();
    $("prediction").textContent = "";
    $("bars").textContent = "";
  });
  $("draw-panel").hidden = false;
}

// An image, centre-cropped to a square and resized to the model's input.
async function imagePixels(file) {
  const [c, h, w] = state.config.input_shape;
  const bitmap = await createImageBitmap(file);
  const side = Math.min(bitmap.width, bitmap.height);
  const out = canvas(w, h);
  const ctx = out.getContext("2d");
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, (bitmap.width - side) / 2, (bitmap.height - side) / 2, side, side, 0, 0, w, h);
  return toPixels(ctx.getImageData(0, 0, w, h).data, h, w, c);
}

function setUpDrop() {
  const drop = $("drop");
  const use = async (file) => {
    if (!file) return;
    try {
      submit(await imagePixels(file));
    } catch (err) {
      status(`Could not read ${file.name}: ${err.message || err}`, true);
    }
  };
  $("file").addEventListener("change", (e) => use(e.target.files[0]));
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    use(e.dataTransfer.files[0]);
  });
}

function sameOrigin(param) {
  const url = new URL(param, location.href);
  if (url.origin !== location.origin) throw new Error(`${param} is not on this page's origin`);
  return url;
}

const bits = (floats) => Array.from(new Uint32Array(floats.buffer, floats.byteOffset, floats.length));

async function testHook(params) {
  const report = params.get("report") && sameOrigin(params.get("report"));
  let body;
  try {
    const name = params.get("pixels") || params.get("image");
    const response = await fetch(sameOrigin(name));
    if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
    const pixels = params.get("pixels")
      ? new Uint8Array(await response.arrayBuffer())
      : await imagePixels(await response.blob());
    const out = await classify(pixels);
    show(pixels, out);
    const outputs = {};
    for (const name of state.session.outputNames) {
      const t = state.lastOutputs[name];
      const digest = await crypto.subtle.digest("SHA-256", t.data);
      outputs[name] = {
        dims: Array.from(t.dims),
        type: t.type,
        sha256: Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join(""),
      };
    }
    body = {
      ok: true,
      create_ms: state.createMs,
      run_ms: out.runMs,
      prediction: out.prediction,
      probabilities: out.probabilities,
      pixels: Array.from(pixels),
      input_bits: bits(out.input),
      logits_bits: bits(out.logits),
      outputs,
    };
  } catch (err) {
    body = { ok: false, error: String(err.message || err) };
  }
  const again = Number(params.get("again") || 0);
  if (body.ok && again > 0) {
    body.create_again_ms = [];
    for (let i = 0; i < again; i++) {
      const t0 = performance.now();
      const s = await ort.InferenceSession.create(state.model, { executionProviders: ["wasm"] });
      body.create_again_ms.push(performance.now() - t0);
      await s.release();
    }
  }
  body.ort_version = ort.env.versions ? ort.env.versions.web || ort.env.versions.common : null;
  body.user_agent = navigator.userAgent;
  if (report) await fetch(report, { method: "POST", body: JSON.stringify(body) });
}

async function main() {
  if (location.protocol === "file:") {
    status("Open this page through a web server, e.g. `python -m http.server -d FOLDER`, not as a file.", true);
    return;
  }
  const params = new URLSearchParams(location.search);
  try {
    state.config = await (await fetch("model.json")).json();
    const [c, h, w] = state.config.input_shape;
    $("title").textContent = `${state.config.model} (${state.config.dataset || "unknown data set"})`;
    $("about").textContent =
      `${c}x${h}x${w} input, K=${state.config.k}, self-decoding ONNX (${(state.config.onnx_bytes / 1024).toFixed(0)} KiB), onnxruntime-web ${state.config.onnxruntime_web} (wasm)`;
    // Single-threaded wasm: threads need cross-origin isolation headers a plain server lacks.
    ort.env.wasm.numThreads = 1;
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    const t0 = performance.now();
    state.model = params.get("model") ? sameOrigin(params.get("model")).href : state.config.onnx;
    state.session = await ort.InferenceSession.create(state.model, { executionProviders: ["wasm"] });
    state.createMs = performance.now() - t0;
    status(`Ready: the model rebuilt its weights in ${(state.createMs / 1000).toFixed(1)} s.`);
    if (c === 1) setUpPad();
    setUpDrop();
  } catch (err) {
    status(`Could not load the model: ${err.message || err}`, true);
    if (params.get("report")) {
      const body = { ok: false, error: String(err.message || err), user_agent: navigator.userAgent };
      await fetch(sameOrigin(params.get("report")), { method: "POST", body: JSON.stringify(body) });
    }
    return;
  }
  if (params.get("pixels") || params.get("image")) await testHook(params);
}

main();
