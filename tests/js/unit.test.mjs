// Unit tests of the client's pure parts and of its own logic against a
// scripted socket (tests/js/fakesocket.mjs). Everything touching a real
// server is in the other *.test.mjs files.

import { test } from "node:test";
import assert from "node:assert/strict";
import {
  ApixClient,
  ApixClosedError,
  ApixError,
  Emitter,
  STOP_CODES,
  applyPresencePush,
  applyStatePush,
  backoffDelay,
  compareEventIds,
  mergePatch,
  parseEventId,
  shouldReconnect,
} from "../../apix_trio/web/static/apix.js";
import { acceptAuth, fakeSocketClass } from "./fakesocket.mjs";
import { waitFor, withTimeout } from "./server.mjs";

// -- backoff -----------------------------------------------------------------------

test("backoff: full jitter under min(cap, base * 2 ** (attempt - 1))", () => {
  const half = () => 0.5;
  const delays = [1, 2, 3, 4, 5, 6, 7].map((attempt) => backoffDelay(attempt, { base: 100, cap: 1000, random: half }));
  assert.deepEqual(delays, [50, 100, 200, 400, 500, 500, 500]);
  assert.equal(backoffDelay(3, { base: 100, cap: 1000, random: () => 0 }), 0);
  const top = backoffDelay(4, { base: 100, cap: 1000, random: () => 0.999 });
  assert.ok(top < 800 && top > 799, String(top));
  // never overflows: a huge attempt is the cap
  assert.equal(backoffDelay(5000, { base: 100, cap: 1000, random: () => 1 - 2 ** -53 }), 1000 * (1 - 2 ** -53));
  assert.equal(backoffDelay(2, { base: 100, cap: 1000, factor: 3, random: () => 1 }), 300);
  assert.throws(() => backoffDelay(0), RangeError);
  assert.throws(() => backoffDelay(1.5), RangeError);
  assert.throws(() => backoffDelay(1, { base: -1 }), RangeError);
});

test("backoff: the client waits exactly backoffDelay with its injected random source", async (t) => {
  const FakeSocket = fakeSocketClass();
  FakeSocket.refuse = true;
  const randoms = [0.1, 0.9, 0.5, 0.25, 0.75];
  let i = 0;
  const client = new ApixClient("ws://fake/ws", {
    token: "T",
    WebSocket: FakeSocket,
    backoffBase: 4,
    backoffCap: 10,
    random: () => randoms[i++ % randoms.length],
  });
  t.after(() => client.close());
  const seen = [];
  const fifth = new Promise((resolve) =>
    client.on("reconnecting", (info) => {
      seen.push(info);
      if (seen.length === 5) resolve();
    }),
  );
  client.connect().catch(() => {});
  await withTimeout(fifth, 5000, "five reconnect attempts");
  assert.deepEqual(
    seen.map((info) => info.attempt),
    [1, 2, 3, 4, 5],
  );
  assert.deepEqual(
    seen.map((info) => info.delay),
    [4 * 0.1, 8 * 0.9, 10 * 0.5, 10 * 0.25, 10 * 0.75],
  );
  assert.ok(seen.every((info) => info.code === 1006));
  assert.ok(FakeSocket.sockets.every((socket) => socket.protocols[0] === "apix.v1"));

  // an authenticated connection resets the count: the next retry is attempt 1 again
  FakeSocket.refuse = false;
  const socket = await FakeSocket.next().then(async () => {
    for (;;) {
      const last = FakeSocket.sockets.at(-1);
      if (!FakeSocket.refuse && last.readyState !== 3) return last;
      await FakeSocket.next();
    }
  });
  await acceptAuth(socket);
  const [info] = await (async () => {
    const next = waitFor(client, "reconnecting", () => true, 5000);
    socket.serverClose(1001);
    return next;
  })();
  assert.equal(info.attempt, 1);
  assert.equal(info.code, 1001);
});

// -- event ids -----------------------------------------------------------------------

test("event ids compare as (ms, seq) numbers, not strings", () => {
  assert.deepEqual(parseEventId("0"), [0n, 0n]);
  assert.deepEqual(parseEventId("1732550000123-7"), [1732550000123n, 7n]);
  assert.equal(parseEventId("abc"), null);
  assert.equal(parseEventId("1-2-3"), null);
  assert.equal(compareEventIds("9-0", "10-0"), -1);
  assert.equal(compareEventIds("10-2", "10-10"), -1);
  assert.equal(compareEventIds("10-10", "10-10"), 0);
  assert.equal(compareEventIds("0", "0-0"), 0);
  assert.equal(compareEventIds("99999999999999999999-1", "99999999999999999999-0"), 1);
  assert.throws(() => compareEventIds("x", "1-0"), TypeError);
});

