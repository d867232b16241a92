// crq browser UI: plain JS, no build step, no external resources.
// Everything shown comes from the JSON API (SPEC section 4) with the token logged in with:
// a personal token (`crq token`) or the admin token. GET /whoami says who that is and what
// the role allows (SPEC section 9); only the actions allowed are offered (the server
// refuses the others anyway). A server without /whoami (404, before roles) is the
// admin-token view of old: everything offered.
"use strict";

const API = "/api/v1";
const PAGE = 50;
const TAIL = 16384; // bytes of a job's log the detail panel shows (its end)
const STATES = ["queued", "waiting", "running", "done", "failed", "stopped", "lost"];
const $ = (id) => document.getElementById(id);

const CHARTS_EVERY = 10000; // ms between the charts' fetches (the server samples every 10 s)

const ui = {
  token: "",
  me: null, // GET /whoami's answer for ui.token (null: not asked yet)
  view: "jobs", // the tab shown: jobs, failed, taskers, charts
  after: 0, // the `before=` of the jobs page shown (0: the newest)
  next: null, // the `next` the server gave for that page
  selected: null, // job id shown in the detail panel
  back: [], // the `before=` of the pages before, for « newer
  page: [], // the jobs of the page shown, as the server sent them (newest first)
  sort: { key: "id", desc: true }, // the jobs table's order (of the page shown)
  users: [], // the users the server saw, for the user filter
  failed: [], // the failed view's jobs
  checked: new Set(), // ids ticked in the failed view
  chartsAt: 0, // when the charts were last fetched (ms)
  busy: false,
  again: false, // a refresh was asked for while one was running
  timer: null,
};

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (body && body.error) || "http_error";
    this.body = body || {};
  }
}

// ---- small helpers ------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c ?? ""));
  return e;
}

function age(t) {
  if (t === null || t === undefined) return "";
  let s = Math.max(0, Date.now() / 1000 - t);
  if (s < 60) return `${Math.round(s)}s ago`;
  s /= 60;
  if (s < 60) return `${Math.round(s)}m ago`;
  s /= 60;
  if (s < 48) return `${s.toFixed(1)}h ago`;
  return `${(s / 24).toFixed(1)}d ago`;
}

function stamp(t) {
  if (t === null || t === undefined) return "";
  const d = new Date(t * 1000);
  return `${d.toLocaleString()} (${age(t)})`;
}

function stateTag(state) {
  return el("span", { class: `state st-${state}` }, state);
}

function showMsg(text, kind) {
  const m = $("msg");
  m.textContent = text;
  m.className = `msg ${kind || "error"}`;
  m.hidden = !text;
}

function fill(tbody, rows, emptyId) {
  tbody.replaceChildren(...rows);
  $(emptyId).hidden = rows.length > 0;
}

// ---- API ----------------------------------------------------------------------------

