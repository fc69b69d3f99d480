// Jobs: GET /v1/jobs (newest first, cursor paging, filtered by state), each with what it
// does over which devices and its progress. A method or twin job opens on its own page
// (job.js), a firmware rollout on its rollout page. Refreshed every few seconds while a
// job shown is under way, every 15 s otherwise. The column headers sort the page shown.

import { describe, getJson } from "./api.js";
import { el, setAbsoluteTime, setText, showError, template, templateElement } from "./dom.js";
import { cursorPager } from "./pager.js";
import { ACTIVE_REFRESH_MS, fillProgress, isFinished, progressElement, setStateBadge } from "./rollouts.js";
import { by, compareNewest, compareNumbers, compareRank, sortableTable } from "./sort.js";

const PAGE_SIZE = 50;
const REFRESH_MS = 15_000;
const STATES = ["queued", "running", "paused", "completed", "cancelled", "failed"];

// Sort keys of the table: ties keep the API's order (newest first).
const COMPARE = {
  id: by((job) => job.id, compareNumbers),
  type: by((job) => job.type),
  what: by((job) => jobWhat(job)),
  state: by((job) => job.state, compareRank(STATES)),
  progress: by((job) => job.progress.percent, compareNumbers),
  created: by((job) => job.created_at, compareNewest),
};

/** A JSON value on one line, shortened. */
function brief(value, max = 80) {
  const text = JSON.stringify(value);
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/** What a job does, as text. */
export function jobWhat(job) {
  if (job.type === "method") return `${job.method.name}(${brief(job.method.params)}), timeout ${job.method.timeout_s} s`;
  if (job.type === "twin") return `desired ← ${brief(job.patch)}`;
  if (job.type === "rollout") return `firmware ${job.rollout.version} (${job.rollout.kind})`;
  return job.type;
}

/**
 * A job's progress (fillProgress, which speaks of rollouts): a method or twin job's
 * devices are "running", and none is ever rolled back.
 */
export function fillJobProgress(node, job) {
  fillProgress(node, job.progress);
  if (job.type === "rollout") return;
  const rolledBack = node.querySelector('.legend [data-state="rolled_back"]');
  if (rolledBack) rolledBack.hidden = job.progress.rolled_back === 0;
  const running = node.querySelector('.legend [data-state="running"]');
  if (running && running.lastChild) running.lastChild.textContent = " running";
  const bar = node.querySelector(".bar");
  bar.setAttribute("aria-valuetext", bar.getAttribute("aria-valuetext").replace(/ updating\b/, " running"));
}

/** The dashboard's page of a job: rollouts have their own. */
export function jobHref(job) {
  return job.type === "rollout" ? `#/rollouts/${job.id}` : `#/jobs/${job.id}`;
}

export function mount(root, params) {
  root.append(template("jobs"));
  const $ = (selector) => root.querySelector(selector);
  const tbody = $("#jobs-table tbody");
  const error = $("#jobs-error");
  const state = STATES.includes(params.get("state")) ? params.get("state") : "";
  $("#jobs-state").value = state;
  $("#jobs-state").addEventListener("change", (event) => {
    location.hash = event.target.value ? `#/jobs?${new URLSearchParams({ state: event.target.value })}` : "#/jobs";
  });
  $("#jobs-filters").addEventListener("submit", (event) => event.preventDefault());

  const pager = cursorPager({
    prev: $("#jobs-prev"),
    next: $("#jobs-next"),
    label: $("#jobs-page"),
    onPage: () => load(),
  });
  let jobs = [];
  const sorter = sortableTable($("#jobs-table"), {
    compare: COMPARE,
    onSort: () => tbody.replaceChildren(...sorter.order(jobs).map(row)),
  });
  let controller = null;
  let timer = null;
  let closed = false;

  function row(job) {
    const tr = templateElement("job-row");
    tr.dataset.jobId = String(job.id);
    tr.dataset.type = job.type;
    tr.dataset.state = job.state;
    const link = tr.querySelector(".job-link");
    link.setAttribute("href", jobHref(job));
    setText(link, `#${job.id}`);
    setText(tr.querySelector(".type"), job.type);
    tr.querySelector(".what").append(
      el("span", {}, jobWhat(job)),
      el("br"),
      el("code", { class: "muted query" }, job.query || "(every device)"),
    );
    setStateBadge(tr.querySelector(".state"), job.state);
    const progress = progressElement();
    fillJobProgress(progress, job);
    progress.dataset.testid = "job-progress";
    tr.querySelector(".progress-cell").append(progress);
    setAbsoluteTime(tr.querySelector(".created"), job.created_at, { date: true });
    return tr;
  }

  function schedule(delay) {
    clearTimeout(timer);
    if (closed) return;
    timer = setTimeout(() => {
      if (document.hidden) schedule(delay);
      else load();
    }, delay);
  }

  async function load() {
    if (controller) controller.abort();
    controller = new AbortController();
    let active = false;
    try {
      const page = await getJson(
        "/v1/jobs",
        { state: state || null, limit: PAGE_SIZE, cursor: pager.cursor() },
        { signal: controller.signal },
      );
      if (closed) return;
      jobs = page.items;
      tbody.replaceChildren(...sorter.order(jobs).map(row));
      active = jobs.some((job) => !isFinished(job));
      pager.loaded(page.next_cursor);
      $("#jobs-empty").hidden = jobs.length > 0;
      setText($("#jobs-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      $("#jobs-table").dataset.loaded = "true";
      showError(error, "");
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(error, describe(err));
    }
    schedule(active ? ACTIVE_REFRESH_MS : REFRESH_MS);
  }

  $("#jobs-refresh").addEventListener("click", () => load());
  load();

  return () => {
    closed = true;
    clearTimeout(timer);
    if (controller) controller.abort();
  };
}
