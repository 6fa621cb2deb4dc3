// OEE in the viewer: tiles with the three factors (site and line cards, the OEE page), the state band
// of each machine over the last hours with its reasons, and the downtime Pareto (uPlot). An operator
// clicks a stop in the band to set or correct its reason.

import uPlot from "uplot";
import { api } from "./api.js";
import { el } from "./dom.js";

const pct = (v) => (v == null ? "—" : `${(v * 100).toFixed(1)} %`);
const HOURS = 8;
const cache = new Map();  // "scope/id" -> {at, answer}: cards redraw with every summary, OEE moves slowly

function figuresOf(scope, id) {
  const key = `${scope}/${id}`;
  const hit = cache.get(key);
  if (hit && Date.now() - hit.at < 30000) return hit.answer;
  const answer = api.get(`/api/v1/oee?${new URLSearchParams({ scope, id, by: "none" })}`);
  cache.set(key, { at: Date.now(), answer });
  answer.catch(() => cache.delete(key));
  return answer;
}

/** A tile with OEE and availability, performance, quality of `scope`/`id` over the last 24 h. */
export function oeeTile(scope, id, label = "OEE (24 h)") {
  const tile = el("div", { className: "oee-tile", dataset: { scope, id } }, el("span", { className: "oee-label", textContent: label }));
  figuresOf(scope, id).then((r) => {
    const t = r.total;
    tile.dataset.oee = t.oee == null ? "" : String(t.oee);
    tile.append(el("strong", { className: "oee-value", textContent: pct(t.oee) }),
      el("span", { className: "oee-factors" },
        el("span", { title: "availability", textContent: `A ${pct(t.availability)}`, dataset: { factor: "availability" } }), " · ",
        el("span", { title: "performance", textContent: `P ${pct(t.performance)}`, dataset: { factor: "performance" } }), " · ",
        el("span", { title: "quality", textContent: `Q ${pct(t.quality)}`, dataset: { factor: "quality" } })));
  }).catch((e) => { tile.dataset.error = e.status === 404 ? "off" : "error"; tile.append(el("span", { textContent: e.status === 404 ? "OEE off" : "—" })); });
  return tile;
}

/** `#/oee/SITE/LINE`: the line's and each machine's OEE, their state bands, the downtime Pareto. */
export class OeePage {
  constructor(main, app, { site, line }) {
    Object.assign(this, { main, app, site, line });
    this.gateway = app.mode.kind === "gateway";
    this.lineId = this.gateway ? line : `${site}/${line}`;
  }

  async load() {
    const to = Date.now() / 1000;
    this.from = to - HOURS * 3600;
    this.to = to;
    this.bands = el("section", { id: "state-bands", ariaLabel: "Machine states" });
    this.pareto = el("div", { id: "pareto" });
    this.tiles = el("section", { className: "cards", id: "oee-tiles" }, oeeTile("line", this.lineId, `Line ${this.line}`));
    this.reasonBox = el("div", { id: "reason-box", hidden: true });
    this.main.replaceChildren(el("div", { className: "oee-page" },
      el("h1", { textContent: `OEE · ${this.line}` }), this.tiles,
      el("h2", { textContent: `Machine states, last ${HOURS} h` }), this.bands, this.reasonBox,
      el("h2", { textContent: "Downtime by reason (24 h)" }), this.pareto));
    // reasons are set and corrected at the line's gateway; the aggregator shows what its gateways sent
    if (this.gateway) this.reasons = (await api.get("/api/v1/oee/reasons")).reasons;
    await this.drawBands();
    await this.drawPareto();
  }

