// The APIX operator dashboard.
//
// Every second it reads this node's /metrics (Prometheus text, no token
// needed), keeps the samples of the last five minutes and derives:
// publishes/s and deliveries/s (counter deltas between successive samples),
// publish -> deliver p50/p99 over the last 60 s (histogram bucket deltas,
// interpolated like PromQL's histogram_quantile), closes by code, and the
// consumer-group gauges and counters. Charts are uPlot (vendored, MIT).
//
// With an admin token (pasted, or minted by the development-only
// /dev/token endpoint) it also shows the token's org across all nodes:
// GET /api/v1/latency?window=60 and GET /api/v1/groups/{channel}/{group}.
// A route the server does not have yet (404) is reported on the page and
// polled less often; no failure is thrown to the console.

import { byLabel, histogram, histogramDelta, histogramQuantile, parsePrometheus, perSecond, total } from "/web/promtext.js";
import { fetchDevToken, tokenClaims } from "/web/devtoken.js";

const TICK_MS = 1000;
const KEEP_SECONDS = 300;
const LATENCY_WINDOW = 60;
const SLOW_POLL_TICKS = 5;
const MISSING_ROUTE_TICKS = 60;
const LATENCY_FAMILY = "apix_publish_deliver_latency_seconds";
const CLOSE_MEANINGS = {
  1000: "normal",
  1001: "going away (shutdown)",
  1003: "binary frame",
  1006: "no close frame",
  1008: "too many bad frames",
  1009: "message too big",
  1011: "internal error",
  4001: "unauthenticated",
  4003: "token expired",
  4008: "heartbeat timeout",
  4009: "slow consumer",
  4029: "rate limit abuse",
  4030: "admin disconnect",
};
const NORMAL_CLOSES = new Set(["1000", "1001", "4030"]);
const SLOW_CONSUMER = "4009";

const $ = (id) => document.getElementById(id);
const uPlot = globalThis.uPlot;

const samples = [];
const series = { t: [], publish: [], deliver: [], p50: [], p99: [], connections: [], slow: [], errors: [], normal: [] };
const charts = {};
const auth = { token: sessionStorage.getItem("apix-dashboard-token") || "", dev: sessionStorage.getItem("apix-dashboard-dev") === "1" };
const routeBackoff = { latency: 0 };
let ticks = 0;

// ---------------------------------------------------------------- formatting

function fmtRate(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value < 10) return value.toFixed(1);
  return Math.round(value).toLocaleString("en-US");
}

function fmtCount(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Math.round(value).toLocaleString("en-US");
}

function fmtMs(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value < 1) return value.toFixed(2);
  if (value < 100) return value.toFixed(1);
  return Math.round(value).toLocaleString("en-US");
}

function setTile(id, value, text, unit = "") {
  const element = $(id);
  element.dataset.value = value === null || value === undefined || Number.isNaN(value) ? "" : String(value);
  element.textContent = text;
  if (unit && text !== "–") {
    const small = document.createElement("small");
    small.textContent = unit;
    element.append(small);
  }
}

function errorText(payload, status) {
  if (payload && payload.error) return typeof payload.error === "string" ? payload.error : `${payload.error.code}: ${payload.error.message}`;
  return `HTTP ${status}`;
}

// ---------------------------------------------------------------- charts

const INTEGER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

function makeChart(id, title, lines, valueFormat, { integer = false } = {}) {
  const element = $(id);
  const options = {
    title,
    width: Math.max(element.clientWidth, 300),
    height: 190,
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true, range: (u, min, max) => [Math.min(min ?? 0, (max ?? 0) - 60), max ?? 0] }, y: { range: (u, min, max) => [0, Math.max(max * 1.15, 1)] } },
    axes: [
      { stroke: "#6b7385", grid: { stroke: "#eef0f4" } },
      {
        stroke: "#6b7385",
        grid: { stroke: "#eef0f4" },
        size: 56,
        values: (u, values) => values.map(valueFormat),
        ...(integer ? { incrs: INTEGER_STEPS } : {}),
      },
    ],
    series: [{}, ...lines.map(([label, color]) => ({ label, stroke: color, width: 2, fill: `${color}14`, value: (u, v) => valueFormat(v) }))],
  };
  charts[id] = { plot: new uPlot(options, [[], ...lines.map(() => [])], element), element };
}

function drawCharts() {
  const t = series.t;
  charts["c-rates"].plot.setData([t, series.publish, series.deliver]);
  charts["c-latency"].plot.setData([t, series.p50, series.p99]);
  charts["c-connections"].plot.setData([t, series.connections]);
  charts["c-closes"].plot.setData([t, series.slow, series.errors, series.normal]);
}

