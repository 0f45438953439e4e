// Spatial view: spots at their coordinates coloured by a gene or obs column, box/lasso selection and the GeST
// perturbation job (progress, cancel, control / perturbed / difference small multiples, h5ad download).
import { el, fmt, getJSON, postJSON, state, status, toFloat32, withToken } from "./api.js";
import { colorBar, colorsFor, numericColors, range } from "./colormaps.js";
import { Scatter, attachSelection } from "./scatter.js";

let data = null; // {id, entry, x, y, genes, obs}
let plot = null;
let selection = null; // Uint8Array mask
let job = null; // {id, timer, t0}
const lists = { up: [], down: [] };

export async function initSpatial(index) {
  const entries = index.spatial || [];
  const select = document.getElementById("spatial-select");
  select.replaceChildren(...entries.map((s) => el("option", { value: s.id, text: `${s.name || s.id} (${s.n_obs})` })));
  plot = new Scatter(document.getElementById("spatial-canvas"));
  attachSelection(plot, document.getElementById("spatial-sel"), selMode, onSelect);
  select.addEventListener("change", () => openSpatial(entries.find((s) => s.id === select.value)));
  document.getElementById("spatial-color").addEventListener("change", (ev) => colorBy(ev.target.value));
  document.getElementById("sel-clear").addEventListener("click", () => setSelection(null));
  document.getElementById("add-up").addEventListener("click", () => addGene("up"));
  document.getElementById("add-down").addEventListener("click", () => addGene("down"));
  const amount = document.getElementById("amount");
  amount.addEventListener("input", () => (document.getElementById("amount-out").value = amount.value));
  document.getElementById("generate").addEventListener("click", generate);
  document.getElementById("job-cancel").addEventListener("click", cancel);
  if (entries.length) await openSpatial(entries[0]);
}

function selMode() {
  return document.querySelector('input[name="selmode"]:checked').value;
}

async function openSpatial(entry) {
  if (!entry) return;
  const t0 = performance.now();
  const d = await getJSON(`/api/spatial/${encodeURIComponent(entry.id)}`);
  data = { id: entry.id, entry, x: toFloat32(d.x), y: toFloat32(d.y), genes: d.genes || [], obs: d.obs || [] };
  plot.resize();
  plot.setData(data.x, data.y, d.bounds || null);
  selection = null;
  const keys = document.getElementById("spatial-keys");
  keys.replaceChildren(
    ...data.obs.map((o) => el("option", { value: o.name, text: `obs (${o.kind})` })),
    ...data.genes.map((g) => el("option", { value: g })),
  );
  document.getElementById("spatial-genes").replaceChildren(...data.genes.map((g) => el("option", { value: g })));
  document.getElementById("perturb-box").disabled = !entry.has_model;
  if (!entry.has_model) status("no GeST checkpoint loaded: perturbation is off (start msfm view with --checkpoint)");
  const first = data.obs.length ? data.obs[0].name : data.genes[0];
  document.getElementById("spatial-color").value = first || "";
  if (first) await colorBy(first);
  else redraw();
  state.timings.spatialOpenMs = performance.now() - t0;
}

async function colorBy(key) {
  if (!data || !key) return;
  try {
    const c = await getJSON(`/api/spatial/${encodeURIComponent(data.id)}/color?key=${encodeURIComponent(key)}`);
    const box = document.getElementById("spatial-legend");
    const { colors, key: keyBox } = colorsFor(c, key, "spatial-colorbar");
    plot.setColors(colors);
    box.replaceChildren(keyBox);
    state.spatialColor = key;
  } catch (err) {
    status(String(err.message), true);
  }
  redraw();
}

function redraw() {
  plot.setMarked(selection);
  state.timings.spatialDrawMs = plot.draw();
  state.spatialDrawn += 1;
}

function onSelect(shape) {
  setSelection(plot.select(shape));
}

function setSelection(mask) {
  selection = mask;
  let n = 0;
  if (mask) for (let i = 0; i < mask.length; i++) n += mask[i];
  if (!n) selection = null;
  state.selectionCount = n;
  document.getElementById("sel-count").textContent = String(n);
  redraw();
}

function addGene(which) {
  const input = document.getElementById("gene-pick");
  const gene = input.value.trim();
  if (!gene) return;
  if (data && data.genes.length && !data.genes.includes(gene)) {
    status(`gene ${gene} is not in this data set's genes`, true);
    return;
  }
  const other = which === "up" ? "down" : "up";
  lists[other] = lists[other].filter((g) => g !== gene);
  if (!lists[which].includes(gene)) lists[which].push(gene);
  input.value = "";
  renderLists();
}

function renderLists() {
  for (const which of ["up", "down"]) {
    const box = document.getElementById(`${which}-list`);
    box.replaceChildren(
      ...lists[which].map((g) => {
        const chip = el("span", { class: `chip ${which}`, text: g, title: "click to remove" });
        chip.addEventListener("click", () => {
          lists[which] = lists[which].filter((x) => x !== g);
          renderLists();
        });
        return chip;
      }),
    );
  }
}

function showError(text) {
  const box = document.getElementById("job-error");
  box.hidden = false;
  box.textContent = text;
}

