// Cells view: an embedding (obsm basis) coloured by any obs column, with hover details (the confidence column
// highlighted) from the nearest point found through the scatter's grid index.
import { el, fmt, getJSON, state, status, toFloat32 } from "./api.js";
import { colorsFor } from "./colormaps.js";
import { Scatter } from "./scatter.js";

let plot = null;
let entry = null;
const hoverCache = new Map();

export async function initCells(index) {
  const entries = index.cells || [];
  const select = document.getElementById("cells-select");
  select.replaceChildren(...entries.map((c) => el("option", { value: c.id, text: `${c.name || c.id} (${c.n_obs})` })));
  plot = new Scatter(document.getElementById("cells-canvas"), { flipY: true, maxRadius: 2 });
  select.addEventListener("change", () => openCells(entries.find((c) => c.id === select.value)));
  document.getElementById("cells-basis").addEventListener("change", loadBasis);
  document.getElementById("cells-color").addEventListener("change", colorBy);
  const canvas = document.getElementById("cells-canvas");
  canvas.addEventListener("mousemove", onHover);
  canvas.addEventListener("mouseleave", () => (document.getElementById("tooltip").hidden = true));
  if (entries.length) await openCells(entries[0]);
}

async function openCells(e) {
  if (!e) return;
  entry = e;
  hoverCache.clear();
  const basis = document.getElementById("cells-basis");
  basis.replaceChildren(...(e.bases || []).map((b) => el("option", { value: b, text: b })));
  if ((e.bases || []).includes("X_umap")) basis.value = "X_umap"; // the usual picture, whatever the order
  const columns = e.columns || [];
  // Prefer a label-like categorical column first, so the first view is informative.
  const sorted = [...columns].sort((a, b) => (a.kind === "categorical" ? 0 : 1) - (b.kind === "categorical" ? 0 : 1));
  document.getElementById("cells-color").replaceChildren(
    ...sorted.map((c) => el("option", { value: c.name, text: `${c.name} (${c.kind})` })),
  );
  await loadBasis();
}

async function loadBasis() {
  const basis = document.getElementById("cells-basis").value;
  const t0 = performance.now();
  const d = await getJSON(`/api/cells/${encodeURIComponent(entry.id)}?basis=${encodeURIComponent(basis)}`);
  plot.resize();
  plot.setData(toFloat32(d.x), toFloat32(d.y));
  await colorBy();
  state.timings.cellsOpenMs = performance.now() - t0;
}

async function colorBy() {
  const key = document.getElementById("cells-color").value;
  const box = document.getElementById("cells-legend");
  if (key) {
    try {
      const c = await getJSON(`/api/cells/${encodeURIComponent(entry.id)}/color?key=${encodeURIComponent(key)}`);
      const { colors, key: keyBox } = colorsFor(c, key, "cells-colorbar");
      plot.setColors(colors);
      box.replaceChildren(keyBox);
      state.cellsColor = key;
    } catch (err) {
      status(String(err.message), true);
    }
  }
  state.timings.cellsDrawMs = plot.draw();
  state.cellsDrawn += 1;
}

async function onHover(ev) {
  const [cx, cy] = plot.eventPos(ev);
  const i = plot.nearest(cx, cy, 10);
  const tip = document.getElementById("tooltip");
  if (i < 0) {
    tip.hidden = true;
    return;
  }
  const t0 = performance.now();
  let obs = hoverCache.get(i);
  if (!obs) {
    try {
      obs = await getJSON(`/api/cells/${encodeURIComponent(entry.id)}/obs/${i}`);
    } catch (err) {
      status(String(err.message), true);
      return;
    }
    hoverCache.set(i, obs);
  }
  const rows = Object.entries(obs).map(([k, v]) =>
    el("tr", k.endsWith("_confidence") ? { class: "confidence" } : {}, el("th", { text: k }), el("td", { text: fmt(v) })),
  );
  tip.replaceChildren(el("div", { class: "tip-title", text: `cell ${i}` }), el("table", {}, ...rows));
  const stage = tip.parentElement.getBoundingClientRect();
  tip.style.left = `${ev.clientX - stage.left + 14}px`;
  tip.style.top = `${ev.clientY - stage.top + 14}px`;
  tip.hidden = false;
  state.hover = { index: i, obs };
  state.timings.hoverMs = performance.now() - t0;
}

/** For tests: the page position of point i. */
export function pointOnPage(i) {
  const [px, py] = plot.toCanvas(i);
  const rect = plot.canvas.getBoundingClientRect();
  return { x: rect.left + (px * rect.width) / plot.canvas.width, y: rect.top + (py * rect.height) / plot.canvas.height };
}
