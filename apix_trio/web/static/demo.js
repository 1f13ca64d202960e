// The APIX demo: a chat room (channel chat.demo, replayed from history), a
// "who is online" list (presence), a shared counter and to-do list (state
// keys demo.counter and demo.todos, changed with compare-and-set). Open it in
// two tabs: each tab is its own user (kept in sessionStorage).
//
// Every failure is shown on the page (a note, the connection log); nothing
// is thrown to the console.

import { ApixClient } from "/client/apix.js";
import { fetchDevToken, tokenClaims, websocketUrl } from "/web/devtoken.js";

const CHANNEL = "chat.demo";
const COUNTER = "demo.counter";
const TODOS = "demo.todos";
const MAX_MESSAGES = 300;
const CAS_ATTEMPTS = 8;
const NAMES = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken", "Frances", "Edsger", "Radia", "Guido"];

const $ = (id) => document.getElementById(id);

const state = {
  client: null,
  me: { sub: "", name: "" },
  casRetries: 0,
  stateReady: false,
};

/** This tab's user: the same across reloads of the tab, another in another tab. */
function identity() {
  let sub = sessionStorage.getItem("apix-demo-sub");
  let name = sessionStorage.getItem("apix-demo-name");
  if (!sub || !name) {
    const n = Math.floor(Math.random() * 1e4);
    name = `${NAMES[n % NAMES.length]} ${n % 100}`;
    sub = `demo-${n.toString(36)}-${Date.now().toString(36).slice(-4)}`;
    sessionStorage.setItem("apix-demo-sub", sub);
    sessionStorage.setItem("apix-demo-name", name);
  }
  return { sub, name };
}

function log(text) {
  const item = document.createElement("li");
  const time = document.createElement("time");
  time.textContent = new Date().toLocaleTimeString();
  item.append(time, text);
  $("log").prepend(item);
  while ($("log").children.length > 50) $("log").lastChild.remove();
}

function setStatus(text, kind) {
  const pill = $("status");
  pill.textContent = text;
  pill.className = `pill ${kind}`;
  pill.dataset.state = kind;
}

function note(id, text) {
  const element = $(id);
  element.textContent = text;
  element.hidden = !text;
}

