// Talking to the msfm view server: every request carries the token the page was opened with.

const TOKEN = new URLSearchParams(location.search).get("token");

/** Append the page's token to a same-origin URL (tile URLs, image sources, download links). */
export function withToken(url) {
  if (!TOKEN) return url;
  const sep = url.includes("?") ? "&" : "?";
  return `${url}${sep}token=${encodeURIComponent(TOKEN)}`;
}

/** The state tests wait on (window.msfmState); one shared object so every view writes to the same place. */
export const state = (window.msfmState = window.msfmState || {
  ready: false,
  view: null,
  tilesLoaded: 0,
  overlayDrawn: false,
  roiOpened: null,
  roiMapsDrawn: 0,
  spatialDrawn: 0,
  selectionCount: 0,
  lastJob: null,
  resultDrawn: false,
  cellsDrawn: 0,
  hover: null,
  timings: {},
  errors: [],
});

/** Fetch JSON; a non-2xx answer throws an Error carrying the server's {"error": ...} text. */
export async function getJSON(url, options = {}) {
  const resp = await fetch(withToken(url), options);
  let body = null;
  const text = await resp.text();
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = { error: text };
  }
  if (!resp.ok) {
    const msg = (body && body.error) || `${resp.status} ${resp.statusText}`;
    throw new Error(`${url}: ${msg}`);
  }
  return body;
}

export function postJSON(url, payload) {
  return getJSON(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(payload),
  });
}

export async function getText(url) {
  const resp = await fetch(withToken(url));
  if (!resp.ok) throw new Error(`${url}: ${resp.status} ${resp.statusText}`);
  return resp.text();
}

/** Show a message in the header; errors are also kept in msfmState.errors for the tests. */
export function status(message, isError = false) {
  const el = document.getElementById("status");
  el.textContent = message;
  el.classList.toggle("error", isError);
  if (isError) state.errors.push(message);
}

/** Lists from JSON into Float32Array (null, NaN and missing values become NaN). */
export function toFloat32(values) {
  const out = new Float32Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    out[i] = v === null || v === undefined ? NaN : v;
  }
  return out;
}

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

/** Short number for labels: 4 significant digits. */
export function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "NA";
  if (typeof v !== "number") return String(v);
  return Number(v.toPrecision(4)).toString();
}