async function call(method, path, body) {
  const opts = { method, headers: { Authorization: `Bearer ${ui.token}` } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(API + path, opts);
  } catch (e) {
    throw new ApiError(0, { error: "unreachable", message: `server unreachable (${e.message})` });
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// GET of a body that is not JSON (a job's log): the response, or an ApiError as call()'s.
async function callRaw(path) {
  let resp;
  try {
    resp = await fetch(API + path, { headers: { Authorization: `Bearer ${ui.token}` } });
  } catch (e) {
    throw new ApiError(0, { error: "unreachable", message: `server unreachable (${e.message})` });
  }
  if (!resp.ok) {
    let data = null;
    try {
      data = await resp.json();
    } catch (e) {
      data = null;
    }
    throw new ApiError(resp.status, data);
  }
  return resp;
}

function explain(err) {
  if (err.status === 401) return `Bad token: ${err.message}. Log in with a valid token again.`;
  if (err.status === 0) return err.message;
  return `${err.code}: ${err.message}`;
}

// ---- who is logged in, and what the role allows --------------------------------------

const ALL = { read: true, submit: true, control_all: true, admin: true };

async function whoami() {
  try {
    const me = await call("GET", "/whoami");
    return { ...me, may: { ...ALL, ...(me.may || {}) } };
  } catch (err) {
    if (err.status !== 404) throw err;
    // a server before roles: one admin token, everything allowed, as this UI always did
    return { user: null, role: "admin", via: "admin_token", groups: [], may: ALL, legacy: true };
  }
}

function may(what) {
  return !!(ui.me && ui.me.may && ui.me.may[what]);
}

// Stop, rerun and forget: an operator or admin on any job, a user on its own only.
function mayControl(job) {
  if (may("control_all")) return true;
  return may("submit") && !!ui.me.user && job.user === ui.me.user;
}

function renderMe() {
  const me = ui.me;
  const who = $("who");
  who.hidden = !me;
  if (!me) return;
  const how = { munge: "MUNGE", token: "personal token", admin_token: "admin token" }[me.via]
    || me.via;
  who.replaceChildren(
    el("span", { id: "who-user" }, me.user || "admin token"),
    el("span", { id: "who-role", class: `role role-${me.role}` }, me.role),
    el("span", { class: "muted", title: (me.groups || []).join(" ") }, `via ${how}`),
  );
  $("submit-card").hidden = !may("submit");
  renderChecked();
  $("admin").hidden = !may("control_all");
  $("a-stop").hidden = !may("admin");
}

// ---- rendering ----------------------------------------------------------------------

function renderServer(info) {
  $("queue").textContent = info.queue;
  document.title = `crq · ${info.queue}`;
  const mode = $("mode");
  mode.textContent = info.mode;
  mode.className = `badge mode-${info.mode}`;
  $("where").textContent = `${info.url} · pid ${info.pid} · v${info.version}`;
  const counts = info.counts || {};
  const filter = $("filter").value;
  $("counts").replaceChildren(
    ...STATES.map((s) =>
      el("button", { type: "button", class: `count ${filter === s ? "on" : ""}`,
        title: `show ${s} jobs`, "data-state": s, onclick: () => setFilter(filter === s ? "" : s) },
      stateTag(s), el("b", {}, counts[s] || 0))),
    el("span", { class: "muted" }, `${info.taskers} tasker(s)`),
  );
  renderRecovery(info.mode === "recovering" ? info.recovery || {} : null);
  const full = info.journal && info.journal.disk_full_since;
  if (full) {
    showMsg(`The server's disk is full (since ${stamp(full)}): every change waits for space.`);
    $("msg").classList.add("stale"); // cleared by the next answer of a server with space
  }
}

function renderRecovery(rec) {
  $("recovery").hidden = !rec;
  $("app").classList.toggle("dim", !!rec); // what is shown is as of before the crash
  if (!rec) return;
  const expected = rec.expected || [];
  const back = rec.reconnected || [];
  const missing = rec.missing || expected.filter((n) => !back.includes(n));
  const left = rec.seconds_left ?? 0;
  $("recovery-text").textContent =
    `Taskers back: ${back.length} of ${expected.length} expected` +
    (missing.length ? ` (waiting for ${missing.join(", ")})` : "") +
    ` · ${Math.ceil(left)} s left of the grace period · ` +
    `${rec.events_replayed ?? 0} journal events replayed. ` +
    "Clients are refused until recovery ends; running jobs keep running.";
  const pct = expected.length ? (100 * back.length) / expected.length : 100;
  $("recovery-bar").style.width = `${pct}%`;
}

function sortValue(j, key) {
  const v = j[key];
  if (key === "exit_code") return v ?? (j.signal ? 1000 + j.signal : -1);
  if (key === "state") return STATES.indexOf(v);
  if (v === null || v === undefined) return "";
  return typeof v === "string" ? v.toLowerCase() : v;
}

function sorted(jobs) {
  const { key, desc } = ui.sort;
  const out = [...jobs];
  out.sort((a, b) => {
    const x = sortValue(a, key);
    const y = sortValue(b, key);
    const c = x < y ? -1 : x > y ? 1 : b.id - a.id; // ties: newest first
    return desc ? -c : c;
  });
  return out;
}

function setSort(key) {
  ui.sort = { key, desc: ui.sort.key === key ? !ui.sort.desc : key === "id" || key === "submitted" };
  renderJobs({ jobs: ui.page, next: ui.next, users: ui.users });
}

function renderUsers(users) {
  const sel = $("user-filter");
  const want = sel.value;
  const all = [...new Set([...(users || []), ...(want ? [want] : [])])].sort();
  if (all.join("\n") === ui.users.join("\n")) return;
  ui.users = all;
  sel.replaceChildren(el("option", { value: "" }, "all"),
    ...all.map((u) => el("option", { value: u }, u)));
  sel.value = want;
}

function renderJobs(page) {
  ui.next = page.next;
  ui.page = page.jobs;
  renderUsers(page.users);
  for (const th of $("jobs").tHead.rows[0].cells) {
    th.classList.toggle("asc", th.dataset.sort === ui.sort.key && !ui.sort.desc);
    th.classList.toggle("desc", th.dataset.sort === ui.sort.key && ui.sort.desc);
  }
  const rows = sorted(page.jobs).map((j) =>
    el("tr", { class: j.id === ui.selected ? "sel" : "", "data-id": j.id,
      onclick: () => select(j.id) },
    el("td", {}, j.id), el("td", {}, stateTag(j.state)), el("td", {}, j.priority),
    el("td", {}, j.user), el("td", {}, j.name || ""), el("td", {}, j.tasker || ""),
    el("td", { title: stamp(j.submitted) }, age(j.submitted)),
    el("td", {}, j.exit_code ?? (j.signal ? `sig ${j.signal}` : ""))));
  fill($("jobs").tBodies[0], rows, "jobs-empty");
  $("next").disabled = page.next === null;
  $("prev").disabled = ui.back.length === 0;
  const ids = page.jobs.map((j) => j.id);
  $("jobs-range").textContent = ids.length
    ? `${ids.length} job(s), ids ${Math.min(...ids)}–${Math.max(...ids)}` : "";
}

function resourceCells(t) {
  const cap = t.capacity || {};
  const free = t.free || {};
  const words = Object.keys(cap).sort().map((k) =>
    el("span", { class: `res ${(free[k] ?? 0) <= 0 ? "short" : ""}` }, `${k} ${free[k] ?? 0}/${cap[k]}`));
  for (const a of t.attributes || []) words.push(el("span", { class: "res muted" }, a));
  return words;
}

function renderTaskers(list) {
  const rows = list.map((t) => {
    const used = t.slots - t.free_slots;
    const pct = t.slots ? Math.round((100 * used) / t.slots) : 0;
    const jobs = t.running.slice(0, 12).map((id) =>
      el("a", { class: "job", href: "#", "data-job": id,
        onclick: (ev) => { ev.preventDefault(); showView("jobs"); select(id); } }, id));
    if (t.running.length > 12) jobs.push(el("span", { class: "muted" }, `+${t.running.length - 12}`));
    return el("tr", { "data-name": t.name },
      el("td", {}, t.name), el("td", {}, t.host), el("td", {}, stateTag(t.state)),
      el("td", { class: "load-cell", title: `${used} of ${t.slots} slots in use` },
        el("span", { class: "load" }, Object.assign(el("div", {}), { style: `width:${pct}%` })),
        `${pct}%`),
      el("td", {}, `${used}/${t.slots}`), el("td", {}, ...resourceCells(t)),
      el("td", { class: "running" }, ...(jobs.length ? jobs : ["—"])),
      el("td", { title: stamp(t.last_contact) }, t.last_contact ? age(t.last_contact) : "never"));
  });
  fill($("taskers").tBodies[0], rows, "taskers-empty");
}

// ---- failed-job triage ----------------------------------------------------------------

function renderFailed(page) {
  ui.failed = page.jobs;
  const ids = new Set(page.jobs.map((j) => j.id));
  for (const id of [...ui.checked]) if (!ids.has(id)) ui.checked.delete(id);
  const rows = page.jobs.map((j) => {
    const box = el("input", { type: "checkbox", class: "pick", "data-id": j.id,
      onclick: (ev) => { ev.stopPropagation(); check(j.id, ev.target.checked); } });
    box.checked = ui.checked.has(j.id);
    return el("tr", { "data-id": j.id, class: ui.checked.has(j.id) ? "checked" : "",
      onclick: () => select(j.id) },
    el("td", {}, box), el("td", {}, j.id), el("td", {}, stateTag(j.state)), el("td", {}, j.user),
    el("td", {}, j.name || ""), el("td", {}, j.exit_code ?? (j.signal ? `sig ${j.signal}` : "")),
    el("td", { class: "reason" }, j.reason || ""), el("td", {}, j.tasker || ""),
    el("td", { title: stamp(j.ended) }, age(j.ended)));
  });
  fill($("failed").tBodies[0], rows, "failed-empty");
  renderChecked();
}

function check(id, on) {
  if (on) ui.checked.add(id);
  else ui.checked.delete(id);
  for (const tr of $("failed").tBodies[0].rows) {
    if (Number(tr.dataset.id) === id) tr.classList.toggle("checked", on);
  }
  renderChecked();
}

function renderChecked() {
  const n = ui.checked.size;
  const b = $("f-rerun");
  b.disabled = n === 0 || !may("submit");
  b.textContent = n ? `Rerun selected (${n})` : "Rerun selected";
  $("f-all").checked = n > 0 && n === ui.failed.length;
}

async function rerunChecked() {
  const ids = [...ui.checked].sort((a, b) => a - b);
  if (!ids.length) return;
  let ok = 0;
  const refused = [];
  for (let at = 0; at < ids.length; at += 10000) { // one request per 10,000 (the server's limit)
    let answer;
    try {
      answer = await call("POST", "/control", { action: "rerun", ids: ids.slice(at, at + 10000) });
    } catch (err) {
      handle(err);
      return;
    }
    for (const r of answer.results) { // each job with its own rights and answer
      if (r.status === 200) {
        ok += 1;
        ui.checked.delete(r.id);
      } else {
        refused.push(`${r.id} (${r.message})`);
      }
    }
  }
  showMsg(`reran ${ok} job(s)` + (refused.length ? `; refused: ${refused.join(", ")}` : ""),
    refused.length ? "error" : "info");
  refresh();
}

function renderDetail(j) {
  $("detail").hidden = false;
  $("d-id").textContent = j.id;
  $("d-state").replaceWith(Object.assign(stateTag(j.state), { id: "d-state" }));
  const cmd = Array.isArray(j.command) ? j.command.map((a) => JSON.stringify(a)).join(" ")
    : j.command;
  const fields = [
    ["command", el("code", {}, cmd)], ["cwd", el("code", {}, j.cwd)],
    ["log", el("code", {}, j.log)], ["name", j.name || ""], ["user", j.user],
    ["priority", j.priority], ["resources", j.resources || "—"],
    ["attempt", `${j.attempt} of ${j.max_attempts}${j.rerunnable ? "" : " (not rerunnable)"}`],
    ["tasker", j.tasker ? `${j.tasker} on ${j.host || "?"} pid ${j.pid ?? "?"}` : "—"],
    ["submitted", stamp(j.submitted)], ["started", stamp(j.started) || "—"],
    ["ended", stamp(j.ended) || "—"],
    ["exit code", j.exit_code ?? (j.signal ? `signal ${j.signal}` : "—")],
  ];
  if (j.reason) fields.push(["reason", j.reason]);
  $("d-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const rows = (j.attempts || []).map((a) =>
    el("tr", {},
      el("td", {}, a.attempt), el("td", {}, a.tasker || ""), el("td", {}, a.host || ""),
      el("td", { title: stamp(a.started) }, age(a.started)),
      el("td", { title: stamp(a.ended) }, age(a.ended)),
      el("td", {}, a.outcome || ""), el("td", {}, a.exit_code ?? "")));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "none yet")));
  $("d-attempts").tBodies[0].replaceChildren(...rows);
  const mine = mayControl(j);
  $("d-actions").hidden = !mine;
  $("d-notyours").hidden = mine || !ui.me;
  $("d-notyours").textContent = !may("submit")
    ? `role ${ui.me && ui.me.role}: read only`
    : `job of ${j.user}: only an operator or admin may control it`;
  const live = j.state === "queued" || j.state === "waiting" || j.state === "running";
  $("d-stop").disabled = !live;
  $("d-hold").hidden = j.held || !(j.state === "queued" || j.state === "waiting");
  $("d-release").hidden = !j.held;
  $("d-rerun").disabled = live;
  $("d-forget").disabled = j.state === "running";
  if (j.state !== "queued" && j.state !== "waiting") $("d-why").hidden = true;
}

