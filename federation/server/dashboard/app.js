// The Isthmus dashboard: polls /ui/api/state every second and redraws (plain DOM and SVG).
//
// The state is the federation's /status plus the gateways' traffic reports (ui.py says what is
// in it). Nothing is kept between polls but the selected service: every poll redraws all.
// Elements carry data-* attributes (data-cluster, data-service, data-edge, data-rate) so a test
// (tests/integration/test_dashboard.py) can read what is drawn without parsing pixels.
"use strict";

const POLL_MS = 1000;
const SVG = "http://www.w3.org/2000/svg";
let picked = "";  // the service the map shows ("" = all)
// one gateway's view: #cluster=NAME shows only the traffic that gateway routes (click a node)
const focus = () => new URLSearchParams(location.hash.slice(1)).get("cluster") || "";

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function age(s) {
  if (s === null || s === undefined) return "–";
  return s < 60 ? `${s.toFixed(1)}s` : `${Math.round(s / 60)}m`;
}

// share of healthy endpoints of `svc` in `cluster`: 1, partly, 0, or null (exports none)
function health(st, svc, cluster) {
  const eps = (st.services[svc] || {})[cluster];
  if (!eps || !eps.length) return null;
  return eps.filter((e) => e.healthy).length / eps.length;
}

function colour(h, live) {
  if (live === false) return "var(--off)";
  if (h === null) return "var(--off)";
  return h >= 1 ? "var(--ok)" : h > 0 ? "var(--warn)" : "var(--bad)";
}

function localities(st) {
  const regions = {};
  for (const [name, c] of Object.entries(st.clusters)) {
    ((regions[c.region] ||= {})[c.zone] ||= []).push(name);
  }
  return regions;
}

function drawClusters(st) {
  const root = document.getElementById("clusters");
  root.replaceChildren();
  const regions = localities(st);
  for (const region of Object.keys(regions).sort()) {
    const box = el("div", { class: "region", "data-region": region }, el("h3", {}, region));
    for (const zone of Object.keys(regions[region]).sort()) {
      const row = el("div", { class: "zone" }, el("div", { class: "zname" }, `zone ${zone}`));
      for (const name of regions[region][zone].sort()) {
        const c = st.clusters[name];
        const tiers = (st.tiers[name] || []).map((t) =>
          `${t.service} → ${t.active || "none"}${t.panic ? " (panic)" : ""}`);
        row.append(el("div", { class: `cluster ${c.live ? "live" : "down"}`, "data-cluster": name },
          el("b", {}, name), " ",
          el("span", { class: `pill ${c.live ? "ok" : "bad"}` }, c.live ? "lease live" : "no lease"),
          el("div", { class: "kv" }, `lease renewed ${age(c.lease_age_seconds)} ago · report ${age(c.report_age_seconds)} ago`),
          el("div", { class: "kv" }, `bundle seq ${c.bundle_sequence ?? "–"} · ${c.tunnel ? "tunnel" : "mTLS"} · admin ${c.admin || "–"}`),
          ...tiers.map((t) => el("div", { class: "kv" }, t))));
      }
      box.append(row);
    }
    root.append(box);
  }
}

function drawServices(st) {
  const t = document.getElementById("services");
  const names = Object.keys(st.clusters).sort();
  t.tHead.replaceChildren(el("tr", {}, el("th", {}, "service"), ...names.map((n) => el("th", {}, n))));
  t.tBodies[0].replaceChildren(...Object.keys(st.services).sort().map((svc) =>
    el("tr", { "data-service": svc }, el("td", {}, svc), ...names.map((n) => {
      const eps = st.services[svc][n];
      if (!eps) return el("td", { class: "muted" }, "–");
      const ok = eps.filter((e) => e.healthy).length;
      const h = eps.length ? ok / eps.length : 0;
      const cls = !st.clusters[n].live ? "off" : h >= 1 ? "ok" : h > 0 ? "warn" : "bad";
      return el("td", { "data-cluster": n }, el("span", { class: `pill ${cls}` }, `${ok}/${eps.length} healthy`));
    }))));
}

function drawPicker(st) {
  const sel = document.getElementById("service-pick");
  const names = [...new Set([...Object.keys(st.services), ...st.flows.map((f) => f.service)])].sort();
  const want = ["", ...names];
  if ([...sel.options].map((o) => o.value).join() !== want.join()) {
    sel.replaceChildren(...want.map((n) => el("option", { value: n }, n || "all services")));
    sel.value = picked;
  }
}

