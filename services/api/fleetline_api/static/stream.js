// Live events from GET /v1/stream (WebSocket), one subscription at a time: the view on
// screen owns it. The key travels as a subprotocol (browsers cannot set headers):
// ["fleetline.v1", "bearer.<key>"]. Reconnects with backoff, except when the key is
// refused (4401) or lacks telemetry:read (4403). The state shows in the header.

import { API_ROOT, ApiError, getKey } from "./api.js";
import { setText } from "./dom.js";

const SUBPROTOCOL = "fleetline.v1";
const MAX_BACKOFF_S = 30;
const STABLE_AFTER_MS = 10_000; // a connection open this long resets the backoff
const CLOSE_REASONS = {
  1008: "a filter was refused",
  1011: "the server lost its database connection",
  1013: "the server dropped this client (too slow or too busy)",
  4401: "the key was refused",
  4403: "this key lacks the telemetry:read scope",
};

let current = null;
let unauthorized = () => {};

export function setStreamUnauthorizedHandler(handler) {
  unauthorized = handler;
}

function indicate(state, text) {
  const node = document.getElementById("live-status");
  node.dataset.state = state;
  setText(node, text);
}

/**
 * Subscribe to events (replacing the current subscription). `filter`: {devices, tags,
 * metrics, events} as lists; `handlers`: {onEvent(message), onSubscribed()}, the
 * latter called each time the server confirms a (re)subscription.
 */
export function subscribe(filter, handlers) {
  stop();
  current = new Subscription(filter, handlers);
  current.connect();
  return current;
}

export function stop() {
  if (current) current.close();
  current = null;
  indicate("off", "Live updates off");
}

export function streamUrl(filter) {
  const url = new URL("v1/stream", API_ROOT);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  for (const device of filter.devices || []) url.searchParams.append("device", device);
  for (const tag of filter.tags || []) url.searchParams.append("tag", tag);
  for (const metric of filter.metrics || []) url.searchParams.append("metric", metric);
  if (filter.events) url.searchParams.set("events", filter.events.join(","));
  return url;
}

class Subscription {
  constructor(filter, handlers) {
    this.filter = filter;
    this.handlers = handlers;
    this.socket = null;
    this.timer = null;
    this.attempt = 0;
    this.closed = false;
  }

  connect() {
    if (this.closed) return;
    const key = getKey();
    if (!key) return;
    indicate("connecting", "Live updates: connecting…");
    let socket;
    try {
      socket = new WebSocket(streamUrl(this.filter), [SUBPROTOCOL, `bearer.${key}`]);
    } catch (err) {
      // A key with characters a subprotocol cannot carry: it is not a valid key either.
      indicate("error", `Live updates unavailable (${err.message})`);
      return;
    }
    this.socket = socket;
    let openedAt = 0;
    socket.addEventListener("open", () => {
      openedAt = Date.now();
    });
    socket.addEventListener("message", (event) => {
      if (this.closed || socket !== this.socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      if (message.type === "subscribed") {
        indicate("live", "Live");
        if (this.handlers.onSubscribed) this.handlers.onSubscribed(message);
      } else if (this.handlers.onEvent) {
        this.handlers.onEvent(message);
      }
    });
    socket.addEventListener("close", (event) => {
      if (this.closed || socket !== this.socket) return;
      this.socket = null;
      if (openedAt && Date.now() - openedAt >= STABLE_AFTER_MS) this.attempt = 0;
      const why = event.reason || CLOSE_REASONS[event.code] || `closed (${event.code})`;
      if (event.code === 4401) {
        indicate("denied", `Live updates stopped: ${why}`);
        unauthorized(new ApiError(401, "Unauthorized", `the stream refused the key (${why})`));
        return;
      }
      if (event.code === 4403) {
        indicate("denied", `Live updates not allowed: ${why}`);
        return;
      }
      this.retry(why);
    });
  }

  retry(why) {
    const base = Math.min(MAX_BACKOFF_S, 2 ** this.attempt);
    const delay = base * (0.8 + Math.random() * 0.4);
    this.attempt += 1;
    indicate("retrying", `Live updates interrupted (${why}); retrying in ${Math.ceil(delay)} s`);
    this.timer = setTimeout(() => this.connect(), delay * 1000);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.socket) {
      const socket = this.socket;
      this.socket = null;
      // Closing a socket still connecting makes the browser log an error: wait for it.
      if (socket.readyState === WebSocket.CONNECTING) {
        socket.addEventListener("open", () => socket.close(1000, "view closed"));
      } else {
        socket.close(1000, "view closed");
      }
    }
  }
}
