// Slides view: deep-zoom tiles in OpenSeadragon, the ROAM attention overlay on a canvas stacked over it,
// ROI details on click and the cascade's calls per slide.
import { el, fmt, getJSON, getText, state, status, withToken } from "./api.js";
import { colorAt, colorBar, colormapNames } from "./colormaps.js";

const OSD = window.OpenSeadragon;
let viewer = null;
let overlay = null; // canvas over the viewer
let current = null; // {slide, rois}
const controls = {};

/** Parse the Deep Zoom XML into an OpenSeadragon tile source whose tile URLs follow the API contract. */
function tileSource(slideId, xml) {
  const doc = new DOMParser().parseFromString(xml, "application/xml");
  const image = doc.getElementsByTagName("Image")[0];
  const size = doc.getElementsByTagName("Size")[0];
  if (!image || !size) throw new Error(`slide ${slideId}: the Deep Zoom descriptor has no <Image>/<Size>`);
  const width = Number(size.getAttribute("Width"));
  const height = Number(size.getAttribute("Height"));
  const format = image.getAttribute("Format") || "jpeg";
  const base = `/api/slides/${encodeURIComponent(slideId)}/tiles`;
  return {
    width,
    height,
    tileSize: Number(image.getAttribute("TileSize") || 254),
    tileOverlap: Number(image.getAttribute("Overlap") || 1),
    minLevel: 0,
    maxLevel: Math.ceil(Math.log2(Math.max(width, height))),
    getTileUrl: (level, x, y) => withToken(`${base}/${level}/${x}_${y}.${format}`),
  };
}

export async function initSlides(index) {
  const slides = index.slides || [];
  const select = document.getElementById("slide-select");
  select.replaceChildren(...slides.map((s) => el("option", { value: s.id, text: s.name || s.id })));
  const cmap = document.getElementById("overlay-cmap");
  cmap.replaceChildren(...colormapNames().map((n) => el("option", { value: n, text: n })));
  Object.assign(controls, {
    on: document.getElementById("overlay-on"),
    by: document.getElementById("overlay-by"),
    cmap,
    opacity: document.getElementById("overlay-opacity"),
    grid: document.getElementById("roi-grid"),
  });
  for (const c of Object.values(controls)) c.addEventListener("input", drawOverlay);
  select.addEventListener("change", () => openSlide(slides.find((s) => s.id === select.value)));
  document.getElementById("roi-close").addEventListener("click", () => (document.getElementById("roi-panel").hidden = true));
  renderCascade(slides);
  if (slides.length) await openSlide(slides[0]);
  else document.getElementById("slide-note").textContent = "No slides were given to msfm view.";
}

function renderCascade(slides) {
  const box = document.getElementById("cascade");
  const rows = slides.filter((s) => s.cascade);
  if (!rows.length) {
    box.textContent = "no cascade calls";
    return;
  }
  const stages = [...new Set(rows.flatMap((s) => Object.keys(s.cascade)))];
  const table = el("table", { class: "cascade" });
  table.append(el("tr", {}, el("th", { text: "slide" }), ...stages.map((st) => el("th", { text: st }))));
  for (const s of rows) {
    table.append(
      el("tr", {}, el("td", { text: s.name || s.id }), ...stages.map((st) => el("td", { text: fmt(s.cascade[st] ?? "") }))),
    );
  }
  box.replaceChildren(table);
}

async function openSlide(slide) {
  if (!slide) return;
  const t0 = performance.now();
  document.getElementById("roi-panel").hidden = true;
  const xml = await getText(`/api/slides/${encodeURIComponent(slide.id)}/dzi`);
  const source = tileSource(slide.id, xml);
  current = { slide, rois: null };
  state.overlayDrawn = false;
  state.slideOpen = null;
  let opened;
  if (!viewer) {
    viewer = OSD({
      element: document.getElementById("osd"),
      prefixUrl: "/static/vendor/openseadragon/images/",
      // The navigation buttons load their images by prefixUrl + name (no token in the URL): the server's
      // cookie, set by the first tokened request, lets them through.
      showNavigationControl: true,
      showNavigator: true,
      navigatorPosition: "BOTTOM_RIGHT",
      drawer: "canvas",
      crossOriginPolicy: false,
      gestureSettingsMouse: { clickToZoom: false },
      maxZoomPixelRatio: 2,
      visibilityRatio: 0.5,
      tileSources: source,
    });
    viewer.addHandler("tile-loaded", () => {
      state.tilesLoaded += 1;
      if (state.timings.firstTileMs === undefined) state.timings.firstTileMs = performance.now() - t0;
    });
    viewer.addHandler("update-viewport", drawOverlay);
    viewer.addHandler("resize", drawOverlay);
    viewer.addHandler("canvas-click", onCanvasClick);
    overlay = el("canvas", { class: "roi-overlay", "data-testid": "roi-overlay" });
    viewer.canvas.appendChild(overlay);
    opened = onceOpened();
  } else {
    opened = onceOpened();
    viewer.open(source);
  }
  const note = document.getElementById("slide-note");
  note.textContent = `${slide.name || slide.id}: ${slide.width} x ${slide.height} px` + (slide.mpp ? `, ${fmt(slide.mpp)} um/px` : "");
  if (slide.has_heatmap) {
    try {
      current.rois = await getJSON(`/api/slides/${encodeURIComponent(slide.id)}/rois`);
      state.timings.roisMs = performance.now() - t0;
    } catch (err) {
      status(String(err.message), true);
    }
  }
  await opened;
  state.slideOpen = slide.id;
  drawOverlay();
}

