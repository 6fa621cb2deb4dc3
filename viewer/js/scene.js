// 3D view of a production line: machines as simple parametric models, coloured by live state.
//
// It has to stay fluid with hundreds of machines on software WebGL (SwiftShader), where every
// triangle, every pixel and every draw counts. Hence:
// - machines are baked into one mesh per floor tile (about 3 x 3 tiles), each in a detailed and
//   a simple version (THREE.LOD): distant tiles draw one box per machine, off-screen tiles are
//   culled; all heat strips are one more mesh, all anomaly outlines one more;
// - light is baked into vertex colours and colours are flat per face, so shaders do almost nothing;
// - live data sits in two small float textures read by the shaders: update() only writes their
//   arrays, which are uploaded at most once per frame.
// (One InstancedMesh per machine part was measured slower: software renderers pay per instance.)
//
// Units are metres; x/z is the floor, y is up. A machine's rotation is in degrees about the
// vertical axis (counter-clockwise seen from above); its long side runs along local x and its
// front (door, fins) faces local +z.

import * as THREE from "three";
import { OrbitControls } from "three/addons/controls/OrbitControls.js";
import { PointerLockControls } from "three/addons/controls/PointerLockControls.js";
import { VRButton } from "three/addons/webxr/VRButton.js";

const FLOW = ["mixer", "proofer", "oven", "cooler", "conveyor"];
// Footprint per type: [length (x), height (y), depth (z)], for layout, outlines and picking.
const SIZE = {
  oven: [6, 2.1, 1.5], mixer: [1.8, 2.0, 1.8], conveyor: [5.1, 1.0, 0.9],
  proofer: [2, 2.5, 1.3], cooler: [2.5, 2.4, 1.5], generic: [1.5, 1.5, 1.5],
};
const MAX_ZONES = 8;          // oven zones shown; more are cut off
const STRIP = 5.4;            // heat-strip length on top of an oven
const EYE = 1.7;              // walk-mode eye height
const ANOMALY_MARGIN = 0.35;  // how far the red outline sticks out around a machine
const SELECT_MARGIN = 0.5;    // the white selection frame sits just outside it
const TEX_W = 256;            // width of the live-data textures (one texel per machine or zone)
const LOD_DISTANCE = 45;      // beyond this (plus half a tile) a tile draws its simple models

const typeOf = (t) => (SIZE[String(t).toLowerCase()] ? String(t).toLowerCase() : "generic");
// Colours are kept as final sRGB output values, so no shader has to convert them.
const srgb = (c) => new THREE.Color(c).getRGB(new THREE.Color(), THREE.SRGBColorSpace).toArray();
const STATE_RGB = { normal: srgb(0x5b93ad), warning: srgb(0xf2a516), critical: srgb(0xe0322b), offline: srgb(0x3b3f45) };
// Zone colours for 100..300 °C in 1 °C steps, blue -> yellow -> red, interpolated by hue so the
// scale passes through cyan and green rather than grey.
const HEAT_LUT = new Float32Array(201 * 3);
{
  const stops = [new THREE.Color(0x2f6bff), new THREE.Color(0xffd43b), new THREE.Color(0xff2414)], c = new THREE.Color();
  for (let i = 0; i <= 200; i++) {
    const j = i < 100 ? 0 : 1;
    HEAT_LUT.set(srgb(c.copy(stops[j]).lerpHSL(stops[j + 1], i / 100 - j)), i * 3);
  }
}
const NO_READING = srgb(0x555a60);

/**
 * Floor layout for when no layout file is given: machines in flow order (mixer -> proofer ->
 * oven -> cooler -> conveyor -> other types; by id within a type), left to right in rows that
 * wrap so the whole line stays roughly square.
 * @param {{id: string, type: string}[]} things
 * @returns {Map<string, {x: number, z: number, rotation: number}>}
 */
export function autoLayout(things) {
  const rank = (t) => (FLOW.includes(t) ? FLOW.indexOf(t) : FLOW.length), GAP = 1.5, AISLE = 3;
  const list = things.map((t) => ({ id: t.id, type: String(t.type).toLowerCase() }));
  list.sort((a, b) => rank(a.type) - rank(b.type) || a.type.localeCompare(b.type) ||
    String(a.id).localeCompare(String(b.id), undefined, { numeric: true }));
  const rowWidth = Math.max(30, Math.sqrt(list.reduce((s, t) => s + SIZE[typeOf(t.type)][0] + GAP, 0) * 5));
  const rows = [];
  let row = null;
  for (const t of list) {
    const [len, , depth] = SIZE[typeOf(t.type)];
    if (!row || (row.items.length && row.width + len > rowWidth)) rows.push(row = { items: [], width: 0, depth: 0 });
    t.x = row.width + len / 2;
    row.width += len + GAP;
    row.depth = Math.max(row.depth, depth);
    row.items.push(t);
  }
  const out = new Map(), round = (v) => Math.round(v * 100) / 100;
  const widest = Math.max(0, ...rows.map((r) => r.width - GAP));
  let z = -rows.reduce((s, r) => s + r.depth + AISLE, -AISLE) / 2;
  for (const r of rows) {
    for (const t of r.items) out.set(t.id, { x: round(t.x - widest / 2), z: round(z + r.depth / 2), rotation: 0 });
    z += r.depth + AISLE;
  }
  return out;
}

