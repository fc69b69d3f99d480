// Sign in: the key is checked with one request before it is kept (401 refuses it; a
// key without devices:read is kept, and the views say what it lacks).

import { ApiError, describe, getJson, setKey } from "./api.js";
import { showError, template } from "./dom.js";

export function mount(root, { notice, onLogin }) {
  root.append(template("login"));
  const form = root.querySelector("#login-form");
  const input = root.querySelector("#api-key");
  const error = root.querySelector("#login-error");
  const submit = form.querySelector("button[type=submit]");
  showError(error, notice);
  let busy = false;

  async function signIn(event) {
    event.preventDefault();
    if (busy) return;
    const key = input.value.trim();
    if (!key) {
      showError(error, "Enter an API key.");
      input.focus();
      return;
    }
    busy = true;
    submit.disabled = true;
    showError(error, "");
    try {
      await getJson("/v1/devices", { limit: 1 }, { key });
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 403)) {
        showError(error, describe(err));
        input.select();
        return;
      }
    } finally {
      busy = false;
      submit.disabled = false;
    }
    setKey(key);
    input.value = "";
    onLogin();
  }

  form.addEventListener("submit", signIn);
  return () => form.removeEventListener("submit", signIn);
}
