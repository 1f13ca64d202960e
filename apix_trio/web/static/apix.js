// apix.js: the official JavaScript client of the APIX wire protocol v1.
//
// One ES module, no build step, no runtime dependencies. It runs in browsers
// (global WebSocket) and in Node 20+ (pass a WebSocket constructor, e.g. the
// `ws` package's, as `options.WebSocket`). Types: apix.d.ts next to this file.
//
// Theory of operation
// -------------------
// An `ApixClient` owns at most one WebSocket at a time. `connect()` starts a
// loop: take a token from the provider, open the socket (subprotocol
// `apix.v1`), send the first-frame `auth` (with `resume` once a session
// exists), serve the connection until it closes, wait a fully jittered,
// capped exponential backoff, and again, until `close()` or a close code
// that means "stop" (see STOP_CODES and `shouldReconnect`).
//
// Every frame of a connection is handled synchronously, in arrival order, by
// one message handler; replies to the client's own control frames
// (subscribe, auth) are processed where they stand in that stream. That is
// what makes a `resync` come right after the events a replay delivered and
// before the channel's live events.
//
// Exactly once per channel: the client remembers, per plain channel, the id
// of the last event it handed to the application (`positions`); an event
// whose id is not greater is a duplicate and is dropped. A reconnect resumes
// the session with those positions, so the server replays exactly what came
// after them. A lost session (expired) gives a fresh one, and the client
// subscribes again with `since` = its positions. When history no longer held
// everything (`recovered: false`) the application gets `resync(channel)`.
// Group subscriptions are at-least-once by design: their events (which carry
// `group` and `attempt`) are handed over as they come, never deduplicated.
//
// Requests (publish, history, ack, state ops, ...) made while disconnected
// wait for the next authenticated connection and are sent once: one whose
// connection ends before its reply rejects with `ApixClosedError` (it may or
// may not have reached the server: retry a publish with the same `key`).

export const SUBPROTOCOL = "apix.v1";

/** Close codes after which the client does not reconnect by default. */
export const STOP_CODES = Object.freeze([1002, 1003, 1007, 1008, 1009, 4030]);

/** Close codes after which the client reconnects (documented; anything not in
 * STOP_CODES and not 4001/4003 reconnects too). */
export const RECONNECT_CODES = Object.freeze([1000, 1001, 1006, 1011, 1012, 1013, 1014, 4008, 4009, 4029]);

const DEFAULTS = Object.freeze({
  backoffBase: 500,
  backoffCap: 30000,
  connectTimeout: 10000,
  requestTimeout: 0,
  reconnectOnAdminDisconnect: false,
});

// ----------------------------------------------------------------- errors ---

/** An error reply from the server (or a client-side failure: code `closed`,
 * `timeout`, `cancelled`). */
export class ApixError extends Error {
  constructor(code, message, extra = {}) {
    super(message || code);
    this.name = "ApixError";
    this.code = code;
    this.retryAfter = extra.retryAfter;
    this.version = extra.version;
    this.channel = extra.channel;
    this.group = extra.group;
    this.key = extra.key;
  }

  /** An ApixError from the `error` object of a reply frame. */
  static fromError(error, extra = {}) {
    const e = error && typeof error === "object" ? error : {};
    const code = typeof e.code === "string" ? e.code : "internal";
    const message = typeof e.message === "string" ? e.message : String(code);
    return new ApixError(code, message, {
      ...extra,
      retryAfter: typeof e.retry_after === "number" ? e.retry_after : undefined,
      version: typeof e.version === "number" ? e.version : undefined,
    });
  }
}

/** The connection ended before the reply came (code `closed`). */
export class ApixClosedError extends ApixError {
  constructor(closeCode, reason) {
    super("closed", `connection closed (${closeCode}${reason ? ": " + reason : ""})`);
    this.name = "ApixClosedError";
    this.closeCode = closeCode;
    this.reason = reason || "";
  }
}

// ------------------------------------------------------------ pure helpers ---

/**
 * Milliseconds to wait before reconnect attempt `attempt` (the first retry
 * is 1): uniform in [0, min(cap, base * factor ** (attempt - 1))), "full
 * jitter". `random` returns floats in [0, 1) (default Math.random).
 */
export function backoffDelay(attempt, { base = DEFAULTS.backoffBase, cap = DEFAULTS.backoffCap, factor = 2, random = Math.random } = {}) {
  if (!Number.isInteger(attempt) || attempt < 1) {
    throw new RangeError(`attempt counts from 1, not ${attempt}`);
  }
  if (!(base >= 0) || !(cap >= 0) || !(factor >= 0)) {
    throw new RangeError("base, cap and factor must not be negative");
  }
  let ceiling = base * factor ** (attempt - 1);
  if (!Number.isFinite(ceiling) || ceiling > cap) ceiling = cap;
  return ceiling * random();
}