// --- parametric models -------------------------------------------------------------------
// A model is a list of [geometry, colour] in machine coordinates (standing on y = 0); colour
// null marks the body, which takes the state colour. "detail" is drawn near the camera,
// "simple" (one box) further away, where small parts would cover a pixel or two anyway.

function box(w, h, d, x, y, z) {
  const g = new THREE.BoxGeometry(w, h, d).translate(x, y, z);
  if (y - h / 2 < 0.01) g.setIndex([...g.index.array.slice(0, 18), ...g.index.array.slice(24)]); // bottom never seen
  return g;
}
function cyl(r1, r2, h, x, y, z, sides = 12, alongZ = false) {
  const g = new THREE.CylinderGeometry(r1, r2, h, sides);
  return (alongZ ? g.rotateX(Math.PI / 2) : g).translate(x, y, z);
}
const STEEL = 0x30353c, STAINLESS = 0xa9b3bc, FRAME = 0x5a6069;
const MODELS = {
  oven: () => ({ simple: [[box(6, 2, 1.5, 0, 1, 0), null]],
    detail: [[box(6, 1.7, 1.5, 0, 1.1, 0), null], [box(5.8, 0.25, 1.3, 0, 0.125, 0), STEEL],
      [box(4.4, 0.8, 0.06, -0.3, 1, 0.77), STEEL], [box(0.6, 1.2, 0.08, 2.5, 1.1, 0.78), STEEL],
      [box(STRIP + 0.2, 0.06, 0.62, 0, 1.98, 0), STEEL]] }),
  mixer: () => ({ simple: [[box(1.5, 1.55, 1.5, 0, 0.775, 0), null]],
    detail: [[cyl(0.78, 0.6, 0.85, 0, 1.13, 0.1), null], [box(1.4, 0.7, 1.4, 0, 0.35, 0), STAINLESS],
      [box(0.28, 1.95, 0.28, 0, 0.98, -0.74), STAINLESS], [box(0.22, 0.18, 0.85, 0, 1.86, -0.35), STAINLESS],
      [box(0.08, 0.5, 0.08, 0, 1.58, 0.05), STAINLESS]] }),
  conveyor: () => ({ simple: [[box(5, 0.95, 0.8, 0, 0.475, 0), null]],
    detail: [[box(5, 0.07, 0.76, 0, 0.9, 0), null], [box(5.1, 0.16, 0.05, 0, 0.9, 0.42), FRAME],
      [box(5.1, 0.16, 0.05, 0, 0.9, -0.42), FRAME], [cyl(0.07, 0.07, 0.8, -2.5, 0.9, 0, 8, true), FRAME],
      [cyl(0.07, 0.07, 0.8, 2.5, 0.9, 0, 8, true), FRAME],
      ...[-2.1, 2.1].flatMap((x) => [-0.36, 0.36].map((z) => [box(0.07, 0.84, 0.07, x, 0.42, z), FRAME]))] }),
  proofer: () => ({ simple: [[box(2, 2.4, 1.2, 0, 1.2, 0), null]],
    detail: [[box(2, 2.25, 1.2, 0, 1.275, 0), null], [box(1.9, 0.15, 1.1, 0, 0.075, 0), STEEL],
      [box(0.92, 2, 0.04, -0.48, 1.27, 0.62), STEEL], [box(0.92, 2, 0.04, 0.48, 1.27, 0.62), STEEL],
      [box(0.2, 0.5, 0.06, 0, 1.3, 0.66), STAINLESS], [box(1.2, 0.12, 0.6, 0, 2.46, 0), STEEL]] }),
  cooler: () => ({ simple: [[box(2.4, 2.05, 1.3, 0, 1.025, 0), null]],
    detail: [[box(2.4, 1.9, 1.3, 0, 1.1, 0), null], [box(2.5, 0.15, 1.4, 0, 0.075, 0), FRAME],
      [cyl(0.42, 0.42, 0.25, -0.6, 2.17, 0), STAINLESS], [cyl(0.42, 0.42, 0.25, 0.6, 2.17, 0), STAINLESS],
      ...Array.from({ length: 9 }, (_, i) => [box(0.05, 1.5, 0.2, -1 + i * 0.25, 1.1, 0.72), STAINLESS])] }),
  generic: () => ({ simple: [[box(1.5, 1.45, 1.5, 0, 0.725, 0), null]],
    detail: [[box(1.4, 1.3, 1.4, 0, 0.8, 0), null], [box(1.5, 0.15, 1.5, 0, 0.075, 0), STEEL]] }),
};
// An oven's heat strip: a top plate and a thin front band, in oven coordinates.
const HEAT_PARTS = () => [new THREE.PlaneGeometry(STRIP, 0.5).rotateX(-Math.PI / 2).translate(0, 2.05, 0),
  new THREE.PlaneGeometry(STRIP, 0.05).translate(0, 2.025, 0.25)];

