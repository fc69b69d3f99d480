// One metric's chart (uPlot, loaded as the global `uPlot` by vendor/uPlot.iife.min.js):
// raw points, or buckets (avg with a min–max band). Live readings are merged in: raw
// points in time order without duplicates (a reading is identified by its ts), buckets
// updated in place. The figure carries what it shows as data- attributes
// (data-points, data-last-value, data-last-ts, data-kind, data-y-ticks, data-unit) for
// tests and tools.
//
// A metric whose values are all 0 or 1 is taken for a boolean (devices may send true and
// false, stored as 1 and 0; the API keeps no type): its axis is 0/1 only, drawn as
// steps. Units: a device may state them in its reported twin (`units`, docs/protocol.md
// section 5; the device page passes them on): a known unit is shown beside the name, on
// the y axis (not a boolean's) and with every value; an unknown one not at all.

import { formatValue, setAbsoluteTime, setText, templateElement } from "./dom.js";

const PALETTE = ["#2563eb", "#c2410c", "#15803d", "#7e22ce", "#0e7490", "#be185d", "#4d7c0f", "#b45309"];
const HEIGHT = 200;

export function colorFor(index) {
  return PALETTE[index % PALETTE.length];
}

/** A value with its unit, if one is known: "21.5 °C". */
export function withUnit(value, unit) {
  const text = formatValue(value);
  return unit && value !== null && value !== undefined ? `${text} ${unit}` : text;
}

