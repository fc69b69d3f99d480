// Dead letters: GET /v1/dead-letters, newest first, cursor paging, filtered by device;
// the column headers sort the page shown. The first page refreshes every 15 s.

import { describe, getJson } from "./api.js";
import { formatBytes, setAbsoluteTime, setText, showError, template, templateElement } from "./dom.js";
import { cursorPager } from "./pager.js";
import { by, compareNewest, compareNumbers, sortableTable } from "./sort.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 15_000;
const PREVIEW_CHARS = 80;
const SHOWN_BYTES = 4096;

// Sort keys of the table (rows: {item, tr}); ties keep the API's order (newest first).
const COMPARE = {
  received: by((r) => r.item.received_at, compareNewest),
  device: by((r) => r.item.device_id),
  topic: by((r) => r.item.topic),
  reason: by((r) => r.item.reason),
  size: by((r) => r.item.payload_size, compareNumbers),
};

export function mount(root, params) {
  root.append(template("dead-letters"));
  const $ = (selector) => root.querySelector(selector);
  const tbody = $("#dl-table tbody");
  const error = $("#dl-error");
  const deviceId = params.get("device_id") || "";
  $("#dl-device").value = deviceId;

  const pager = cursorPager({
    prev: $("#dl-prev"),
    next: $("#dl-next"),
    label: $("#dl-page"),
    onPage: () => load(),
  });
  let controller = null;
  let rows = []; // {item, tr} in the API's order
  const sorter = sortableTable($("#dl-table"), {
    compare: COMPARE,
    onSort: () => tbody.replaceChildren(...sorter.order(rows).map((r) => r.tr)),
  });

  $("#dl-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#dl-device").value.trim();
    location.hash = value ? `#/dead-letters?${new URLSearchParams({ device_id: value })}` : "#/dead-letters";
  });

  function row(item) {
    const tr = templateElement("dead-letter-row");
    tr.dataset.id = String(item.id);
    if (item.device_id) tr.dataset.deviceId = item.device_id;
    setAbsoluteTime(tr.querySelector(".received"), item.received_at, { date: true });
    const device = tr.querySelector(".device");
    if (item.device_id) {
      const link = document.createElement("a");
      link.setAttribute("href", `#/device/${encodeURIComponent(item.device_id)}`);
      setText(link, item.device_id);
      device.append(link);
    } else {
      setText(device, "—");
      device.setAttribute("title", "no device id in the topic");
    }
    setText(tr.querySelector(".topic"), item.topic);
    setText(tr.querySelector(".reason"), item.reason);
    setText(tr.querySelector(".size"), formatBytes(item.payload_size));
    tr.querySelector(".size").setAttribute("title", `${item.payload_size} bytes`);
    const text = item.payload_text || "";
    const oneLine = text.replace(/\s+/g, " ");
    setText(tr.querySelector(".preview"), oneLine.length > PREVIEW_CHARS ? `${oneLine.slice(0, PREVIEW_CHARS)}…` : oneLine || "(empty)");
    // The API sends the first 4 KiB of a payload.
    const shown = item.payload_size > SHOWN_BYTES ? `${text}\n… (${formatBytes(item.payload_size)} in all)` : text;
    setText(tr.querySelector(".full"), shown);
    return tr;
  }

  async function load() {
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const page = await getJson(
        "/v1/dead-letters",
        { limit: PAGE_SIZE, cursor: pager.cursor(), device_id: deviceId || null },
        { signal: controller.signal },
      );
      // Keep rows whose <details> the user opened.
      const open = new Set([...tbody.querySelectorAll("details[open]")].map((d) => d.closest("tr").dataset.id));
      rows = page.items.map((item) => ({ item, tr: row(item) }));
      for (const { tr } of rows) if (open.has(tr.dataset.id)) tr.querySelector("details").open = true;
      tbody.replaceChildren(...sorter.order(rows).map((r) => r.tr));
      pager.loaded(page.next_cursor);
      $("#dl-empty").hidden = page.items.length > 0;
      setText($("#dl-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      showError(error, "");
    } catch (err) {
      if (err.name !== "AbortError") showError(error, describe(err));
    }
  }

  $("#dl-refresh").addEventListener("click", () => load());
  const timer = setInterval(() => {
    if (pager.index() === 0 && !document.hidden) load();
  }, REFRESH_MS);
  load();

  return () => {
    clearInterval(timer);
    if (controller) controller.abort();
  };
}