// Collects transformed geometries into one indexed geometry; `values` gives, per extra
// attribute, a function (vertex index, world normal) -> numbers.
class Baker {
  constructor(extra) { Object.assign(this, { extra, pos: [], idx: [], attrs: Object.fromEntries(Object.keys(extra).map((k) => [k, []])) }); }
  add(geo, matrix, values) {
    const p = geo.attributes.position, n = geo.attributes.normal, base = this.pos.length / 3;
    const v = new THREE.Vector3(), nw = new THREE.Vector3();
    for (let i = 0; i < p.count; i++) {
      v.fromBufferAttribute(p, i).applyMatrix4(matrix);
      this.pos.push(v.x, v.y, v.z);
      nw.fromBufferAttribute(n, i).transformDirection(matrix);
      for (const k in this.extra) this.attrs[k].push(...values[k](i, nw));
    }
    for (const i of geo.index.array) this.idx.push(base + i);
  }
  build() {
    const g = new THREE.BufferGeometry().setAttribute("position", new THREE.Float32BufferAttribute(this.pos, 3));
    for (const k in this.extra) g.setAttribute(k, new THREE.Float32BufferAttribute(this.attrs[k], this.extra[k]));
    return g.setIndex(this.idx);
  }
}

// Shader pieces. `flat` varyings: one colour per face, nothing for the rasteriser to interpolate.
const FETCH = `vec4 fetchSlot(sampler2D t, float slot) { int s = int(slot + 0.5); return texelFetch(t, ivec2(s % ${TEX_W}, s / ${TEX_W}), 0); }`;
const PROJECT = "gl_Position = projectionMatrix * modelViewMatrix * vec4(position, 1.0);";
const plainMaterial = (hex, options = {}) => new THREE.ShaderMaterial({
  uniforms: { color: { value: new THREE.Vector3(...srgb(hex)) }, opacity: { value: 1 } }, vertexShader: `void main() { ${PROJECT} }`,
  fragmentShader: "uniform vec3 color; uniform float opacity; void main() { gl_FragColor = vec4(color, opacity); }", ...options,
});
function dataTexture(count) {
  const h = Math.max(1, Math.ceil(count / TEX_W));
  const t = new THREE.DataTexture(new Float32Array(TEX_W * h * 4), TEX_W, h, THREE.RGBAFormat, THREE.FloatType);
  t.needsUpdate = true;
  return t;
}

// Scratch objects, so the hot paths (update, frame loop, picking) allocate nothing.
const _v = new THREE.Vector3(), _ndc = new THREE.Vector2(), _ray = new THREE.Ray(), _box = new THREE.Box3();

