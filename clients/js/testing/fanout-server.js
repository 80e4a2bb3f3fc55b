// Test support (not part of the library): runs a real fanout in its embedded default.
// Lives outside test/ so `node --test test/` does not run it as a test file.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";

const PACKAGE_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..");

/** Servers still running: killed if this process exits without stopping them. */
const running = new Set();
process.on("exit", () => {
  for (const proc of running) proc.kill("SIGKILL");
});

/** The fanout binary: $FANOUT_BIN, else <repo>/target/debug/fanout (built by `cargo build`). */
export const FANOUT_BIN = process.env.FANOUT_BIN
  ? resolve(process.env.FANOUT_BIN)
  : resolve(PACKAGE_ROOT, "../../target/debug/fanout");

/** A free TCP port on 127.0.0.1 (bound, read, released). */
export async function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.unref();
    srv.on("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = /** @type {import("node:net").AddressInfo} */ (srv.address());
      srv.close(() => ok(port));
    });
  });
}

/**
 * Starts `fanout serve` in `dir` (a fresh temporary directory by default, so its SQLite
 * file fanout.db lands there) on the given or free ports, and waits until it is ready
 * and owns its Kafka partitions (so a message published next is consumed at once).
 *
 * Only FANOUT__SERVER__LISTEN, FANOUT__ADMIN__LISTEN and `env` are set: no Kafka, Redis or
 * database, i.e. the embedded default. FANOUT__* variables of the caller are not inherited.
 *
 * @param {{dir?: string, ports?: {public: number, admin: number}, env?: Record<string,string>}} [options]
 */
export async function startFanout(options = {}) {
  if (!existsSync(FANOUT_BIN)) {
    throw new Error(`fanout binary not found at ${FANOUT_BIN}: run \`cargo build\` in the repo root or set FANOUT_BIN`);
  }
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), "fanout-js-")));
  const ports = options.ports ?? { public: await freePort(), admin: await freePort() };
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("FANOUT__")));
  Object.assign(env, {
    FANOUT__SERVER__LISTEN: `127.0.0.1:${ports.public}`,
    FANOUT__ADMIN__LISTEN: `127.0.0.1:${ports.admin}`,
    NO_COLOR: "1",
    ...options.env,
  });
  const proc = spawn(FANOUT_BIN, ["serve"], { cwd: dir, env, stdio: ["ignore", "pipe", "pipe"] });
  /** @type {string[]} */
  const log = [];
  const keep = (/** @type {Buffer} */ chunk) => {
    log.push(chunk.toString());
    if (log.length > 400) log.splice(0, log.length - 400);
  };
  proc.stdout.on("data", keep);
  proc.stderr.on("data", keep);
  /** @type {Promise<{code: number | null, signal: string | null}>} */
  const exited = new Promise((ok) => proc.once("exit", (code, signal) => ok({ code, signal })));
  let alive = true;
  running.add(proc);
  exited.then(() => {
    alive = false;
    running.delete(proc);
  });

  const publicUrl = `http://127.0.0.1:${ports.public}`;
  const adminUrl = `http://127.0.0.1:${ports.admin}`;
  const server = {
    dir,
    ports,
    proc,
    publicUrl,
    adminUrl,
    wsUrl: `ws://127.0.0.1:${ports.public}/ws`,
    exited,
    logs: () => log.join(""),
    /**
     * POST /v1/publish; resolves with the HTTP status (202 when accepted).
     * @param {object} envelope
     * @param {string} [adminToken]
     */
    async publish(envelope, adminToken) {
      const headers = { "content-type": "application/json" };
      if (adminToken) headers.authorization = `Bearer ${adminToken}`;
      const res = await fetch(`${publicUrl}/v1/publish`, { method: "POST", headers, body: JSON.stringify(envelope) });
      await res.arrayBuffer();
      return res.status;
    },
    /** SIGTERM (drain: sessions closed with 1012), then waits for the exit (SIGKILL after 15 s). */
    async stop() {
      if (alive) {
        proc.kill("SIGTERM");
        const timer = setTimeout(() => proc.kill("SIGKILL"), 15000);
        await exited;
        clearTimeout(timer);
      }
      return exited;
    },
    /** Stops it and removes its directory. */
    async dispose() {
      await server.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };

  const deadline = Date.now() + 30000;
  for (;;) {
    if (!alive) {
      throw new Error(`fanout exited during startup (${JSON.stringify(await exited)}):\n${server.logs()}`);
    }
    if (Date.now() > deadline) {
      await server.stop();
      throw new Error(`fanout not ready within 30 s:\n${server.logs()}`);
    }
    if ((await status(`${adminUrl}/readyz`)) === 200 && (await assignedPartitions(adminUrl)) > 0) break;
    await sleep(100);
  }
  return server;
}

async function status(/** @type {string} */ url) {
  try {
    const res = await fetch(url);
    await res.arrayBuffer();
    return res.status;
  } catch {
    return 0;
  }
}

/** `fanout_kafka_assigned_partitions` from /metrics (0 when unreadable). */
async function assignedPartitions(/** @type {string} */ adminUrl) {
  try {
    const text = await (await fetch(`${adminUrl}/metrics`)).text();
    const m = /^fanout_kafka_assigned_partitions(?:\{[^}]*\})?\s+(\S+)/m.exec(text);
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/**
 * Resolves with the arguments of the next `event` of `client` that passes `filter`;
 * rejects after `ms`.
 * @param {{on: (t: string, h: Function) => () => void}} client
 * @param {string} event
 * @param {{ms?: number, filter?: (...args: any[]) => boolean}} [opts]
 * @returns {Promise<any[]>}
 */
export function next(client, event, { ms = 10000, filter = () => true } = {}) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => {
      off();
      fail(new Error(`timed out after ${ms} ms waiting for "${event}"`));
    }, ms);
    const off = client.on(event, (/** @type {any[]} */ ...args) => {
      if (!filter(...args)) return;
      clearTimeout(timer);
      off();
      ok(args);
    });
  });
}

/**
 * A WebSocket constructor (the `ws` package's) that records every URL and protocol list
 * it was opened with (and when), and every frame sent.
 * @param {any} Base
 */
export function recordingWebSocket(Base) {
  /** @type {{url: string, protocols: string[], at: number}[]} */
  const opened = [];
  /** @type {any[]} every frame sent, parsed */
  const sent = [];
  class Recording extends Base {
    constructor(/** @type {string} */ url, /** @type {string[]} */ protocols) {
      super(url, protocols);
      opened.push({ url, protocols, at: Date.now() });
    }
    send(/** @type {any} */ data, /** @type {any[]} */ ...rest) {
      sent.push(JSON.parse(String(data)));
      return super.send(data, ...rest);
    }
  }
  return { WebSocket: Recording, opened, sent };
}
