// CacheRoute dashboard: polls the control plane's /ui/api feeds about once a
// second and draws five views (fleet, KDNs, knowledge, decisions, playground).
// Charts are drawn on <canvas> here; nothing is loaded from anywhere else.
"use strict";

const POLL_MS = 1000;
const MAX_ROWS = 300;          // decision rows kept in the page
const MAX_POINTS = 2000;       // TTFT points kept for the chart
const CHART_WINDOW_S = 300;    // the TTFT chart shows the last five minutes
const COLORS = { text: "#e8833a", kv: "#2f6fd6", none: "#9aa3af" };

const ui = {
  state: null,
  lastDecision: 0,
  decisions: [],     // newest last, at most MAX_ROWS
  points: [],        // {at, ttft, mode}
  reuse: [],         // {at, ratio}
};

// ---------------------------------------------------------------- helpers

function $(id) { return document.getElementById(id); }

// Build an element; children are nodes or strings (set as text, never as HTML).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "onclick") el.addEventListener("click", v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function fmtNum(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString(undefined, { maximumFractionDigits: digits });
}

function fmtBytes(b) {
  if (b === null || b === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return `${fmtNum(b, i ? 1 : 0)} ${u[i]}`;
}

function fmtRate(bps) { return bps ? `${fmtBytes(bps)}/s` : "–"; }
function fmtTime(unix) { return new Date(unix * 1000).toLocaleTimeString(); }
function modeCell(mode) { return h("span", { class: `mode-${mode || "none"}` }, mode || "none"); }
function stat(value, label) { return h("div", { class: "stat" }, h("b", {}, value), h("span", {}, label)); }
function tags(list) { return h("div", { class: "tags" }, (list || []).map((t) => h("span", { class: "tag" }, t))); }

function bar(fraction) {
  const i = h("i");
  i.style.width = `${Math.max(0, Math.min(1, fraction || 0)) * 100}%`;
  return h("span", { class: "bar" }, i);
}

// A header cell; a leading "#" marks a numeric (right-aligned) column.
function th(t) { return t.startsWith("#") ? h("th", { class: "num" }, t.slice(1)) : h("th", {}, t); }

function fill(tbody, rows) { tbody.replaceChildren(...rows); }

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

// ---------------------------------------------------------------- tabs

function showView() {
  const name = (location.hash || "#fleet").slice(1);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("active", v.id === `view-${name}`);
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.view === name);
  if (name === "decisions") drawCharts();
}

// ---------------------------------------------------------------- fleet

function renderFleet(s) {
  let inst = 0, healthy = 0, inflight = 0, queued = 0;
  const pools = s.pools.map((p) => {
    const rows = p.instances.map((i) => {
      inst++; if (i.healthy) healthy++;
      inflight += i.inflight; queued += i.queued;
      const a = i.agent;
      return h("tr", {},
        h("td", {}, i.url),
        h("td", {}, h("span", { class: i.healthy ? "up" : "down" }, i.healthy ? "healthy" : "down")),
        h("td", { class: "num" }, i.inflight, i.max_inflight ? ` / ${i.max_inflight}` : ""),
        h("td", { class: "num" }, i.queued),
        h("td", { class: "num" }, i.kv_waiting),
        h("td", { class: "num" }, a ? a.running : "–"),
        h("td", { class: "num" }, a ? a.waiting : "–"),
        h("td", {}, a ? [bar(a.kv_usage), ` ${fmtNum(a.kv_usage * 100, 0)}%`] : h("span", { class: "muted" }, "no agent")),
        h("td", {}, i.kv_target || "–"),
        h("td", {}, h("span", { class: "muted" }, `${i.resident.length} blocks `), tags(i.resident.slice(0, 12)),
          i.resident.length > 12 ? h("span", { class: "muted" }, ` +${i.resident.length - 12} more`) : null));
    });
    return h("div", { class: "card" },
      h("h3", {}, `pool ${p.name}`, h("span", { class: "muted" }, ` · ${p.models.join(", ")} · ${p.policy}`)),
      h("table", {},
        h("thead", {}, h("tr", {}, ["instance", "health", "#in flight", "#queued", "#kv waiting",
          "#running (agent)", "#waiting (agent)", "GPU KV usage", "KV target", "resident knowledge"].map(th))),
        h("tbody", {}, rows)));
  });
  $("fleet-summary").replaceChildren(
    stat(`${healthy}/${inst}`, "instances healthy"), stat(inflight, "in flight"), stat(queued, "queued"),
    stat(s.kdns.filter((k) => k.up).length + "/" + s.kdns.length, "KDNs up"),
    stat(s.knowledge.length, "knowledge blocks"), stat(`v${s.config_version}`, `config (${s.role})`));
  if (s.last_reload_error) $("fleet-summary").append(h("div", { class: "error" }, `last reload error: ${s.last_reload_error}`));
  $("fleet-pools").replaceChildren(...pools);
}

