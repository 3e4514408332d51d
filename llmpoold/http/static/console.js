// llmpool web console: polls the admin API and /metrics, drives load/unload and a
// streaming playground. Keys live in sessionStorage (this tab only), are sent as
// Authorization headers, and never appear in a URL. No build step, no dependencies.
"use strict";

const POLL_MS = 1500;
const RATE_WINDOW_MS = 10000;
const $ = (id) => document.getElementById(id);
const state = {
  admin: null,          // last /v1/admin/models answer (models), or null
  adminStatus: null,    // HTTP status of that call
  metrics: {},          // model -> {state, queue, inflight, running, tokens}
  samples: [],          // [{t, tokens: {model: n}}] of the last RATE_WINDOW_MS
  rates: {},            // model -> tokens/s over that window
  gpus: [],
  pending: {},          // model -> "load" | "unload" while a click is in flight
  results: {},          // model -> {ok, text}
  polls: 0,
};

// ----- keys -----------------------------------------------------------------------------
const KEYS = { admin: "llmpool.adminKey", api: "llmpool.apiKey" };
$("admin-key").value = sessionStorage.getItem(KEYS.admin) || "";
$("api-key").value = sessionStorage.getItem(KEYS.api) || "";
$("keys").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEYS.admin, $("admin-key").value);
  sessionStorage.setItem(KEYS.api, $("api-key").value);
  poll();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEYS.admin);
  sessionStorage.removeItem(KEYS.api);
  $("admin-key").value = "";
  $("api-key").value = "";
  poll();
});
function authHeaders(kind) {
  const admin = $("admin-key").value.trim();
  const key = kind === "admin" ? admin : ($("api-key").value.trim() || admin);
  return key ? { Authorization: "Bearer " + key } : {};
}

// ----- helpers --------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
function mib(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1024 ? (value / 1024).toFixed(1) + " GiB" : Math.round(value) + " MiB";
}
async function errorText(resp) {
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON */ }
  const d = body && (body.detail || body.error);
  if (Array.isArray(d)) return `${resp.status} invalid_body: ${d.map((i) => i.msg).join("; ")}`;
  if (d && typeof d === "object") return `${resp.status} ${d.code || d.type}: ${d.message || d.code}`;
  return `${resp.status} ${resp.statusText}`;
}

