// A scripted in-process stand-in for a WebSocket, for unit tests of the
// client's own logic (dedupe, backoff, state gaps, presence lists, resume
// frames). The end-to-end tests use a real server; this only lets a test
// play the server's frames exactly, including ones a real server should
// never send (duplicates, version gaps).

export function fakeSocketClass() {
  const sockets = [];
  const waiters = [];

  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.closed = null;
      this.onopen = null;
      this.onmessage = null;
      this.onclose = null;
      this.onerror = null;
      this._frameWaiters = [];
      sockets.push(this);
      for (const waiter of waiters.splice(0)) waiter(this);
      if (FakeSocket.refuse) {
        setImmediate(() => this._closed(1006, ""));
      } else {
        setImmediate(() => {
          if (this.readyState !== 0) return;
          this.readyState = 1;
          this.onopen?.({});
        });
      }
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("not open");
      const frame = JSON.parse(text);
      this.sent.push(frame);
      for (const waiter of this._frameWaiters.splice(0)) waiter();
    }

    close(code = 1000, reason = "") {
      if (this.readyState >= 2) return;
      this.readyState = 2;
      setImmediate(() => this._closed(code, reason));
    }

    _closed(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.closed = { code, reason };
      this.onclose?.({ code, reason });
    }

    // -- the test's side (the "server") --

    /** Deliver one frame to the client. */
    receive(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }

    /** The server closes the connection with `code`. */
    serverClose(code, reason = "") {
      this._closed(code, reason);
    }

    /** The next frame the client sends with `op` (waits for it). */
    async nextOp(op, from = 0) {
      for (;;) {
        const found = this.sent.slice(from).find((frame) => frame.op === op && !frame._taken);
        if (found) {
          found._taken = true;
          return found;
        }
        await new Promise((resolve) => this._frameWaiters.push(resolve));
      }
    }

    /** Answer `frame` (a request) with `result`. */
    reply(frame, result) {
      this.receive({ id: frame.id, ok: true, result });
    }

    fail(frame, code, message = code, extra = {}) {
      this.receive({ id: frame.id, ok: false, error: { code, message, ...extra } });
    }
  }

  FakeSocket.refuse = false;
  FakeSocket.sockets = sockets;
  /** The next socket the client creates (or the newest not yet returned). */
  FakeSocket.next = function next() {
    const index = FakeSocket._handed ?? 0;
    if (sockets.length > index) {
      FakeSocket._handed = index + 1;
      return Promise.resolve(sockets[index]);
    }
    return new Promise((resolve) =>
      waiters.push((socket) => {
        FakeSocket._handed = sockets.indexOf(socket) + 1;
        resolve(socket);
      }),
    );
  };
  return FakeSocket;
}

export const AUTH_RESULT = Object.freeze({
  conn: "c1",
  org: "acme",
  sub: "alice",
  exp: 4102444800,
  session: "S1",
  heartbeat: 25,
  resumed: false,
});

/** Answer the auth frame of `socket` (which it waits for) with `result`. */
export async function acceptAuth(socket, result = {}) {
  const auth = await socket.nextOp("auth");
  socket.reply(auth, { ...AUTH_RESULT, ...result });
  return auth;
}
