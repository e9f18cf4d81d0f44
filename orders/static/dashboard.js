// The dashboard's behaviour. Everything shown comes from the network and is untrusted
// (anyone who can PUBLISH on the channel writes into the feed): the DOM is built with
// createElement + textContent only, never by parsing HTML. No inline script: the page's
// Content-Security-Policy allows scripts from this origin's files only.
"use strict";

const QUEUE_POLL_MS = 1500;
const ORDER_POLL_MS = 2000;
const FEED_MAX = 200;
const QUEUE_FIELDS = ["pending", "in_flight", "delayed", "dead", "processed", "failed"];
const STAGE_POLL_MS = 5000;
const STUCK_POLL_MS = 3000;
const DEPTH_POINTS = 400; // queue depth samples kept (10 minutes at QUEUE_POLL_MS)
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// A table's only row when it has nothing to show: one cell across its columns.
function noteRow(text, columns) {
  const td = el("td", text, "note");
  td.colSpan = columns;
  const tr = el("tr");
  tr.appendChild(td);
  return tr;
}

function replaceChildren(parent, children) {
  while (parent.firstChild) parent.removeChild(parent.firstChild);
  for (const child of children) parent.appendChild(child);
}

function clock(date) {
  return date.toLocaleTimeString([], { hour12: false });
}

// The operator session is an HttpOnly cookie (see orders/auth.py): fetch sends it on
// same-origin requests by itself, and this script never sees it. A 401 means it is gone
// (the token changed, or orders-api generated a new one at restart): log in again.
function loginAgain(response) {
  if (response.status === 401) window.location.assign("/login");
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  loginAgain(response);
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

async function postJson(url, payload, headers) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json", ...headers },
    body: JSON.stringify(payload),
  });
  loginAgain(response);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.detail || body.title || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// --- the live feed (Server-Sent Events, the pub/sub channel) ----------------------------

function setStreamState(text, cls) {
  const state = document.getElementById("stream-state");
  state.textContent = text;
  state.className = "state " + cls;
}

function addFeedItem(raw) {
  const item = el("li");
  let event = null;
  try {
    event = JSON.parse(raw);
  } catch (_) {
    event = null;
  }
  item.appendChild(el("span", clock(new Date()) + " ", "time"));
  if (event && typeof event === "object" && !Array.isArray(event)) {
    const data = event.data && typeof event.data === "object" ? event.data : {};
    item.dataset.type = String(event.type);
    if (data.order_id !== undefined) item.dataset.order = String(data.order_id);
    item.appendChild(el("span", event.type, "type"));
    if (data.order_id !== undefined) item.appendChild(el("span", " order #" + data.order_id));
    item.appendChild(el("span", " " + (event.message === undefined ? "" : event.message), "msg"));
  } else {
    item.dataset.type = "raw";
    item.appendChild(el("span", raw, "msg"));
  }
  const list = document.getElementById("feed-list");
  list.insertBefore(item, list.firstChild);
  while (list.children.length > FEED_MAX) list.removeChild(list.lastChild);
}

const STREAM_RETRY_MS = 2000;

async function renewStreamUrl() {
  // A refused stream (expired ticket, or Redis lost it): ask orders-api for a fresh URL.
  try {
    document.body.dataset.streamUrl = (await getJson("/api/stream-url")).url;
  } catch (_) {
    // orders-api unavailable: try the same URL again
  }
  openStream();
}

function openStream() {
  // The feed lives on orders-stream (its own async server); the page names its URL,
  // with a ticket that orders-stream checks (operators only).
  const source = new EventSource(document.body.dataset.streamUrl || "/events/stream");
  source.addEventListener("subscribed", () => setStreamState("live", "live"));
  source.addEventListener("down", () => setStreamState("Redis unavailable, reconnecting…", "down"));
  source.addEventListener("message", (e) => addFeedItem(e.data));
  // EventSource reconnects by itself after an error or the end of a stream.
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.OPEN) setStreamState("reconnecting…", "down");
    // An error status (401, 429) closes an EventSource for good: open a new one.
    if (source.readyState === EventSource.CLOSED) window.setTimeout(renewStreamUrl, STREAM_RETRY_MS);
  });
  window.__stream = source;
}

// --- queues ---------------------------------------------------------------------------

