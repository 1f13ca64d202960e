// End-to-end tests of apix.js against a real `apix-trio serve` (embedded
// broker) started for this file.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { ApixClient, ApixClosedError, ApixError } from "../../apix_trio/web/static/apix.js";
import { WebSocket, adminPost, collect, gate, killAll, mintToken, startServer, tempDir, waitFor, waitUntil } from "./server.mjs";

const HISTORY_SIZE = 10;
let server;
let keyDir;
const tokens = {};
const clients = [];

before(async () => {
  keyDir = tempDir();
  // the first mint creates the key pair; the rest can run side by side
  tokens.alice = await mintToken(keyDir, { sub: "alice" });
  [tokens.bob, tokens.admin, tokens.limited, server] = await Promise.all([
    mintToken(keyDir, { sub: "bob" }),
    mintToken(keyDir, { sub: "ops", roles: ["admin"] }),
    mintToken(keyDir, { sub: "carol", pub: ["only.>"], subs: ["only.>"] }),
    startServer({
      keyDir,
      env: {
        APIX_DEFAULTS_HISTORY_SIZE: String(HISTORY_SIZE),
        APIX_AUTH_EXPIRY_WARNING: "1",
        APIX_AUTH_LEEWAY: "0",
        APIX_DELIVERY_RETRY_BASE: "0.2",
        APIX_DELIVERY_RETRY_MAX: "0.4",
      },
    }),
  ]);
});

after(async () => {
  await Promise.all(clients.map((client) => client.close()));
  await killAll();
});

function client(token, options = {}) {
  const made = new ApixClient(options.url ?? server.url, { token, WebSocket, backoffBase: 20, backoffCap: 200, ...options });
  clients.push(made);
  return made;
}

test("connect, subscribe, publish, receive (subprotocol apix.v1, per-channel handler)", async () => {
  let socket;
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      socket = this;
    }
  }
  const alice = client(tokens.alice, { WebSocket: Recording });
  const bob = client(tokens.bob);
  const result = await alice.connect();
  assert.equal(result.sub, "alice");
  assert.equal(result.org, "acme");
  assert.equal(result.resumed, false);
  assert.equal(typeof result.session, "string");
  assert.equal(socket.protocol, "apix.v1");
  await bob.connect();
  const sub = await alice.subscribe("chat.room1");
  assert.deepEqual(Object.keys(sub).sort(), ["channel", "position", "recovered", "replayed"]);
  assert.equal(sub.position, "0-0");
  const onChannel = waitFor(alice, "event:chat.room1");
  const anywhere = waitFor(alice, "event", (channel) => channel === "chat.room1");
  const published = await bob.publish("chat.room1", { text: "hi" });
  assert.equal(published.duplicate, false);
  const [event] = await onChannel;
  assert.deepEqual(event, { id: published.id, ts: published.ts, data: { text: "hi" }, from: "bob" });
  const [channel, same] = await anywhere;
  assert.equal(channel, "chat.room1");
  assert.equal(same.id, published.id);
  assert.deepEqual(alice.positions, { "chat.room1": published.id });
  assert.deepEqual(await alice.ping(), {});
});

test("errors: forbidden and bad_request reject with ApixError; the connection stays", async () => {
  const carol = client(tokens.limited);
  await carol.connect();
  await assert.rejects(carol.publish("chat.x", 1), (err) => err instanceof ApixError && err.code === "forbidden" && typeof err.message === "string");
  await assert.rejects(carol.subscribe("chat.x"), (err) => err.code === "forbidden" && err.channel === "chat.x");
  await assert.rejects(carol.publish("bad..name", 1), (err) => err.code === "bad_request");
  const ok = await carol.publish("only.mine", { n: 1 });
  assert.match(ok.id, /^\d+-\d+$/);
  assert.equal(carol.connected, true);
});

test("history: newest first-limited, since, position", async () => {
  const alice = client(tokens.alice);
  const ids = [];
  for (let n = 0; n < 4; n += 1) ids.push((await alice.publish("chat.history", { n })).id);
  const all = await alice.history("chat.history");
  assert.deepEqual(
    all.events.map((event) => event.data.n),
    [0, 1, 2, 3],
  );
  assert.equal(all.position, ids[3]);
  const newest = await alice.history("chat.history", { limit: 2 });
  assert.deepEqual(
    newest.events.map((event) => event.id),
    ids.slice(2),
  );
  const after = await alice.history("chat.history", { since: ids[0], limit: 2 });
  assert.deepEqual(
    after.events.map((event) => event.id),
    ids.slice(1, 3),
  );
});

test("idempotency key: a duplicate publish stores nothing and returns the first id", async () => {
  const alice = client(tokens.alice);
  const seen = collect(alice, "chat.idem");
  await alice.subscribe("chat.idem");
  const first = await alice.publish("chat.idem", { n: 1 }, { key: "order-42" });
  const again = await alice.publish("chat.idem", { n: 2 }, { key: "order-42" });
  assert.equal(first.duplicate, false);
  assert.equal(again.duplicate, true);
  assert.equal(again.id, first.id);
  const marker = await alice.publish("chat.idem", { n: 3 });
  await waitUntil(alice, "event:chat.idem", () => seen.some((event) => event.id === marker.id), 5000, "the marker event");
  assert.deepEqual(
    seen.map((event) => event.data),
    [{ n: 1 }, { n: 3 }],
  );
  assert.equal(seen[0].frame.event.key, "order-42");
  const history = await alice.history("chat.idem");
  assert.equal(history.events.length, 2);
});

