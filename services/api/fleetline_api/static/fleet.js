// The fleet table: GET /v1/devices (filters in the address, cursor paging), the latest
// values of each visible device (GET /v1/devices/{id}/latest), refreshed every 15 s and
// kept current in between by the stream (telemetry and status of the visible devices).
// A gateway is marked as one; a device behind a gateway links to it (docs/gateways.md).
//
// Above it, the fleet's counts (total, online, offline) under the tag filters, from
// GET /v1/fleet/counts (counted in the database). A search by id prefix reads its
// page of ids from POST /v1/query (`id >= 'p' AND id < 'p~'`, with the filters; ids are
// [A-Za-z0-9_.:-], all below '~') and each device from GET /v1/devices/{id}. The column
// headers sort the page shown.

import { ApiError, describe, getJson, mapLimit, postJson } from "./api.js";
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
import { cursorPager } from "./pager.js";
import { by, compareNewest, compareText, sortableTable } from "./sort.js";
import * as stream from "./stream.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 15_000;
const SHOWN_VALUES = 6;
// Children a gateway took offline with it arrive as one burst of status events.
const RELOAD_DELAY_MS = 300;
const TAG_PATTERN = /^[A-Za-z0-9_.:-]{1,64}=.{0,256}$/;
const ID_PREFIX = /^[A-Za-z0-9_.:-]{1,127}$/;

/** A device query's text literal. */
function literal(text) {
  return `'${String(text).replace(/'/g, "''")}'`;
}

/** The device query of an id prefix, tag filters and a status. */
export function searchQuery(prefix, tags, status) {
  const parts = [`id >= ${literal(prefix)}`, `id < ${literal(`${prefix}~`)}`];
  for (const tag of tags) {
    const [name, ...rest] = tag.split("=");
    const path = /^[A-Za-z0-9_:-]+$/.test(name) ? name : `"${name.replace(/"/g, '""')}"`;
    parts.push(`tags.${path} = ${literal(rest.join("="))}`);
  }
  if (status) parts.push(`status = ${literal(status)}`);
  return parts.join(" AND ");
}

function byId(a, b) {
  return a.device.id < b.device.id ? -1 : a.device.id > b.device.id ? 1 : 0;
}

// Sort keys of the table; ties fall back to the id.
const COMPARE = {
  id: byId,
  status: (a, b) => Number(b.device.online) - Number(a.device.online),
  parent: by((row) => row.device.parent, compareText),
  seen: by((row) => row.lastSeen, compareNewest),
};

export function mount(root, params) {
  root.append(template("fleet"));
  const $ = (selector) => root.querySelector(selector);
  const tbody = $("#fleet-table tbody");
  const error = $("#fleet-error");
  const tags = params.getAll("tag");
  const status = params.get("status") || "";
  const search = ID_PREFIX.test(params.get("q") || "") ? params.get("q") : "";
  $("#filter-status").value = status;
  $("#search-id").value = search;
  $("#search-clear").hidden = !search;

  // Paging by cursor; a new page starts with no rows.
  const pager = cursorPager({
    prev: $("#fleet-prev"),
    next: $("#fleet-next"),
    label: $("#fleet-page"),
    onPage() {
      rows = new Map();
      load();
    },
  });
  // device id → {row, device, values: Map(metric → {ts, value})}
  let rows = new Map();
  let subscribedTo = "";
  let controller = null;
  let latestDenied = "";

  function setFilters(nextTags, nextStatus, nextSearch = search) {
    const query = new URLSearchParams();
    if (nextSearch) query.set("q", nextSearch);
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
  $("#fleet-search").addEventListener("submit", (event) => {
    event.preventDefault();
    const prefix = $("#search-id").value.trim();
    if (prefix && !ID_PREFIX.test(prefix)) {
      showError(error, `"${prefix}" cannot begin a device id: ids are letters, digits and _ . : -`);
      $("#search-id").focus();
      return;
    }
    setFilters(tags, status, prefix);
  });
  $("#search-clear").addEventListener("click", () => setFilters(tags, status, ""));

  // Sorting the page shown
  const sorter = sortableTable($("#fleet-table"), {
    compare: COMPARE,
    initial: { key: "id", dir: 1 },
    tie: byId,
    onSort: renderSort,
  });
  function renderSort() {
    tbody.replaceChildren(...sorter.order(rows.values()).map((entry) => entry.row));
  }

  // Counts
  let countController = null;
  async function loadCounts() {
    if (countController) countController.abort();
    countController = new AbortController();
    const { signal } = countController;
    try {
      const counted = await getJson("/v1/fleet/counts", { tag: tags }, { signal });
      for (const name of ["total", "online", "offline"]) {
        setText(root.querySelector(`[data-count="${name}"] dd`), counted[name]);
      }
      const counts = $("#fleet-counts");
      counts.dataset.total = String(counted.total);
      counts.dataset.online = String(counted.online);
      counts.setAttribute(
        "aria-label",
        tags.length ? `Devices with the tags ${tags.join(", ")}` : "All devices",
      );
    } catch (err) {
      if (err.name !== "AbortError") showError(error, `Counts: ${describe(err)}`);
    }
  }

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

  /** A page of the devices whose id starts with `search`, as GET /v1/devices pages. */
  async function searchPage(signal) {
    const found = await postJson(
      "/v1/query",
      { query: searchQuery(search, tags, status), limit: PAGE_SIZE, cursor: pager.cursor() },
      { signal },
    );
    const devices = await mapLimit(found.items, 6, async (match) => {
      try {
        return await getJson(`/v1/devices/${encodeURIComponent(match.device_id)}`, {}, { signal });
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) return null; // deleted meanwhile
        throw err;
      }
    });
    return { items: devices.filter(Boolean), next_cursor: found.next_cursor };
  }

  async function load() {
    clearTimeout(reloadTimer);
    if (controller) controller.abort();
    controller = new AbortController();
    const { signal } = controller;
    try {
      loadCounts();
      const page = search
        ? await searchPage(signal)
        : await getJson(
            "/v1/devices",
            { tag: tags, status: status || null, limit: PAGE_SIZE, cursor: pager.cursor() },
            { signal },
          );
      const next = new Map();
      for (const device of page.items) next.set(device.id, rowFor(device));
      rows = next;
      renderSort();
      pager.loaded(page.next_cursor);
      $("#fleet-empty").hidden = page.items.length > 0;
      setText($("#fleet-empty"), search ? `No device id starts with "${search}".` : "No device matches.");
      $("#fleet-table").dataset.loaded = "true";
      if (!latestDenied) showError(error, "");
      follow([...next.keys()]);
      await loadLatest([...next.values()], signal);
      setText($("#fleet-updated"), `Updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      if (err.name !== "AbortError") showError(error, describe(err));
    }
  }

  $("#fleet-refresh").addEventListener("click", () => load());
  const timer = setInterval(() => {
    if (!document.hidden) load();
  }, REFRESH_MS);
  load();

  return () => {
    clearInterval(timer);
    clearTimeout(reloadTimer);
    if (controller) controller.abort();
    if (countController) countController.abort();
  };
}