function resizeCharts() {
  for (const { plot, element } of Object.values(charts)) plot.setSize({ width: Math.max(element.clientWidth, 300), height: 190 });
}

// ---------------------------------------------------------------- /metrics

function sampleOf(parsed, t) {
  return {
    t,
    connections: total(parsed, "apix_connections"),
    accepted: total(parsed, "apix_connections_accepted_total"),
    published: total(parsed, "apix_events_published_total"),
    delivered: total(parsed, "apix_events_delivered_total"),
    latency: histogram(parsed, LATENCY_FAMILY),
    closes: byLabel(parsed, "apix_connection_closes_total", "code"),
    groups: {
      readers: total(parsed, "apix_group_readers"),
      members: total(parsed, "apix_group_members"),
      pending: total(parsed, "apix_group_pending"),
      deliveries: total(parsed, "apix_group_deliveries_total"),
      redeliveries: total(parsed, "apix_group_redeliveries_total"),
      acks: total(parsed, "apix_group_acks_total"),
      deadLetters: total(parsed, "apix_group_dead_letters_total"),
    },
  };
}

function closeRates(current, previous, seconds) {
  const rates = { slow: 0, errors: 0, normal: 0 };
  for (const [code, count] of current.closes) {
    const rate = perSecond(count, previous.closes.get(code) ?? 0, seconds) ?? 0;
    if (code === SLOW_CONSUMER) rates.slow += rate;
    else if (NORMAL_CLOSES.has(code)) rates.normal += rate;
    else rates.errors += rate;
  }
  return rates;
}

function latencyQuantiles(current) {
  const since = current.t - LATENCY_WINDOW;
  const base = samples.find((sample) => sample.t >= since - 0.5) || current;
  const delta = histogramDelta(current.latency, base === current ? current.latency : base.latency);
  if (!delta || !(delta.count > 0)) return { p50: null, p99: null, count: 0 };
  return { p50: histogramQuantile(0.5, delta.buckets) * 1000, p99: histogramQuantile(0.99, delta.buckets) * 1000, count: delta.count };
}

function renderCloses(current, previous) {
  const body = $("closes");
  body.replaceChildren();
  const codes = [...current.closes.keys()].sort((a, b) => Number(a) - Number(b));
  if (codes.length === 0) {
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 4;
    cell.className = "empty";
    cell.textContent = "no closes yet";
    return;
  }
  const reference = samples.find((sample) => sample.t >= current.t - 60) || previous || current;
  for (const code of codes) {
    const row = body.insertRow();
    row.dataset.code = code;
    const perMinute = current.closes.get(code) - (reference.closes.get(code) ?? 0);
    for (const [text, numeric] of [
      [code, false],
      [CLOSE_MEANINGS[code] || "", false],
      [fmtCount(current.closes.get(code)), true],
      [fmtCount(Math.max(perMinute, 0)), true],
    ]) {
      const cell = row.insertCell();
      cell.textContent = text;
      if (numeric) cell.className = "num";
    }
  }
}