async function generate() {
  const err = document.getElementById("job-error");
  err.hidden = true;
  if (!data) return;
  if (!selection) return showError("Select spots first: drag a box (or shift+drag a lasso) on the plot.");
  if (!lists.up.length && !lists.down.length) return showError("Add at least one gene to the up or down list.");
  const cells = [];
  for (let i = 0; i < selection.length; i++) if (selection[i]) cells.push(i);
  const body = {
    cells,
    up: lists.up,
    down: lists.down,
    amount: Number(document.getElementById("amount").value),
    mode: document.getElementById("pmode").value,
  };
  document.getElementById("result").hidden = true;
  state.resultDrawn = false;
  try {
    const t0 = performance.now();
    const { job: id } = await postJSON(`/api/spatial/${encodeURIComponent(data.id)}/perturb`, body);
    job = { id, t0 };
    state.lastJob = { id, state: "queued" };
    document.getElementById("job").hidden = false;
    document.getElementById("job-cancel").hidden = false;
    document.getElementById("generate").disabled = true;
    poll();
  } catch (e) {
    showError(String(e.message));
  }
}

async function poll() {
  if (!job) return;
  const id = job.id;
  let j;
  try {
    j = await getJSON(`/api/jobs/${encodeURIComponent(id)}`);
  } catch (e) {
    finish();
    return showError(String(e.message));
  }
  if (!job || job.id !== id) return;
  state.lastJob = { id, state: j.state, progress: j.progress };
  document.getElementById("job-progress").value = j.progress || 0;
  document.getElementById("job-message").textContent = `${j.state}${j.message ? `: ${j.message}` : ""}`;
  if (j.state === "queued" || j.state === "running") {
    job.timer = setTimeout(poll, 250);
    return;
  }
  state.timings.perturbMs = performance.now() - job.t0;
  finish();
  if (j.state === "done") showResult(id, j.result);
  else if (j.state === "failed") showError(`The perturbation failed: ${j.error || j.message || "no error text"}`);
  else document.getElementById("job-message").textContent = "cancelled";
}

function finish() {
  if (job && job.timer) clearTimeout(job.timer);
  job = null;
  document.getElementById("generate").disabled = false;
  document.getElementById("job-cancel").disabled = false;
  document.getElementById("job-cancel").hidden = true;
}

async function cancel() {
  if (!job) return;
  document.getElementById("job-cancel").disabled = true;
  try {
    await getJSON(`/api/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
  } catch (e) {
    showError(String(e.message));
  }
}

/** Control, perturbed and difference over all spots; the edited spots are outlined in each panel. */
function showResult(id, result) {
  const box = document.getElementById("result");
  box.hidden = false;
  const control = toFloat32(result.control);
  const perturbed = toFloat32(result.perturbed);
  const diff = toFloat32(result.diff);
  const edited = new Uint8Array(data.x.length);
  for (const i of result.edited || []) edited[i] = 1;
  const [a0, a1] = range(control);
  const [b0, b1] = range(perturbed);
  const lo = Math.min(a0, b0);
  const hi = Math.max(a1, b1);
  const [d0, d1] = range(diff);
  const m = Math.max(Math.abs(d0), Math.abs(d1)) || 1; // symmetric so that white means "no change"
  const panels = [
    ["res-control", numericColors(control, "viridis", lo, hi)],
    ["res-perturbed", numericColors(perturbed, "viridis", lo, hi)],
    ["res-diff", numericColors(diff, "RdBu", -m, m)],
  ];
  for (const [cid, colors] of panels) {
    // Grey behind the difference so that white (no change) spots stay visible.
    const background = cid === "res-diff" ? [225, 225, 225] : [255, 255, 255];
    const p = new Scatter(document.getElementById(cid), { size: [260, 220], background });
    p.setData(data.x, data.y, plot.bounds);
    p.setColors(colors);
    p.setMarked(edited);
    p.draw();
  }
  document.getElementById("result-title").textContent =
    `${result.gene}: ${(result.edited || []).length} edited spots, ${(result.targets || []).length} targets`;
  document.getElementById("result-bars").replaceChildren(
    colorBar("viridis", lo, hi, `${result.gene} expression (control and perturbed)`),
    colorBar("RdBu", -m, m, `${result.gene} difference (symmetric)`),
  );
  const link = document.getElementById("download");
  link.href = withToken(`/api/jobs/${encodeURIComponent(id)}/result.h5ad`);
  // A requantized edit too small to move any spot to another meta-cell leaves the model's input unchanged: say
  // so next to the panels rather than let an all-white difference look like a finding.
  const note = document.getElementById("result-note");
  const noOp = Boolean(result.summary && result.summary.no_op);
  note.hidden = !noOp;
  note.textContent = noOp
    ? "This edit changed nothing the model reads: no edited spot moved to another meta-cell (requantize mode). " +
      "Select more spots, add genes, raise the strength, or choose the continuous mode."
    : "";
  state.resultDrawn = true;
  state.resultSummary = result.summary || null;
  status(`perturbation done in ${fmt(state.timings.perturbMs / 1000)} s`);
}

/** For tests: the page position of spot i on the main plot. */
export function spotOnPage(i) {
  const [px, py] = plot.toCanvas(i);
  const rect = plot.canvas.getBoundingClientRect();
  return { x: rect.left + (px * rect.width) / plot.canvas.width, y: rect.top + (py * rect.height) / plot.canvas.height };
}
