// One line: the 3D scene (or the 2D table), the detail panel and the timeline. Live events update
// the live model; in playback the timeline's model drives the same views instead.

import { allThings, api, normaliseAnomaly } from "./api.js";
import { flatten, LineModel } from "./model.js";
import { DetailPanel } from "./panel.js";
import { PlaybackModel } from "./playback.js";
import { el } from "./dom.js";


const RANGES = { "15 min": 900, "1 h": 3600, "6 h": 21600, "24 h": 86400 };

export class LineView {
  constructor(main, app, { site, line, table, thing }) {
    Object.assign(this, { main, app, site, line, tableMode: table, selected: thing });
    this.live = new LineModel();
    this.model = this.live;  // what the views show: the live model, or the playback one
    this.scene = null;
    this.offs = [];
    this.timer = null;
  }

  async load() {
    const { app, site, line } = this;
    const gateway = app.mode.kind === "gateway";
    const things = gateway ? await allThings("") : await allThings(`site=${encodeURIComponent(site)}&line=${encodeURIComponent(line)}`);
    this.live.setThings(things);
    await this.loadAnomalies();
    const layout = await api.get("/api/v1/layout").catch(() => ({ lines: {} }));
    this.layout = layout.lines?.[`${site}/${line}`]?.machines || {};
    this.build();
    this.offs.push(app.subscribe((e) => this.onLive(e)));
    this.offs.push(this.live.onChange((ids) => { if (this.model === this.live) this.refresh(ids); }));
    app.live?.follow([`${site}/${line}`]);
    this.refresh([...this.live.things.keys()]);
    if (this.selected) this.select(this.selected);
  }

  async loadAnomalies(all = false) {
    const q = this.app.mode.kind === "aggregator" ? `&site=${encodeURIComponent(this.site)}` : "";
    const { items } = await api.get(`/api/v1/anomalies?limit=1000${all ? "" : "&state=active"}${q}`);
    const mine = items.filter((a) => this.live.things.has(a.thingId));
    if (!all) for (const a of mine) this.live.applyAnomaly(normaliseAnomaly(a));
    return mine;
  }

  onLive(e) {
    const m = this.live;
    if (e.kind === "things") m.setThings(e.things.filter((t) => this.app.mode.kind === "gateway" || (t.site === this.site && t.line === this.line)));
    else if (e.kind === "state") m.applyState(e.thingId, e.feature, e.properties);
    else if (e.kind === "anomaly" && m.things.has(e.anomaly.thingId)) m.applyAnomaly(e.anomaly);
    else if (e.kind === "reconnected") this.loadAnomalies().catch(() => {});
  }

  build() {
    const toolbar = el("div", { className: "toolbar" });
    const view3d = el("button", { type: "button", textContent: "3D", ariaPressed: String(!this.tableMode) });
    const view2d = el("button", { type: "button", id: "show-table", textContent: "Table", ariaPressed: String(this.tableMode) });
    view3d.addEventListener("click", () => { location.hash = `#/line/${encodeURIComponent(this.site)}/${encodeURIComponent(this.line)}`; });
    view2d.addEventListener("click", () => { location.hash = `#/table/${encodeURIComponent(this.site)}/${encodeURIComponent(this.line)}`; });
    toolbar.append(el("strong", { textContent: `${this.site} / ${this.line}` }), view3d, view2d);
    this.stage = el("div", { className: "stage", id: "stage" });
    this.panelBox = el("aside", { className: "panel", id: "panel", ariaLabel: "Machine details" });
    this.states = el("ul", { className: "sr-only", id: "machine-states", ariaLabel: "Machine states" });
    this.timeline = this.buildTimeline();
    this.main.replaceChildren(el("div", { className: "line-view" }, toolbar, this.stage, this.panelBox, this.timeline, this.states));
    this.panel = new DetailPanel(this.panelBox, this.model, { range: () => this.chartRange() });
    if (this.tableMode) return this.buildTable();
    import("./scene.js").then(({ LineScene, autoLayout }) => {
      this.scene = new LineScene(this.stage, { onPick: (id) => this.select(id) });
      const auto = autoLayout([...this.live.things.values()].map((t) => ({ id: t.id, type: t.type })));
      this.scene.setMachines([...this.live.things.values()].map((t) => ({
        id: t.id, type: t.type, name: t.metadata?.name || t.id, ...(auto.get(t.id) || {}), ...(this.layout[t.id] || {}) })));
      for (const camera of ["orbit", "walk"]) {
        const b = el("button", { type: "button", className: "secondary", textContent: camera === "orbit" ? "Orbit" : "Walk" });
        b.addEventListener("click", () => this.scene.setCameraMode(camera));
        toolbar.append(b);
      }
      this.refresh([...this.model.things.keys()]);
      if (this.selected) this.scene.select(this.selected);
    });
  }