// -- merge patch (RFC 7396) -------------------------------------------------------------

test("merge patch: RFC 7396 appendix A examples", () => {
  const cases = [
    [{ a: "b" }, { a: "c" }, { a: "c" }],
    [{ a: "b" }, { b: "c" }, { a: "b", b: "c" }],
    [{ a: "b" }, { a: null }, {}],
    [{ a: "b", b: "c" }, { a: null }, { b: "c" }],
    [{ a: ["b"] }, { a: "c" }, { a: "c" }],
    [{ a: "c" }, { a: ["b"] }, { a: ["b"] }],
    [{ a: { b: "c" } }, { a: { b: "d", c: null } }, { a: { b: "d" } }],
    [{ a: [{ b: "c" }] }, { a: [1] }, { a: [1] }],
    [["a", "b"], ["c", "d"], ["c", "d"]],
    [{ a: "b" }, ["c"], ["c"]],
    [{ a: "foo" }, null, null],
    [{ a: "foo" }, "bar", "bar"],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [[1, 2], { a: "b", c: null }, { a: "b" }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
  ];
  for (const [target, patch, expected] of cases) {
    const before = JSON.stringify(target);
    assert.deepEqual(mergePatch(target, patch), expected, `${before} + ${JSON.stringify(patch)}`);
    assert.equal(JSON.stringify(target), before, "the target is not modified");
  }
});

test("merge patch: RFC 7396 section 3 example, null target, __proto__ key", () => {
  const target = {
    title: "Goodbye!",
    author: { givenName: "John", familyName: "Doe" },
    tags: ["example", "sample"],
    content: "This will be unchanged",
  };
  const patch = { title: "Hello!", phoneNumber: "+01-123-456-7890", author: { familyName: null }, tags: ["example"] };
  assert.deepEqual(mergePatch(target, patch), {
    title: "Hello!",
    author: { givenName: "John" },
    tags: ["example"],
    content: "This will be unchanged",
    phoneNumber: "+01-123-456-7890",
  });
  // PROTOCOL.md: a patch applies to {} when the value is null
  assert.deepEqual(mergePatch(null, { a: 1, b: null }), { a: 1 });
  const evil = mergePatch({}, JSON.parse('{"__proto__": {"polluted": true}}'));
  assert.equal(Object.getPrototypeOf(evil), Object.prototype);
  assert.deepEqual(Object.keys(evil), ["__proto__"]);
  assert.equal({}.polluted, undefined);
});

// -- state pushes ------------------------------------------------------------------------

test("state push: next version applies, old ones are ignored, a patch after a gap is a gap", () => {
  const local = { value: { a: 1 }, version: 3 };
  assert.deepEqual(applyStatePush(local, { key: "k", version: 4, patch: { b: 2 } }), {
    action: "apply",
    value: { a: 1, b: 2 },
    version: 4,
  });
  assert.deepEqual(applyStatePush(local, { key: "k", version: 3, patch: { b: 2 } }), { action: "ignore" });
  assert.deepEqual(applyStatePush(local, { key: "k", version: 2, value: 7 }), { action: "ignore" });
  assert.deepEqual(applyStatePush(local, { key: "k", version: 5, patch: { b: 2 } }), { action: "gap" });
  // a full value is the whole state at its version: it applies after a gap too
  assert.deepEqual(applyStatePush(local, { key: "k", version: 6, value: null }), { action: "apply", value: null, version: 6 });
  assert.deepEqual(applyStatePush({ value: null, version: 1 }, { version: 2, patch: { x: 1 } }), {
    action: "apply",
    value: { x: 1 },
    version: 2,
  });
  assert.deepEqual(applyStatePush(undefined, { version: 1, value: 1 }), { action: "gap" });
});

test("presence push: join and leave keep the member list by conn", () => {
  const members = new Map();
  const bob = { sub: "bob", conn: "b1", since: 1, info: { name: "Bob" } };
  assert.deepEqual(applyPresencePush(members, { push: "presence", channel: "room", join: bob }), { type: "join", member: bob });
  applyPresencePush(members, { push: "presence", channel: "room", join: { sub: "bob", conn: "b2", since: 2 } });
  applyPresencePush(members, { push: "presence", channel: "room", join: bob }); // twice: still one member
  assert.deepEqual([...members.keys()], ["b1", "b2"]);
  assert.deepEqual(applyPresencePush(members, { push: "presence", channel: "room", leave: bob }), { type: "leave", member: bob });
  assert.deepEqual([...members.keys()], ["b2"]);
  assert.equal(applyPresencePush(members, { push: "presence", channel: "room" }), null);
});

test("close codes: which reconnect", () => {
  for (const code of [1000, 1001, 1006, 1011, 4008, 4009, 4029]) assert.equal(shouldReconnect(code), true, String(code));
  for (const code of STOP_CODES) assert.equal(shouldReconnect(code), false, String(code));
  assert.equal(shouldReconnect(4030, { reconnectOnAdminDisconnect: true }), true);
});

test("emitter: on, off, once, a throwing listener becomes an error event", () => {
  const emitter = new Emitter();
  const calls = [];
  const off = emitter.on("x", (v) => calls.push(["on", v]));
  emitter.once("x", (v) => calls.push(["once", v]));
  const errors = [];
  emitter.on("error", (err) => errors.push(err.message));
  emitter.on("x", () => {
    throw new Error("boom");
  });
  emitter.emit("x", 1);
  emitter.emit("x", 2);
  off();
  emitter.emit("x", 3);
  assert.deepEqual(calls, [
    ["on", 1],
    ["once", 1],
    ["on", 2],
  ]);
  assert.deepEqual(errors, ["boom", "boom", "boom"]);
  const fn = () => calls.push("never");
  emitter.once("y", fn);
  emitter.off("y", fn);
  assert.equal(emitter.emit("y"), false);
});

test("ApixError carries code, message, retryAfter and version", () => {
  const limited = ApixError.fromError({ code: "rate_limited", message: "slow down", retry_after: 0.42 });
  assert.equal(limited.code, "rate_limited");
  assert.equal(limited.message, "slow down");
  assert.equal(limited.retryAfter, 0.42);
  const conflict = ApixError.fromError({ code: "conflict", message: "version", version: 7 });
  assert.equal(conflict.version, 7);
  const closed = new ApixClosedError(1001, "going away");
  assert.ok(closed instanceof ApixError);
  assert.equal(closed.code, "closed");
  assert.equal(closed.closeCode, 1001);
});

// -- the client against scripted frames ------------------------------------------------------

function fakeClient(t, options = {}) {
  const FakeSocket = fakeSocketClass();
  const client = new ApixClient("ws://fake/ws", { token: "T", WebSocket: FakeSocket, backoffBase: 1, backoffCap: 2, ...options });
  t.after(() => client.close());
  return { FakeSocket, client };
}

test("dedupe: events with ids not after the last delivered one are dropped, per channel", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  const connected = client.connect();
  const socket = await FakeSocket.next();
  await acceptAuth(socket);
  await connected;
  const subscribed = client.subscribe("chat.a");
  socket.reply(await socket.nextOp("subscribe"), { channel: "chat.a", position: "0-0", recovered: true, replayed: 0 });
  await subscribed;
  const otherSub = client.subscribe("chat.b");
  socket.reply(await socket.nextOp("subscribe"), { channel: "chat.b", position: "5-0", recovered: true, replayed: 0 });
  await otherSub;
  const got = [];
  client.on("event", (channel, event) => got.push(`${channel}/${event.id}`));
  const ev = (channel, id) => ({ push: "event", channel, event: { id, ts: 1, data: id, from: "x" } });
  for (const frame of [
    ev("chat.a", "1-0"),
    ev("chat.a", "2-0"),
    ev("chat.a", "2-0"),
    ev("chat.a", "1-5"),
    ev("chat.b", "2-0"), // before chat.b's subscribe position
    ev("chat.b", "6-0"),
    ev("chat.a", "10-0"),
    ev("chat.a", "9-9"),
    ev("chat.c", "1-0"), // not subscribed
  ]) {
    socket.receive(frame);
  }
  assert.deepEqual(got, ["chat.a/1-0", "chat.a/2-0", "chat.b/6-0", "chat.a/10-0"]);
  assert.deepEqual(client.positions, { "chat.a": "10-0", "chat.b": "6-0" });
  // group events are at-least-once: a repeat (attempt 2) is delivered
  const groupSub = client.subscribe("jobs", { group: "w" });
  socket.reply(await socket.nextOp("subscribe"), { channel: "jobs", position: "0-0", recovered: true, replayed: 0 });
  await groupSub;
  socket.receive({ ...ev("jobs", "3-0"), group: "w", attempt: 1 });
  socket.receive({ ...ev("jobs", "3-0"), group: "w", attempt: 2 });
  assert.deepEqual(got.slice(4), ["jobs/3-0", "jobs/3-0"]);
});