function renderQueues(body) {
  const rows = body.queues.map((q) => {
    const tr = el("tr");
    tr.dataset.queue = q.name;
    tr.appendChild(el("td", q.name));
    for (const field of QUEUE_FIELDS) {
      const td = el("td", q[field], "num");
      td.dataset.field = field;
      tr.appendChild(td);
    }
    const rate = q.processed_per_second;
    const rateCell = el("td", rate === null ? "–" : rate.toFixed(1), "num");
    rateCell.dataset.field = "processed_per_second";
    tr.appendChild(rateCell);
    const alive = el("td", q.workers_alive + " / " + q.workers, "num");
    alive.dataset.field = "workers_alive";
    tr.appendChild(alive);
    return tr;
  });
  replaceChildren(document.getElementById("queue-rows"), rows);
  recordDepth(body);
  document.getElementById("queues-updated").textContent =
    "updated " + clock(new Date(body.time * 1000));
  return body.queues.filter((q) => q.dead > 0).map((q) => q.name);
}

// --- dead letters ---------------------------------------------------------------------

async function settle(queue, id, action) {
  // Discard deletes the message for good: ask first (requeue can be undone by the queue).
  if (action === "discard" && !window.confirm("Discard dead letter " + id + " of " + queue +
      " for good? It cannot be requeued afterwards.")) {
    return;
  }
  try {
    await postJson(
      "/api/queues/" + encodeURIComponent(queue) + "/dead-letters/" +
        encodeURIComponent(id) + "/" + action,
      {},
    );
  } catch (err) {
    window.alert(action + " failed: " + err.message);
  }
  refreshQueues();
}

async function renderDead(queuesWithDead) {
  const blocks = [];
  for (const queue of queuesWithDead) {
    const body = await getJson("/api/queues/" + encodeURIComponent(queue) + "/dead-letters");
    const block = el("div", null, "dead-queue");
    block.dataset.queue = queue;
    block.appendChild(el("h3", queue + " (" + body.items.length + " shown)"));
    const table = el("table");
    for (const letter of body.items) {
      const tr = el("tr");
      tr.dataset.letter = letter.id;
      tr.appendChild(el("td", letter.id));
      tr.appendChild(el("td", letter.failed_at));
      const revives = letter.cause === "transient" ? ", revived by itself" : "";
      tr.appendChild(el("td", letter.attempts + " attempt(s)" + revives));
      tr.appendChild(el("td", letter.error, "error"));
      const message = el("td");
      message.appendChild(el("pre", letter.message));
      tr.appendChild(message);
      const actions = el("td");
      for (const action of ["requeue", "discard"]) {
        const button = el("button", action);
        button.type = "button";
        button.dataset.action = action;
        button.addEventListener("click", () => settle(queue, letter.id, action));
        actions.appendChild(button);
      }
      tr.appendChild(actions);
      table.appendChild(tr);
    }
    block.appendChild(table);
    blocks.push(block);
  }
  const list = document.getElementById("dead-list");
  replaceChildren(list, blocks.length ? blocks : [el("p", "none", "note")]);
}

// Run fn now and again every ms after it finished, never two at once: a slow answer
// (Redis frozen, say) must not pile this page's requests up on the server's threads, as
// a fixed interval would. Returns a function that stops it.
function poll(fn, ms) {
  let timer = null;
  let stopped = false;
  const run = async () => {
    try {
      await fn();
    } catch (_) {
      // each refresh shows its own failure; the next run tries again
    }
    if (!stopped) timer = window.setTimeout(run, ms);
  };
  run();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
}

async function refreshQueues() {
  try {
    const body = await getJson("/api/queues");
    await renderDead(renderQueues(body));
  } catch (err) {
    document.getElementById("queues-updated").textContent = "queues unavailable: " + err.message;
  }
}

// --- recent orders ----------------------------------------------------------------------

// An order's id as a link to its detail view (the timeline).
function orderCell(id) {
  const td = el("td");
  const link = el("a", "#" + id);
  link.href = "#order/" + encodeURIComponent(id);
  link.className = "order-link";
  td.appendChild(link);
  return td;
}

