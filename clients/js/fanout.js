// @ts-check
/**
 * fanout client — WebSocket protocol v1 (docs/protocol.md), for browsers and Node.
 * Dependency-free ES module.
 *
 * ## State machine (`client.state`, announced with the "state" event)
 *
 *   idle ──connect()──► connecting ──hello──► open
 *                          │   ▲                │
 *      socket closed,      │   │ timer fired    │ socket closed / no answer to a ping
 *      refused, no hello   ▼   │ (token fetched,│ (anything but the terminal cases)
 *      within connectTimeout  reconnecting ◄────┘
 *
 *   any state ──close() by the app──────────────────────────────► closed
 *   closed by the server with 1008 (policy) ────────────────────► closed
 *   closed by the server with 4004 (operator) ── "kicked" event ─► closed
 *   closed with 4003 (token expired) and `token` is a string ───► closed
 *   closed ──connect()──► connecting (starts over, keeps lastId)
 *
 * * connecting:   the first attempt (token fetched, socket opening, waiting for hello).
 * * open:         `hello` received. Backoff attempt counter reset to 0.
 * * reconnecting: waiting for the next attempt, or a later attempt in progress.
 *                 The delay before the attempt:
 *                   1012 (node draining): `retry_ms` from the JSON close reason, plus up to
 *                        `minDelayMs` of jitter (falls back to backoff if unparseable);
 *                   4003 (token expired): 0 — the token function is called again first;
 *                   1009 (frame too big): `maxDelayMs`;
 *                   anything else (1006, 1011, 1013, 4000, 4001, HTTP refusals, timeouts):
 *                        full-jitter backoff `random() * min(maxDelayMs, minDelayMs * 2^attempt)`.
 *                 Every attempt calls the `token` function (when it is one) and adds
 *                 `?since=<last msg id>` once a message has been received.
 * * closed:       terminal until connect() is called again; no timers left running.
 *
 * Requests (`setPrefs`, `getPrefs`, `ask`) made while not open (idle included) are queued
 * and sent on the next `hello`; requests already sent on a socket that closes reject with
 * code "disconnected" (their answer cannot arrive on another connection). All of them
 * reject with "timeout" after `requestTimeoutMs`, and with "closed" on close() or when the
 * server closes for good.
 */

/** Names `on()` treats as client events rather than message types. */
const EVENTS = new Set([
  "open",
  "hello",
  "prefs",
  "state",
  "error",
  "resume",
  "close",
  "kicked",
  "message",
  "frame",
]);

const DEFAULTS = {
  minDelayMs: 500,
  maxDelayMs: 30000,
  heartbeatTimeoutMs: 10000,
  connectTimeoutMs: 15000,
  requestTimeoutMs: 10000,
  dedupSize: 1000,
};

/** The heartbeat interval used in browsers when `heartbeatMs` is not given. */
const BROWSER_HEARTBEAT_MS = 25000;

/**
 * The reconnect delay for attempt `attempt` (0 for the first retry): "full jitter",
 * uniformly distributed in `[0, min(maxDelayMs, minDelayMs * 2^attempt))`.
 *
 * @param {number} attempt  consecutive failed attempts so far (0-based)
 * @param {{minDelayMs?: number, maxDelayMs?: number}} [options]
 * @param {() => number} [random]  returns a number in [0, 1); Math.random by default
 * @returns {number} milliseconds
 */
export function backoffDelay(attempt, options = {}, random = Math.random) {
  const min = options.minDelayMs ?? DEFAULTS.minDelayMs;
  const max = options.maxDelayMs ?? DEFAULTS.maxDelayMs;
  const exp = Math.min(Math.max(0, attempt), 52); // 2^52 keeps the product finite
  const ceiling = Math.min(max, min * 2 ** exp);
  return Math.floor(random() * ceiling);
}

/**
 * The `retry_ms` of a 1012 close reason (`{"retry_ms":N}`), or null.
 * @param {string} reason
 * @returns {number | null}
 */
