// DOM helpers. Data only ever reaches the page as text (textContent, attributes set one
// by one): never through innerHTML.

/** A copy of <template id="tpl-NAME">'s content (a DocumentFragment). */
export function template(name) {
  const tpl = document.getElementById(`tpl-${name}`);
  return tpl.content.cloneNode(true);
}

/** The first element of a template, cloned. */
export function templateElement(name) {
  return template(name).firstElementChild;
}

/** An element with attributes and text or element children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function setText(node, text) {
  node.textContent = text === null || text === undefined ? "" : String(text);
}

/** Show `message` in an error element (role=alert), or hide it when empty. */
export function showError(node, message) {
  setText(node, message || "");
  node.hidden = !message;
}

const numberFormat = new Intl.NumberFormat("en-US", {
  maximumFractionDigits: 4,
  useGrouping: false,
});

/** A reading's value as text: numbers compactly, strings as they are. */
export function formatValue(value) {
  if (value === null || value === undefined) return "—";
  if (typeof value === "number") return numberFormat.format(value);
  return String(value);
}

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

const timeFormat = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hourCycle: "h23",
});
const dateTimeFormat = new Intl.DateTimeFormat(undefined, {
  year: "numeric",
  month: "2-digit",
  day: "2-digit",
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hourCycle: "h23",
});

/** Local time, with the date unless it is today. */
export function formatTime(date) {
  if (!date) return "—";
  const d = date instanceof Date ? date : new Date(date);
  if (Number.isNaN(d.getTime())) return "—";
  const today = new Date();
  return d.toDateString() === today.toDateString() ? timeFormat.format(d) : dateTimeFormat.format(d);
}

/** "12 s ago", "5 min ago", "3 h ago", or the date further back. */
export function formatAgo(date, now = Date.now()) {
  if (!date) return "never";
  const d = date instanceof Date ? date : new Date(date);
  const seconds = Math.round((now - d.getTime()) / 1000);
  if (Number.isNaN(seconds)) return "—";
  if (seconds < 5) return "just now";
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return dateTimeFormat.format(d);
}

/**
 * Fill a <time> element: relative text ("12 s ago", kept current by refreshRelativeTimes),
 * the exact local time as its title and the ISO time as its datetime.
 */
export function setRelativeTime(node, iso) {
  if (!iso) {
    node.removeAttribute("datetime");
    node.removeAttribute("title");
    delete node.dataset.relative;
    setText(node, "never");
    return;
  }
  const d = new Date(iso);
  node.setAttribute("datetime", d.toISOString());
  node.setAttribute("title", dateTimeFormat.format(d));
  node.dataset.relative = "";
  setText(node, formatAgo(d));
}

/** Local date and time, always with the date. */
export function formatDateTime(date) {
  if (!date) return "—";
  const d = date instanceof Date ? date : new Date(date);
  return Number.isNaN(d.getTime()) ? "—" : dateTimeFormat.format(d);
}

/** Fill a <time> element with a local time (`date`: always with the date). */
export function setAbsoluteTime(node, iso, { date = false } = {}) {
  if (!iso) {
    setText(node, "");
    node.removeAttribute("datetime");
    return;
  }
  const d = new Date(iso);
  node.setAttribute("datetime", d.toISOString());
  node.setAttribute("title", dateTimeFormat.format(d));
  setText(node, date ? formatDateTime(d) : formatTime(d));
}

/** A <time> element showing a local date and time ("—" without one). */
export function timeElement(iso, options = { date: true }) {
  const node = document.createElement("time");
  if (iso) setAbsoluteTime(node, iso, options);
  else setText(node, "—");
  return node;
}

/** JSON as indented text (for <pre>, through textContent). */
export function formatJson(value) {
  return JSON.stringify(value, null, 2);
}

/**
 * Parse a JSON text field: {value} or {error} (a message naming the field). An empty
 * text gives `empty`.
 */
export function parseJsonField(text, label, { empty = undefined, object = false } = {}) {
  if (!text.trim()) return { value: empty };
  try {
    const value = JSON.parse(text);
    if (object && (value === null || typeof value !== "object" || Array.isArray(value))) {
      return { error: `${label} must be a JSON object ({…}).` };
    }
    return { value };
  } catch (err) {
    return { error: `${label} is not valid JSON: ${err.message}` };
  }
}

export function refreshRelativeTimes(root = document) {
  const now = Date.now();
  for (const node of root.querySelectorAll("time[data-relative]")) {
    setText(node, formatAgo(new Date(node.getAttribute("datetime")), now));
  }
}

/** A status badge: text and colour say the same. */
export function setStatusBadge(node, online) {
  node.classList.toggle("online", online === true);
  node.classList.toggle("offline", online !== true);
  node.dataset.online = String(online === true);
  setText(node, online === true ? "online" : "offline");
}

/**
 * Why a device is offline when it did not say so itself ("gateway 'gw-1' offline"),
 * shown beside its status badge; hidden while it is online or has no such reason.
 */
export function setOfflineReason(node, online, reason) {
  const text = online === true ? "" : reason || "";
  setText(node, text);
  node.hidden = !text;
}

/** The dashboard's address of a device's page. */
export function deviceHref(deviceId) {
  return `#/device/${encodeURIComponent(deviceId)}`;
}

/** A link to a device's page, its id as the text. */
export function deviceLink(deviceId, attrs = {}) {
  return el("a", { href: deviceHref(deviceId), ...attrs }, deviceId);
}

/** Tags as a list of "name=value" chips. */
export function fillTags(list, tags) {
  list.replaceChildren(
    ...Object.entries(tags || {})
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([name, value]) => el("li", { class: "chip" }, `${name}=${value}`)),
  );
}