function renderOrders(body) {
  const rows = body.items.map((order) => {
    const tr = el("tr");
    tr.dataset.orderId = String(order.id);
    tr.appendChild(orderCell(order.id));
    const status = el("td", order.status, "status-" + order.status);
    status.dataset.field = "status";
    tr.appendChild(status);
    tr.appendChild(el("td", order.customer_email));
    tr.appendChild(el("td", order.total + " " + order.currency, "num"));
    tr.appendChild(el("td", order.history.map((h) => h.type).join(", ")));
    tr.appendChild(invoiceCell(order));
    return tr;
  });
  replaceChildren(document.getElementById("order-rows"), rows);
}

async function refreshOrders() {
  try {
    renderOrders(await getJson("/orders?limit=10"));
  } catch (_) {
    // keep the last rows; the next poll tries again
  }
}

// --- stuck orders ------------------------------------------------------------------------

function seconds(value) {
  const s = Math.round(Number(value));
  return s < 120 ? s + " s" : Math.round(s / 60) + " min";
}

function renderStuck(body) {
  document.getElementById("stuck-threshold").textContent = String(body.older_than_seconds);
  const rows = body.orders.map((order) => {
    const tr = el("tr");
    tr.dataset.orderId = String(order.id);
    tr.appendChild(orderCell(order.id));
    tr.appendChild(el("td", order.status, "status-" + order.status));
    tr.appendChild(el("td", order.waiting_for));
    tr.appendChild(el("td", seconds(order.age_seconds), "num"));
    tr.appendChild(el("td", seconds(order.idle_seconds), "num"));
    return tr;
  });
  if (!rows.length) rows.push(noteRow("none", 5));
  replaceChildren(document.getElementById("stuck-rows"), rows);
  document.getElementById("stuck-total").textContent =
    body.total > body.orders.length ? body.total + " in all, the oldest shown" : "";
}

async function refreshStuck() {
  try {
    renderStuck(await getJson("/api/orders/stuck"));
  } catch (_) {
    // keep the last rows; the next poll tries again
  }
}

// --- the order form -----------------------------------------------------------------------

// One Idempotency-Key per filling of the form: made at the first submit, kept while the
// same submission is retried (a lost answer, a 5xx, a 429), dropped when the order is
// placed or the form is edited. So a retry after a lost answer gets the same order back,
// and a double click cannot make two orders (the button is also disabled in flight).
let submissionKey = null;
let submitting = false;

function newKey() {
  if (window.crypto && typeof window.crypto.randomUUID === "function") {
    return window.crypto.randomUUID();
  }
  // randomUUID needs a secure context (https or localhost); getRandomValues does not.
  const bytes = window.crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)]
    .join("-");
}

async function placeOrder(event) {
  event.preventDefault();
  if (submitting) return;
  const form = event.target;
  const button = form.querySelector("button[type=submit]");
  const out = document.getElementById("order-result");
  const value = (name) => form.elements[name].value.trim();
  if (submissionKey === null) submissionKey = newKey();
  submitting = true;
  button.disabled = true;
  out.textContent = "placing…";
  out.className = "";
  try {
    const order = await postJson(
      "/orders",
      {
        customer_email: value("customer_email"),
        currency: value("currency"),
        items: collectLines(form),
        priority: form.elements["express"].checked ? "express" : "standard",
      },
      { "Idempotency-Key": submissionKey },
    );
    submissionKey = null; // placed: the next submit is a new order
    out.textContent =
      "placed order #" + order.id + " (" + order.total + " " + order.currency +
      (order.priority === "express" ? ", express" : "") + ")";
    out.dataset.orderId = String(order.id);
    out.className = "";
    refreshOrders();
  } catch (err) {
    // A 4xx other than 429 will not change on retry: edit the form (new key).
    out.textContent = "rejected: " + err.message;
    out.className = "error";
  } finally {
    submitting = false;
    button.disabled = false;
  }
}

function formEdited() {
  submissionKey = null; // another body needs another key (the same key would be a 422)
}

// --- the order form's lines --------------------------------------------------------------

function lineRows() {
  return Array.from(document.querySelectorAll("#lines .line"));
}

function updateRemoveButtons() {
  const rows = lineRows();
  for (const row of rows) row.querySelector(".remove-line").disabled = rows.length === 1;
}

function addLine() {
  const rows = lineRows();
  const copy = rows[rows.length - 1].cloneNode(true);
  copy.querySelector("input[name=sku]").value = "";
  copy.querySelector("input[name=quantity]").value = "1";
  document.getElementById("lines").appendChild(copy);
  updateRemoveButtons();
  formEdited();
  copy.querySelector("input[name=sku]").focus();
}

