// Alarms: GET /v1/alarms (newest first, cursor paging) filtered by state, severity and
// device (kept in the address), with Acknowledge (POST /v1/alarms/{id}/ack) and Clear
// (POST /v1/alarms/{id}/clear) as each alarm's state allows. The table is shared with
// the device page (alarmList), and its column headers sort the alarms shown. Refreshed
// every 15 s, and at once when the stream announces an alarm of a device shown.

import { describe, getJson, postJson } from "./api.js";
import { deviceLink, formatValue, setAbsoluteTime, setText, showError, template, templateElement } from "./dom.js";
import { cursorPager } from "./pager.js";
import { by, compareNewest, compareNumbers, compareRank, compareText, sortableTable } from "./sort.js";
import * as stream from "./stream.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 15_000;
export const STATES = ["active", "acknowledged", "cleared"];
export const SEVERITIES = ["critical", "major", "minor", "warning", "info"];

// Sort keys of the alarm table: newest, most severe, active first; ties keep the API's
// order (newest first).
const COMPARE = {
  raised: by((a) => a.raised_at, compareNewest),
  device: by((a) => a.device_id),
  rule: by((a) => a.rule_name),
  severity: by((a) => a.severity, compareRank(SEVERITIES)),
  state: by((a) => a.state, compareRank(STATES)),
  value: by((a) => a.value, compareNumbers),
  message: by((a) => a.message, compareText),
};

function alarmRow(alarm, { onAction }) {
  const tr = templateElement("alarm-row");
  tr.dataset.alarmId = String(alarm.id);
  tr.dataset.state = alarm.state;
  tr.dataset.deviceId = alarm.device_id;
  setAbsoluteTime(tr.querySelector(".raised"), alarm.raised_at, { date: true });
  tr.querySelector(".device").append(deviceLink(alarm.device_id));
  const rule = tr.querySelector(".rule");
  rule.append(
    Object.assign(document.createElement("a"), { href: `#/rules/${alarm.rule_id}` }),
    alarm.metric ? ` on ${alarm.metric}` : "",
  );
  setText(rule.querySelector("a"), alarm.rule_name);
  const severity = tr.querySelector(".severity");
  severity.dataset.severity = alarm.severity;
  setText(severity, alarm.severity);
  const state = tr.querySelector(".state");
  state.dataset.state = alarm.state;
  setText(state, alarm.state);
  const moved = tr.querySelector(".moved");
  const who = alarm.state === "cleared" ? alarm.cleared_by : alarm.state === "acknowledged" ? alarm.acknowledged_by : "";
  setText(moved, who ? `by ${who}` : "");
  const value = tr.querySelector(".value");
  setText(value, formatValue(alarm.value));
  value.setAttribute(
    "title",
    `peak ${formatValue(alarm.peak)}, ${alarm.count} reading${alarm.count === 1 ? "" : "s"} met the condition`,
  );
  setText(tr.querySelector(".message"), alarm.message);
  const ack = tr.querySelector(".ack");
  const clear = tr.querySelector(".clear");
  ack.disabled = alarm.state !== "active";
  clear.disabled = alarm.state === "cleared";
  ack.setAttribute("aria-label", `Acknowledge alarm ${alarm.id}`);
  clear.setAttribute("aria-label", `Clear alarm ${alarm.id}`);
  ack.addEventListener("click", () => onAction(alarm, "ack", tr));
  clear.addEventListener("click", () => onAction(alarm, "clear", tr));
  return tr;
}

/**
 * An alarm table in `container`: render(items) fills it; acting on an alarm posts the
 * action, shows a refusal (409: its state moved meanwhile) in `errorNode`, and calls
 * `onChanged`.
 */
