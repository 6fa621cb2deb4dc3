// The detail panel of one machine: live properties, connectivity, business context, the anomaly
// with its explanation and top features, a history chart with the anomaly marked, Acknowledge for
// operators, and CSV export of the shown range.

import uPlot from "uplot";
import { api, auth } from "./api.js";
import { flatten } from "./model.js";
import { el } from "./dom.js";
import { oeeTile } from "./oee.js";


const fmt = (v) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : String(v));

export class DetailPanel {
  constructor(container, model, { range }) {
    this.container = container;
    this.model = model;
    this.range = range;  // () => [fromSeconds, toSeconds] the chart shows
    this.thingId = null;
    this.chart = null;
    this.chartKey = "";
    this.empty();
  }

  empty() {
    this.container.replaceChildren(el("p", { textContent: "Click a machine to see its details." }));
  }

  show(thingId) {
    this.thingId = thingId;
    this.chartKey = "";
    this.render();
  }

  render() {
    const id = this.thingId;
    const t = id && this.model.things.get(id);
    if (!t) return this.empty();
    const a = this.model.activeAnomaly(id);
    const conn = t.features?.connectivity?.properties || {};
    const ctx = this.model.context(id);
    const props = [];
    for (const [feature, f] of Object.entries(t.features || {})) {
      if (["status", "connectivity"].includes(feature)) continue;
      for (const [path, v] of Object.entries(flatten(f.properties))) props.push([`${feature}/${path}`, v]);
    }
    const visual = this.model.visual(id);
    const parts = [
      el("h2", { textContent: t.metadata?.name || id }),
      el("p", { textContent: `${id} · ${t.type} · ` }, el("strong", { id: "panel-state", textContent: visual.state })),
      oeeTile("machine", id),
    ];
    if (a) {
      const box = el("div", { className: "explanation", dataset: { state: a.state, anomaly: a.id || "" } },
        el("strong", { textContent: `${a.severity || ""} anomaly, ${a.state}` }),
        el("p", { id: "panel-explanation", textContent: a.explanation || "" }),
        el("ul", {}, ...(a.topFeatures || []).map((f) => el("li", {
          textContent: `${f.label || `${f.feature}/${f.property}`}${f.share != null ? ` — ${Math.round(f.share * 100)} %` : ""}` }))));
      if (a.state === "open" && a.id && !this.model.playback) {
        const ack = el("button", { id: "ack", type: "button", textContent: "Acknowledge" });
        const note = el("span", { role: "status" });
        ack.addEventListener("click", async () => {
          ack.disabled = true;
          try {
            const r = await api.post(`/api/v1/anomalies/${encodeURIComponent(a.id)}/ack`, { note: "acknowledged in the viewer" });
            note.textContent = r.pending && r.pending.length ? " sent; the gateway applies it next exchange" : " acknowledged";
          } catch (e) {
            ack.disabled = false;
            note.textContent = e.status === 403 ? " acknowledging needs an operator key" : ` ${e.message}`;
          }
        });
        box.append(ack, note);
      }
      parts.push(box);
    }
    parts.push(el("h3", { textContent: "Connectivity" }),
      el("p", { textContent: `${conn.state || "unknown"}${conn.since ? ` since ${conn.since}` : ""}${conn.fw ? ` · firmware ${conn.fw}` : ""}` }));
    if (Object.keys(ctx).length) {
      parts.push(el("h3", { textContent: "Business context" }),
        el("dl", {}, ...Object.entries(ctx).flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: String(v) })])));
    }
    parts.push(el("h3", { textContent: "Properties" }),
      el("table", { id: "panel-props" }, el("tbody", {}, ...props.map(([k, v]) =>
        el("tr", { dataset: { path: k } }, el("td", { textContent: k }), el("td", { textContent: fmt(v) }))))));
    const chartBox = this.chartFor(a, props);
    const csv = el("button", { type: "button", className: "secondary", textContent: "Export CSV" });
    csv.addEventListener("click", () => this.exportCsv());
    parts.push(el("h3", { textContent: "History" }), chartBox, csv);
    this.container.replaceChildren(...parts);
  }

  /** The chart box: redrawn only when what it shows changes (another property, range or anomaly;
   *  live, at most every 15 s), so a panel fed at 10 Hz or a 10x playback stays cheap. */
  chartFor(a, props) {
    const which = this.chartProperty(a, props);
    const [from, to] = this.range();
    const span = this.model.playback ? `${from}-${to}` : String(Math.floor(to / 15));
    const key = [this.thingId, which?.join("/"), span, a?.id, a?.resolvedAt].join("|");
    if (key === this.chartKey && this.chartBox) return this.chartBox;
    this.chartKey = key;
    this.chartBox = el("div", { id: "chart" });
    this.drawChart(this.chartBox, a, props);
    return this.chartBox;
  }

  chartProperty(a, props) {
    const top = a?.topFeatures?.find((f) => f.feature && f.property);
    if (top) return [top.feature, top.property];
    const numeric = props.find(([, v]) => typeof v === "number");
    return numeric ? numeric[0].split("/", 2) : null;
  }

  async drawChart(box, a, props) {
    const which = this.chartProperty(a, props);
    if (!which) return;
    const [from, to] = this.range();
    const q = new URLSearchParams({ from: String(from), to: String(to), feature: which[0], property: which[1] });
    let doc;
    try {
      doc = await api.get(`/api/v1/things/${encodeURIComponent(this.thingId)}/history?${q}`);
    } catch {
      return;
    }
    const s = doc.series[0];
    if (!s || !box.isConnected) return;
    const t = s.points.t.map((ms) => ms / 1000);
    const y = s.points.value || s.points.avg;
    const opened = a?.openedAt ? Date.parse(a.openedAt) / 1000 : null;
    const closed = a?.resolvedAt ? Date.parse(a.resolvedAt) / 1000 : to;
    const mark = (u) => {  // the anomaly's time span, shaded
      if (opened == null) return;
      const x0 = u.valToPos(Math.max(opened, u.scales.x.min), "x", true);
      const x1 = u.valToPos(Math.min(closed, u.scales.x.max), "x", true);
      u.ctx.save();
      u.ctx.fillStyle = "rgba(229, 72, 77, 0.25)";
      u.ctx.fillRect(x0, u.bbox.top, Math.max(2, x1 - x0), u.bbox.height);
      u.ctx.restore();
    };
    box.replaceChildren();
    box.dataset.property = `${which[0]}/${which[1]}`;
    box.dataset.points = String(t.length);
    this.chart = new uPlot({ width: Math.max(240, box.clientWidth || 320), height: 180,
      series: [{}, { label: `${which[0]}/${which[1]}`, stroke: "#4aa3ff" }],
      axes: [{ stroke: "#9fb0c3" }, { stroke: "#9fb0c3" }], hooks: { draw: [mark] } }, [t, y], box);
  }

  async exportCsv() {
    const [from, to] = this.range();
    const q = new URLSearchParams({ from: String(from), to: String(to), format: "csv" });
    const r = await fetch(`/api/v1/things/${encodeURIComponent(this.thingId)}/history?${q}`,
      { headers: auth.key ? { Authorization: `Bearer ${auth.key}` } : {} });
    const blob = await r.blob();
    const a = el("a", { href: URL.createObjectURL(blob), download: `${this.thingId.replace(":", "_")}.csv` });
    document.body.append(a);
    a.click();
    a.remove();
  }
}