export class LineScene {
  /**
   * @param {HTMLElement} container  must have a size; the canvas fills it and follows its resizes
   * @param {{onPick?: (id: string|null) => void}} options  onPick gets the clicked machine (or null)
   */
  constructor(container, { onPick, continuous } = {}) {
    Object.assign(this, { container, onPick: onPick || null, continuous: !!continuous, _lastDraw: 0, _recs: new Map(), _list: [], _meshes: [], _selected: null,
      _mode: "orbit", _keys: new Set(), _frames: 0, _rendered: 0, _fps: 0, _fpsFrames: 0, _grid: null, _wake: true });
    this._fpsStart = this._last = performance.now();
    const r = this.renderer = new THREE.WebGLRenderer({ antialias: false, powerPreference: "high-performance" });
    r.setPixelRatio(Math.min(window.devicePixelRatio || 1, 1.5));
    r.domElement.style.display = "block";
    container.appendChild(r.domElement);

    const scene = this.scene = new THREE.Scene();
    scene.background = new THREE.Color(0x1d252e); // the floor too: a filled plane would cost a full-screen pass
    this.camera = new THREE.PerspectiveCamera(50, 1, 0.1, 1000);
    // Soft light (sky/ground fill and one sun), baked into the machines by setMachines().
    this.hemiLight = new THREE.HemisphereLight(0xe4edf5, 0x3a4048, 1.9);
    this.sunLight = new THREE.DirectionalLight(0xffffff, 1.6);
    this.sunLight.position.set(20, 40, 30);
    scene.add(this.hemiLight, this.sunLight);

    const u = this._uniforms = { stateTex: { value: null }, heatTex: { value: null } };
    this._mats = {
      // Machines: baked colour, times the state colour for body vertices (slot >= 0).
      solid: new THREE.ShaderMaterial({ uniforms: { stateTex: u.stateTex },
        vertexShader: `attribute vec3 color; attribute float slot; uniform sampler2D stateTex; flat varying vec3 vColor; ${FETCH}
          void main() { vColor = slot >= 0.0 ? fetchSlot(stateTex, slot).rgb * color : color; ${PROJECT} }`,
        fragmentShader: "flat varying vec3 vColor; void main() { gl_FragColor = vec4(vColor, 1.0); }" }),
      // Heat strips: each pixel picks its zone from the oven's zone count (alpha of its first
      // texel), with a dark seam between zones; ovens without zone data are not drawn.
      heat: new THREE.ShaderMaterial({ uniforms: { heatTex: u.heatTex },
        vertexShader: `attribute vec2 heat; uniform sampler2D heatTex; varying vec2 vHeat; flat varying float vN; ${FETCH}
          void main() { vN = fetchSlot(heatTex, heat.y).a; vHeat = heat; ${PROJECT} if (vN < 0.5) gl_Position = vec4(0, 0, 2, 1); }`,
        fragmentShader: `uniform sampler2D heatTex; varying vec2 vHeat; flat varying float vN; ${FETCH}
          void main() {
            float x = vHeat.x * vN, k = min(floor(x), vN - 1.0), f = x - k;
            vec3 c = fetchSlot(heatTex, vHeat.y + k).rgb;
            gl_FragColor = vec4(f < 0.03 || f > 0.97 ? c * 0.3 : c, 1.0);
          }` }),
      // Anomaly outlines: inside-out boxes around the anomalous machines, pulsing.
      outline: plainMaterial(0xff2a2a, { side: THREE.BackSide, transparent: true, depthWrite: false }),
      select: plainMaterial(0xffffff, { side: THREE.DoubleSide }),
    };
    this._hullGeo = new THREE.BoxGeometry(1, 1, 1).translate(0, 0.5, 0); // unit box on the floor
    this._sel = new THREE.Group(); // the selection: white box edges and a frame on the floor
    this._sel.matrixAutoUpdate = false;
    scene.add(this._sel);

    const canvas = r.domElement;
    this._orbit = new OrbitControls(this.camera, canvas);
    this._orbit.enableDamping = true;
    this._orbit.maxPolarAngle = Math.PI / 2 - 0.05; // stay above the floor
    this._walkCtl = new PointerLockControls(this.camera, canvas);
    this._walkCtl.enabled = false;
    this._walkCtl.addEventListener("unlock", () => this.setCameraMode("orbit")); // Escape
    this._raycaster = new THREE.Raycaster();
    this._down = { x: 0, y: 0 };
    this._on = {
      pointerdown: (e) => { this._down.x = e.clientX; this._down.y = e.clientY; },
      pointerup: (e) => this._click(e),
      keydown: (e) => {
        if (this._mode !== "walk" || /^(INPUT|TEXTAREA|SELECT)$/.test(e.target.tagName)) return;
        if (e.code === "Escape") this.setCameraMode("orbit"); else this._keys.add(e.code);
        if (e.code.startsWith("Arrow")) e.preventDefault(); // don't scroll the page while walking
      },
      keyup: (e) => this._keys.delete(e.code),
    };
    for (const [type, fn] of Object.entries(this._on)) (type.startsWith("key") ? window : canvas).addEventListener(type, fn);
    this._resizeObs = new ResizeObserver(() => this._resize());
    this._resizeObs.observe(container);
    this._resize();

    if (navigator.xr) {
      r.xr.enabled = true;
      // Offer "Enter VR" only where a headset can be used, rather than a "not supported" label.
      navigator.xr.isSessionSupported("immersive-vr").then((ok) => {
        if (!ok || this._disposed) return;
        if (getComputedStyle(container).position === "static") container.style.position = "relative"; // button is absolute
        this._vrButton = container.appendChild(VRButton.createButton(r));
      }, () => {});
    }
    this.setMachines([]);
    r.setAnimationLoop(() => this._frame()); // not requestAnimationFrame: it must also run in WebXR
  }