function drawMap(st) {
  const map = document.getElementById("map");
  map.replaceChildren();
  const W = 960, H = 420;
  const regions = localities(st);
  const order = Object.keys(regions).sort();
  const pos = {};
  order.forEach((region, i) => {
    const x = (i + 0.5) * (W / Math.max(1, order.length));
    const names = Object.keys(regions[region]).sort().flatMap((z) => regions[region][z].sort());
    map.append(svg("text", { x, y: 18, "text-anchor": "middle", class: "region-label", fill: "#667085", "font-size": 13 }, region));
    const top = 100 + (i % 2) * 80;  // alternate columns, so a curve passes between nodes
    names.forEach((n, j) => { pos[n] = [x, top + j * ((H - 40 - top) / Math.max(1, names.length - 1))]; });
  });
  // edges: served connections per second, source -> destination
  const edges = {};
  const out = {};
  for (const f of st.flows) {
    if (f.result !== "served" || (picked && f.service !== picked)) continue;
    if (focus() && f.source !== focus()) continue;
    const k = `${f.source}>${f.destination}`;
    edges[k] = (edges[k] || 0) + f.per_second;
    out[f.source] = (out[f.source] || 0) + f.per_second;
  }
  const svcs = picked ? [picked] : Object.keys(st.services);
  const hOf = (n) => {
    const hs = svcs.map((s) => health(st, s, n)).filter((h) => h !== null);
    return hs.length ? Math.min(...hs) : null;
  };
  for (const [k, rate] of Object.entries(edges)) {
    const [src, dst] = k.split(">");
    if (!pos[src] || !pos[dst]) continue;
    const share = out[src] > 0 ? rate / out[src] : 0;
    const width = rate > 0 ? 2 + 10 * share : 1;
    const col = colour(hOf(dst), st.clusters[dst] && st.clusters[dst].live);
    const [x1, y1] = pos[src], [x2, y2] = pos[dst];
    let d, lx, ly;
    if (src === dst) {
      d = `M ${x1 - 14} ${y1 - 20} a 26 26 0 1 1 28 0`;
      lx = x1; ly = y1 - 58;
    } else {
      const mx = (x1 + x2) / 2 + (y2 - y1) * 0.25, my = (y1 + y2) / 2 - (x2 - x1) * 0.25;
      d = `M ${x1} ${y1} Q ${mx} ${my} ${x2} ${y2}`;
      lx = 0.25 * x1 + 0.5 * mx + 0.25 * x2; ly = 0.25 * y1 + 0.5 * my + 0.25 * y2 - 6;
    }
    const path = svg("path", { d, fill: "none", stroke: col, "stroke-width": width,
      "stroke-opacity": rate > 0 ? 0.85 : 0.25, "data-edge": k, "data-rate": rate.toFixed(2),
      "data-share": share.toFixed(3) });
    path.append(svg("title", {}, `${k}: ${rate.toFixed(1)}/s (${Math.round(share * 100)}% of ${src}; connections of TCP imports, requests of HTTP imports)`));
    map.append(path);
    if (rate > 0) map.append(svg("text", { x: lx, y: ly, "text-anchor": "middle", "font-size": 11, fill: "#1d2330" },
      `${rate.toFixed(1)}/s ${Math.round(share * 100)}%`));
  }
  const faulted = st.drill && st.drill.running ? st.drill.drill.clusters_in_scope : [];
  for (const [n, [x, y]] of Object.entries(pos)) {
    const c = st.clusters[n];
    const g = svg("g", { "data-cluster": n, "data-drill": faulted.includes(n) ? "in-scope" : "",
      cursor: "pointer" });
    g.addEventListener("click", () => { location.hash = focus() === n ? "" : `cluster=${n}`; });
    if (focus() === n) {
      g.append(svg("circle", { cx: x, cy: y, r: 32, fill: "none", stroke: "#1d2330", "stroke-width": 1 }));
    }
    if (faulted.includes(n)) {
      g.append(svg("circle", { cx: x, cy: y, r: 27, fill: "none", stroke: "var(--bad)", "stroke-width": 2, "stroke-dasharray": "4 3" }));
    }
    g.append(svg("circle", { cx: x, cy: y, r: 20, fill: colour(hOf(n), c.live), stroke: "#1d2330", "stroke-width": 1 }));
    g.append(svg("text", { x, y: y + 36, "text-anchor": "middle", "font-size": 12 }, `${n} (${c.zone})`));
    map.append(g);
  }
}

