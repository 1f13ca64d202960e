// Peer 2 for scripts/bench_gateway.py: a broadcast server on Node's `ws`.
//
// Same minimal protocol as scripts/bench/websockets_server.py:
//   {"op":"subscribe","id":N}          -> join the subscriber set; {"id":N,"ok":true}
//   {"op":"publish","id":N,"data":...} -> encode the push once (one Buffer) and
//        send it to every open subscriber (the ws README broadcast loop), then
//        {"id":N,"ok":true}.
// Heartbeat: the ws README pattern (ping every BENCH_HEARTBEAT_INTERVAL s,
// terminate a client that did not pong since the previous ping).
// No permessage-deflate (as apix v1). `ws` is resolved through NODE_PATH
// (installed at run time by the benchmark into scripts/bench-out/node).
//
//   node scripts/bench/ws_server.js PORT
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2]);
const interval = Number(process.env.BENCH_HEARTBEAT_INTERVAL || '25') * 1000;
const subscribers = new Set();

const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096, perMessageDeflate: false });

wss.on('connection', (ws) => {
  ws.isAlive = true;
  ws.on('pong', () => { ws.isAlive = true; });
  ws.on('error', () => {});
  ws.on('close', () => { subscribers.delete(ws); });
  ws.on('message', (data) => {
    let frame;
    try { frame = JSON.parse(data); } catch { return; }
    if (frame === null || typeof frame !== 'object') return;
    if (frame.op === 'publish') {
      const push = Buffer.from(JSON.stringify({
        push: 'event', channel: 'bench.x', event: { ts: Date.now(), data: frame.data },
      }));
      for (const client of subscribers) {
        if (client.readyState === WebSocket.OPEN) client.send(push, { binary: false });
      }
      ws.send(JSON.stringify({ id: frame.id, ok: true }));
    } else if (frame.op === 'subscribe') {
      subscribers.add(ws);
      ws.send(JSON.stringify({ id: frame.id, ok: true }));
    } else {
      ws.send(JSON.stringify({ id: frame.id, ok: false, error: 'unknown op' }));
    }
  });
});

const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (!ws.isAlive) { ws.terminate(); continue; }
    ws.isAlive = false;
    ws.ping();
  }
}, interval);

wss.on('listening', () => { console.log('listening'); });

process.on('SIGTERM', () => {
  clearInterval(heartbeat);
  for (const ws of wss.clients) ws.terminate();
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref();
});
