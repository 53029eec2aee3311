// The live page of ocrproxy: plain JS, no build step, no other origin (see ocrproxy/ui.py).
// Every value from the proxy is written with textContent, never as HTML.
"use strict";

const KEY = "ocrproxy-ui-key";
const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem(KEY) || "";
let feedAbort = null;
let totalsTimer = null;
let opened = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

class SignedOut extends Error {}

async function api(path) {
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + key },
    cache: "no-store",
  });
  if (response.status === 401) throw new SignedOut("wrong admin key");
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function status(text, cls) {
  const node = $("status");
  node.textContent = text;
  node.className = "status " + (cls || "");
}

function signOut(message) {
  key = "";
  sessionStorage.removeItem(KEY);
  if (feedAbort) feedAbort.abort();
  clearInterval(totalsTimer);
  $("main").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = message || "";
  status("signed out");
}

async function signIn() {
  try {
    const [recent, totals] = await Promise.all([api("/ui/recent"), api("/ui/totals")]);
    sessionStorage.setItem(KEY, key);
    $("login").hidden = true;
    $("main").hidden = false;
    $("logout").hidden = false;
    $("worker").textContent = "worker pid " + recent.worker;
    $("rows").replaceChildren();
    for (const row of recent.rows) addRow(row);
    showTotals(totals);
    totalsTimer = setInterval(refreshTotals, 5000);
    feed();
  } catch (error) {
    signOut(error instanceof SignedOut ? "Wrong admin key." : String(error));
  }
}

const fmtTime = (epoch) => new Date(epoch * 1000).toLocaleTimeString([], { hour12: false });
const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : Math.round(ms).toString());

function addRow(row) {
  const tr = el("tr");
  tr.dataset.id = row.request_id;
  if (row.status >= 400) tr.className = "bad";
  else if (row.failures) tr.className = "warn";
  const model = row.real_model && row.real_model !== row.model
    ? row.model + " → " + row.real_model : (row.model || "–");
  const tokens = row.ocr_tokens.input + row.ocr_tokens.output;
  const cells = [
    fmtTime(row.time),
    row.request_id.slice(0, 10),
    row.dialect,
    model,
    row.ocr_model || "–",
    row.images + " / " + row.cache_hits + " / " + row.failures,
    row.fallback || "",
    row.status,
    fmtMs(row.ttfb_ms),
    fmtMs(row.total_ms),
    tokens ? row.ocr_tokens.input + " + " + row.ocr_tokens.output : "",
  ];
  for (const value of cells) tr.append(el("td", value));
  tr.title = row.request_id + "\n" + row.method + " " + row.route + (row.upstream ? " → " + row.upstream : "");
  tr.addEventListener("click", () => openRequest(row.request_id));
  const rows = $("rows");
  rows.prepend(tr);
  while (rows.children.length > 500) rows.lastChild.remove();
}

function kv(list, entries) {
  list.replaceChildren();
  if (!entries.length) list.append(el("li", "none yet", "muted"));
  for (const [name, value] of entries) {
    const li = el("li");
    li.append(el("span", name, "k"), el("span", value, "v"));
    list.append(li);
  }
}

function showTotals(t) {
  $("t-requests").textContent = t.requests;
  $("t-statuses").textContent = Object.entries(t.statuses).map(([s, n]) => s + ": " + n).join("  ");
  $("t-ocr").textContent = t.ocr_calls;
  $("t-ocr-ms").textContent = t.ocr_ms.sample
    ? "p50 " + fmtMs(t.ocr_ms.p50) + " ms · p95 " + fmtMs(t.ocr_ms.p95) + " ms · errors " + t.ocr_errors
    : "no OCR call yet";
  kv($("t-cache"), Object.entries(t.cache_hit_ratio).map(([tier, ratio]) => {
    const c = t.cache[tier];
    const looked = Object.values(c).reduce((a, b) => a + b, 0);
    return [tier, (ratio === null ? "–" : Math.round(ratio * 100) + "%") + " of " + looked];
  }));
  kv($("t-tokens"), Object.entries(t.ocr_tokens).map(([m, n]) => [m, n.input + " in · " + n.output + " out"]));
  kv($("t-failures"), Object.entries(t.failures).map(([reason, n]) => [reason.toLowerCase().replaceAll("_", " "), n]));
  sparkline($("t-spark"), t.per_minute);
}

function sparkline(box, perMinute) {
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 48, minutes = 60;
  const now = Math.floor(Date.now() / 60000);
  const counts = new Array(minutes).fill(0);
  for (const [minute, requests] of perMinute) {
    const at = minutes - 1 - (now - minute);
    if (at >= 0 && at < minutes) counts[at] = requests;
  }
  const top = Math.max(1, ...counts);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "spark");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "requests per minute, last hour, most " + top);
  const step = width / minutes;
  counts.forEach((n, i) => {
    const bar = document.createElementNS(ns, "rect");
    const h = n ? Math.max(2, (n / top) * (height - 4)) : 1;
    bar.setAttribute("x", (i * step + 1).toFixed(1));
    bar.setAttribute("y", (height - h).toFixed(1));
    bar.setAttribute("width", (step - 2).toFixed(1));
    bar.setAttribute("height", h.toFixed(1));
    bar.setAttribute("class", n ? "bar" : "bar empty");
    const title = document.createElementNS(ns, "title");
    title.textContent = n + " request(s), " + (minutes - 1 - i) + " min ago";
    bar.append(title);
    svg.append(bar);
  });
  box.replaceChildren(svg);
}