const ID_RE = /^(\d+)(?:-(\d+))?$/;

/** An event id (`"<ms>-<seq>"`, or `"0"`) as [ms, seq] BigInts; null if malformed. */
export function parseEventId(id) {
  if (typeof id !== "string") return null;
  const m = ID_RE.exec(id);
  if (!m) return null;
  return [BigInt(m[1]), BigInt(m[2] ?? "0")];
}

/** -1, 0 or 1 as event id `a` is before, equal to or after `b`. Throws on a malformed id. */
export function compareEventIds(a, b) {
  const x = parseEventId(a);
  const y = parseEventId(b);
  if (x === null || y === null) throw new TypeError(`not an event id: ${x === null ? a : b}`);
  if (x[0] !== y[0]) return x[0] < y[0] ? -1 : 1;
  if (x[1] !== y[1]) return x[1] < y[1] ? -1 : 1;
  return 0;
}

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function defineOwn(target, key, value) {
  // Plain assignment of "__proto__" would set the prototype instead.
  Object.defineProperty(target, key, { value, writable: true, enumerable: true, configurable: true });
}

/**
 * RFC 7396 JSON merge patch: the result of applying `patch` to `target`.
 * Neither argument is modified; untouched nested values are shared.
 */
export function mergePatch(target, patch) {
  if (!isPlainObject(patch)) return patch;
  const result = {};
  if (isPlainObject(target)) {
    for (const key of Object.keys(target)) defineOwn(result, key, target[key]);
  }
  for (const key of Object.keys(patch)) {
    const value = patch[key];
    if (value === null) {
      delete result[key];
    } else {
      const current = Object.prototype.hasOwnProperty.call(result, key) ? result[key] : undefined;
      defineOwn(result, key, mergePatch(current, value));
    }
  }
  return result;
}

/**
 * What a `state` push means for a local copy `{value, version}`:
 * `{action: "ignore"}` (already there: version not newer),
 * `{action: "apply", value, version}` (the next version, or a full value),
 * `{action: "gap"}` (a patch for a version after a missing one: fetch the
 * value with `state.get`). A push carrying `value` (set, delete) is the whole
 * value at its version, so it applies even after a gap.
 */
export function applyStatePush(local, push) {
  const version = push && push.version;
  if (!Number.isInteger(version)) return { action: "ignore" };
  if (!local) return { action: "gap" };
  if (version <= local.version) return { action: "ignore" };
  if (Object.prototype.hasOwnProperty.call(push, "value")) {
    return { action: "apply", value: push.value, version };
  }
  if (Object.prototype.hasOwnProperty.call(push, "patch") && version === local.version + 1) {
    return { action: "apply", value: mergePatch(local.value ?? {}, push.patch), version };
  }
  return { action: "gap" };
}

/**
 * Apply a `presence` push to `members` (a Map from `conn` to member) in
 * place; returns `{type: "join" | "leave", member}` or null when the push is
 * neither.
 */
export function applyPresencePush(members, push) {
  if (push && isPlainObject(push.join) && typeof push.join.conn === "string") {
    members.set(push.join.conn, push.join);
    return { type: "join", member: push.join };
  }
  if (push && isPlainObject(push.leave) && typeof push.leave.conn === "string") {
    members.delete(push.leave.conn);
    return { type: "leave", member: push.leave };
  }
  return null;
}

/**
 * Whether to reconnect after close `code` (4001 and 4003 are decided by the
 * client: only with a token provider that yields a new token).
 */
export function shouldReconnect(code, { stopCodes = STOP_CODES, reconnectOnAdminDisconnect = false } = {}) {
  if (code === 4030) return reconnectOnAdminDisconnect;
  return !stopCodes.includes(code);
}

// ---------------------------------------------------------------- emitter ---

/** A small event emitter: on/off/once/emit. A throwing listener is reported
 * as an `error` event and does not stop the others. */
export class Emitter {
  constructor() {
    this._listeners = new Map();
  }

  /** Add `fn` for `name`; returns a function that removes it. */
  on(name, fn) {
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    let list = this._listeners.get(name);
    if (!list) this._listeners.set(name, (list = []));
    list.push(fn);
    return () => this.off(name, fn);
  }

  /** Remove `fn` for `name` (also a `once` listener by its original function). */
  off(name, fn) {
    const list = this._listeners.get(name);
    if (!list) return;
    const index = list.findIndex((f) => f === fn || f._original === fn);
    if (index >= 0) list.splice(index, 1);
    if (list.length === 0) this._listeners.delete(name);
  }