function colorOf(sub) {
  let hash = 0;
  for (const ch of sub) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${hash % 360} 55% 48%)`;
}

// ---------------------------------------------------------------- chat

function addMessage(event) {
  const list = $("messages");
  if (list.querySelector(`[data-id="${CSS.escape(event.id)}"]`)) return;
  const data = event.data && typeof event.data === "object" ? event.data : { text: String(event.data) };
  const name = typeof data.name === "string" ? data.name : event.from;
  const item = document.createElement("li");
  item.className = "message" + (event.from === state.me.sub ? " mine" : "");
  item.dataset.id = event.id;
  const avatar = document.createElement("div");
  avatar.className = "avatar";
  avatar.style.background = colorOf(event.from);
  avatar.textContent = (name || "?").slice(0, 1).toUpperCase();
  const body = document.createElement("div");
  const head = document.createElement("div");
  head.className = "head";
  const who = document.createElement("strong");
  who.textContent = name;
  head.append(who, new Date(event.ts).toLocaleTimeString());
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = typeof data.text === "string" ? data.text : JSON.stringify(event.data);
  body.append(head, text);
  item.append(avatar, body);
  list.append(item);
  while (list.children.length > MAX_MESSAGES) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

async function sendMessage(text) {
  try {
    await state.client.publish(CHANNEL, { text, name: state.me.name });
  } catch (err) {
    log(`publish failed: ${err.code || ""} ${err.message}`);
  }
}

// ---------------------------------------------------------------- presence

function renderMembers(members) {
  const bySub = new Map();
  for (const member of members) {
    const entry = bySub.get(member.sub) || { member, tabs: 0 };
    entry.tabs += 1;
    bySub.set(member.sub, entry);
  }
  const list = $("members");
  list.replaceChildren();
  for (const { member, tabs } of [...bySub.values()].sort((a, b) => a.member.since - b.member.since)) {
    const item = document.createElement("li");
    item.dataset.sub = member.sub;
    const dot = document.createElement("span");
    dot.className = "dot";
    const name = document.createElement("strong");
    name.textContent = (member.info && typeof member.info.name === "string" && member.info.name) || member.sub;
    const sub = document.createElement("span");
    sub.className = "sub";
    sub.textContent = `${member.sub === state.me.sub ? "you" : member.sub}${tabs > 1 ? ` · ${tabs} tabs` : ""}`;
    item.append(dot, name, sub);
    list.append(item);
  }
  $("online-count").textContent = String(bySub.size);
  $("online-count").dataset.value = String(bySub.size);
}

async function joinChat(client) {
  try {
    await client.subscribe(CHANNEL, { since: "0", presence: true });
    note("presence-note", "");
    renderMembers(client.members(CHANNEL));
  } catch (err) {
    note(
      "presence-note",
      err.code === "forbidden"
        ? "Presence is off for chat.* on this server: run it with a [[namespaces]] pattern = \"chat.>\" and presence = true (config/apix.example.toml has one)."
        : `Presence is not available here (${err.code}: ${err.message}).`,
    );
    $("online-count").textContent = "–";
    try {
      await client.subscribe(CHANNEL, { since: "0" });
    } catch (again) {
      log(`subscribe failed: ${again.code || ""} ${again.message}`);
    }
  }
}

// ---------------------------------------------------------------- state

function renderCounter(value, version) {
  const n = typeof value === "number" ? value : 0;
  $("counter").textContent = String(n);
  $("counter").dataset.value = String(n);
  $("counter-version").textContent = String(version);
}

function renderTodos(value, version) {
  const items = value && Array.isArray(value.items) ? value.items : [];
  const list = $("todos");
  list.replaceChildren();
  if (items.length === 0) {
    const empty = document.createElement("li");
    empty.className = "empty";
    empty.textContent = "Nothing to do yet.";
    list.append(empty);
  }
  for (const todo of items) {
    const item = document.createElement("li");
    item.dataset.id = todo.id;
    if (todo.done) item.className = "done";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = Boolean(todo.done);
    box.addEventListener("change", () => updateTodos((items) => items.map((t) => (t.id === todo.id ? { ...t, done: !t.done } : t))));
    const text = document.createElement("span");
    text.textContent = todo.text;
    const by = document.createElement("span");
    by.className = "by";
    by.textContent = todo.by || "";
    const remove = document.createElement("button");
    remove.textContent = "✕";
    remove.title = "remove";
    remove.addEventListener("click", () => updateTodos((items) => items.filter((t) => t.id !== todo.id)));
    item.append(box, text, by, remove);
    list.append(item);
  }
  $("todos-version").textContent = String(version);
}

function renderState(key, value, version) {
  if (key === COUNTER) renderCounter(value, version);
  else if (key === TODOS) renderTodos(value, version);
}

/**
 * Compare-and-set: read the value (the local copy first, the server after a
 * conflict), apply `change`, write it with the version it was read at; on
 * `conflict` someone else wrote in between, so read again and retry.
 */
async function casUpdate(key, change) {
  const client = state.client;
  let current = client.stateValue(key) || (await client.stateGet(key));
  for (let attempt = 1; attempt <= CAS_ATTEMPTS; attempt += 1) {
    try {
      await client.stateSet(key, change(current.value), { version: current.version });
      return;
    } catch (err) {
      if (err.code !== "conflict") throw err;
      state.casRetries += 1;
      $("cas-retries").textContent = String(state.casRetries);
      current = await client.stateGet(key);
    }
  }
  throw new Error(`gave up after ${CAS_ATTEMPTS} conflicts`);
}

function updateCounter(delta) {
  casUpdate(COUNTER, (value) => (typeof value === "number" ? value : 0) + delta).catch((err) => log(`counter: ${err.code || ""} ${err.message}`));
}

function updateTodos(change) {
  casUpdate(TODOS, (value) => ({ items: change(value && Array.isArray(value.items) ? value.items : []) })).catch((err) =>
    log(`to-do list: ${err.code || ""} ${err.message}`),
  );
}

async function followState(client) {
  try {
    for (const key of [COUNTER, TODOS]) {
      const { value, version } = await client.stateSubscribe(key);
      renderState(key, value, version);
    }
    state.stateReady = true;
    note("state-note", "");
  } catch (err) {
    note("state-note", `Shared state is not available here (${err.code}: ${err.message}).`);
    renderTodos(null, 0);
  }
  for (const id of ["counter-inc", "counter-dec", "todo-add", "todo-input"]) $(id).disabled = !state.stateReady;
}

// ---------------------------------------------------------------- start

async function start(first, provider) {
  const claims = tokenClaims(first.token) || {};
  state.me = { sub: first.sub || claims.sub || "?", name: first.name || (claims.info && claims.info.name) || claims.sub || "?" };
  $("me").textContent = state.me.name;
  $("me-sub").textContent = `(${state.me.sub}, org ${first.org || claims.org || "?"})`;
  $("token-dialog").hidden = true;
  $("demo").hidden = false;

  const client = new ApixClient(() => websocketUrl(first), { token: provider });
  state.client = client;
  client.on("connected", (auth) => {
    setStatus(auth.resumed ? "resumed" : "connected", "ok");
    log(auth.resumed ? `resumed session ${auth.session.slice(0, 8)}… (conn ${auth.conn})` : `connected (conn ${auth.conn})`);
  });
  client.on("disconnected", (code, reason) => {
    setStatus(`reconnecting (${code})`, "warn");
    log(`disconnected: ${code} ${reason || ""}`);
  });
  client.on("reconnecting", (info) => log(`reconnect attempt ${info.attempt} in ${Math.round(info.delay)} ms`));
  client.on("closed", (code, reason) => {
    setStatus(`offline (${code})`, "bad");
    log(`closed: ${code} ${reason || ""}`);
  });
  client.on("error", (err) => log(`error: ${err.code || ""} ${err.message}`));
  client.on("resync", (channel) => log(`${channel}: history did not hold everything missed`));
  client.on(`event:${CHANNEL}`, (event) => addMessage(event));
  client.on("presence", (channel, change, members) => {
    if (channel === CHANNEL) renderMembers(members);
  });
  client.on("state", (key, value, version) => renderState(key, value, version));
  client.on("tokenRefreshed", () => log("token refreshed"));

  try {
    await client.connect();
  } catch (err) {
    setStatus("offline", "bad");
    log(`cannot connect: ${err.code || ""} ${err.message}`);
    return;
  }
  await joinChat(client);
  await followState(client);
  document.body.dataset.ready = "true";
}

function wire() {
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || !state.client) return;
    $("chat-input").value = "";
    sendMessage(text);
  });
  $("counter-inc").addEventListener("click", () => updateCounter(1));
  $("counter-dec").addEventListener("click", () => updateCounter(-1));
  $("todo-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("todo-input").value.trim();
    if (!text || !state.stateReady) return;
    $("todo-input").value = "";
    const id = Math.random().toString(36).slice(2, 10);
    updateTodos((items) => [...items, { id, text, done: false, by: state.me.name }]);
  });
}

async function main() {
  wire();
  const wanted = identity();
  let minted;
  try {
    minted = await fetchDevToken(wanted);
  } catch (err) {
    setStatus("no token", "bad");
    $("token-dialog").hidden = false;
    note("state-note", "");
    log(err.message);
    return;
  }
  if (minted) {
    let first = true;
    const provider = async () => {
      if (first) {
        first = false;
        return minted.token;
      }
      minted = (await fetchDevToken(wanted)) || minted; // a fresh token for the same user
      return minted.token;
    };
    await start(minted, provider);
    return;
  }
  setStatus("no token", "warn");
  $("token-dialog").hidden = false;
  $("token-use").addEventListener("click", () => {
    const token = $("token-input").value.trim();
    if (!token) return;
    const claims = tokenClaims(token) || {};
    start({ token, sub: claims.sub, org: claims.org }, token);
  });
}

main();
