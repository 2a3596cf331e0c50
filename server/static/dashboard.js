// snapstore dashboard: polls the REST API of the server that served this page.
// No build step, no dependencies, nothing fetched from elsewhere (the server's
// Content-Security-Policy forbids it). All text from the store goes through
// textContent, never innerHTML. A token, if the server needs one, comes from
// the URL fragment (#token=...), which browsers never send to the server.
"use strict";

const POLL_MS = 1000;
const EVENTS = 50;
const RANK = { healthy: 0, degraded: 1, lost: 2 };

function token() {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  return params.get("token");
}

async function get(path) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) {
    throw new Error("this server needs its token: open the page as /#token=<token>");
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok && !(path === "healthz" && r.status === 503)) {
    throw new Error(path + ": HTTP " + r.status + " " + (body.detail || ""));
  }
  return body;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function short(id) {
  return id ? id.slice(0, 12) : "-";
}

function worst(a, b) {
  return RANK[a] >= RANK[b] ? a : b;
}

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

// Columns of the grid: the store's current stripe groups, then any group of a
// job's latest step that is not one of them any more (a group with a lost
// node, before re-protection regroups it).
function gridColumns(nodesResp, details) {
  const cols = [];
  const seen = new Map();
  const add = (members, label) => {
    const key = [...members].sort().join(",");
    if (seen.has(key)) return seen.get(key);
    const col = { label, members: new Set(members), stripes: [] };
    seen.set(key, col);
    cols.push(col);
    return col;
  };
  nodesResp.groups.forEach((g, i) => add(g, "group " + i));
  for (const d of details) {
    d.groups.forEach((g, i) => {
      const col = add(g, d.job + " step " + d.step + " group " + i);
      for (const s of d.stripes) {
        if (s.group === i) col.stripes.push({ job: d.job, step: d.step, stripe: s });
      }
    });
  }
  return cols;
}

function renderGrid(nodesResp, details) {
  const table = document.getElementById("grid");
  const cols = gridColumns(nodesResp, details);
  const status = new Map(nodesResp.nodes.map((n) => [n.node_id, n.status]));
  const rows = nodesResp.nodes.map((n) => n.node_id);
  for (const c of cols) for (const m of c.members) if (!status.has(m)) { status.set(m, "lost"); rows.push(m); }
  const head = el("tr", {}, el("th", {}, "node"), el("th", {}, "status"),
    ...cols.map((c) => el("th", {}, c.label)));
  const body = [];
  let overall = "healthy";
  for (const node of rows) {
    const st = status.get(node);
    const cells = cols.map((c) => {
      if (!c.members.has(node)) return el("td", { class: "cell none", "data-status": "none" }, "");
      let h = "healthy";
      const roles = [];
      for (const { job, step, stripe } of c.stripes) {
        const mine = stripe.members.find((m) => m.node === node);
        if (!mine) continue;
        h = worst(h, stripe.status);
        roles.push(job + "@" + step + " stripe " + stripe.stripe + " " + mine.role + " " +
          stripe.status + " (can lose " + stripe.can_lose + ")");
      }
      // A suspect node is only silent: still read from, its data counted (as the
      // store does); it is marked, not shown down.
      const up = st === "alive" || st === "suspect";
      const cls = up ? h : "down";
      overall = worst(overall, up ? h : "degraded");
      const text = st === "alive" ? h : st === "suspect" ? h + " (silent)" : st;
      return el("td", {
        class: "cell " + cls + (st === "suspect" ? " suspect" : ""), "data-node": node,
        "data-group": c.label, "data-status": cls,
        title: roles.join("\n") || "no stripes with data yet",
      }, text);
    });
    body.push(el("tr", { "data-node": node, "data-node-status": st },
      el("td", { class: "node", title: node }, short(node)), el("td", {}, st), ...cells));
  }
  for (const d of details) overall = worst(overall, d.redundancy ? d.redundancy.status : "healthy");
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...body);
  table.dataset.health = overall;
}