function renderWhy(w) {
  const box = $("d-why");
  box.hidden = !(w.state === "queued" || w.state === "waiting");
  if (box.hidden) return;
  $("d-why-reasons").replaceChildren(...w.reasons.map((r) => el("li", {}, r)));
  const deps = w.dependencies || [];
  $("d-deps").hidden = deps.length === 0;
  $("d-deps").tBodies[0].replaceChildren(...deps.map((d) =>
    el("tr", { "data-job": d.job },
      el("td", {}, d.type), el("td", {}, el("a", { class: "job", href: "#",
        onclick: (ev) => { ev.preventDefault(); select(d.job); } }, d.job)),
      el("td", {}, stateTag(d.state)),
      el("td", { class: d.met ? "yes" : d.met === false ? "no" : "muted" },
        d.met ? "met" : d.met === false ? "never met" : "not yet"))));
  const taskers = w.taskers || [];
  $("d-why-taskers").hidden = taskers.length === 0;
  $("d-why-taskers").tBodies[0].replaceChildren(...taskers.map((t) =>
    el("tr", { "data-name": t.name },
      el("td", {}, t.name),
      el("td", { class: t.could ? "yes" : "no" }, t.now ? "yes, now" : t.could ? "yes, when free" : "no"),
      el("td", {}, t.why_not.join("; ") || "—"))));
}