// ---------------------------------------------------------------- KDNs

function renderKdns(s) {
  const cards = s.kdns.map((k) => {
    const l = k.load || {};
    const targets = Object.entries(l.targets || {}).map(([name, t]) => h("tr", {},
      h("td", {}, name), h("td", { class: "num" }, t.link_gbps ? `${fmtNum(t.link_gbps)} Gb/s` : "unmeasured"),
      h("td", { class: "num" }, fmtNum(t.link_backlog_ms)), h("td", { class: "num" }, t.pending_transfers),
      h("td", { class: "num" }, t.active_transfers)));
    return h("div", { class: "card" },
      h("h3", {}, k.id, " ", h("span", { class: k.up ? "up" : "down" }, k.up ? "up" : "down"),
        h("span", { class: "muted" }, ` · ${k.url}${k.member ? " · member" : ""}`)),
      h("div", { class: "summary" },
        stat(l.pending_transfers ?? "–", "pending"), stat(l.active_transfers ?? "–", "active"),
        stat(fmtNum(l.queue_wait_ms), "queue delay ms"), stat(fmtNum(l.oldest_pending_ms), "oldest pending ms"),
        stat(fmtRate(l.bandwidth_bytes_per_s), "bandwidth"), stat(l.max_queue ?? "–", "max queue")),
      k.last_error ? h("div", { class: "error" }, k.last_error) : null,
      h("table", {}, h("thead", {}, h("tr", {}, ["target", "#link speed", "#link backlog ms", "#pending", "#active"].map(th))),
        h("tbody", {}, targets)));
  });
  $("kdn-list").replaceChildren(...(cards.length ? cards : [h("p", { class: "muted" }, "No KDN configured or registered.")]));
  fill($("jobs").tBodies[0], s.injections.map((j) => h("tr", {},
    h("td", {}, fmtTime(j.started_at)), h("td", {}, j.block), h("td", {}, j.model),
    h("td", {}, `${j.kdn} → ${j.target}`), h("td", { class: "num" }, fmtBytes(j.bytes)),
    h("td", {}, h("span", { class: j.state === "failed" ? "down" : j.state === "done" ? "up" : "" }, j.state),
      j.error ? h("div", { class: "error" }, j.error) : null),
    h("td", {}, j.progress === null ? "–" : [bar(j.progress), ` ${fmtNum(j.progress * 100, 0)}%${j.progress_estimated ? " (est.)" : ""}`]),
    h("td", { class: "num" }, `${fmtNum(j.elapsed_ms)} ms`),
    h("td", { class: "num" }, fmtRate(j.bandwidth_bytes_per_s)))));
}

// ---------------------------------------------------------------- knowledge

