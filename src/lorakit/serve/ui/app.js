// lorakit explorer: the base model and its adapters side by side, through the server's own OpenAI API.
// No build step and no dependency: this file is served as it is.
"use strict";

const $ = (selector) => document.querySelector(selector);
const KEY = "lorakit-api-key";
const ui = { base: null, models: [], checked: null, signature: "", runs: [], runsSignature: "", histories: {},
             reference: null, examples: [] };

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---- the API, with the key kept for this tab only ----
async function api(path, init = {}) {
  const headers = { ...(init.headers || {}) };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  const res = await fetch(path, { ...init, headers });
  if (res.status === 401) {
    askKey(key ? "The server refused that key: check it and try again." : "");
    throw new ApiError(401, "invalid or missing API key");
  }
  return res;
}

async function errorOf(res) {
  try { return (await res.json()).error.message; } catch { return `${res.status} ${res.statusText}`; }
}

async function ok(res) {
  if (!res.ok) throw new ApiError(res.status, await errorOf(res));
  return res;
}

async function json(res) {
  return (await ok(res)).json();
}

function askKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message;
  if (!dialog.open) dialog.showModal();
  $("#key").focus();
}

$("#key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY, $("#key").value);
  $("#key").value = "";
  refresh();
});

// ---- live state: models, versions, errors, queue ----
async function refresh() {
  if ($("#key-dialog").open) return;
  try {
    const [models, state] = await Promise.all([api("/v1/models").then(json), api("/v1/lorakit/state").then(json)]);
    $("#state").textContent = `base ${state.base} · queue ${state.queue_depth} · running rows ${state.running_rows} · ` +
      `adapters: ${state.adapters_loaded} loaded, ${state.adapters_evicted} evicted, ${state.adapters_failed} failed`;
    renderModels(models.data);
  } catch (e) {
    if (e.status !== 401) $("#state").textContent = `the server does not answer: ${e.message}`;
  }
}

function renderModels(models) {
  const signature = JSON.stringify(models.map((m) => [m.id, m.version, m.loaded, m.chat_template, m.error]));
  if (signature === ui.signature) return;
  ui.signature = signature;
  ui.base = models.find((m) => m.parent === null).id;
  ui.models = models;
  if (ui.checked === null) {  // at first: the base and up to four adapters
    const ready = models.filter((m) => m.parent !== null && !m.error).slice(0, 4).map((m) => m.id);
    ui.checked = new Set([ui.base, ...ready]);
  }
  const list = $("#model-list");
  list.replaceChildren(...models.map((m) => {
    const label = document.createElement("label");
    const box = Object.assign(document.createElement("input"), { type: "checkbox", checked: ui.checked.has(m.id) });
    box.dataset.model = m.id;
    box.disabled = Boolean(m.error) && !m.loaded;
    box.addEventListener("change", () => (box.checked ? ui.checked.add(m.id) : ui.checked.delete(m.id)));
    const note = document.createElement("small");
    const template = m.chat_template ? ` · template ${m.chat_template}` : m.loaded !== false ? " · no chat template" : "";
    note.textContent = (m.parent === null ? "base" : m.loaded
      ? `${m.version} · loaded ${new Date(m.loaded_at * 1000).toLocaleTimeString()}` : "evicted: loads on use") + template;
    label.append(box, ` ${m.id}`, note);
    if (m.error) {
      const err = Object.assign(document.createElement("span"), { className: "error", textContent: m.error });
      label.append(err);
    }
    return label;
  }));
  loadRuns();
}

// ---- runs: config, loss curves, summary, eval table, held-out examples ----
async function loadRuns() {
  try {
    ui.runs = (await json(await api("/v1/lorakit/runs"))).runs;
  } catch (e) {
    return;
  }
  renderRuns();
  renderExamples();
}