  /** Replace all machines: [{id, type, name, x, z, rotation}] (rotation in degrees). */
  setMachines(machines) {
    this.setCameraMode("orbit"); // the view is refitted to the new machines
    for (const obj of this._meshes) { obj.traverse((o) => o.geometry?.dispose()); this.scene.remove(obj); }
    this._stateTex?.dispose(); this._heatTex?.dispose();
    this._recs.clear(); this._list = []; this._meshes = []; this._outline = null;
    const box3 = new THREE.Box3();
    let ovens = 0;
    machines.forEach((m, slot) => {
      const type = typeOf(m.type), [l, h, d] = SIZE[type];
      const base = new THREE.Matrix4().makeRotationY(THREE.MathUtils.degToRad(+m.rotation || 0)).setPosition(+m.x || 0, 0, +m.z || 0);
      const rec = { id: m.id, type, slot, base, inv: base.clone().invert(), state: null, anomaly: false, heat: type === "oven" ? MAX_ZONES * ovens++ : -1 };
      this._recs.set(m.id, rec);
      this._list.push(rec);
      for (let i = 0; i < 8; i++) box3.expandByPoint(_v.set(i & 1 ? l / 2 : -l / 2, i & 2 ? h : 0, i & 4 ? d / 2 : -d / 2).applyMatrix4(base));
    });
    if (box3.isEmpty()) box3.set(new THREE.Vector3(-10, 0, -10), new THREE.Vector3(10, 0, 10));

    // Lambert-style light per vertex (faces are flat, so the same as per pixel), gamma-encoded
    // so that multiplying it by an sRGB colour gives the output colour.
    const hemi = this.hemiLight, sun = this.sunLight, sunDir = sun.position.clone().sub(sun.target.position).normalize();
    const sky = hemi.color.clone().multiplyScalar(hemi.intensity / Math.PI), c = new THREE.Color(), c2 = new THREE.Color();
    const ground = hemi.groundColor.clone().multiplyScalar(hemi.intensity / Math.PI);
    const sunC = sun.color.clone().multiplyScalar(sun.intensity / Math.PI);
    const shade = (n, tint) => {
      c.copy(ground).lerp(sky, 0.5 * n.y + 0.5).add(c2.copy(sunC).multiplyScalar(Math.max(n.dot(sunDir), 0)));
      return [c.r ** (1 / 2.2) * tint[0], c.g ** (1 / 2.2) * tint[1], c.b ** (1 / 2.2) * tint[2]];
    };
    // Bake into square tiles, machines nearest the default camera first (hidden pixels are
    // then rejected before shading).
    const tile = Math.max(20, Math.ceil(Math.max(box3.max.x - box3.min.x, box3.max.z - box3.min.z) / 3));
    const tiles = new Map(), models = {}, heat = new Baker({ heat: 2 }), heatParts = HEAT_PARTS();
    this._hullSrc = new Float32Array(this._list.length * 72);
    for (const rec of [...this._list].sort((a, b) => b.base.elements[14] - a.base.elements[14])) {
      const e = rec.base.elements, key = [Math.floor((e[12] - box3.min.x) / tile), Math.floor((e[14] - box3.min.z) / tile)];
      if (!tiles.has(String(key))) {
        tiles.set(String(key), { detail: new Baker({ color: 3, slot: 1 }), simple: new Baker({ color: 3, slot: 1 }),
          centre: new THREE.Vector3(box3.min.x + (key[0] + 0.5) * tile, 0, box3.min.z + (key[1] + 0.5) * tile) });
      }
      const t = tiles.get(String(key)), local = new THREE.Matrix4().makeTranslation(-t.centre.x, 0, -t.centre.z).multiply(rec.base);
      const model = (models[rec.type] ||= MODELS[rec.type]());
      for (const level of ["detail", "simple"]) {
        for (const [geo, hex] of model[level]) {
          const tint = hex === null ? [1, 1, 1] : srgb(hex), slot = [hex === null ? rec.slot : -1];
          t[level].add(geo, local, { color: (_, n) => shade(n, tint), slot: () => slot });
        }
      }
      // Outline hull corners, copied into the outline mesh while the machine is anomalous.
      const hull = this._hull(rec, ANOMALY_MARGIN, 0.02, new THREE.Matrix4());
      for (let k = 0; k < 24; k++) _v.fromBufferAttribute(this._hullGeo.attributes.position, k).applyMatrix4(hull).toArray(this._hullSrc, rec.slot * 72 + k * 3);
      if (rec.heat >= 0) for (const g of heatParts) heat.add(g, rec.base, { heat: (k) => [g.attributes.position.getX(k) / STRIP + 0.5, rec.heat] });
    }
    for (const model of Object.values(models)) for (const [geo] of [...model.detail, ...model.simple]) geo.dispose();
    for (const g of heatParts) g.dispose();
    for (const t of tiles.values()) {
      const lod = this._add(new THREE.LOD());
      lod.position.copy(t.centre);
      lod.addLevel(new THREE.Mesh(t.detail.build(), this._mats.solid), 0);
      lod.addLevel(new THREE.Mesh(t.simple.build(), this._mats.solid), LOD_DISTANCE + tile / 2, 0.1);
    }
    this._stateTex = this._uniforms.stateTex.value = dataTexture(machines.length);
    this._heatTex = this._uniforms.heatTex.value = dataTexture(ovens * MAX_ZONES);
    for (const rec of this._list) this._writeState(rec, "normal");
    if (ovens) this._add(new THREE.Mesh(heat.build(), this._mats.heat));
    if (machines.length) {
      const g = new THREE.BufferGeometry(), idx = new Uint32Array(machines.length * 36);
      for (let i = 0; i < idx.length; i++) idx[i] = this._hullGeo.index.array[i % 36] + 24 * Math.floor(i / 36);
      g.setAttribute("position", new THREE.BufferAttribute(new Float32Array(this._hullSrc.length), 3).setUsage(THREE.DynamicDrawUsage));
      this._outline = this._add(new THREE.Mesh(g.setIndex(new THREE.BufferAttribute(idx, 1)), this._mats.outline));
      this._outline.frustumCulled = false; // its contents change
      this._outline.visible = false;
    }
    this._fitView(box3);
    this.select(this._recs.has(this._selected) ? this._selected : null);
  }