export function parseRetryMs(reason) {
  try {
    const v = JSON.parse(reason);
    const n = v && typeof v === "object" ? v.retry_ms : undefined;
    return typeof n === "number" && Number.isFinite(n) && n >= 0 ? n : null;
  } catch {
    return null;
  }
}

/** An `error` frame from the server, or a client-side failure of a request. */
export class FanoutError extends Error {
  /**
   * @param {string} code     server error code (bad_frame, ask_disabled, ask_failed,
   *                          unavailable, unknown_type, …) or a client one
   *                          (timeout, disconnected, closed, token_failed)
   * @param {string} message
   * @param {{ref?: string, frame?: object}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "FanoutError";
    this.code = code;
    this.ref = extra.ref;
    this.frame = extra.frame;
  }
}

/**
 * A fanout connection that keeps itself connected.
 *
 * ```js
 * const client = new FanoutClient({ url: "wss://push.example.com/ws", token: getJwt, platform: "h5" });
 * client.on("robot.reply", (data, msg) => render(data));
 * client.on("resume", (resume) => { if (!resume.recovered) reloadFromApi(); });
 * client.on("error", (e) => { if (e.code === "messages_lost") reloadFromApi(); });
 * client.connect();
 * ```
 */
export class FanoutClient {
  /** @type {Required<Pick<import("./fanout.d.ts").FanoutOptions, "minDelayMs"|"maxDelayMs"|"heartbeatTimeoutMs"|"connectTimeoutMs"|"requestTimeoutMs"|"dedupSize">> & import("./fanout.d.ts").FanoutOptions} */
  #opts;
  /** @type {any} */
  #WS;
  /** @type {any} the current socket, or null; events of any other socket are ignored */
  #ws = null;
  /** @type {import("./fanout.d.ts").FanoutState | "idle"} */
  #state = "idle";
  /** @type {Map<string, Set<Function>>} */
  #handlers = new Map();
  #attempt = 0;
  #everOpened = false;
  #stopped = true;
  /** Bumped for every attempt and on close(): a stale async step sees it changed. */
  #gen = 0;
  /** @type {any} */ #retryTimer = null;
  /** @type {any} */ #connectTimer = null;
  /** @type {any} */ #heartbeatTimer = null;
  /** @type {any} */ #pongTimer = null;
  /** @type {string | null} */ #lastId = null;
  /** @type {Set<string>} */ #seen = new Set();
  /** @type {string[]} */ #seenRing = [];
  #seenPos = 0;
  /** @type {object | null} */ #hello = null;
  /** @type {Record<string, boolean> | null} */ #prefs = null;
  /** @type {Map<string, Pending>} */ #pending = new Map();
  #refSeq = 0;
  #refPrefix = Math.random().toString(36).slice(2, 7) + "-";
  /** @type {string | null} */ #lastSocketError = null;
  /** @type {string | null} */ #url = null;
  /** @type {(() => void) | null} */ #visibilityOff = null;

  /**
   * @param {import("./fanout.d.ts").FanoutOptions} options
   */
  constructor(options) {
    if (!options || typeof options.url !== "string") {
      throw new TypeError("FanoutClient: options.url (ws://host/ws) is required");
    }
    this.#opts = { ...DEFAULTS, ...options };
    for (const k of Object.keys(DEFAULTS)) {
      // @ts-ignore
      if (this.#opts[k] === undefined) this.#opts[k] = DEFAULTS[k];
    }
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WS !== "function") {
      throw new TypeError(
        "FanoutClient: no WebSocket available; in Node pass { WebSocket } (e.g. from the `ws` package)",
      );
    }
    if (options.since) this.#lastId = options.since;
    if (options.groups != null) {
      const ok =
        Array.isArray(options.groups) &&
        options.groups.every((g) => typeof g === "string" && g !== "" && !g.includes(","));
      if (!ok) {
        throw new TypeError("FanoutClient: options.groups must be an array of non-empty strings without commas");
      }
      this.#opts.groups = [...options.groups];
    }
  }

