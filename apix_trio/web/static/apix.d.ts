// Type declarations for apix.js, the APIX wire protocol v1 JavaScript client.

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A token string, or a function (sync or async) returning one: called before
 * every connection and on `token_expiring`. */
export type TokenProvider = string | (() => string | Promise<string>);

/** The constructor shape the client needs (the browser's WebSocket, or the `ws` package's). */
export interface WebSocketLike {
  readonly readyState: number;
  readonly protocol?: string;
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ApixClientOptions {
  /** A token or a token provider (required). */
  token: TokenProvider;
  /** WebSocket constructor; default `globalThis.WebSocket` (pass `ws`'s in Node 20). */
  WebSocket?: WebSocketConstructor | (new (url: string, protocols?: string | string[]) => any);
  /** Backoff base in ms (default 500): attempt n waits uniform [0, min(cap, base * 2^(n-1))). */
  backoffBase?: number;
  /** Backoff cap in ms (default 30000). */
  backoffCap?: number;
  /** Random source in [0, 1) for the backoff jitter (default Math.random). */
  random?: () => number;
  /** ms from opening the socket to a successful auth before giving up on that attempt (default 10000; 0 = none). */
  connectTimeout?: number;
  /** ms before a request rejects with code `timeout` (default 0 = never). */
  requestTimeout?: number;
  /** Reconnect after close 4030 (disconnected by an administrator); default false. */
  reconnectOnAdminDisconnect?: boolean;
  /** Close codes that stop the client (default STOP_CODES). */
  stopCodes?: readonly number[];
}

export interface ApixErrorExtra {
  retryAfter?: number;
  version?: number;
  channel?: string;
  group?: string;
  key?: string;
}

/** An error reply (`code` is a protocol error code) or a client-side failure
 * (`closed`, `timeout`, `cancelled`). */
export class ApixError extends Error {
  constructor(code: string, message?: string, extra?: ApixErrorExtra);
  readonly code: string;
  /** `rate_limited`: seconds to wait. */
  readonly retryAfter: number | undefined;
  /** `conflict`: the current version. */
  readonly version: number | undefined;
  /** The subscription it concerns, when it concerns one. */
  readonly channel: string | undefined;
  readonly group: string | undefined;
  /** The state key it concerns, when it concerns one. */
  readonly key: string | undefined;
  static fromError(error: unknown, extra?: ApixErrorExtra): ApixError;
}

/** The connection ended before the reply (or the client is closed). */
export class ApixClosedError extends ApixError {
  constructor(closeCode: number, reason?: string);
  readonly code: "closed";
  readonly closeCode: number;
  readonly reason: string;
}

export interface AuthResult {
  conn: string;
  org: string;
  sub: string;
  exp: number;
  session: string;
  heartbeat: number;
  resumed: boolean;
  /** Resumed sessions: one entry per restored subscription. */
  channels?: RestoredChannel[];
  /** Resumed sessions: the current value of each state subscription. */
  state?: StateEntry[];
  [field: string]: unknown;
}

export interface RestoredChannel {
  channel: string;
  group?: string;
  position?: string;
  recovered: boolean;
  replayed: number;
  error?: { code: string; message: string };
}

export interface ApixEvent<T = Json> {
  id: string;
  ts: number;
  data: T;
  from: string;
  key?: string;
}

export interface EventPush<T = Json> {
  push: "event";
  channel: string;
  event: ApixEvent<T>;
  /** Group deliveries only. */
  group?: string;
  attempt?: number;
}

export interface PresenceMember {
  sub: string;
  conn: string;
  since: number;
  info?: { [key: string]: Json };
}

export type PresenceChange =
  | { type: "join"; member: PresenceMember }
  | { type: "leave"; member: PresenceMember }
  | { type: "sync"; members: PresenceMember[] };

export interface SubscribeOptions {
  /** Replay every retained event after this id first ("0": all retained). */
  since?: string;
  /** Join this consumer group (at-least-once, needs `ack`). */
  group?: string;
  /** Join the channel's presence set. */
  presence?: boolean;
}

export interface SubscribeResult {
  channel: string;
  position: string;
  recovered: boolean;
  replayed: number;
  presence?: { members: PresenceMember[]; total: number };
}

export interface PublishResult {
  id: string;
  ts: number;
  duplicate: boolean;
}

export interface HistoryResult<T = Json> {
  events: ApixEvent<T>[];
  position: string;
}

export interface PresenceResult {
  members: PresenceMember[];
  total: number;
  users: number;
}

export interface StateValue<T = Json> {
  value: T | null;
  version: number;
}

export interface StateEntry extends StateValue {
  key: string;
}

export type StateCause = "subscribe" | "value" | "patch" | "get" | "resume";

export interface ReconnectInfo {
  attempt: number;
  /** ms until the attempt. */
  delay: number;
  /** The close code that ended the previous connection (0: no socket was made). */
  code: number;
}

/** The client's events and their listener arguments. */
export interface ApixEvents {
  connected: [result: AuthResult];
  disconnected: [code: number, reason: string];
  reconnecting: [info: ReconnectInfo];
  /** The client stopped for good (close() or a stop code). */
  closed: [code: number, reason: string];
  event: [channel: string, event: ApixEvent, frame: EventPush];
  presence: [channel: string, change: PresenceChange, members: PresenceMember[]];
  state: [key: string, value: Json, version: number, cause: StateCause];
  /** History no longer held everything missed on `channel`: reload it from your source of truth. */
  resync: [channel: string, result: SubscribeResult | RestoredChannel];
  tokenExpiring: [exp: number];
  tokenRefreshed: [exp: number];
  unsubscribed: [channel: string, frame: Record<string, unknown>];
  /** Any other push. */
  push: [frame: Record<string, unknown>];
  error: [error: Error];
}

type Listener<A extends unknown[]> = (...args: A) => void;

export class Emitter<Events extends { [K in keyof Events]: unknown[] } = { [name: string]: unknown[] }> {
  /** Returns a function that removes the listener. */
  on<K extends keyof Events & string>(name: K, fn: Listener<Events[K]>): () => void;
  off<K extends keyof Events & string>(name: K, fn: Listener<Events[K]>): void;
  once<K extends keyof Events & string>(name: K, fn: Listener<Events[K]>): () => void;
  emit<K extends keyof Events & string>(name: K, ...args: Events[K]): boolean;
  listenerCount(name: keyof Events & string): number;
}

/** Events of one channel: `client.on("event:chat.room42", (event, frame) => ...)`. */
export type ChannelEvents = { [name: `event:${string}`]: [event: ApixEvent, frame: EventPush] };

export class ApixClient extends Emitter<ApixEvents & ChannelEvents> {
  constructor(url: string | (() => string), options: ApixClientOptions);
  readonly url: string | (() => string);
  /** The session id (null before the first connection). */
  readonly session: string | null;
  readonly authResult: AuthResult | null;
  readonly stats: { connects: number; resumes: number; lostSessions: number; failures: number };
  readonly connected: boolean;
  readonly closed: boolean;
  /** The last event id handed to the application, per plain channel. */
  readonly positions: { [channel: string]: string };

