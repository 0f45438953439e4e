// A canvas scatter plot drawn in one pass from typed arrays (no per-point DOM; smooth at 100,000 points):
// points are written straight into an ImageData buffer, a grid index answers "nearest point" for hovering,
// and box or lasso selections are tested in one loop over the coordinates.


export class Scatter {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{flipY?: boolean, size?: [number, number], background?: number[], maxRadius?: number}} opts  flipY: y grows upwards
   *   (embeddings); spatial coordinates keep the image convention (y grows downwards).
   */
  constructor(canvas, opts = {}) {
    this.canvas = canvas;
    this.flipY = !!opts.flipY;
    this.fixedSize = opts.size || null;
    this.x = new Float32Array(0);
    this.y = new Float32Array(0);
    this.colors = null;
    this.marked = null; // Uint8Array mask: points drawn with a dark outline (selection, edited spots)
    this.pad = 8;
    this.background = opts.background || [255, 255, 255];
    // Embeddings are clumped, so the mean spacing overstates the room each point has: they cap lower.
    this.maxRadius = opts.maxRadius || 5;
    this.resize();
  }

  resize() {
    const [w, h] = this.fixedSize || [this.canvas.clientWidth || 600, this.canvas.clientHeight || 500];
    this.canvas.width = Math.max(50, Math.round(w));
    this.canvas.height = Math.max(50, Math.round(h));
    this._fit();
  }

  setData(x, y, bounds = null) {
    this.x = x;
    this.y = y;
    this.bounds = bounds;
    this.colors = null;
    this.marked = null;
    this._grid = null;
    this._fit();
  }

  setColors(colors) {
    this.colors = colors;
  }

  setMarked(mask) {
    this.marked = mask;
  }

  /** Data -> canvas transform keeping the aspect ratio. */
  _fit() {
    const n = this.x.length;
    let [x0, y0, x1, y1] = this.bounds || [Infinity, Infinity, -Infinity, -Infinity];
    if (!this.bounds) {
      for (let i = 0; i < n; i++) {
        const a = this.x[i];
        const b = this.y[i];
        if (a < x0) x0 = a;
        if (a > x1) x1 = a;
        if (b < y0) y0 = b;
        if (b > y1) y1 = b;
      }
    }
    if (!Number.isFinite(x0)) [x0, y0, x1, y1] = [0, 0, 1, 1];
    const w = this.canvas.width - 2 * this.pad;
    const h = this.canvas.height - 2 * this.pad;
    const s = Math.min(w / Math.max(x1 - x0, 1e-9), h / Math.max(y1 - y0, 1e-9));
    this.scale = s;
    this.ox = this.pad + (w - s * (x1 - x0)) / 2 - s * x0;
    this.oy = this.pad + (h - s * (y1 - y0)) / 2;
    this.x0 = x0;
    this.x1 = x1;
    this.y0 = y0;
    this.y1 = y1;
    this._grid = null;
  }

  toCanvas(i) {
    const px = this.ox + this.scale * this.x[i];
    const py = this.flipY ? this.oy + this.scale * (this.y1 - this.y[i]) : this.oy + this.scale * (this.y[i] - this.y0);
    return [px, py];
  }

  /** Point radius in pixels from how crowded the plot is. */
  radius() {
    // From the mean spacing of the points over the area they occupy on screen (not the whole canvas).
    const n = this.x.length;
    const w = Math.max(this.scale * (this.x1 - this.x0), 1);
    const h = Math.max(this.scale * (this.y1 - this.y0), 1);
    const spacing = Math.sqrt((w * h) / Math.max(n, 1));
    return Math.max(1, Math.min(this.maxRadius, Math.round(spacing / 2.6)));
  }

  draw() {
    const t0 = performance.now();
    const { width: W, height: H } = this.canvas;
    const ctx = this.canvas.getContext("2d");
    const img = ctx.createImageData(W, H);
    const d = img.data;
    const bg = this.background;
    for (let k = 0; k < W * H; k++) {
      d[k * 4] = bg[0];
      d[k * 4 + 1] = bg[1];
      d[k * 4 + 2] = bg[2];
      d[k * 4 + 3] = 255;
    }
    const r = this.radius();
    const n = this.x.length;
    const colors = this.colors;
    const marked = this.marked;
    const put = (cx, cy, rad, R, G, B) => {
      const xa = Math.max(0, cx - rad + 1);
      const xb = Math.min(W - 1, cx + rad - 1);
      const ya = Math.max(0, cy - rad + 1);
      const yb = Math.min(H - 1, cy + rad - 1);
      for (let yy = ya; yy <= yb; yy++) {
        let o = (yy * W + xa) * 4;
        for (let xx = xa; xx <= xb; xx++, o += 4) {
          d[o] = R;
          d[o + 1] = G;
          d[o + 2] = B;
        }
      }
    };
    // Two passes: unmarked points first so that marked ones (with their outline) stay visible on top.
    for (let pass = 0; pass < (marked ? 2 : 1); pass++) {
      for (let i = 0; i < n; i++) {
        const isMarked = marked ? marked[i] === 1 : false;
        if (marked && (pass === 0) === isMarked) continue;
        const [px, py] = this.toCanvas(i);
        if (!Number.isFinite(px) || !Number.isFinite(py)) continue;
        const cx = Math.round(px);
        const cy = Math.round(py);
        if (isMarked) put(cx, cy, r + 1, 70, 70, 70);
        if (colors) put(cx, cy, r, colors[i * 3], colors[i * 3 + 1], colors[i * 3 + 2]);
        else put(cx, cy, r, 60, 90, 160);
      }
    }
    ctx.putImageData(img, 0, 0);
    this.lastDrawMs = performance.now() - t0;
    return this.lastDrawMs;
  }

  /** A uniform grid of point indices over the canvas (cell = 16 px) for nearest-point look-ups. */
  _buildGrid() {
    const cell = 16;
    const gw = Math.ceil(this.canvas.width / cell);
    const gh = Math.ceil(this.canvas.height / cell);
    const counts = new Uint32Array(gw * gh + 1);
    const n = this.x.length;
    const cellOf = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      const [px, py] = this.toCanvas(i);
      const gx = Math.floor(px / cell);
      const gy = Math.floor(py / cell);
      if (!(gx >= 0 && gx < gw && gy >= 0 && gy < gh)) {
        cellOf[i] = -1;
        continue;
      }
      cellOf[i] = gy * gw + gx;
      counts[cellOf[i] + 1]++;
    }
    for (let k = 1; k < counts.length; k++) counts[k] += counts[k - 1];
    const items = new Uint32Array(n);
    const fill = counts.slice(0, gw * gh);
    for (let i = 0; i < n; i++) if (cellOf[i] >= 0) items[fill[cellOf[i]]++] = i;
    this._grid = { cell, gw, gh, starts: counts, items };
  }

  /** Index of the point nearest to canvas position (cx, cy) within maxDist pixels, or -1. */
  nearest(cx, cy, maxDist = 8) {
    if (!this.x.length) return -1;
    if (!this._grid) this._buildGrid();
    const { cell, gw, gh, starts, items } = this._grid;
    const gx = Math.floor(cx / cell);
    const gy = Math.floor(cy / cell);
    const reach = Math.ceil(maxDist / cell);
    let best = -1;
    let bestD = maxDist * maxDist;
    for (let y = gy - reach; y <= gy + reach; y++) {
      if (y < 0 || y >= gh) continue;
      for (let x = gx - reach; x <= gx + reach; x++) {
        if (x < 0 || x >= gw) continue;
        const c = y * gw + x;
        for (let k = starts[c]; k < starts[c + 1]; k++) {
          const i = items[k];
          const [px, py] = this.toCanvas(i);
          const dd = (px - cx) ** 2 + (py - cy) ** 2;
          if (dd <= bestD) {
            bestD = dd;
            best = i;
          }
        }
      }
    }
    return best;
  }

  /** Mask of points inside the canvas-space box or polygon (one loop over all points). */
  select(shape) {
    const n = this.x.length;
    const mask = new Uint8Array(n);
    if (shape.type === "box") {
      const [ax, ay, bx, by] = shape.box;
      const x0 = Math.min(ax, bx);
      const x1 = Math.max(ax, bx);
      const y0 = Math.min(ay, by);
      const y1 = Math.max(ay, by);
      for (let i = 0; i < n; i++) {
        const [px, py] = this.toCanvas(i);
        if (px >= x0 && px <= x1 && py >= y0 && py <= y1) mask[i] = 1;
      }
    } else {
      const poly = shape.points;
      for (let i = 0; i < n; i++) {
        const [px, py] = this.toCanvas(i);
        if (insidePolygon(px, py, poly)) mask[i] = 1;
      }
    }
    return mask;
  }

  /** Canvas position of a mouse event (canvas pixels, whatever its CSS size). */
  eventPos(ev) {
    const rect = this.canvas.getBoundingClientRect();
    return [
      ((ev.clientX - rect.left) * this.canvas.width) / rect.width,
      ((ev.clientY - rect.top) * this.canvas.height) / rect.height,
    ];
  }
}