  /** The current state: "idle" before connect(), then connecting / open / reconnecting / closed. */
  get state() {
    return this.#state;
  }

  /** The id of the last message received (sent as `?since=` on reconnect), or null. */
  get lastId() {
    return this.#lastId;
  }

  /** The last `hello` frame, or null before the first one. */
  get hello() {
    return this.#hello;
  }

  /** The user's preferences as last seen (from `hello` or a `prefs` frame), or null. */
  get prefs() {
    return this.#prefs;
  }

  /** The URL of the latest connection attempt (with `since`, `user`, …), or null. */
  get url() {
    return this.#url;
  }

  /**
   * Subscribes to a message type (handler gets `(data, msg)`) or to a client event:
   * "open"/"hello" `(hello)`, "prefs" `(prefs, frame)`, "state" `(state, previous)`,
   * "error" `(errorFrame)`, "resume" `(resume, hello)`, "close" `(code, reason, info)`,
   * "kicked" `(code, reason, info)` when an operator closed the connection (4004, just
   * before its "close"; the client stays closed until connect()),
   * "message" `(data, msg)` for every message, "frame" `(frame)` for every frame.
   * Those names are reserved: a message type with one of them is only seen by "message".
   *
   * @param {string} type
   * @param {Function} handler
   * @returns {() => void} unsubscribes
   */
  on(type, handler) {
    if (typeof handler !== "function") throw new TypeError("handler must be a function");
    let set = this.#handlers.get(type);
    if (!set) this.#handlers.set(type, (set = new Set()));
    // Wrapped, so the same function registered twice needs two unsubscribes.
    const entry = (/** @type {any[]} */ ...args) => handler(...args);
    set.add(entry);
    return () => {
      set.delete(entry);
    };
  }

  /**
   * Like on(), but the handler runs once.
   * @param {string} type
   * @param {Function} handler
   * @returns {() => void}
   */
  once(type, handler) {
    const off = this.on(type, (/** @type {any[]} */ ...args) => {
      off();
      handler(...args);
    });
    return off;
  }

  /**
   * Starts connecting (no-op when already started). Call after registering handlers.
   * After close() it starts over, resuming from `lastId`.
   * @returns {this}
   */
  connect() {
    if (!this.#stopped) return this;
    this.#stopped = false;
    this.#attempt = 0;
    this.#everOpened = false;
    this.#watchVisibility();
    this.#open();
    return this;
  }

  /**
   * Closes the connection for good (code 1000): no reconnect; pending requests reject
   * with code "closed". The "close" event fires with 1000.
   * @param {string} [reason]
   */
  close(reason = "client closed") {
    if (this.#state === "closed") return; // already closed (by the app, or for good by the server)
    const started = this.#state !== "idle";
    this.#stopped = true;
    this.#gen++;
    this.#clearTimers();
    this.#visibilityOff?.();
    this.#visibilityOff = null;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      try {
        ws.close(1000, reason);
      } catch {
        /* already closed */
      }
    }
    this.#rejectPending(() => true, "closed", "the client was closed");
    this.#setState("closed");
    if (started) this.#emit("close", 1000, reason, { reconnect: false, delayMs: null, byClient: true });
  }