  /**
   * Push live data for one machine; fields left undefined stay as they are. Cheap by design
   * (called thousands of times per second): it only writes into typed arrays.
   */
  update(id, { state, anomaly, zones } = {}) {
    this._wake = true;
    const rec = this._recs.get(id);
    if (!rec) return;
    if (state !== undefined && state !== rec.state) this._writeState(rec, state);
    if (anomaly !== undefined && !!anomaly !== rec.anomaly) { rec.anomaly = !!anomaly; this._outlineDirty = true; }
    if (zones !== undefined && rec.heat >= 0) {
      const a = this._heatTex.image.data, n = zones ? Math.min(zones.length, MAX_ZONES) : 0;
      a[rec.heat * 4 + 3] = n; // zone count, read by the shader
      for (let k = 0; k < n; k++) {
        const o = (rec.heat + k) * 4, ok = Number.isFinite(zones[k]), src = ok ? HEAT_LUT : NO_READING;
        const i = ok ? Math.round(Math.min(Math.max(zones[k] - 100, 0), 200)) * 3 : 0;
        a[o] = src[i]; a[o + 1] = src[i + 1]; a[o + 2] = src[i + 2];
      }
      this._heatDirty = true;
    }
  }

  /** "orbit" (default) or "walk" (first person: mouse look, WASD/arrows, Shift to run, Escape to leave). */
  setCameraMode(mode) {
    if (mode === this._mode || (mode !== "walk" && mode !== "orbit")) return;
    this._wake = true;
    const cam = this.camera, orbit = this._orbit;
    this._mode = mode;
    this._keys.clear();
    if (mode === "walk") {
      this._saved = { pos: cam.position.clone(), target: orbit.target.clone(), near: cam.near };
      // Start at the edge of the line, on the side the orbit camera was, facing its centre.
      _v.subVectors(cam.position, orbit.target).setY(0);
      if (_v.lengthSq() < 1e-6) _v.set(0, 0, 1);
      cam.position.copy(_v.normalize().multiplyScalar(this._radius + 2).add(orbit.target).setY(EYE));
      cam.lookAt(orbit.target.x, EYE, orbit.target.z);
      cam.near = 0.1;
      this._lock();
    } else {
      if (this._walkCtl.isLocked) this._walkCtl.unlock();
      cam.position.copy(this._saved.pos);
      cam.near = this._saved.near;
      orbit.target.copy(this._saved.target);
    }
    orbit.enabled = mode === "orbit";
    this._walkCtl.enabled = mode === "walk";
    cam.updateProjectionMatrix();
    if (orbit.enabled) orbit.update(); // (it would move the camera back while walking)
  }

  /** Highlight one machine with a white frame, or clear the highlight with null. */
  select(id) {
    const rec = id == null ? undefined : this._recs.get(id);
    this._selected = rec ? id : null;
    this._wake = true;
    for (const o of [...this._sel.children]) { o.geometry.dispose(); this._sel.remove(o); }
    if (!rec) return;
    const [l, h, d] = SIZE[rec.type], m = SELECT_MARGIN, w = l / 2 + m, e = d / 2 + m, b = 0.25;
    const hull = new THREE.BoxGeometry(2 * w, h + m, 2 * e).translate(0, (h + m) / 2, 0);
    const frame = new THREE.Shape().moveTo(-w, -e).lineTo(w, -e).lineTo(w, e).lineTo(-w, e);
    frame.holes.push(new THREE.Path().moveTo(-w + b, -e + b).lineTo(-w + b, e - b).lineTo(w - b, e - b).lineTo(w - b, -e + b));
    this._sel.add(new THREE.LineSegments(new THREE.EdgesGeometry(hull), this._mats.select),
      new THREE.Mesh(new THREE.ShapeGeometry(frame).rotateX(-Math.PI / 2).translate(0, 0.03, 0), this._mats.select));
    hull.dispose();
    this._sel.matrix.copy(rec.base);
    this._sel.matrixWorldNeedsUpdate = true;
  }

  /** {fps (display frames the loop kept up with, over the last ~1 s), frames (in total), rendered
   *  (frames that drew: a still view with nothing pulsing is not redrawn), drawCalls (last draw), machines}. */
  stats() {
    return { fps: Math.round(this._fps * 10) / 10, frames: this._frames, rendered: this._rendered,
      drawCalls: this.renderer.info.render.calls, machines: this._recs.size };
  }

