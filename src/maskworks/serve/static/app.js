// maskworks serve: the web page. Plain JavaScript, no build step, no external resources.
//
// Frames: the canvas shows the image scaled by `view.scale` (canvas pixels per original pixel); prompts are
// kept in original-image pixels (what /sam/predict takes) and mapped to the canvas only for drawing.
"use strict";

(() => {
  const SAM = "__sam__";
  const TOKEN_KEY = "maskworks.token";
  const DRAG_MIN = 5; // canvas pixels a press must move to become a box
  const MASK_RGB = [30, 144, 255];

  const $ = (id) => document.getElementById(id);
  const el = {
    status: $("status"),
    model: $("model"),
    file: $("file"),
    drop: $("drop"),
    canvas: $("canvas"),
    wrap: $("canvas-wrap"),
    placeholder: $("placeholder"),
    fileName: $("file-name"),
    opacity: $("opacity"),
    opacityValue: $("opacity-value"),
    legend: $("legend"),
    summary: $("summary"),
    samTools: $("sam-tools"),
    clear: $("clear"),
    download: $("download"),
    tokenBox: $("token-box"),
    token: $("token"),
    tokenSave: $("token-save"),
  };
  const ctx = el.canvas.getContext("2d");

  const state = {
    token: localStorage.getItem(TOKEN_KEY) || "",
    models: [],
    sam: null,
    file: null, // the uploaded Blob, sent as is
    image: null, // decoded ImageBitmap / HTMLImageElement
    width: 0, // original image size (the server's, once it answered)
    height: 0,
    overlay: null, // what is drawn over the image: an image or canvas at any size, stretched to the image
    prompts: { points: [], labels: [], box: null },
    imageId: null,
    embedding: null, // Promise of the image_id of the current image
    drag: null,
    request: 0, // newest request number: older answers are dropped
    results: 0,
  };
  const view = { scale: 1, width: 0, height: 0 };

  // -- status and API -------------------------------------------------------------------------------------------

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.status.textContent = text;
  }

  class ApiError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.token) headers.set("Authorization", `Bearer ${state.token}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(0, `network error (${err.message})`);
    }
    if (!response.ok) {
      let detail = response.statusText || "request failed";
      try {
        const body = await response.json();
        if (body && body.detail !== undefined) {
          detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
        }
      } catch (_) {
        /* not JSON */
      }
      if (response.status === 401) showTokenBox(true);
      throw new ApiError(response.status, detail);
    }
    return response.json();
  }

  function fail(what, err) {
    const message = err instanceof ApiError ? `HTTP ${err.status} — ${err.detail}` : err.message || String(err);
    setStatus("error", `${what} failed: ${message}`);
    console.error(what, err);
  }

  function imageForm() {
    const form = new FormData();
    form.append("image", state.file, state.file.name || "image");
    return form;
  }

  function markResult(mode) {
    state.results += 1;
    document.body.dataset.result = `${mode}:${state.results}`;
  }

  // -- token ----------------------------------------------------------------------------------------------------

  function showTokenBox(show) {
    el.tokenBox.hidden = !show;
    if (show) el.token.value = state.token;
  }

  el.tokenSave.addEventListener("click", () => {
    state.token = el.token.value.trim();
    if (state.token) localStorage.setItem(TOKEN_KEY, state.token);
    else localStorage.removeItem(TOKEN_KEY);
    loadModels();
  });
  el.token.addEventListener("keydown", (e) => {
    if (e.key === "Enter") el.tokenSave.click();
  });

  // -- models ---------------------------------------------------------------------------------------------------

  async function loadModels() {
    setStatus("busy", "Loading models…");
    let info;
    try {
      info = await api("/models");
    } catch (err) {
      el.model.disabled = true;
      if (err instanceof ApiError && err.status === 401) {
        setStatus("error", `HTTP 401 — ${err.detail}. Enter the access token.`);
        el.token.focus();
      } else {
        fail("Loading models", err);
      }
      return;
    }
    showTokenBox(false);
    state.models = info.models || [];
    state.sam = info.sam || null;
    const previous = el.model.value;
    el.model.replaceChildren();
    for (const m of state.models) {
      el.model.append(new Option(`${m.name} (${m.task})`, m.name));
    }
    if (state.sam) el.model.append(new Option("SAM — click to segment", SAM));
    if (!el.model.options.length) {
      el.model.append(new Option("(no models loaded)", ""));
      el.model.disabled = true;
      setStatus("error", "The server has no models loaded");
      return;
    }
    el.model.disabled = false;
    if ([...el.model.options].some((o) => o.value === previous)) el.model.value = previous;
    setStatus("idle", state.file ? "Ready" : "Choose or drop an image");
    modeChanged();
  }

  function currentModel() {
    return state.models.find((m) => m.name === el.model.value) || null;
  }

  function samMode() {
    return el.model.value === SAM;
  }

  el.model.addEventListener("change", modeChanged);

  function modeChanged() {
    const sam = samMode();
    el.samTools.hidden = !sam;
    el.canvas.classList.toggle("prompting", sam);
    clearResult();
    if (!state.file) return;
    if (sam) {
      startEmbedding();
    } else if (currentModel()) {
      predict();
    }
  }

  // -- image loading --------------------------------------------------------------------------------------------

  const TYPES = { png: "image/png", jpg: "image/jpeg", jpeg: "image/jpeg", bmp: "image/bmp", gif: "image/gif",
    webp: "image/webp", tif: "image/tiff", tiff: "image/tiff" };

  function asImageBlob(file) {
    if (file.type && file.type.startsWith("image/")) return file;
    const ext = (file.name || "").split(".").pop().toLowerCase();
    const type = TYPES[ext] || "image/png"; // the server decodes by content; the type only has to be an image
    return new File([file], file.name || "image", { type });
  }

  async function decode(blob) {
    if (window.createImageBitmap) {
      try {
        return await createImageBitmap(blob);
      } catch (_) {
        /* fall back to <img> */
      }
    }
    const url = URL.createObjectURL(blob);
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      return img;
    } finally {
      URL.revokeObjectURL(url);
    }
  }

  async function loadFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus("error", `${file.name} is not an image (${file.type})`);
      return;
    }
    setStatus("busy", `Reading ${file.name || "image"}…`);
    let image;
    try {
      image = await decode(file);
    } catch (_) {
      setStatus("error", `The browser cannot display ${file.name || "this file"}; try a PNG or JPEG`);
      return;
    }
    state.file = asImageBlob(file);
    state.image = image;
    state.width = image.width;
    state.height = image.height;
    state.imageId = null;
    state.embedding = null;
    el.placeholder.hidden = true;
    el.fileName.textContent = `${file.name || "image"} · ${image.width} × ${image.height}`;
    el.fileName.title = file.name || "";
    clearResult();
    fitCanvas();
    setStatus("idle", `Loaded ${file.name || "image"} (${image.width} × ${image.height})`);
    if (samMode()) startEmbedding();
    else if (currentModel()) predict();
  }

  el.file.addEventListener("change", () => {
    const file = el.file.files[0];
    el.file.value = ""; // choosing the same file again fires "change" again
    loadFile(file);
  });

  for (const name of ["dragenter", "dragover"]) {
    el.drop.addEventListener(name, (e) => {
      e.preventDefault();
      e.dataTransfer.dropEffect = "copy";
      el.drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "dragend"]) {
    el.drop.addEventListener(name, () => el.drop.classList.remove("over"));
  }
  el.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    el.drop.classList.remove("over");
    const file = e.dataTransfer.files && e.dataTransfer.files[0];
    if (file) loadFile(file);
  });
  // A file dropped beside the drop zone must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  // -- drawing --------------------------------------------------------------------------------------------------

  function fitCanvas() {
    if (!state.image) return;
    const maxW = Math.max(64, el.wrap.clientWidth);
    const maxH = Math.max(64, Math.round(window.innerHeight * 0.75));
    const w = state.image.width;
    const h = state.image.height;
    const scale = Math.min(maxW / w, maxH / h, 8);
    view.scale = scale;
    view.width = Math.max(1, Math.round(w * scale));
    view.height = Math.max(1, Math.round(h * scale));
    el.canvas.width = view.width;
    el.canvas.height = view.height;
    el.canvas.style.width = `${view.width}px`;
    el.canvas.style.height = `${view.height}px`;
    redraw();
  }

  // refit when the stage changes width (window resized, panels reflowed, a scrollbar came)
  let resizeTimer = 0;
  let stageWidth = el.wrap.clientWidth;
  const refit = () => {
    stageWidth = el.wrap.clientWidth;
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(fitCanvas, 100);
  };
  if (window.ResizeObserver) {
    new ResizeObserver(() => {
      if (el.wrap.clientWidth !== stageWidth) refit();
    }).observe(el.wrap);
  }
  window.addEventListener("resize", refit);

  function redraw() {
    ctx.clearRect(0, 0, el.canvas.width, el.canvas.height);
    if (!state.image) return;
    ctx.globalAlpha = 1;
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(state.image, 0, 0, view.width, view.height);
    const alpha = Number(el.opacity.value) / 100;
    if (state.overlay && alpha > 0) {
      ctx.globalAlpha = alpha;
      ctx.imageSmoothingEnabled = false; // label maps: keep the class borders sharp
      ctx.drawImage(state.overlay, 0, 0, view.width, view.height);
      ctx.globalAlpha = 1;
    }
    if (samMode()) drawPrompts();
  }

  // original-image pixels <-> canvas pixels (the server's size, in case it differs from the browser's decode)
  const toCanvas = (x, y) => [(x * view.width) / state.width, (y * view.height) / state.height];
  const toImage = (cx, cy) => [(cx * state.width) / view.width, (cy * state.height) / view.height];

  function drawPrompts() {
    const p = state.prompts;
    ctx.lineWidth = 2;
    if (p.box || state.drag?.box) {
      const [x0, y0, x1, y1] = state.drag?.box || p.box;
      const [a, b] = toCanvas(x0, y0);
      const [c, d] = toCanvas(x1, y1);
      ctx.strokeStyle = "#ffd400";
      ctx.setLineDash(state.drag?.box ? [6, 4] : []);
      ctx.strokeRect(a, b, c - a, d - b);
      ctx.setLineDash([]);
    }
    p.points.forEach(([x, y], i) => {
      const [cx, cy] = toCanvas(x, y);
      ctx.beginPath();
      ctx.arc(cx, cy, 6, 0, 2 * Math.PI);
      ctx.fillStyle = p.labels[i] === 1 ? "#18c93a" : "#ff2d2d";
      ctx.fill();
      ctx.strokeStyle = "#ffffff";
      ctx.stroke();
    });
  }

  el.opacity.addEventListener("input", () => {
    el.opacityValue.textContent = `${el.opacity.value} %`;
    redraw();
  });

  function pngImage(base64) {
    const img = new Image();
    img.src = `data:image/png;base64,${base64}`;
    return img.decode().then(() => img);
  }

  // A gray 0/255 mask -> a coloured canvas, transparent outside the mask.
  function tintMask(img) {
    const c = document.createElement("canvas");
    c.width = img.width;
    c.height = img.height;
    const g = c.getContext("2d");
    g.drawImage(img, 0, 0);
    const data = g.getImageData(0, 0, c.width, c.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const on = px[i] > 127;
      px[i] = MASK_RGB[0];
      px[i + 1] = MASK_RGB[1];
      px[i + 2] = MASK_RGB[2];
      px[i + 3] = on ? 255 : 0;
    }
    g.putImageData(data, 0, 0);
    return c;
  }

  // -- results --------------------------------------------------------------------------------------------------

  function clearResult() {
    state.overlay = null;
    state.prompts = { points: [], labels: [], box: null };
    state.drag = null;
    el.legend.replaceChildren();
    el.summary.textContent = "";
    setDownload(null);
    redraw();
  }

  function setDownload(base64) {
    if (base64) {
      el.download.href = `data:image/png;base64,${base64}`;
      el.download.hidden = false;
      el.download.removeAttribute("aria-disabled");
    } else {
      el.download.removeAttribute("href");
      el.download.hidden = true;
      el.download.setAttribute("aria-disabled", "true");
    }
  }

  function swatch(rgb) {
    const s = document.createElement("span");
    s.className = "swatch";
    if (rgb) s.style.background = `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
    else s.classList.add("empty");
    return s;
  }

  function legendItem(rgb, name, value) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = name;
    const v = document.createElement("span");
    v.className = "value";
    v.textContent = value;
    li.append(swatch(rgb), label, v);
    return li;
  }

  function showLegend(result) {
    const items = [];
    if (result.task === "semantic") {
      const classes = (result.classes || []).filter((c) => c.share > 0).sort((a, b) => b.share - a.share);
      for (const c of classes) items.push(legendItem(c.color, c.name, `${(c.share * 100).toFixed(1)} %`));
      el.summary.textContent = `${classes.length} class${classes.length === 1 ? "" : "es"} present`;
    } else if (result.task === "instance") {
      const rows = [...(result.instances || [])].sort((a, b) => b.score - a.score);
      for (const r of rows) {
        items.push(legendItem(null, r.category_name ?? `class ${r.category_id}`, r.score.toFixed(2)));
      }
      el.summary.textContent = `${rows.length} instance${rows.length === 1 ? "" : "s"}`;
    } else if (result.task === "panoptic") {
      const cats = new Map((result.categories || []).map((c) => [c.id, c]));
      const rows = [...(result.segments || [])].sort((a, b) => b.area - a.area);
      for (const s of rows) {
        const cat = cats.get(s.category_id);
        const name = cat?.name ?? `class ${s.category_id}`;
        items.push(legendItem(cat?.color || null, `${name}${s.isthing ? ` #${s.id}` : ""}`, `${s.area} px`));
      }
      el.summary.textContent = `${rows.length} segment${rows.length === 1 ? "" : "s"}`;
    }
    el.legend.replaceChildren(...items);
  }

  async function predict() {
    const model = currentModel();
    if (!model || !state.file) return;
    const request = ++state.request;
    setStatus("busy", `Running ${model.name}…`);
    try {
      const result = await api(`/predict/${encodeURIComponent(model.name)}`, { method: "POST", body: imageForm() });
      const overlay = await pngImage(result.color_png);
      if (request !== state.request) return;
      state.width = result.width || state.width;
      state.height = result.height || state.height;
      state.overlay = overlay;
      showLegend(result);
      redraw();
      setStatus("done", `${model.name}: ${result.task} result in ${Math.round(result.time_ms ?? 0)} ms`);
      markResult(result.task || "predict");
    } catch (err) {
      if (request === state.request) fail(`Prediction with ${model.name}`, err);
    }
  }

  // -- SAM ------------------------------------------------------------------------------------------------------

  function startEmbedding() {
    const request = ++state.request;
    setStatus("busy", "Embedding the image for SAM…");
    const embedding = api("/sam/embed", { method: "POST", body: imageForm() }).then((r) => {
      if (state.embedding !== embedding) return r.image_id; // another image came meanwhile
      state.imageId = r.image_id;
      state.width = r.width || state.width;
      state.height = r.height || state.height;
      document.body.dataset.embed = r.image_id;
      if (request === state.request) {
        setStatus("done", `Image embedded${r.cached ? " (cached)" : ""} in ${Math.round(r.time_ms ?? 0)} ms — click to segment`);
      }
      return r.image_id;
    });
    state.embedding = embedding;
    embedding.catch((err) => {
      if (state.embedding === embedding) {
        state.embedding = null;
        fail("Embedding the image", err);
      }
    });
    return embedding;
  }

  async function samPredict() {
    if (!state.file) return;
    const request = ++state.request;
    redraw();
    setStatus("busy", "Segmenting…");
    try {
      let imageId = state.imageId;
      if (!imageId) imageId = await (state.embedding || startEmbedding());
      const p = state.prompts;
      const body = { image_id: imageId, points: p.points, labels: p.labels, box: p.box, multimask: null };
      let result;
      try {
        result = await samCall(body);
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 404)) throw err;
        // the server evicted the embedding: embed again and retry once
        state.imageId = null;
        body.image_id = await startEmbedding();
        result = await samCall(body);
      }
      if (request !== state.request) return;
      const best = result.masks[result.best];
      const overlay = tintMask(await pngImage(best.png));
      if (request !== state.request) return;
      state.overlay = overlay;
      setDownload(best.png);
      const share = (100 * best.area) / Math.max(1, result.width * result.height);
      const prompts = [];
      if (p.points.length) prompts.push(`${p.points.length} point${p.points.length === 1 ? "" : "s"}`);
      if (p.box) prompts.push("a box");
      const candidates = result.masks.length > 1 ? ` (best of ${result.masks.length})` : "";
      el.summary.textContent = `From ${prompts.join(" and ")}; predicted IoU ${best.iou.toFixed(3)}${candidates}`;
      el.legend.replaceChildren(legendItem(MASK_RGB, "mask", `${share.toFixed(1)} %`));
      redraw();
      setStatus("done", `Mask: ${best.area} px, predicted IoU ${best.iou.toFixed(2)}, ${Math.round(result.time_ms ?? 0)} ms`);
      markResult("sam");
    } catch (err) {
      if (request === state.request) fail("Segmentation", err);
    }
  }

  function samCall(body) {
    return api("/sam/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  function canvasPoint(e) {
    const rect = el.canvas.getBoundingClientRect();
    const cx = ((e.clientX - rect.left) * el.canvas.width) / rect.width;
    const cy = ((e.clientY - rect.top) * el.canvas.height) / rect.height;
    return [Math.min(Math.max(cx, 0), el.canvas.width), Math.min(Math.max(cy, 0), el.canvas.height)];
  }

  function clampToImage([x, y]) {
    // continuous pixel coordinates inside the image: [0, width] x [0, height], to 0.1 px
    const r = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 10) / 10;
    return [r(x, state.width), r(y, state.height)];
  }

  el.canvas.addEventListener("contextmenu", (e) => {
    if (samMode()) e.preventDefault();
  });

  el.canvas.addEventListener("mousedown", (e) => {
    if (!samMode() || !state.image || (e.button !== 0 && e.button !== 2)) return;
    e.preventDefault();
    state.drag = { button: e.button, start: canvasPoint(e), box: null };
  });

  window.addEventListener("mousemove", (e) => {
    const d = state.drag;
    if (!d || d.button !== 0) return;
    const [cx, cy] = canvasPoint(e);
    if (Math.hypot(cx - d.start[0], cy - d.start[1]) <= DRAG_MIN && !d.box) return;
    const [x0, y0] = clampToImage(toImage(...d.start));
    const [x1, y1] = clampToImage(toImage(cx, cy));
    d.box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
    redraw();
  });

  window.addEventListener("mouseup", (e) => {
    const d = state.drag;
    if (!d || e.button !== d.button) return;
    state.drag = null;
    const p = state.prompts;
    if (d.button === 0 && d.box) {
      p.box = d.box;
    } else {
      p.points.push(clampToImage(toImage(...d.start)));
      p.labels.push(d.button === 0 ? 1 : 0);
    }
    samPredict();
  });

  el.clear.addEventListener("click", () => {
    state.request++; // drop answers still on the way
    clearResult();
    setStatus("idle", state.imageId ? "Prompts cleared — click to segment" : "Prompts cleared");
  });

  // -- start ----------------------------------------------------------------------------------------------------

  el.opacityValue.textContent = `${el.opacity.value} %`;
  setDownload(null);
  loadModels();
})();
