// Client scenarios run inside a Chromium page by tests/test_browser_client.py
// (served to the page by Playwright on the server's origin: see tests/browser.py).
// They mirror tests/js/*.test.mjs, with the browser's own WebSocket.

import { ApixClient, ApixClosedError } from "/client/apix.js";

/** Resolves once check() is true, re-checked on every `name` event of `emitter`. */
export function waitUntil(emitter, name, check, ms, what) {
  return new Promise((resolve, reject) => {
    if (check()) return resolve();
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    const off = emitter.on(name, () => {
      if (check()) {
        off();
        clearTimeout(timer);
        resolve();
      }
    });
  });
}

/** A client that records its WebSocket objects (to read the negotiated subprotocol). */
export function recordingClient(url, token) {
  const sockets = [];
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  const client = new ApixClient(url, { token, WebSocket: Recording });
  client.sockets = sockets;
  return client;
}

/** A connected client as `window.client`, recording presence and state pushes. */
export async function connectRecording(url, token) {
  const client = new ApixClient(url, { token });
  window.client = client;
  window.presence = [];
  window.states = [];
  client.on("presence", (channel, change) => {
    window.presence.push([channel, change.type, change.member ? change.member.sub : null]);
  });
  client.on("state", (key, value, version) => window.states.push([key, version]));
  await client.connect();
}

/** Did `sub` join (type "join") or leave ("leave") as seen by this page? */
export function sawPresence(type, sub) {
  return window.presence.some(([, kind, who]) => kind === type && who === sub);
}

/**
 * Subscriber and publisher on one page; the publisher keeps at most
 * `inFlight` events published but not yet received, so events are in flight
 * when the server stops. Progress is in `window.s`; the URL is `s.url`,
 * which the test changes once the new server listens.
 */
export function restartScenario({ url, alice, bob, total, inFlight }) {
  const s = { url, seen: [], disconnects: [], resyncs: [], retries: 0, finished: false, error: null };
  window.s = s;
  const options = { backoffBase: 50, backoffCap: 300 };
  const subscriber = new ApixClient(() => s.url, { token: () => alice, ...options });
  const publisher = new ApixClient(() => s.url, { token: () => bob, ...options });
  const channel = "event:stream.x";
  subscriber.on(channel, (event) => s.seen.push({ id: event.id, n: event.data.n }));
  const offDisconnected = subscriber.on("disconnected", (code) => s.disconnects.push(code));
  subscriber.on("resync", (name) => s.resyncs.push(name));
  subscriber.on("connected", (auth) => {
    if (auth.resumed) s.resumed = { resumed: auth.resumed, channels: auth.channels };
  });
  const run = async () => {
    await subscriber.subscribe("stream.x");
    for (let n = 0; n < total; n += 1) {
      if (n - s.seen.length > inFlight) {
        await waitUntil(subscriber, channel, () => n - s.seen.length <= inFlight, 30000, `event ${n - inFlight}`);
      }
      for (;;) {
        try {
          await publisher.publish("stream.x", { n }, { key: `n-${n}` });
          break;
        } catch (err) {
          // lost with the connection or refused while the server stops: the
          // same idempotency key makes the retry exactly-once
          if (!(err instanceof ApixClosedError) && err.code !== "unavailable") throw err;
          s.retries += 1;
        }
      }
    }
    await waitUntil(subscriber, channel, () => s.seen.length >= total, 30000, `all ${total} events`);
    s.lastId = (await publisher.history("stream.x", { limit: 1 })).position;
    const marker = await publisher.publish("stream.x", { n: "end" });
    await waitUntil(subscriber, channel, () => s.seen.at(-1).id === marker.id, 10000, "the marker");
    s.markerId = marker.id;
    s.stats = { ...subscriber.stats };
    offDisconnected(); // our own close (1000) is not part of the scenario
    await subscriber.close();
    await publisher.close();
  };
  run().then(
    () => {
      s.finished = true;
    },
    (err) => {
      s.error = String((err && err.stack) || err);
      s.finished = true;
    },
  );
}

/** The restart scenario's outcome (plain data). */
export function restartResult() {
  const { error, seen, disconnects, resyncs, resumed, stats, lastId, markerId, retries } = window.s;
  return { error, seen, disconnects, resyncs, resumed, stats, lastId, markerId, retries };
}