function renderExamples() {
  const select = $("#example");
  const keep = select.value;
  ui.examples = [];
  select.replaceChildren(new Option("(type your own prompt)", ""));
  for (const run of ui.runs) {
    if (!(run.examples || []).length) continue;  // a run listed with its error has none
    const group = Object.assign(document.createElement("optgroup"), { label: `held out by ${run.name}` });
    for (const ex of run.examples) {
      const user = [...ex.prompt].reverse().find((m) => m.role === "user");
      group.append(new Option((user ? user.content : "").slice(0, 90), String(ui.examples.length)));
      ui.examples.push(ex);
    }
    select.append(group);
  }
  select.value = keep && Number(keep) < ui.examples.length ? keep : "";
}

$("#example").addEventListener("change", () => {
  const ex = ui.examples[Number($("#example").value)];
  ui.reference = ex ? ex.reference : null;
  if (!ex) return;
  const system = ex.prompt.find((m) => m.role === "system");
  const user = [...ex.prompt].reverse().find((m) => m.role === "user");
  $("#system").value = system ? system.content : "";
  $("#prompt").value = user ? user.content : "";
});

function renderRuns() {
  $("#runs-empty").hidden = ui.runs.length > 0;
  $("#run-list").replaceChildren(...ui.runs.map((run) => {
    const card = Object.assign(document.createElement("article"), { className: "run" });
    card.dataset.run = run.name;
    card.append(Object.assign(document.createElement("h2"), { textContent: `${run.name} — ${run.folder}` }));
    // A run that could not be described, and the parts of one that were left out, say why.
    for (const why of [run.error, ...(run.notes || [])].filter(Boolean)) {
      card.append(Object.assign(document.createElement("p"), { className: "failure", textContent: why }));
    }
    if (run.error) return card;
    const c = run.config, t = c.train || {}, a = c.adapter || {}, d = c.data || {};
    card.append(definitions({
      model: c.model, method: c.method, adapter: c.method === "full" ? "—" : `r ${a.r}, alpha ${a.alpha}`,
      data: `${d.train}${d.eval ? ` (eval: ${d.eval})` : ""}`, steps: t.max_steps || `${t.epochs} epoch(s)`,
      batch: `${t.batch_size} x ${t.grad_accum} accumulated`, "learning rate": `${t.lr} (${t.scheduler})`,
    }));
    card.append(lossChart(run.metrics, run.name));
    if (run.summary) {
      const s = run.summary;
      card.append(definitions({
        "tokens/s": s.tokens_per_s, "peak memory": `${s.peak_memory_mb} MB`,
        "train time": s.train_s === undefined ? "—" : `${s.train_s} s`, "wall time": `${s.wall_time_s} s`,
        "final train loss": fmt(s.final_train_loss), "final eval loss": fmt(s.final_eval_loss),
      }));
    }
    if (run.eval) card.append(evalTable(run.eval, run.name));
    return card;
  }));
}

function definitions(pairs) {
  const dl = document.createElement("dl");
  for (const [k, v] of Object.entries(pairs)) {
    dl.append(Object.assign(document.createElement("dt"), { textContent: k }),
              Object.assign(document.createElement("dd"), { textContent: String(v ?? "—") }));
  }
  return dl;
}

function fmt(v) { return typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4)) : "—"; }

function lossChart(points, name) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 600 200");
  svg.setAttribute("role", "img");
  const title = document.createElementNS(ns, "title");
  title.textContent = `Loss of ${name}: training (line) and evaluation (dots) by step`;
  svg.append(title);
  const losses = points.flatMap((p) => [p.loss, p.eval_loss]).filter((v) => typeof v === "number");
  if (!losses.length) return svg;
  const steps = points.map((p) => p.step), x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  const y0 = Math.min(...losses), y1 = Math.max(...losses, y0 + 1e-9);
  const x = (s) => 40 + ((s - x0) / (x1 - x0)) * 550, y = (v) => 185 - ((v - y0) / (y1 - y0)) * 170;
  const line = (key, cls, color) => {
    const pts = points.filter((p) => typeof p[key] === "number").map((p) => `${x(p.step)},${y(p[key])}`);
    const el = document.createElementNS(ns, "polyline");
    Object.entries({ points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2, class: cls })
      .forEach(([k, v]) => el.setAttribute(k, v));
    svg.append(el);
  };
  line("loss", "train-loss", "#2455c3");
  line("eval_loss", "eval-loss", "#c77700");
  for (const [value, at] of [[y1, 15], [y0, 185]]) {
    const label = document.createElementNS(ns, "text");
    Object.entries({ x: 2, y: at + 4, "font-size": 11, fill: "#5b6270" }).forEach(([k, v]) => label.setAttribute(k, v));
    label.textContent = value.toPrecision(3);
    svg.append(label);
  }
  return svg;
}

