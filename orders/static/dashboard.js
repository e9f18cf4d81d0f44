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

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || response.statusText);
  return body;
}

async function postJson(url, payload) {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify(payload),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || body.title || response.statusText);
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

function openStream() {
  // The feed lives on orders-stream (its own async server), named by the page.
  const source = new EventSource(document.body.dataset.streamUrl || "/events/stream");
  source.addEventListener("subscribed", () => setStreamState("live", "live"));
  source.addEventListener("down", () => setStreamState("Redis unavailable, reconnecting…", "down"));
  source.addEventListener("message", (e) => addFeedItem(e.data));
  // EventSource reconnects by itself after an error or the end of a stream.
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.OPEN) setStreamState("reconnecting…", "down");
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

async function placeOrder(event) {
  event.preventDefault();
  const form = event.target;
  const out = document.getElementById("order-result");
  const value = (name) => form.elements[name].value.trim();
  try {
    const order = await postJson("/orders", {
      customer_email: value("customer_email"),
      currency: value("currency"),
      items: [
        { sku: value("sku"), quantity: Number(value("quantity")), unit_price: value("unit_price") },
      ],
    });
    out.textContent = "placed order #" + order.id + " (" + order.total + " " + order.currency + ")";
    out.dataset.orderId = String(order.id);
    out.className = "";
    refreshOrders();
  } catch (err) {
    out.textContent = "rejected: " + err.message;
    out.className = "error";
  }
}

function start() {
  document.getElementById("feed-since").textContent = "since " + clock(new Date());
  document.getElementById("order-form").addEventListener("submit", placeOrder);
  openStream();
  refreshQueues();
  refreshOrders();
  window.setInterval(refreshQueues, QUEUE_POLL_MS);
  window.setInterval(refreshOrders, ORDER_POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