function renderGroups(current, previous, seconds) {
  const g = current.groups;
  const p = previous ? previous.groups : g;
  const rows = [
    ["readers (channel, group)", fmtCount(g.readers)],
    ["members on this node", fmtCount(g.members)],
    ["pending (delivered, not acked)", fmtCount(g.pending)],
    ["deliveries/s", fmtRate(perSecond(g.deliveries, p.deliveries, seconds))],
    ["redeliveries/s", fmtRate(perSecond(g.redeliveries, p.redeliveries, seconds))],
    ["acks/s", fmtRate(perSecond(g.acks, p.acks, seconds))],
    ["dead letters (total)", fmtCount(g.deadLetters)],
  ];
  const list = $("groups-node");
  list.replaceChildren();
  for (const [label, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
}

function record(current) {
  const previous = samples.length ? samples[samples.length - 1] : null;
  samples.push(current);
  while (samples.length && samples[0].t < current.t - KEEP_SECONDS) samples.shift();
  const seconds = previous ? current.t - previous.t : 0;
  const publishRate = previous ? perSecond(current.published, previous.published, seconds) : null;
  const deliverRate = previous ? perSecond(current.delivered, previous.delivered, seconds) : null;
  const latency = latencyQuantiles(current);
  const closes = previous ? closeRates(current, previous, seconds) : { slow: null, errors: null, normal: null };
  let slowTotal = 0;
  let errorTotal = 0;
  for (const [code, count] of current.closes) {
    if (code === SLOW_CONSUMER) slowTotal += count;
    else if (!NORMAL_CLOSES.has(code)) errorTotal += count;
  }

  setTile("t-connections", current.connections, fmtCount(current.connections));
  $("t-accepted").textContent = `accepted ${fmtCount(current.accepted)}`;
  setTile("t-publish-rate", publishRate, fmtRate(publishRate));
  $("t-published").textContent = `total ${fmtCount(current.published)}`;
  setTile("t-deliver-rate", deliverRate, fmtRate(deliverRate));
  $("t-delivered").textContent = `total ${fmtCount(current.delivered)}`;
  setTile("t-p50", latency.p50, fmtMs(latency.p50), "ms");
  setTile("t-p99", latency.p99, fmtMs(latency.p99), "ms");
  setTile("t-slow", slowTotal, fmtCount(slowTotal));
  setTile("t-errors", errorTotal, fmtCount(errorTotal));
  setTile("t-pending", current.groups.pending, fmtCount(current.groups.pending));
  $("t-groups").textContent = `readers ${fmtCount(current.groups.readers)}, members ${fmtCount(current.groups.members)}`;
  setTile("t-dead", current.groups.deadLetters, fmtCount(current.groups.deadLetters));
  $("tile-slow").classList.toggle("alert", Boolean(closes.slow));
  $("tile-errors").classList.toggle("alert", Boolean(closes.errors));
  $("tile-dlq").classList.toggle("alert", Boolean(previous && current.groups.deadLetters > previous.groups.deadLetters));
  renderCloses(current, previous);
  renderGroups(current, previous, seconds);

  series.t.push(current.t);
  series.publish.push(publishRate);
  series.deliver.push(deliverRate);
  series.p50.push(latency.p50);
  series.p99.push(latency.p99);
  series.connections.push(current.connections);
  series.slow.push(closes.slow);
  series.errors.push(closes.errors);
  series.normal.push(closes.normal);
  while (series.t.length && series.t[0] < current.t - KEEP_SECONDS) for (const list of Object.values(series)) list.shift();
  drawCharts();
  $("updated").textContent = `updated ${new Date(current.t * 1000).toLocaleTimeString()}`;
  document.body.dataset.samples = String(samples.length);
}

async function scrape() {
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    record(sampleOf(parsePrometheus(await response.text()), Date.now() / 1000));
  } catch (err) {
    $("updated").textContent = `cannot read /metrics: ${err.message}`;
  }
}

// ---------------------------------------------------------------- health, readiness

async function checkNode() {
  try {
    const health = await (await fetch("/api/v1/health", { cache: "no-store" })).json();
    $("node").textContent = health.node || "?";
  } catch {
    $("node").textContent = "unreachable";
  }
  const pill = $("ready");
  try {
    const response = await fetch("/api/v1/ready", { cache: "no-store" });
    const body = await response.json().catch(() => ({}));
    const ready = response.ok && body.ready !== false;
    pill.className = `pill ${ready ? "ok" : "bad"}`;
    pill.dataset.state = ready ? "ready" : "not-ready";
    pill.textContent = ready ? "ready" : `not ready${body.reason ? `: ${body.reason}` : ""}`;
  } catch {
    pill.className = "pill bad";
    pill.dataset.state = "unreachable";
    pill.textContent = "unreachable";
  }
}

// ---------------------------------------------------------------- the admin API

async function adminGet(path) {
  const response = await fetch(path, { headers: { authorization: `Bearer ${auth.token}` }, cache: "no-store" });
  const payload = await response.json().catch(() => null);
  return { status: response.status, payload };
}

function renderOrgLatency(payload) {
  const box = $("org-latency");
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const text of ["", "p50 ms", "p95 ms", "p99 ms", "max ms", "count"]) {
    const th = document.createElement("th");
    th.textContent = text;
    if (text) th.className = "num";
    head.append(th);
  }
  const body = table.createTBody();
  for (const [label, key] of [["publish → deliver", "publish_to_deliver_ms"], ["publish → ack", "publish_ack_ms"]]) {
    const figures = payload[key] || {};
    const row = body.insertRow();
    row.insertCell().textContent = label;
    for (const name of ["p50", "p95", "p99", "max"]) {
      const cell = row.insertCell();
      cell.className = "num";
      cell.textContent = fmtMs(figures[name]);
    }
    const count = row.insertCell();
    count.className = "num";
    count.textContent = fmtCount(figures.count);
  }
  box.replaceChildren(table);
}

function orgMessage(text) {
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = text;
  $("org-latency").replaceChildren(p);
}