test("resume: sends the session and the app's positions; replayed repeats are dropped; resync after the replay", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  client.connect();
  let socket = await FakeSocket.next();
  await acceptAuth(socket, { session: "S1" });
  const sub = client.subscribe("chat.a");
  socket.reply(await socket.nextOp("subscribe"), { channel: "chat.a", position: "0-0", recovered: true, replayed: 0 });
  await sub;
  const group = client.subscribe("jobs", { group: "w" });
  socket.reply(await socket.nextOp("subscribe"), { channel: "jobs", position: "0-0", recovered: true, replayed: 0 });
  await group;
  const order = [];
  client.on("event", (channel, event) => order.push(event.id));
  client.on("resync", (channel) => order.push(`resync:${channel}`));
  client.on("disconnected", (code) => order.push(`disconnected:${code}`));
  socket.receive({ push: "event", channel: "chat.a", event: { id: "4-0", ts: 4, data: 1 } });
  socket.serverClose(4009, "slow consumer");

  socket = await FakeSocket.next();
  const auth = await socket.nextOp("auth");
  assert.equal(auth.token, "T");
  assert.deepEqual(auth.resume, { session: "S1", positions: { "chat.a": "4-0" } });
  // replay before the reply: one repeat, two new ones
  for (const id of ["4-0", "5-0", "6-0"]) socket.receive({ push: "event", channel: "chat.a", event: { id, ts: 1, data: id } });
  socket.reply(auth, {
    conn: "c2",
    org: "acme",
    sub: "alice",
    session: "S1",
    resumed: true,
    channels: [
      { channel: "chat.a", position: "6-0", recovered: false, replayed: 3 },
      { channel: "jobs", group: "w", position: "6-0", recovered: true, replayed: 0 },
    ],
  });
  socket.receive({ push: "event", channel: "chat.a", event: { id: "7-0", ts: 1, data: 7 } });
  assert.deepEqual(order, ["4-0", "disconnected:4009", "5-0", "6-0", "resync:chat.a", "7-0"]);
  assert.equal(client.stats.resumes, 1);
  // both subscriptions were restored: nothing is subscribed again
  const ping = client.ping();
  socket.reply(await socket.nextOp("ping"), {});
  await ping;
  assert.equal(socket.sent.filter((frame) => frame.op === "subscribe").length, 0);
});