  buildTable() {
    this.tbody = el("tbody");
    this.stage.replaceChildren(el("table", { id: "things-table" },
      el("caption", { className: "sr-only", textContent: `Machines of ${this.site} / ${this.line}` }),
      el("thead", {}, el("tr", {}, ...["Machine", "Type", "State", "Anomaly", "Connectivity", "Readings"].map((h) => el("th", { scope: "col", textContent: h })))),
      this.tbody));
    this.stage.style.overflow = "auto";
  }

  tableRow(id) {
    const t = this.model.things.get(id);
    const v = this.model.visual(id);
    const a = this.model.activeAnomaly(id);
    const readings = [];
    for (const [feature, f] of Object.entries(t.features || {})) {
      if (["status", "connectivity", "context"].includes(feature)) continue;
      for (const [k, x] of Object.entries(flatten(f.properties))) if (typeof x === "number") readings.push(`${k} ${x.toFixed(1)}`);
    }
    const button = el("button", { type: "button", className: "secondary", textContent: t.metadata?.name || id });
    button.addEventListener("click", () => this.select(id));
    return el("tr", { dataset: { thing: id, state: v.state } }, el("th", { scope: "row" }, button),
      el("td", { textContent: t.type }), el("td", { textContent: v.state }),
      el("td", { textContent: a ? `${a.state}: ${a.explanation || ""}` : "" }),
      el("td", { textContent: t.features?.connectivity?.properties?.state || "" }),
      el("td", { textContent: readings.slice(0, 6).join(" · ") }));
  }

  refresh(ids) {
    const m = this.model;
    for (const id of ids) {
      if (!m.things.has(id)) continue;
      const v = m.visual(id);
      if (this.scene) this.scene.update(id, { ...v, zones: m.zones(id) });
      let li = this.states.querySelector(`li[data-thing="${CSS.escape(id)}"]`);
      if (!li) this.states.append(li = el("li", { dataset: { thing: id } }));
      li.dataset.state = v.state;
      li.dataset.anomaly = String(v.anomaly);
      li.textContent = `${id}: ${v.state}${v.anomaly ? ", open anomaly" : ""}`;
    }
    if (this.tbody) {
      const rows = [...m.things.keys()].sort().map((id) => this.tableRow(id));
      this.tbody.replaceChildren(...rows);
    }
    if (this.panel.thingId && ids.includes(this.panel.thingId)) this.panel.render();
  }

  select(id) {
    this.selected = id;
    this.scene?.select(id);
    this.panel.show(id);
  }

  chartRange() {
    if (this.model.playback) return [this.model.from, this.model.to];
    const now = Date.now() / 1000;
    return [now - 900, now];
  }