// At most one totals call a second, however fast rows arrive.
let refreshing = null;
let lastRefresh = 0;
let refreshLater = null;
function refreshTotals() {
  if (refreshing || refreshLater) return;
  const wait = lastRefresh + 1000 - Date.now();
  if (wait > 0) {
    refreshLater = setTimeout(() => { refreshLater = null; refreshTotals(); }, wait);
    return;
  }
  lastRefresh = Date.now();
  refreshing = api("/ui/totals").then(showTotals).catch(() => {}).finally(() => { refreshing = null; });
}

const LABELS = {
  scan: "scan: images found",
  cache: "cache lookup",
  fetch: "fetch image",
  ocr_attempt: "OCR attempt",
  ocr: "OCR call",
  image: "image became",
  refused: "upstream refused the images",
  upstream: "upstream (TTFB)",
  end: "end",
};

function stepText(s) {
  switch (s.kind) {
    case "scan": return s.images + " image(s)";
    case "cache": return s.tier + " " + s.result;
    case "fetch": return s.ok ? s.bytes + " bytes in " + fmtMs(s.took_ms) + " ms" : "failed: " + (s.reason || "error");
    case "ocr_attempt": return "attempt " + s.attempt + ": " + (s.status === null ? "unreachable" : "HTTP " + s.status);
    case "ocr":
      return s.model + (s.engine ? " (" + s.engine + ")" : "") + " for " + s.image + ": " +
        (s.ok ? "ok in " + fmtMs(s.took_ms) + " ms" + (s.engine ? "" : ", " + s.input_tokens + " + " + s.output_tokens + " tokens")
              : "failed (" + s.reason + ") after " + fmtMs(s.took_ms) + " ms");
    case "image": return "#" + s.number + " " + s.image + ": " + (s.ok ? "description" : "placeholder (" + s.reason + ")");
    case "refused": return s.upstream + " HTTP " + s.status + " after " + fmtMs(s.ttfb_ms) + " ms: sent again through OCR";
    case "upstream": return s.upstream + " HTTP " + s.status + " after " + fmtMs(s.ttfb_ms) + " ms";
    case "end": return "HTTP " + s.status;
    default: return "";
  }
}

async function openRequest(id) {
  opened = id;
  let found;
  try {
    found = await api("/ui/requests/" + encodeURIComponent(id));
  } catch (error) {
    if (error instanceof SignedOut) return signOut("Wrong admin key.");
    return;
  }
  if (opened !== id) return;
  const { row, steps } = found;
  for (const tr of $("rows").children) tr.classList.toggle("open", tr.dataset.id === id);
  $("d-id").textContent = id;
  $("d-summary").textContent = [
    row.method + " " + row.route, row.model || "", row.ocr_model ? "OCR " + row.ocr_model : "",
    "HTTP " + row.status, fmtMs(row.total_ms) + " ms",
  ].filter(Boolean).join(" · ");
  const list = $("timeline");
  list.replaceChildren();
  for (const s of steps) {
    const li = el("li", null, "step " + s.kind);
    li.append(el("span", "+" + fmtMs(s.at_ms) + " ms", "at"), el("span", LABELS[s.kind] || s.kind, "kind"),
      el("span", stepText(s), "what"));
    if (s.description !== undefined) li.append(el("pre", s.description, "description"));
    else if (s.description_dropped) li.append(el("p", "(description no longer kept: the page keeps the newest ones only)", "dropped"));
    list.append(li);
  }
  $("detail").hidden = false;
}

async function feed() {
  if (feedAbort) feedAbort.abort();
  const abort = new AbortController();
  feedAbort = abort;
  while (!abort.signal.aborted) {
    try {
      const response = await fetch("/ui/events", {
        headers: { Authorization: "Bearer " + key },
        cache: "no-store",
        signal: abort.signal,
      });
      if (response.status === 401) return signOut("Wrong admin key.");
      if (!response.ok) throw new Error("HTTP " + response.status);
      status("live", "live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          for (const line of event.split("\n")) {
            if (line.startsWith("data: ")) {
              addRow(JSON.parse(line.slice(6)));
              refreshTotals();
            }
          }
        }
      }
    } catch (error) {
      if (abort.signal.aborted) return;
    }
    status("reconnecting…", "down");
    await new Promise((done) => setTimeout(done, 2000));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    key = $("key").value.trim();
    $("key").value = "";
    signIn();
  });
  $("logout").addEventListener("click", () => signOut(""));
  if (key) signIn();
});