test("resume refused: a fresh session and subscribe again with since = own position", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  client.connect();
  let socket = await FakeSocket.next();
  await acceptAuth(socket, { session: "S1" });
  const sub = client.subscribe("chat.a", { since: "2-0" });
  const first = await socket.nextOp("subscribe");
  assert.equal(first.since, "2-0");
  socket.receive({ push: "event", channel: "chat.a", event: { id: "3-0", ts: 1, data: 3 } });
  socket.reply(first, { channel: "chat.a", position: "3-0", recovered: true, replayed: 1 });
  await sub;
  socket.serverClose(1006);
  socket = await FakeSocket.next();
  await acceptAuth(socket, { session: "S2", resumed: false });
  const again = await socket.nextOp("subscribe");
  assert.deepEqual({ channel: again.channel, since: again.since }, { channel: "chat.a", since: "3-0" });
  assert.equal(client.session, "S2");
  assert.equal(client.stats.lostSessions, 1);
});

test("requests wait for a connection; a connection lost before the reply rejects with ApixClosedError", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  const publish = client.publish("chat.a", { n: 1 }, { key: "k1" });
  client.connect();
  const socket = await FakeSocket.next();
  await acceptAuth(socket);
  const frame = await socket.nextOp("publish");
  assert.deepEqual({ channel: frame.channel, data: frame.data, key: frame.key }, { channel: "chat.a", data: { n: 1 }, key: "k1" });
  socket.fail(frame, "rate_limited", "too many", { retry_after: 1.5 });
  await assert.rejects(publish, (err) => err instanceof ApixError && err.code === "rate_limited" && err.retryAfter === 1.5);
  const lost = client.history("chat.a", { limit: 5 });
  const sent = await socket.nextOp("history");
  assert.equal(sent.limit, 5);
  socket.serverClose(1001);
  await assert.rejects(lost, (err) => err instanceof ApixClosedError && err.closeCode === 1001);
});

