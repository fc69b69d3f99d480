// A rule: created (POST /v1/rules) or edited (PUT /v1/rules/{id}) in a form whose fields
// follow the rule's schema; the API validates, and each error of its 422 problem is
// shown next to the field it names (the others, and a 400's detail, above the form).
// A saved rule can be backtested (POST /v1/rules/{id}/backtest) over a range.

import { ApiError, describe, getJson, postJson, putJson } from "./api.js";
import {
  deviceLink,
  el,
  formatJson,
  formatValue,
  parseJsonField,
  setAbsoluteTime,
  setText,
  showError,
  template,
} from "./dom.js";

const OPS = [">", ">=", "<", "<=", "==", "!=", "rate>", "outside"];
const TAG = /^([A-Za-z0-9_.:-]{1,64})=(.*)$/;
const DAY_MS = 86_400_000;
// Shown once on the page a new rule opens on.
let flash = "";

/** A local time as a datetime-local input's value. */
function localInput(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
    `T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

/** A number input's value: a number, or undefined when empty (the API says it is missing). */
function number(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

export function mount(root, ruleId) {
  root.append(template("rule"));
  const $ = (selector) => root.querySelector(selector);
  const form = $("#rule-form");
  const error = $("#rule-error");
  const path = ruleId ? `/v1/rules/${ruleId}` : "/v1/rules";
  let closed = false;

  setText($("#rule-title"), ruleId ? `Rule ${ruleId}` : "New rule");
  $(".crumbs").append(" ", el("span", { "aria-current": "page" }, ruleId ? `#${ruleId}` : "new"));
  $("section").dataset.ruleId = ruleId || "";

  // Conditions: the same fields for raise and clear, each input named after its place.
  for (const fieldset of root.querySelectorAll("fieldset.condition")) {
    const which = fieldset.dataset.condition;
    fieldset.append(template("condition"));
    for (const field of fieldset.querySelectorAll(".field")) {
      const input = field.querySelector("input, select");
      const id = `rule-${which}-${field.dataset.field}`;
      input.id = id;
      input.setAttribute("data-testid", id);
      field.querySelector("label").setAttribute("for", id);
    }
    const op = fieldset.querySelector(".op");
    op.addEventListener("change", () => showCondition(fieldset));
  }

  function showCondition(fieldset) {
    const outside = fieldset.querySelector(".op").value === "outside";
    for (const node of fieldset.querySelectorAll(".value-only")) node.hidden = outside;
    for (const node of fieldset.querySelectorAll(".outside-only")) node.hidden = !outside;
  }

  function showKind() {
    const threshold = $("#rule-kind").value === "threshold";
    for (const node of root.querySelectorAll(".threshold-only")) node.hidden = !threshold;
    for (const node of root.querySelectorAll(".no-data-only")) node.hidden = threshold;
    $('fieldset[data-condition="clear"]').hidden = !threshold || !$("#rule-has-clear").checked;
  }
  $("#rule-kind").addEventListener("change", showKind);
  $("#rule-has-clear").addEventListener("change", showKind);

  function fillCondition(which, cond) {
    const fieldset = $(`fieldset[data-condition="${which}"]`);
    fieldset.querySelector(".op").value = cond && OPS.includes(cond.op) ? cond.op : ">";
    fieldset.querySelector(".value").value = cond && cond.value !== undefined ? String(cond.value) : "";
    fieldset.querySelector(".low").value = cond && cond.low !== undefined ? String(cond.low) : "";
    fieldset.querySelector(".high").value = cond && cond.high !== undefined ? String(cond.high) : "";
    fieldset.querySelector(".for").value = cond && cond.for_s !== undefined ? String(cond.for_s) : "0";
    showCondition(fieldset);
  }

  function fill(rule) {
    $("#rule-name").value = rule.name;
    $("#rule-kind").value = rule.kind;
    $("#rule-metric").value = rule.metric || "";
    fillCondition("raise", rule.raise);
    $("#rule-has-clear").checked = Boolean(rule.clear);
    fillCondition("clear", rule.clear);
    $("#rule-timeout").value = rule.timeout_s !== null && rule.timeout_s !== undefined ? String(rule.timeout_s) : "";
    $("#rule-devices").value = (rule.match.devices || []).join(", ");
    $("#rule-tags").value = Object.entries(rule.match.tags || {})
      .map(([k, v]) => `${k}=${v}`)
      .join(", ");
    $("#rule-severity").value = rule.severity;
    $("#rule-message").value = rule.message;
    $("#rule-actions").value = formatJson(rule.actions);
    $("#rule-enabled").checked = rule.enabled;
    setText($("#rule-title"), `Rule ${rule.id}: ${rule.name}`);
    setText($("#rule-version"), `version ${rule.version}, changed ${new Date(rule.updated_at).toLocaleString()}`);
    const alarms = $("#rule-alarms");
    alarms.hidden = false;
    alarms.setAttribute("href", `#/alarms?${new URLSearchParams({ rule_id: rule.id })}`);
    showKind();
  }

  // Errors next to the fields ----------------------------------------------------------
  function clearErrors() {
    for (const node of root.querySelectorAll("#rule-form .field-error")) node.remove();
    for (const node of root.querySelectorAll("#rule-form [aria-invalid]")) {
      node.removeAttribute("aria-invalid");
      node.removeAttribute("aria-describedby");
    }
    const other = $("#rule-other-errors");
    other.replaceChildren();
    other.hidden = true;
  }

  let errorCount = 0;
  function fieldError(field, message) {
    const id = `rule-field-error-${++errorCount}`;
    const node = el("p", { class: "field-error", id, "data-testid": "field-error" }, message);
    field.append(node);
    field.dataset.invalid = "true";
    const input = field.querySelector("input, select, textarea");
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.setAttribute("aria-describedby", id);
    }
  }

  function otherError(message) {
    const other = $("#rule-other-errors");
    other.append(el("li", {}, message));
    other.hidden = false;
  }

  /** The form field a validation error's location names, if any. */
  function fieldFor(loc) {
    const parts = loc.filter((p) => p !== "body");
    if (parts[0] === "threshold" || parts[0] === "no_data") parts.shift();
    if (parts[0] === "raise" || parts[0] === "clear") {
      const fieldset = $(`fieldset[data-condition="${parts[0]}"]`);
      const rest = OPS.includes(parts[1]) ? parts.slice(2) : parts.slice(1);
      return fieldset.querySelector(`[data-field="${rest[0] || "op"}"]`) || fieldset;
    }
    if (parts[0] === "match") return form.querySelector(`[data-field="match.${parts[1] || "devices"}"]`);
    return form.querySelector(`.field[data-field="${parts[0]}"]`);
  }

  function showProblem(err) {
    showError(error, describe(err));
    if (!(err instanceof ApiError)) return;
    for (const item of err.errors || []) {
      const loc = Array.isArray(item.loc) ? item.loc : [];
      const field = fieldFor(loc);
      const where = loc.filter((p) => p !== "body").join(".");
      if (field && !field.hidden) fieldError(field, item.msg);
      else otherError(`${where}: ${item.msg}`);
    }
  }

  // The body from the form -------------------------------------------------------------
  function condition(which) {
    const fieldset = $(`fieldset[data-condition="${which}"]`);
    const op = fieldset.querySelector(".op").value;
    const cond = { op };
    if (op === "outside") {
      cond.low = number(fieldset.querySelector(".low"));
      cond.high = number(fieldset.querySelector(".high"));
    } else {
      cond.value = number(fieldset.querySelector(".value"));
    }
    const forS = number(fieldset.querySelector(".for"));
    if (forS !== undefined) cond.for_s = forS;
    return cond;
  }

  /** The rule's body, or null after showing what the form itself can tell is wrong. */
  function body() {
    let ok = true;
    const devices = $("#rule-devices")
      .value.split(",")
      .map((d) => d.trim())
      .filter(Boolean);
    const tags = {};
    for (const item of $("#rule-tags").value.split(",").map((t) => t.trim()).filter(Boolean)) {
      const m = TAG.exec(item);
      if (!m) {
        fieldError(form.querySelector('[data-field="match.tags"]'), `"${item}" is not name=value`);
        ok = false;
      } else tags[m[1]] = m[2];
    }
    const actions = parseJsonField($("#rule-actions").value, "Actions", { empty: [] });
    if (actions.error || !Array.isArray(actions.value)) {
      fieldError(form.querySelector('[data-field="actions"]'), actions.error || "Actions must be a JSON list ([…]).");
      ok = false;
    }
    if (!ok) return null;
    const doc = {
      name: $("#rule-name").value.trim(),
      kind: $("#rule-kind").value,
      match: { devices, tags },
      severity: $("#rule-severity").value,
      message: $("#rule-message").value,
      actions: actions.value,
      enabled: $("#rule-enabled").checked,
    };
    if (doc.kind === "threshold") {
      doc.metric = $("#rule-metric").value.trim();
      doc.raise = condition("raise");
      if ($("#rule-has-clear").checked) doc.clear = condition("clear");
    } else {
      doc.timeout_s = number($("#rule-timeout"));
    }
    return doc;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    showError(error, "");
    $("#rule-saved").hidden = true;
    const doc = body();
    if (!doc) {
      showError(error, "Not saved: see the fields marked below.");
      return;
    }
    const button = $("#rule-save");
    button.disabled = true;
    try {
      const saved = ruleId ? await putJson(path, doc) : await postJson(path, doc);
      if (closed) return;
      if (!ruleId) {
        flash = `Rule ${saved.id} created.`;
        location.hash = `#/rules/${saved.id}`;
        return;
      }
      fill(saved);
      setText($("#rule-saved"), `Saved: version ${saved.version}.`);
      $("#rule-saved").hidden = false;
    } catch (err) {
      showProblem(err);
      const first = form.querySelector("[aria-invalid]");
      if (first) first.focus();
    } finally {
      button.disabled = false;
    }
  });

  // Backtest ---------------------------------------------------------------------------
  const now = new Date();
  $("#backtest-to").value = localInput(now);
  $("#backtest-from").value = localInput(new Date(now.getTime() - DAY_MS));

  function backtestRow(alarm) {
    const raised = el("time");
    setAbsoluteTime(raised, alarm.raised_at, { date: true });
    const cleared = el("time");
    if (alarm.cleared_at) setAbsoluteTime(cleared, alarm.cleared_at, { date: true });
    else setText(cleared, "still raised");
    return el(
      "tr",
      { "data-testid": "backtest-alarm", "data-device-id": alarm.device_id },
      el("th", { scope: "row" }, deviceLink(alarm.device_id)),
      el("td", {}, raised),
      el("td", {}, cleared),
      el("td", { class: "num" }, formatValue(alarm.value)),
      el("td", { class: "num" }, formatValue(alarm.peak)),
      el("td", { class: "num" }, alarm.count),
      el("td", {}, alarm.message),
    );
  }

  $("#backtest-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const backtestError = $("#backtest-error");
    const from = new Date($("#backtest-from").value);
    const to = new Date($("#backtest-to").value);
    if (Number.isNaN(from.getTime()) || Number.isNaN(to.getTime())) {
      showError(backtestError, "Give both times of the range.");
      return;
    }
    const button = $("#backtest-form button");
    button.disabled = true;
    try {
      const result = await postJson(`${path}/backtest`, undefined, {
        params: { from: from.toISOString(), to: to.toISOString() },
      });
      if (closed) return;
      const n = result.alarms.length;
      setText(
        $("#backtest-summary"),
        `${result.readings} reading${result.readings === 1 ? "" : "s"} replayed from ` +
          `${new Date(result.from).toLocaleString()} to ${new Date(result.to).toLocaleString()}: ` +
          (n ? `${n} alarm${n === 1 ? "" : "s"} would have been raised.` : "no alarm would have been raised."),
      );
      const box = $("#backtest-result");
      box.dataset.readings = String(result.readings);
      box.dataset.alarms = String(n);
      $("#backtest-alarms tbody").replaceChildren(...result.alarms.map(backtestRow));
      $("#backtest-alarms").hidden = n === 0;
      box.hidden = false;
      showError(backtestError, "");
    } catch (err) {
      showError(backtestError, describe(err));
    } finally {
      button.disabled = false;
    }
  });

  // Load --------------------------------------------------------------------------------
  fillCondition("raise", null);
  fillCondition("clear", null);
  showKind();
  if (flash) {
    setText($("#rule-saved"), flash);
    $("#rule-saved").hidden = false;
    flash = "";
  }
  if (ruleId) {
    $("#rule-form").dataset.loaded = "false";
    getJson(path)
      .then((rule) => {
        if (closed) return;
        fill(rule);
        $("#backtest").hidden = false;
        $("#rule-form").dataset.loaded = "true";
      })
      .catch((err) => showError(error, describe(err)));
  } else {
    $("#rule-form").dataset.loaded = "true";
  }

  return () => {
    closed = true;
  };
}
