// Timeline playback (US-SYS-006): the stored history of a line over a chosen range, replayed at
// 1x/5x/10x into a model of its own, which drives the same scene, table and panel as live data.

import { api } from "./api.js";
import { LineModel } from "./model.js";

function lastAtOrBefore(times, t) {  // index of the last time <= t, or -1
  let lo = 0, hi = times.length - 1, out = -1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (times[mid] <= t) { out = mid; lo = mid + 1; } else hi = mid - 1;
  }
  return out;
}

export class PlaybackModel extends LineModel {
  constructor(live, from, to) {
    super();
    this.playback = true;
    this.from = from;
    this.to = to;
    this.series = new Map();  // thing id -> [{feature, property, t: [s], v: []}]
    this.history = [];        // anomalies overlapping the range, with their times in seconds
    for (const [id, t] of live.things) this.things.set(id, { id, type: t.type, metadata: t.metadata, features: {} });
  }

  async load(anomalies, onProgress) {
    const ids = [...this.things.keys()];
    let done = 0;
    await Promise.all(ids.map(async (id) => {
      const q = new URLSearchParams({ from: String(this.from), to: String(this.to), resolution: "auto" });
      const doc = await api.get(`/api/v1/things/${encodeURIComponent(id)}/history?${q}`);
      this.series.set(id, doc.series.map((s) => ({ feature: s.feature, property: s.property,
        t: s.points.t.map((ms) => ms / 1000), v: s.points.value || s.points.last })));
      onProgress?.(++done / ids.length);
    }));
    const secs = (iso) => (iso ? Date.parse(iso) / 1000 : null);
    this.history = anomalies.filter((a) => this.things.has(a.thingId)).map((a) => ({ ...a,
      opened: secs(a.openedAt), acked: secs(a.acknowledgedAt), resolved: secs(a.resolvedAt) }))
      .filter((a) => a.opened != null && a.opened < this.to && (a.resolved == null || a.resolved > this.from));
  }

  /** Every Thing as it was at `t` (epoch seconds). */
  seek(t) {
    for (const [id, list] of this.series) {
      const thing = this.things.get(id);
      thing.features = {};
      for (const s of list) {
        const i = lastAtOrBefore(s.t, t);
        if (i < 0) continue;
        const f = (thing.features[s.feature] = thing.features[s.feature] || { properties: {} });
        f.properties[s.property] = s.v[i];
      }
    }
    this.anomalies = new Map();
    for (const a of this.history) {
      if (a.opened > t || (a.resolved != null && a.resolved <= t)) continue;
      this.anomalies.set(a.id, { ...a, state: a.acked != null && a.acked <= t ? "acknowledged" : "open", resolvedAt: null });
    }
    this.time = t;
    this.changed([...this.things.keys()]);
  }

  zones(thingId) {
    const p = this.things.get(thingId)?.features?.thermal?.properties || {};
    const z = [];
    for (let i = 0; `temperature_zones[${i}]` in p; i++) z.push(p[`temperature_zones[${i}]`]);
    return z.length ? z : null;
  }
}