  /** Start connecting; resolves with the first auth result. */
  connect(): Promise<AuthResult>;
  /** Stop reconnecting and close with 1000. */
  close(): Promise<void>;
  /** Any op, sent once connected. */
  request<R = Record<string, unknown>>(op: string, fields?: Record<string, unknown>): Promise<R>;

  subscribe(channel: string, options?: SubscribeOptions): Promise<SubscribeResult | RestoredChannel>;
  unsubscribe(channel: string, options?: { group?: string }): Promise<{}>;
  publish(channel: string, data: Json, options?: { key?: string }): Promise<PublishResult>;
  history(channel: string, options?: { since?: string; limit?: number }): Promise<HistoryResult>;
  ack(channel: string, group: string, ids: Iterable<string>): Promise<{ acked: number }>;
  ping(): Promise<{}>;

  presence(channel: string, options?: { limit?: number }): Promise<PresenceResult>;
  /** The member list of a presence subscription as last known. */
  members(channel: string): PresenceMember[];

  stateGet(key: string): Promise<StateValue>;
  stateSet(key: string, value: Json, options?: { version?: number }): Promise<{ version: number }>;
  statePatch(key: string, patch: Json, options?: { version?: number }): Promise<{ version: number }>;
  stateDelete(key: string, options?: { version?: number }): Promise<{ version: number }>;
  stateSubscribe(key: string): Promise<StateValue>;
  stateUnsubscribe(key: string): Promise<{}>;
  /** The local copy of a subscribed key. */
  stateValue(key: string): StateValue | undefined;
}

export const SUBPROTOCOL: "apix.v1";
export const STOP_CODES: readonly number[];
export const RECONNECT_CODES: readonly number[];

export function backoffDelay(
  attempt: number,
  options?: { base?: number; cap?: number; factor?: number; random?: () => number },
): number;
export function parseEventId(id: unknown): [bigint, bigint] | null;
export function compareEventIds(a: string, b: string): -1 | 0 | 1;
export function mergePatch(target: Json | undefined, patch: Json): Json;
export function applyStatePush(
  local: StateValue | undefined,
  push: { version: number; value?: Json; patch?: Json },
): { action: "ignore" } | { action: "gap" } | { action: "apply"; value: Json; version: number };
export function applyPresencePush(
  members: Map<string, PresenceMember>,
  push: { join?: PresenceMember; leave?: PresenceMember },
): { type: "join" | "leave"; member: PresenceMember } | null;
export function shouldReconnect(
  code: number,
  options?: { stopCodes?: readonly number[]; reconnectOnAdminDisconnect?: boolean },
): boolean;

export default ApixClient;