function renderKnowledge(s) {
  let tokens = 0, bytes = 0, uses = 0;
  const rows = [];
  for (const b of s.knowledge) {
    uses += b.uses;
    const models = Object.entries(b.models);
    if (!models.length) models.push(["–", { status: "–", resident: [] }]);
    for (const [name, m] of models) {
      tokens += m.tokens || 0; bytes += m.bytes || 0;
      rows.push(h("tr", {},
        h("td", {}, b.id), h("td", {}, b.title || ""), h("td", {}, name), h("td", {}, m.status),
        h("td", { class: "num" }, fmtNum(m.tokens, 0)), h("td", { class: "num" }, fmtBytes(m.bytes)),
        h("td", { class: "num" }, fmtBytes(b.text_bytes)), h("td", {}, tags(m.resident)),
        h("td", { class: "num" }, b.uses)));
    }
  }
  const t = s.totals;
  $("knowledge-summary").replaceChildren(
    stat(s.knowledge.length, "blocks"), stat(fmtNum(tokens, 0), "prefix tokens"), stat(fmtBytes(bytes), "KV bytes"),
    stat(uses, "uses"), stat(t.kv_reuse_ratio === null ? "–" : `${fmtNum(t.kv_reuse_ratio * 100)}%`, "KV reuse"));
  fill($("blocks").tBodies[0], rows);
}

// ---------------------------------------------------------------- decisions

function decisionRow(d) {
  const tr = h("tr", { class: "clickable", "data-id": d.id, onclick: () => showDecision(d.id) },
    h("td", { class: "num" }, d.id), h("td", {}, fmtTime(d.at)), h("td", {}, d.pool || "–"),
    h("td", {}, d.instance || "–"), h("td", {}, (d.knowledge || []).join(", ") || "–"),
    h("td", {}, modeCell(d.mode)), h("td", {}, d.reason || d.scheduling_reason || "–"),
    h("td", { class: "num" }, fmtNum(d.predicted_ms)), h("td", { class: "num" }, fmtNum(d.ttft_ms)),
    h("td", { class: "num" }, d.status));
  return tr;
}

async function showDecision(id) {
  const pre = $("decision-detail");
  try {
    pre.textContent = JSON.stringify(await getJSON(`/ui/api/decision?id=${id}`), null, 2);
  } catch (e) {
    pre.textContent = String(e);
  }
  pre.hidden = false;
}

function addDecisions(list) {
  if (!list.length) return;
  const tbody = $("stream").tBodies[0];
  for (const d of list) {
    ui.lastDecision = Math.max(ui.lastDecision, d.id);
    ui.decisions.push(d);
    tbody.prepend(decisionRow(d));
    if (d.ttft_ms !== null && d.ttft_ms !== undefined && d.status < 400) {
      ui.points.push({ at: d.at, ttft: d.ttft_ms, mode: d.mode || "none" });
    }
  }
  while (ui.decisions.length > MAX_ROWS) ui.decisions.shift();
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
  while (ui.points.length > MAX_POINTS) ui.points.shift();
}

// Axes and a frame; returns the plot's mapping from data to pixels.
function frame(ctx, w, hgt, xMin, xMax, yMax, yLabel) {
  const pad = { l: 48, r: 10, t: 10, b: 24 };
  ctx.clearRect(0, 0, w, hgt);
  ctx.strokeStyle = "#d0d5dd"; ctx.fillStyle = "#6b7280"; ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.t + (hgt - pad.t - pad.b) * (1 - i / 4);
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(w - pad.r, y); ctx.stroke();
    ctx.fillText(yLabel(yMax * i / 4), 4, y + 4);
  }
  ctx.fillText(fmtTime(xMin), pad.l, hgt - 6);
  const last = fmtTime(xMax);
  ctx.fillText(last, w - pad.r - ctx.measureText(last).width, hgt - 6);
  return {
    x: (t) => pad.l + (w - pad.l - pad.r) * (t - xMin) / Math.max(1e-9, xMax - xMin),
    y: (v) => pad.t + (hgt - pad.t - pad.b) * (1 - v / Math.max(1e-9, yMax)),
  };
}