async function pollOrgLatency() {
  if (!auth.token) return;
  if (routeBackoff.latency > ticks) return;
  try {
    const { status, payload } = await adminGet(`/api/v1/latency?window=${LATENCY_WINDOW}`);
    if (status === 200 && payload) {
      renderOrgLatency(payload);
    } else if (status === 404) {
      routeBackoff.latency = ticks + MISSING_ROUTE_TICKS;
      orgMessage("This server has no GET /api/v1/latency yet: the node-wide percentiles above come from /metrics. Checked again in a minute.");
    } else {
      orgMessage(`The latency route answered ${errorText(payload, status)}.`);
    }
  } catch (err) {
    orgMessage(`The latency route is unreachable: ${err.message}`);
  }
}

async function lookUpGroup(channel, group) {
  const out = $("group-detail");
  if (!auth.token) {
    out.textContent = "Looking up one group needs an admin token.";
    return;
  }
  try {
    const { status, payload } = await adminGet(`/api/v1/groups/${encodeURIComponent(channel)}/${encodeURIComponent(group)}`);
    if (status !== 200 || !payload) {
      out.textContent = status === 404 ? `No group ${group} on ${channel} (or this server has no groups route yet).` : errorText(payload, status);
      return;
    }
    const lines = [`${channel} / ${group}: ${fmtCount(payload.pending)} pending, ${fmtCount(payload.dead_letters)} dead letters`];
    for (const consumer of payload.consumers || []) lines.push(`${consumer.name}: ${fmtCount(consumer.pending)} pending, idle ${fmtCount(consumer.idle_ms)} ms`);
    out.replaceChildren(...lines.map((line) => Object.assign(document.createElement("div"), { textContent: line })));
  } catch (err) {
    out.textContent = `The groups route is unreachable: ${err.message}`;
  }
}

function showToken() {
  const claims = auth.token ? tokenClaims(auth.token) : null;
  if (!auth.token) {
    $("token-state").textContent = "node-wide figures need no token";
    return;
  }
  const roles = claims && Array.isArray(claims.roles) ? claims.roles : [];
  const exp = claims && claims.exp ? new Date(claims.exp * 1000).toLocaleTimeString() : "?";
  $("token-state").textContent = claims
    ? `org ${claims.org}, sub ${claims.sub}${roles.includes("admin") ? ", admin" : " (no admin role)"}, expires ${exp}${auth.dev ? " (dev)" : ""}`
    : "that is not a JWT";
}

function useToken(token, dev) {
  auth.token = token;
  auth.dev = dev;
  sessionStorage.setItem("apix-dashboard-token", token);
  sessionStorage.setItem("apix-dashboard-dev", dev ? "1" : "0");
  routeBackoff.latency = 0;
  showToken();
  pollOrgLatency();
}

async function mintDevToken() {
  try {
    const minted = await fetchDevToken({ sub: "dashboard", name: "Operator", role: "admin" });
    if (!minted) {
      $("token-state").textContent = "this server has no /dev/token (it does not run on the development key pair): paste a token";
      return;
    }
    useToken(minted.token, true);
  } catch (err) {
    $("token-state").textContent = err.message;
  }
}

function refreshDevToken() {
  if (!auth.dev || !auth.token) return;
  const claims = tokenClaims(auth.token);
  if (claims && claims.exp - Date.now() / 1000 < 120) mintDevToken();
}

// ---------------------------------------------------------------- start

async function loop() {
  await scrape();
  if (ticks % SLOW_POLL_TICKS === 0) {
    checkNode();
    pollOrgLatency();
    refreshDevToken();
  }
  ticks += 1;
  setTimeout(loop, TICK_MS);
}

function main() {
  const rate = (v) => fmtRate(v);
  makeChart("c-rates", "Events per second", [["publishes/s", "#4f46e5"], ["deliveries/s", "#0891b2"]], rate);
  makeChart("c-latency", "Publish → deliver, ms (node, last 60 s)", [["p50", "#16a34a"], ["p99", "#dc2626"]], (v) => fmtMs(v));
  makeChart("c-connections", "Open connections", [["connections", "#7c3aed"]], (v) => fmtCount(v), { integer: true });
  makeChart("c-closes", "Closes per second", [["slow consumer (4009)", "#dc2626"], ["errors", "#d97706"], ["normal", "#64748b"]], rate);
  window.addEventListener("resize", resizeCharts);
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    if (token) useToken(token, false);
  });
  $("token-dev").addEventListener("click", mintDevToken);
  $("group-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const channel = $("group-channel").value.trim();
    const group = $("group-name").value.trim();
    if (channel && group) lookUpGroup(channel, group);
  });
  showToken();
  loop();
}

main();