function translucent(hex, alpha) {
  const n = Number.parseInt(hex.slice(1), 16);
  return `rgba(${(n >> 16) & 255}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

export class MetricChart {
  /**
   * @param metric      the metric's name
   * @param window      () => [startSeconds, endSeconds]: the x range shown
   * @param bucket      bucket width in seconds, or null for raw points
   * @param color       the series colour
   * @param unit        the metric's unit ("°C"), or "" when none is known
   */
  constructor(metric, { window, bucket, color, unit = "" }) {
    this.metric = metric;
    this.window = window;
    this.bucket = bucket;
    this.color = color;
    this.unit = "";
    this.last = null; // the newest reading: {t, value}
    this.figure = templateElement("chart");
    this.figure.dataset.metric = metric;
    this.figure.dataset.mode = bucket ? "buckets" : "raw";
    setText(this.figure.querySelector(".metric-name"), metric);
    this.plotNode = this.figure.querySelector(".plot");
    this.plotNode.setAttribute("role", "img");
    // raw: [xs, ys]; buckets: [xs, avg, min, max] (+ counts, for merging live readings)
    this.data = bucket ? [[], [], [], []] : [[], []];
    this.counts = [];
    this.plot = null;
    this.boolean = false;
    this.figure.dataset.kind = "number";
    this.setUnit(unit);
  }

  /** The unit beside a value: none on a 0/1 chart (a state, not a quantity). */
  get valueUnit() {
    return this.boolean ? "" : this.unit;
  }

  /** Show the metric's unit ("" or null: none known); the plot is rebuilt on a change. */
  setUnit(unit) {
    const next = unit || "";
    const changed = next !== this.unit;
    this.unit = next;
    const node = this.figure.querySelector(".unit");
    setText(node, next ? `in ${next}` : "");
    node.hidden = !next;
    if (next) this.figure.dataset.unit = next;
    else delete this.figure.dataset.unit;
    const what = this.bucket
      ? `average per ${this.bucket} s with minimum and maximum`
      : "readings";
    this.plotNode.setAttribute("aria-label", `${this.metric}: ${what}${next ? `, in ${next}` : ""}`);
    if (changed) this.rebuild();
    this.publish();
  }

  /** Whether every value shown is 0 or 1 (and there is one). */
  looksBoolean() {
    const columns = this.bucket ? [this.data[2], this.data[3]] : [this.data[1]];
    let any = false;
    for (const column of columns) {
      for (const v of column) {
        if (v === null || v === undefined) continue;
        if (v !== 0 && v !== 1) return false;
        any = true;
      }
    }
    return any;
  }

  /** Draw as a boolean (0/1 axis, steps) or as a number; the plot is rebuilt on a change. */
  setBoolean(flag) {
    if (flag === this.boolean) return;
    this.boolean = flag;
    this.figure.dataset.kind = flag ? "boolean" : "number";
    this.rebuild();
  }

  /** Draw the plot again from scratch (its options changed), if it is drawn. */
  rebuild() {
    if (!this.plot) return;
    this.plot.destroy();
    this.plot = null;
    this.plotNode.replaceChildren();
    this.attach();
  }

  /** Create the uPlot instance (once the figure is in the document, to know its width). */
  attach() {
    const width = Math.max(300, this.plotNode.clientWidth);
    const series = [{}];
    let bands;
    const steps = this.boolean && typeof uPlot.paths.stepped === "function" ? uPlot.paths.stepped({ align: 1 }) : undefined;
    // The legend (the values under the cursor) says the unit; so does the y axis, but a
    // boolean's, which stays 0/1.
    const value = (_u, v) => withUnit(v, this.valueUnit);
    const axisLabel = this.unit && !this.boolean ? { label: this.unit, labelSize: 18, labelGap: 2 } : {};
    if (this.bucket) {
      series.push(
        { label: "avg", stroke: this.color, width: 1.5, paths: steps, value },
        { label: "min", stroke: translucent(this.color, 0.5), width: 1, dash: [4, 3], value },
        { label: "max", stroke: translucent(this.color, 0.5), width: 1, dash: [4, 3], value },
      );
      bands = [{ series: [3, 2], fill: translucent(this.color, 0.12) }];
    } else {
      series.push({
        label: this.metric,
        stroke: this.color,
        width: 1.5,
        paths: steps,
        points: { show: (u) => u.data[0].length <= 120, size: 5 },
        value,
      });
    }
    this.plot = new uPlot(
      {
        width,
        height: HEIGHT,
        series,
        bands,
        scales: {
          x: { time: true, range: () => this.window() },
          ...(this.boolean ? { y: { range: [-0.1, 1.1] } } : {}),
        },
        axes: [
          {},
          {
            size: 56,
            ...axisLabel,
            splits: this.boolean ? () => [0, 1] : undefined,
            // The ticks drawn, also as data-y-ticks (the axis is drawn on a canvas).
            values: (_u, ticks) => {
              this.figure.dataset.yTicks = ticks.join(",");
              return ticks.map((v) => formatValue(v));
            },
          },
        ],
        cursor: { drag: { x: false, y: false } },
        legend: { live: true },
      },
      this.data,
      this.plotNode,
    );
    this.publish();
  }

  /** Raw history: [{t (seconds), value}] in time order. */
  setPoints(points) {
    this.data = [points.map((p) => p.t), points.map((p) => p.value)];
    this.counts = [];
    const newest = points[points.length - 1];
    if (newest) this.noteReading(newest.t, newest.value);
    this.setBoolean(this.looksBoolean());
    this.redraw();
  }

  /** Bucketed history: [{t, avg, min, max, count}] in time order; `last` the newest reading. */
  setBuckets(buckets) {
    this.data = [
      buckets.map((b) => b.t),
      buckets.map((b) => b.avg),
      buckets.map((b) => b.min),
      buckets.map((b) => b.max),
    ];
    this.counts = buckets.map((b) => b.count || 0);
    this.setBoolean(this.looksBoolean());
    this.redraw();
  }

  /** The newest reading known (from /latest), shown above the chart. */
  noteReading(t, value) {
    if (this.last && this.last.t > t) return;
    this.last = { t, value };
  }

  /** A reading from the stream. */
  add(t, value) {
    this.noteReading(t, value);
    const xs = this.data[0];
    if (this.bucket) {
      const start = Math.floor(t / this.bucket) * this.bucket;
      let i = xs.length;
      while (i > 0 && xs[i - 1] > start) i--;
      if (i > 0 && xs[i - 1] === start) {
        const j = i - 1;
        const n = this.counts[j] || 0;
        const avg = this.data[1][j];
        this.data[1][j] = avg === null || avg === undefined ? value : (avg * n + value) / (n + 1);
        this.data[2][j] = this.data[2][j] === null ? value : Math.min(this.data[2][j], value);
        this.data[3][j] = this.data[3][j] === null ? value : Math.max(this.data[3][j], value);
        this.counts[j] = n + 1;
      } else {
        xs.splice(i, 0, start);
        this.data[1].splice(i, 0, value);
        this.data[2].splice(i, 0, value);
        this.data[3].splice(i, 0, value);
        this.counts.splice(i, 0, 1);
      }
    } else {
      let i = xs.length;
      while (i > 0 && xs[i - 1] > t) i--;
      if (i > 0 && xs[i - 1] === t) {
        this.data[1][i - 1] = value; // the same reading again
      } else {
        xs.splice(i, 0, t);
        this.data[1].splice(i, 0, value);
      }
    }
    this.trim();
    if (this.boolean !== this.looksBoolean()) this.setBoolean(!this.boolean);
    this.redraw();
  }

  /** Drop what slid out of the window. */
  trim() {
    const [start] = this.window();
    const first = this.bucket ? start - this.bucket : start;
    let n = 0;
    while (n < this.data[0].length && this.data[0][n] < first) n++;
    if (n > 0) {
      for (const column of this.data) column.splice(0, n);
      this.counts.splice(0, n);
    }
  }

  /** Redraw with the current window (the x range slides with the clock). */
  redraw() {
    if (this.plot) this.plot.setData(this.data);
    this.publish();
  }

  publish() {
    const points = this.data[0].length;
    this.figure.dataset.points = String(points);
    this.figure.querySelector(".no-data").hidden = points > 0;
    const valueNode = this.figure.querySelector(".last-value");
    const tsNode = this.figure.querySelector(".last-ts");
    if (this.last) {
      this.figure.dataset.lastValue = String(this.last.value);
      this.figure.dataset.lastTs = new Date(this.last.t * 1000).toISOString();
      setText(valueNode, withUnit(this.last.value, this.valueUnit));
      setAbsoluteTime(tsNode, new Date(this.last.t * 1000));
    } else {
      delete this.figure.dataset.lastValue;
      delete this.figure.dataset.lastTs;
      setText(valueNode, "—");
      setAbsoluteTime(tsNode, null);
    }
  }

  resize() {
    if (!this.plot) return;
    const width = Math.max(300, this.plotNode.clientWidth);
    if (width !== this.plot.width) this.plot.setSize({ width, height: HEIGHT });
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
  }
}
