// One rollout: its state, progress, the devices updating now per phase, its options, the
// actions its state allows (POST /v1/jobs/{id}/pause, /resume, /cancel), and its devices
// (GET /v1/jobs/{id}/devices: the first DEVICE_LIMIT by id, or those in one state),
// ordered by wave then id or by the column picked. Refreshed every few seconds until no
// device is left pending or running.

import { ApiError, describe, getJson, postJson } from "./api.js";
import {
  el,
  setAbsoluteTime,
  setRelativeTime,
  setText,
  showError,
  template,
  templateElement,
} from "./dom.js";
import {
  ACTIVE_REFRESH_MS,
  fillProgress,
  isFinished,
  progressElement,
  setStateBadge,
  stateText,
} from "./rollouts.js";
import { by, compareNumbers, sortableTable } from "./sort.js";

// One page of the API's: enough to see a canary and its first waves whole.
const DEVICE_LIMIT = 1000;
const DEVICE_STATES = ["pending", "running", "succeeded", "failed", "rolled_back", "cancelled"];
const PHASES = ["notified", "downloading", "verifying", "applying", "rebooting"];
// Phases in sorting order: not notified yet, the phases, then how the update ended.
const PHASE_ORDER = [null, ...PHASES, "succeeded", "failed", "rolled_back", "cancelled"];
// The states each action is allowed from, as the API checks them (409 otherwise).
const ACTIONS = {
  pause: ["queued", "running"],
  resume: ["paused"],
  cancel: ["queued", "running", "paused"],
};

function rank(list, value) {
  const i = list.indexOf(value);
  return i < 0 ? list.length : i;
}

function compareIds(a, b) {
  if (a.device_id === b.device_id) return 0;
  return a.device_id < b.device_id ? -1 : 1;
}

// Sort keys of the devices table; ties fall back to wave, then id.
const COMPARE = {
  device_id: compareIds,
  state: (a, b) => rank(DEVICE_STATES, a.state) - rank(DEVICE_STATES, b.state),
  wave: (a, b) => a.wave - b.wave,
  phase: (a, b) => rank(PHASE_ORDER, a.phase) - rank(PHASE_ORDER, b.phase),
  progress: by((d) => d.progress, compareNumbers),
};