test("state: local copy follows value and patch pushes; a version gap calls state.get", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  client.connect();
  const socket = await FakeSocket.next();
  await acceptAuth(socket);
  const changes = [];
  client.on("state", (key, value, version, cause) => changes.push([key, version, cause]));
  const sub = client.stateSubscribe("doc.1");
  socket.reply(await socket.nextOp("state.subscribe"), { value: { a: 1 }, version: 3 });
  assert.deepEqual(await sub, { value: { a: 1 }, version: 3 });
  socket.receive({ push: "state", key: "doc.1", version: 4, patch: { b: 2 } });
  assert.deepEqual(client.stateValue("doc.1"), { value: { a: 1, b: 2 }, version: 4 });
  socket.receive({ push: "state", key: "doc.1", version: 4, patch: { b: 3 } }); // a repeat
  socket.receive({ push: "state", key: "doc.1", version: 6, patch: { c: 3 } }); // 5 is missing
  const get = await socket.nextOp("state.get");
  assert.equal(get.key, "doc.1");
  socket.receive({ push: "state", key: "doc.1", version: 7, patch: { d: 4 } }); // while fetching
  socket.reply(get, { value: { a: 1, b: 2, x: 5, c: 3 }, version: 6 });
  assert.deepEqual(client.stateValue("doc.1"), { value: { a: 1, b: 2, x: 5, c: 3, d: 4 }, version: 7 });
  socket.receive({ push: "state", key: "doc.1", version: 8, value: null }); // delete
  assert.deepEqual(client.stateValue("doc.1"), { value: null, version: 8 });
  assert.deepEqual(changes, [
    ["doc.1", 3, "subscribe"],
    ["doc.1", 4, "patch"],
    ["doc.1", 6, "get"],
    ["doc.1", 7, "patch"],
    ["doc.1", 8, "value"],
  ]);
  // conflict carries the current version
  const set = client.stateSet("doc.1", { z: 1 }, { version: 2 });
  socket.fail(await socket.nextOp("state.set"), "conflict", "version mismatch", { version: 8 });
  await assert.rejects(set, (err) => err.code === "conflict" && err.version === 8);
});

test("state and presence are restored on resume from the result's state array", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  client.connect();
  let socket = await FakeSocket.next();
  await acceptAuth(socket, { session: "S1" });
  const sub = client.stateSubscribe("doc.1");
  socket.reply(await socket.nextOp("state.subscribe"), { value: { a: 1 }, version: 1 });
  await sub;
  const room = client.subscribe("room.1", { presence: true });
  const roomFrame = await socket.nextOp("subscribe");
  assert.equal(roomFrame.presence, true);
  const me = { sub: "alice", conn: "c1", since: 1 };
  socket.reply(roomFrame, { channel: "room.1", position: "0-0", recovered: true, replayed: 0, presence: { members: [me], total: 1 } });
  await room;
  socket.serverClose(1001);
  socket = await FakeSocket.next();
  const auth = await socket.nextOp("auth");
  socket.reply(auth, {
    session: "S1",
    conn: "c2",
    resumed: true,
    channels: [{ channel: "room.1", position: "0-0", recovered: true, replayed: 0 }],
    state: [{ key: "doc.1", version: 3, value: { a: 2 } }],
  });
  assert.deepEqual(client.stateValue("doc.1"), { value: { a: 2 }, version: 3 });
  assert.equal(socket.sent.filter((frame) => frame.op === "state.subscribe").length, 0);
  // presence: subscribed again to get the member list afresh
  const again = await socket.nextOp("subscribe");
  assert.deepEqual({ channel: again.channel, presence: again.presence }, { channel: "room.1", presence: true });
  const bob = { sub: "bob", conn: "b1", since: 2 };
  const me2 = { sub: "alice", conn: "c2", since: 3 };
  socket.reply(again, { channel: "room.1", position: "0-0", recovered: true, replayed: 0, presence: { members: [me2, bob], total: 2 } });
  assert.deepEqual(client.members("room.1"), [me2, bob]);
  socket.receive({ push: "presence", channel: "room.1", leave: bob });
  assert.deepEqual(client.members("room.1"), [me2]);
});

