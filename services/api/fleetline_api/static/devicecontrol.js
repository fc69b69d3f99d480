// The device page's panels below its charts: its twin (GET/PATCH /v1/devices/{id}/twin:
// desired, reported, delta; the desired document edited and saved as a merge patch of
// the differences with If-Match, so a change made meanwhile is a 412, not overwritten),
// direct methods (POST /v1/devices/{id}/methods/{name}), cloud-to-device messages
// (POST/GET /v1/devices/{id}/messages, with their history; cancel) and its alarms
// (GET /v1/alarms?device_id=). Each panel says what its key may not do (403) on its own.

import { ApiError, describe, getJson, getTagged, mergePatch, postJson } from "./api.js";
import { alarmList } from "./alarms.js";
import {
  el,
  formatJson,
  parseJsonField,
  setAbsoluteTime,
  setText,
  showError,
  template,
  templateElement,
} from "./dom.js";

const MESSAGE_LIMIT = 20;
const ALARM_LIMIT = 20;
// Messages not final yet are read again this often while the page is open.
const MESSAGE_REFRESH_MS = 5_000;
const FINAL = ["completed", "rejected", "expired", "cancelled"];
const METHOD_NAME = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$/;

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function sameJson(a, b) {
  return JSON.stringify(a) === JSON.stringify(b) && typeof a === typeof b;
}

/** The RFC 7396 merge patch that turns `from` into `to` (both objects). */
export function mergeDiff(from, to) {
  const patch = {};
  for (const key of Object.keys(from)) if (!(key in to)) patch[key] = null;
  for (const [key, value] of Object.entries(to)) {
    const old = from[key];
    if (isObject(old) && isObject(value)) {
      const inner = mergeDiff(old, value);
      if (Object.keys(inner).length) patch[key] = inner;
    } else if (!(key in from) || !sameJson(old, value)) {
      patch[key] = value;
    }
  }
  return patch;
}

