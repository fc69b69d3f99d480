// One device: its status and tags, a chart per numeric metric over the chosen range, and
// the last value of its text metrics. Short ranges read raw points, long ones buckets
// (avg, min, max) that the API serves from its rollups. Live readings from the stream
// are merged into the charts; history is (re)loaded once the stream confirms its
// subscription, so no reading falls between the two. A module's readings are series
// named "module/metric", charted like the device's own. Without a range in the address,
// the range is chosen from the newest reading (rangeFor), so old data is on screen.
//
// Below the charts, its twin, methods, cloud-to-device messages and alarms
// (devicecontrol.js); the stream's alarm events of this device refresh the alarms. The
// units a device reports in its twin (`units`: series name → unit, docs/protocol.md
// section 5) are shown on its charts and beside its last values, each time the twin is
// read; a series without one shows none.
//
// Gateways (docs/gateways.md): a device behind a gateway links to it, and says why it is
// offline when its gateway took it offline (read again when the stream says it went
// offline); a gateway shows its policy for new children, its children (paged) and what
// the broker refused it.

import { ApiError, describe, getJson, mapLimit } from "./api.js";
import { MetricChart, colorFor, withUnit } from "./chart.js";
import * as controls from "./devicecontrol.js";
import {
  deviceHref,
  el,
  fillTags,
  setAbsoluteTime,
  setOfflineReason,
  setRelativeTime,
  setStatusBadge,
  setText,
  showError,
  template,
  templateElement,
} from "./dom.js";
import { cursorPager } from "./pager.js";
import * as stream from "./stream.js";

// Raw points up to 1 h; then buckets, whole minutes, hours or days, so the API reads
// them from its rollups. A range longer than what its source keeps (GET
// /v1/fleet/retention: 1 min rollups 90 days, 1 h ones 730 days by default) is not
// offered.
export const RANGES = [
  { id: "15m", label: "15 min", seconds: 15 * 60, bucket: null },
  { id: "1h", label: "1 h", seconds: 3600, bucket: null },
  { id: "6h", label: "6 h", seconds: 6 * 3600, bucket: 60 },
  { id: "24h", label: "24 h", seconds: 24 * 3600, bucket: 300 },
  { id: "7d", label: "7 d", seconds: 7 * 86400, bucket: 3600 },
  { id: "30d", label: "30 d", seconds: 30 * 86400, bucket: 6 * 3600 },
  { id: "90d", label: "90 d", seconds: 90 * 86400, bucket: 86400 },
  { id: "1y", label: "1 y", seconds: 365 * 86400, bucket: 86400 },
  { id: "2y", label: "2 y", seconds: 730 * 86400, bucket: 86400 },
];
const DEFAULT_RANGE = "1h";

/** "5 min", "1 h", "6 h", "1 d": a bucket width. */
function widthText(bucket) {
  if (bucket >= 86400) return `${bucket / 86400} d`;
  if (bucket >= 3600) return `${bucket / 3600} h`;
  return `${bucket / 60} min`;
}

/** How far back the source of a range's points reaches, in seconds. */
function reachOf(range, kept) {
  if (!range.bucket) return kept.raw_s;
  return range.bucket % 3600 === 0 ? kept.hour_rollups_s : kept.minute_rollups_s;
}

/**
 * The range to show when the address names none, from the newest reading: the default
 * while the device reports, else the shortest range that holds its newest reading with
 * as much time again before it (a device silent for 3 h shows 6 h, for 2 days 7 d).
 */
export function rangeFor(newestSeconds, nowSeconds = Date.now() / 1000) {
  const fallback = RANGES.find((r) => r.id === DEFAULT_RANGE);
  if (!newestSeconds) return fallback;
  const age = Math.max(0, nowSeconds - newestSeconds);
  const wanted = Math.max(fallback.seconds, 2 * age);
  return RANGES.find((r) => r.seconds >= wanted) || RANGES[RANGES.length - 1];
}
const RAW_PAGE = 10_000;
const RAW_MAX_PAGES = 10;
// Readings may carry a ts a little ahead of this clock (ingest accepts up to 10 min).
const FUTURE_S = 600;
// How long to wait for the stream's subscription before loading history without it.
const SUBSCRIBE_WAIT_MS = 2000;
const TICK_MS = 10_000;
// The device (status, family) is read again this often, as the fleet list is.
const REFRESH_MS = 15_000;
// A gateway's children per page, as the fleet list pages devices.
const CHILDREN_PAGE = 50;
// The latest refusals shown (the API's default).
const REFUSALS_LIMIT = 100;