test("presence: member list per channel from the subscribe result and join/leave pushes", async (t) => {
  const { FakeSocket, client } = fakeClient(t);
  client.connect();
  const socket = await FakeSocket.next();
  await acceptAuth(socket);
  const seen = [];
  client.on("presence", (channel, change, members) => seen.push([change.type, members.length]));
  const room = client.subscribe("room.1", { presence: true });
  const me = { sub: "alice", conn: "c1", since: 1 };
  socket.reply(await socket.nextOp("subscribe"), { channel: "room.1", position: "0-0", recovered: true, replayed: 0, presence: { members: [me], total: 1 } });
  await room;
  const bob = { sub: "bob", conn: "b1", since: 2, info: { name: "Bob" } };
  socket.receive({ push: "presence", channel: "room.1", join: bob });
  assert.deepEqual(client.members("room.1"), [me, bob]);
  socket.receive({ push: "presence", channel: "room.1", leave: bob });
  assert.deepEqual(client.members("room.1"), [me]);
  assert.deepEqual(seen, [
    ["sync", 1],
    ["join", 2],
    ["leave", 1],
  ]);
  const query = client.presence("room.1", { limit: 10 });
  const frame = await socket.nextOp("presence");
  assert.equal(frame.limit, 10);
  socket.reply(frame, { members: [me], total: 1, users: 1 });
  assert.deepEqual(await query, { members: [me], total: 1, users: 1 });
});

test("token_expiring: the provider is asked again and the new token sent with refresh", async (t) => {
  const tokens = ["T1", "T2"];
  const { FakeSocket, client } = fakeClient(t, { token: async () => tokens.shift() });
  client.connect();
  const socket = await FakeSocket.next();
  const auth = await acceptAuth(socket);
  assert.equal(auth.token, "T1");
  const refreshed = waitFor(client, "tokenRefreshed");
  socket.receive({ push: "token_expiring", exp: 100 });
  const refresh = await socket.nextOp("refresh");
  assert.equal(refresh.token, "T2");
  socket.reply(refresh, { exp: 200 });
  assert.deepEqual(await refreshed, [200]);
});

test("stop codes: 4030 stops by default, reconnects when configured; 4001 with a fixed token stops", async (t) => {
  {
    const { FakeSocket, client } = fakeClient(t);
    client.connect();
    const socket = await FakeSocket.next();
    await acceptAuth(socket);
    const closed = waitFor(client, "closed");
    socket.serverClose(4030, "admin");
    assert.deepEqual(await closed, [4030, "admin"]);
    assert.equal(FakeSocket.sockets.length, 1);
    await assert.rejects(client.publish("a", 1), ApixClosedError);
  }
  {
    const { FakeSocket, client } = fakeClient(t, { reconnectOnAdminDisconnect: true });
    client.connect();
    const socket = await FakeSocket.next();
    await acceptAuth(socket);
    socket.serverClose(4030, "admin");
    const second = await FakeSocket.next();
    await acceptAuth(second);
    assert.equal(client.connected, true);
  }
  {
    const { FakeSocket, client } = fakeClient(t, { token: "bad" });
    const connected = client.connect();
    const socket = await FakeSocket.next();
    const closed = waitFor(client, "closed");
    socket.fail(await socket.nextOp("auth"), "unauthenticated", "invalid token");
    socket.serverClose(4001, "invalid token");
    await assert.rejects(connected, (err) => err instanceof ApixClosedError && err.closeCode === 4001);
    assert.equal((await closed)[0], 4001);
  }
  {
    // a provider that keeps giving the refused token: one more try, then stop
    const { FakeSocket, client } = fakeClient(t, { token: () => "same" });
    client.connect().catch(() => {});
    const closed = waitFor(client, "closed");
    const socket = await FakeSocket.next();
    socket.fail(await socket.nextOp("auth"), "unauthenticated", "invalid token");
    socket.serverClose(4001, "invalid token");
    assert.equal((await closed)[0], 4001);
    assert.equal(FakeSocket.sockets.length, 1);
  }
});
