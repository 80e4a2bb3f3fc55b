// Types for @fanout/client (fanout.js): fanout's WebSocket protocol v1.

/** Client states, announced with the "state" event. "idle" only before connect(). */
export type FanoutState = "connecting" | "open" | "reconnecting" | "closed";

/** Message type → enabled. */
export type Prefs = Record<string, boolean>;

/** The minimal WebSocket the client needs (the browser's, or the `ws` package's in Node). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  /** Node `ws` only: drop the socket without the close handshake. */
  terminate?(): void;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
}

export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface FanoutOptions {
  /** `ws(s)://host/ws` (`http(s)://` is turned into `ws(s)://`; relative URLs resolve against the page). */
  url: string;
  /**
   * The JWT, sent as the subprotocols `["fanout.v1", "bearer.<jwt>"]`. A function is called
   * before every connection attempt (so a 4003 "token expired" gets a fresh one); cache in it
   * if fetching is expensive. With a fixed string, a 4003 close is final.
   * Leave out in the server's insecure (development) mode.
   */
  token?: string | (() => string | Promise<string>);
  /** Insecure (development) mode only: the user id, sent as `?user=`. */
  user?: string;
  /** `h5`, `ios` or `android` (`?platform=`); a token's `platform` claim wins. */
  platform?: "h5" | "ios" | "android" | (string & {});
  /** Any id for this connection (`?tab=`), e.g. one per browser tab. */
  tab?: string;
  /**
   * Insecure (development) mode only: the groups this connection belongs to, sent as
   * `?groups=a,b` (messages `to: {"group": …}` reach it). Non-empty strings without commas.
   * With a token, the groups are the token's `groups` claim.
   */
  groups?: string[];
  /** Resume point for the first connection (a `msg.id` stored earlier). */
  since?: string;
  /** WebSocket constructor; default `globalThis.WebSocket`. In Node 20 pass the `ws` package's. */
  WebSocket?: WebSocketConstructor | (new (...args: any[]) => any);
  /** Backoff base: the first retry waits `random() * minDelayMs`. Default 500. */
  minDelayMs?: number;
  /** Backoff cap. Default 30000. Also the wait after a 1009 close. */
  maxDelayMs?: number;
  /**
   * Interval of app-level `{"t":"ping"}` frames; 0 disables. Default: 25000 in browsers,
   * off in Node (set it to enable).
   */
  heartbeatMs?: number;
  /**
   * When to ping: "hidden" (only while `document.visibilityState === "hidden"`; the default
   * in browsers) or "always" (the default where there is no `document`, e.g. Node).
   */
  heartbeatWhen?: "hidden" | "always";
  /** No frame within this long after a ping: drop the socket and reconnect. Default 10000. */
  heartbeatTimeoutMs?: number;
  /** No `hello` within this long after opening a socket: drop it and retry. Default 15000. */
  connectTimeoutMs?: number;
  /** setPrefs / getPrefs / ask reject with code "timeout" after this long. Default 10000. */
  requestTimeoutMs?: number;
  /** How many recent message ids are remembered to drop duplicates. Default 1000. */
  dedupSize?: number;
  /** Called when a handler throws (default: console.error). */
  onHandlerError?: (error: unknown, event: string) => void;
}

export interface HelloFrame {
  t: "hello";
  conn: string;
  user: string;
  node: string;
  heartbeat_ms: number;
  prefs: Prefs;
  /** Present only when the connection was opened with `since`. */
  resume?: ResumeInfo;
}

export interface ResumeInfo {
  /** false: messages may have been missed; reload state some other way. */
  recovered: boolean;
  replayed: number;
}

export interface MsgFrame<D = unknown> {
  t: "msg";
  id: string;
  type: string;
  /** Kafka record timestamp, ms since the epoch. */
  ts: number;
  data: D;
  /**
   * The envelope's `collapse` key, when it has one: this message is the latest state of
   * that key (a progress bar, an order status). Replace the earlier message with the same
   * key on screen instead of appending; a resume replays only the latest one.
   */
  collapse?: string;
}

export interface PrefsFrame {
  t: "prefs";
  prefs: Prefs;
}

export interface ErrorFrame {
  t: "error";
  /**
   * Server codes: bad_frame, ask_disabled, ask_failed, unavailable, unknown_type.
   * Client-side (never from the server): token_failed, socket_failed.
   */
  code: string;
  message: string;
  ref?: string;
}

export type ServerFrame =
  | HelloFrame
  | MsgFrame
  | PrefsFrame
  | ErrorFrame
  | { t: "ask.ok"; ref?: string }
  | { t: "pong" }
  | { t: string; [key: string]: unknown };