// ----- data -----------------------------------------------------------------------------
function parseMetrics(text) {
  const out = {};
  const line = /^(llmpool_[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+|NaN)$/;
  for (const raw of text.split("\n")) {
    const m = line.exec(raw);
    if (!m) continue;
    const labels = {};
    for (const part of m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[part[1]] = part[2];
    const model = labels.model;
    if (!model) continue;
    const row = (out[model] ||= { state: null, queue: 0, inflight: 0, running: 0, tokens: 0 });
    const value = Number(m[3]);
    if (m[1] === "llmpool_model_state" && value === 1) row.state = labels.state;
    else if (m[1] === "llmpool_queue_depth") row.queue = value;
    else if (m[1] === "llmpool_inflight_requests") row.inflight = value;
    else if (m[1] === "llmpool_replica_inflight") row.running += value;
    else if (m[1] === "llmpool_output_tokens_total") row.tokens = value;
  }
  return out;
}

async function poll() {
  state.polls += 1;
  try {
    const [metrics, admin, ready] = await Promise.all([
      fetch("/metrics", { headers: authHeaders("api") }),  // a key: /metrics needs one off loopback
      fetch("/v1/admin/models", { headers: authHeaders("admin") }),
      fetch("/readyz"),
    ]);
    state.metrics = metrics.ok ? parseMetrics(await metrics.text()) : {};
    state.adminStatus = admin.status;
    state.admin = admin.ok ? (await admin.json()).models : null;
    state.adminError = admin.ok ? null : await errorText(admin);
    const r = await ready.json();
    setHealth(r.ready ? "ok" : "", r.ready ? `ready · ${r.loaded_models.length} loaded` : "starting");
    if (state.admin && state.polls % 4 === 1) {
      const g = await fetch("/v1/admin/gpu-memory", { headers: authHeaders("admin") });
      state.gpus = g.ok ? (await g.json()).gpus || [] : [];
    }
    rates();
  } catch (e) {
    setHealth("bad", "daemon unreachable");
  }
  render();
}

function rates() {
  const now = performance.now();
  const tokens = Object.fromEntries(Object.entries(state.metrics).map(([m, r]) => [m, r.tokens]));
  state.samples.push({ t: now, tokens });
  while (state.samples.length > 2 && now - state.samples[1].t >= RATE_WINDOW_MS) state.samples.shift();
  const first = state.samples[0];
  const dt = (now - first.t) / 1000;
  for (const [m, n] of Object.entries(tokens)) state.rates[m] = dt > 0 ? Math.max(0, n - (first.tokens[m] || 0)) / dt : 0;
}

function setHealth(kind, text) {
  const h = $("health");
  h.className = "pill " + kind;
  h.textContent = text;
}

// ----- models table ----------------------------------------------------------------------
function rows() {
  if (state.admin) {
    return state.admin.map((m) => ({
      name: m.name, backend: m.resolved_backend, state: m.runtime_state,
      replicas: `${m.loaded_replicas}/${m.replicas}`, memory: m.vram_estimate_mib,
      memorySource: m.vram_estimate_source, queue: m.queue_depth, running: m.runtime_inflight,
      error: m.last_error, keys: (m.fairness && m.fairness.keys) || [],
    }));
  }
  return Object.entries(state.metrics).map(([name, r]) => ({
    name, backend: null, state: r.state || "unknown", replicas: "–", memory: null, queue: r.queue,
    running: r.running, error: null, keys: [],
  }));
}

function render() {
  const list = rows();
  const notice = $("notice");
  if (!state.admin && state.adminStatus) {
    notice.hidden = false;
    notice.textContent = `Admin API: ${state.adminError}. Type the admin key above to see replicas, memory and `
      + "errors; states and queues come from /metrics.";
  } else {
    notice.hidden = true;
  }
  const gpuTotal = state.gpus.reduce((s, g) => s + (g.total_mib || 0), 0);
  const loadedMem = list.filter((r) => r.state === "loaded").reduce((s, r) => s + (r.memory || 0), 0);
  const allMem = list.reduce((s, r) => s + (r.memory || 0), 0);
  const budget = gpuTotal || allMem || 1;
  $("memory-summary").textContent = state.admin
    ? `memory ${mib(loadedMem)} loaded of ${gpuTotal ? mib(gpuTotal) + " GPU" : mib(allMem) + " (all models, estimated)"}`
      + ` · ${list.filter((r) => r.state === "loaded").length}/${list.length} models loaded`
    : "";
  const body = document.querySelector("#models tbody");
  const trs = [];
  for (const r of list) {
    const pct = r.memory ? Math.min(100, (100 * r.memory) / budget) : 0;
    const result = state.results[r.name];
    const busy = state.pending[r.name];
    trs.push(el("tr", { "data-model": r.name, "data-state": r.state },
      el("td", { class: "name" }, r.name, r.backend ? el("span", { class: "backend" }, r.backend) : null),
      el("td", {}, el("span", { class: "state " + r.state }, busy ? busy + "ing…" : r.state)),
      el("td", { class: "num" }, r.replicas),
      el("td", { class: "mem", title: r.memorySource ? "source: " + r.memorySource : null },
        el("span", { class: "bar" + (r.state === "loaded" ? "" : " idle") }, el("span", { style: `width:${pct}%` })),
        el("span", { class: "memtext" }, mib(r.memory))),
      el("td", { class: "num" }, r.queue),
      el("td", { class: "num" }, r.running),
      el("td", { class: "num" }, (state.rates[r.name] || 0).toFixed(1)),
      el("td", { class: "err", title: r.error || null }, r.error || ""),
      el("td", { class: "actions" },
        el("button", { class: "small", "data-action": "load", disabled: busy || r.state === "loaded" || r.state === "loading",
                       onclick: () => admin(r.name, "load") }, "Load"),
        el("button", { class: "small danger", "data-action": "unload", disabled: busy || r.state === "unloaded",
                       onclick: () => admin(r.name, "unload") }, "Unload"),
        result ? el("span", { class: "result " + (result.ok ? "ok" : "bad"), "data-result": r.name }, result.text) : null)));
    for (const k of r.keys) {
      trs.push(el("tr", { class: "sub" },
        el("td", { colspan: 4 }, "↳ key ", k.fairness_key === null ? "(anonymous)" : k.fairness_key,
           k.weight !== undefined ? ` · weight ${k.weight}` : ""),
        el("td", { class: "num" }, k.pending), el("td", { class: "num" }, k.active), el("td", { colspan: 3 })));
    }
  }
  body.replaceChildren(...trs);
  playModels(list);
}

async function admin(name, action) {
  state.pending[name] = action;
  delete state.results[name];
  render();
  try {
    const resp = await fetch(`/v1/admin/models/${encodeURIComponent(name)}/${action}`,
                             { method: "POST", headers: authHeaders("admin") });
    state.results[name] = resp.ok ? { ok: true, text: `${action}ed` } : { ok: false, text: await errorText(resp) };
  } catch (e) {
    state.results[name] = { ok: false, text: String(e) };
  }
  delete state.pending[name];
  await poll();
}

// ----- playground ------------------------------------------------------------------------
function playModels(list) {
  const select = $("play-model");
  const loaded = list.filter((r) => r.state === "loaded").map((r) => r.name);
  const current = select.value;
  if (loaded.join("\n") === [...select.options].map((o) => o.value).join("\n")) return;
  select.replaceChildren(...loaded.map((m) => el("option", { value: m }, m)));
  if (loaded.includes(current)) select.value = current;
}

let controller = null;
$("play-stop").addEventListener("click", () => controller && controller.abort());
$("play").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const out = $("play-output");
  const metrics = $("play-metrics");
  const model = $("play-model").value;
  if (!model) { out.className = "output error"; out.textContent = "no loaded model"; return; }
  const body = {
    model, input: $("play-prompt").value || $("play-prompt").placeholder, stream: true,
    decoding: { max_tokens: Number($("play-max").value) || 64, temperature: Number($("play-temp").value) || 0 },
  };
  out.className = "output";
  out.replaceChildren(el("span", { class: "text" }), el("span", { class: "cursor" }));
  const text = out.firstChild;
  metrics.textContent = "";
  controller = new AbortController();
  $("play-send").disabled = true;
  $("play-stop").disabled = false;
  const started = performance.now();
  let first = null;
  try {
    const resp = await fetch("/v1/responses", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", ...authHeaders("api") }, body: JSON.stringify(body),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = (/^event: (.*)$/m.exec(frame) || [])[1];
        const data = frame.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (!data) continue;
        const obj = JSON.parse(data);
        if (event === "response.output_text.delta") {
          first ??= performance.now();
          text.textContent += obj.delta;
        } else if (event === "response.metrics") {
          const m = obj.metrics;
          const decodeS = (performance.now() - (first ?? started)) / 1000;
          const tps = m.engine_tokens_per_second || (decodeS > 0 ? (m.engine_output_tokens || 0) / decodeS : 0);
          metrics.textContent = `first token ${Math.round((first ?? performance.now()) - started)} ms · `
            + `${m.engine_output_tokens} tokens · ${tps.toFixed(1)} tok/s · total ${Math.round(m.pool_total_wall_ms)} ms`
            + ` · finish ${m.engine_finish_reason}`;
        } else if (event === "error") {
          throw new Error(`${obj.status} ${obj.error.code}: ${obj.error.message || ""}`);
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      out.classList.add("error");
      text.textContent += (text.textContent ? "\n" : "") + e.message;
    }
  } finally {
    out.querySelector(".cursor")?.remove();
    $("play-send").disabled = false;
    $("play-stop").disabled = true;
    controller = null;
  }
});

poll();
setInterval(poll, POLL_MS);