// The chart's left edge: the window's start, or a little before the first point
// while there is less than a window of data (so early points are not squeezed right).
function since(pts, now) {
  const first = pts.length ? pts[0].at : now;
  return Math.max(now - CHART_WINDOW_S, Math.min(first, now - 10) - 2);
}

function drawTtft() {
  const c = $("ttft-chart"); const ctx = c.getContext("2d");
  const now = ui.state ? ui.state.now : Date.now() / 1000;
  const pts = ui.points.filter((p) => p.at >= now - CHART_WINDOW_S);
  const yMax = Math.max(10, ...pts.map((p) => p.ttft)) * 1.1;
  const m = frame(ctx, c.width, c.height, since(pts, now), now, yMax, (v) => fmtNum(v, 0));
  for (const mode of ["none", "text", "kv"]) {
    const ps = pts.filter((p) => p.mode === mode);
    ctx.strokeStyle = COLORS[mode]; ctx.fillStyle = COLORS[mode];
    ctx.globalAlpha = 0.35; ctx.beginPath();
    ps.forEach((p, i) => (i ? ctx.lineTo(m.x(p.at), m.y(p.ttft)) : ctx.moveTo(m.x(p.at), m.y(p.ttft))));
    ctx.stroke(); ctx.globalAlpha = 1;
    for (const p of ps) { ctx.beginPath(); ctx.arc(m.x(p.at), m.y(p.ttft), 2.5, 0, 2 * Math.PI); ctx.fill(); }
  }
}

function drawReuse() {
  const c = $("reuse-chart"); const ctx = c.getContext("2d");
  const now = ui.state ? ui.state.now : Date.now() / 1000;
  const pts = ui.reuse.filter((p) => p.at >= now - CHART_WINDOW_S);
  const m = frame(ctx, c.width, c.height, since(pts, now), now, 1, (v) => `${fmtNum(v * 100, 0)}%`);
  ctx.strokeStyle = COLORS.kv; ctx.lineWidth = 2; ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(m.x(p.at), m.y(p.ratio)) : ctx.moveTo(m.x(p.at), m.y(p.ratio))));
  ctx.stroke();
  const t = ui.state ? ui.state.totals : null;
  $("reuse-now").textContent = t && t.kv_reuse_ratio !== null
    ? `now ${fmtNum(t.kv_reuse_ratio * 100)}% · ${fmtNum(t.knowledge_cached_tokens, 0)} of ${fmtNum(t.knowledge_tokens_text + t.knowledge_tokens_kv, 0)} knowledge tokens (text ${fmtNum(t.knowledge_tokens_text, 0)}, kv ${fmtNum(t.knowledge_tokens_kv, 0)})`
    : "no knowledge request yet";
}

function drawCharts() { drawTtft(); drawReuse(); }

// ---------------------------------------------------------------- polling

function setConn(ok, text) {
  const c = $("conn");
  c.textContent = text;
  c.className = `pill ${ok ? "ok" : "bad"}`;
}

async function pollState() {
  try {
    const s = await getJSON("/ui/api/state");
    ui.state = s;
    if (s.totals.kv_reuse_ratio !== null) {
      ui.reuse.push({ at: s.now, ratio: s.totals.kv_reuse_ratio });
      if (ui.reuse.length > MAX_POINTS) ui.reuse.shift();
    }
    renderFleet(s); renderKdns(s); renderKnowledge(s);
    setConn(true, `live · ${fmtTime(s.now)}`);
  } catch (e) {
    setConn(false, `disconnected: ${e.message}`);
  }
}

async function pollDecisions() {
  try {
    const r = await getJSON(`/ui/api/decisions?after=${ui.lastDecision}&n=200`);
    addDecisions(r.data);
  } catch (e) {
    setConn(false, `disconnected: ${e.message}`);
  }
  if ($("view-decisions").classList.contains("active")) drawCharts();
}

// Poll again only after the previous poll ended, so a slow gateway is never piled on.
function loop(fn) {
  const tick = async () => { await fn(); setTimeout(tick, POLL_MS); };
  tick();
}

