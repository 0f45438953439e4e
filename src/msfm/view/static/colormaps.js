// Colour maps as anchor lists interpolated into 256-entry lookup tables, plus colour bars and legends.
import { el, fmt, toFloat32 } from "./api.js";

const ANCHORS = {
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"],
  magma: ["#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf"],
  inferno: ["#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4"],
  turbo: ["#30123b", "#4662d7", "#36aaf9", "#1ae4b6", "#72fe5e", "#c8ef34", "#faba39", "#f66b19", "#ca2a04", "#7a0403"],
  hot: ["#0b0000", "#4d0000", "#990000", "#e60000", "#ff3300", "#ff8000", "#ffcc00", "#ffff33", "#ffffb3", "#ffffff"],
  // Diverging blue-white-red for differences; always used with a symmetric range so white means zero.
  RdBu: ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"],
};

export const SEQUENTIAL = ["viridis", "magma", "inferno", "turbo", "hot"];

// 20 distinguishable colours for categories (cycled beyond 20).
export const PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
  "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
].map(hexToRgb);

export const MISSING = [190, 190, 190];

function hexToRgb(hex) {
  const n = parseInt(hex.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

const LUTS = {};

/** A 256x3 Uint8Array lookup table for a named map. */
export function lut(name) {
  if (LUTS[name]) return LUTS[name];
  const stops = (ANCHORS[name] || ANCHORS.viridis).map(hexToRgb);
  const table = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const t = (i / 255) * (stops.length - 1);
    const k = Math.min(Math.floor(t), stops.length - 2);
    const f = t - k;
    for (let c = 0; c < 3; c++) table[i * 3 + c] = Math.round(stops[k][c] * (1 - f) + stops[k + 1][c] * f);
  }
  LUTS[name] = table;
  return table;
}

/** [r, g, b] for t in [0, 1] (NaN gives the missing colour). */
export function colorAt(name, t) {
  if (!Number.isFinite(t)) return MISSING;
  const table = lut(name);
  const i = Math.max(0, Math.min(255, Math.round(t * 255)));
  return [table[i * 3], table[i * 3 + 1], table[i * 3 + 2]];
}

/** Finite min and max of an array (NaN ignored); [0, 1] when nothing is finite. */
export function range(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (Number.isFinite(v)) {
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  return Number.isFinite(lo) ? [lo, hi] : [0, 1];
}

/** Per-point RGB (Uint8Array n*3) for numeric values on [lo, hi]. */
export function numericColors(values, name, lo, hi) {
  const n = values.length;
  const out = new Uint8Array(n * 3);
  const table = lut(name);
  const span = hi > lo ? hi - lo : 1;
  for (let i = 0; i < n; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      out[i * 3] = MISSING[0];
      out[i * 3 + 1] = MISSING[1];
      out[i * 3 + 2] = MISSING[2];
      continue;
    }
    const k = Math.max(0, Math.min(255, Math.round(((v - lo) / span) * 255))) * 3;
    out[i * 3] = table[k];
    out[i * 3 + 1] = table[k + 1];
    out[i * 3 + 2] = table[k + 2];
  }
  return out;
}

/** Per-point RGB for categorical values (codes or labels); returns {colors, categories}. */
export function categoricalColors(values, categories) {
  const cats = categories && categories.length ? categories.map(String) : [...new Set(values.map(String))].sort();
  const index = new Map(cats.map((c, i) => [c, i]));
  const out = new Uint8Array(values.length * 3);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    // Values may come as category labels or as integer codes into `categories`.
    let k = index.get(String(v));
    if (k === undefined && typeof v === "number" && Number.isInteger(v) && v >= 0 && v < cats.length) k = v;
    const rgb = v === null || v === undefined || k === undefined ? MISSING : PALETTE[k % PALETTE.length];
    out[i * 3] = rgb[0];
    out[i * 3 + 1] = rgb[1];
    out[i * 3 + 2] = rgb[2];
  }
  return { colors: out, categories: cats };
}

/** A horizontal colour bar with its low/high labels and a caption naming the scale. */
export function colorBar(name, lo, hi, caption, testid = null) {
  const canvas = el("canvas", { width: 200, height: 12, class: "cbar" });
  const ctx = canvas.getContext("2d");
  const table = lut(name);
  for (let x = 0; x < 200; x++) {
    const k = Math.round((x / 199) * 255) * 3;
    ctx.fillStyle = `rgb(${table[k]},${table[k + 1]},${table[k + 2]})`;
    ctx.fillRect(x, 0, 1, 12);
  }
  const mid = (lo + hi) / 2;
  const labels = el(
    "div",
    { class: "cbar-labels" },
    el("span", { text: fmt(lo) }),
    el("span", { text: fmt(mid) }),
    el("span", { text: fmt(hi) }),
  );
  const box = el("div", { class: "cbar-box" }, el("div", { class: "cbar-caption", text: caption }), canvas, labels);
  if (testid) box.dataset.testid = testid;
  return box;
}

/** A legend of category swatches (at most 40 shown). */
export function legend(categories, caption) {
  const box = el("div", { class: "legend-box" }, el("div", { class: "cbar-caption", text: caption }));
  categories.slice(0, 40).forEach((c, i) => {
    const rgb = PALETTE[i % PALETTE.length];
    box.append(
      el("div", { class: "legend-row" }, el("span", { class: "swatch", style: `background:rgb(${rgb})` }), el("span", { text: c })),
    );
  });
  if (categories.length > 40) box.append(el("div", { text: `... ${categories.length - 40} more` }));
  return box;
}

/**
 * Colours for one `/color` answer of the API, with its legend (categories) or colour bar (numbers).
 * Returns { colors, key: the legend or colour bar element }.
 */
export function colorsFor(payload, caption, colorbarTestid = null) {
  if (payload.kind === "categorical") {
    const { colors, categories } = categoricalColors(payload.values, payload.categories);
    return { colors, key: legend(categories, caption) };
  }
  const v = toFloat32(payload.values);
  const [lo, hi] = range(v);
  return { colors: numericColors(v, "viridis", lo, hi), key: colorBar("viridis", lo, hi, caption, colorbarTestid) };
}

export function colormapNames() {
  return SEQUENTIAL.slice();
}