function drawDrill(st) {
  const box = document.getElementById("drill");
  const body = document.getElementById("drill-body");
  const tl = document.getElementById("drill-timeline");
  tl.replaceChildren();
  if (!st.drill) { box.dataset.state = "none"; return; }
  const d = st.drill.drill, r = st.drill.report;
  box.dataset.state = d.state;
  box.dataset.drill = d.id;
  const scope = Object.entries(r.scope).map(([k, v]) => `${k} ${v}`).join();
  const left = st.drill.running ? ` · fault ends in ${Math.max(0, d.fault_end - st.now).toFixed(0)}s` : "";
  const facts = [
    `${d.id}: ${d.mode} of ${scope} · ${d.state}${left}`,
    `detection ${r.detection_s ?? "–"}s · shift ${r.shift_s ?? "–"}s · failback ${r.failback_s ?? "–"}s · ` +
    `failed during shift ${r.failed_during_shift ?? "–"} · flapped ${r.flapped ? "yes" : "no"}`,
    `probes: ${r.totals.attempts} attempts, ${r.totals.successes} ok, ${r.totals.failures} failed`,
  ];
  body.replaceChildren(...facts.map((f) => el("div", {}, f)));
  body.className = "";
  const rows = r.timeline || [];
  if (!rows.length) return;
  const W = 960, H = 160, t0 = rows[0].t, t1 = rows[rows.length - 1].t;
  const x = (t) => 30 + (W - 40) * (t1 > t0 ? (t - t0) / (t1 - t0) : 0);
  const peak = Math.max(1, ...rows.map((row) => row.attempts));
  const fx0 = x(Math.max(t0, 0)), fx1 = x(Math.min(t1, r.fault_stop_t));
  if (fx1 > fx0) tl.append(svg("rect", { x: fx0, y: 10, width: fx1 - fx0, height: H - 30, fill: "#fdecea" }));
  const bw = Math.max(1, (W - 40) / Math.max(1, rows.length) - 1);
  for (const row of rows) {
    const hs = (H - 40) * row.successes / peak, hf = (H - 40) * row.failures / peak;
    tl.append(svg("rect", { x: x(row.t), y: H - 20 - hs, width: bw, height: hs, fill: "var(--ok)", "data-t": row.t }));
    if (hf) tl.append(svg("rect", { x: x(row.t), y: H - 20 - hs - hf, width: bw, height: hf, fill: "var(--bad)" }));
  }
  const pts = rows.filter((row) => row.in_scope_share !== null)
    .map((row) => `${x(row.t)},${H - 20 - (H - 40) * row.in_scope_share}`).join(" ");
  if (pts) tl.append(svg("polyline", { points: pts, fill: "none", stroke: "#1d2330", "stroke-width": 1.5 }));
  tl.append(svg("text", { x: 30, y: H - 4, "font-size": 11 }, `t=${t0}s`));
  tl.append(svg("text", { x: W - 10, y: H - 4, "font-size": 11, "text-anchor": "end" }, `t=${t1}s · bars: probes ok/failed · line: share served in scope`));
}

function drawEvents(st) {
  document.getElementById("events").replaceChildren(...st.events.map((e) =>
    el("li", { class: e.kind, "data-kind": e.kind },
      `${new Date(e.at * 1000).toLocaleTimeString()} ${e.cluster}: ${e.text}`)));
}

function draw(st) {
  const view = focus() ? ` · routed by ${focus()} (click it again for all)` : "";
  document.getElementById("td").textContent = `${st.trust_domain} · revision ${st.revision}${view}`;
  drawPicker(st);
  drawClusters(st);
  drawServices(st);
  drawMap(st);
  drawDrill(st);
  drawEvents(st);
  const f = document.getElementById("freshness");
  f.textContent = `updated ${new Date().toLocaleTimeString()}`;
  f.className = "muted";
  document.body.dataset.updated = String(Date.now());
}

async function poll() {
  try {
    const r = await fetch("/ui/api/state", { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) {
      document.getElementById("freshness").textContent = "not signed in: open /ui/?token=… (see the README, Dashboard)";
      return;
    }
    if (!r.ok) throw new Error(`state: HTTP ${r.status}`);
    draw(await r.json());
  } catch (e) {
    const f = document.getElementById("freshness");
    f.textContent = `federation unreachable (${e.message}); retrying`;
    f.className = "stale";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("service-pick").addEventListener("change", (ev) => {
    picked = ev.target.value;
  });
  poll();
});