/** A JSON value on one line, shortened. */
function oneLine(value, max = 120) {
  const text = JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/** `onTwin(twin)`: called with the twin document each time it is read or saved. */
export function mount(container, deviceId, { onTwin = () => {} } = {}) {
  container.append(template("device-panels"));
  const $ = (selector) => container.querySelector(selector);
  const path = `/v1/devices/${encodeURIComponent(deviceId)}`;
  let closed = false;

  // Twin ------------------------------------------------------------------------------
  const twinError = $("#twin-error");
  let twin = null; // the document last read or saved
  let etag = null;

  function showTwin(data, tag, { keepEdit = false } = {}) {
    twin = data;
    etag = tag || `"${data.desired_version}"`;
    setText($("#twin-desired"), formatJson(data.desired));
    setText($("#twin-reported"), formatJson(data.reported));
    setText($("#twin-delta"), Object.keys(data.delta).length ? formatJson(data.delta) : "{} (in sync)");
    $("#twin-delta").dataset.empty = String(Object.keys(data.delta).length === 0);
    setText(
      $("#twin-versions"),
      `desired version ${data.desired_version}, reported version ${data.reported_version}`,
    );
    $("#twin").dataset.desiredVersion = String(data.desired_version);
    if (!keepEdit) $("#twin-edit").value = formatJson(data.desired);
    onTwin(data);
  }

  async function loadTwin(options) {
    try {
      const { data, etag: tag } = await getTagged(`${path}/twin`);
      if (closed) return;
      showTwin(data, tag, options);
      $("#twin").dataset.loaded = "true";
    } catch (err) {
      showError(twinError, `Twin: ${describe(err)}`);
    }
  }

  $("#twin-reload").addEventListener("click", async () => {
    showError(twinError, "");
    $("#twin-saved").hidden = true;
    await loadTwin();
  });

  $("#twin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("#twin-saved").hidden = true;
    if (!twin) return;
    const parsed = parseJsonField($("#twin-edit").value, "The desired properties", { empty: {}, object: true });
    if (parsed.error) {
      showError(twinError, parsed.error);
      return;
    }
    const patch = mergeDiff(twin.desired, parsed.value);
    if (Object.keys(patch).length === 0) {
      showError(twinError, "");
      setText($("#twin-saved"), "Nothing changed.");
      $("#twin-saved").hidden = false;
      return;
    }
    const button = $("#twin-form button");
    button.disabled = true;
    try {
      const { data, etag: tag } = await mergePatch(`${path}/twin`, patch, { ifMatch: etag });
      showTwin(data, tag);
      showError(twinError, "");
      setText($("#twin-saved"), `Saved: desired version ${data.desired_version}.`);
      $("#twin-saved").hidden = false;
    } catch (err) {
      if (err instanceof ApiError && err.status === 412) {
        showError(
          twinError,
          `Not saved: the desired properties were changed by someone else since version ` +
            `${twin.desired_version} was loaded. Your edit is kept below; press Reload to ` +
            "see the current version, then apply your change again.",
        );
        $("#twin-error").dataset.conflict = "true";
      } else {
        showError(twinError, `Not saved: ${describe(err)}`);
      }
    } finally {
      button.disabled = false;
    }
  });

  // Methods ---------------------------------------------------------------------------
  const methodError = $("#method-error");
  $("#method-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("#method-name").value.trim();
    const result = $("#method-result");
    if (!METHOD_NAME.test(name)) {
      showError(methodError, "A method name is 1–64 letters, digits, _ . - (not starting with a dot).");
      $("#method-name").focus();
      return;
    }
    const params = parseJsonField($("#method-params").value, "The parameters", { empty: {}, object: true });
    if (params.error) {
      showError(methodError, params.error);
      $("#method-params").focus();
      return;
    }
    const timeout = Number($("#method-timeout").value || 30);
    const button = $("#method-form button");
    button.disabled = true;
    setText(button, "Waiting for the answer…");
    result.hidden = true;
    showError(methodError, "");
    try {
      const answer = await postJson(`${path}/methods/${encodeURIComponent(name)}`, {
        params: params.value,
        timeout_s: timeout,
      });
      if (closed) return;
      setText($("#method-status"), answer.status);
      setText($("#method-request"), answer.request_id);
      setText($("#method-payload"), formatJson(answer.payload));
      result.dataset.status = String(answer.status);
      result.hidden = false;
    } catch (err) {
      showError(methodError, describe(err));
    } finally {
      button.disabled = false;
      setText(button, "Invoke");
    }
  });

  // Cloud-to-device messages ----------------------------------------------------------
  const messageError = $("#message-error");
  let messageTimer = null;

  function messageRow(message) {
    const tr = templateElement("message-row");
    tr.dataset.messageId = message.id;
    tr.dataset.state = message.state;
    setAbsoluteTime(tr.querySelector(".created"), message.created_at, { date: true });
    setText(tr.querySelector(".by"), message.created_by ? ` by ${message.created_by}` : "");
    const state = tr.querySelector(".state");
    state.dataset.state = message.state;
    setText(state, message.state);
    const body = tr.querySelector(".body");
    setText(body, oneLine(message.body));
    body.setAttribute("title", formatJson(message.body));
    setText(tr.querySelector(".deliveries"), message.deliveries);
    tr.querySelector(".history").replaceChildren(
      ...message.history.map((event) => {
        const at = el("time");
        setAbsoluteTime(at, event.at, { date: true });
        return el(
          "li",
          { "data-event": event.event },
          el("strong", {}, event.event),
          " ",
          at,
          event.detail ? ` — ${event.detail}` : "",
        );
      }),
    );
    const cancel = tr.querySelector(".cancel");
    cancel.hidden = FINAL.includes(message.state);
    cancel.setAttribute("aria-label", `Cancel message ${message.id}`);
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await postJson(`${path}/messages/${message.id}/cancel`);
        showError(messageError, "");
      } catch (err) {
        showError(messageError, describe(err));
      }
      loadMessages();
    });
    return tr;
  }

  async function loadMessages() {
    clearTimeout(messageTimer);
    try {
      const page = await getJson(`${path}/messages`, { limit: MESSAGE_LIMIT });
      if (closed) return;
      $("#message-table tbody").replaceChildren(...page.items.map(messageRow));
      $("#messages-empty").hidden = page.items.length > 0;
      $("#messages").dataset.loaded = "true";
      // Follow the messages still on their way.
      if (page.items.some((m) => !FINAL.includes(m.state))) {
        messageTimer = setTimeout(() => {
          if (!document.hidden) loadMessages();
        }, MESSAGE_REFRESH_MS);
      }
    } catch (err) {
      if (!closed) showError(messageError, `Messages: ${describe(err)}`);
    }
  }

  $("#message-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = parseJsonField($("#message-body").value, "The body");
    if (body.error || body.value === undefined) {
      showError(messageError, body.error || "Write the message's body as JSON, e.g. {\"led\": \"on\"}.");
      $("#message-body").focus();
      return;
    }
    const ttl = $("#message-ttl").value ? Number($("#message-ttl").value) : undefined;
    const button = $("#message-form button");
    button.disabled = true;
    try {
      await postJson(`${path}/messages`, ttl === undefined ? { body: body.value } : { body: body.value, ttl_s: ttl });
      showError(messageError, "");
      $("#message-body").value = "";
    } catch (err) {
      showError(messageError, describe(err));
    } finally {
      button.disabled = false;
    }
    loadMessages();
  });
  $("#messages-refresh").addEventListener("click", () => loadMessages());

  // Alarms ----------------------------------------------------------------------------
  const alarmsError = $("#device-alarms-error");
  $("#device-alarms-all").setAttribute("href", `#/alarms?${new URLSearchParams({ device_id: deviceId })}`);
  const alarms = alarmList($("#device-alarms-list"), {
    errorNode: alarmsError,
    onChanged: () => loadAlarms({ keepError: true }),
    showDevice: false,
    emptyText: "No alarm for this device.",
  });

  async function loadAlarms({ keepError = false } = {}) {
    try {
      const page = await getJson("/v1/alarms", { device_id: deviceId, limit: ALARM_LIMIT });
      if (closed) return;
      alarms.render(page.items);
      if (!keepError) showError(alarmsError, "");
    } catch (err) {
      if (!closed) showError(alarmsError, `Alarms: ${describe(err)}`);
    }
  }

  loadTwin();
  loadMessages();
  loadAlarms();

  return {
    /** The stream announced an alarm of this device. */
    onAlarm() {
      loadAlarms({ keepError: true });
    },
    stop() {
      closed = true;
      clearTimeout(messageTimer);
    },
  };
}