  /** Add `fn` for the next `name` only. */
  once(name, fn) {
    const wrapper = (...args) => {
      this.off(name, wrapper);
      return fn(...args);
    };
    wrapper._original = fn;
    return this.on(name, wrapper);
  }

  /** Call every listener of `name`; true if there was one. */
  emit(name, ...args) {
    const list = this._listeners.get(name);
    if (!list || list.length === 0) return false;
    for (const fn of [...list]) {
      try {
        fn(...args);
      } catch (err) {
        if (name === "error") {
          queueMicrotask(() => {
            throw err;
          });
        } else {
          this.emit("error", err);
        }
      }
    }
    return true;
  }

  listenerCount(name) {
    return (this._listeners.get(name) || []).length;
  }
}

// ----------------------------------------------------------------- client ---

function subKey(channel, group) {
  return group == null ? channel : `${channel}\u0000${group}`;
}

function given(fields) {
  const out = {};
  for (const [key, value] of Object.entries(fields)) {
    if (value !== undefined && value !== null) out[key] = value;
  }
  return out;
}

/** See the module comment. */
export class ApixClient extends Emitter {
  /**
   * @param url `ws://host:port/ws`, or a function returning the URL to use
   *   for each connection attempt.
   * @param options see apix.d.ts (`ApixClientOptions`).
   */
  constructor(url, options = {}) {
    super();
    if (typeof url !== "string" && typeof url !== "function") {
      throw new TypeError("url must be a string or a function returning one");
    }
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError("no WebSocket: pass options.WebSocket (e.g. the `ws` package in Node)");
    }
    if (typeof options.token !== "string" && typeof options.token !== "function") {
      throw new TypeError("options.token must be a token string or a function returning one");
    }
    this.url = url;
    this._WebSocket = WS;
    this._token = options.token;
    this._options = {
      backoffBase: options.backoffBase ?? DEFAULTS.backoffBase,
      backoffCap: options.backoffCap ?? DEFAULTS.backoffCap,
      connectTimeout: options.connectTimeout ?? DEFAULTS.connectTimeout,
      requestTimeout: options.requestTimeout ?? DEFAULTS.requestTimeout,
      reconnectOnAdminDisconnect: options.reconnectOnAdminDisconnect ?? DEFAULTS.reconnectOnAdminDisconnect,
      stopCodes: options.stopCodes ?? STOP_CODES,
      random: options.random ?? Math.random,
    };

    /** The session id (null before the first connection). */
    this.session = null;
    /** The last auth result. */
    this.authResult = null;
    /** Counters: connects, resumes, lostSessions, failures. */
    this.stats = { connects: 0, resumes: 0, lostSessions: 0, failures: 0 };

