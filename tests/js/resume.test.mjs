// Resume across a server restart: a redis-server of the test's own keeps
// history and sessions; the server is stopped with SIGTERM mid-stream (close
// 1001) and a new server process is started on the same dev key dir and
// redis. Every event reaches the application exactly once, in order.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { ApixClient, ApixClosedError, compareEventIds } from "../../apix_trio/web/static/apix.js";
import { WebSocket, collect, killAll, mintToken, startRedis, startServer, tempDir, waitFor, waitUntil } from "./server.mjs";

const clients = [];

after(async () => {
  await Promise.all(clients.map((client) => client.close()));
  await killAll();
});

test("SIGTERM mid-stream -> 1001 -> resume on a new server: every event exactly once, in order", async (t) => {
  const keyDir = tempDir();
  const alice = await mintToken(keyDir, { sub: "alice" });
  const [bob, redis] = await Promise.all([mintToken(keyDir, { sub: "bob" }), startRedis()]);
  const env = { APIX_BROKER_REDIS_URL: redis.url, APIX_SERVER_SHUTDOWN_GRACE: "5" };
  let server = await startServer({ keyDir, env, name: "first" });
  const url = () => server.url; // the restarted server listens on another port

  const options = { WebSocket, backoffBase: 50, backoffCap: 300 };
  const subscriber = new ApixClient(url, { token: () => alice, ...options });
  const publisher = new ApixClient(url, { token: () => bob, ...options });
  clients.push(subscriber, publisher);
  const seen = collect(subscriber, "stream.x");
  const disconnects = [];
  subscriber.on("disconnected", (code) => disconnects.push(code));
  const resyncs = [];
  subscriber.on("resync", (channel) => resyncs.push(channel));
  await subscriber.subscribe("stream.x");

  const TOTAL = 120;
  const WINDOW = 8; // published but not yet received: keeps events in flight
  const RESTART_AT = 40;
  let retries = 0;
  const publishing = (async () => {
    for (let n = 0; n < TOTAL; n += 1) {
      if (n - seen.length > WINDOW) {
        await waitUntil(subscriber, "event:stream.x", () => n - seen.length <= WINDOW, 20000, `event ${n - WINDOW}`);
      }
      for (;;) {
        try {
          await publisher.publish("stream.x", { n }, { key: `n-${n}` });
          break;
        } catch (err) {
          // lost with the connection, or refused while the server stops: the
          // same key makes the retry exactly-once
          if (!(err instanceof ApixClosedError) && err.code !== "unavailable") throw err;
          retries += 1;
        }
      }
    }
  })();

  await waitUntil(subscriber, "event:stream.x", () => seen.length >= RESTART_AT, 20000, `${RESTART_AT} events`);
  const gone = waitFor(subscriber, "disconnected", () => true, 15000);
  assert.equal(await server.stop("SIGTERM"), 0);
  assert.equal((await gone)[0], 1001);
  const stoppedAt = seen.length;
  server = await startServer({ keyDir, env, name: "second" });
  const [auth] = await waitFor(subscriber, "connected", () => true, 15000);
  assert.equal(auth.resumed, true);
  assert.deepEqual(
    auth.channels.map((entry) => [entry.channel, entry.recovered]),
    [["stream.x", true]],
  );

  await publishing;
  await waitUntil(subscriber, "event:stream.x", () => seen.length >= TOTAL, 20000, `all ${TOTAL} events`);
  const lastId = (await publisher.history("stream.x", { limit: 1 })).position;
  // one more event proves nothing further was queued behind the last one
  const marker = await publisher.publish("stream.x", { n: "end" });
  await waitUntil(subscriber, "event:stream.x", () => seen.at(-1).id === marker.id, 10000, "the marker");

  const numbers = seen.slice(0, -1).map((event) => event.data.n);
  assert.deepEqual(
    numbers,
    Array.from({ length: TOTAL }, (_, n) => n),
  );
  for (let i = 1; i < seen.length; i += 1) assert.equal(compareEventIds(seen[i - 1].id, seen[i].id), -1);
  assert.equal(seen[TOTAL - 1].id, lastId);
  assert.ok(stoppedAt < TOTAL, "the restart happened mid-stream");
  assert.deepEqual(disconnects, [1001]);
  assert.deepEqual(resyncs, []);
  assert.equal(subscriber.stats.resumes, 1);
  assert.equal(subscriber.stats.lostSessions, 0);
  t.diagnostic(`stopped after ${stoppedAt} events; replayed on resume: ${auth.channels[0].replayed}; publish retries: ${retries}`);
  await redis.stop();
});