  /**
   * Sends a raw client frame (an object, serialized as JSON) if the socket is open.
   * @param {object} frame
   * @returns {boolean} whether it was sent
   */
  send(frame) {
    const ws = this.#ws;
    if (!ws || this.#state !== "open") return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /**
   * Acknowledges received messages (counted by the server as delivered end to end).
   * Optional; batch ids (e.g. once a second). Dropped when not connected.
   * @param {string | string[]} ids
   * @returns {boolean} whether it was sent
   */
  ack(ids) {
    const list = Array.isArray(ids) ? ids : [ids];
    if (list.length === 0) return true;
    return this.send({ t: "ack", ids: list });
  }

  /**
   * Changes preferences (`{type: enabled}`); only the listed types change.
   * Resolves with the user's full preferences from the first `prefs` frame that shows
   * the requested values; rejects with the server's `error` (e.g. "unknown_type",
   * "unavailable") or "timeout" / "disconnected" / "closed".
   * @param {Record<string, boolean>} prefs
   * @returns {Promise<Record<string, boolean>>}
   */
  setPrefs(prefs) {
    if (!prefs || typeof prefs !== "object") {
      return Promise.reject(new TypeError("setPrefs needs an object of type → boolean"));
    }
    return this.#request("prefs.set", { t: "prefs.set", prefs: { ...prefs } }, { ...prefs });
  }

  /**
   * Reads the user's preferences from the server (resolves with the next `prefs` frame).
   * @returns {Promise<Record<string, boolean>>}
   */
  getPrefs() {
    return this.#request("prefs.get", { t: "prefs.get" });
  }

  /**
   * Sends `data` to the backend (the assistant). Resolves on `ask.ok`; rejects with the
   * `error` of the same ref ("ask_disabled", "ask_failed", "bad_frame") or a client code.
   * @param {unknown} data  any JSON value except null/undefined
   * @returns {Promise<void>}
   */
  ask(data) {
    if (data === undefined || data === null) {
      return Promise.reject(new TypeError("ask needs data"));
    }
    return this.#request("ask", { t: "ask", data });
  }

  // ---------------------------------------------------------------- connecting

  async #open() {
    const gen = ++this.#gen;
    this.#setState(this.#everOpened || this.#attempt > 0 ? "reconnecting" : "connecting");
    let token = null;
    const source = this.#opts.token;
    if (source !== undefined && source !== null) {
      try {
        token = typeof source === "function" ? await source() : source;
      } catch (e) {
        if (gen !== this.#gen || this.#stopped) return;
        this.#emit("error", {
          t: "error",
          code: "token_failed",
          message: `the token function failed: ${e instanceof Error ? e.message : String(e)}`,
        });
        this.#retry(backoffDelay(this.#attempt++, this.#opts));
        return;
      }
    }
    if (gen !== this.#gen || this.#stopped) return;
    const url = this.#buildUrl();
    this.#url = url;
    const protocols = ["fanout.v1"];
    if (token) protocols.push(`bearer.${token}`);
    let ws;
    try {
      ws = new this.#WS(url, protocols);
    } catch (e) {
      this.#emit("error", {
        t: "error",
        code: "socket_failed",
        message: e instanceof Error ? e.message : String(e),
      });
      this.#retry(backoffDelay(this.#attempt++, this.#opts));
      return;
    }
    this.#ws = ws;
    this.#lastSocketError = null;
    ws.onmessage = (/** @type {any} */ ev) => {
      if (ws === this.#ws) this.#onFrame(ev.data);
    };
    ws.onerror = (/** @type {any} */ ev) => {
      if (ws === this.#ws) this.#lastSocketError = ev?.message ?? ev?.error?.message ?? "socket error";
    };
    ws.onclose = (/** @type {any} */ ev) => {
      if (ws === this.#ws) this.#onSocketClose(ev?.code ?? 1006, ev?.reason ?? "");
    };
    this.#connectTimer = setTimeout(() => {
      if (ws === this.#ws && this.#state !== "open") this.#abandon(4000, "no hello within connectTimeoutMs");
    }, this.#opts.connectTimeoutMs);
  }

  #buildUrl() {
    const base = globalThis.location?.href;
    const u = base ? new URL(this.#opts.url, base) : new URL(this.#opts.url);
    if (u.protocol === "http:") u.protocol = "ws:"; // a relative "/ws" in a page, or an http URL
    else if (u.protocol === "https:") u.protocol = "wss:";
    const q = u.searchParams;
    if (this.#opts.user != null) q.set("user", String(this.#opts.user));
    if (this.#opts.platform != null) q.set("platform", String(this.#opts.platform));
    if (this.#opts.tab != null) q.set("tab", String(this.#opts.tab));
    if (this.#opts.groups?.length) q.set("groups", this.#opts.groups.join(","));
    if (this.#lastId != null) q.set("since", this.#lastId);
    return u.toString();
  }

  /** Drops the current socket without waiting for its close handshake, then reconnects. */
  #abandon(/** @type {number} */ code, /** @type {string} */ reason) {
    const ws = this.#ws;
    if (!ws) return;
    // Forget it first: its own close event (whenever it comes) is then ignored.
    this.#onSocketClose(code, reason);
    try {
      if (typeof ws.terminate === "function") ws.terminate(); // Node `ws`: no 30 s close wait
      else ws.close(4000, reason);
    } catch {
      /* ignore */
    }
  }

  #onSocketClose(/** @type {number} */ code, /** @type {string} */ reason) {
    const wasOpen = this.#state === "open";
    this.#ws = null;
    this.#clearTimers();
    this.#rejectPending((p) => p.sent, "disconnected", `the connection closed (${code}) before the answer`);
    const info = {
      reconnect: true,
      delayMs: /** @type {number | null} */ (null),
      byClient: false,
      wasOpen,
      error: this.#lastSocketError,
    };
    if (this.#stopped) {
      info.reconnect = false;
      this.#emit("close", code, reason, info);
      return;
    }
    let delay;
    if (code === 1008) {
      delay = null; // policy violation: a client bug; retrying blindly would loop
    } else if (code === 4004) {
      delay = null; // disconnected by an operator: not until the user acts (connect())
    } else if (code === 4003) {
      delay = typeof this.#opts.token === "function" ? 0 : null;
    } else if (code === 1012) {
      const retry = parseRetryMs(reason);
      delay =
        retry === null
          ? backoffDelay(this.#attempt++, this.#opts)
          : retry + Math.floor(Math.random() * this.#opts.minDelayMs);
    } else if (code === 1009) {
      delay = this.#opts.maxDelayMs;
    } else {
      delay = backoffDelay(this.#attempt++, this.#opts);
    }
    if (delay === null) {
      this.#stopped = true;
      this.#gen++;
      this.#visibilityOff?.();
      this.#visibilityOff = null;
      this.#rejectPending(() => true, "closed", `the server closed the connection (${code})`);
      info.reconnect = false;
      this.#setState("closed");
      if (code === 4004) this.#emit("kicked", code, reason, info);
      this.#emit("close", code, reason, info);
      return;
    }
    info.delayMs = delay;
    this.#setState("reconnecting");
    this.#emit("close", code, reason, info);
    this.#retry(delay);
  }

  #retry(/** @type {number} */ delay) {
    if (this.#stopped) return;
    this.#setState("reconnecting");
    clearTimeout(this.#retryTimer);
    const gen = this.#gen;
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      if (gen === this.#gen && !this.#stopped) this.#open();
    }, delay);
  }

  // ---------------------------------------------------------------- frames

  #onFrame(/** @type {unknown} */ raw) {
    // Anything from the server proves the connection alive.
    clearTimeout(this.#pongTimer);
    this.#pongTimer = null;
    if (typeof raw !== "string") return; // binary frames are not part of the protocol
    let f;
    try {
      f = JSON.parse(raw);
    } catch {
      return;
    }
    if (!f || typeof f !== "object" || typeof f.t !== "string") return;
    this.#emit("frame", f);
    switch (f.t) {
      case "hello":
        return this.#onHello(f);
      case "msg":
        return this.#onMsg(f);
      case "prefs":
        return this.#onPrefs(f);
      case "ask.ok": {
        const p = typeof f.ref === "string" ? this.#pending.get(f.ref) : undefined;
        if (p && p.kind === "ask") this.#settle(p, null, undefined);
        return;
      }
      case "error":
        return this.#onError(f);
      default:
        return; // pong, and frames of later protocol versions
    }
  }

  #onHello(/** @type {any} */ f) {
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#hello = f;
    this.#attempt = 0;
    this.#everOpened = true;
    if (f.prefs && typeof f.prefs === "object") this.#prefs = f.prefs;
    this.#setState("open");
    this.#startHeartbeat();
    for (const p of this.#pending.values()) {
      if (!p.sent) this.#sendPending(p);
    }
    this.#emit("hello", f);
    this.#emit("open", f);
    if (f.resume) this.#emit("resume", f.resume, f);
    if (f.prefs) this.#emit("prefs", f.prefs, f);
  }

  #onMsg(/** @type {any} */ f) {
    const id = typeof f.id === "string" ? f.id : null;
    if (id !== null) {
      // A redelivered message keeps its id and its `ts` (the Kafka record timestamp).
      // The ts is part of the key because the server derives ids from the record's
      // topic/partition/offset, which start over when a broker's log is wiped (the
      // embedded default's in-process Kafka at every restart): a new message may then
      // reuse an old id, and must not be taken for a duplicate.
      const key = typeof f.ts === "number" ? `${id}@${f.ts}` : id;
      if (this.#seen.has(key)) return; // delivered twice: handlers already ran
      this.#remember(key);
      this.#lastId = id;
    }
    if (!EVENTS.has(f.type)) this.#emit(f.type, f.data, f);
    this.#emit("message", f.data, f);
  }

  #remember(/** @type {string} */ key) {
    const size = Math.max(1, this.#opts.dedupSize);
    if (this.#seenRing.length < size) {
      this.#seenRing.push(key);
    } else {
      this.#seen.delete(this.#seenRing[this.#seenPos]);
      this.#seenRing[this.#seenPos] = key;
      this.#seenPos = (this.#seenPos + 1) % size;
    }
    this.#seen.add(key);
  }

  #onPrefs(/** @type {any} */ f) {
    const prefs = f.prefs && typeof f.prefs === "object" ? f.prefs : {};
    this.#prefs = prefs;
    for (const p of [...this.#pending.values()]) {
      if (!p.sent) continue;
      if (p.kind === "prefs.get") this.#settle(p, null, prefs);
      else if (p.kind === "prefs.set" && Object.entries(p.want ?? {}).every(([k, v]) => prefs[k] === v)) {
        this.#settle(p, null, prefs);
      }
    }
    this.#emit("prefs", prefs, f);
  }

  #onError(/** @type {any} */ f) {
    let p = typeof f.ref === "string" ? this.#pending.get(f.ref) : undefined;
    if (!p && f.ref === undefined && f.code === "unavailable") {
      // Older servers answer a failed prefs.set without its ref: the oldest one it is.
      p = [...this.#pending.values()].find((q) => q.sent && q.kind === "prefs.set");
    }
    if (p) {
      this.#settle(p, new FanoutError(f.code, f.message ?? f.code, { ref: p.ref, frame: f }));
    }
    this.#emit("error", f);
  }

  // ---------------------------------------------------------------- requests

  /**
   * @param {Pending["kind"]} kind
   * @param {Record<string, unknown>} frame
   * @param {Record<string, boolean>} [want]
   */
  #request(kind, frame, want) {
    if (this.#state === "closed") {
      return Promise.reject(new FanoutError("closed", "the client is closed; call connect()"));
    }
    const ref = this.#refPrefix + ++this.#refSeq;
    return new Promise((resolve, reject) => {
      /** @type {Pending} */
      const p = {
        ref,
        kind,
        frame: { ...frame, ref },
        want,
        sent: false,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.#settle(p, new FanoutError("timeout", `no answer to ${kind} within ${this.#opts.requestTimeoutMs} ms`, { ref }));
        }, this.#opts.requestTimeoutMs),
      };
      this.#pending.set(ref, p);
      if (this.#state === "open") this.#sendPending(p);
    });
  }

  #sendPending(/** @type {Pending} */ p) {
    p.sent = this.send(p.frame);
  }

  /**
   * @param {Pending} p
   * @param {Error | null} err
   * @param {unknown} [value]
   */
  #settle(p, err, value) {
    if (!this.#pending.delete(p.ref)) return;
    clearTimeout(p.timer);
    if (err) p.reject(err);
    else p.resolve(value);
  }

  #rejectPending(/** @type {(p: Pending) => boolean} */ which, /** @type {string} */ code, /** @type {string} */ message) {
    for (const p of [...this.#pending.values()]) {
      if (which(p)) this.#settle(p, new FanoutError(code, message, { ref: p.ref }));
    }
  }

  // ---------------------------------------------------------------- heartbeat

  #heartbeatMs() {
    const configured = this.#opts.heartbeatMs;
    if (configured !== undefined) return configured > 0 ? configured : 0;
    return typeof document !== "undefined" ? BROWSER_HEARTBEAT_MS : 0;
  }

  #shouldPing() {
    const when = this.#opts.heartbeatWhen ?? (typeof document !== "undefined" ? "hidden" : "always");
    if (when === "always") return true;
    return typeof document !== "undefined" && document.visibilityState === "hidden";
  }

  #startHeartbeat() {
    const every = this.#heartbeatMs();
    if (!every) return;
    clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = setInterval(() => {
      if (this.#state === "open" && this.#shouldPing()) this.#ping();
    }, every);
  }

  #ping() {
    if (this.#pongTimer) return; // already waiting for an answer
    if (!this.send({ t: "ping" })) return;
    this.#pongTimer = setTimeout(() => {
      this.#pongTimer = null;
      this.#abandon(4000, "no answer to ping");
    }, this.#opts.heartbeatTimeoutMs);
  }

  /** In browsers: on return to the foreground, check the connection at once. */
  #watchVisibility() {
    if (this.#visibilityOff || typeof document === "undefined" || !document.addEventListener) return;
    const doc = document;
    const onChange = () => {
      if (doc.visibilityState === "visible" && this.#state === "open" && this.#heartbeatMs()) this.#ping();
    };
    doc.addEventListener("visibilitychange", onChange);
    this.#visibilityOff = () => doc.removeEventListener("visibilitychange", onChange);
  }

  // ---------------------------------------------------------------- plumbing

  #clearTimers() {
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#connectTimer);
    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#pongTimer);
    this.#retryTimer = this.#connectTimer = this.#heartbeatTimer = this.#pongTimer = null;
  }

  #setState(/** @type {import("./fanout.d.ts").FanoutState} */ next) {
    if (next === this.#state) return;
    const prev = this.#state;
    this.#state = next;
    this.#emit("state", next, prev);
  }

  #emit(/** @type {string} */ type, /** @type {any[]} */ ...args) {
    const set = this.#handlers.get(type);
    if (!set) return;
    for (const h of [...set]) {
      try {
        h(...args);
      } catch (e) {
        (this.#opts.onHandlerError ?? defaultHandlerError)(e, type);
      }
    }
  }
}

/**
 * @typedef {object} Pending
 * @property {string} ref
 * @property {"ask" | "prefs.get" | "prefs.set"} kind
 * @property {Record<string, unknown>} frame
 * @property {Record<string, boolean> | undefined} want
 * @property {boolean} sent
 * @property {(v: any) => void} resolve
 * @property {(e: Error) => void} reject
 * @property {any} timer
 */

function defaultHandlerError(/** @type {unknown} */ e, /** @type {string} */ type) {
  console.error(`fanout: a "${type}" handler threw`, e);
}

/**
 * Creates a client and starts connecting. Handlers registered right after this call
 * (in the same tick) see every frame.
 * @param {import("./fanout.d.ts").FanoutOptions} options
 * @returns {FanoutClient}
 */
export function connect(options) {
  return new FanoutClient(options).connect();
}
