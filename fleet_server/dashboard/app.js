// edgekit fleet dashboard: a client of the admin API (docs/protocol.md), served by the fleet server, no CDN.
// Every value from the server is put on the page with textContent or setAttribute, never as HTML:
// device names, tags and reasons come from devices and must not be able to run script here.
"use strict";

const TOKEN_KEY = "edgekit.dashboard.token";
const REFRESH_MS = 2000;
let current = "overview";
let timer = null;
let selectedRollout = null;
let selectedModel = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.addEventListener("click", v);
    else if (v !== null && v !== undefined) node.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(headers, rows) {
  const t = el("table", {}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  for (const r of rows) body.appendChild(el("tr", {}, ...r.map((c) => el("td", {}, c))));
  t.appendChild(body);
  return t;
}

const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(1) + "%");
const num = (v, d = 2) => (v === null || v === undefined ? "-" : Number(v).toFixed(d));
const state = (s) => el("span", { class: "state-" + (s || "none") }, s || "-");

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const r = await fetch(path, { headers: { Authorization: "Bearer " + token } });
  if (r.status === 401) { logout("The token was refused (unknown or revoked)."); throw new Error("unauthorized"); }
  const body = await r.json();
  if (!r.ok) throw new Error((body.error && body.error.message) || ("HTTP " + r.status));
  return body;
}

function show(view) {
  current = view;
  for (const b of document.querySelectorAll("#nav button[data-view]")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll("section.view")) s.hidden = s.id !== view;
  refresh();
}

async function refresh() {
  clearTimeout(timer);
  const status = document.getElementById("status");
  try {
    await RENDER[current](document.getElementById(current));
    status.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    status.textContent = "error: " + e.message;
  }
  if (sessionStorage.getItem(TOKEN_KEY)) timer = setTimeout(refresh, REFRESH_MS);
}

function replace(section, ...nodes) {
  section.replaceChildren(...nodes);
}

async function overview(section) {
  const [devices, rollouts, models] = await Promise.all([api("/v1/devices"), api("/v1/rollouts?limit=10"), api("/v1/models")]);
  const byVersion = {};
  for (const d of devices) {
    const key = d.active ? d.active.model + " " + d.active.version : "(none)";
    byVersion[key] = (byVersion[key] || 0) + 1;
  }
  const running = rollouts.items.filter((r) => r.state === "running" || r.state === "paused").length;
  replace(section,
    el("div", { class: "cards" },
      el("div", { class: "card", id: "card-devices" }, el("div", { class: "n" }, devices.length), "devices"),
      el("div", { class: "card" }, el("div", { class: "n" }, models.length), "models"),
      el("div", { class: "card" }, el("div", { class: "n" }, running), "running rollouts")),
    el("h2", {}, "Active versions"),
    table(["model version", "devices"], Object.entries(byVersion).map(([k, n]) => [k, n])),
    el("h2", {}, "Latest rollouts"),
    rolloutTable(rollouts.items));
}

async function devices(section) {
  const list = await api("/v1/devices");
  replace(section, el("h2", {}, list.length + " device(s)"),
    table(["name", "profile", "tags", "active version", "last on-device profile", "phase", "last seen"], list.map((d) => [
      el("span", { class: "device-name" }, d.name), d.profile, (d.tags || []).join(", "),
      d.active ? d.active.model + " " + d.active.version : "-",
      d.last_profile ? `${d.last_profile.version || "?"}: p95 ${num(d.last_profile.p95_ms)} ms, golden ${d.last_profile.golden_passed ? "passed" : "FAILED"}`
        + (d.last_profile.timing_source === "emulated" ? " (emulated timing)" : "") : "-",
      d.decommissioned_at ? "decommissioned" : (d.phase || "-"), d.last_seen || "never"])));
}

function rolloutTable(items) {
  return table(["id", "model", "version", "state", "waves", "created", "reason"], items.map((r) => [
    el("a", { onclick: () => { selectedRollout = r.id; show("rollouts"); } }, r.id), r.model, r.version, state(r.state),
    el("span", {}, ...r.waves.map((w) => state(w.state)).flatMap((s, i) => (i ? [" ", s] : [s]))), r.created_at, r.reason || ""]));
}

async function rollouts(section) {
  const page = await api("/v1/rollouts?limit=50");
  const nodes = [el("h2", {}, page.total + " rollout(s)"), rolloutTable(page.items)];
  if (selectedRollout) {
    const r = await api("/v1/rollouts/" + encodeURIComponent(selectedRollout));
    nodes.push(el("h2", { id: "rollout-detail" }, `Rollout ${r.id}: ${r.model} ${r.version} `, state(r.state)));
    if (r.reason) nodes.push(el("p", { class: "reason" }, r.reason));
    nodes.push(el("p", { class: "muted" }, "gates: " + Object.entries(r.gates).map(([k, v]) => k + "=" + v).join(", ")));
    for (const w of r.waves) {
      nodes.push(el("h2", {}, `Wave ${w.index + 1} (${w.percent}%) `, state(w.state)));
      nodes.push(table(["device", "profile", "phase", "p95 ms", "baseline p95", "golden", "reason"], w.devices.map((d) => {
        const m = d.metrics || {};
        return [el("span", { class: "device-name" }, d.name), d.profile, d.phase || "assigned", num(m.p95_ms),
          num((m.baseline || {}).p95_ms), m.golden_passed === undefined ? "-" : (m.golden_passed ? "passed" : "FAILED"), d.reason || ""];
      })));
      if (w.gate_results.length) {
        nodes.push(table(["gate", "limit", "value", "result", "device", "note"], w.gate_results.map((g) => [
          g.gate, String(g.limit), g.value === null ? "-" : num(g.value, 4),
          el("span", { class: g.passed === null ? "unknown" : g.passed ? "pass" : "fail" }, g.passed === null ? "unknown" : g.passed ? "pass" : "FAIL"),
          g.device_id || "", g.note || ""])));
      }
    }
  }
  replace(section, ...nodes);
}

