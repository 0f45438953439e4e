// msfm view: loads /api/index, shows the views that have data and switches between them.
import { getJSON, state, status } from "./api.js";
import { initCells, pointOnPage } from "./cells.js";
import { initSlides, roiCentreOnPage, slideViewer } from "./slides.js";
import { initSpatial, spotOnPage } from "./spatial.js";

const VIEWS = ["slides", "spatial", "cells"];
const started = {};
let index = null;

async function show(view) {
  for (const v of VIEWS) {
    document.getElementById(`view-${v}`).hidden = v !== view;
    document.querySelector(`#tabs button[data-view="${v}"]`).classList.toggle("active", v === view);
  }
  state.view = view;
  history.replaceState(null, "", `${location.pathname}${location.search}#${view}`);
  // Views start on first show: their canvases need a laid-out size.
  if (!started[view]) {
    started[view] = true;
    const init = { slides: initSlides, spatial: initSpatial, cells: initCells }[view];
    try {
      await init(index);
    } catch (err) {
      status(String(err.message || err), true);
    }
  }
  state[`${view}Ready`] = true;
}

async function main() {
  try {
    index = await getJSON("/api/index");
  } catch (err) {
    status(`cannot load /api/index: ${err.message}`, true);
    return;
  }
  state.index = index;
  const available = VIEWS.filter((v) => (index[v] || []).length);
  for (const v of VIEWS) {
    const button = document.querySelector(`#tabs button[data-view="${v}"]`);
    button.disabled = !available.includes(v);
    button.title = button.disabled ? `msfm view was started without ${v} data` : "";
    button.addEventListener("click", () => show(v));
  }
  const wanted = location.hash.slice(1);
  state.ready = true;
  if (!available.length) {
    status("nothing to show: give msfm view a demo folder, slides, an .h5ad or a checkpoint");
    return;
  }
  window.addEventListener("hashchange", () => {
    const v = location.hash.slice(1);
    if (available.includes(v) && v !== state.view) show(v);
  });
  await show(available.includes(wanted) ? wanted : available[0]);
}

// Hooks for the browser tests and scripted use (page positions of things drawn on canvases).
window.msfmTest = { roiCentreOnPage, pointOnPage, spotOnPage, slideViewer };

main();
