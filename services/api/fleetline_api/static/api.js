// The REST API: the key (kept in this tab's sessionStorage), requests with
// `Authorization: Bearer <key>`, and RFC 9457 problems turned into ApiError.

const KEY_ITEM = "fleetline.apiKey";

// The API's root, from the page's own address (/dashboard/ → /), so the dashboard
// also works behind a proxy that mounts the API under a prefix.
export const API_ROOT = new URL("../", document.baseURI);

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function setKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

export function clearKey() {
  sessionStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, title, detail) {
    super(detail ? `${status} ${title}: ${detail}` : `${status} ${title}`);
    this.name = "ApiError";
    this.status = status;
    this.title = title;
    this.detail = detail;
  }
}

/** Called on any 401, with the error: the key is no longer accepted. */
let onUnauthorized = () => {};

export function setUnauthorizedHandler(handler) {
  onUnauthorized = handler;
}

/**
 * URL of an API path with query parameters; array values repeat the parameter
 * (`tag=a=1&tag=b=2`), null and undefined ones are left out.
 */
export function apiUrl(path, params = {}) {
  const url = new URL(path.replace(/^\//, ""), API_ROOT);
  for (const [name, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== null && item !== undefined && item !== "") url.searchParams.append(name, item);
    }
  }
  return url;
}

/** GET a JSON resource; throws ApiError (with the problem's detail) or a network error. */
export async function getJson(path, params = {}, { key = getKey(), signal } = {}) {
  return request("GET", apiUrl(path, params), { key, signal });
}

/** POST to an API path (a JSON body, if any); the JSON answer, or ApiError as getJson. */
export async function postJson(path, body, { signal } = {}) {
  return request("POST", apiUrl(path), { key: getKey(), signal, body });
}

async function request(method, url, { key, signal, body }) {
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "Network error", `the API did not answer (${err.message})`);
  }
  if (response.ok) return response.json();
  const error = await problem(response);
  if (error.status === 401) onUnauthorized(error);
  throw error;
}

async function problem(response) {
  let title = response.statusText || "Error";
  let detail = "";
  try {
    const body = await response.json();
    if (typeof body.title === "string") title = body.title;
    if (typeof body.detail === "string") detail = body.detail;
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  return new ApiError(response.status, title, detail);
}

/** A message for the user: the problem's status, title and detail. */
export function describe(err) {
  if (err instanceof ApiError) return err.message;
  return `Unexpected error: ${err && err.message ? err.message : err}`;
}

/** Run `task` over `items`, at most `limit` at a time; results in order. */
export async function mapLimit(items, limit, task) {
  const results = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      results[i] = await task(items[i], i);
    }
  }
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}
