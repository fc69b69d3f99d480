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
  /** `errors`: a validation problem's list of {loc, msg, type} (422), else []. */
  constructor(status, title, detail, errors = []) {
    super(detail ? `${status} ${title}: ${detail}` : `${status} ${title}`);
    this.name = "ApiError";
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.errors = errors;
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
export async function postJson(path, body, { signal, params } = {}) {
  return request("POST", apiUrl(path, params), { key: getKey(), signal, body });
}

/** PUT a JSON body; the JSON answer, or ApiError. */
export async function putJson(path, body, { signal } = {}) {
  return request("PUT", apiUrl(path), { key: getKey(), signal, body });
}

/** GET a JSON resource with its ETag: {data, etag}. */
export async function getTagged(path, params = {}, { signal } = {}) {
  return request("GET", apiUrl(path, params), { key: getKey(), signal, tagged: true });
}

/**
 * PATCH with a JSON merge patch (RFC 7396), with If-Match when `ifMatch` is given (a 412
 * when the resource changed since): {data, etag}.
 */
export async function mergePatch(path, patch, { ifMatch, signal } = {}) {
  const headers = { "Content-Type": "application/merge-patch+json" };
  if (ifMatch) headers["If-Match"] = ifMatch;
  return request("PATCH", apiUrl(path), { key: getKey(), signal, body: patch, headers, tagged: true });
}

async function request(method, url, { key, signal, body, headers: extra = {}, tagged = false }) {
  const headers = { Authorization: `Bearer ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  Object.assign(headers, extra);
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
  if (response.ok) {
    const data = response.status === 204 ? null : await response.json();
    return tagged ? { data, etag: response.headers.get("ETag") } : data;
  }
  const error = await problem(response);
  if (error.status === 401) onUnauthorized(error);
  throw error;
}

async function problem(response) {
  let title = response.statusText || "Error";
  let detail = "";
  let errors = [];
  try {
    const body = await response.json();
    if (typeof body.title === "string") title = body.title;
    if (typeof body.detail === "string") detail = body.detail;
    if (Array.isArray(body.errors)) errors = body.errors;
  } catch {
    // Not JSON (a proxy's error page): the status says enough.
  }
  return new ApiError(response.status, title, detail, errors);
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
