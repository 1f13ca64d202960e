// Real processes for the JS client tests: `python3 -m apix_trio serve`,
// `python3 -m apix_trio token`, and a throwaway `redis-server`.
//
// startServer() spawns a server on free ports (APIX_SERVER_WS_PORT=0,
// APIX_SERVER_HTTP_PORT=0), reads its JSON log from stderr and resolves once
// the `listening` line came (ports taken from that line). Every process
// started here is registered and killed (SIGKILL) by killAll(), which each
// test file calls in its `after` hook; an exit hook kills stragglers too.
//
// Waiting helpers (waitFor, waitUntil) always take a timeout: tests wait for
// specific events or log lines, never for a fixed time.

import { spawn, execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import WebSocket from "ws";

export { WebSocket };

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const CLIENT_URL = new URL("../../apix_trio/web/static/apix.js", import.meta.url).href;
const PYTHON = process.env.PYTHON || "python3";
const START_TIMEOUT = 20000;
const run = promisify(execFile);

const children = new Set();
const tempDirs = new Set();

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.once(signal, () => process.exit(128 + (signal === "SIGINT" ? 2 : 15)));
}

process.on("exit", () => {
  for (const child of children) {
    try {
      child.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
});

/** A fresh temporary directory, removed at exit. */
export function tempDir(prefix = "apix-js-") {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

/** The environment for a python child: ours without APIX_* variables. */
function childEnv(extra) {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith("APIX_")) env[key] = value;
  }
  env.PYTHONPATH = REPO + (process.env.PYTHONPATH ? `:${process.env.PYTHONPATH}` : "");
  return { ...env, ...extra };
}

/** Reject after `ms` with a message naming what was awaited. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * The arguments of the next `name` event of `emitter` for which
 * `predicate(...args)` is true, as an array.
 */
export function waitFor(emitter, name, predicate = () => true, ms = 10000) {
  let off;
  const found = new Promise((resolve) => {
    off = emitter.on(name, (...args) => {
      if (predicate(...args)) {
        off();
        resolve(args);
      }
    });
  });
  return withTimeout(found, ms, `event ${name}`).finally(() => off());
}

/** Resolves once `check()` is true, re-checking on every `name` event of `emitter`. */
export function waitUntil(emitter, name, check, ms = 10000, what = "a condition") {
  if (check()) return Promise.resolve();
  let off;
  const done = new Promise((resolve) => {
    off = emitter.on(name, () => {
      if (check()) resolve();
    });
  });
  return withTimeout(done, ms, what).finally(() => off());
}

/** A free TCP port on 127.0.0.1 (bound and released). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/**
 * Mint a development token with `python3 -m apix_trio token`, signed by the
 * key pair in `keyDir` (created when missing).
 */
export async function mintToken(keyDir, { org = "acme", sub = "alice", ttl = 3600, pub = [">"], subs = [">"], state = [">"], roles = [] } = {}) {
  const args = ["-m", "apix_trio", "token", "--org", org, "--sub", sub, "--ttl", String(ttl)];
  for (const pattern of pub) args.push("--pub", pattern);
  for (const pattern of subs) args.push("--sub-pattern", pattern);
  for (const pattern of state) args.push("--state", pattern);
  for (const role of roles) args.push("--role", role);
  const { stdout } = await run(PYTHON, args, {
    cwd: REPO,
    env: childEnv({ APIX_AUTH_DEV_KEY_DIR: keyDir }),
    timeout: 20000,
  });
  return stdout.trim();
}

/**
 * A running `apix-trio serve`: {wsPort, httpPort, url, httpUrl, lines,
 * waitLog(event, predicate, ms), stop(signal, ms) -> exit code, kill()}.
 * `env` adds APIX_* settings.
 */
export async function startServer({ keyDir, env = {}, name = "node" } = {}) {
  if (!keyDir) throw new Error("startServer needs a keyDir");
  const child = spawn(PYTHON, ["-m", "apix_trio", "serve"], {
    cwd: REPO,
    env: childEnv({
      APIX_SERVER_WS_PORT: "0",
      APIX_SERVER_HTTP_PORT: "0",
      APIX_SERVER_NODE_ID: name,
      APIX_AUTH_DEV_KEY_DIR: keyDir,
      APIX_LOG_LEVEL: "info",
      APIX_LOG_FORMAT: "json",
      ...env,
    }),
    stdio: ["ignore", "ignore", "pipe"],
  });
  children.add(child);
  const lines = [];
  const raw = [];
  const waiters = new Set();
  let buffer = "";
  const exited = new Promise((resolve) => {
    child.on("exit", (code, signal) => {
      children.delete(child);
      resolve(code ?? signal);
      for (const waiter of waiters) waiter();
    });
  });
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (chunk) => {
    buffer += chunk;
    const parts = buffer.split("\n");
    buffer = parts.pop();
    for (const text of parts) {
      raw.push(text);
      let line;
      try {
        line = JSON.parse(text);
      } catch {
        continue; // a traceback, say: kept in raw
      }
      if (line && typeof line === "object") lines.push(line);
    }
    for (const waiter of waiters) waiter();
  });

  function waitLog(event, predicate = () => true, ms = START_TIMEOUT) {
    const find = () => lines.find((line) => line.event === event && predicate(line));
    const found = find();
    if (found) return Promise.resolve(found);
    let waiter;
    const promise = new Promise((resolve, reject) => {
      waiter = () => {
        const line = find();
        if (line) resolve(line);
        else if (child.exitCode !== null || child.signalCode !== null) {
          reject(new Error(`${name} exited before logging ${event}:\n${raw.join("\n")}`));
        }
      };
      waiters.add(waiter);
    });
    return withTimeout(promise, ms, `log line ${event} of ${name}`).finally(() => waiters.delete(waiter));
  }

  const listening = await waitLog("listening");
  const server = {
    name,
    child,
    lines,
    raw,
    wsPort: Number(listening.ws_port),
    httpPort: Number(listening.http_port),
    waitLog,
    exited,
    get url() {
      return `ws://127.0.0.1:${this.wsPort}/ws`;
    },
    get httpUrl() {
      return `http://127.0.0.1:${this.httpPort}`;
    },
    /** Send `signal` and resolve with the exit status (SIGKILL after `ms`). */
    async stop(signal = "SIGTERM", ms = 15000) {
      if (child.exitCode !== null || child.signalCode !== null) return exited;
      child.kill(signal);
      try {
        return await withTimeout(exited, ms, `${name} to exit`);
      } catch (err) {
        child.kill("SIGKILL");
        throw err;
      }
    },
    kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      return exited;
    },
    problems() {
      return lines.filter((line) => line.level === "error" || line.level === "critical");
    },
  };
  return server;
}