  dispose() {
    const r = this.renderer, canvas = r.domElement;
    this._disposed = true;
    r.setAnimationLoop(null);
    this._resizeObs.disconnect();
    for (const [type, fn] of Object.entries(this._on)) (type.startsWith("key") ? window : canvas).removeEventListener(type, fn);
    if (this._walkCtl.isLocked) this._walkCtl.unlock();
    this._walkCtl.dispose();
    this._orbit.dispose();
    this.select(null);
    this.setMachines([]);
    for (const obj of [this._stateTex, this._heatTex, this._hullGeo, this._grid.geometry, this._grid.material, ...Object.values(this._mats)]) obj.dispose();
    r.dispose();
    canvas.remove();
    this._vrButton?.remove();
  }

  // --- internals ---------------------------------------------------------------------------

  _add(obj) {
    this.scene.add(obj);
    this._meshes.push(obj);
    return obj;
  }

  _writeState(rec, state) {
    rec.state = state;
    const c = STATE_RGB[state] || STATE_RGB.normal, a = this._stateTex.image.data, o = rec.slot * 4;
    a[o] = c[0]; a[o + 1] = c[1]; a[o + 2] = c[2];
    this._stateDirty = true;
  }

  // The box enclosing a machine plus a margin, lifted a little so that, seen from inside (the
  // outline is drawn inside-out), its floor face shows as a frame around the machine.
  _hull(rec, margin, lift, out) {
    const [l, h, d] = SIZE[rec.type];
    return out.makeScale(l + 2 * margin, h + margin, d + 2 * margin).setPosition(0, lift, 0).premultiply(rec.base);
  }

  _fitView(box3) {
    const c = box3.getCenter(new THREE.Vector3()).setY(0), sz = box3.getSize(new THREE.Vector3()), size = Math.max(sz.x, sz.z) + 10;
    this._radius = Math.hypot(sz.x, sz.z) / 2;
    // Floor grid. Software renderers pay per pixel of line, so it only covers the machines'
    // footprint plus a margin, with at most 16 lines each way for big lines (32 for small ones).
    const most = this._list.length > 150 ? 16 : 32, cell = [1, 2, 5, 10, 20, 50].find((s) => size / s <= most) || 100;
    const half = Math.ceil(size / cell / 2) * cell, pos = [];
    for (let a = -half; a <= half; a += cell) pos.push(c.x + a, 0, c.z - half, c.x + a, 0, c.z + half, c.x - half, 0, c.z + a, c.x + half, 0, c.z + a);
    if (this._grid) { this.scene.remove(this._grid); this._grid.geometry.dispose(); this._grid.material.dispose(); }
    this._gridSrc = new Float32Array(pos);
    this._gridCam = new THREE.Matrix4().makeScale(0, 0, 0); // no camera yet: clip on the next frame
    const grid = new THREE.BufferGeometry().setAttribute("position", new THREE.Float32BufferAttribute(pos, 3).setUsage(THREE.DynamicDrawUsage));
    this._grid = new THREE.LineSegments(grid, plainMaterial(0x3a4654));
    this._grid.frustumCulled = false;
    this.scene.add(this._grid);
    // Look down at ~37° and find by bisection the closest distance that keeps every corner of
    // the machines' bounding box inside the view.
    const cam = this.camera, dir = new THREE.Vector3(0, 0.6, 0.8), p = new THREE.Vector3();
    cam.near = 0.1; cam.far = 1e5; cam.updateProjectionMatrix();
    let lo = 1, hi = 1e4;
    for (let i = 0; i < 40; i++) {
      const dist = (lo + hi) / 2;
      cam.position.copy(c).addScaledVector(dir, dist);
      cam.lookAt(c);
      cam.updateMatrixWorld();
      let fits = true;
      for (let k = 0; k < 8 && fits; k++) {
        p.set(k & 1 ? box3.max.x : box3.min.x, k & 2 ? box3.max.y : box3.min.y, k & 4 ? box3.max.z : box3.min.z).applyMatrix4(cam.matrixWorldInverse);
        fits = p.z < -cam.near && Math.abs(p.applyMatrix4(cam.projectionMatrix).x) <= 0.9 && Math.abs(p.y) <= 0.9;
      }
      if (fits) hi = dist; else lo = dist;
    }
    cam.position.copy(c).addScaledVector(dir, hi);
    cam.near = Math.max(0.1, hi / 300);
    cam.far = hi * 4 + 200;
    cam.updateProjectionMatrix();
    this._orbit.target.copy(c);
    this._orbit.update();
  }

  // Software renderers may drop a whole line that crosses the camera's near plane (any floor
  // line passing under the camera), so grid lines are first cut to the part in front of it.
  _clipGrid() {
    const src = this._gridSrc, attr = this._grid.geometry.attributes.position, dst = attr.array, cam = this.camera;
    cam.updateMatrixWorld();
    if (this._gridCam.equals(cam.matrixWorld) && this._gridNear === cam.near) return; // camera has not moved
    this._gridCam.copy(cam.matrixWorld);
    this._gridNear = cam.near;
    const f = cam.getWorldDirection(_v), p = cam.position, min = this.renderer.xr.isPresenting ? -Infinity : cam.near * 2;
    for (let i = 0; i < src.length; i += 6) {
      const da = (src[i] - p.x) * f.x + (src[i + 1] - p.y) * f.y + (src[i + 2] - p.z) * f.z - min;
      const db = (src[i + 3] - p.x) * f.x + (src[i + 4] - p.y) * f.y + (src[i + 5] - p.z) * f.z - min;
      const ta = da < 0 ? da / (da - db) : 0, tb = db < 0 ? db / (db - da) : 0; // share cut off each end
      for (let k = 0; k < 3; k++) {
        const a = src[i + k], b = src[i + 3 + k], gone = da < 0 && db < 0;
        dst[i + k] = gone ? a : a + (b - a) * ta;
        dst[i + 3 + k] = gone ? a : b + (a - b) * tb;
      }
    }
    attr.needsUpdate = true;
  }