function renderJobs(jobsResp, details) {
  const byJob = new Map(details.map((d) => [d.job, d]));
  const rows = jobsResp.jobs.map((j) => {
    const d = byJob.get(j.job);
    const r = j.redundancy;
    return el("tr", { "data-job": j.job, "data-status": j.status },
      el("td", { class: "mono" }, j.job),
      el("td", {}, j.world_size),
      el("td", { "data-latest": j.latest_step === null ? "" : j.latest_step },
        j.latest_step === null ? "-" : j.latest_step),
      el("td", {}, el("span", { class: "badge", "data-status": j.status }, j.status)),
      el("td", {}, r ? r.can_lose : "-"),
      el("td", {}, r ? r.healthy + " healthy, " + r.degraded + " degraded, " + r.lost + " lost" : "-"),
      el("td", {}, j.pending_steps.join(", ") || "-"),
      el("td", {}, j.last_commit_latency === null ? "-" : (j.last_commit_latency * 1000).toFixed(0) + " ms"),
      el("td", {}, j.status_detail || (d ? fmtBytes(d.data_bytes) + " data, " +
        fmtBytes(d.parity_bytes) + " parity" : "")));
  });
  document.querySelector("#jobs tbody").replaceChildren(...rows);
}

// One table per job: its latest step's stripes (columns) by node (rows), each
// cell the node's role in that stripe (D<i> data, P<i> parity).
function renderStripes(details) {
  const out = details.map((d) => {
    const nodes = [...new Set(d.stripes.flatMap((s) => s.members.map((m) => m.node)))];
    const head = el("tr", {}, el("th", {}, "node"),
      ...d.stripes.map((s) => el("th", { title: "can lose " + s.can_lose + " more" },
        "g" + s.group + "/s" + s.stripe)));
    const rows = nodes.map((node) => el("tr", {},
      el("td", { class: "node", title: node }, short(node)),
      ...d.stripes.map((s) => {
        const m = s.members.find((x) => x.node === node);
        if (!m) return el("td", { class: "cell none" }, "");
        const cls = m.alive ? s.status : "down";
        return el("td", { class: "cell " + cls, "data-stripe-status": s.status },
          (m.role === "data" ? "D" : "P") + m.index);
      })));
    const r = d.redundancy;
    return el("div", { class: "stripes", "data-job": d.job },
      el("h3", {}, d.job + " step " + d.step + " (v" + d.version + "): " + r.status +
        ", can lose " + r.can_lose + " more node" + (r.can_lose === 1 ? "" : "s")),
      el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)));
  });
  document.getElementById("stripes").replaceChildren(...out);
}

function renderEvents(eventsResp) {
  const items = eventsResp.events.slice().reverse().map((e) =>
    el("li", { "data-kind": e.kind, value: e.seq },
      el("span", { class: "muted" }, new Date(e.time * 1000).toLocaleTimeString() + " "),
      el("span", { class: "kind" }, e.kind), " ", e.message));
  document.getElementById("events").replaceChildren(...items);
}

function renderHealth(h) {
  const badge = document.getElementById("health");
  badge.dataset.status = h.status;
  badge.textContent = h.status + " · SMPs " + h.smps.alive + "/" + h.smps.total + " alive · jobs " +
    h.jobs.protected + "/" + (h.jobs.protected + h.jobs.unprotected) + " protected";
  document.getElementById("store").textContent = h.store_id || "";
  const age = h.coordinator.snapshot_age;
  document.getElementById("age").textContent =
    age === null ? "no snapshot" : "snapshot " + age.toFixed(1) + " s old";
}

function showError(msg) {
  const e = document.getElementById("error");
  e.hidden = !msg;
  e.textContent = msg || "";
}

let polls = 0;

async function poll() {
  try {
    const [health, nodesResp, jobsResp, eventsResp] = await Promise.all([
      get("healthz"), get("v1/nodes"), get("v1/jobs"), get("v1/events?limit=" + EVENTS),
    ]);
    const committed = jobsResp.jobs.filter((j) => j.latest_step !== null);
    const details = await Promise.all(committed.map((j) =>
      get("v1/jobs/" + encodeURIComponent(j.job) + "/snapshots/latest").catch(() => null)));
    renderHealth(health);
    renderGrid(nodesResp, details.filter((d) => d));
    renderJobs(jobsResp, details.filter((d) => d));
    renderStripes(details.filter((d) => d));
    renderEvents(eventsResp);
    showError(nodesResp.stale ? "the coordinator is not answering: showing its last snapshot" : "");
    polls += 1;
    document.body.dataset.ready = "1";
    document.body.dataset.polls = String(polls);
  } catch (err) {
    showError(String(err.message || err));
  }
  setTimeout(poll, POLL_MS);
}

poll();