/** Resolves on the viewer's next "open" (or "open-failed", reported in the header). */
function onceOpened() {
  return new Promise((resolve) => {
    viewer.addOnceHandler("open", () => resolve(true));
    viewer.addOnceHandler("open-failed", (e) => {
      status(`the slide could not be opened: ${e.message || "unknown error"}`, true);
      resolve(false);
    });
  });
}

/** The ROI value shown, scaled to [0, 1]: percentile (0..1 or 0..100) or the score on its raw range. */
function roiValue(roi, rois) {
  if (controls.by.value === "percentile") {
    const p = Number(roi.percentile);
    return p > 1 ? p / 100 : p;
  }
  const [lo, hi] = rois.score_range || [0, 1];
  return hi > lo ? (roi.score - lo) / (hi - lo) : 0.5;
}

function drawColorbar() {
  const box = document.getElementById("colorbar");
  const rois = current && current.rois;
  if (!rois) {
    box.textContent = current && current.slide.has_heatmap === false ? "this slide has no ROAM heatmap" : "";
    return;
  }
  const [lo, hi] = rois.score_range || [0, 1];
  const byPct = controls.by.value === "percentile";
  const bar = byPct
    ? colorBar(controls.cmap.value, 0, 100, "attention percentile (0-100)")
    : colorBar(controls.cmap.value, lo, hi, "attention score");
  const info = el(
    "div",
    { class: "cbar-note" },
    `raw score range ${fmt(lo)} to ${fmt(hi)}` + (rois.class_shown ? `; class shown: ${rois.class_shown}` : "") +
      (rois.predicted ? `; predicted: ${rois.predicted}` : ""),
  );
  box.replaceChildren(bar, info);
}

/** Redraw the ROI squares for the current viewport (called on every animation frame OpenSeadragon draws). */
function drawOverlay() {
  if (!viewer || !overlay) return;
  const container = viewer.canvas;
  const W = container.clientWidth;
  const H = container.clientHeight;
  if (overlay.width !== W || overlay.height !== H) {
    overlay.width = W;
    overlay.height = H;
  }
  const ctx = overlay.getContext("2d");
  ctx.clearRect(0, 0, W, H);
  drawColorbar();
  const rois = current && current.rois;
  if (!rois || !viewer.world.getItemCount()) return;
  const item = viewer.world.getItemAt(0);
  const size = rois.roi_size;
  const alpha = Number(controls.opacity.value);
  const cmap = controls.cmap.value;
  const fill = controls.on.checked;
  const grid = controls.grid.checked;
  let drawn = 0;
  for (const roi of rois.rois) {
    const a = item.imageToViewerElementCoordinates(new OSD.Point(roi.x, roi.y));
    const b = item.imageToViewerElementCoordinates(new OSD.Point(roi.x + size, roi.y + size));
    const w = b.x - a.x;
    const h = b.y - a.y;
    if (b.x < 0 || b.y < 0 || a.x > W || a.y > H) continue;
    if (fill) {
      const [r, g, bl] = colorAt(cmap, roiValue(roi, rois));
      ctx.fillStyle = `rgba(${r},${g},${bl},${alpha})`;
      ctx.fillRect(a.x, a.y, w, h);
    }
    if (grid) {
      ctx.strokeStyle = "rgba(0,0,0,0.8)";
      ctx.lineWidth = 1;
      ctx.strokeRect(a.x + 0.5, a.y + 0.5, w - 1, h - 1);
    }
    if (current.selected === roi.index) {
      ctx.strokeStyle = "#00e5ff";
      ctx.lineWidth = 3;
      ctx.strokeRect(a.x, a.y, w, h);
    }
    drawn++;
  }
  state.overlayDrawn = drawn > 0;
  state.overlayRois = drawn;
}

function roiAt(imgX, imgY) {
  const rois = current && current.rois;
  if (!rois) return null;
  const s = rois.roi_size;
  return rois.rois.find((r) => imgX >= r.x && imgX < r.x + s && imgY >= r.y && imgY < r.y + s) || null;
}

