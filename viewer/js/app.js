// The page: sign-in, routing (#/ dashboard, #/site/S, #/line/S/L, #/table/S/L), the live connection
// and its visible state, anomaly toasts. Views live in their own modules.

import { api, auth, AuthError, detectMode, Live } from "./api.js";
import { renderDashboard, renderSite } from "./dashboard.js";
import { LineView } from "./lineview.js";
import { AlarmsPage } from "./alarms.js";
import { OeePage } from "./oee.js";
import { toast } from "./toast.js";

const main = document.getElementById("main");
const conn = document.getElementById("conn");
const crumbs = document.getElementById("crumbs");
const app = { mode: null, live: null, sites: [], view: null, listeners: new Set() };
window.egiz = app;  // for operators' consoles and the browser tests: the current mode, view and live link

function setConn(state) {
  conn.dataset.state = state;
  conn.textContent = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" }[state] || state;
}

function showSignIn(message) {
  if (app.live) app.live.close();
  app.live = null;
  main.replaceChildren(document.getElementById("signin-template").content.cloneNode(true));
  document.getElementById("signin-error").textContent = message || "";
  document.getElementById("signin").addEventListener("submit", (e) => {
    e.preventDefault();
    auth.key = document.getElementById("apikey").value.trim();
    start();
  });
  document.getElementById("apikey").focus();
}

function onEvent(e) {
  if (e.kind === "sites") app.sites = e.sites;
  if (e.kind === "anomaly" && e.anomaly.state === "open" && !app.seen?.has(e.anomaly.id)) {
    app.seen.add(e.anomaly.id);
    toast(`${e.anomaly.thingId}: ${e.anomaly.explanation || e.anomaly.anomalyType}`, e.anomaly.severity,
          () => { location.hash = lineHash(e.anomaly) + `?thing=${encodeURIComponent(e.anomaly.thingId)}`; });
  }
  for (const fn of app.listeners) fn(e);
}

function lineHash(a) {
  if (app.mode.kind === "gateway") return `#/line/${app.mode.site}/${app.mode.line}`;
  return a.site && a.line ? `#/line/${encodeURIComponent(a.site)}/${encodeURIComponent(a.line)}` : "#/";
}

app.subscribe = (fn) => { app.listeners.add(fn); return () => app.listeners.delete(fn); };

function setCrumbs(parts) {
  crumbs.replaceChildren(...parts.flatMap(([label, href], i) => {
    const el = href ? Object.assign(document.createElement("a"), { href, textContent: label })
      : Object.assign(document.createElement("span"), { textContent: label });
    return i ? [document.createTextNode(" / "), el] : [el];
  }));
}

async function route() {
  if (!app.mode) return;
  if (app.view && app.view.dispose) app.view.dispose();
  app.view = null;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (app.mode.kind === "gateway" && !["line", "table", "oee", "alarms"].includes(parts[0])) {
      location.hash = `#/line/${encodeURIComponent(app.mode.site)}/${encodeURIComponent(app.mode.line)}`;
      return;
    }
    if (parts[0] === "alarms") {
      setCrumbs(app.mode.kind === "aggregator" ? [["All sites", "#/"], ["Alarms"]] : [[app.mode.site], [app.mode.line,
        `#/line/${encodeURIComponent(app.mode.site)}/${encodeURIComponent(app.mode.line)}`], ["Alarms"]]);
      app.view = new AlarmsPage(main, app);
      await app.view.load();
    } else if (parts[0] === "oee") {
      const [, site, line] = parts;
      const lineHref = `#/line/${encodeURIComponent(site)}/${encodeURIComponent(line)}`;
      setCrumbs(app.mode.kind === "aggregator" ? [["All sites", "#/"], [site, `#/site/${encodeURIComponent(site)}`],
        [line, lineHref], ["OEE"]] : [[site], [line, lineHref], ["OEE"]]);
      app.view = new OeePage(main, app, { site, line });
      await app.view.load();
    } else if (parts[0] === "line" || parts[0] === "table") {
      const [, site, line] = parts;
      const oee = [`OEE`, `#/oee/${encodeURIComponent(site)}/${encodeURIComponent(line)}`];
      setCrumbs(app.mode.kind === "aggregator" ? [["All sites", "#/"], [site, `#/site/${encodeURIComponent(site)}`],
        [line], oee, ["Alarms", "#/alarms"]] : [[site], [line], oee, ["Alarms", "#/alarms"]]);
      app.view = new LineView(main, app, { site, line, table: parts[0] === "table", thing: params.get("thing") });
      await app.view.load();
    } else if (parts[0] === "site") {
      setCrumbs([["All sites", "#/"], [parts[1]]]);
      app.view = renderSite(main, app, parts[1]);
    } else {
      setCrumbs([["All sites"], ["Alarms", "#/alarms"]]);
      app.view = renderDashboard(main, app);
    }
  } catch (e) {
    if (e instanceof AuthError) return showSignIn("That key was not accepted.");
    main.replaceChildren(Object.assign(document.createElement("p"), { className: "error", textContent: e.message }));
  }
}

async function start() {
  try {
    app.mode = await detectMode();
    if (app.mode.kind === "aggregator") app.sites = (await api.get("/api/v1/sites")).items;
  } catch (e) {
    if (e instanceof AuthError) return showSignIn(auth.key ? "That key was not accepted." : "");
    main.textContent = `Cannot reach the server: ${e.message}`;
    return;
  }
  document.getElementById("signout").hidden = !auth.key;
  app.seen = new Set();
  app.live = new Live(app.mode, { onEvent, onState: setConn });
  await route();
}

document.getElementById("signout").addEventListener("click", () => { auth.key = ""; location.reload(); });
window.addEventListener("hashchange", route);
start();