export interface CloseInfo {
  /** Whether the client will reconnect. */
  reconnect: boolean;
  /** The wait before the next attempt (null when not reconnecting). */
  delayMs: number | null;
  /** True when close() was called by the app. */
  byClient: boolean;
  /** Whether the connection had received its hello. */
  wasOpen?: boolean;
  /** The socket's error message, if it reported one (e.g. an HTTP refusal in Node). */
  error?: string | null;
}

export interface FanoutEvents {
  open: (hello: HelloFrame) => void;
  hello: (hello: HelloFrame) => void;
  /** From every `prefs` frame and from each `hello`. */
  prefs: (prefs: Prefs, frame: PrefsFrame | HelloFrame) => void;
  state: (state: FanoutState, previous: FanoutState | "idle") => void;
  error: (frame: ErrorFrame) => void;
  resume: (resume: ResumeInfo, hello: HelloFrame) => void;
  /**
   * Every closed connection. Client-side drops use code 4000 (reason "no answer to ping" or
   * "no hello within connectTimeoutMs"); a failed handshake is 1006.
   */
  close: (code: number, reason: string, info: CloseInfo) => void;
  /**
   * An operator closed the connection (close code 4004, `POST /v1/users/{user}/disconnect`),
   * emitted just before its "close". The client does not reconnect: state "closed" until
   * the app calls connect() again (after the user acts, e.g. logs in again).
   */
  kicked: (code: 4004, reason: string, info: CloseInfo) => void;
  /** Every (non-duplicate) message, whatever its type. */
  message: (data: unknown, msg: MsgFrame) => void;
  /** Every frame received, raw. */
  frame: (frame: ServerFrame) => void;
}

/** An `error` frame answering a request, or a client-side failure of one. */
export declare class FanoutError extends Error {
  constructor(code: string, message: string, extra?: { ref?: string; frame?: object });
  /**
   * Server codes (ask_disabled, ask_failed, unavailable, unknown_type, bad_frame) or client
   * codes: "timeout", "disconnected" (the socket closed before the answer), "closed".
   */
  readonly code: string;
  readonly ref?: string;
  readonly frame?: object;
}

export declare class FanoutClient {
  constructor(options: FanoutOptions);

  readonly state: FanoutState | "idle";
  /** The id of the last message received; sent as `?since=` when reconnecting. */
  readonly lastId: string | null;
  readonly hello: HelloFrame | null;
  readonly prefs: Prefs | null;
  /** The URL of the latest connection attempt. */
  readonly url: string | null;

  /** Subscribes to a client event. Returns an unsubscribe function. */
  on<E extends keyof FanoutEvents>(event: E, handler: FanoutEvents[E]): () => void;
  /** Subscribes to a message type (any name that is not an event). */
  on<D = any, T extends string = string>(
    type: T extends keyof FanoutEvents ? never : T,
    handler: (data: D, msg: MsgFrame<D>) => void,
  ): () => void;
  /** Like on(), but the handler runs once. */
  once<E extends keyof FanoutEvents>(event: E, handler: FanoutEvents[E]): () => void;
  once<D = any, T extends string = string>(
    type: T extends keyof FanoutEvents ? never : T,
    handler: (data: D, msg: MsgFrame<D>) => void,
  ): () => void;

  /** Starts connecting; no-op when started. After close() it starts over. */
  connect(): this;
  /** Closes for good (1000); pending requests reject with code "closed". */
  close(reason?: string): void;
  /** Sends a raw client frame when open. */
  send(frame: object): boolean;
  /** `{"t":"ack","ids":[…]}` when open. */
  ack(ids: string | string[]): boolean;
  /** Resolves with the full preferences once a `prefs` frame shows the change. */
  setPrefs(prefs: Prefs): Promise<Prefs>;
  /** Resolves with the next `prefs` frame's preferences. */
  getPrefs(): Promise<Prefs>;
  /** Resolves on `ask.ok`; rejects with a FanoutError (e.g. code "ask_disabled"). */
  ask(data: unknown): Promise<void>;
}

/** Creates a client and starts connecting. */
export declare function connect(options: FanoutOptions): FanoutClient;

/** Full-jitter backoff: uniform in [0, min(maxDelayMs, minDelayMs * 2^attempt)). */
export declare function backoffDelay(
  attempt: number,
  options?: { minDelayMs?: number; maxDelayMs?: number },
  random?: () => number,
): number;

/** The `retry_ms` of a 1012 close reason, or null. */
export declare function parseRetryMs(reason: string): number | null;