export function alarmList(container, { errorNode, onChanged, showDevice = true, emptyText = "No alarm." }) {
  const node = template("alarm-table").firstElementChild;
  container.replaceChildren(node);
  node.classList.toggle("without-device", !showDevice);
  const tbody = node.querySelector("tbody");
  const empty = node.querySelector(".alarms-empty");
  setText(empty, emptyText);
  let alarms = [];
  const sorter = sortableTable(node.querySelector("table"), { compare: COMPARE, onSort: show });

  function show() {
    tbody.replaceChildren(...sorter.order(alarms).map((alarm) => alarmRow(alarm, { onAction })));
  }

  async function onAction(alarm, action, tr) {
    for (const button of tr.querySelectorAll("button")) button.disabled = true;
    try {
      const moved = await postJson(`/v1/alarms/${alarm.id}/${action}`);
      alarms = alarms.map((a) => (a.id === moved.id ? moved : a));
      tr.replaceWith(alarmRow(moved, { onAction }));
      showError(errorNode, "");
    } catch (err) {
      showError(errorNode, describe(err));
    }
    onChanged();
  }

  return {
    render(items) {
      alarms = items;
      show();
      empty.hidden = items.length > 0;
      node.dataset.loaded = "true";
    },
  };
}

export function mount(root, params) {
  root.append(template("alarms"));
  const $ = (selector) => root.querySelector(selector);
  const error = $("#alarms-error");
  const state = STATES.includes(params.get("state")) ? params.get("state") : "";
  const severity = SEVERITIES.includes(params.get("severity")) ? params.get("severity") : "";
  const deviceId = params.get("device_id") || "";
  // A rule's alarms (its page links here); no field of its own: "Apply" keeps it.
  const ruleId = /^[1-9][0-9]{0,17}$/.test(params.get("rule_id") || "") ? params.get("rule_id") : "";
  $("#alarms-state").value = state;
  $("#alarms-severity").value = severity;
  $("#alarms-device").value = deviceId;
  if (ruleId) setText($("#alarms-title"), `Alarms of rule ${ruleId}`);

  const pager = cursorPager({
    prev: $("#alarms-prev"),
    next: $("#alarms-next"),
    label: $("#alarms-page"),
    onPage: () => load(),
  });
  let controller = null;
  let closed = false;
  const list = alarmList($("#alarms-list"), {
    errorNode: error,
    onChanged: () => load({ keepError: true }),
    emptyText: state || severity || deviceId || ruleId ? "No alarm matches." : "No alarm.",
  });

  function apply() {
    const query = new URLSearchParams();
    if ($("#alarms-state").value) query.set("state", $("#alarms-state").value);
    if ($("#alarms-severity").value) query.set("severity", $("#alarms-severity").value);
    const device = $("#alarms-device").value.trim();
    if (device) query.set("device_id", device);
    if (ruleId) query.set("rule_id", ruleId);
    const text = query.toString();
    location.hash = text ? `#/alarms?${text}` : "#/alarms";
  }
  $("#alarms-filters").addEventListener("submit", (event) => {
    event.preventDefault();
    apply();
  });
  $("#alarms-state").addEventListener("change", apply);
  $("#alarms-severity").addEventListener("change", apply);

  async function load({ keepError = false } = {}) {
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const page = await getJson(
        "/v1/alarms",
        {
          state: state || null,
          severity: severity || null,
          device_id: deviceId || null,
          rule_id: ruleId || null,
          limit: PAGE_SIZE,
          cursor: pager.cursor(),
        },
        { signal: controller.signal },
      );
      if (closed) return;
      list.render(page.items);
      pager.loaded(page.next_cursor);
      setText($("#alarms-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      if (!keepError) showError(error, "");
    } catch (err) {
      if (err.name !== "AbortError") showError(error, describe(err));
    }
  }

  $("#alarms-refresh").addEventListener("click", () => load());

  // New and moved alarms arrive on the stream: read the page again (once per burst).
  let soon = null;
  stream.subscribe(deviceId ? { devices: [deviceId], events: ["alarm"] } : { events: ["alarm"] }, {
    onEvent(message) {
      if (message.type !== "alarm") return;
      clearTimeout(soon);
      soon = setTimeout(() => load({ keepError: true }), 300);
    },
  });
  const timer = setInterval(() => {
    if (!document.hidden) load({ keepError: true });
  }, REFRESH_MS);
  load();

  return () => {
    closed = true;
    clearInterval(timer);
    clearTimeout(soon);
    if (controller) controller.abort();
  };
}