function evalTable(ev, name) {
  const models = Object.entries(ev.models);
  const keys = [...new Set(models.flatMap(([, m]) => Object.keys(m).filter((k) => typeof m[k] === "number")))];
  const table = document.createElement("table");
  table.className = "eval";
  table.createCaption().textContent = "lorakit eval of this run: the base against the adapter";
  const head = table.createTHead().insertRow();
  for (const k of ["model", ...keys]) head.append(Object.assign(document.createElement("th"), { textContent: k }));
  const body = table.createTBody();
  for (const [name, m] of models) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    for (const k of keys) row.insertCell().textContent = fmt(m[k]);
  }
  const open = Object.assign(document.createElement("button"), { type: "button", textContent: "open eval.html" });
  const failure = Object.assign(document.createElement("p"), { className: "failure" });
  failure.setAttribute("role", "alert");
  open.addEventListener("click", () => showReport(ev.html, name, failure));
  const wrap = document.createElement("div");
  wrap.append(table, open, failure);
  return wrap;
}

// The report is fetched with the key (a plain link could not send it) and shown in the dialog's sandboxed frame:
// an opaque origin with no opener, so a script in it cannot read this tab's key nor call the API with it.
async function showReport(url, name, failure) {
  failure.textContent = "";
  try {
    const res = await ok(await api(url));
    $("#report-frame").srcdoc = await res.text();
  } catch (e) {
    failure.textContent = `eval.html of ${name}: ${e.message}`;
    return;
  }
  $("#report-title").textContent = `lorakit eval of ${name}`;
  $("#report-dialog").showModal();
}

$("#report-dialog").addEventListener("close", () => $("#report-frame").removeAttribute("srcdoc"));

// ---- compare: every chosen model answers at once, streamed into its column ----
$("#ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  const chosen = ui.models.map((m) => m.id).filter((id) => ui.checked.has(id));
  if (!chosen.length) return;
  if (!$("#multiturn").checked) ui.histories = {};
  const params = { temperature: Number($("#temperature").value), top_p: Number($("#top_p").value),
                   max_tokens: Number($("#max_tokens").value) };
  if ($("#seed").value !== "") params.seed = Number($("#seed").value);
  const user = { role: "user", content: $("#prompt").value };
  const system = $("#system").value.trim();
  const columns = chosen.map((model) => column(model));
  if (ui.reference) columns.push(referenceColumn(ui.reference));
  $("#columns").replaceChildren(...columns);
  $("#send").disabled = true;
  await Promise.all(chosen.map((model, i) => {
    const history = ui.histories[model] || [];
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, user];
    return answer(model, messages, params, columns[i]).then((text) => {
      if (text !== null) ui.histories[model] = [...history, user, { role: "assistant", content: text }];
    });
  }));
  $("#send").disabled = false;
  markDifferences();
});

$("#new-chat").addEventListener("click", () => { ui.histories = {}; $("#columns").replaceChildren(); });
$("#worddiff").addEventListener("change", markDifferences);

