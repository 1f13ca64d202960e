// Type-checked with `npx tsc --noEmit --strict -p tests/js/tsconfig.json`
// (never run): the public API of apix.js as an application uses it.
import ApixClientDefault, {
  ApixClient,
  ApixClosedError,
  ApixError,
  backoffDelay,
  mergePatch,
  type ApixEvent,
  type AuthResult,
  type Json,
  type PresenceMember,
} from "../../apix_trio/web/static/apix.js";

declare const NodeWebSocket: new (url: string, protocols?: string | string[]) => any;

export async function example(): Promise<void> {
  const client = new ApixClient(() => "ws://127.0.0.1:8080/ws", {
    token: async () => "jwt",
    WebSocket: NodeWebSocket,
    backoffBase: 100,
    backoffCap: 5000,
    reconnectOnAdminDisconnect: true,
  });
  const same: typeof ApixClient = ApixClientDefault;
  void same;
  const off = client.on("connected", (result: AuthResult) => console.log(result.session, result.resumed));
  off();
  client.on("disconnected", (code: number, reason: string) => console.log(code, reason));
  client.on("event", (channel: string, event: ApixEvent, frame) => console.log(channel, event.id, frame.attempt));
  client.on("event:chat.room42", (event) => console.log(event.data));
  client.once("resync", (channel) => console.log("reload", channel));
  client.on("presence", (channel, change, members: PresenceMember[]) => {
    if (change.type === "sync") console.log(channel, change.members.length, members.length);
    else console.log(change.type, change.member.sub);
  });
  client.on("state", (key, value: Json, version: number, cause) => console.log(key, value, version, cause));
  client.on("error", (err: Error) => console.error(err));

  const auth = await client.connect();
  console.log(auth.conn);
  const sub = await client.subscribe("chat.room42", { since: "0", presence: false });
  console.log(sub.recovered, sub.replayed);
  await client.subscribe("jobs.resize", { group: "workers" });
  const published = await client.publish("chat.room42", { text: "hi" }, { key: "k-1" });
  const id: string = published.id;
  const history = await client.history("chat.room42", { since: id, limit: 10 });
  console.log(history.events.map((event) => event.ts), history.position);
  const acked: number = (await client.ack("jobs.resize", "workers", [id])).acked;
  console.log(acked);
  const presence = await client.presence("room.1", { limit: 5 });
  console.log(presence.total, presence.users, client.members("room.1"));
  const value = await client.stateSubscribe("doc.1");
  console.log(value.version, client.stateValue("doc.1")?.value);
  try {
    await client.stateSet("doc.1", { a: 1 }, { version: value.version });
    await client.statePatch("doc.1", { a: null });
    await client.stateDelete("doc.1");
  } catch (err) {
    if (err instanceof ApixClosedError) console.log(err.closeCode);
    else if (err instanceof ApixError && err.code === "conflict") console.log(err.version, err.retryAfter);
  }
  await client.stateGet("doc.1");
  await client.stateUnsubscribe("doc.1");
  await client.unsubscribe("chat.room42");
  await client.ping();
  console.log(client.positions["chat.room42"], client.session, client.stats.resumes);
  console.log(backoffDelay(3, { base: 100, cap: 1000, random: () => 0.5 }), mergePatch({ a: 1 }, { b: 2 }));
  await client.close();
}