// ---- charts (inline SVG, drawn here) ----------------------------------------------------

const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fd0", "#b59a5b", "#2e8b57", "#c0392b", "#7d3c98"];

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function clock(t) {
  const d = new Date(t * 1000);
  return `${String(d.getHours()).padStart(2, "0")}:${String(d.getMinutes()).padStart(2, "0")}`;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// One chart: series = [{label, points: [[t, v|null], …]}], over [t0, t1]; a gap of more than
// three sampling intervals (the server was down) breaks the line.
function drawChart(fig, title, unit, series, t0, t1, interval) {
  const W = 520, H = 180, L = 44, R = 8, T = 8, B = 22;
  let max = 0;
  for (const s of series) for (const [, v] of s.points) if (v !== null && v > max) max = v;
  max = niceMax(max);
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": title });
  for (let i = 0; i <= 4; i++) {
    const v = (max * i) / 4;
    g.append(svg("line", { class: i ? "grid" : "axis", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    const label = Number.isInteger(v) ? v : v < 1 ? Number(v.toPrecision(2)) : v.toFixed(1);
    g.append(svg("text", { x: L - 4, y: y(v) + 3, "text-anchor": "end" }, label));
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + ((t1 - t0) * i) / 4;
    g.append(svg("text", { x: x(t), y: H - 6, "text-anchor": i === 0 ? "start" : i === 4 ? "end" : "middle" },
      clock(t)));
  }
  let drawn = 0;
  series.forEach((s, k) => {
    const color = COLORS[k % COLORS.length];
    let seg = [];
    let last = null;
    const flush = () => {
      if (seg.length === 1) seg.push([seg[0][0] + 0.5, seg[0][1]]);
      if (seg.length > 1) {
        g.append(svg("polyline", { class: "line", stroke: color, "data-series": s.label,
          points: seg.map(([a, b]) => `${a.toFixed(1)},${b.toFixed(1)}`).join(" ") }));
        drawn += 1;
      }
      seg = [];
    };
    for (const [t, v] of s.points) {
      if (v === null || (last !== null && t - last > 3 * interval)) flush();
      if (v !== null) seg.push([x(t), y(v)]);
      last = t;
    }
    flush();
  });
  const legend = el("div", { class: "legend" }, ...series.map((s, k) => {
    const now = [...s.points].reverse().find(([, v]) => v !== null);
    const i = el("i", {});
    i.style.background = COLORS[k % COLORS.length];
    return el("span", {}, i, `${s.label}: ${now ? fmt(now[1]) : "—"}${unit}`);
  }));
  fig.replaceChildren(el("figcaption", {}, title), g, legend);
  fig.dataset.lines = String(drawn);
}

function fmt(v) {
  return Number.isInteger(v) ? String(v) : v.toFixed(v < 10 ? 2 : 1);
}

async function loadCharts() {
  const span = Number($("range").value);
  const out = await call("GET", `/stats/series?since=${-span}`);
  ui.chartsAt = Date.now();
  const f = Object.fromEntries(out.fields.map((name, i) => [name, i]));
  const rows = out.samples;
  const now = Date.now() / 1000;
  const t0 = rows.length ? Math.max(now - span, rows[0][f.t] - out.interval) : now - span;
  const pick = (name, scale) => rows.map((r) => [r[f.t], r[f[name]] === null ? null : r[f[name]] * (scale || 1)]);
  // throughput as jobs a minute: each sample counts the jobs ended since the one before
  const perMin = 60 / out.interval;
  const ended = rows.map((r) => [r[f.t], (r[f.done] + r[f.failed] + r[f.stopped]) * perMin]);
  const iv = out.interval;
  drawChart($("chart-depth"), "Queue depth", "", [
    { label: "queued", points: pick("queued") }, { label: "waiting", points: pick("waiting") },
  ], t0, now, iv);
  drawChart($("chart-running"), "Running jobs", "", [
    { label: "running", points: pick("running") }, { label: "slots", points: pick("slots") },
  ], t0, now, iv);
  drawChart($("chart-throughput"), "Throughput (jobs ended a minute)", "/min", [
    { label: "ended", points: ended }, { label: "failed", points: pick("failed", perMin) },
  ], t0, now, iv);
  drawChart($("chart-wait"), "Wait, submit to start (jobs ended)", " s", [
    { label: "mean", points: pick("wait_mean") }, { label: "max", points: pick("wait_max") },
  ], t0, now, iv);
  $("charts-note").textContent =
    `${rows.length} sample(s), one every ${out.interval} s` + (rows.length ? "" : ": none yet");
}

// ---- refresh loop -------------------------------------------------------------------

function jobsQuery(before, limit) {
  const q = new URLSearchParams({ limit });
  if (before) q.set("before", before);
  if ($("filter").value) q.set("state", $("filter").value);
  if ($("user-filter").value) q.set("user", $("user-filter").value);
  if ($("search").value.trim()) q.set("q", $("search").value.trim());
  return `/dash/jobs?${q}`;
}

// The server examines a bounded number of ids per request, so a sparse filter over a big
// queue can answer a short page with a `next`: follow it (a few hops) to fill the page.
async function fetchJobs() {
  const jobs = [];
  let after = ui.after;
  let next = null;
  let users = [];
  for (let hop = 0; hop < 20; hop++) {
    const page = await call("GET", jobsQuery(after, PAGE - jobs.length));
    jobs.push(...page.jobs);
    users = [...new Set([...users, ...(page.users || [])])];
    next = page.next;
    if (next === null || jobs.length >= PAGE) break;
    after = next;
  }
  return { jobs, next, users };
}

async function refresh() {
  if (!ui.token) return;
  if (ui.busy) {
    ui.again = true;
    return;
  }
  ui.busy = true;
  try {
    if (!ui.me) {
      ui.me = await whoami(); // answers during recovery too
      renderMe();
    }
    const info = await call("GET", "/server"); // answers during recovery too
    if ($("msg").classList.contains("stale")) showMsg("");
    renderServer(info);
    showLoggedIn(true);
    if (info.mode === "recovering") return; // every other client call would be a 503
    const failed = call("GET", "/dash/jobs?state=failed,lost&limit=500");
    const [page, taskers, bad] = await Promise.all([
      ui.view === "jobs" ? fetchJobs() : null, call("GET", "/taskers"), failed]);
    if (page) renderJobs(page);
    renderTaskers(taskers.taskers);
    renderFailed(bad);
    $("failed-count").textContent = bad.jobs.length ? String(bad.jobs.length) : "";
    if (ui.view === "charts" && Date.now() - ui.chartsAt > CHARTS_EVERY) await loadCharts();
    if (ui.selected !== null) await loadDetail();
  } catch (err) {
    handle(err);
  } finally {
    ui.busy = false;
    if (ui.again) {
      ui.again = false;
      refresh();
    }
  }
}

function handle(err) {
  if (!(err instanceof ApiError)) {
    showMsg(`UI error: ${err.message}`);
    return;
  }
  if (err.code === "crash_recovery") {
    renderRecovery(err.body.recovery || {});
    $("mode").textContent = "recovering";
    $("mode").className = "badge mode-recovering";
    return;
  }
  showMsg(explain(err));
  if (err.status === 0) $("msg").classList.add("stale"); // cleared once the server answers
  if (err.status === 401) {
    ui.me = null;
    renderMe();
    showLoggedIn(false);
  }
}

// The end of the job's log (GET /jobs/{id}/log): one request for a short log, a second one
// for the last TAIL bytes of a long one. A refusal (another user's job) is said in the note.
async function loadLog(j) {
  const pre = $("d-log");
  const note = $("d-log-note");
  try {
    let resp = await callRaw(`/jobs/${j.id}/log?max=${TAIL}`);
    const size = Number(resp.headers.get("X-Crq-Log-Size") || 0);
    let from = 0;
    if (size > TAIL) {
      from = size - TAIL;
      resp = await callRaw(`/jobs/${j.id}/log?offset=${from}&max=${TAIL}`);
    }
    const text = new TextDecoder().decode(await resp.arrayBuffer());
    if (ui.selected !== j.id) return; // another job was chosen meanwhile
    const pinned = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.textContent = text;
    if (pinned) pre.scrollTop = pre.scrollHeight; // follow the end, unless scrolled up
    if (resp.headers.get("X-Crq-Log-Missing") === "1") {
      const notYet = j.state === "queued" || j.state === "waiting";
      note.textContent = notYet ? "(not started yet)" : "(no log file)";
    } else {
      note.textContent = from ? `(last ${TAIL / 1024} KiB of ${size} bytes)` : `(${size} bytes)`;
    }
  } catch (err) {
    if (!(err instanceof ApiError) || err.status === 401 || err.status === 503) throw err;
    if (ui.selected !== j.id) return;
    pre.textContent = "";
    note.textContent = `(${err.message})`;
  }
}

async function loadDetail() {
  try {
    const j = await call("GET", `/jobs/${ui.selected}`);
    if (ui.selected !== j.id) return;
    renderDetail(j);
    if (j.state === "queued" || j.state === "waiting") {
      const w = await call("GET", `/jobs/${j.id}/why`);
      if (ui.selected === j.id) renderWhy(w);
    }
    await loadLog(j);
  } catch (err) {
    if (err.status !== 404) throw err;
    showMsg(`job ${ui.selected} no longer exists`, "info");
    closeDetail();
  }
}

function restartTimer() {
  clearInterval(ui.timer);
  ui.timer = $("auto").checked ? setInterval(refresh, 2000) : null;
}

// ---- actions ------------------------------------------------------------------------

function select(id) {
  if (ui.selected !== id) {
    $("d-log").textContent = "";
    $("d-log-note").textContent = "";
    $("d-why").hidden = true;
  }
  ui.selected = id;
  for (const tr of $("jobs").tBodies[0].rows) tr.classList.toggle("sel", tr.dataset.id == id);
  loadDetail().catch(handle);
}

function closeDetail() {
  ui.selected = null;
  $("detail").hidden = true;
  for (const tr of $("jobs").tBodies[0].rows) tr.classList.remove("sel");
}

function showView(view) {
  ui.view = view;
  for (const b of $("tabs").querySelectorAll("button")) b.classList.toggle("on", b.dataset.view === view);
  for (const v of ["jobs", "failed", "taskers", "charts"]) $(`view-${v}`).hidden = v !== view;
  if (view === "charts") ui.chartsAt = 0; // fetch now
  refresh();
}

function setFilter(state) {
  if (ui.view !== "jobs") showView("jobs");
  $("filter").value = state;
  ui.after = 0;
  ui.back = [];
  refresh();
}

async function act(verb) {
  const id = ui.selected;
  if (id === null) return;
  try {
    if (verb === "forget") {
      if (!window.confirm(`Forget job ${id}? It disappears from the queue for good.`)) return;
      await call("DELETE", `/jobs/${id}`);
      closeDetail();
      showMsg(`job ${id} forgotten`, "info");
    } else {
      const job = await call("POST", `/jobs/${id}/${verb}`);
      renderDetail(job);
      showMsg(`job ${id}: ${verb} accepted, now ${job.state}`, "info");
    }
  } catch (err) {
    handle(err);
  }
  refresh();
}

async function sanity() {
  try {
    const out = await call("POST", "/server/sanity?fix=0");
    const found = (out.findings || []).length;
    showMsg(out.ok ? "sanity check: ok" : `sanity check: ${found} finding(s)`,
      out.ok ? "info" : "error");
  } catch (err) {
    handle(err);
  }
}

async function stopServer() {
  if (!window.confirm("Stop the server? Clients are refused until it is started again.")) return;
  try {
    await call("POST", "/server/stop", { freeze: false });
    showMsg("server stopping", "info");
  } catch (err) {
    handle(err);
  }
}

async function submitJob(ev) {
  ev.preventDefault();
  const spec = { command: $("s-command").value, cwd: $("s-cwd").value || "/tmp" };
  if ($("s-name").value) spec.name = $("s-name").value;
  if ($("s-priority").value) spec.priority = Number($("s-priority").value);
  if ($("s-resources").value) spec.resources = $("s-resources").value;
  try {
    const out = await call("POST", "/jobs", spec);
    showMsg(`submitted job ${out.ids.join(", ")}`, "info");
    $("s-command").value = "";
    refresh();
  } catch (err) {
    handle(err);
  }
}

function showLoggedIn(yes) {
  $("login").hidden = yes;
  $("app").hidden = !yes;
  $("logout").hidden = !yes;
  if (!yes) $("token").focus();
}

function useToken(token) {
  ui.token = token.trim();
  ui.me = null;
  localStorage.setItem("crq.token", ui.token);
  showMsg("");
  refresh();
}

function init() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    localStorage.setItem("crq.token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search); // hide it again
  }
  ui.token = localStorage.getItem("crq.token") || "";
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    useToken($("token").value);
  });
  $("logout").addEventListener("click", () => {
    localStorage.removeItem("crq.token");
    ui.token = "";
    ui.me = null;
    renderMe();
    closeDetail();
    showMsg("");
    showLoggedIn(false);
  });
  $("a-sanity").addEventListener("click", sanity);
  $("a-stop").addEventListener("click", stopServer);
  $("auto").addEventListener("change", restartTimer);
  $("filter").addEventListener("change", () => setFilter($("filter").value));
  $("user-filter").addEventListener("change", () => setFilter($("filter").value));
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => setFilter($("filter").value), 250);
  });
  for (const th of $("jobs").tHead.rows[0].cells) {
    th.addEventListener("click", () => setSort(th.dataset.sort));
  }
  for (const b of $("tabs").querySelectorAll("button")) {
    b.addEventListener("click", () => showView(b.dataset.view));
  }
  $("f-all").addEventListener("change", (ev) => {
    const on = ev.target.checked; // check() below sets the box as it goes
    for (const j of ui.failed) check(j.id, on);
  });
  $("f-rerun").addEventListener("click", rerunChecked);
  $("range").addEventListener("change", () => {
    ui.chartsAt = 0;
    loadCharts().catch(handle);
  });
  $("prev").addEventListener("click", () => {
    ui.after = ui.back.pop() ?? 0;
    refresh();
  });
  $("next").addEventListener("click", () => {
    if (ui.next === null) return;
    ui.back.push(ui.after);
    ui.after = ui.next;
    refresh();
  });
  $("d-close").addEventListener("click", closeDetail);
  $("d-stop").addEventListener("click", () => act("stop"));
  $("d-rerun").addEventListener("click", () => act("rerun"));
  $("d-hold").addEventListener("click", () => act("hold"));
  $("d-release").addEventListener("click", () => act("release"));
  $("d-forget").addEventListener("click", () => act("forget"));
  $("submit").addEventListener("submit", submitJob);
  if (ui.token) refresh();
  else showLoggedIn(false);
  restartTimer();
}

init();
