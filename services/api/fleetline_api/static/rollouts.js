// Firmware rollouts: the jobs of type `rollout` among GET /v1/jobs (newest first; the
// API has no type filter, so each page reads jobs until it holds PAGE_SIZE rollouts or
// has read SCAN_PAGES pages of them), each with its state and progress. Refreshed every
// few seconds while a rollout shown is under way, every 15 s otherwise.

import { describe, getJson } from "./api.js";
import { setAbsoluteTime, setText, showError, template, templateElement } from "./dom.js";
import { cursorPager } from "./pager.js";

const PAGE_SIZE = 50;
const SCAN_LIMIT = 200;
const SCAN_PAGES = 5;
export const ACTIVE_REFRESH_MS = 3_000;
const REFRESH_MS = 15_000;
// The bar's segments, in order; pending devices are the rest of the bar.
const SEGMENTS = ["succeeded", "failed", "rolled_back", "cancelled", "running"];
const LEGEND = [...SEGMENTS, "pending"];

/** A job or device state as words: "rolled_back" → "rolled back". */
export function stateText(state) {
  return String(state).replace(/_/g, " ");
}

/** A state badge (job or device): its colour comes from data-state in style.css. */
export function setStateBadge(node, state) {
  node.dataset.state = state;
  setText(node, stateText(state));
  node.hidden = false;
}

/**
 * Whether the rollout is over: no device left pending or running (`finished_at`). A
 * cancelled or failed rollout may still have devices updating, which finish on their own.
 */
export function isFinished(job) {
  return job.finished_at !== null;
}

/** A progress view (tpl-progress), filled by fillProgress. */
export function progressElement() {
  return templateElement("progress");
}

/** The bar (one segment per state, its width the state's share) and the counts. */
export function fillProgress(node, progress) {
  const total = progress.total;
  for (const state of LEGEND) node.dataset[state === "rolled_back" ? "rolledBack" : state] = String(progress[state]);
  node.dataset.total = String(total);
  node.dataset.percent = String(progress.percent);
  for (const seg of node.querySelectorAll(".seg")) {
    const n = progress[seg.dataset.state];
    // Widths through the CSSOM: the CSP forbids style attributes, not this.
    seg.style.width = total ? `${(100 * n) / total}%` : "0";
    seg.hidden = n === 0;
  }
  const finished = total - progress.pending - progress.running;
  const done = `${finished} of ${total} done (${progress.percent} %)`;
  const counts = LEGEND.filter((state) => state !== "cancelled" || progress[state] > 0).map(
    (state) => `${progress[state]} ${state === "running" ? "updating" : stateText(state)}`,
  );
  const bar = node.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(progress.percent));
  bar.setAttribute("aria-valuetext", `${done}: ${counts.join(", ")}`);
  setText(node.querySelector(".done"), done);
  for (const item of node.querySelectorAll(".legend [data-state]")) {
    const n = progress[item.dataset.state];
    setText(item.querySelector(".n"), n);
    // Cancelled devices only appear once a rollout is cancelled or aborted.
    item.hidden = item.dataset.state === "cancelled" && n === 0;
  }
}

export function mount(root) {
  root.append(template("rollouts"));
  const $ = (selector) => root.querySelector(selector);
  const tbody = $("#rollouts-table tbody");
  const error = $("#rollouts-error");

  // Paged by job cursor.
  const pager = cursorPager({
    prev: $("#rollouts-prev"),
    next: $("#rollouts-next"),
    label: $("#rollouts-page"),
    onPage: () => load(),
  });
  let controller = null;
  let timer = null;
  let closed = false;

  function row(job) {
    const tr = templateElement("rollout-row");
    tr.dataset.jobId = String(job.id);
    tr.dataset.state = job.state;
    const link = tr.querySelector(".rollout-link");
    link.setAttribute("href", `#/rollouts/${job.id}`);
    setText(link, `#${job.id}`);
    const version = tr.querySelector(".version");
    setText(version, job.rollout.version);
    version.setAttribute("title", `firmware ${job.rollout.firmware_id} (${job.rollout.kind})`);
    setStateBadge(tr.querySelector(".state"), job.state);
    const progress = progressElement();
    fillProgress(progress, job.progress);
    tr.querySelector(".progress-cell").append(progress);
    setAbsoluteTime(tr.querySelector(".created"), job.created_at);
    return tr;
  }

  /** Up to PAGE_SIZE rollouts from `cursor` on, and the cursor where the next page starts. */
  async function scan(cursor, signal) {
    const found = [];
    let next = cursor;
    for (let page = 0; page < SCAN_PAGES; page++) {
      const body = await getJson("/v1/jobs", { limit: SCAN_LIMIT, cursor: next }, { signal });
      for (const job of body.items) {
        if (job.type !== "rollout") continue;
        found.push(job);
        // Jobs come by id, descending: the next page starts below this one.
        if (found.length === PAGE_SIZE) return { found, next: String(job.id) };
      }
      next = body.next_cursor;
      if (!next) break;
    }
    return { found, next };
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
      const { found, next } = await scan(pager.cursor(), controller.signal);
      tbody.replaceChildren(...found.map(row));
      active = found.some((job) => !isFinished(job));
      pager.loaded(next);
      const empty = $("#rollouts-empty");
      empty.hidden = found.length > 0;
      setText(empty, next ? "No rollout among these jobs; older jobs may hold some." : "No rollout.");
      setText($("#rollouts-updated"), `Updated ${new Date().toLocaleTimeString()}`);
      showError(error, "");
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(error, describe(err));
    }
    schedule(active ? ACTIVE_REFRESH_MS : REFRESH_MS);
  }

  $("#rollouts-refresh").addEventListener("click", () => load());
  load();

  return () => {
    closed = true;
    clearTimeout(timer);
    if (controller) controller.abort();
  };
}
