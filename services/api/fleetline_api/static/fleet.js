// The fleet table: GET /v1/devices (filters in the address, cursor paging), the latest
// values of each visible device (GET /v1/devices/{id}/latest), refreshed every 15 s and
// kept current in between by the stream (telemetry and status of the visible devices).
// A gateway is marked as one; a device behind a gateway links to it (docs/gateways.md).

import { ApiError, describe, getJson, mapLimit } from "./api.js";
import {
  deviceHref,
  deviceLink,
  el,
  fillTags,
  formatValue,
  setOfflineReason,
  setRelativeTime,
  setStatusBadge,
  setText,
  showError,
  template,
  templateElement,
} from "./dom.js";
import * as stream from "./stream.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 15_000;
const SHOWN_VALUES = 6;
// Children a gateway took offline with it arrive as one burst of status events.
const RELOAD_DELAY_MS = 300;
const TAG_PATTERN = /^[A-Za-z0-9_.:-]{1,64}=.{0,256}$/;

export function mount(root, params) {
  root.append(template("fleet"));
  const $ = (selector) => root.querySelector(selector);
  const tbody = $("#fleet-table tbody");
  const error = $("#fleet-error");
  const tags = params.getAll("tag");
  const status = params.get("status") || "";
  $("#filter-status").value = status;

  // Paging: the cursors of the pages seen so far (the first page has none).
  const cursors = [null];
  let pageIndex = 0;
  let nextCursor = null;
  // device id → {row, device, values: Map(metric → {ts, value})}
  let rows = new Map();
  let subscribedTo = "";
  let controller = null;
  let latestDenied = "";

  function setFilters(nextTags, nextStatus) {
    const query = new URLSearchParams();
    for (const tag of nextTags) query.append("tag", tag);
    if (nextStatus) query.set("status", nextStatus);
    const text = query.toString();
    location.hash = text ? `#/fleet?${text}` : "#/fleet";
  }

  // Filters
  $("#tag-chips").replaceChildren(
    ...tags.map((tag) => {
      const remove = el("button", { type: "button", class: "chip-remove", "aria-label": `Remove filter ${tag}` }, "×");
      remove.addEventListener("click", () => setFilters(tags.filter((t) => t !== tag), status));
      return el("li", { class: "chip", "data-testid": "tag-chip" }, tag, remove);
    }),
  );
  $("#fleet-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = $("#filter-tag");
    const tag = input.value.trim();
    if (!tag) return;
    if (!TAG_PATTERN.test(tag)) {
      showError(error, `"${tag}" is not a tag filter: write name=value (name: letters, digits, _ . : -).`);
      input.focus();
      return;
    }
    setFilters(tags.includes(tag) ? tags : [...tags, tag], status);
  });
  $("#filter-status").addEventListener("change", (event) => setFilters(tags, event.target.value));

  // Rows
  function rowFor(device) {
    let entry = rows.get(device.id);
    if (!entry) {
      const row = templateElement("fleet-row");
      row.dataset.deviceId = device.id;
      const link = row.querySelector(".device-link");
      link.setAttribute("href", deviceHref(device.id));
      setText(link, device.id);
      entry = { row, device, values: new Map(), lastSeen: null };
    }
    entry.device = device;
    setStatus(entry, device.online, device.offline_reason);
    setSeen(entry, device.last_seen);
    fillTags(entry.row.querySelector(".tags"), device.tags);
    entry.row.querySelector(".marker").hidden = !device.gateway;
    entry.row.dataset.gateway = String(Boolean(device.gateway));
    const parent = entry.row.querySelector(".parent");
    if (device.parent) {
      parent.dataset.parent = device.parent;
      parent.replaceChildren(deviceLink(device.parent, { "data-testid": "device-parent-link" }));
    } else {
      delete parent.dataset.parent;
      parent.replaceChildren();
    }
    return entry;
  }

  function setStatus(entry, online, reason) {
    setStatusBadge(entry.row.querySelector(".badge"), online);
    setOfflineReason(entry.row.querySelector(".offline-reason"), online, reason);
  }

  function setSeen(entry, iso) {
    if (iso && entry.lastSeen && new Date(iso) <= new Date(entry.lastSeen)) return;
    entry.lastSeen = iso || entry.lastSeen;
    setRelativeTime(entry.row.querySelector(".seen"), entry.lastSeen);
  }

  function mergeValue(entry, metric, ts, value) {
    const known = entry.values.get(metric);
    if (known && new Date(known.ts) > new Date(ts)) return false;
    entry.values.set(metric, { ts, value });
    return true;
  }

  function renderValues(entry, changed = new Set()) {
    const list = entry.row.querySelector(".values");
    const metrics = [...entry.values.keys()].sort();
    const items = metrics.slice(0, SHOWN_VALUES).map((metric) => {
      const { ts, value } = entry.values.get(metric);
      const valueNode = el("span", { class: "value", "data-testid": "latest-value" }, formatValue(value));
      const item = el(
        "li",
        { "data-metric": metric, "data-value": String(value), title: `at ${new Date(ts).toLocaleString()}` },
        el("span", { class: "metric" }, metric),
        " ",
        valueNode,
      );
      if (changed.has(metric)) item.classList.add("changed");
      return item;
    });
    if (metrics.length > SHOWN_VALUES) {
      items.push(el("li", { class: "more" }, `+${metrics.length - SHOWN_VALUES} more`));
    }
    if (items.length === 0) items.push(el("li", { class: "muted" }, "no readings"));
    list.replaceChildren(...items);
  }

  async function loadLatest(entries, signal) {
    await mapLimit(entries, 6, async (entry) => {
      if (latestDenied || signal.aborted) return;
      try {
        const latest = await getJson(`/v1/devices/${encodeURIComponent(entry.device.id)}/latest`, {}, { signal });
        for (const [metric, m] of Object.entries(latest.metrics)) {
          mergeValue(entry, metric, m.ts, m.value_text !== null ? m.value_text : m.value);
        }
        renderValues(entry);
      } catch (err) {
        if (err.name === "AbortError") return;
        if (err instanceof ApiError && err.status === 404) return; // deleted meanwhile
        if (err instanceof ApiError && err.status === 403) latestDenied = `Latest values: ${describe(err)}`;
        else throw err;
      }
    });
    if (latestDenied) showError(error, latestDenied);
  }

  function follow(ids) {
    const key = ids.join("\n");
    if (key === subscribedTo) return;
    subscribedTo = key;
    if (ids.length === 0) {
      stream.stop();
      return;
    }
    stream.subscribe({ devices: ids }, { onEvent });
  }

  function onEvent(message) {
    const entry = rows.get(message.device_id);
    if (!entry) return;
    if (message.type === "telemetry") {
      const changed = new Set();
      for (const [metric, value] of Object.entries(message.values || {})) {
        if (mergeValue(entry, metric, message.ts, value)) changed.add(metric);
      }
      setSeen(entry, message.ts);
      if (changed.size) renderValues(entry, changed);
    } else if (message.type === "status") {
      entry.device.online = message.online;
      entry.device.offline_reason = null;
      setStatus(entry, message.online, null);
      // The event does not say why: a device behind a gateway may have gone offline with
      // it (offline_reason), so read the page again (once for all of them).
      if (!message.online && entry.device.parent) reloadSoon();
    }
  }

  let reloadTimer = null;
  function reloadSoon() {
    clearTimeout(reloadTimer);
    reloadTimer = setTimeout(load, RELOAD_DELAY_MS);
  }

  async function load() {
    clearTimeout(reloadTimer);
    if (controller) controller.abort();
    controller = new AbortController();
    const { signal } = controller;
    try {
      const page = await getJson(
        "/v1/devices",
        { tag: tags, status: status || null, limit: PAGE_SIZE, cursor: cursors[pageIndex] },
        { signal },
      );
      const next = new Map();
      for (const device of page.items) next.set(device.id, rowFor(device));
      rows = next;
      tbody.replaceChildren(...[...next.values()].map((entry) => entry.row));
      nextCursor = page.next_cursor;
      $("#fleet-empty").hidden = page.items.length > 0;
      $("#fleet-prev").disabled = pageIndex === 0;
      $("#fleet-next").disabled = !nextCursor;
      setText($("#fleet-page"), `Page ${pageIndex + 1}`);
      if (!latestDenied) showError(error, "");
      follow([...next.keys()]);
      await loadLatest([...next.values()], signal);
      setText($("#fleet-updated"), `Updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      if (err.name !== "AbortError") showError(error, describe(err));
    }
  }

  $("#fleet-next").addEventListener("click", () => {
    if (!nextCursor) return;
    cursors[pageIndex + 1] = nextCursor;
    pageIndex += 1;
    rows = new Map();
    load();
  });
  $("#fleet-prev").addEventListener("click", () => {
    if (pageIndex === 0) return;
    pageIndex -= 1;
    rows = new Map();
    load();
  });
  $("#fleet-refresh").addEventListener("click", () => load());
  const timer = setInterval(() => {
    if (!document.hidden) load();
  }, REFRESH_MS);
  load();

  return () => {
    clearInterval(timer);
    clearTimeout(reloadTimer);
    if (controller) controller.abort();
  };
}
