// The alarm journal (#/alarms): every anomaly with filters and paging, acknowledge or resolve with a
// comment, shelve a known condition for some hours (with why), who did what, and a CSV export.
// On the aggregator the list covers every site, with the same filters plus site and line; shelves
// are set at the line's gateway and shown here as they arrive.

import { api, auth } from "./api.js";
import { el } from "./dom.js";

const PAGE = 50;

export class AlarmsPage {
  constructor(main, app) {
    Object.assign(this, { main, app, offset: 0 });
    this.gateway = app.mode.kind === "gateway";
  }

  field(name, label, control) {
    control.id = `f-${name}`;
    control.name = name;
    return el("label", {}, `${label} `, control);
  }

  async load() {
    const select = (options) => el("select", {}, ...options.map(([v, t]) => el("option", { value: v, textContent: t })));
    const fields = [
      this.field("state", "State", select([["active", "active"], ["open", "open"], ["acknowledged", "acknowledged"],
        ["resolved", "resolved"], ["", "all"]])),
      this.field("severity", "Severity", select([["", "any"], ["critical", "critical"], ["warning", "warning"], ["info", "info"]])),
      this.field("thingId", "Thing", el("input", { placeholder: "site:equipment" })),
    ];
    if (!this.gateway) {
      fields.push(this.field("site", "Site", select([["", "any"], ...this.app.sites.map((s) => [s.site, s.site])])),
        this.field("line", "Line", el("input", {})));
    }
    fields.push(this.field("type", "Type", el("input", { placeholder: "threshold" })),
      this.field("acknowledgedBy", "Acknowledged by", el("input", {})),
      this.field("shelved", "Shelved", select([["", "either"], ["false", "no"], ["true", "yes"]])),
      this.field("from", "From", el("input", { type: "datetime-local" })),
      this.field("to", "To", el("input", { type: "datetime-local" })));
    this.form = el("form", { id: "alarm-filters", className: "filters" }, ...fields,
      el("button", { type: "submit", textContent: "Apply" }));
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.offset = 0; this.refresh(); });
    this.table = el("table", { id: "alarms" });
    this.pager = el("p", { id: "alarm-pager" });
    this.detail = el("section", { id: "alarm-detail" });
    const exportButton = el("button", { id: "alarm-export", type: "button", className: "secondary", textContent: "Export CSV" });
    exportButton.addEventListener("click", () => this.exportCsv());
    this.main.replaceChildren(el("div", { className: "alarms-page" }, el("h1", { textContent: "Alarms" }), this.form,
      exportButton, this.table, this.pager, this.detail));
    await this.refresh();
    this.off = this.app.subscribe((e) => { if (e.kind === "anomaly") this.refresh(); });
  }

  query(extra = {}) {
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(this.form)) {
      if (!v) continue;
      q.set(k, k === "from" || k === "to" ? new Date(v).toISOString() : v);
    }
    for (const [k, v] of Object.entries(extra)) q.set(k, v);
    return q;
  }

  async refresh() {
    const asked = this.asked = (this.asked || 0) + 1;
    const page = await api.get(`/api/v1/anomalies?${this.query({ limit: PAGE, offset: this.offset })}`);
    if (asked !== this.asked) return;  // a newer query (other filters, another page) was asked for meanwhile
    this.table.dataset.total = page.total;
    this.items = page.items;
    const head = ["Opened", ...(this.gateway ? [] : ["Site"]), "Thing", "Type", "Severity", "State", "Acknowledged by", "Note",
      "Shelved until", ""];
    this.table.replaceChildren(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { textContent: h })))),
      el("tbody", {}, ...page.items.map((a) => this.row(a))));
    const prev = el("button", { type: "button", className: "secondary", textContent: "Newer", disabled: this.offset === 0 });
    const next = el("button", { type: "button", className: "secondary", textContent: "Older",
                                disabled: this.offset + PAGE >= page.total });
    prev.addEventListener("click", () => { this.offset = Math.max(0, this.offset - PAGE); this.refresh(); });
    next.addEventListener("click", () => { this.offset += PAGE; this.refresh(); });
    this.pager.replaceChildren(`${page.total ? this.offset + 1 : 0}–${Math.min(this.offset + PAGE, page.total)} of ${page.total} `, prev, " ", next);
  }

  row(a) {
    const open = el("button", { type: "button", className: "secondary", textContent: "details" });
    open.addEventListener("click", () => this.show(a));
    return el("tr", { dataset: { id: a.id, state: a.state === "resolved" ? "" : a.severity } },
      el("td", { textContent: new Date(a.openedAt).toLocaleString() }),
      ...(this.gateway ? [] : [el("td", { textContent: `${a.site} · ${a.line}`, dataset: { field: "site" } })]),
      el("td", { textContent: a.thingId, dataset: { field: "thingId" } }),
      el("td", { textContent: a.anomalyType }), el("td", { textContent: a.severity }),
      el("td", { textContent: a.state, dataset: { field: "state" } }),
      el("td", { textContent: a.acknowledgedBy || "", dataset: { field: "acknowledgedBy" } }),
      el("td", { textContent: a.note || "" }),
      el("td", { textContent: a.shelved ? new Date(a.shelved.until).toLocaleString() : "", dataset: { field: "shelved" } }),
      el("td", {}, open));
  }

  async show(a) {
    const comment = el("input", { id: "alarm-comment", placeholder: "comment (optional)" });
    const status = el("span", { id: "alarm-status", role: "status" });
    const act = (label, id, fn) => {
      const b = el("button", { id, type: "button", textContent: label });
      b.addEventListener("click", async () => {
        try {
          await fn();
          await this.refresh();
          await this.show(this.items.find((x) => x.id === a.id) || await api.get(`/api/v1/anomalies/${a.id}`));
          this.detail.querySelector("#alarm-status").textContent = "done";
        }
        catch (e) { status.textContent = e.message; }
      });
      return b;
    };
    const buttons = [];
    if (a.state === "open") buttons.push(act("Acknowledge", "alarm-ack", () => api.post(`/api/v1/anomalies/${a.id}/ack`, { note: comment.value })));
    if (a.state !== "resolved") buttons.push(act("Resolve", "alarm-resolve", () => api.post(`/api/v1/anomalies/${a.id}/resolve`, { note: comment.value })));
    const parts = [el("h2", { textContent: `${a.thingId} · ${a.anomalyType}` }), el("p", { textContent: a.explanation || "" }),
      el("p", {}, comment, " ", ...buttons, " ", status)];
    if (this.gateway && a.state !== "resolved" && !a.shelved) {
      const hours = el("input", { id: "shelve-hours", type: "number", min: "0.5", step: "0.5", value: "8" });
      const why = el("input", { id: "shelve-reason", placeholder: "why (required)" });
      parts.push(el("p", {}, "Shelve for ", hours, " h because ", why, " ",
        act("Shelve", "alarm-shelve", () => api.post(`/api/v1/anomalies/${a.id}/shelve`, { hours: Number(hours.value), reason: why.value }))));
    }
    if (a.shelved) {
      parts.push(el("p", { id: "alarm-shelf", textContent: `Shelved until ${new Date(a.shelved.until).toLocaleString()} by ${a.shelved.by}: ${a.shelved.reason}` }));
    }
    if (a.pending && a.pending.length) {
      parts.push(el("p", { id: "alarm-pending", textContent: `Waiting for the line's gateway: ${a.pending.join(", ")}` }));
    }
    // the gateway keeps the journal; the aggregator has it with each anomaly, as the gateway sent it
    const items = this.gateway ? (await api.get(`/api/v1/anomalies/${a.id}/journal`)).items : (a.journal || []);
    parts.push(el("h3", { textContent: "Journal" }), el("ul", { id: "alarm-journal" }, ...items.map((x) =>
      el("li", { dataset: { action: x.action }, textContent: `${new Date(x.at).toLocaleString()} · ${x.action} by ${x.by}${x.comment ? `: ${x.comment}` : ""}` }))));
    this.detail.dataset.id = a.id;
    this.detail.replaceChildren(...parts);
  }

  async exportCsv() {
    const r = await fetch(`/api/v1/anomalies?${this.query({ format: "csv", limit: 100000 })}`,
                          { headers: auth.key ? { Authorization: `Bearer ${auth.key}` } : {} });
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: "alarms.csv" });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 5000);
  }

  dispose() { if (this.off) this.off(); }
}