function plot(points, label, fmt) {
  const W = 480, H = 140, P = 30;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "plot");
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  const title = document.createElementNS(svg.namespaceURI, "text");
  title.setAttribute("x", P);
  title.setAttribute("y", 14);
  title.textContent = label;
  svg.appendChild(title);
  const ys = points.map((p) => p[1]).filter((v) => v !== null && v !== undefined);
  if (!ys.length) {
    title.textContent = label + ": no data in this window";
    return svg;
  }
  const max = Math.max(...ys) || 1;
  const n = Math.max(points.length - 1, 1);
  const line = document.createElementNS(svg.namespaceURI, "polyline");
  line.setAttribute("points", points.filter((p) => p[1] !== null && p[1] !== undefined)
    .map((p) => `${P + (p[2] / n) * (W - 2 * P)},${H - P + 10 - (p[1] / max) * (H - 2 * P)}`).join(" "));
  svg.appendChild(line);
  const top = document.createElementNS(svg.namespaceURI, "text");
  top.setAttribute("x", 2);
  top.setAttribute("y", P);
  top.textContent = fmt(max);
  svg.appendChild(top);
  return svg;
}

async function versions(section) {
  const models = await api("/v1/models");
  if (!models.length) { replace(section, el("p", {}, "No models yet.")); return; }
  if (!selectedModel || !models.some((m) => m.name === selectedModel)) selectedModel = models[0].name;
  const since = new Date(Date.now() - 6 * 3600 * 1000).toISOString();
  const side = await api(`/v1/models/${encodeURIComponent(selectedModel)}/stats?since=${encodeURIComponent(since)}`);
  const nodes = [el("p", {}, "Model: ", ...models.map((m) => el("a", { onclick: () => { selectedModel = m.name; refresh(); } }, m.name + " "))),
    el("h2", {}, `${selectedModel}: field statistics, last 6 hours`),
    table(["version", "requests", "escalation", "degraded", "errors", "p50 ms", "p95 ms", "p99 ms"], side.versions.map((v) => [
      v.version, v.requests, pct(v.escalation_rate), pct(v.degraded_rate), pct(v.error_rate), num(v.latency_ms.p50),
      num(v.latency_ms.p95), num(v.latency_ms.p99)]))];
  for (const v of side.versions.filter((x) => x.requests > 0)) {
    const s = await api(`/v1/models/${encodeURIComponent(selectedModel)}/versions/${encodeURIComponent(v.version)}/stats`
      + `?since=${encodeURIComponent(since)}&bucket_s=300`);
    const d = s.totals.drift;
    nodes.push(el("h2", {}, `${selectedModel} ${v.version}`),
      el("p", { class: "muted" }, `drift: PSI ${d.value === null ? "-" : num(d.value, 3)} (drifted above ${d.threshold}) against ${d.reference}`),
      el("div", { class: "cards" },
        plot(s.buckets.map((b, i) => [b.start, b.escalation_rate, i]), "escalation rate per 5 min", pct),
        plot(s.buckets.map((b, i) => [b.start, b.latency_ms.p95, i]), "p95 latency (ms) per 5 min", (x) => num(x, 1))));
  }
  replace(section, ...nodes);
}

async function audit(section) {
  const page = await api("/v1/audit?limit=100");
  replace(section, el("h2", {}, page.total + " admin action(s)"),
    table(["at", "who", "action", "target", "from", "result"], page.items.map((e) => [
      e.at, e.actor, e.action, e.target || "", e.remote_addr || "", el("span", { class: e.status < 400 ? "pass" : "fail" }, `${e.status} ${e.result}`)])));
}

const RENDER = { overview, devices, rollouts, versions, audit };

function logout(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(timer);
  document.getElementById("nav").hidden = true;
  for (const s of document.querySelectorAll("section.view")) { s.hidden = true; s.replaceChildren(); }
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

async function login(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
  try {
    await api("/v1/models");
  } catch (e) {
    if (sessionStorage.getItem(TOKEN_KEY)) logout("Sign-in failed: " + e.message);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  show(current);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    login(document.getElementById("token").value.trim());
  });
  for (const b of document.querySelectorAll("#nav button[data-view]")) b.addEventListener("click", () => show(b.dataset.view));
  document.getElementById("logout").addEventListener("click", () => logout("Signed out."));
  if (sessionStorage.getItem(TOKEN_KEY)) login(sessionStorage.getItem(TOKEN_KEY));
});