  // ------------------------------------------------------------------ timeline
  buildTimeline() {
    const box = el("section", { className: "timeline", id: "timeline", ariaLabel: "Timeline", dataset: { mode: "live" } });
    const range = el("select", { id: "tl-range", ariaLabel: "Range" }, ...Object.keys(RANGES).map((k) => el("option", { value: String(RANGES[k]), textContent: `last ${k}` })));
    const load = el("button", { type: "button", id: "tl-load", textContent: "Replay range" });
    const play = el("button", { type: "button", id: "tl-play", textContent: "Play", disabled: true });
    const speeds = [1, 5, 10].map((s) => {
      const b = el("button", { type: "button", className: "secondary", textContent: `${s}×`, ariaPressed: String(s === 1), dataset: { speed: String(s) } });
      b.addEventListener("click", () => { this.speed = s; speeds.forEach((x) => { x.ariaPressed = String(x === b); }); });
      return b;
    });
    const slider = el("input", { type: "range", id: "tl-slider", min: "0", max: "1000", value: "1000", disabled: true, ariaLabel: "Time" });
    const clock = el("output", { id: "tl-time", textContent: "live" });
    const live = el("button", { type: "button", id: "tl-live", className: "secondary", textContent: "Back to live", hidden: true });
    this.speed = 1;
    load.addEventListener("click", async () => {
      const to = Date.now() / 1000;
      const from = to - Number(range.value);
      load.disabled = true;
      clock.textContent = "loading…";
      try {
        const pb = new PlaybackModel(this.live, from, to);
        await pb.load(await this.loadAnomalies(true), (f) => { clock.textContent = `loading ${Math.round(f * 100)} %`; });
        this.enterPlayback(pb, { box, slider, play, clock, live });
      } finally {
        load.disabled = false;
      }
    });
    play.addEventListener("click", () => (this.timer ? this.pause(play) : this.play(play, slider, clock)));
    slider.addEventListener("input", () => this.seekFraction(Number(slider.value) / 1000, clock));
    live.addEventListener("click", () => this.leavePlayback({ box, slider, play, clock, live }));
    box.append(range, load, play, ...speeds, slider, clock, live);
    this.tl = { box, slider, play, clock, live };
    return box;
  }

  enterPlayback(pb, ui) {
    this.pause(ui.play);
    this.model = pb;
    this.panel.model = pb;
    ui.box.dataset.mode = "playback";
    ui.slider.disabled = false;
    ui.play.disabled = false;
    ui.live.hidden = false;
    ui.slider.value = "0";
    pb.onChange((ids) => { if (this.model === pb) this.refresh(ids); });
    this.seekFraction(0, ui.clock);
  }

  leavePlayback(ui) {
    this.pause(ui.play);
    this.model = this.live;
    this.panel.model = this.live;
    ui.box.dataset.mode = "live";
    ui.slider.disabled = true;
    ui.play.disabled = true;
    ui.live.hidden = true;
    ui.slider.value = "1000";
    ui.clock.textContent = "live";
    this.refresh([...this.live.things.keys()]);
  }

  /** Seek the playback to a time (epoch seconds) — also used by tests and deep links. */
  seekTime(t) {
    const m = this.model;
    if (!m.playback) return;
    this.seekFraction((t - m.from) / (m.to - m.from), this.tl.clock);
  }

  seekFraction(f, clock) {
    const m = this.model;
    if (!m.playback) return;
    const t = m.from + Math.min(1, Math.max(0, f)) * (m.to - m.from);
    this.tl.slider.value = String(Math.round(((t - m.from) / (m.to - m.from)) * 1000));
    clock.textContent = new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
    clock.dataset.time = String(t);
    m.seek(t);
  }

  /** Play from the current time at this.speed, paced by the wall clock on animation frames (a timer
   *  would starve on a busy page and play slower than asked); the views update at most 10 times a second. */
  play(button, slider, clock) {
    button.textContent = "Pause";
    let last = performance.now();
    const tick = (now) => {
      if (this.timer !== tick) return;
      requestAnimationFrame(tick);
      if (now - last < 100) return;
      const m = this.model;
      const t = (m.time ?? m.from) + ((now - last) / 1000) * this.speed;
      last = now;
      if (t >= m.to) this.pause(button);
      this.seekFraction((t - m.from) / (m.to - m.from), clock);
    };
    this.timer = tick;
    requestAnimationFrame(tick);
  }

  pause(button) {
    this.timer = null;
    button.textContent = "Play";
  }

  dispose() {
    this.timer = null;
    for (const off of this.offs) off();
    this.scene?.dispose();
  }
}
