// What the page knows about a line: Thing documents and anomalies, and from them each machine's
// visual state. Live events and timeline playback both feed it; views read it.

export const SEVERITY_RANK = { info: 1, warning: 2, critical: 3 };

/** Flatten a feature's properties to paths as stored: voltage.a, temperature_zones[1]. */
export function flatten(props, prefix = "", out = {}) {
  for (const [k, v] of Object.entries(props || {})) {
    const path = prefix ? `${prefix}.${k}` : k;
    if (Array.isArray(v)) v.forEach((x, i) => { out[`${path}[${i}]`] = x; });
    else if (v && typeof v === "object") flatten(v, path, out);
    else out[path] = v;
  }
  return out;
}

export class LineModel {
  constructor() {
    this.things = new Map();     // id -> Thing document (live, or rebuilt by playback)
    this.anomalies = new Map();  // anomaly id -> normalised anomaly
    this.listeners = new Set();
  }

  onChange(fn) { this.listeners.add(fn); return () => this.listeners.delete(fn); }
  changed(ids) { for (const fn of this.listeners) fn(ids); }

  setThings(docs) {
    for (const d of docs) this.things.set(d.id, d);
    this.changed(docs.map((d) => d.id));
  }

  applyState(thingId, feature, properties) {
    const t = this.things.get(thingId);
    if (!t) return;
    t.features = t.features || {};
    const f = (t.features[feature] = t.features[feature] || { properties: {} });
    f.properties = { ...f.properties, ...properties };
    this.changed([thingId]);
  }

  applyAnomaly(a) {
    if (!a.id) return;
    const old = this.anomalies.get(a.id);
    this.anomalies.set(a.id, { ...old, ...a });
    this.changed([a.thingId]);
  }

  /** The anomaly that matters most for a Thing now: open before acknowledged, then by severity. */
  activeAnomaly(thingId) {
    let best = null;
    for (const a of this.anomalies.values()) {
      if (a.thingId !== thingId || a.state === "resolved") continue;
      const rank = (a.state === "open" ? 10 : 0) + (SEVERITY_RANK[a.severity] || 0);
      if (!best || rank > best.rank) best = { rank, a };
    }
    if (best) return best.a;
    const status = this.things.get(thingId)?.features?.status?.properties;
    if (status && status.anomaly) {  // known from the Thing before the anomaly list arrived
      return { id: status.anomaly_id, thingId, state: "open", severity: status.severity,
               explanation: status.explanation, topFeatures: (status.top_features || []).map((p) => ({ label: p })) };
    }
    return null;
  }

  /** normal | warning | critical | offline, and whether the outline pulses (an open anomaly). */
  visual(thingId) {
    const t = this.things.get(thingId);
    const a = this.activeAnomaly(thingId);
    const offline = t?.features?.connectivity?.properties?.state === "offline";
    if (a) {
      const open = a.state === "open";
      return { state: open && a.severity !== "info" ? "critical" : "warning", anomaly: open };
    }
    return { state: offline ? "offline" : "normal", anomaly: false };
  }

  zones(thingId) {
    const z = this.things.get(thingId)?.features?.thermal?.properties?.temperature_zones;
    return Array.isArray(z) ? z : null;
  }

  /** Business context of a Thing (batch, recipe, operator), wherever its features carry it. */
  context(thingId) {
    const out = {};
    const t = this.things.get(thingId);
    for (const f of Object.values(t?.features || {})) {
      for (const [k, v] of Object.entries(f.properties || {})) {
        if (/batch|recipe|operator|order|shift/i.test(k) && (typeof v === "string" || typeof v === "number")) out[k] = v;
      }
    }
    return out;
  }
}