function column(model) {
  const col = Object.assign(document.createElement("article"), { className: "column" });
  col.dataset.model = model;
  col.dataset.state = "streaming";
  const title = Object.assign(document.createElement("h2"), { textContent: model });
  const stats = Object.assign(document.createElement("div"), { className: "stats", textContent: "waiting…" });
  const turns = Object.assign(document.createElement("div"), { className: "turns" });
  for (const m of ui.histories[model] || []) {
    turns.append(Object.assign(document.createElement("div"), { className: `turn-${m.role}`, textContent: m.content }));
  }
  turns.append(Object.assign(document.createElement("div"), { className: "turn-user", textContent: $("#prompt").value }));
  const current = Object.assign(document.createElement("div"), { className: "current" });
  turns.append(current);
  col.append(title, stats, turns);
  return col;
}

function referenceColumn(text) {
  const col = Object.assign(document.createElement("article"), { className: "column reference" });
  col.append(Object.assign(document.createElement("h2"), { textContent: "reference answer" }),
             Object.assign(document.createElement("div"), { className: "current", textContent: text }));
  return col;
}

async function answer(model, messages, params, col) {
  const current = col.querySelector(".current"), stats = col.querySelector(".stats");
  const started = performance.now();
  let first = null, text = "", usage = null, finish = null;
  try {
    const res = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...params }),
    });
    const reader = (await ok(res)).body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(chunk.error.code, chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta && choice.delta.content;
          if (delta) {
            first = first ?? performance.now();
            text += delta;
            current.textContent = text;
            stats.textContent = `first token ${((first - started) / 1000).toFixed(2)} s · streaming…`;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
  } catch (e) {
    col.dataset.state = "error";
    current.append(Object.assign(document.createElement("p"), { className: "failure", textContent: e.message }));
    stats.textContent = "failed";
    return null;
  }
  const tokens = usage ? usage.completion_tokens : 0;
  const seconds = (performance.now() - (first ?? started)) / 1000;
  stats.textContent = `first token ${first === null ? "—" : ((first - started) / 1000).toFixed(2) + " s"} · ` +
    `${tokens} tokens · ${seconds > 0 ? (tokens / seconds).toFixed(1) : "—"} tokens/s · finish: ${finish}`;
  col.dataset.text = text;
  col.dataset.state = "done";
  return text;
}

// ---- which answers differ from the base's, word by word on demand ----
function markDifferences() {
  const base = $(`#columns .column[data-model="${CSS.escape(ui.base)}"][data-state="done"]`);
  for (const col of document.querySelectorAll('#columns .column[data-state="done"]')) {
    const current = col.querySelector(".current");
    current.textContent = col.dataset.text;
    col.querySelector(".badge")?.remove();
    col.classList.remove("differs");
    if (!base || col === base) continue;
    if (col.dataset.text.trim() !== base.dataset.text.trim()) {
      col.classList.add("differs");
      col.querySelector("h2").append(Object.assign(document.createElement("span"),
                                                    { className: "badge", textContent: "differs from base" }));
      if ($("#worddiff").checked) current.replaceChildren(...wordDiff(base.dataset.text, col.dataset.text));
    }
  }
}

function wordDiff(before, after) {
  const a = before.split(/(\s+)/), b = after.split(/(\s+)/);
  if (a.length * b.length > 4e6) return [document.createTextNode(after)];  // too long to align: plain text
  const lcs = Array.from({ length: a.length + 1 }, () => new Uint16Array(b.length + 1));
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0, j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) { out.push(document.createTextNode(b[j])); i++; j++; }
    else if (j < b.length && (i === a.length || lcs[i][j + 1] >= lcs[i + 1][j])) {
      out.push(Object.assign(document.createElement("ins"), { textContent: b[j++] }));
    } else out.push(Object.assign(document.createElement("del"), { textContent: a[i++] }));
  }
  return out;
}

// ---- views ----
for (const [tab, section] of [["#tab-compare", "#compare"], ["#tab-runs", "#runs"]]) {
  $(tab).addEventListener("click", () => {
    for (const [t, s] of [["#tab-compare", "#compare"], ["#tab-runs", "#runs"]]) {
      $(t).setAttribute("aria-pressed", String(t === tab));
      $(s).hidden = s !== section;
    }
  });
}

refresh();
setInterval(refresh, 1500);
