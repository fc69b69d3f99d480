// One method or twin job: its state, progress, what it does, Cancel (POST
// /v1/jobs/{id}/cancel: its pending devices are left out), and each device's outcome
// (GET /v1/jobs/{id}/devices: the first DEVICE_LIMIT by id, or those in one state): the
// device's answer to a method, the version a twin patch made, or the error. Refreshed
// every few seconds until no device is left pending or running. A rollout goes to its
// rollout page.

import { ApiError, describe, getJson, postJson } from "./api.js";
import { deviceHref, el, formatJson, setAbsoluteTime, setText, showError, template, templateElement } from "./dom.js";
import { fillJobProgress, jobWhat } from "./jobs.js";
import { ACTIVE_REFRESH_MS, isFinished, progressElement, setStateBadge, stateText } from "./rollouts.js";

const DEVICE_LIMIT = 1000;
const DEVICE_STATES = ["pending", "running", "succeeded", "failed", "cancelled"];
const CANCELLABLE = ["queued", "running", "paused"];

function brief(value, max = 160) {
  const text = JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

export function mount(root, jobId, params) {
  root.append(template("job"));
  const $ = (selector) => root.querySelector(selector);
  const error = $("#job-error");
  const path = `/v1/jobs/${jobId}`;
  const stateFilter = DEVICE_STATES.includes(params.get("state")) ? params.get("state") : "";

  setText($("#job-title"), `Job #${jobId}`);
  $("section").dataset.jobId = String(jobId);
  $(".crumbs").append(" ", el("span", { "aria-current": "page" }, `#${jobId}`));
  const progress = progressElement();
  progress.dataset.testid = "job-progress";
  $("#job-progress").append(progress);

  let job = null;
  let controller = null;
  let timer = null;
  let closed = false;
  let busy = false;
  let actionError = "";

  const select = $("#job-device-state");
  for (const state of DEVICE_STATES) select.append(el("option", { value: state }, stateText(state)));
  select.value = stateFilter;
  select.addEventListener("change", () => {
    location.hash = `#/jobs/${jobId}${select.value ? `?${new URLSearchParams({ state: select.value })}` : ""}`;
  });
  $("#job-filters").addEventListener("submit", (event) => event.preventDefault());

  function renderOptions() {
    const rows = [
      ["type", "Type", [job.type]],
      ["what", "Does", [jobWhat(job)]],
      ["query", "Devices", [el("code", {}, job.query || "(every device)"), ` (${job.progress.total})`]],
      [
        "batch",
        "At once",
        [`${job.batch_size} at most` + (job.max_per_second ? `, ${job.max_per_second} started per second` : "")],
      ],
      ["created", "Created", [timeNode(job.created_at), job.created_by ? ` by ${job.created_by}` : ""]],
      ["started", "Started", [timeNode(job.started_at)]],
      ["finished", "Finished", job.finished_at ? [timeNode(job.finished_at)] : ["not yet"]],
    ];
    if (job.cancelled_at) {
      rows.push(["cancelled", "Cancelled", [timeNode(job.cancelled_at), job.cancelled_by ? ` by ${job.cancelled_by}` : ""]]);
    }
    $("#job-options").replaceChildren(
      ...rows.map(([name, label, value]) => el("div", { "data-option": name }, el("dt", {}, label), el("dd", {}, ...value))),
    );
  }

  function timeNode(iso) {
    const node = el("time");
    if (iso) setAbsoluteTime(node, iso, { date: true });
    else setText(node, "—");
    return node;
  }

  function renderJob() {
    setText($("#job-title"), `Job #${jobId}: ${job.type} ${job.type === "method" ? job.method.name : "patch"}`);
    setStateBadge($("#job-state"), job.state);
    fillJobProgress(progress, job);
    renderOptions();
    const jobError = $("#job-job-error");
    setText(jobError, job.error ? `Error: ${job.error}` : "");
    jobError.hidden = !job.error;
    $("#job-cancel").disabled = busy || !CANCELLABLE.includes(job.state);
    for (const option of select.options) {
      const n = option.value ? job.progress[option.value] : job.progress.total;
      setText(option, `${option.value ? stateText(option.value) : "any"} (${n})`);
    }
    $("#job-body").hidden = false;
    $("#job-devices-section").hidden = false;
  }

  function deviceRow(d) {
    const tr = templateElement("job-device-row");
    tr.dataset.deviceId = d.device_id;
    tr.dataset.state = d.state;
    const link = tr.querySelector(".device-link");
    link.setAttribute("href", deviceHref(d.device_id));
    setText(link, d.device_id);
    setStateBadge(tr.querySelector(".state"), d.state);
    const outcome = [d.reason, d.status !== null ? `status ${d.status}` : ""].filter(Boolean).join(", ");
    setText(tr.querySelector(".outcome"), outcome || "—");
    const result = tr.querySelector(".result");
    if (d.result !== null && d.result !== undefined) {
      // A method: the device's payload; a twin patch: the version it made.
      const shown = d.result && typeof d.result === "object" && "payload" in d.result ? d.result.payload : d.result;
      setText(result, brief(shown));
      result.setAttribute("title", formatJson(d.result));
    } else {
      result.hidden = true;
    }
    setText(tr.querySelector(".device-error"), d.error || "");
    setText(tr.querySelector(".attempts"), d.attempts);
    const finished = tr.querySelector(".finished");
    if (d.finished_at) setAbsoluteTime(finished, d.finished_at, { date: true });
    else setText(finished, "—");
    return tr;
  }

  function schedule() {
    clearTimeout(timer);
    if (closed || (job && isFinished(job))) return;
    timer = setTimeout(() => {
      if (document.hidden) schedule();
      else load();
    }, ACTIVE_REFRESH_MS);
  }

  async function load() {
    if (controller) controller.abort();
    clearTimeout(timer);
    controller = new AbortController();
    const { signal } = controller;
    try {
      const [loaded, page] = await Promise.all([
        getJson(path, {}, { signal }),
        getJson(`${path}/devices`, { limit: DEVICE_LIMIT, state: stateFilter || null }, { signal }),
      ]);
      if (closed) return;
      if (loaded.type === "rollout") {
        location.replace(`#/rollouts/${jobId}`);
        return;
      }
      job = loaded;
      renderJob();
      $("#job-devices tbody").replaceChildren(...page.items.map(deviceRow));
      const empty = $("#job-devices-empty");
      setText(empty, stateFilter ? `No device is ${stateText(stateFilter)}.` : "This job has no devices.");
      empty.hidden = page.items.length > 0;
      const more = $("#job-devices-more");
      setText(more, page.next_cursor ? `Showing the first ${DEVICE_LIMIT} devices by id.` : "");
      more.hidden = !page.next_cursor;
      setText($("#job-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      $("section").dataset.loaded = "true";
      showError(error, actionError);
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(error, describe(err));
      if (err instanceof ApiError && err.status === 404) return;
    }
    schedule();
  }

  $("#job-cancel").addEventListener("click", async () => {
    if (!window.confirm(`Cancel job #${jobId}? Its pending devices will be left out; those running finish.`)) return;
    busy = true;
    $("#job-cancel").disabled = true;
    try {
      job = await postJson(`${path}/cancel`);
      actionError = "";
      renderJob();
    } catch (err) {
      actionError = describe(err);
    } finally {
      busy = false;
      showError(error, actionError);
    }
    if (!closed) load();
  });
  $("#job-refresh").addEventListener("click", () => load());
  load();

  return () => {
    closed = true;
    clearTimeout(timer);
    if (controller) controller.abort();
  };
}