function removeLine(event) {
  const button = event.target.closest(".remove-line");
  if (!button || lineRows().length === 1) return;
  button.closest(".line").remove();
  updateRemoveButtons();
  formEdited();
}

function collectLines() {
  return lineRows().map((row) => ({
    sku: row.querySelector("input[name=sku]").value.trim(),
    quantity: Number(row.querySelector("input[name=quantity]").value.trim()),
    unit_price: row.querySelector("input[name=unit_price]").value.trim(),
  }));
}

// --- one order: its timeline -----------------------------------------------------------------

let stopDetail = () => {};

function invoiceCell(order) {
  const td = el("td");
  if (order.history.some((h) => h.type === "InvoiceIssued")) {
    const link = el("a", "invoice");
    link.href = "/orders/" + encodeURIComponent(order.id) + "/invoice";
    link.className = "invoice-link";
    td.appendChild(link);
  }
  return td;
}

function ms(value) {
  return value === null || value === undefined ? "–" : Math.round(value).toLocaleString() + " ms";
}

function preciseClock(date) {
  return clock(date) + "." + String(date.getMilliseconds()).padStart(3, "0");
}

function renderDetail(order) {
  document.getElementById("detail-title").textContent = "Order #" + order.id;
  document.getElementById("detail-summary").textContent =
    order.status + " · " + order.customer_email + " · " + order.total + " " + order.currency;
  const placed = new Date(order.created_at);
  const events = [{ type: "OrderPlaced", at: placed }].concat(
    order.history.map((h) => ({ type: h.type, at: new Date(h.occurred_at) })),
  );
  events.sort((a, b) => a.at - b.at);
  let previous = placed;
  const rows = events.map((event) => {
    const tr = el("tr");
    tr.dataset.type = event.type;
    tr.appendChild(el("td", event.type));
    tr.appendChild(el("td", preciseClock(event.at)));
    const since = el("td", ms(event.at - placed), "num");
    since.dataset.field = "since";
    tr.appendChild(since);
    const step = el("td", ms(event.at - previous), "num");
    step.dataset.field = "step";
    tr.appendChild(step);
    previous = event.at;
    return tr;
  });
  replaceChildren(document.getElementById("timeline-rows"), rows);
  replaceChildren(
    document.getElementById("detail-lines"),
    order.lines.map((line) => {
      const tr = el("tr");
      tr.appendChild(el("td", line.sku));
      tr.appendChild(el("td", line.quantity, "num"));
      tr.appendChild(el("td", line.unit_price, "num"));
      tr.appendChild(el("td", line.line_total, "num"));
      return tr;
    }),
  );
  const invoice = document.getElementById("detail-invoice");
  invoice.hidden = !order.history.some((h) => h.type === "InvoiceIssued");
  invoice.href = "/orders/" + encodeURIComponent(order.id) + "/invoice";
}

async function showOrder(id) {
  const section = document.getElementById("order-detail");
  try {
    renderDetail(await getJson("/orders/" + encodeURIComponent(id)));
    section.dataset.orderId = String(id);
  } catch (err) {
    document.getElementById("detail-title").textContent = "Order #" + id;
    document.getElementById("detail-summary").textContent = "unavailable: " + err.message;
  }
  section.hidden = false;
}

function route() {
  stopDetail();
  const match = /^#order\/([0-9]+)$/.exec(window.location.hash);
  const section = document.getElementById("order-detail");
  if (!match) {
    section.hidden = true;
    delete section.dataset.orderId;
    return;
  }
  // The order moves on while you look: follow it until it is final.
  let first = true;
  stopDetail = poll(async () => {
    await showOrder(match[1]);
    if (first) {
      first = false;
      section.scrollIntoView({ block: "start" });
    }
  }, ORDER_POLL_MS);
}

// --- charts (uPlot, served from this origin) -------------------------------------------------

const charts = {};
const depth = { times: [], queues: {} };

function chartWidth(target) {
  return Math.max(260, Math.min(target.clientWidth || 600, 1200));
}