// ---------------------------------------------------------------- playground

// Split a shell command line into words: quotes, backslash escapes, line continuations.
function shellWords(s) {
  const out = []; let cur = null; let i = 0;
  const push = () => { if (cur !== null) out.push(cur); cur = null; };
  while (i < s.length) {
    const c = s[i];
    if (c === "\\" && s[i + 1] === "\n") { i += 2; continue; }
    if (/\s/.test(c)) { push(); i++; continue; }
    cur = cur ?? "";
    if (c === "'") {
      const j = s.indexOf("'", i + 1);
      if (j < 0) throw new Error("unterminated ' quote");
      cur += s.slice(i + 1, j); i = j + 1;
    } else if (c === '"') {
      i++;
      while (i < s.length && s[i] !== '"') {
        if (s[i] === "\\" && i + 1 < s.length && '"\\$`\n'.includes(s[i + 1])) { cur += s[i + 1]; i += 2; }
        else cur += s[i++];
      }
      if (i >= s.length) throw new Error('unterminated " quote');
      i++;
    } else if (c === "\\" && i + 1 < s.length) { cur += s[i + 1]; i += 2; }
    else { cur += c; i++; }
  }
  push();
  return out;
}

// A curl command line or a bare JSON body -> {path, headers, body}.
function parseRequest(text) {
  text = text.trim();
  if (!text) throw new Error("write a request first");
  if (text.startsWith("{")) return { path: "/v1/chat/completions", headers: {}, body: JSON.parse(text) };
  const words = shellWords(text);
  if (words[0] !== "curl") throw new Error("expected a JSON body or a command line starting with curl");
  let url = null; let data = null; const headers = {};
  const takesValue = new Set(["-X", "--request", "-o", "--output", "-m", "--max-time", "-u", "--user", "-A", "--user-agent", "--connect-timeout"]);
  for (let i = 1; i < words.length; i++) {
    const w = words[i];
    const next = () => { if (i + 1 >= words.length) throw new Error(`${w} needs a value`); return words[++i]; };
    if (w === "-H" || w === "--header") {
      const hv = next(); const k = hv.indexOf(":");
      if (k < 1) throw new Error(`not a header: ${hv}`);
      headers[hv.slice(0, k).trim()] = hv.slice(k + 1).trim();
    } else if (["-d", "--data", "--data-raw", "--data-binary", "--json"].includes(w)) {
      data = next();
      if (data.startsWith("@")) throw new Error("a body from a file (@file) cannot be read here: paste it");
    } else if (w.startsWith("--data=") || w.startsWith("--json=")) {
      data = w.slice(w.indexOf("=") + 1);
    } else if (takesValue.has(w)) {
      next();
    } else if (!w.startsWith("-")) {
      url = w;
    }
  }
  if (data === null) throw new Error("no -d/--data body in the command line");
  let path = "/v1/chat/completions";
  if (url) {
    const u = new URL(url, location.origin);
    path = u.pathname;
  }
  return { path, headers, body: JSON.parse(data) };
}

function timingRow(k, v) { return h("tr", {}, h("th", {}, k), h("td", {}, v)); }

async function fetchDecision(id) {
  // The record is written when the request ends; give it a moment to land.
  for (let i = 0; i < 20; i++) {
    const r = await fetch(`/ui/api/decision?id=${id}`, { credentials: "same-origin", cache: "no-store" });
    if (r.ok) return r.json();
    await new Promise((res) => setTimeout(res, 100));
  }
  return null;
}