  async drawBands() {
    const q = new URLSearchParams({ scope: "line", id: this.lineId, from: String(this.from), to: String(this.to) });
    const { items } = await api.get(`/api/v1/oee/events?${q}`);
    const byThing = new Map();
    for (const e of items) (byThing.get(e.thingId) || byThing.set(e.thingId, []).get(e.thingId)).push(e);
    // the band spans the range, or less while the machines have been tracked for less time
    const first = Math.min(...items.map((e) => Date.parse(e.start) / 1000), this.to - 600);
    const from = Math.max(this.from, first);
    const span = this.to - from;
    this.tiled = this.tiled || new Set();
    const rows = [...byThing.keys()].sort().map((thingId) => {
      if (!this.tiled.has(thingId)) {
        this.tiled.add(thingId);
        this.tiles.append(oeeTile("machine", thingId, thingId.split(":")[1]));
      }
      const band = el("div", { className: "state-band", dataset: { thing: thingId } });
      for (const e of byThing.get(thingId)) {
        const start = Math.max(Date.parse(e.start) / 1000, from);
        const end = Math.min(Date.parse(e.end) / 1000, this.to);
        if (end <= start) continue;
        const seg = el("span", { className: "seg", dataset: { state: e.state, event: e.id, reason: e.reason },
          title: `${e.state}${e.reason ? ` — ${e.reason}` : ""} · ${Math.round(e.durationS / 60)} min from ${new Date(e.start).toLocaleTimeString()}` });
        seg.style.left = `${((start - from) / span) * 100}%`;
        seg.style.width = `${Math.max(((end - start) / span) * 100, 0.15)}%`;
        if (e.state !== "running" && this.gateway) seg.addEventListener("click", () => this.editReason(e));
        band.append(seg);
      }
      return el("div", { className: "band-row" }, el("span", { className: "band-label", textContent: thingId.split(":")[1] }), band);
    });
    const stops = items.filter((e) => e.state !== "running").reverse().slice(0, 50);
    const stopRows = stops.map((e) => {
      const button = this.gateway
        ? el("button", { type: "button", className: "secondary", textContent: e.reason ? "change reason" : "set reason" })
        : el("span", { className: "hint", textContent: "set at the line's gateway" });
      if (this.gateway) button.addEventListener("click", () => this.editReason(e));
      return el("tr", { dataset: { event: e.id, state: e.state } },
        el("td", { textContent: new Date(e.start).toLocaleTimeString() }), el("td", { textContent: e.thingId.split(":")[1] }),
        el("td", { textContent: e.state }), el("td", { textContent: `${Math.round(e.durationS)} s` }),
        el("td", { textContent: e.reason || "—", dataset: { field: "reason" } }), el("td", {}, button));
    });
    this.bands.replaceChildren(...rows, el("p", { className: "legend" },
      ...["running", "idle", "down", "changeover", "planned_stop", "offline"].map((s) =>
        el("span", { className: "seg-key", dataset: { state: s }, textContent: s }))),
      el("h3", { textContent: "Latest stops" }),
      el("table", { id: "stops" }, el("thead", {}, el("tr", {}, ...["Start", "Machine", "State", "Duration", "Reason", ""]
        .map((h) => el("th", { textContent: h })))), el("tbody", {}, ...stopRows)));
  }

  editReason(e) {
    const select = el("select", { id: "reason-select" }, ...this.reasons.map((r) => el("option", { value: r, textContent: r, selected: r === e.reason })));
    const note = el("input", { id: "reason-note", placeholder: "note (optional)", value: e.note || "" });
    const save = el("button", { id: "reason-save", type: "button", textContent: "Save reason" });
    const status = el("span", { id: "reason-status", role: "status" });
    save.addEventListener("click", async () => {
      try {
        await api.put(`/api/v1/oee/events/${encodeURIComponent(e.id)}/reason`, { reason: select.value, note: note.value });
        status.textContent = "saved";
        await this.drawBands();
        await this.drawPareto();
      } catch (err) {
        status.textContent = err.message;
      }
    });
    this.reasonBox.hidden = false;
    this.reasonBox.dataset.event = e.id;
    this.reasonBox.replaceChildren(el("strong", { textContent: `${e.thingId.split(":")[1]}: ${e.state}, ${Math.round(e.durationS / 60)} min ` }),
      select, note, save, status);
  }

  async drawPareto() {
    const q = new URLSearchParams({ scope: "line", id: this.lineId });
    const d = await api.get(`/api/v1/downtime?${q}`);
    this.pareto.dataset.reasons = d.pareto.map((p) => p.reason).join(",");
    if (this.chart) this.chart.destroy();
    if (!d.pareto.length) {
      this.pareto.replaceChildren(el("p", { textContent: "No stops in planned time." }));
      return;
    }
    this.pareto.replaceChildren();
    const xs = d.pareto.map((_, i) => i);
    const names = d.pareto.map((p) => p.reason);
    this.chart = new uPlot({
      width: Math.max(320, this.pareto.clientWidth || 640), height: 240,
      scales: { x: { time: false, range: [-0.5, xs.length - 0.5] }, pct: { range: [0, 100] } },
      axes: [{ values: (u, ticks) => ticks.map((t) => names[t] ?? ""), stroke: "#9fb0c3" },
        { label: "minutes", stroke: "#9fb0c3" }, { side: 1, scale: "pct", label: "cumulative %", stroke: "#9fb0c3" }],
      series: [{}, { label: "minutes", fill: "#e0a526", stroke: "#e0a526", paths: uPlot.paths.bars({ size: [0.6] }) },
        { label: "cumulative %", scale: "pct", stroke: "#4aa3ff" }],
    }, [xs, d.pareto.map((p) => p.seconds / 60), d.pareto.map((p) => p.cumulativeShare * 100)], this.pareto);
  }

  dispose() { if (this.chart) this.chart.destroy(); }
}
