// Rules: GET /v1/rules (by id, cursor paging), each with what it matches, its condition,
// severity and whether it is enabled; a rule's page edits it (rule.js). The column
// headers sort the page shown.

import { SEVERITIES } from "./alarms.js";
import { describe, getJson } from "./api.js";
import { el, formatValue, setAbsoluteTime, setText, showError, template } from "./dom.js";
import { cursorPager } from "./pager.js";
import { by, compareNewest, compareNumbers, compareRank, sortableTable } from "./sort.js";

const PAGE_SIZE = 100;

// Sort keys of the table: enabled and most severe first; ties by id.
const COMPARE = {
  id: by((rule) => rule.id, compareNumbers),
  name: by((rule) => rule.name),
  devices: by((rule) => matchText(rule.match)),
  condition: by((rule) => ruleConditionText(rule)),
  severity: by((rule) => rule.severity, compareRank(SEVERITIES)),
  enabled: by((rule) => Number(!rule.enabled), compareNumbers),
  changed: by((rule) => rule.updated_at, compareNewest),
};

/** A condition as text: "> 30 for 10 s", "outside 5…25". */
export function conditionText(cond) {
  if (!cond) return "";
  const what = cond.op === "outside" ? `outside ${formatValue(cond.low)}…${formatValue(cond.high)}` : `${cond.op} ${formatValue(cond.value)}`;
  return cond.for_s ? `${what} for ${formatValue(cond.for_s)} s` : what;
}

/** What a rule watches, as text. */
export function ruleConditionText(rule) {
  if (rule.kind === "no_data") return `no reading for ${formatValue(rule.timeout_s)} s`;
  const clear = rule.clear ? `; clears ${conditionText(rule.clear)}` : "";
  return `${rule.metric} ${conditionText(rule.raise)}${clear}`;
}

/** Which devices a rule matches, as text. */
export function matchText(match) {
  const parts = [];
  if (match.devices && match.devices.length) parts.push(match.devices.join(", "));
  const tags = Object.entries(match.tags || {}).map(([k, v]) => `${k}=${v}`);
  if (tags.length) parts.push(`tags ${tags.join(", ")}`);
  return parts.length ? parts.join(" or ") : "every device";
}

export function mount(root) {
  root.append(template("rules"));
  const $ = (selector) => root.querySelector(selector);
  const error = $("#rules-error");
  const pager = cursorPager({
    prev: $("#rules-prev"),
    next: $("#rules-next"),
    label: $("#rules-page"),
    onPage: () => load(),
  });
  let rules = [];
  const sorter = sortableTable($("#rules-table"), {
    compare: COMPARE,
    initial: { key: "id", dir: 1 },
    tie: COMPARE.id,
    onSort: () => $("#rules-table tbody").replaceChildren(...sorter.order(rules).map(row)),
  });
  let controller = null;

  function row(rule) {
    const link = el("a", { href: `#/rules/${rule.id}`, "data-testid": "rule-link" }, rule.name);
    const severity = el("span", { class: "badge severity", "data-severity": rule.severity }, rule.severity);
    const changed = el("time");
    setAbsoluteTime(changed, rule.updated_at, { date: true });
    return el(
      "tr",
      { "data-testid": "rule-row", "data-rule-id": rule.id, "data-enabled": String(rule.enabled) },
      el("td", { class: "num" }, rule.id),
      el("th", { scope: "row" }, link),
      el("td", {}, matchText(rule.match)),
      el("td", { "data-testid": "rule-condition" }, el("code", {}, ruleConditionText(rule))),
      el("td", {}, severity),
      el("td", { "data-testid": "rule-enabled" }, rule.enabled ? "yes" : "no"),
      el("td", {}, changed),
    );
  }

  async function load() {
    if (controller) controller.abort();
    controller = new AbortController();
    try {
      const page = await getJson("/v1/rules", { limit: PAGE_SIZE, cursor: pager.cursor() }, { signal: controller.signal });
      rules = page.items;
      $("#rules-table tbody").replaceChildren(...sorter.order(rules).map(row));
      pager.loaded(page.next_cursor);
      $("#rules-empty").hidden = rules.length > 0;
      setText($("#rules-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      $("#rules-table").dataset.loaded = "true";
      showError(error, "");
    } catch (err) {
      if (err.name !== "AbortError") showError(error, describe(err));
    }
  }

  $("#rules-refresh").addEventListener("click", () => load());
  load();

  return () => {
    if (controller) controller.abort();
  };
}