async function send() {
  const btn = $("pg-send"); const err = $("pg-error"); const out = $("pg-answer");
  err.hidden = true; out.textContent = ""; $("pg-decision").textContent = "";
  $("pg-timings").tBodies[0].replaceChildren(); $("pg-status").textContent = "";
  let req;
  try {
    req = parseRequest($("pg-input").value);
    if (typeof req.body !== "object" || req.body === null || Array.isArray(req.body)) throw new Error("the body must be a JSON object");
  } catch (e) {
    err.textContent = String(e.message || e); err.hidden = false; return;
  }
  const rag = $("pg-rag").value; const mode = $("pg-mode").value;
  if (rag !== "keep") req.body.RAG = rag === "on";
  if (mode !== "keep") req.body.injection = mode;
  req.body.stream = $("pg-stream").checked;
  btn.disabled = true;
  const t0 = performance.now(); let tFirst = null; let raw = ""; let answer = "";
  try {
    const r = await fetch("/ui/api/send", {
      method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
      body: JSON.stringify(req),
    });
    $("pg-status").textContent = `HTTP ${r.status}`;
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (tFirst === null) tFirst = performance.now();
      const text = dec.decode(value, { stream: true }); raw += text;
      if (!req.body.stream || !r.ok) continue;
      buf += text;
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).trim(); buf = buf.slice(nl + 1);
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") continue;
        try {
          const c = JSON.parse(payload).choices?.[0];
          answer += c?.delta?.content ?? c?.text ?? "";
          out.textContent = answer;
        } catch (_) { /* a partial line: wait for the rest */ }
      }
    }
    if (!req.body.stream || !r.ok) {
      try {
        const j = JSON.parse(raw);
        const c = j.choices?.[0];
        out.textContent = c ? (c.message?.content ?? c.text ?? "") : JSON.stringify(j, null, 2);
      } catch (_) { out.textContent = raw; }
    }
    const total = performance.now() - t0;
    const id = r.headers.get("x-cacheroute-decision");
    const rows = [
      timingRow("first byte (browser)", `${fmtNum(tFirst === null ? null : tFirst - t0)} ms`),
      timingRow("total (browser)", `${fmtNum(total)} ms`),
      timingRow("instance", r.headers.get("x-cacheroute-instance") || "–"),
      timingRow("pool", r.headers.get("x-cacheroute-pool") || "–"),
      timingRow("knowledge", r.headers.get("x-cacheroute-knowledge") || "–"),
      timingRow("injection", r.headers.get("x-cacheroute-injection") || "–"),
    ];
    $("pg-timings").tBodies[0].replaceChildren(...rows);
    if (id) {
      const d = await fetchDecision(id);
      if (d) {
        const inj = d.injection;
        $("pg-timings").tBodies[0].append(
          timingRow("decision", `#${d.id}`),
          timingRow("mode", inj ? `${inj.mode} (${inj.reason}, strategy ${inj.strategy})` : "no knowledge"),
          timingRow("predicted TTFT", inj ? `text ${fmtNum(inj.predicted_text_ms)} ms · kv ${fmtNum(inj.predicted_kv_ms)} ms` : "–"),
          timingRow("TTFT (gateway)", `${fmtNum(d.outcome.ttft_ms)} ms`),
          timingRow("duration (gateway)", `${fmtNum(d.outcome.duration_ms)} ms`));
        $("pg-decision").textContent = JSON.stringify(d, null, 2);
      }
    }
    $("pg-status").textContent = `HTTP ${r.status} · done`;
  } catch (e) {
    err.textContent = String(e.message || e); err.hidden = false;
  } finally {
    btn.disabled = false;
  }
}

function initPlayground() {
  const model = ui.state && ui.state.models.length ? ui.state.models[0] : "llama3-8b";
  const origin = ui.state ? ui.state.service : "http://127.0.0.1:7001";
  $("pg-input").value = `curl ${origin}/v1/chat/completions -H 'content-type: application/json' \\\n  -d '{"model":"${model}","max_tokens":48,"messages":[{"role":"user","content":"What is paged attention?"}]}'`;
  $("pg-send").addEventListener("click", send);
}

// ---------------------------------------------------------------- start

window.addEventListener("hashchange", showView);
window.addEventListener("DOMContentLoaded", async () => {
  showView();
  await pollState();
  initPlayground();
  loop(pollState);
  loop(pollDecisions);
});
