// The Devices page of a gateway (#/devices): its PLC connector devices with their health, each
// device's tags with live values, and for admins a device editor (the REST body as JSON) and a
// register-map CSV import. Refreshed every 2 s and by live StateChanged events.

import { api } from "./api.js";
import { el } from "./dom.js";

const REFRESH_MS = 2000;

function fmt(v) {
  if (v === undefined || v === null) return "—";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(3).replace(/\.?0+$/, "");
  return String(v);
}

export class DevicesView {
  constructor(root, app) {
    this.root = root;
    this.app = app;
    this.values = new Map();  // thingId -> {feature: {property: value}}
    this.timer = null;
    this.unsubscribe = app.subscribe((e) => {
      if (e.kind !== "state" || !this.values.has(e.thingId)) return;
      const features = this.values.get(e.thingId);
      features[e.feature] = { ...(features[e.feature] || {}), ...e.properties };
      this.paintValues();
    });
  }

  async load() {
    this.root.replaceChildren(
      el("section", { className: "devices" },
        el("h1", { textContent: "Devices" }),
        el("p", { className: "hint", textContent: "PLCs this gateway reads (Modbus, OPC UA, S7) and their health." }),
        el("table", { id: "devices-table" },
          el("thead", {}, el("tr", {}, ...["Device", "Protocol", "Thing", "State", "Since", "Success", "p99 ms",
            "Requests / cycle", "Last error", "Source"].map((h) => el("th", { textContent: h })))),
          el("tbody")),
        el("div", { id: "device-tags" }),
        this.editor()));
    await this.refresh();
    this.timer = setInterval(() => this.refresh().catch(() => {}), REFRESH_MS);
  }

  editor() {
    const status = el("p", { id: "device-status", role: "status" });
    const text = el("textarea", { id: "device-json", rows: 10, spellcheck: false,
      placeholder: '{"protocol": "modbus", "name": "oven-plc", "url": "tcp://10.0.0.5:502", "unit": 1, ' +
        '"thing": "oven-101", "type": "oven", "tags": [{"feature": "thermal", "property": "temperature", ' +
        '"address": 100, "datatype": "float32", "unit": "degC"}]}' });
    const save = el("button", { id: "device-save", type: "button", textContent: "Save device" });
    save.addEventListener("click", async () => {
      try {
        const doc = JSON.parse(text.value);
        await api.put(`/api/v1/connectors/devices/${encodeURIComponent(doc.name)}`, doc);
        status.className = "";
        status.textContent = `saved ${doc.name}`;
        await this.refresh();
      } catch (e) {
        status.className = "error";
        status.textContent = e.message;
      }
    });
    const csvDevice = el("input", { id: "csv-device", placeholder: "device name" });
    const csvFile = el("input", { id: "csv-file", type: "file", accept: ".csv,text/csv" });
    const importBtn = el("button", { id: "csv-import", type: "button", textContent: "Import register map" });
    importBtn.addEventListener("click", async () => {
      try {
        const file = csvFile.files[0];
        if (!file) throw new Error("choose a CSV file");
        await api.postText(`/api/v1/connectors/devices/${encodeURIComponent(csvDevice.value)}/register-map`,
                           await file.text(), "text/csv");
        status.className = "";
        status.textContent = `imported ${file.name} into ${csvDevice.value}`;
        await this.refresh();
      } catch (e) {
        status.className = "error";
        status.textContent = e.message;
      }
    });
    return el("details", { className: "device-editor" },
      el("summary", { textContent: "Add or change a device (admin)" }),
      el("p", { className: "hint", textContent: "The device as JSON, the keys of docs/connectors.md. " +
        "Click a device above to edit it." }),
      text, save,
      el("p", {}, "Register map CSV (address,name,type,scale,unit): ", csvDevice, " ", csvFile, " ", importBtn),
      status);
  }

  async refresh() {
    const doc = await api.get("/api/v1/connectors/devices");
    this.devices = doc.items;
    const body = this.root.querySelector("#devices-table tbody");
    if (!body) return;
    body.replaceChildren(...doc.items.map((d) => {
      const h = d.health || {};
      const row = el("tr", { dataset: { device: d.name, state: h.state || "disabled" } },
        el("td", { textContent: d.name }), el("td", { textContent: d.protocol }), el("td", { textContent: d.thingId }),
        el("td", { className: `state ${h.state || ""}`, textContent: h.state || "disabled" }),
        el("td", { textContent: h.since || "—" }),
        el("td", { textContent: h.pollSuccessRate == null ? "—" : `${Math.round(h.pollSuccessRate * 100)} %` }),
        el("td", { textContent: fmt(h.latencyP99Ms) }), el("td", { textContent: fmt(h.requestsPerCycle) }),
        el("td", { className: "error", textContent: h.state === "online" ? "" : (h.lastError || "") }),
        el("td", { textContent: d.source }));
      row.addEventListener("click", () => {
        const { source, thingId, health, ...editable } = d;
        this.root.querySelector("#device-json").value = JSON.stringify(editable, null, 2);
        this.root.querySelector(".device-editor").open = true;
      });
      return row;
    }));
    await Promise.all(doc.items.map(async (d) => {
      try {
        const thing = await api.get(`/api/v1/things/${encodeURIComponent(d.thingId)}`);
        this.values.set(d.thingId, Object.fromEntries(Object.entries(thing.features)
          .map(([f, v]) => [f, v.properties || {}])));
      } catch {
        this.values.set(d.thingId, {});  // not polled yet
      }
    }));
    this.paintValues();
  }

  paintValues() {
    const box = this.root.querySelector("#device-tags");
    if (!box || !this.devices) return;
    box.replaceChildren(...this.devices.map((d) => {
      const features = this.values.get(d.thingId) || {};
      return el("section", { className: "device-tags", dataset: { device: d.name } },
        el("h2", { textContent: `${d.name} — tags` }),
        el("table", {},
          el("thead", {}, el("tr", {}, ...["Feature", "Property", "Value", "Unit", "Writable"]
            .map((x) => el("th", { textContent: x })))),
          el("tbody", {}, ...d.tags.map((t) => el("tr", { dataset: { tag: `${t.feature}.${t.property}` } },
            el("td", { textContent: t.feature }), el("td", { textContent: t.property }),
            el("td", { className: "value", textContent: fmt((features[t.feature] || {})[t.property]) }),
            el("td", { textContent: t.to_unit || t.unit || "" }),
            el("td", { textContent: t.writable ? "yes" : "" }))))));
    }));
  }

  dispose() {
    clearInterval(this.timer);
    this.unsubscribe();
  }
}
