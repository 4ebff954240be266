"use strict";
// Renders dashboard.json every 2 s. Every value goes in as text, never as
// markup: store path names and peer addresses come from other hosts.
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function ago(s) {
  if (s === null || s === undefined) return "never";
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function cell(v, cls) { return v instanceof Node ? v : el("td", v, cls); }
function rows(id, list, cols, empty) {
  const body = $(id).tBodies[0];
  if (!list.length) {
    const tr = el("tr");
    const td = el("td", empty, "empty");
    td.colSpan = cols.length;
    tr.append(td);
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...list.map((r) => {
    const tr = el("tr");
    for (const [get, cls] of cols) tr.append(cell(get(r), cls));
    return tr;
  }));
}
function pairs(id, list) {
  $(id).replaceChildren(...list.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
}
function stat(label, value) {
  const d = el("div", null, "stat");
  d.append(el("b", value), el("span", label));
  return d;
}
function tag(state) {
  const td = el("td");
  td.append(el("span", state, "tag s-" + state));
  return td;
}
function path(e) { return e.name ? e.hash + "-" + e.name : e.hash; }

function render(d) {
  const n = d.node, t = d.totals, s = d.store;
  const status = $("status");
  status.textContent = d.status;
  status.className = "pill " + d.status;
  $("node").textContent = "v" + n.version + " · " + n.mode + " mode · up " + duration(n.uptime_seconds);
  $("cards").replaceChildren(
    stat("requests", t.requests),
    stat("cache hits / misses", t.cache_hits + " / " + t.cache_misses),
    stat("NARs served", t.nars_served),
    stat("bytes sent", bytes(t.bytes_sent)),
    stat("bytes from peers", bytes(t.bytes_received)),
    stat("peers ok / backoff / banned", d.peers.by_state.ok + " / " + d.peers.by_state.backoff + " / " + d.peers.by_state.banned),
    stat("errors", t.errors),
  );
  pairs("nodeinfo", [
    ["name", n.peer_id],
    ["mode", n.mode],
    ["version", n.version],
    ["node id", n.id || "none"],
    ["HTTP", n.bind + ":" + n.port],
    ["addresses", n.addresses.length ? n.addresses.join(", ") : "none"],
    ["LAN", n.lan_port ? "UDP port " + n.lan_port : "off"],
    ["tracker", d.tracker.enabled
      ? (d.tracker.reachable ? "reachable" : "unreachable") + ", " + d.tracker.announces + " announces, " +
        d.tracker.lookups + " lookups (" + d.tracker.lookup_failures + " failed)"
      : "off"],
  ]);
  const checks = Object.entries(d.checks).map(([k, c]) => k + ": " + c.status).join(", ");
  pairs("store", [
    ["paths", s.indexed_paths],
    ["shared", s.shared_paths],
    ["scans", s.scans + (s.scans ? ", last " + ago(s.index_age_seconds) : "")],
    ["scan interval", s.scan_interval_seconds ? s.scan_interval_seconds + " s" : "off (SIGHUP only)"],
    ["nix-daemon", s.daemon + " (" + s.daemon_socket + ")"],
    ["checks", checks],
  ]);
  const l = d.lan;
  pairs("lan", l.enabled ? [
    ["UDP port", l.port],
    ["queries sent", l.queries],
    ["replies received / sent", l.replies_received + " / " + l.replies_sent],
    ["replies shunned / rate-limited", l.replies_shunned + " / " + l.replies_rate_limited],
    ["packets dropped", l.packets_dropped],
    ["hosts heard / with summary", l.summaries ? l.summaries.hosts_heard + " / " + l.summaries.hosts_with_summary : "–"],
    ["own summary", l.summary ? l.summary.paths + " paths, generation " + l.summary.generation : "not published"],
  ] : [["discovery", "off"]]);
  $("peercount").textContent = d.peers.total + " known" + (d.peers.shown.length < d.peers.total ? ", " + d.peers.shown.length + " shown" : "");
  rows("peers", d.peers.shown, [
    [(p) => p.addr, "path"],
    [(p) => p.source],
    [(p) => tag(p.state)],
    [(p) => Math.round(p.reputation * 100) + "%", "n"],
    [(p) => p.successes + " / " + p.failures + " / " + p.lies, "n"],
    [(p) => bytes(p.bytes), "n"],
    [(p) => p.latency_ms === null ? "–" : p.latency_ms.toFixed(1) + " ms", "n"],
    [(p) => ago(p.last_seen_seconds)],
  ], "no peer yet");
  rows("requested", d.top_requested, [[path, "path"], [(e) => e.count, "n"]], "nothing requested yet");
  rows("served", d.top_served, [[path, "path"], [(e) => e.count, "n"]], "nothing served yet");
  rows("routes", d.routes, [
    [(r) => r.route],
    [(r) => r.requests, "n"],
    [(r) => r.mean_ms.toFixed(2) + " ms", "n"],
  ], "no request yet");
  $("activity").replaceChildren(...(d.activity.length ? d.activity.map((e) => {
    const li = el("li");
    li.append(el("time", new Date(e.at * 1000).toLocaleTimeString()), el("span", e.kind, "k"), document.createTextNode(e.text));
    return li;
  }) : [el("li", "nothing yet", "empty")]));
}

async function refresh() {
  try {
    const r = await fetch("dashboard.json", { cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    $("updated").textContent = "cannot reach peerix: " + e.message;
  } finally {
    setTimeout(refresh, 2000);
  }
}

$("rescan").addEventListener("click", async () => {
  try {
    const r = await fetch("control/rescan", { method: "POST" });
    $("control").textContent = r.ok ? "rescan requested" : "rescan refused: " + (await r.text()).trim();
  } catch (e) {
    $("control").textContent = "rescan failed: " + e.message;
  }
});
refresh();