function insidePolygon(x, y, poly) {
  let inside = false;
  for (let i = 0, j = poly.length - 1; i < poly.length; j = i++) {
    const [xi, yi] = poly[i];
    const [xj, yj] = poly[j];
    if (yi > y !== yj > y && x < ((xj - xi) * (y - yi)) / (yj - yi) + xi) inside = !inside;
  }
  return inside;
}

/**
 * Box (drag) and lasso (shift+drag, or mode() === "lasso") selection drawn on a transparent layer canvas
 * stacked over the plot; onSelect receives the shape in plot-canvas pixels.
 */
export function attachSelection(scatter, layer, mode, onSelect) {
  let start = null;
  let path = [];
  const ctx = layer.getContext("2d");
  const sync = () => {
    layer.width = scatter.canvas.width;
    layer.height = scatter.canvas.height;
  };
  sync();
  const clear = () => ctx.clearRect(0, 0, layer.width, layer.height);
  layer.addEventListener("pointerdown", (ev) => {
    sync();
    start = scatter.eventPos(ev);
    path = [start];
    layer.setPointerCapture(ev.pointerId);
    layer.dataset.lasso = ev.shiftKey || mode() === "lasso" ? "1" : "";
  });
  layer.addEventListener("pointermove", (ev) => {
    if (!start) return;
    const p = scatter.eventPos(ev);
    clear();
    ctx.strokeStyle = "#d00";
    ctx.lineWidth = 1.5;
    ctx.setLineDash([5, 3]);
    if (layer.dataset.lasso) {
      path.push(p);
      ctx.beginPath();
      path.forEach(([x, y], k) => (k ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.closePath();
      ctx.stroke();
    } else {
      ctx.strokeRect(start[0], start[1], p[0] - start[0], p[1] - start[1]);
    }
  });
  layer.addEventListener("pointerup", (ev) => {
    if (!start) return;
    const p = scatter.eventPos(ev);
    const lasso = !!layer.dataset.lasso;
    const s = start;
    start = null;
    if (lasso && path.length > 2) onSelect({ type: "lasso", points: path });
    else if (!lasso && Math.abs(p[0] - s[0]) + Math.abs(p[1] - s[1]) > 3) onSelect({ type: "box", box: [s[0], s[1], p[0], p[1]] });
  });
  return { clear };
}
