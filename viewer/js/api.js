// Talking to the server the page came from: REST with the signed-in API key, and one live
// WebSocket with reconnect. The same page works against the aggregator (all sites) and a gateway
// (its own line); `detectMode` finds out which, and `Live` turns both servers' events into one shape.

const KEY = "egiz.apiKey";

export class AuthError extends Error {}

export const auth = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
};

async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  if (auth.key) headers.Authorization = `Bearer ${auth.key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (r.status === 401) throw new AuthError("this server needs an API key");
  const text = await r.text();
  const doc = text && (r.headers.get("Content-Type") || "").includes("json") ? JSON.parse(text) : text;
  if (!r.ok) {
    const err = new Error((doc && doc.detail) || `HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return doc;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body ?? {}),
  put: (path, body) => request("PUT", path, body ?? {}),
};

/** "aggregator" or "gateway" (with its site and line), and whether a key is needed. */
export async function detectMode() {
  try {
    await api.get("/api/v1/sites");
    return { kind: "aggregator" };
  } catch (e) {
    if (e instanceof AuthError) throw e;
    if (e.status !== 404) throw e;
  }
  const here = await api.get("/api/v1/layout");  // a gateway says which line it serves
  return { kind: "gateway", site: here.site, line: here.line };
}

export async function allThings(query) {
  const out = [];
  for (let offset = 0; ; ) {
    const page = await api.get(`/api/v1/things?limit=1000&offset=${offset}${query ? "&" + query : ""}`);
    out.push(...page.items);
    if (page.nextOffset == null) return out;
    offset = page.nextOffset;
  }
}

/** A gateway anomaly event or an aggregator anomaly document -> one shape. */
export function normaliseAnomaly(a) {
  return {
    id: a.id ?? a.anomalyId, thingId: a.thingId, state: a.state, severity: a.severity, score: a.score,
    explanation: a.explanation, topFeatures: a.topFeatures || [], anomalyType: a.anomalyType,
    openedAt: a.openedAt, acknowledgedAt: a.acknowledgedAt, resolvedAt: a.resolvedAt, pending: a.pending || [],
    site: a.site, line: a.line,
  };
}

/**
 * The live connection. `onEvent` gets {kind: "sites"|"things"|"state"|"anomaly", ...}; `onState` gets
 * "connecting" | "live" | "reconnecting". Reconnects with backoff (0.5 s doubling to 10 s) and, on
 * every (re)connect, asks for a fresh snapshot so nothing missed while away stays missing.
 */
export class Live {
  constructor(mode, { onEvent, onState }) {
    this.mode = mode;
    this.onEvent = onEvent;
    this.onState = onState;
    this.lines = new Set();
    this.delay = 500;
    this.closed = false;
    this.delays = [];  // ms from the server sending an event to the page applying it (aggregator events)
    this.connect();
  }

  follow(lines) {  // aggregator: the lines whose Thing documents to stream
    this.lines = new Set(lines);
    this.sendSubscribe();
  }

  sendSubscribe() {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    if (this.mode.kind === "gateway") this.ws.send(JSON.stringify({ action: "subscribe", snapshot: true }));
    else if (this.lines.size) this.ws.send(JSON.stringify({ action: "subscribe", lines: [...this.lines] }));
  }

  connect() {
    const url = new URL("/api/v1/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (auth.key) url.searchParams.set("access_token", auth.key);
    this.onState(this.everOpen ? "reconnecting" : "connecting");
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      this.everOpen = true;
      this.delay = 500;
      this.onState("live");
      this.sendSubscribe();
      this.onEvent({ kind: "reconnected" });
    };
    ws.onmessage = (m) => this.dispatch(JSON.parse(m.data));
    ws.onclose = () => {
      if (this.closed) return;
      this.onState("reconnecting");
      setTimeout(() => this.connect(), this.delay);
      this.delay = Math.min(this.delay * 2, 10000);
    };
  }

  dispatch(e) {
    switch (e.event) {
      case "SiteSummaries": return this.onEvent({ kind: "sites", sites: e.sites });
      case "Things":
        this.onEvent({ kind: "things", things: e.things });
        break;
      case "Anomaly":
        this.onEvent({ kind: "anomaly", anomaly: normaliseAnomaly(e.anomaly) });
        break;
      case "Snapshot": return this.onEvent({ kind: "things", things: [e.thing] });
      case "ThingCreated": case "ThingUpdated": return this.onEvent({ kind: "things", things: [e.thing] });
      case "StateChanged":
        return this.onEvent({ kind: "state", thingId: e.thingId, feature: e.feature, properties: e.properties });
      case "AnomalyDetected": case "AnomalyUpdated": case "AnomalyAcknowledged": case "AnomalyResolved":
        return this.onEvent({ kind: "anomaly", anomaly: normaliseAnomaly(e) });
      default: return undefined;
    }
    if (e.sentAt) {
      this.delays.push(Date.now() - e.sentAt);
      if (this.delays.length > 1000) this.delays.shift();
    }
  }

  close() {
    this.closed = true;
    if (this.ws) this.ws.close();
  }
}