/** Seconds as "90 s", "10 min", "1 h", "1 h 30 min", "2 d". */
function formatDuration(seconds) {
  if (seconds < 60 || seconds % 60) return `${seconds} s`;
  const minutes = seconds / 60;
  if (minutes < 60) return `${minutes} min`;
  if (minutes % 60) return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  const hours = minutes / 60;
  return hours % 24 ? `${hours} h` : `${hours / 24} d`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function timeAndWho(iso, who) {
  if (!iso) return ["—"];
  const node = el("time");
  setAbsoluteTime(node, iso);
  return who ? [node, ` by ${who}`] : [node];
}

export function mount(root, jobId, params) {
  root.append(template("rollout"));
  const $ = (selector) => root.querySelector(selector);
  const error = $("#rollout-error");
  const path = `/v1/jobs/${jobId}`;
  const stateFilter = DEVICE_STATES.includes(params.get("state")) ? params.get("state") : "";

  setText($("#rollout-title"), `Rollout #${jobId}`);
  $("section").dataset.jobId = String(jobId);
  $(".crumbs").append(" ", el("span", { "aria-current": "page" }, `#${jobId}`));
  const progress = progressElement();
  $("#rollout-progress").append(progress);

  let job = null;
  let devices = [];
  let more = false;
  let controller = null;
  let generation = 0;
  let timer = null;
  let busy = false;
  let closed = false;
  // Why the last action was refused: kept through refreshes until the next action.
  let actionError = "";

  // The state filter: kept in the address, with each state's count beside it.
  const select = $("#rollout-device-state");
  for (const state of DEVICE_STATES) select.append(el("option", { value: state }, stateText(state)));
  select.value = stateFilter;
  select.addEventListener("change", () => {
    const query = select.value ? `?${new URLSearchParams({ state: select.value })}` : "";
    location.hash = `#/rollouts/${jobId}${query}`;
  });
  $("#rollout-filters").addEventListener("submit", (event) => event.preventDefault());

  function renderButtons() {
    for (const [action, states] of Object.entries(ACTIONS)) {
      $(`#rollout-${action}`).disabled = busy || !job || !states.includes(job.state);
    }
  }

  function renderNotice() {
    const notice = $("#rollout-paused");
    if (job.state === "paused") {
      const who = job.paused_by === "failure threshold" ? "its failure threshold" : job.paused_by;
      notice.replaceChildren(
        "Paused: no more devices are notified until it is resumed; those updating go on. Paused at ",
        ...timeAndWho(job.paused_at, who),
        ".",
      );
    } else if (job.state === "cancelled") {
      notice.replaceChildren(
        "Cancelled: its pending devices were left out; those updating go on. Cancelled at ",
        ...timeAndWho(job.cancelled_at, job.cancelled_by),
        ".",
      );
    }
    notice.hidden = job.state !== "paused" && job.state !== "cancelled";
    const jobError = $("#rollout-job-error");
    setText(jobError, job.error ? `Error: ${job.error}` : "");
    jobError.hidden = !job.error;
  }

  function renderPhases() {
    const phases = job.rollout.phases;
    $("#rollout-phases").replaceChildren(
      ...PHASES.map((phase) =>
        el(
          "div",
          { "data-phase": phase, class: phases[phase] ? "busy" : null },
          el("dt", {}, phase),
          el("dd", {}, phases[phase] ?? 0),
        ),
      ),
    );
  }

  function renderOptions() {
    const r = job.rollout;
    const rows = [
      ["firmware", "Firmware", [`${r.version} (${r.kind}, firmware ${r.firmware_id})`]],
      ["query", "Devices", [el("code", {}, job.query), ` (${plural(job.progress.total, "device")})`]],
      ["canary", "Canary", [`${plural(r.canary, "device")} first`]],
      ["wave_size", "Waves after it", [r.wave_size ? `${plural(r.wave_size, "device")} each` : "all the rest at once"]],
      [
        "failure_threshold",
        "Failure threshold",
        [`more than ${r.failure_threshold_percent} % failed or rolled back, then ${r.on_failure}`],
      ],
      ["window", "Window", [r.window ? `${r.window.start}–${r.window.end} UTC` : "any time"]],
      [
        "batch_size",
        "At once",
        [
          `${plural(job.batch_size, "device")} updating at most` +
            (job.max_per_second ? `, ${job.max_per_second} notified per second` : ""),
        ],
      ],
      ["timeouts", "Phase timeouts", [PHASES.map((p) => `${p} ${formatDuration(r.timeouts[p])}`).join(", ")]],
      ["created", "Created", timeAndWho(job.created_at, job.created_by)],
      ["started", "Started", timeAndWho(job.started_at)],
      ["finished", "Finished", job.finished_at ? timeAndWho(job.finished_at) : ["not yet"]],
    ];
    $("#rollout-options").replaceChildren(
      ...rows.map(([name, label, value]) =>
        el("div", { "data-option": name }, el("dt", {}, label), el("dd", {}, ...value)),
      ),
    );
  }

  function renderJob() {
    setText($("#rollout-title"), `Rollout #${jobId}: firmware ${job.rollout.version}`);
    setStateBadge($("#rollout-state"), job.state);
    fillProgress(progress, job.progress);
    renderNotice();
    renderPhases();
    renderOptions();
    renderButtons();
    for (const option of select.options) {
      const n = option.value ? job.progress[option.value] : job.progress.total;
      setText(option, `${option.value ? stateText(option.value) : "any"} (${n})`);
    }
    $("#rollout-body").hidden = false;
    $("#rollout-devices-section").hidden = false;
  }

  function deviceRow(d) {
    const tr = templateElement("rollout-device-row");
    tr.dataset.deviceId = d.device_id;
    tr.dataset.state = d.state;
    const link = tr.querySelector(".device-link");
    link.setAttribute("href", `#/device/${encodeURIComponent(d.device_id)}`);
    setText(link, d.device_id);
    setStateBadge(tr.querySelector(".state"), d.state);
    setText(tr.querySelector(".wave"), d.wave);
    setText(tr.querySelector(".phase"), d.phase ? stateText(d.phase) : "—");
    const since = tr.querySelector(".phase-at");
    if (d.phase_at) setRelativeTime(since, d.phase_at);
    since.hidden = !d.phase_at;
    const bar = tr.querySelector("progress");
    if (d.progress !== null) {
      bar.value = d.progress;
      bar.hidden = false;
    }
    setText(tr.querySelector(".percent"), d.progress !== null ? `${d.progress} %` : "—");
    setText(tr.querySelector(".reason"), d.reason);
    setText(tr.querySelector(".device-error"), d.error);
    if (d.refused_reports) {
      const why = d.refused_report ? `, the last: ${d.refused_report}` : "";
      setText(tr.querySelector(".refused"), `${plural(d.refused_reports, "report")} refused${why}`);
    }
    return tr;
  }

  const sorter = sortableTable($("#rollout-devices"), {
    compare: COMPARE,
    initial: { key: "wave", dir: 1 },
    tie: (a, b) => a.wave - b.wave || compareIds(a, b),
    onSort: () => renderDevices(),
  });

  function renderDevices() {
    $("#rollout-devices tbody").replaceChildren(...sorter.order(devices).map(deviceRow));
    const empty = $("#rollout-devices-empty");
    setText(empty, stateFilter ? `No device is ${stateText(stateFilter)}.` : "This rollout has no devices.");
    empty.hidden = devices.length > 0;
    const note = $("#rollout-devices-more");
    setText(
      note,
      more
        ? `Showing the first ${DEVICE_LIMIT} devices by id${stateFilter ? "" : "; pick a state to see others"}.`
        : "",
    );
    note.hidden = !more;
  }

  function schedule() {
    clearTimeout(timer);
    if (closed || (job && isFinished(job))) return;
    timer = setTimeout(() => {
      if (document.hidden) schedule();
      else load();
    }, ACTIVE_REFRESH_MS);
  }

  /** Stop a load under way: what it read may be older than what an action returns. */
  function abortLoad() {
    generation++;
    if (controller) controller.abort();
    controller = null;
  }

  async function load() {
    abortLoad();
    clearTimeout(timer);
    const gen = generation;
    controller = new AbortController();
    const { signal } = controller;
    try {
      const [loaded, page] = await Promise.all([
        getJson(path, {}, { signal }),
        getJson(`${path}/devices`, { limit: DEVICE_LIMIT, state: stateFilter || null }, { signal }),
      ]);
      if (gen !== generation) return;
      if (loaded.type !== "rollout") {
        showError(error, `Job ${jobId} is a ${loaded.type} job, not a rollout.`);
        return;
      }
      job = loaded;
      devices = page.items;
      more = page.next_cursor !== null;
      renderJob();
      renderDevices();
      setText($("#rollout-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      showError(error, actionError);
    } catch (err) {
      if (err.name === "AbortError" || gen !== generation) return;
      showError(error, describe(err));
      if (err instanceof ApiError && err.status === 404) return;
    }
    schedule();
  }

  async function act(action, button) {
    if (
      action === "cancel" &&
      !window.confirm(`Cancel rollout #${jobId}? Its pending devices will not be updated; those updating go on.`)
    ) {
      return;
    }
    abortLoad();
    busy = true;
    renderButtons();
    try {
      job = await postJson(`${path}/${action}`);
      actionError = "";
      renderJob();
    } catch (err) {
      actionError = describe(err);
    } finally {
      showError(error, actionError);
      busy = false;
      renderButtons();
    }
    // The pressed button is disabled now if the action took: keep the focus on the actions.
    if (button.disabled) {
      const next = Object.keys(ACTIONS)
        .map((name) => $(`#rollout-${name}`))
        .find((b) => !b.disabled);
      (next || $("#rollout-title")).focus();
    }
    if (!closed) load();
  }

  for (const action of Object.keys(ACTIONS)) {
    const button = $(`#rollout-${action}`);
    button.addEventListener("click", () => act(action, button));
  }
  $("#rollout-refresh").addEventListener("click", () => load());
  load();

  return () => {
    closed = true;
    abortLoad();
    clearTimeout(timer);
  };
}