  _resize() {
    const w = this.container.clientWidth, h = this.container.clientHeight;
    if (!w || !h) return;
    this.renderer.setSize(w, h);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
    this._wake = true;
  }

  _lock() { // needs a user gesture; when refused, a click on the view retries
    this.renderer.domElement.requestPointerLock()?.catch?.(() => {});
  }

  _click(e) {
    if (Math.abs(e.clientX - this._down.x) + Math.abs(e.clientY - this._down.y) > 5) return; // a drag
    if (this._mode === "walk") {
      if (!this._walkCtl.isLocked) return this._lock();
      _ndc.set(0, 0); // while walking, pick what is under the crosshair
    } else {
      const rect = this.renderer.domElement.getBoundingClientRect();
      _ndc.set(((e.clientX - rect.left) / rect.width) * 2 - 1, -((e.clientY - rect.top) / rect.height) * 2 + 1);
    }
    // Pick against each machine's footprint box, in the machine's own frame.
    this._raycaster.setFromCamera(_ndc, this.camera);
    let best = null, bestDist = Infinity;
    for (const rec of this._list) {
      const [l, h, d] = SIZE[rec.type];
      _box.min.set(-l / 2, 0, -d / 2); _box.max.set(l / 2, h, d / 2);
      if (!_ray.copy(this._raycaster.ray).applyMatrix4(rec.inv).intersectBox(_box, _v)) continue;
      const dist = _v.distanceTo(_ray.origin);
      if (dist < bestDist) { bestDist = dist; best = rec.id; }
    }
    this.onPick?.(best);
  }

  _frame() {
    const now = performance.now(), dt = Math.min((now - this._last) / 1000, 0.1);
    this._last = now;
    if (this._mode === "walk") {
      const k = this._keys, step = (k.has("ShiftLeft") || k.has("ShiftRight") ? 10 : 4) * dt;
      const fwd = (k.has("KeyW") || k.has("ArrowUp")) - (k.has("KeyS") || k.has("ArrowDown"));
      const side = (k.has("KeyD") || k.has("ArrowRight")) - (k.has("KeyA") || k.has("ArrowLeft"));
      if (fwd) this._walkCtl.moveForward(fwd * step);
      if (side) this._walkCtl.moveRight(side * step);
      this.camera.position.y = EYE;
      if (this._walkCtl.isLocked) this._wake = true; // the mouse may turn the head at any time
    } else if (this._orbit.update()) this._wake = true;
    // Upload live data at most once per frame, however many updates arrived.
    if (this._stateDirty) { this._stateTex.needsUpdate = true; this._stateDirty = false; }
    if (this._heatDirty) { this._heatTex.needsUpdate = true; this._heatDirty = false; }
    if (this._outline && this._outlineDirty) { // anomalous machines' hulls to the front of the outline mesh
      const pos = this._outline.geometry.attributes.position, dst = pos.array, src = this._hullSrc;
      let k = 0;
      for (const rec of this._list) {
        if (!rec.anomaly) continue;
        for (let i = 0, o = rec.slot * 72; i < 72; i++) dst[k * 72 + i] = src[o + i];
        k++;
      }
      this._outline.geometry.setDrawRange(0, k * 36);
      pos.clearUpdateRanges();
      pos.addUpdateRange(0, k * 72);
      pos.needsUpdate = true;
      this._outline.visible = k > 0;
      this._outlineDirty = false;
    }
    this._frames++; this._fpsFrames++;
    // Draw when something changed; a pulsing outline alone redraws at 20 Hz, and a still line on a
    // control-room screen costs no CPU. `continuous` (benchmarks) draws every frame.
    if (this._wake || this.continuous || this.renderer.xr.isPresenting || (this._outline?.visible && now - this._lastDraw >= 50)) {
      this._wake = false;
      this._lastDraw = now;
      this._mats.outline.uniforms.opacity.value = 0.6 + 0.3 * Math.sin(now * 0.008); // pulse
      this._clipGrid();
      this.renderer.render(this.scene, this.camera);
      this._rendered++;
    }
    if (now - this._fpsStart >= 1000) {
      this._fps = (this._fpsFrames * 1000) / (now - this._fpsStart);
      this._fpsFrames = 0; this._fpsStart = now;
    }
  }
}