function onCanvasClick(ev) {
  if (!ev.quick || !viewer.world.getItemCount()) return;
  const item = viewer.world.getItemAt(0);
  const vp = viewer.viewport.pointFromPixel(ev.position);
  const img = item.viewportToImageCoordinates(vp);
  const roi = roiAt(img.x, img.y);
  if (roi) openRoi(roi);
}

/** Public for tests and links: open ROI `index` of the current slide. */
export function roiCentreOnPage(index) {
  const roi = current && current.rois && current.rois.rois.find((r) => r.index === index);
  if (!roi || !viewer) return null;
  const item = viewer.world.getItemAt(0);
  const s = current.rois.roi_size;
  const p = item.imageToViewerElementCoordinates(new OSD.Point(roi.x + s / 2, roi.y + s / 2));
  const rect = viewer.canvas.getBoundingClientRect();
  return { x: rect.left + p.x, y: rect.top + p.y };
}

async function openRoi(roi) {
  const t0 = performance.now();
  const slide = current.slide;
  current.selected = roi.index;
  drawOverlay();
  const panel = document.getElementById("roi-panel");
  panel.hidden = false;
  document.getElementById("roi-title").textContent = `ROI ${roi.index}`;
  const body = document.getElementById("roi-body");
  body.replaceChildren(el("p", { text: "loading..." }));
  state.roiOpened = roi.index;
  let detail;
  try {
    detail = await getJSON(`/api/slides/${encodeURIComponent(slide.id)}/rois/${roi.index}`);
  } catch (err) {
    body.replaceChildren(el("p", { class: "error", text: String(err.message) }));
    status(String(err.message), true);
    return;
  }
  const facts = el(
    "table",
    { class: "facts", "data-testid": "roi-facts" },
    el("tr", {}, el("th", { text: "score" }), el("td", { text: fmt(detail.score ?? roi.score) })),
    el("tr", {}, el("th", { text: "percentile" }), el("td", { text: fmt(roi.percentile) })),
    el("tr", {}, el("th", { text: "rank" }), el("td", { text: fmt(roi.rank) })),
    el("tr", {}, el("th", { text: "top-left (level 0)" }), el("td", { text: `${roi.x}, ${roi.y}` })),
  );
  const probs = detail.probabilities || (current.rois && current.rois.probabilities) || {};
  const probTable = el("table", { class: "facts", "data-testid": "roi-probabilities" });
  for (const [cls, p] of Object.entries(probs).sort((a, b) => b[1] - a[1])) {
    const bar = el("span", { class: "pbar", style: `width:${Math.round(100 * p)}px` });
    probTable.append(el("tr", {}, el("th", { text: cls }), el("td", {}, bar, ` ${fmt(p)}`)));
  }
  const maps = el("div", { class: "maps", "data-testid": "roi-maps" });
  let drawn = 0;
  for (const scale of ["20x", "10x", "5x"]) {
    const grid = detail.maps && detail.maps[scale];
    if (!Array.isArray(grid) || !grid.length) continue;
    maps.append(el("figure", {}, heatmapCanvas(grid, controls.cmap.value, `roi-map-${scale}`), el("figcaption", { text: scale })));
    drawn++;
  }
  body.replaceChildren(el("h3", { text: "Scores" }), facts, el("h3", { text: "Class probabilities" }), probTable, el("h3", { text: "Per-scale maps" }), maps);
  const fused = detail.maps && detail.maps.fused;
  const img = el("img", { class: "maps-png", alt: "ROI maps", "data-testid": "roi-maps-png" });
  img.src = withToken(fused || `/api/slides/${encodeURIComponent(slide.id)}/rois/${roi.index}/maps.png`);
  img.onerror = () => img.remove();
  img.onload = () => (state.roiMapsPng = roi.index);
  body.append(img);
  state.roiMapsDrawn = drawn;
  state.timings.roiClickMs = performance.now() - t0;
}

/** A small canvas heatmap of a 2-D array (one cell per pixel, scaled up by CSS), normalised to its own range. */
function heatmapCanvas(grid, cmap, testid) {
  const h = grid.length;
  const w = grid[0].length;
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of grid) for (const v of row) if (Number.isFinite(v)) (lo = Math.min(lo, v)), (hi = Math.max(hi, v));
  const canvas = el("canvas", { width: w, height: h, class: "heat", "data-testid": testid });
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = grid[y][x];
      const [r, g, b] = colorAt(cmap, hi > lo ? (v - lo) / (hi - lo) : 0.5);
      const o = (y * w + x) * 4;
      img.data[o] = r;
      img.data[o + 1] = g;
      img.data[o + 2] = b;
      img.data[o + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  canvas.title = `range ${fmt(lo)} to ${fmt(hi)}`;
  return canvas;
}

export function slideViewer() {
  return viewer;
}
