// The dashboard's behaviour. Everything shown comes from the network and is untrusted
// (anyone who can PUBLISH on the channel writes into the feed): the DOM is built with
// createElement + textContent only, never by parsing HTML. No inline script: the page's
// Content-Security-Policy allows scripts from this origin's files only.
"use strict";

const QUEUE_POLL_MS = 1500;
const ORDER_POLL_MS = 2000;
const FEED_MAX = 200;
const QUEUE_FIELDS = ["pending", "in_flight", "delayed", "dead", "processed", "failed"];

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
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
  document.getElementById("queues-updated").textContent =
    "updated " + clock(new Date(body.time * 1000));
  return body.queues.filter((q) => q.dead > 0).map((q) => q.name);
}

// --- dead letters ---------------------------------------------------------------------

async function settle(queue, id, action) {
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
      tr.appendChild(el("td", letter.attempts + " attempt(s)"));
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

async function refreshQueues() {
  try {
    const body = await getJson("/api/queues");
    await renderDead(renderQueues(body));
  } catch (err) {
    document.getElementById("queues-updated").textContent = "queues unavailable: " + err.message;
  }
}

// --- recent orders ----------------------------------------------------------------------

function renderOrders(body) {
  const rows = body.items.map((order) => {
    const tr = el("tr");
    tr.dataset.orderId = String(order.id);
    tr.appendChild(el("td", "#" + order.id));
    const status = el("td", order.status, "status-" + order.status);
    status.dataset.field = "status";
    tr.appendChild(status);
    tr.appendChild(el("td", order.customer_email));
    tr.appendChild(el("td", order.total + " " + order.currency, "num"));
    tr.appendChild(el("td", order.history.map((h) => h.type).join(", ")));
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
        items: [
          { sku: value("sku"), quantity: Number(value("quantity")), unit_price: value("unit_price") },
        ],
      },
      { "Idempotency-Key": submissionKey },
    );
    submissionKey = null; // placed: the next submit is a new order
    out.textContent = "placed order #" + order.id + " (" + order.total + " " + order.currency + ")";
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

function start() {
  document.getElementById("feed-since").textContent = "since " + clock(new Date());
  const form = document.getElementById("order-form");
  form.addEventListener("submit", placeOrder);
  form.addEventListener("input", formEdited);
  form.addEventListener("change", formEdited);
  openStream();
  refreshQueues();
  refreshOrders();
  window.setInterval(refreshQueues, QUEUE_POLL_MS);
  window.setInterval(refreshOrders, ORDER_POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