function drawChart(id, xs, series, yLabel) {
  const target = document.getElementById(id);
  if (typeof window.uPlot !== "function") return;
  const data = [xs].concat(series.map((s) => s.values));
  const key = series.map((s) => s.label).join("|");
  const existing = charts[id];
  if (existing && existing.key === key) {
    existing.plot.setData(data);
    return;
  }
  if (existing) existing.plot.destroy();
  const opts = {
    width: chartWidth(target),
    height: 180,
    series: [{}].concat(
      series.map((s, i) => ({
        label: s.label,
        stroke: COLORS[s.color === undefined ? i : s.color],
        dash: s.dash,
        width: 1.5,
        spanGaps: true,
        points: { show: true, size: 4 },
      })),
    ),
    axes: [{}, { label: yLabel, size: 60 }],
    scales: { x: { time: true } },
    legend: { live: false },
  };
  charts[id] = { key: key, plot: new window.uPlot(opts, data, target) };
  target.dataset.series = String(series.length);
}

function resizeCharts() {
  for (const [id, chart] of Object.entries(charts)) {
    const target = document.getElementById(id);
    chart.plot.setSize({ width: chartWidth(target), height: 180 });
  }
}

function recordDepth(body) {
  depth.times.push(body.time);
  for (const q of body.queues) {
    if (!depth.queues[q.name]) depth.queues[q.name] = depth.times.slice(0, -1).map(() => null);
    depth.queues[q.name].push(q.pending + q.in_flight + q.delayed);
  }
  if (depth.times.length > DEPTH_POINTS) {
    depth.times.shift();
    for (const values of Object.values(depth.queues)) values.shift();
  }
  const names = Object.keys(depth.queues).sort();
  drawChart(
    "chart-depth",
    depth.times.slice(),
    names.map((name) => ({ label: name, values: depth.queues[name].slice() })),
    "messages",
  );
}

function renderStageRows(stages) {
  const names = Object.keys(stages);
  const rows = names.map((name) => {
    const stage = stages[name];
    const tr = el("tr");
    tr.dataset.stage = name;
    tr.appendChild(el("td", name));
    const count = el("td", stage.total, "num");
    count.dataset.field = "count";
    tr.appendChild(count);
    const p50 = el("td", name === "OrderPlaced" ? "–" : ms(stage.total_p50_ms), "num");
    p50.dataset.field = "p50";
    tr.appendChild(p50);
    const p99 = el("td", name === "OrderPlaced" ? "–" : ms(stage.total_p99_ms), "num");
    p99.dataset.field = "p99";
    tr.appendChild(p99);
    return tr;
  });
  if (!rows.length) rows.push(noteRow("no events in the window", 4));
  replaceChildren(document.getElementById("stage-rows"), rows);
}

async function refreshStages() {
  let body;
  try {
    body = await getJson("/api/stages?minutes=10");
  } catch (_) {
    return; // the next poll tries again
  }
  renderStageRows(body.stages);
  const names = Object.keys(body.stages);
  const per = body.bucket_seconds;
  drawChart(
    "chart-throughput",
    body.buckets,
    names.map((name, i) => ({
      label: name,
      color: i,
      values: body.stages[name].count.map((n) => n / per),
    })),
    "events/s",
  );
  const latency = [];
  names.forEach((name, i) => {
    if (name === "OrderPlaced") return;
    latency.push({ label: name + " p50", color: i, values: body.stages[name].p50_ms });
    latency.push({ label: name + " p99", color: i, dash: [4, 4], values: body.stages[name].p99_ms });
  });
  drawChart("chart-latency", body.buckets, latency, "ms");
}

function start() {
  document.getElementById("feed-since").textContent = "since " + clock(new Date());
  const form = document.getElementById("order-form");
  form.addEventListener("submit", placeOrder);
  form.addEventListener("input", formEdited);
  form.addEventListener("change", formEdited);
  document.getElementById("add-line").addEventListener("click", addLine);
  document.getElementById("lines").addEventListener("click", removeLine);
  updateRemoveButtons();
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", resizeCharts);
  document.getElementById("detail-close").addEventListener("click", (e) => {
    e.preventDefault();
    window.location.hash = "";
  });
  poll(refreshStages, STAGE_POLL_MS);
  route();
  openStream();
  poll(refreshQueues, QUEUE_POLL_MS);
  poll(refreshOrders, ORDER_POLL_MS);
  poll(refreshStuck, STUCK_POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