    this._nextId = 1;
    this._pending = new Map(); // id -> {conn, resolve, reject, onReply, timer}
    this._queue = []; // requests waiting for a live connection
    this._wanted = new Map(); // subKey -> {channel, group, presence, waiters, sentOn}
    this._positions = new Map(); // channel -> last event id handed over
    this._members = new Map(); // channel -> Map(conn -> member)
    this._stateWanted = new Map(); // key -> {waiters, sentOn}
    this._state = new Map(); // key -> {value, version, resyncing, buffer}
    this._current = null; // the connection being made or served
    this._live = null; // the authenticated connection
    this._closed = false;
    this._running = null;
    this._attempt = 0;
    this._refusedToken = undefined;
    this._sleep = null;
    this._readyWaiters = [];
  }

  // -- state ---------------------------------------------------------------------

  /** True while an authenticated connection is up. */
  get connected() {
    return this._live !== null;
  }

  /** True once `close()` was called or the client stopped for good. */
  get closed() {
    return this._closed;
  }

  /** The last event id handed to the application, per plain channel. */
  get positions() {
    return Object.fromEntries(this._positions);
  }

  /** The presence members of `channel` as last known (presence subscriptions only). */
  members(channel) {
    const members = this._members.get(channel);
    return members ? [...members.values()] : [];
  }

  /** The local copy `{value, version}` of a subscribed state key, or undefined. */
  stateValue(key) {
    const copy = this._state.get(key);
    return copy ? { value: copy.value, version: copy.version } : undefined;
  }

  // -- lifecycle -----------------------------------------------------------------

  /** Start connecting (idempotent); resolves with the auth result of the
   * first authenticated connection, rejects if the client stops first. */
  connect() {
    if (this._closed) return Promise.reject(new ApixClosedError(1000, "the client is closed"));
    const ready = this._whenLive();
    this._start();
    return ready;
  }

  /** Start the connect loop unless it runs (requests and subscriptions made
   * before `connect()` start it too). */
  _start() {
    if (!this._running && !this._closed) this._running = this._run();
  }

  /** Stop reconnecting, close the socket with 1000, reject waiting requests.
   * Resolves once the socket is closed. Idempotent. */
  close() {
    if (!this._closed) {
      this._closed = true;
      if (this._sleep) this._sleep.wake();
      const conn = this._current;
      if (conn) {
        try {
          conn.ws.close(1000, "client closed");
        } catch {
          // already closing
        }
      }
      const failure = new ApixClosedError(1000, "the client is closed");
      for (const item of this._queue.splice(0)) item.reject(failure);
      for (const entry of this._wanted.values()) this._rejectWaiters(entry, failure);
      for (const entry of this._stateWanted.values()) this._rejectWaiters(entry, failure);
      this._failReady(failure);
    }
    return this._running ? this._running.then(() => undefined) : Promise.resolve();
  }

  async _run() {
    let final = { code: 1000, reason: "client closed" };
    try {
      while (!this._closed) {
        const outcome = await this._connectOnce();
        if (outcome.authed) this._attempt = 0;
        if (this._closed) break;
        if (outcome.stop) {
          final = { code: outcome.code, reason: outcome.reason };
          break;
        }
        this._attempt += 1;
        const delay = backoffDelay(this._attempt, {
          base: this._options.backoffBase,
          cap: this._options.backoffCap,
          random: this._options.random,
        });
        this.emit("reconnecting", { attempt: this._attempt, delay, code: outcome.code });
        await this._sleepFor(delay);
      }
    } finally {
      this._closed = true;
      const failure = new ApixClosedError(final.code, final.reason);
      for (const item of this._queue.splice(0)) item.reject(failure);
      for (const entry of this._wanted.values()) this._rejectWaiters(entry, failure);
      for (const entry of this._stateWanted.values()) this._rejectWaiters(entry, failure);
      this._failReady(failure);
      this.emit("closed", final.code, final.reason);
    }
  }

  _sleepFor(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        if (self._sleep === sleep) self._sleep = null;
        resolve();
      }
      const sleep = { wake: done };
      this._sleep = sleep;
    });
  }

  async _tokenNow() {
    const provided = typeof this._token === "function" ? await this._token() : this._token;
    if (typeof provided !== "string" || provided === "") {
      throw new TypeError("the token provider gave no token");
    }
    return provided;
  }

  /** One connection, from token to close: {authed, stop, code, reason}. */
  async _connectOnce() {
    let token;
    try {
      token = await this._tokenNow();
    } catch (err) {
      this.stats.failures += 1;
      this.emit("error", err);
      return { authed: false, stop: false, code: 0, reason: "token provider failed" };
    }
    if (this._closed) return { authed: false, stop: true, code: 1000, reason: "client closed" };
    if (this._refusedToken !== undefined && token === this._refusedToken) {
      return { authed: false, stop: true, code: 4001, reason: "the token was refused and the provider gave no new one" };
    }
    let url;
    try {
      url = typeof this.url === "function" ? this.url() : this.url;
    } catch (err) {
      this.stats.failures += 1;
      this.emit("error", err);
      return { authed: false, stop: false, code: 0, reason: "url provider failed" };
    }
    return new Promise((resolve) => {
      let ws;
      try {
        ws = new this._WebSocket(url, [SUBPROTOCOL]);
      } catch (err) {
        this.stats.failures += 1;
        this.emit("error", err);
        resolve({ authed: false, stop: false, code: 0, reason: String(err) });
        return;
      }
      const conn = { ws, token, authed: false, timer: null };
      this._current = conn;
      const timer = conn.timer =
        this._options.connectTimeout > 0
          ? setTimeout(() => {
              if (!conn.authed) {
                conn.timedOut = true;
                try {
                  ws.close(4000, "connect timeout");
                } catch {
                  // not open yet in some implementations
                  try {
                    ws.close();
                  } catch {
                    /* nothing more to do */
                  }
                }
              }
            }, this._options.connectTimeout)
          : null;
      ws.onopen = () => {
        if (this._closed) {
          ws.close(1000, "client closed");
          return;
        }
        const fields = { token };
        if (this.session !== null) {
          const positions = {};
          for (const entry of this._wanted.values()) {
            const position = this._positions.get(entry.channel);
            if (entry.group === null && position !== undefined) positions[entry.channel] = position;
          }
          fields.resume = { session: this.session, positions };
        }
        this._sendFrame(conn, "auth", fields, (frame) => this._onAuthReply(conn, frame));
      };
      ws.onmessage = (event) => this._onMessage(conn, event.data);
      ws.onerror = () => {
        // a close event follows
      };
      ws.onclose = (event) => {
        if (timer) clearTimeout(timer);
        const code = conn.timedOut ? 1006 : event.code;
        const reason = conn.timedOut ? "connect timeout" : event.reason || "";
        resolve(this._onClose(conn, code, reason));
      };
    });
  }

  _onClose(conn, code, reason) {
    if (this._current === conn) this._current = null;
    const wasLive = this._live === conn;
    if (wasLive) this._live = null;
    const failure = new ApixClosedError(code, reason);
    for (const [id, pending] of this._pending) {
      if (pending.conn === conn) {
        this._pending.delete(id);
        if (pending.timer) clearTimeout(pending.timer);
        pending.reject(failure);
      }
    }
    for (const entry of this._wanted.values()) if (entry.sentOn === conn) entry.sentOn = null;
    for (const entry of this._stateWanted.values()) if (entry.sentOn === conn) entry.sentOn = null;
    for (const copy of this._state.values()) {
      copy.resyncing = false;
      copy.buffer = [];
    }
    if (!conn.authed) this.stats.failures += 1;
    if (conn.authed) this.emit("disconnected", code, reason);
    if (this._closed) return { authed: conn.authed, stop: true, code, reason };
    let stop = false;
    if (code === 4001 || code === 4003) {
      if (typeof this._token === "function") this._refusedToken = conn.token;
      else stop = true;
    } else if (conn.refusedAuth && typeof this._token !== "function") {
      stop = true;
    } else {
      stop = !shouldReconnect(code, this._options);
    }
    return { authed: conn.authed, stop, code, reason };
  }

  // -- frames ----------------------------------------------------------------------

  _sendFrame(conn, op, fields, onReply, resolve, reject) {
    const id = this._nextId++;
    const pending = {
      conn,
      onReply,
      resolve: resolve || (() => {}),
      reject: reject || (() => {}),
      timer: null,
    };
    this._pending.set(id, pending);
    if (this._options.requestTimeout > 0 && op !== "auth") {
      pending.timer = setTimeout(() => {
        if (this._pending.get(id) === pending) {
          this._pending.delete(id);
          pending.reject(new ApixError("timeout", `no reply to ${op} within ${this._options.requestTimeout} ms`));
        }
      }, this._options.requestTimeout);
    }
    try {
      conn.ws.send(JSON.stringify({ ...fields, op, id }));
    } catch (err) {
      this._pending.delete(id);
      if (pending.timer) clearTimeout(pending.timer);
      pending.reject(new ApixClosedError(1006, `send failed: ${err && err.message}`));
    }
  }

  /** Send `op` now if connected, else once connected; resolves with the result. */
  request(op, fields = {}) {
    return this._request(op, fields, null);
  }

  _request(op, fields, onReply) {
    if (this._closed) return Promise.reject(new ApixClosedError(1000, "the client is closed"));
    this._start();
    return new Promise((resolve, reject) => {
      const item = { op, fields, onReply, resolve, reject };
      if (this._live) this._sendItem(this._live, item);
      else this._queue.push(item);
    });
  }

  _sendItem(conn, item) {
    this._sendFrame(conn, item.op, item.fields, item.onReply, item.resolve, item.reject);
  }

  _onMessage(conn, data) {
    if (typeof data !== "string") return; // the server sends text frames only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (err) {
      this.emit("error", new ApixError("bad_frame", `unparsable frame from the server: ${err.message}`));
      return;
    }
    if (!isPlainObject(frame)) return;
    if (typeof frame.push === "string") {
      this._onPush(conn, frame);
      return;
    }
    const pending = Number.isInteger(frame.id) ? this._pending.get(frame.id) : undefined;
    if (!pending) {
      if (frame.ok === false) this.emit("error", ApixError.fromError(frame.error));
      return;
    }
    this._pending.delete(frame.id);
    if (pending.timer) clearTimeout(pending.timer);
    if (pending.onReply) {
      try {
        pending.onReply(frame);
      } catch (err) {
        this.emit("error", err);
      }
    }
    if (frame.ok === true) {
      pending.resolve(isPlainObject(frame.result) ? frame.result : {});
    } else {
      pending.reject(ApixError.fromError(frame.error));
    }
  }

  _onPush(conn, frame) {
    switch (frame.push) {
      case "event":
        this._onEvent(frame);
        break;
      case "presence":
        this._onPresence(frame);
        break;
      case "state":
        this._onStatePush(conn, frame);
        break;
      case "token_expiring":
        this.emit("tokenExpiring", frame.exp);
        this._refresh(conn);
        break;
      case "unsubscribed":
        this._onUnsubscribedPush(frame);
        break;
      case "connected":
        break; // header auth only; this client authenticates with the first frame
      default:
        this.emit("push", frame);
    }
  }

  // -- auth and reconnect ----------------------------------------------------------

  _onAuthReply(conn, frame) {
    if (frame.ok !== true) {
      const err = ApixError.fromError(frame.error);
      conn.refusedAuth = true;
      this.emit("error", err);
      if (err.code !== "unauthenticated") {
        // e.g. `unavailable`: retry after a backoff on a new connection
        try {
          conn.ws.close(1000, "auth failed");
        } catch {
          /* closing already */
        }
      }
      return;
    }
    const result = isPlainObject(frame.result) ? frame.result : {};
    const resumed = result.resumed === true;
    if (this.session !== null) {
      if (resumed) this.stats.resumes += 1;
      else this.stats.lostSessions += 1;
    }
    this.session = typeof result.session === "string" ? result.session : null;
    this.authResult = result;
    this._refusedToken = undefined;
    conn.authed = true;
    if (conn.timer) clearTimeout(conn.timer);
    this._live = conn;
    this.stats.connects += 1;

    const restored = new Map(); // subKey -> channels entry
    const extra = [];
    if (resumed && Array.isArray(result.channels)) {
      for (const entry of result.channels) {
        if (!isPlainObject(entry) || typeof entry.channel !== "string") continue;
        const group = typeof entry.group === "string" ? entry.group : null;
        const key = subKey(entry.channel, group);
        const wanted = this._wanted.get(key);
        if (entry.error !== undefined && entry.error !== null) {
          if (wanted) {
            const err = ApixError.fromError(entry.error, { channel: entry.channel, group: group ?? undefined });
            this._forget(key);
            this._rejectWaiters(wanted, err);
            this.emit("error", err);
          }
          continue;
        }
        if (!wanted) {
          extra.push({ channel: entry.channel, group });
          continue;
        }
        this._noteSubscribed(wanted, entry);
        restored.set(key, entry);
      }
    }
    const restoredState = new Set();
    if (resumed && Array.isArray(result.state)) {
      for (const entry of result.state) {
        if (!isPlainObject(entry) || typeof entry.key !== "string") continue;
        if (!this._stateWanted.has(entry.key)) {
          this._sendFrame(conn, "state.unsubscribe", { key: entry.key });
          continue;
        }
        this._setState(entry.key, entry.value ?? null, Number(entry.version) || 0, "resume");
        restoredState.add(entry.key);
        this._resolveWaiters(this._stateWanted.get(entry.key), { value: entry.value ?? null, version: entry.version });
      }
    }

    this.emit("connected", result);
    if (this._live !== conn) return; // a listener closed it

    for (const { channel, group } of extra) {
      this._sendFrame(conn, "unsubscribe", given({ channel, group }));
    }
    for (const [key, entry] of this._wanted) {
      if (!restored.has(key)) {
        this._sendSubscribe(conn, entry);
      } else if (entry.presence) {
        // The member list missed the joins and leaves while we were away:
        // subscribing again (a no-op for the subscription) returns it afresh.
        this._sendSubscribe(conn, entry);
      } else {
        this._resolveWaiters(entry, restored.get(key));
      }
    }
    for (const [key, entry] of this._stateWanted) {
      if (!restoredState.has(key)) this._sendStateSubscribe(conn, key, entry);
    }
    for (const item of this._queue.splice(0)) this._sendItem(conn, item);
    const waiters = this._readyWaiters.splice(0);
    for (const waiter of waiters) waiter.resolve(result);
  }

  _whenLive() {
    if (this._live) return Promise.resolve(this.authResult);
    return new Promise((resolve, reject) => this._readyWaiters.push({ resolve, reject }));
  }

  _failReady(err) {
    for (const waiter of this._readyWaiters.splice(0)) waiter.reject(err);
  }

  async _refresh(conn) {
    if (typeof this._token !== "function") return; // a fixed token cannot be refreshed
    let token;
    try {
      token = await this._tokenNow();
    } catch (err) {
      this.emit("error", err);
      return;
    }
    if (this._live !== conn) return; // the next connection authenticates with a fresh token anyway
    this._sendFrame(
      conn,
      "refresh",
      { token },
      null,
      (result) => {
        conn.token = token;
        this.emit("tokenRefreshed", result.exp);
      },
      (err) => {
        if (!(err instanceof ApixClosedError)) this.emit("error", err);
      },
    );
  }

  // -- events and subscriptions ----------------------------------------------------

  _onEvent(frame) {
    const channel = frame.channel;
    const event = frame.event;
    if (typeof channel !== "string" || !isPlainObject(event)) return;
    if (typeof frame.group === "string") {
      this._deliver(channel, event, frame); // at least once: never deduplicated
      return;
    }
    if (!this._wanted.has(channel)) return; // unsubscribed meanwhile
    if (parseEventId(event.id) !== null) {
      const last = this._positions.get(channel);
      if (last !== undefined && compareEventIds(event.id, last) <= 0) return; // the app has it
      this._positions.set(channel, event.id);
    }
    this._deliver(channel, event, frame);
  }

  _deliver(channel, event, frame) {
    this.emit("event", channel, event, frame);
    this.emit(`event:${channel}`, event, frame);
  }

  _noteSubscribed(entry, result) {
    if (isPlainObject(result.presence) && Array.isArray(result.presence.members)) {
      const members = new Map();
      for (const member of result.presence.members) {
        if (isPlainObject(member) && typeof member.conn === "string") members.set(member.conn, member);
      }
      this._members.set(entry.channel, members);
      this.emit("presence", entry.channel, { type: "sync", members: [...members.values()] }, [...members.values()]);
    }
    if (entry.group !== null) return;
    const position = result.position;
    if (parseEventId(position) !== null) {
      const known = this._positions.get(entry.channel);
      if (known === undefined || compareEventIds(position, known) > 0) {
        this._positions.set(entry.channel, position); // "0-0" too: where we start
      }
    }
    if (result.recovered === false) this.emit("resync", entry.channel, result);
  }

  _sendSubscribe(conn, entry) {
    entry.sentOn = conn;
    const fields = given({
      channel: entry.channel,
      group: entry.group,
      presence: entry.presence ? true : undefined,
    });
    const position = this._positions.get(entry.channel);
    if (entry.group === null && position !== undefined) fields.since = position;
    const key = subKey(entry.channel, entry.group);
    this._sendFrame(conn, "subscribe", fields, (frame) => {
      if (this._wanted.get(key) !== entry) return;
      entry.sentOn = null;
      if (frame.ok === true) {
        const result = isPlainObject(frame.result) ? frame.result : {};
        this._noteSubscribed(entry, result);
        this._resolveWaiters(entry, result);
      } else {
        const err = ApixError.fromError(frame.error, { channel: entry.channel, group: entry.group ?? undefined });
        this._forget(key);
        if (entry.waiters.length) this._rejectWaiters(entry, err);
        else this.emit("error", err);
      }
    });
  }

  _resolveWaiters(entry, value) {
    if (!entry) return;
    for (const waiter of entry.waiters.splice(0)) waiter.resolve(value);
  }

  _rejectWaiters(entry, err) {
    if (!entry) return;
    for (const waiter of entry.waiters.splice(0)) waiter.reject(err);
  }

  _forget(key) {
    const entry = this._wanted.get(key);
    if (!entry) return;
    this._wanted.delete(key);
    if (entry.group === null) this._positions.delete(entry.channel);
    if (entry.presence) this._members.delete(entry.channel);
  }

  _onUnsubscribedPush(frame) {
    if (typeof frame.channel !== "string") return;
    const group = typeof frame.group === "string" ? frame.group : null;
    const key = subKey(frame.channel, group);
    this._forget(key);
    this.emit("unsubscribed", frame.channel, frame);
  }

  /**
   * Keep `channel` subscribed on every connection from now on; resolves with
   * the subscribe result once the server made it (on the next connection
   * when disconnected). `since` replays from that id; `group` joins a
   * consumer group; `presence` joins the channel's presence set.
   */
  subscribe(channel, { since, group, presence } = {}) {
    if (this._closed) return Promise.reject(new ApixClosedError(1000, "the client is closed"));
    const groupName = group ?? null;
    const key = subKey(channel, groupName);
    let entry = this._wanted.get(key);
    if (!entry) {
      entry = { channel, group: groupName, presence: Boolean(presence), waiters: [], sentOn: null };
      this._wanted.set(key, entry);
    } else if (presence) {
      entry.presence = true;
    }
    if (since !== undefined && since !== null && groupName === null) {
      if (parseEventId(since) === null) return Promise.reject(new TypeError(`since: not an event id: ${since}`));
      this._positions.set(channel, since);
    }
    const done = new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
    if (this._live && entry.sentOn !== this._live) this._sendSubscribe(this._live, entry);
    this._start();
    return done;
  }

  /** Stop a subscription (now if connected, else on the next connection). */
  unsubscribe(channel, { group } = {}) {
    const groupName = group ?? null;
    const key = subKey(channel, groupName);
    const entry = this._wanted.get(key);
    this._forget(key);
    if (entry) this._rejectWaiters(entry, new ApixError("cancelled", `unsubscribed from ${channel} before the subscription was made`));
    const conn = this._live;
    if (!conn) return Promise.resolve({});
    return new Promise((resolve, reject) => {
      this._sendFrame(conn, "unsubscribe", given({ channel, group: groupName }), null, resolve, (err) => {
        if (err instanceof ApixClosedError) resolve({}); // the next connection drops it
        else reject(err);
      });
    });
  }

  publish(channel, data, { key } = {}) {
    return this._request("publish", given({ channel, data, key }));
  }

  history(channel, { since, limit } = {}) {
    return this._request("history", given({ channel, since, limit }));
  }

  ack(channel, group, ids) {
    return this._request("ack", { channel, group, ids: [...ids] });
  }

  ping() {
    return this._request("ping", {});
  }

  // -- presence --------------------------------------------------------------------

  presence(channel, { limit } = {}) {
    return this._request("presence", given({ channel, limit }));
  }

  _onPresence(frame) {
    const channel = frame.channel;
    if (typeof channel !== "string") return;
    let members = this._members.get(channel);
    if (!members) {
      if (!this._wanted.has(channel)) return;
      members = new Map();
      this._members.set(channel, members);
    }
    const change = applyPresencePush(members, frame);
    if (change) this.emit("presence", channel, change, [...members.values()]);
  }

  // -- state -------------------------------------------------------------------------

  stateGet(key) {
    return this._request("state.get", { key });
  }

  stateSet(key, value, { version } = {}) {
    return this._request("state.set", given({ key, value: value === undefined ? null : value, version }));
  }

  statePatch(key, patch, { version } = {}) {
    return this._request("state.patch", given({ key, patch, version }));
  }

  stateDelete(key, { version } = {}) {
    return this._request("state.delete", given({ key, version }));
  }

  /** Keep `key` subscribed on every connection; resolves with `{value, version}`. */
  stateSubscribe(key) {
    if (this._closed) return Promise.reject(new ApixClosedError(1000, "the client is closed"));
    let entry = this._stateWanted.get(key);
    if (!entry) {
      entry = { waiters: [], sentOn: null };
      this._stateWanted.set(key, entry);
    }
    const done = new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }));
    if (this._live && entry.sentOn !== this._live) this._sendStateSubscribe(this._live, key, entry);
    this._start();
    return done;
  }

  stateUnsubscribe(key) {
    const entry = this._stateWanted.get(key);
    this._stateWanted.delete(key);
    this._state.delete(key);
    if (entry) this._rejectWaiters(entry, new ApixError("cancelled", `unsubscribed from ${key} before the subscription was made`));
    const conn = this._live;
    if (!conn) return Promise.resolve({});
    return new Promise((resolve, reject) => {
      this._sendFrame(conn, "state.unsubscribe", { key }, null, resolve, (err) => {
        if (err instanceof ApixClosedError) resolve({});
        else reject(err);
      });
    });
  }

  _sendStateSubscribe(conn, key, entry) {
    entry.sentOn = conn;
    this._sendFrame(conn, "state.subscribe", { key }, (frame) => {
      if (this._stateWanted.get(key) !== entry) return;
      entry.sentOn = null;
      if (frame.ok === true) {
        const result = isPlainObject(frame.result) ? frame.result : {};
        this._setState(key, result.value ?? null, Number(result.version) || 0, "subscribe");
        this._resolveWaiters(entry, { value: result.value ?? null, version: Number(result.version) || 0 });
      } else {
        const err = ApixError.fromError(frame.error, { key });
        this._stateWanted.delete(key);
        this._state.delete(key);
        if (entry.waiters.length) this._rejectWaiters(entry, err);
        else this.emit("error", err);
      }
    });
  }

  _setState(key, value, version, cause) {
    const copy = this._state.get(key);
    if (copy) {
      copy.value = value;
      copy.version = version;
    } else {
      this._state.set(key, { value, version, resyncing: false, buffer: [] });
    }
    this.emit("state", key, value, version, cause);
  }

  _onStatePush(conn, frame) {
    const key = frame.key;
    if (typeof key !== "string") return;
    const copy = this._state.get(key);
    if (!copy) return; // not subscribed (or its subscribe reply is still to come)
    if (copy.resyncing) {
      copy.buffer.push(frame);
      return;
    }
    const outcome = applyStatePush(copy, frame);
    if (outcome.action === "apply") {
      this._setState(key, outcome.value, outcome.version, Object.prototype.hasOwnProperty.call(frame, "value") ? "value" : "patch");
    } else if (outcome.action === "gap") {
      copy.resyncing = true;
      copy.buffer = [frame];
      this._sendFrame(conn, "state.get", { key }, (reply) => {
        const current = this._state.get(key);
        if (current !== copy) return;
        copy.resyncing = false;
        const buffered = copy.buffer.splice(0);
        if (reply.ok === true) {
          const result = isPlainObject(reply.result) ? reply.result : {};
          const version = Number(result.version) || 0;
          if (version > copy.version) this._setState(key, result.value ?? null, version, "get");
          for (const push of buffered) this._onStatePush(conn, push);
        } else {
          this.emit("error", ApixError.fromError(reply.error, { key }));
        }
      });
    }
  }
}

export default ApixClient;
