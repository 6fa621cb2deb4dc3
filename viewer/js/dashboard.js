// Multi-site dashboard (US-SYS-005): a card per site, the ten most critical assets, and a site's
// lines. Cards refresh with every SiteSummaries event of the live connection.

import { api } from "./api.js";
import { el } from "./dom.js";
import { oeeTile } from "./oee.js";

const fmtLag = (s) => (s < 1 ? "< 1 s" : s < 120 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);

export function siteHealth(s) {
  const sev = s.anomalies.bySeverity || {};
  if (s.lines.length && s.lines.every((l) => !l.online)) return "offline";
  if (sev.critical || s.lines.some((l) => !l.online)) return "critical";
  if (s.anomalies.open || s.nodes.offline) return "warning";
  return "ok";
}


function facts(pairs) {
  return el("dl", {}, ...pairs.flatMap(([k, v, cls, name]) => [
    el("dt", { textContent: k }), el("dd", { textContent: v, className: cls || "", dataset: { field: name } })]));
}

function siteCard(s) {
  const total = s.nodes.online + s.nodes.offline;
  const sev = s.anomalies.bySeverity || {};
  const card = el("article", { className: "card", tabIndex: 0, dataset: { site: s.site, health: siteHealth(s) } },
    el("h2", { textContent: s.site }),
    facts([
      ["Health", siteHealth(s), "", "health"],
      ["Nodes online", `${s.nodes.online} / ${total}`, "", "nodes"],
      ["Open anomalies", String(s.anomalies.open), "", "open"],
      ["critical", String(sev.critical || 0), "sev-critical", "critical"],
      ["warning", String(sev.warning || 0), "sev-warning", "warning"],
      ["info", String(sev.info || 0), "sev-info", "info"],
      ["Lines", String(s.lines.length), "", "lines"],
      ["Uplink lag", fmtLag(s.uplinkLagS), "", "lag"],
    ]), oeeTile("site", s.site));
  const open = () => { location.hash = `#/site/${encodeURIComponent(s.site)}`; };
  card.addEventListener("click", open);
  card.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  return card;
}

async function criticalList(container) {
  const { items } = await api.get("/api/v1/critical");
  const rows = items.map((c) => el("tr", { dataset: { thing: c.thingId, state: c.offline && !c.score ? "offline" : "critical" } },
    el("td", {}, el("a", { href: `#/line/${encodeURIComponent(c.site)}/${encodeURIComponent(c.line)}?thing=${encodeURIComponent(c.thingId)}`,
                            textContent: c.thingId })),
    el("td", { textContent: c.type || "" }), el("td", { textContent: c.site }), el("td", { textContent: c.line }),
    el("td", { textContent: c.score ? c.score.toFixed(2) : "—" }),
    el("td", { textContent: c.offline ? "offline" : (c.topFeatures || []).join(", ") })));
  container.replaceChildren(el("table", { id: "critical" },
    el("thead", {}, el("tr", {}, ...["Asset", "Type", "Site", "Line", "Score", "Why"].map((h) => el("th", { textContent: h })))),
    el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: 6, textContent: "Nothing critical." }))]))));
}

export function renderDashboard(main, app) {
  const cards = el("section", { className: "cards", id: "site-cards", ariaLabel: "Sites" });
  const critical = el("section", { ariaLabel: "Top 10 critical assets" });
  main.replaceChildren(el("h1", { textContent: "Sites" }), cards, el("h2", { textContent: "Top 10 critical assets" }), critical);
  const draw = () => cards.replaceChildren(...app.sites.map(siteCard));
  draw();
  criticalList(critical).catch(() => {});
  let last = 0;
  const off = app.subscribe((e) => {
    if (e.kind !== "sites") return;
    draw();
    if (Date.now() - last > 3000) { last = Date.now(); criticalList(critical).catch(() => {}); }
  });
  return { dispose: off };
}

export function renderSite(main, app, site) {
  const box = el("section", { className: "cards", id: "line-cards" });
  main.replaceChildren(el("h1", { textContent: site }), box);
  const draw = () => {
    const s = app.sites.find((x) => x.site === site);
    box.replaceChildren(...(s ? s.lines : []).map((l) => {
      const card = el("article", { className: "card", tabIndex: 0, dataset: { line: l.line, health: l.online ? "ok" : "offline" } },
        el("h2", { textContent: l.line }),
        facts([["Gateway", l.gatewayId], ["Online", l.online ? "yes" : "no"], ["Uplink lag", fmtLag(l.lagS)],
               ["Backlog", `${Math.round(l.backlog?.points || 0)} points`], ["Points", String(l.points)]]),
        oeeTile("line", `${site}/${l.line}`),
        el("p", {}, el("a", { href: `#/line/${encodeURIComponent(site)}/${encodeURIComponent(l.line)}`, textContent: "3D view" }),
           " · ", el("a", { href: `#/table/${encodeURIComponent(site)}/${encodeURIComponent(l.line)}`, textContent: "table" }),
           " · ", el("a", { href: `#/oee/${encodeURIComponent(site)}/${encodeURIComponent(l.line)}`, textContent: "OEE" })));
      card.addEventListener("click", (e) => { if (e.target.tagName !== "A") location.hash = `#/line/${encodeURIComponent(site)}/${encodeURIComponent(l.line)}`; });
      return card;
    }));
  };
  draw();
  return { dispose: app.subscribe((e) => { if (e.kind === "sites") draw(); }) };
}