/** `POST path` on the server's internal HTTP API with an admin token. */
export async function adminPost(server, token, path, body) {
  const response = await fetch(server.httpUrl + path, {
    method: "POST",
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** A throwaway redis-server on a free port (no persistence): {url, port, stop()}. */
export async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  children.add(child);
  const exited = new Promise((resolve) => {
    child.on("exit", (code, signal) => {
      children.delete(child);
      resolve(code ?? signal);
    });
  });
  let output = "";
  const ready = new Promise((resolve, reject) => {
    child.stdout.setEncoding("utf8");
    child.stdout.on("data", (chunk) => {
      output += chunk;
      if (output.includes("Ready to accept connections")) resolve();
    });
    child.on("error", reject);
    exited.then(() => reject(new Error(`redis-server exited before it was ready:\n${output}`)));
  });
  await withTimeout(ready, 10000, "redis-server to be ready");
  return {
    port,
    url: `redis://127.0.0.1:${port}/0`,
    stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      return exited;
    },
  };
}

/** Write a TOML config file into `dir`; returns its path (for APIX_CONFIG). */
export function writeConfig(dir, text) {
  const path = join(dir, "apix.toml");
  writeFileSync(path, text);
  return path;
}

/** Kill every process started by this module and wait for them to exit. */
export async function killAll() {
  const waits = [];
  for (const child of children) {
    waits.push(new Promise((resolve) => child.once("exit", resolve)));
    try {
      child.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
  await Promise.all(waits);
}

/** A promise with its resolve function exposed (a gate a test opens). */
export function gate() {
  let open;
  const promise = new Promise((resolve) => {
    open = resolve;
  });
  return { promise, open };
}

/**
 * Collect the events of `client` on `channel` into an array, as
 * {id, data, frame}; returns the array.
 */
export function collect(client, channel) {
  const seen = [];
  client.on(`event:${channel}`, (event, frame) => seen.push({ id: event.id, data: event.data, frame }));
  return seen;
}
