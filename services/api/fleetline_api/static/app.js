// The dashboard: hash routes, the header (navigation, live status, log out), and the
// key check before any view that reads data.
//
//   #/login                 the API key
//   #/fleet?tag=k=v&status= devices with status, last seen and latest values
//   #/device/<id>?range=1h  one chart per metric, live; a child's gateway, a gateway's
//                           policy, children and refusals
//   #/dead-letters?device_id=
//   #/rollouts              firmware rollouts with their progress
//   #/rollouts/<id>?state=  one rollout: options, actions, its devices
//   #/alarms?state=&severity=&device_id=
//   #/rules                 rules; #/rules/new, #/rules/<id>: edit, backtest
//   #/jobs                  jobs with their progress; #/jobs/<id>: its devices, cancel

import { clearKey, getKey, setUnauthorizedHandler } from "./api.js";
import { refreshRelativeTimes } from "./dom.js";
import * as alarms from "./alarms.js";
import * as deadLetters from "./deadletters.js";
import * as device from "./device.js";
import * as fleet from "./fleet.js";
import * as job from "./job.js";
import * as jobs from "./jobs.js";
import * as login from "./login.js";
import * as notFound from "./notfound.js";
import * as rollout from "./rollout.js";
import * as rollouts from "./rollouts.js";
import * as rule from "./rule.js";
import * as rules from "./rules.js";
import * as stream from "./stream.js";

const main = document.getElementById("main");
let cleanup = null;
// Shown on the login page after a key stopped working (401).
let loginNotice = "";

function parseRoute() {
  const hash = location.hash.replace(/^#/, "") || "/fleet";
  const [path, query = ""] = hash.split("?", 2);
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "login") return { name: "login", params };
  if (parts[0] === "fleet" || parts.length === 0) return { name: "fleet", params };
  if (parts[0] === "dead-letters") return { name: "dead-letters", params };
  if (parts[0] === "rollouts" && parts.length === 1) return { name: "rollouts", params };
  if (parts[0] === "rollouts" && parts.length === 2 && /^[1-9][0-9]*$/.test(parts[1])) {
    // A rollout is under Rollouts in the navigation.
    return { name: "rollout", nav: "rollouts", id: parts[1], params };
  }
  if (parts[0] === "alarms" && parts.length === 1) return { name: "alarms", params };
  if (parts[0] === "rules" && parts.length === 1) return { name: "rules", params };
  if (parts[0] === "rules" && parts.length === 2 && (parts[1] === "new" || /^[1-9][0-9]*$/.test(parts[1]))) {
    return { name: "rule", nav: "rules", id: parts[1] === "new" ? null : parts[1], params };
  }
  if (parts[0] === "jobs" && parts.length === 1) return { name: "jobs", params };
  if (parts[0] === "jobs" && parts.length === 2 && /^[1-9][0-9]*$/.test(parts[1])) {
    return { name: "job", nav: "jobs", id: parts[1], params };
  }
  if (parts[0] === "device" && parts.length === 2) {
    try {
      return { name: "device", id: decodeURIComponent(parts[1]), params };
    } catch {
      return { name: "not-found", params };
    }
  }
  return { name: "not-found", params };
}

function render() {
  if (cleanup) cleanup();
  cleanup = null;
  stream.stop();
  const route = parseRoute();
  const loggedIn = Boolean(getKey());
  document.getElementById("mainnav").hidden = !loggedIn;
  document.getElementById("logout").hidden = !loggedIn;
  document.getElementById("live-status").hidden = !loggedIn;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === (route.nav || route.name)) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (route.name !== "login" && !loggedIn) {
    sessionStorage.setItem("fleetline.next", location.hash);
    location.replace("#/login");
    return;
  }
  main.replaceChildren();
  if (route.name === "login") {
    if (loggedIn) {
      location.replace("#/fleet");
      return;
    }
    cleanup = login.mount(main, { notice: loginNotice, onLogin: afterLogin });
    loginNotice = "";
  } else if (route.name === "fleet") {
    cleanup = fleet.mount(main, route.params);
    document.title = "Fleet · fleetline";
  } else if (route.name === "device") {
    cleanup = device.mount(main, route.id, route.params);
    document.title = `${route.id} · fleetline`;
  } else if (route.name === "dead-letters") {
    cleanup = deadLetters.mount(main, route.params);
    document.title = "Dead letters · fleetline";
  } else if (route.name === "rollouts") {
    cleanup = rollouts.mount(main);
    document.title = "Rollouts · fleetline";
  } else if (route.name === "rollout") {
    cleanup = rollout.mount(main, route.id, route.params);
    document.title = `Rollout #${route.id} · fleetline`;
  } else if (route.name === "alarms") {
    cleanup = alarms.mount(main, route.params);
    document.title = "Alarms · fleetline";
  } else if (route.name === "rules") {
    cleanup = rules.mount(main);
    document.title = "Rules · fleetline";
  } else if (route.name === "rule") {
    cleanup = rule.mount(main, route.id);
    document.title = `${route.id ? `Rule ${route.id}` : "New rule"} · fleetline`;
  } else if (route.name === "jobs") {
    cleanup = jobs.mount(main, route.params);
    document.title = "Jobs · fleetline";
  } else if (route.name === "job") {
    cleanup = job.mount(main, route.id, route.params);
    document.title = `Job #${route.id} · fleetline`;
  } else {
    cleanup = notFound.mount(main);
    document.title = "Not found · fleetline";
  }
  // Move focus to the new view (its heading; the key field on the login page).
  const target = main.querySelector("[autofocus]") || main.querySelector("h1");
  if (target) target.focus();
}

function afterLogin() {
  const next = sessionStorage.getItem("fleetline.next");
  sessionStorage.removeItem("fleetline.next");
  location.hash = next && !next.startsWith("#/login") ? next : "#/fleet";
}

function logout(notice = "") {
  clearKey();
  loginNotice = notice;
  stream.stop();
  if (location.hash === "#/login") render();
  else location.hash = "#/login";
}

function expired(err) {
  if (!getKey()) return;
  logout(`Signed out: ${err.message}`);
}

setUnauthorizedHandler(expired);
stream.setStreamUnauthorizedHandler(expired);
document.getElementById("logout").addEventListener("click", () => logout("Signed out."));
window.addEventListener("hashchange", render);
setInterval(() => refreshRelativeTimes(main), 5000);
render();