test("group subscription: delivered with attempt, redelivered until acked, then ack counts", async () => {
  const worker = client(tokens.alice);
  const bob = client(tokens.bob);
  const joined = await worker.subscribe("jobs.resize", { group: "workers" });
  assert.equal(joined.recovered, true);
  const attempts = [];
  worker.on("event:jobs.resize", (event, frame) => attempts.push({ id: event.id, group: frame.group, attempt: frame.attempt }));
  const published = await bob.publish("jobs.resize", { img: 7 });
  await waitUntil(worker, "event:jobs.resize", () => attempts.length >= 2, 10000, "a redelivery");
  assert.deepEqual(attempts.slice(0, 2), [
    { id: published.id, group: "workers", attempt: 1 },
    { id: published.id, group: "workers", attempt: 2 },
  ]);
  assert.deepEqual(await worker.ack("jobs.resize", "workers", [published.id]), { acked: 1 });
  assert.deepEqual(await worker.ack("jobs.resize", "workers", [published.id]), { acked: 0 });
  await assert.rejects(bob.ack("jobs.resize", "workers", [published.id]), (err) => err.code === "not_found");
});

test("a bad token: 4001, no reconnect with a fixed token", async () => {
  const stranger = client("not-a-jwt");
  const errors = [];
  stranger.on("error", (err) => errors.push(err.code));
  const closed = waitFor(stranger, "closed");
  await assert.rejects(stranger.connect(), (err) => err instanceof ApixClosedError && err.closeCode === 4001);
  assert.equal((await closed)[0], 4001);
  assert.deepEqual(errors, ["unauthenticated"]);
  assert.equal(stranger.stats.connects, 0);
});

test("admin disconnect (4030): stops by default", async () => {
  const alice = client(tokens.alice);
  const { conn } = await alice.connect();
  const closed = waitFor(alice, "closed");
  const disconnected = waitFor(alice, "disconnected");
  const answer = await adminPost(server, tokens.admin, "/api/v1/disconnect", { conn });
  assert.equal(answer.status, 200, JSON.stringify(answer.body));
  assert.equal((await disconnected)[0], 4030);
  assert.equal((await closed)[0], 4030);
  assert.equal(alice.closed, true);
  await assert.rejects(alice.publish("chat.x", 1), (err) => err instanceof ApixClosedError);
});

test("resync: more than history_size events missed while away -> resync after the replay, then live", async () => {
  let blocker = null;
  const provider = () => (blocker ? blocker.promise.then(() => tokens.alice) : tokens.alice);
  const alice = client(provider, { reconnectOnAdminDisconnect: true });
  const bob = client(tokens.bob);
  const order = [];
  alice.on("event:feed.r", (event) => order.push(event.data.n));
  alice.on("resync", (channel, result) => order.push(`resync:${channel}:${result.recovered}`));
  await alice.subscribe("feed.r");
  for (let n = 0; n < 3; n += 1) await bob.publish("feed.r", { n });
  await waitUntil(alice, "event:feed.r", () => order.length === 3, 5000, "the first three events");

  blocker = gate();
  const disconnected = waitFor(alice, "disconnected");
  const reconnecting = waitFor(alice, "reconnecting");
  const answer = await adminPost(server, tokens.admin, "/api/v1/disconnect", { conn: alice.authResult.conn });
  assert.equal(answer.status, 200);
  assert.equal((await disconnected)[0], 4030);
  await reconnecting;
  const missed = HISTORY_SIZE * 2 + 5;
  for (let n = 3; n < 3 + missed; n += 1) await bob.publish("feed.r", { n });
  const last = 3 + missed - 1;

  const resynced = waitFor(alice, "resync");
  const connected = waitFor(alice, "connected");
  blocker.open();
  const [auth] = await connected;
  assert.equal(auth.resumed, true);
  await resynced;
  await bob.publish("feed.r", { n: last + 1 });
  await waitUntil(alice, "event:feed.r", () => order.at(-1) === last + 1, 5000, "the live event");

  const at = order.indexOf("resync:feed.r:false");
  assert.ok(at > 3, JSON.stringify(order));
  const replayed = order.slice(3, at);
  assert.deepEqual(order.slice(0, 3), [0, 1, 2]);
  assert.ok(replayed.length >= HISTORY_SIZE && replayed.length < missed, JSON.stringify(replayed));
  assert.deepEqual(
    replayed,
    Array.from({ length: replayed.length }, (_, i) => last - replayed.length + 1 + i),
  );
  assert.deepEqual(order.slice(at + 1), [last + 1]);
  assert.equal(alice.stats.resumes, 1);
});

test("token refresh on token_expiring keeps the connection past the old token's exp", async () => {
  // whole seconds: at least 2 s left after minting, the warning 1 s before exp
  const short = await mintToken(keyDir, { sub: "alice", ttl: 3 });
  let calls = 0;
  const refreshing = client(() => {
    calls += 1;
    return calls === 1 ? short : tokens.alice;
  });
  const fixed = client(short); // same token, same exp: the control
  const expiring = waitFor(refreshing, "tokenExpiring");
  const refreshed = waitFor(refreshing, "tokenRefreshed");
  const fixedClosed = waitFor(fixed, "closed", () => true, 10000);
  const lost = [];
  refreshing.on("disconnected", (code) => lost.push(code));
  const first = await refreshing.connect();
  await fixed.connect();
  const [exp] = await expiring;
  assert.equal(exp, first.exp);
  const [newExp] = await refreshed;
  assert.ok(newExp > first.exp, `${newExp} > ${first.exp}`);
  assert.equal(calls, 2);
  // the control, which could not refresh, is closed with 4003 at exp and stops
  assert.equal((await fixedClosed)[0], 4003);
  assert.deepEqual(await refreshing.ping(), {});
  assert.deepEqual(lost, []);
  assert.equal(refreshing.connected, true);
});