// A unit longer than this is not one ("°C", "m/s²", "kWh"): it is not shown.
const MAX_UNIT_CHARS = 24;

function seconds(iso) {
  return Date.parse(iso) / 1000;
}

/** The units of a twin's reported `units` (series name → unit): the non-empty strings. */
export function unitsOf(twin) {
  const declared = twin && twin.reported ? twin.reported.units : null;
  const units = new Map();
  if (declared === null || typeof declared !== "object" || Array.isArray(declared)) return units;
  for (const [metric, unit] of Object.entries(declared)) {
    if (typeof unit !== "string") continue;
    // A device writes this text: no control or format characters (a bidi override
    // would reorder what follows it on the page).
    const text = unit.replace(/[\p{Cc}\p{Cf}]/gu, "").trim();
    if (text && text.length <= MAX_UNIT_CHARS) units.set(metric, text);
  }
  return units;
}

export function mount(root, deviceId, params) {
  root.append(template("device"));
  const $ = (selector) => root.querySelector(selector);
  // No range in the address: one is chosen for the data present once /latest is read.
  const chosen = RANGES.find((r) => r.id === params.get("range"));
  let range = chosen || RANGES.find((r) => r.id === DEFAULT_RANGE);
  let rangePicked = Boolean(chosen);
  const error = $("#device-error");
  const chartsNode = $("#charts");
  const path = `/v1/devices/${encodeURIComponent(deviceId)}`;

  setText($("#device-title"), deviceId);
  $("section").dataset.deviceId = deviceId;
  $(".crumbs").append(" ", el("span", { "aria-current": "page" }, deviceId));
  function showMode(why = "") {
    setText(
      $("#device-mode"),
      (range.bucket
        ? `Last ${range.label}: average per ${widthText(range.bucket)}, with the min–max band.`
        : `Last ${range.label}: every reading.`) + (why ? ` ${why}` : ""),
    );
    $("#device-mode").dataset.range = range.id;
    for (const input of root.querySelectorAll('#range-picker input[name="range"]')) {
      input.checked = input.value === range.id;
    }
  }
  // The range picker: radio buttons, the choice kept in the address.
  const picker = $("#range-picker");
  for (const r of RANGES) {
    const input = el("input", {
      type: "radio",
      name: "range",
      id: `range-${r.id}`,
      value: r.id,
      "data-testid": `range-${r.id}`,
      checked: r === range,
    });
    input.addEventListener("change", () => {
      location.hash = `#/device/${encodeURIComponent(deviceId)}?range=${r.id}`;
    });
    picker.append(el("span", { class: "range" }, input, el("label", { for: `range-${r.id}` }, r.label)));
  }
  showMode();
  getJson("/v1/fleet/retention")
    .then((kept) => {
      for (const r of RANGES) {
        if (r === range || r.seconds <= reachOf(r, kept)) continue;
        picker.querySelector(`#range-${r.id}`).closest(".range").hidden = true;
      }
    })
    .catch(() => {}); // a key without telemetry:read: every range stays offered

  // The x range shown: the last `range` up to now, sliding.
  const window = () => {
    const end = Date.now() / 1000;
    return [end - range.seconds, end];
  };

  const charts = new Map(); // metric → MetricChart
  const texts = new Map(); // metric → {row, t, value}
  let units = new Map(); // metric → unit, from the reported twin
  let generation = 0;
  let loading = false;
  let pending = [];
  let closed = false;
  let lastSeen = null;
  let device = null; // GET /v1/devices/{id}, once read
  let deviceController = null;

  function chartFor(metric) {
    let chart = charts.get(metric);
    if (chart) return chart;
    chart = new MetricChart(metric, {
      window,
      bucket: range.bucket,
      color: colorFor(charts.size),
      unit: units.get(metric),
    });
    charts.set(metric, chart);
    // Keep the charts in metric order.
    const after = [...charts.keys()].filter((m) => m > metric).sort()[0];
    chartsNode.insertBefore(chart.figure, after ? charts.get(after).figure : null);
    chart.attach();
    $("#charts-empty").hidden = true;
    return chart;
  }

  function showTextMetric(metric, value, t) {
    const known = texts.get(metric);
    if (known && known.t > t) return;
    let row = known && known.row;
    if (!row) {
      row = el(
        "tr",
        { "data-metric": metric, "data-testid": "text-metric" },
        el("th", { scope: "row" }, metric),
        el("td", { class: "value" }),
        el("td", {}, el("time")),
      );
      const rowsNode = $("#text-metrics tbody");
      const after = [...rowsNode.children].find((r) => r.dataset.metric > metric);
      rowsNode.insertBefore(row, after || null);
      $("#text-metrics").hidden = false;
    }
    texts.set(metric, { row, t, value });
    row.dataset.value = String(value);
    showTextValue(metric, row, value);
    setAbsoluteTime(row.querySelector("time"), new Date(t * 1000));
  }

  function showTextValue(metric, row, value) {
    const unit = units.get(metric);
    setText(row.querySelector(".value"), withUnit(value, unit));
    if (unit) row.dataset.unit = unit;
    else delete row.dataset.unit;
  }

  /** The twin was read: show the units it states (and no more those it dropped). */
  function showUnits(twin) {
    units = unitsOf(twin);
    for (const [metric, chart] of charts) chart.setUnit(units.get(metric));
    for (const [metric, { row, value }] of texts) showTextValue(metric, row, value);
    chartsNode.dataset.units = String(units.size);
  }

  function noteSeen(iso) {
    if (!iso || (lastSeen && Date.parse(iso) <= Date.parse(lastSeen))) return;
    lastSeen = iso;
    setRelativeTime($("#device-seen"), iso);
  }

  function showStatus(online, reason) {
    setStatusBadge($("#device-status"), online);
    setOfflineReason($("#device-offline-reason"), online, reason);
  }

  function apply(message) {
    if (message.device_id !== deviceId) return;
    if (message.type === "alarm") {
      panels.onAlarm();
      return;
    }
    if (message.type === "status") {
      // The event does not say why: offline, its gateway may have taken it offline with
      // it (offline_reason), so read the device again; online, it has no such reason.
      if (deviceController) deviceController.abort();
      showStatus(message.online, null);
      if (device) Object.assign(device, { online: message.online, offline_reason: null });
      if (!message.online && device && device.parent) loadDevice();
      // A gateway going offline takes its children with it.
      if (device && device.gateway) gateway.load();
      return;
    }
    if (message.type !== "telemetry") return;
    const t = seconds(message.ts);
    for (const [metric, value] of Object.entries(message.values || {})) {
      if (typeof value === "number") chartFor(metric).add(t, value);
      else showTextMetric(metric, value, t);
    }
    noteSeen(message.ts);
  }

  function onEvent(message) {
    if (loading) pending.push(message);
    else apply(message);
  }

  async function loadDevice() {
    if (deviceController) deviceController.abort();
    deviceController = new AbortController();
    try {
      device = await getJson(path, {}, { signal: deviceController.signal });
      if (closed) return;
      showStatus(device.online, device.offline_reason);
      noteSeen(device.last_seen);
      if (!lastSeen) setRelativeTime($("#device-seen"), null);
      fillTags($("#device-tags"), device.tags);
      showFamily();
    } catch (err) {
      if (err.name === "AbortError") return;
      // Without devices:read the charts still work; say what is missing.
      if (!(err instanceof ApiError && err.status === 404)) showError(error, describe(err));
    }
  }

  function showFamily() {
    const section = $("section");
    section.dataset.gateway = String(Boolean(device.gateway));
    $("#device-gateway-marker").hidden = !device.gateway;
    const link = $("#device-parent-link");
    $("#device-parent").hidden = !device.parent;
    if (device.parent) {
      section.dataset.parent = device.parent;
      link.setAttribute("href", deviceHref(device.parent));
      setText(link, device.parent);
    } else {
      delete section.dataset.parent;
    }
    $("#gateway").hidden = !device.gateway;
    if (device.gateway) {
      showPolicy(device.gateway);
      gateway.load();
    }
  }

  function showPolicy(policy) {
    const tags = el("ul", { class: "chips tags" });
    fillTags(tags, policy.child_tags);
    const rows = [
      [
        "create_children",
        "Creates children",
        [
          policy.create_children
            ? "yes: a device id it publishes for that is not registered yet becomes its child on the first message"
            : "no: it may only publish for the devices registered behind it",
        ],
      ],
      [
        "child_id_pattern",
        "Child id pattern",
        [
          el("code", {}, policy.child_id_pattern),
          el(
            "span",
            { class: "muted" },
            policy.create_children ? " (the whole id)" : " (unused: it creates no children)",
          ),
        ],
      ],
      ["child_tags", "Child tags", [Object.keys(policy.child_tags || {}).length ? tags : "none"]],
    ];
    $("#gateway-policy").replaceChildren(
      ...rows.map(([name, label, value]) =>
        el("div", { "data-option": name }, el("dt", {}, label), el("dd", {}, ...value)),
      ),
    );
  }

  // A gateway's children (GET /v1/devices?parent=ID, paged by cursor like the fleet
  // list) and its refusals (GET /v1/devices/{id}/refusals).
  const gateway = (() => {
    const pager = cursorPager({
      prev: $("#children-prev"),
      next: $("#children-next"),
      label: $("#children-page"),
      onPage: () => load(),
    });
    let controller = null;
    const gatewayError = $("#gateway-error");

    function childRow(child) {
      const row = templateElement("child-row");
      row.dataset.deviceId = child.id;
      const link = row.querySelector(".device-link");
      link.setAttribute("href", deviceHref(child.id));
      setText(link, child.id);
      setStatusBadge(row.querySelector(".badge"), child.online);
      setOfflineReason(row.querySelector(".offline-reason"), child.online, child.offline_reason);
      setRelativeTime(row.querySelector(".seen"), child.last_seen);
      return row;
    }

    function refusalRow(refusal) {
      const row = templateElement("refusal-row");
      row.dataset.childId = refusal.child_id;
      setText(row.querySelector(".child"), refusal.child_id);
      setText(row.querySelector(".reason"), refusal.reason);
      setText(row.querySelector(".topic"), refusal.topic);
      setText(row.querySelector(".count"), refusal.count);
      setAbsoluteTime(row.querySelector(".last"), refusal.last_refused_at);
      const first = row.querySelector(".first");
      first.hidden = refusal.first_refused_at === refusal.last_refused_at;
      setAbsoluteTime(first.querySelector("time"), refusal.first_refused_at);
      return row;
    }

    async function load() {
      if (controller) controller.abort();
      controller = new AbortController();
      const { signal } = controller;
      try {
        const [page, refusals] = await Promise.all([
          getJson("/v1/devices", { parent: deviceId, limit: CHILDREN_PAGE, cursor: pager.cursor() }, { signal }),
          getJson(`${path}/refusals`, { limit: REFUSALS_LIMIT }, { signal }),
        ]);
        if (closed) return;
        $("#gateway-children tbody").replaceChildren(...page.items.map(childRow));
        pager.loaded(page.next_cursor);
        $("#children-empty").hidden = page.items.length > 0;
        $("#gateway-refusals tbody").replaceChildren(...refusals.map(refusalRow));
        $("#refusals-empty").hidden = refusals.length > 0;
        const more = $("#refusals-more");
        more.hidden = refusals.length < REFUSALS_LIMIT;
        setText(more, `The latest ${REFUSALS_LIMIT} device ids refused are shown.`);
        $("#gateway").dataset.loaded = "true";
        showError(gatewayError, "");
      } catch (err) {
        if (err.name !== "AbortError") showError(gatewayError, describe(err));
      }
    }

    return {
      load,
      stop() {
        if (controller) controller.abort();
      },
    };
  })();

  async function rawPoints(metric, from, to, gen) {
    const points = [];
    let cursor = null;
    for (let page = 0; page < RAW_MAX_PAGES; page++) {
      const body = await getJson(`${path}/telemetry`, { metric, from, to, limit: RAW_PAGE, cursor });
      if (gen !== generation) return null;
      for (const p of body.items) if (p.value !== null) points.push({ t: seconds(p.ts), value: p.value });
      cursor = body.next_cursor;
      if (!cursor) break;
    }
    return points;
  }

  async function buckets(metric, from, to) {
    const body = await getJson(`${path}/telemetry`, {
      metric,
      from,
      to,
      bucket: String(range.bucket),
      agg: "avg,min,max,count",
    });
    return body.items.map((b) => ({ t: seconds(b.bucket), avg: b.avg, min: b.min, max: b.max, count: b.count }));
  }

  async function loadHistory() {
    const gen = ++generation;
    loading = true;
    pending = [];
    try {
      const latest = await getJson(`${path}/latest`);
      if (gen !== generation) return;
      if (!rangePicked) {
        rangePicked = true;
        const newest = Math.max(
          0,
          ...Object.values(latest.metrics)
            .filter((m) => m.value !== null)
            .map((m) => seconds(m.ts)),
        );
        const picked = rangeFor(newest);
        if (picked !== range) {
          range = picked;
          showMode(`Chosen for the data present: the newest reading is from ${new Date(newest * 1000).toLocaleString()}.`);
        }
      }
      // Bucket edges lie on multiples of the width since 2000-01-01 (itself a whole
      // hour since the epoch): an aligned range lets the API read its rollups.
      const nowS = Date.now() / 1000;
      const toS = range.bucket ? Math.ceil(nowS / range.bucket) * range.bucket : nowS + FUTURE_S;
      const fromS = (range.bucket ? toS : nowS) - range.seconds;
      const from = new Date(fromS * 1000).toISOString();
      const to = new Date(toS * 1000).toISOString();
      const numeric = Object.keys(latest.metrics)
        .filter((m) => latest.metrics[m].value !== null)
        .sort();
      const history = await mapLimit(numeric, 4, (metric) =>
        range.bucket ? buckets(metric, from, to) : rawPoints(metric, from, to, gen),
      );
      if (gen !== generation || closed) return;

      for (const chart of charts.values()) chart.destroy();
      charts.clear();
      chartsNode.replaceChildren();
      numeric.forEach((metric, i) => {
        const chart = chartFor(metric);
        const m = latest.metrics[metric];
        chart.noteReading(seconds(m.ts), m.value);
        if (range.bucket) chart.setBuckets(history[i]);
        else chart.setPoints(history[i]);
      });
      for (const [metric, m] of Object.entries(latest.metrics)) {
        if (m.value === null) showTextMetric(metric, m.value_text, seconds(m.ts));
      }
      $("#charts-empty").hidden = charts.size > 0;
      showError(error, "");
      chartsNode.dataset.loaded = "true";
    } catch (err) {
      if (gen === generation) showError(error, describe(err));
    } finally {
      if (gen === generation) {
        loading = false;
        const queued = pending;
        pending = [];
        for (const message of queued) apply(message);
      }
    }
  }

  // Twin, methods, messages and alarms.
  const panels = controls.mount($("#device-panels"), deviceId, { onTwin: showUnits });

  // Stream first; history once it is subscribed (or after a short wait without it).
  let subscribedOnce = false;
  const fallback = setTimeout(() => {
    if (!subscribedOnce) loadHistory();
  }, SUBSCRIBE_WAIT_MS);
  stream.subscribe(
    { devices: [deviceId] },
    {
      onEvent,
      onSubscribed() {
        // Each (re)subscription: reload, so nothing between history and live is lost.
        subscribedOnce = true;
        clearTimeout(fallback);
        loadHistory();
      },
    },
  );
  loadDevice();
  const refresher = setInterval(() => {
    if (!document.hidden) loadDevice();
  }, REFRESH_MS);

  // Slide the window with the clock.
  const ticker = setInterval(() => {
    for (const chart of charts.values()) {
      chart.trim();
      chart.redraw();
    }
  }, TICK_MS);
  const resizer = new ResizeObserver(() => {
    for (const chart of charts.values()) chart.resize();
  });
  resizer.observe(chartsNode);

  return () => {
    closed = true;
    generation++;
    clearTimeout(fallback);
    clearInterval(ticker);
    clearInterval(refresher);
    if (deviceController) deviceController.abort();
    gateway.stop();
    panels.stop();
    resizer.disconnect();
    for (const chart of charts.values()) chart.destroy();
  };
}
